"""The recipe: the YAML file that describes a merge and its release.

Everything is validated before any work starts. Every mistake, an unknown key included,
raises `RecipeError` with one line naming the field and what is allowed.

Models are named as local folders (absolute, or relative to the recipe file's folder) or
as Hub ids `org/name[@revision]`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .card_rules import HUB_LICENSES, check_metadata, is_language_code
from .errors import RecipeError
from .merge.methods import METHODS, get_method

ROLES = ("language", "task")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
REVISION = re.compile(r"^[\w./-]+$")
SHA = re.compile(r"^[0-9a-f]{40}$")

TOP_LEVEL_KEYS = (
    "method", "base", "models", "parameters", "languages", "license", "dtype", "output",
    "tokenizer_source", "device", "push", "eval", "license_name", "license_link",
)
PUSH_KEYS = ("repo", "private", "create_pr", "revision", "tag")
EVAL_KEYS = ("tasks", "limit", "include_path", "compare", "backend")
MODEL_KEYS_FIXED = ("model", "role", "hub_id")


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: a local folder, or a Hub repo at a revision."""

    spec: str  # as written in the recipe
    path: Path | None = None  # local folder
    repo_id: str | None = None
    revision: str | None = None  # branch, tag or sha as written (None: main)

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def portable(self) -> str:
        """The spec as written, except that an absolute local path becomes './<folder name>'."""
        if self.path is not None and Path(self.spec).expanduser().is_absolute():
            return f"./{self.path.name}"
        return self.spec

    @property
    def display(self) -> str:
        """A name that never leaks a local absolute path."""
        if self.repo_id:
            return self.repo_id
        return self.path.name if self.path else self.spec


def parse_model_ref(spec: Any, base_dir: Path, field_name: str) -> ModelRef:
    """Parse `org/name[@rev]` or a local folder path into a ModelRef."""
    if not isinstance(spec, str) or not spec.strip():
        raise RecipeError(f"{field_name}: must be a local folder or a Hub id 'org/name[@revision]'")
    spec = spec.strip()
    local = Path(spec).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    looks_like_path = spec.startswith((".", "/", "~")) or local.is_dir()
    if looks_like_path:
        return ModelRef(spec=spec, path=local.resolve())
    repo_id, _, revision = spec.partition("@")
    if not HUB_ID.match(repo_id) or (revision and not REVISION.match(revision)) or spec.endswith("@"):
        raise RecipeError(
            f"{field_name}: {spec!r} is neither an existing folder nor a Hub id 'org/name[@revision]'"
        )
    return ModelRef(spec=spec, repo_id=repo_id, revision=revision or None)


@dataclass
class ModelEntry:
    ref: ModelRef
    role: str
    params: dict[str, Any]  # method's per-model parameters, defaults filled in
    hub_id: str | None = None  # Hub id to list a local folder by in the card


@dataclass(frozen=True)
class PushTarget:
    """Where `lrmerge run` publishes the result."""

    repo: str
    private: bool = False
    create_pr: bool = False
    revision: str | None = None  # branch; created when missing
    tag: str | None = None


@dataclass(frozen=True)
class EvalSpec:
    """What `lrmerge run` evaluates (empty tasks: chosen from the languages)."""

    tasks: tuple[str, ...] = ()
    limit: int | None = None
    include_path: Path | None = None
    compare: bool = False
    backend: str = "server"


@dataclass
class Recipe:
    method: str
    base: ModelRef | None
    models: list[ModelEntry]
    parameters: dict[str, Any]
    languages: list[str] = field(default_factory=list)
    license: str | None = None
    license_name: str | None = None  # with license: other, as on the Hub
    license_link: str | None = None
    dtype: str | None = None  # None: the base model's dtype
    output: Path | None = None
    tokenizer_source: str | None = None  # a model spec from the recipe, or "base"
    device: str | None = None
    push: PushTarget | None = None
    eval: EvalSpec | None = None
    source_file: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The normalized recipe as it is run: defaults filled in, no local absolute paths."""
        out: dict[str, Any] = {"method": self.method}
        if self.base is not None:
            out["base"] = self.base.portable
        out["models"] = []
        for m in self.models:
            entry: dict[str, Any] = {
                "model": m.ref.portable,
                "role": m.role,
            }
            if m.hub_id:
                entry["hub_id"] = m.hub_id
            entry.update(m.params)
            out["models"].append(entry)
        out["parameters"] = dict(self.parameters)
        out["languages"] = list(self.languages)
        if self.license:
            out["license"] = self.license
        if self.license_name:
            out["license_name"] = self.license_name
        if self.license_link:
            out["license_link"] = self.license_link
        if self.dtype:
            out["dtype"] = self.dtype
        if self.tokenizer_source:
            out["tokenizer_source"] = self.tokenizer_source
        if self.output is not None:
            out["output"] = self.output.name
        if self.push is not None:
            out["push"] = {k: v for k, v in dataclasses.asdict(self.push).items() if v not in (None, False)}
        if self.eval is not None:
            ev = {"tasks": list(self.eval.tasks), "limit": self.eval.limit, "compare": self.eval.compare,
                  "backend": self.eval.backend}
            if self.eval.include_path is not None:
                ev["include_path"] = self.eval.include_path.name
            out["eval"] = {k: v for k, v in ev.items() if v not in (None, [], False)}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()

    def all_refs(self) -> list[ModelRef]:
        return ([self.base] if self.base else []) + [m.ref for m in self.models]

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


def _check_keys(data: dict, allowed: tuple[str, ...] | list[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})")


def _check_param(name: str, value: Any, param, where: str) -> Any:
    problem = param.check(value)
    if problem:
        raise RecipeError(f"{where}.{name}: {problem} (got {value!r})")
    return value


def parse_recipe(data: Any, base_dir: Path, source_file: Path | None = None) -> Recipe:
    """Validate a recipe mapping and return a Recipe. Raises RecipeError."""
    if not isinstance(data, dict):
        raise RecipeError("recipe: the top level must be a mapping of keys to values")
    _check_keys(data, TOP_LEVEL_KEYS, "recipe")

    method_name = data.get("method", "slack_ties")
    if method_name not in METHODS:
        raise RecipeError(f"method: unknown method {method_name!r} (allowed: {', '.join(sorted(METHODS))})")
    method = get_method(method_name)

    base = None
    if data.get("base") is not None:
        base = parse_model_ref(data["base"], base_dir, "base")
    elif method.needs_base:
        raise RecipeError(f"base: required by method {method_name!r} (name the model the others were trained from)")

    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise RecipeError("models: must be a non-empty list of {model: ..., role: language|task, ...}")
    allowed_model_keys = list(MODEL_KEYS_FIXED) + list(method.model_params)
    models: list[ModelEntry] = []
    for i, entry in enumerate(models_raw):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            raise RecipeError(f"{where}: must be a mapping with at least 'model'")
        for key in entry:
            if key not in allowed_model_keys:
                extra = ""
                if key in ("weight", "density", "slack"):
                    extra = f" for method {method_name!r}"
                raise RecipeError(
                    f"{where}: unknown key {key!r}{extra} (allowed: {', '.join(allowed_model_keys)})"
                )
        if "model" not in entry:
            raise RecipeError(f"{where}.model: required (a local folder or a Hub id)")
        ref = parse_model_ref(entry["model"], base_dir, f"{where}.model")
        role = entry.get("role", "task")
        if role not in ROLES:
            raise RecipeError(f"{where}.role: must be one of {', '.join(ROLES)} (got {role!r})")
        params = {}
        for name, param in method.model_params.items():
            params[name] = _check_param(name, entry.get(name, param.default), param, where)
        hub_id = entry.get("hub_id")
        if hub_id is not None and (not isinstance(hub_id, str) or not HUB_ID.match(hub_id)):
            raise RecipeError(f"{where}.hub_id: must be a Hub id 'org/name' (got {hub_id!r})")
        if any(m.ref.spec == ref.spec for m in models) or (base is not None and base.spec == ref.spec):
            raise RecipeError(f"{where}.model: {ref.spec!r} is named twice in the recipe (each model once)")
        models.append(ModelEntry(ref=ref, role=role, params=params, hub_id=hub_id))

    params_raw = data.get("parameters") or {}
    if not isinstance(params_raw, dict):
        raise RecipeError("parameters: must be a mapping like {lambda: 1.0, normalize: true}")
    _check_keys(params_raw, list(method.global_params) or ["(none)"], f"parameters (method {method_name!r})")
    parameters = {
        name: _check_param(name, params_raw.get(name, p.default), p, "parameters")
        for name, p in method.global_params.items()
    }
    problem = method.recipe_problem(len(models), base is not None, [m.params for m in models], parameters)
    if problem:
        raise RecipeError(problem)

    languages = data.get("languages") or []
    if isinstance(languages, str):
        languages = [languages]
    if not isinstance(languages, list) or not all(
        isinstance(c, str) and re.fullmatch(r"[a-z]{2,3}", c) for c in languages
    ):
        raise RecipeError(f"languages: must be a list of ISO 639 codes like [bo, ug] (got {languages!r})")

    unknown = [c for c in languages if not is_language_code(c)]
    if unknown:
        raise RecipeError(f"languages: unknown ISO 639 code {unknown[0]!r}; use ISO 639-1 or 639-3 codes like bo, ug, khk")

    license_ = data.get("license")
    if license_ is not None and license_ not in HUB_LICENSES:
        raise RecipeError(f"license: must be a Hub license id like apache-2.0 or llama2, or 'other' (got {license_!r})")
    license_name, license_link = data.get("license_name"), data.get("license_link")
    if license_ == "other":
        problems = check_metadata({"license": "other", "license_name": license_name, "license_link": license_link})
        if problems:
            raise RecipeError(problems[0])
    elif license_name is not None or license_link is not None:
        raise RecipeError("license_name/license_link: only used with license: other")

    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise RecipeError(f"dtype: must be one of {', '.join(DTYPES)} (got {dtype!r})")

    device = data.get("device")
    if device is not None and device not in DEVICES:
        raise RecipeError(f"device: must be one of {', '.join(DEVICES)} (got {device!r})")

    output = data.get("output")
    if output is not None:
        if not isinstance(output, str) or not output.strip():
            raise RecipeError("output: must be a folder path")
        out_path = Path(output).expanduser()
        output = (out_path if out_path.is_absolute() else base_dir / out_path).resolve()

    tokenizer_source = data.get("tokenizer_source")
    if tokenizer_source is not None:
        specs = ["base"] + [m.ref.spec for m in models]
        if tokenizer_source not in specs:
            raise RecipeError(
                f"tokenizer_source: must be 'base' or one of the models' names (got {tokenizer_source!r})"
            )

    return Recipe(
        push=_parse_push(data.get("push")),
        eval=_parse_eval(data.get("eval"), base_dir),
        method=method_name,
        base=base,
        models=models,
        parameters=parameters,
        languages=list(languages),
        license=license_,
        license_name=license_name,
        license_link=license_link,
        dtype=dtype,
        output=output,
        tokenizer_source=tokenizer_source,
        device=device,
        source_file=source_file,
        raw=data,
    )


def _parse_push(raw: Any) -> PushTarget | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"repo": raw}
    if not isinstance(raw, dict):
        raise RecipeError("push: must be a mapping like {repo: org/name, private: true}")
    _check_keys(raw, PUSH_KEYS, "push")
    repo = raw.get("repo")
    if not isinstance(repo, str) or not HUB_ID.match(repo):
        raise RecipeError(f"push.repo: must be a Hub id 'org/name' (got {repo!r})")
    for key in ("private", "create_pr"):
        if not isinstance(raw.get(key, False), bool):
            raise RecipeError(f"push.{key}: must be true or false")
    for key in ("revision", "tag"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not REVISION.match(value)):
            raise RecipeError(f"push.{key}: must be a branch or tag name (got {value!r})")
    return PushTarget(repo=repo, private=raw.get("private", False), create_pr=raw.get("create_pr", False),
                      revision=raw.get("revision"), tag=raw.get("tag"))


def _parse_eval(raw: Any, base_dir: Path) -> EvalSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RecipeError("eval: must be a mapping like {tasks: [belebele_bod_Tibt], limit: 100}")
    _check_keys(raw, EVAL_KEYS, "eval")
    tasks = raw.get("tasks") or []
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks):
        raise RecipeError(f"eval.tasks: must be a list of lm-eval task names (got {tasks!r})")
    limit = raw.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RecipeError(f"eval.limit: must be a positive whole number (got {limit!r})")
    include = raw.get("include_path")
    if include is not None:
        if not isinstance(include, str):
            raise RecipeError("eval.include_path: must be a folder of lm-eval task YAML files")
        include = Path(include).expanduser()
        include = (include if include.is_absolute() else base_dir / include).resolve()
    compare = raw.get("compare", False)
    if not isinstance(compare, bool):
        raise RecipeError("eval.compare: must be true or false")
    backend = raw.get("backend", "server")
    if backend not in ("server", "vllm", "hf"):
        raise RecipeError(f"eval.backend: must be one of server, vllm, hf (got {backend!r})")
    return EvalSpec(tasks=tuple(tasks), limit=limit, include_path=include, compare=compare, backend=backend)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file. Raises RecipeError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"recipe: cannot read {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe: {path.name} is not valid YAML{where}") from None
    return parse_recipe(data, path.resolve().parent, source_file=path.resolve())
