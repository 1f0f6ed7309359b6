"""The recipe: the YAML file that describes a merge and its release.

Everything is validated before any work starts. Every mistake, an unknown key included,
raises `RecipeError` with one line naming the field and what is allowed.

Models are named as local folders (absolute, or relative to the recipe file's folder) or
as Hub ids `org/name[@revision]`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..metadata import HUB_LICENSES, check_metadata, is_language_code, is_repo_id, is_revision
from ..errors import RecipeError, shown
from ..merge.methods import METHODS, get_method, normalize_problem
from ..merge.tensor_params import check_setting, evaluate, is_setting
from .yaml_file import read_recipe_yaml

ROLES = ("language", "task")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
SHA = re.compile(r"[0-9a-f]{40}")  # use with fullmatch
MAX_NAME_BYTES = 255  # longest file or folder name on Linux, macOS and Windows file systems
MAX_PATH_BYTES = 4096  # Linux's PATH_MAX
# An output's name leaves room for what lrmerge puts beside it: `.NAME.lrmerge-tmp-PID/`, a lock.
MAX_OUTPUT_NAME_BYTES = 200

TOP_LEVEL_KEYS = (
    "method",
    "base",
    "models",
    "parameters",
    "languages",
    "license",
    "dtype",
    "output",
    "tokenizer_source",
    "tokenizer",  # {source: MODEL or union}: mergekit's tokenizer source (embeddings aligned to its vocabulary)
    "device",
    "push",
    "eval",
    "license_name",
    "license_link",
    "layers",  # the models' layer count, checked when they are read (a mergekit slice's layer_range)
    "slices",  # runs of output layers, each from layer ranges of its sources (instead of models)
    "chat_template",
)
# mergekit 0.1.5's named chat templates; ours (chat_templates/NAME.jinja) render the same text
CHAT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
SLICE_KEYS = ("sources", "base", "parameters")
PUSH_KEYS = ("repo", "private", "create_pr", "revision", "tag")
EVAL_KEYS = ("tasks", "limit", "include_path", "compare", "backend", "parity_check")
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

    def seen_from(self, folder: Path, recipe_dir: Path | None) -> str:
        """The spec as it reads from `folder` (a merged output holding a copy of the recipe): a
        local folder the recipe names relatively becomes relative to `folder` when `folder`
        lies inside the recipe's folder, so the path names nothing the recipe did not; any
        other spec is `portable`."""
        if self.path is None or recipe_dir is None or self.spec.startswith("~") or Path(self.spec).is_absolute():
            return self.portable
        folder, recipe_dir = Path(os.path.abspath(folder)), Path(os.path.abspath(recipe_dir))
        if folder != recipe_dir and recipe_dir not in folder.parents:
            return self.portable
        relative = Path(os.path.relpath(os.path.normpath(recipe_dir / self.spec), folder)).as_posix()
        return relative if relative.startswith("..") else f"./{relative}"

    @property
    def identity(self) -> tuple[str, str]:
        """What the model is, however it is spelled: the resolved folder (`m/task`,
        `m/../m/task/` and a symlink to it are one), or the Hub id at its revision (main
        when none is given). Shas of branches are compared after pinning (hub.plan_recipe)."""
        if self.path is not None:
            return ("folder", str(self.path))
        return ("hub", f"{self.repo_id}@{self.revision or 'main'}")

    @property
    def display(self) -> str:
        """A name that never leaks a local absolute path."""
        if self.repo_id:
            return self.repo_id
        return self.path.name if self.path else self.spec


def local_path(value: Any, base_dir: Path, field_name: str) -> Path:
    """A path from the recipe (absolute, `~`, or relative to the recipe's folder), made
    absolute; refuses what no file system can hold (a NUL, a control character, a name
    over 255 bytes) with a one-line RecipeError."""
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{field_name}: must be a path (got {shown(value)})")
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise RecipeError(f"{field_name}: {shown(value)} holds a control character (a NUL or a newline?)")
    try:
        path = Path(value.strip()).expanduser()
        too_long = [part for part in path.parts if len(os.fsencode(part)) > MAX_NAME_BYTES]
    except (RuntimeError, UnicodeError):  # `~user` of no user; a name the file system cannot encode
        raise RecipeError(f"{field_name}: {shown(value)} is not a usable path") from None
    if too_long:
        raise RecipeError(
            f"{field_name}: the name {shown(too_long[0])} is over {MAX_NAME_BYTES} bytes, "
            "longer than a file system allows"
        )
    if len(os.fsencode(str(path))) >= MAX_PATH_BYTES:
        raise RecipeError(f"{field_name}: the path is over {MAX_PATH_BYTES} bytes, longer than a file system allows")
    return path if path.is_absolute() else base_dir / path


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def parse_model_ref(spec: Any, base_dir: Path, field_name: str) -> ModelRef:
    """Parse `org/name[@rev]` or a local folder path into a ModelRef."""
    if not isinstance(spec, str) or not spec.strip():
        raise RecipeError(f"{field_name}: must be a local folder or a Hub id 'org/name[@revision]'")
    spec = spec.strip()
    local = local_path(spec, base_dir, field_name)
    if spec.startswith((".", "/", "~")) or _is_dir(local):
        return ModelRef(spec=spec, path=local.resolve())
    repo_id, _, revision = spec.partition("@")
    if not is_repo_id(repo_id) or (revision and not is_revision(revision)) or spec.endswith("@"):
        raise RecipeError(
            f"{field_name}: {shown(spec)} is neither an existing folder nor a Hub id 'org/name[@revision]'"
        )
    return ModelRef(spec=spec, repo_id=repo_id, revision=revision or None)


def output_folder(value: Any, base_dir: Path, field_name: str = "output") -> Path:
    """The output folder a recipe (or --out) names, checked before any work: a usable
    path that is not a file and does not lie under one."""
    path = local_path(value, base_dir, field_name).resolve()
    if not path.name:  # `/`: nothing to name the temporary folder beside it after, nowhere to put it
        raise RecipeError(
            f"{field_name}: {shown(value)} is the file system's root; name a folder for the merged model, e.g. ./merged"
        )
    # replacing the output would remove the recipe (or the shell's current folder) with it
    recipe_dir = [(base_dir.resolve(), "the recipe's own folder")] if field_name == "output" else []
    for folder, what in recipe_dir + [(Path.cwd().resolve(), "the current folder")]:
        if path == folder or path in folder.parents:
            holds = "is" if path == folder else "holds"
            raise RecipeError(
                f"{field_name}: {shown(value)} {holds} {what}; name a new folder for the merged model, e.g. ./merged"
            )
    if len(os.fsencode(path.name)) > MAX_OUTPUT_NAME_BYTES:
        raise RecipeError(
            f"{field_name}: the folder name is over {MAX_OUTPUT_NAME_BYTES} bytes (lrmerge writes "
            "into a temporary folder named after it, which must fit in 255); choose a shorter name"
        )
    # os.path's checks answer False, never raise, for a path they cannot stat
    if os.path.lexists(path) and not os.path.isdir(path):
        raise RecipeError(f"{field_name}: {path.name} is a file (or a broken link); name a folder")
    existing = next(parent for parent in path.parents if os.path.lexists(parent))
    if not os.path.isdir(existing):
        raise RecipeError(f"{field_name}: {existing.name} is a file, so {path.name} cannot be made under it")
    return path


@dataclass
class ModelEntry:
    ref: ModelRef
    role: str
    params: dict[str, Any]  # method's per-model parameters, defaults filled in
    hub_id: str | None = None  # Hub id to list a local folder by in the card
    # parameters given as a gradient or a filter list (merge.tensor_params), as written;
    # `params` then holds their value outside the layers, for display and checks
    settings: dict[str, Any] = field(default_factory=dict)


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
    parity_check: bool = True  # served models checked against transformers before any score


@dataclass
class Slice:
    """A run of output layers (mergekit's slice): layer `start + i` of each source gives output
    layer `offset + i`, merged by the recipe's method with the slice's base and parameters."""

    part: "Recipe"  # the slice's base, models and parameters, read as a recipe of its own
    ranges: list[tuple[int, int]]  # [start, end) of each input in the method's order: the base first

    @property
    def length(self) -> int:
        return self.ranges[0][1] - self.ranges[0][0]


@dataclass(frozen=True)
class TokenRow:
    """One entry of `tokenizer.tokens` (mergekit's TokenEmbeddingConfig): where the output's
    rows for a token come from. `model` (a model's spec, or "base") alone: that model's row of
    the token; with `token` or `token_id`: that model's row of another token (mergekit's
    `kind: model_token`); `zero`: zeros; none of them: the default rule, which must not need
    a source. `force`: every input takes this row, also one that has the token."""

    model: str | None = None
    token: str | None = None
    token_id: int | None = None
    zero: bool = False
    force: bool = False

    def to_dict(self, model_name: Any = None) -> dict[str, Any]:
        """The entry as both formats write it (`model_name` maps `model` to its written name)."""
        name = model_name(self.model) if model_name is not None and self.model is not None else self.model
        source: Any = None
        if self.zero:
            source = {"kind": "zero"}
        elif self.token is not None or self.token_id is not None:
            pick = {"token": self.token} if self.token is not None else {"token_id": self.token_id}
            source = {"kind": "model_token", "model": name, **pick}
        elif name is not None:
            source = name
        out: dict[str, Any] = {} if source is None else {"source": source}
        if self.force:
            out["force"] = True
        return out


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
    # mergekit's tokenizer source: a model spec whose tokenizer the output takes, every input's
    # vocabulary tensors aligned to its vocabulary before the merge (merge.vocabulary)
    tokenizer: str | None = None
    pad_to_multiple_of: int | None = None  # with `tokenizer`: its rows padded up to a multiple of this
    # with `tokenizer`: token -> where its rows come from; a token the tokenizer lacks is added to it
    tokens: dict[str, TokenRow] = field(default_factory=dict)
    # the output's chat template: "auto" (the one most models have), a name from CHAT_TEMPLATE_NAMES
    # or Jinja text (None: the task model's)
    chat_template: str | None = None
    device: str | None = None
    push: PushTarget | None = None
    eval: EvalSpec | None = None
    source_file: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # global parameters given as settings
    layers: int | None = None  # every model must have this many layers (None: any)
    from_mergekit_config: bool = False  # read from a mergekit config (which has no roles)
    # a frankenmerge: the output's layers slice by slice (models then lists every source once)
    slices: list[Slice] | None = None

    def to_dict(self, seen_from: Path | None = None, as_written: bool = False) -> dict[str, Any]:
        """The normalized recipe as it is run: defaults filled in, no local absolute paths.
        With `seen_from` (the output folder it is written into) local models the recipe names
        relatively are named relative to that folder (ModelRef.seen_from), so that
        `lrmerge merge recipe.yaml` there reads the same models; with `as_written`, models
        are named exactly as the recipe names them."""
        recipe_dir = self.source_file.parent if self.source_file else None

        def spec(ref: ModelRef) -> str:
            if as_written:
                return ref.spec
            return ref.portable if seen_from is None else ref.seen_from(seen_from, recipe_dir)

        out: dict[str, Any] = {"method": self.method}
        if self.base is not None:
            out["base"] = spec(self.base)
        if self.slices is not None:
            out["slices"] = [_slice_dict(sl, spec) for sl in self.slices]
        else:
            out["models"] = [_model_dict(m, spec) for m in self.models]
        out["parameters"] = {**self.parameters, **self.settings}
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
            named = next((m.ref for m in self.models if m.ref.spec == self.tokenizer_source), None)
            out["tokenizer_source"] = self.tokenizer_source if named is None or seen_from is None else spec(named)
        if self.tokenizer:
            named = next((m.ref for m in self.models if m.ref.spec == self.tokenizer), None)
            out["tokenizer"] = {"source": spec(named) if named is not None else self.tokenizer}
            if self.pad_to_multiple_of:
                out["tokenizer"]["pad_to_multiple_of"] = self.pad_to_multiple_of
            if self.tokens:

                def model_name(key: str) -> str:
                    ref = next((m.ref for m in self.models if m.ref.spec == key), None)
                    return key if ref is None else spec(ref)

                out["tokenizer"]["tokens"] = {t: row.to_dict(model_name) for t, row in self.tokens.items()}
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        if self.layers is not None:
            out["layers"] = self.layers
        if self.output is not None:
            out["output"] = self.output.name
        if self.push is not None:
            out["push"] = {k: v for k, v in dataclasses.asdict(self.push).items() if v not in (None, False)}
        if self.eval is not None:
            ev = {
                "tasks": list(self.eval.tasks),
                "limit": self.eval.limit,
                "compare": self.eval.compare,
                "backend": self.eval.backend,
            }
            if self.eval.include_path is not None:
                ev["include_path"] = self.eval.include_path.name
            out["eval"] = {k: v for k, v in ev.items() if v not in (None, [], False)}
            if not self.eval.parity_check:
                out["eval"]["parity_check"] = False
        return out

    def to_yaml(self, seen_from: Path | None = None) -> str:
        return yaml.safe_dump(self.to_dict(seen_from), sort_keys=False, allow_unicode=True)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()

    def all_refs(self) -> list[ModelRef]:
        return ([self.base] if self.base else []) + [m.ref for m in self.models]

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


def _model_dict(m: ModelEntry, spec: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": spec(m.ref), "role": m.role}
    if m.hub_id:
        entry["hub_id"] = m.hub_id
    return {**entry, **m.params, **m.settings}


def _slice_dict(sl: Slice, spec: Any) -> dict[str, Any]:
    part = sl.part
    inputs = ([{"model": spec(part.base)}] if part.base is not None else []) + [
        _model_dict(m, spec) for m in part.models
    ]
    out: dict[str, Any] = {"sources": [{**e, "layers": list(r)} for e, r in zip(inputs, sl.ranges, strict=True)]}
    if part.base is not None:
        out["base"] = spec(part.base)
    out["parameters"] = copy.deepcopy({**part.parameters, **part.settings})  # no YAML anchors to the top level's
    return out


def unknown_key(key: Any, allowed: tuple[str, ...] | list[str], extra: str = "") -> str:
    """`unknown key 'densty' (did you mean 'density'?)`, or the allowed keys when none is close."""
    close = difflib.get_close_matches(key, list(allowed), n=1) if isinstance(key, str) else []
    hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
    return f"unknown key {shown(key)}{extra} ({hint})"


def _check_keys(data: dict, allowed: tuple[str, ...] | list[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{where}: {unknown_key(key, allowed)}")


def _check_param(name: str, value: Any, param, where: str) -> Any:
    try:
        problem = param.check(value)
    except (OverflowError, TypeError, ValueError):  # e.g. an integer too large for a float
        problem = "must be a finite number within float range"
    if problem:
        raise RecipeError(f"{where}.{name}: {problem} (got {shown(value)})")
    return value


def _param_value(name: str, value: Any, param, where: str, settings: dict[str, Any]) -> Any:
    """A parameter's checked value; a gradient or filter list (merge.tensor_params) is
    checked leaf by leaf and kept in `settings`, and its value outside the layers returned."""
    if not is_setting(value):
        return _check_param(name, value, param, where)
    integer = isinstance(param.default, int) and not isinstance(param.default, bool)
    try:
        problem = check_setting(value, param.check, integer)
    except (OverflowError, TypeError, ValueError):
        problem = "must hold finite numbers within float range"
    if problem:
        raise RecipeError(f"{where}.{name}: {problem}")
    settings[name] = value
    outside = evaluate(value, "", 0.0)
    return param.default if outside is None else outside


def check_normalize(method: str, models: list[ModelEntry], parameters: dict[str, Any], where: str = "") -> None:
    """Refuse weights whose sum the method would divide by when it is near 0."""
    problem = normalize_problem(
        method, [m.params["weight"] for m in models if "weight" in m.params], bool(parameters.get("normalize"))
    )
    if problem:
        raise RecipeError(where + problem)


def parse_recipe(data: Any, base_dir: Path, source_file: Path | None = None) -> Recipe:
    """Validate a recipe mapping (ours, or a mergekit 0.1.5 config: one with `merge_method`)
    and return a Recipe. Raises RecipeError."""
    from_mergekit_config = isinstance(data, dict) and "merge_method" in data
    if from_mergekit_config:
        from .mergekit import from_mergekit

        data = from_mergekit(data)
    if not isinstance(data, dict):
        raise RecipeError("recipe: the top level must be a mapping of keys to values")
    _check_keys(data, TOP_LEVEL_KEYS, "recipe")

    method_name = data.get("method", "slack_ties")
    if not isinstance(method_name, str) or method_name not in METHODS:
        raise RecipeError(f"method: unknown method {shown(method_name)} (allowed: {', '.join(sorted(METHODS))})")
    method = get_method(method_name)

    base = None
    if data.get("base") is not None:
        base = parse_model_ref(data["base"], base_dir, "base")
    elif method.needs_base and data.get("slices") is None:
        raise RecipeError(f"base: required by method {method_name!r} (name the model the others were trained from)")

    slices = None
    if data.get("slices") is not None:
        slices = _parse_slices(data, method, base_dir, source_file)
    models_raw = data.get("models") if slices is None else []
    if not isinstance(models_raw, list) or (slices is None and not models_raw):
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
                raise RecipeError(f"{where}: {unknown_key(key, allowed_model_keys, extra)}")
        if "model" not in entry:
            raise RecipeError(f"{where}.model: required (a local folder or a Hub id)")
        ref = parse_model_ref(entry["model"], base_dir, f"{where}.model")
        role = entry.get("role", "task")
        if role not in ROLES:
            raise RecipeError(f"{where}.role: must be one of {', '.join(ROLES)} (got {shown(role)})")
        params: dict[str, Any] = {}
        settings: dict[str, Any] = {}
        for name, param in method.model_params.items():
            params[name] = _param_value(name, entry.get(name, param.default), param, where, settings)
        hub_id = entry.get("hub_id")
        if hub_id is not None and not is_repo_id(hub_id):
            raise RecipeError(f"{where}.hub_id: must be a Hub id 'org/name' (got {shown(hub_id)})")
        twin = next((r for r in ([base] if base else []) + [m.ref for m in models] if r.identity == ref.identity), None)
        if twin is not None:
            same = "" if twin.spec == ref.spec else f" (as {shown(twin.spec)})"
            raise RecipeError(
                f"{where}.model: {shown(ref.spec)} is named twice in the recipe{same}; name each model once"
            )
        models.append(ModelEntry(ref=ref, role=role, params=params, hub_id=hub_id, settings=settings))
    if slices is not None:
        models = _slice_models(slices, base)

    params_raw = data.get("parameters") or {}
    if not isinstance(params_raw, dict):
        raise RecipeError("parameters: must be a mapping like {lambda: 1.0, normalize: true}")
    _check_keys(params_raw, list(method.global_params) or ["(none)"], f"parameters (method {method_name!r})")
    global_settings: dict[str, Any] = {}
    parameters = {
        name: _param_value(name, params_raw.get(name, p.default), p, "parameters", global_settings)
        for name, p in method.global_params.items()
    }
    problem = None
    if slices is None:  # a slice's models are checked with the slice
        check_normalize(method_name, models, parameters)
        problem = method.recipe_problem(len(models), base is not None, [m.params for m in models], parameters)
    if problem:
        raise RecipeError(problem)
    if method.roles is not None:
        problem = method.roles([m.role for m in models])
        if problem:
            raise RecipeError(problem)

    languages = data.get("languages") or []
    if isinstance(languages, str):
        languages = [languages]
    if not isinstance(languages, list) or not all(
        isinstance(c, str) and re.fullmatch(r"[a-z]{2,3}", c) for c in languages
    ):
        raise RecipeError(f"languages: must be a list of ISO 639 codes like [bo, ug] (got {shown(languages)})")
    check_language_codes(languages, "languages")

    license_ = data.get("license")
    if license_ is not None and (not isinstance(license_, str) or license_ not in HUB_LICENSES):
        raise RecipeError(
            f"license: must be a Hub license id like apache-2.0 or llama2, or 'other' (got {shown(license_)})"
        )
    license_name, license_link = data.get("license_name"), data.get("license_link")
    if license_ == "other":
        problems = check_metadata({"license": "other", "license_name": license_name, "license_link": license_link})
        if problems:
            raise RecipeError(problems[0])
    elif license_name is not None or license_link is not None:
        raise RecipeError("license_name/license_link: only used with license: other")

    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise RecipeError(f"dtype: must be one of {', '.join(DTYPES)} (got {shown(dtype)})")

    device = data.get("device")
    if device is not None and device not in DEVICES:
        raise RecipeError(f"device: must be one of {', '.join(DEVICES)} (got {shown(device)})")

    output = data.get("output")
    if output is not None:
        output = output_folder(output, base_dir)

    tokenizer_source = data.get("tokenizer_source")
    if tokenizer_source is not None:
        specs = ["base"] + [m.ref.spec for m in models]
        if tokenizer_source not in specs:
            raise RecipeError(
                f"tokenizer_source: must be 'base' or one of the models' names (got {shown(tokenizer_source)})"
            )

    if data.get("tokenizer") is not None and slices is not None:
        raise RecipeError("tokenizer: a tokenizer source with slices is not supported yet")
    if data.get("tokenizer") is not None and tokenizer_source is not None:
        raise RecipeError("tokenizer: give either tokenizer or tokenizer_source, not both")
    tokenizer, pad_to_multiple_of, tokens = _parse_tokenizer(data.get("tokenizer"), models, base)

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
        tokenizer=tokenizer,
        pad_to_multiple_of=pad_to_multiple_of,
        tokens=tokens,
        chat_template=_parse_chat_template(data.get("chat_template")),
        device=device,
        source_file=source_file,
        raw=data,
        from_mergekit_config=from_mergekit_config,
        settings=global_settings,
        layers=_parse_layers(data.get("layers")),
        slices=slices,
    )


def _parse_tokenizer(
    value: Any, models: list[ModelEntry], base: ModelRef | None
) -> tuple[str | None, int | None, dict[str, TokenRow]]:
    """`tokenizer: {source: MODEL, union or base, pad_to_multiple_of: N, tokens: {...}}`: the
    spec of the model whose tokenizer the output takes ("union", or "base"), N (None: no
    padding) and the rows of the tokens named (mergekit's `tokenizer.tokens`)."""
    if value is None:
        return None, None, {}
    if not isinstance(value, dict) or "source" not in value or set(value) - {"source", "pad_to_multiple_of", "tokens"}:
        raise RecipeError(
            f"tokenizer: must be a mapping like {{source: MODEL, pad_to_multiple_of: 64}} (got {shown(value)})"
        )
    pad = value.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise RecipeError(f"tokenizer.pad_to_multiple_of: must be a positive whole number (got {shown(pad)})")
    specs = [m.ref.spec for m in models]
    source = value["source"]
    if source in ("union", "base") and base is None:  # mergekit starts the union from its base (else hash order)
        raise RecipeError(f"tokenizer.source: {source} needs a base")
    if base is not None and source == base.spec:
        source = "base"
    if source not in ("union", "base") and source not in specs:
        raise RecipeError(f"tokenizer.source: must be union, base or one of the models' names (got {shown(source)})")
    tokens = _parse_tokens(value.get("tokens"), specs, base)
    if source == "base" and not pad and not tokens:
        raise RecipeError("tokenizer: {source: base} alone is written tokenizer_source: base")
    return str(source), pad, tokens


def _parse_tokens(value: Any, specs: list[str], base: ModelRef | None) -> dict[str, TokenRow]:
    """mergekit's `tokenizer.tokens`: token -> {source: MODEL | {kind: model_token, model:
    MODEL, token: T | token_id: N} | {kind: zero}, force: bool}."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(t, str) and t for t in value):
        raise RecipeError(f"tokenizer.tokens: must map tokens to {{source: MODEL, force: false}} (got {shown(value)})")
    rows = {}
    for token, entry in value.items():
        where = f"tokenizer.tokens.{shown(token)}"
        entry = {} if entry is None else entry
        if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise RecipeError(f"{where}: must be a mapping with source and force (got {shown(entry)})")
        force = entry.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{where}.force: must be true or false (got {shown(force)})")

        def model_of(name: Any, where: str = where) -> str:
            if base is not None and name in ("base", base.spec):
                return "base"
            if name not in specs:
                raise RecipeError(f"{where}.source: {shown(name)} must be base or one of the models' names")
            return str(name)

        source = entry.get("source")
        if source is None:
            rows[token] = TokenRow(force=force)
        elif isinstance(source, dict) and source.get("kind") == "zero" and set(source) == {"kind"}:
            rows[token] = TokenRow(zero=True, force=force)
        elif isinstance(source, dict) and source.get("kind") == "model_token":
            if set(source) - {"kind", "model", "token", "token_id"} or ("token" in source) == ("token_id" in source):
                raise RecipeError(
                    f"{where}.source: kind model_token takes model and one of token or token_id (got {shown(source)})"
                )
            token_id = source.get("token_id")
            if "token_id" in source and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
                raise RecipeError(f"{where}.source.token_id: must be a whole number >= 0 (got {shown(token_id)})")
            other = source.get("token")
            if "token" in source and not (isinstance(other, str) and other):
                raise RecipeError(f"{where}.source.token: must be a token (got {shown(other)})")
            rows[token] = TokenRow(model_of(source.get("model")), other, token_id, force=force)
        elif isinstance(source, str):
            rows[token] = TokenRow(model_of(source), force=force)
        else:
            raise RecipeError(
                f"{where}.source: must be a model, {{kind: model_token, model: M, token: T}} or {{kind: zero}} "
                f"(got {shown(source)})"
            )
    return rows


def _parse_slices(data: dict[str, Any], method: Any, base_dir: Path, source_file: Path | None) -> list[Slice]:
    """The recipe's `slices`: each a list of sources (`model`, `layers: [start, end)` and the
    method's per-model parameters), an optional `base` (else the recipe's) and `parameters`
    over the recipe's. Each slice is read as a recipe of its own, so it is checked as one."""
    if data.get("models") is not None:
        raise RecipeError("slices: give either models or slices, not both")
    if data.get("layers") is not None:
        raise RecipeError("layers: give either layers or slices (each slice names its layers)")
    if method.per_tensor is not None:
        raise RecipeError(f"slices: method {method.name} sets each layer by its own schedule; give it models")
    raw = data["slices"]
    if not isinstance(raw, list) or not raw:
        raise RecipeError("slices: must be a non-empty list of {sources: [{model: ..., layers: [start, end]}, ...]}")
    top: dict[str, Any] = data["parameters"] if isinstance(data.get("parameters"), dict) else {}
    # mergekit's linear averages the base in as one more input; passthrough takes no base
    base_is_input = not method.takes_base or method.name == "linear"
    out = []
    for i, sl in enumerate(raw):
        where = f"slices[{i}]"
        if not isinstance(sl, dict):
            raise RecipeError(f"{where}: must be a mapping like {{sources: [...], parameters: {{...}}}}")
        _check_keys(sl, SLICE_KEYS, where)
        sources = sl.get("sources")
        if not isinstance(sources, list) or not sources:
            raise RecipeError(f"{where}.sources: must be a non-empty list of {{model: ..., layers: [start, end]}}")
        own = sl.get("parameters") or {}
        if not isinstance(own, dict):
            raise RecipeError(f"{where}.parameters: must be a mapping of parameter names to values")
        base_spec = None if base_is_input else sl.get("base", data.get("base"))
        base_ref = parse_model_ref(base_spec, base_dir, f"{where}.base") if base_spec is not None else None
        models, ranges, base_range = [], [], None
        for j, src in enumerate(sources):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src:
                raise RecipeError(f"{at}: must be a mapping with model and layers")
            lr = src.get("layers")
            if not (
                isinstance(lr, list)
                and len(lr) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                and 0 <= lr[0] < lr[1]
            ):
                raise RecipeError(f"{at}.layers: must be [start, end] with 0 <= start < end (got {shown(lr)})")
            entry = {k: v for k, v in src.items() if k != "layers"}
            if base_ref is not None and parse_model_ref(src["model"], base_dir, f"{at}.model").identity == (
                base_ref.identity
            ):
                if set(entry) != {"model"}:
                    raise RecipeError(f"{at}: the slice's base takes no parameters (got {', '.join(entry)})")
                base_range = (lr[0], lr[1])
            else:
                models.append(entry)
                ranges.append((lr[0], lr[1]))
        if base_range is None and method.needs_base:
            named = f"the base {shown(base_spec)}" if base_spec is not None else "a base (none is named)"
            raise RecipeError(f"{where}.sources: method {method.name} needs {named} among the slice's sources")
        ranges = ([base_range] if base_range else []) + ranges
        if len({end - start for start, end in ranges}) > 1:
            raise RecipeError(
                f"{where}.sources: layer ranges of different lengths; every source of a slice takes as many layers"
            )
        part = {"method": method.name, "models": models, "parameters": {**top, **own}}
        if base_range is not None:
            part["base"] = base_spec
        try:
            out.append(Slice(parse_recipe(part, base_dir, source_file), ranges))
        except RecipeError as e:
            raise RecipeError(f"{where}: {e}") from None
    if len(out[-1].ranges) > len(out[0].ranges):
        # mergekit pairs the last slice's sources with the first slice's count of tensors
        raise RecipeError(
            f"slices: the last slice has {len(out[-1].ranges)} sources and the first {len(out[0].ranges)}; "
            "mergekit then merges the final norm and head of only some of them (give both as many)"
        )
    return out


def _slice_models(slices: list[Slice], base: ModelRef | None) -> list[ModelEntry]:
    """Every model the slices read, once, in the order they first appear (the recipe's base aside)."""
    seen = {base.identity} if base is not None else set()
    models = []
    for sl in slices:
        for m in ([ModelEntry(ref=sl.part.base, role="task", params={})] if sl.part.base else []) + sl.part.models:
            if m.ref.identity not in seen:
                seen.add(m.ref.identity)
                models.append(m)
    return models


def check_language_codes(codes: list[str], where: str) -> None:
    """Refuse anything but an ISO 639-1/3 code (two or three lower-case letters that name a language)."""
    for code in codes:
        if not (isinstance(code, str) and re.fullmatch(r"[a-z]{2,3}", code) and is_language_code(code)):
            raise RecipeError(
                f"{where}: unknown ISO 639 code {shown(code)}; use ISO 639-1 or 639-3 codes like bo, ug, khk"
            )


def default_role_note(recipe: Recipe) -> str | None:
    """A one-line note naming the models the recipe gives no `role` (they are taken as task
    models), or None. The role enters no merge arithmetic (the slack does); it picks the
    output's chat template and generation config, what a sweep's `slack` sets, the card's
    labels and the evaluation's names."""
    raw = recipe.raw.get("models") if isinstance(recipe.raw, dict) else None
    if recipe.from_mergekit_config or not isinstance(raw, list):  # mergekit has no roles to add
        return None
    unnamed = [
        m.ref.spec
        for m, entry in zip(recipe.models, raw, strict=True)
        if not (isinstance(entry, dict) and "role" in entry)
    ]
    if not unnamed:
        return None
    return (
        f"note: no role given for {', '.join(unnamed)}: taken as task (it picks the chat template and generation "
        "config, what a sweep's slack sets and the card's labels); add role: language|task"
    )


def _parse_chat_template(value: Any) -> str | None:
    """mergekit's values: "auto", a template's name, or a Jinja template (at least 20
    characters, with a `{`). A name is kept as it is (written out, it is the template's text)."""
    if value is None or value == "auto" or value in CHAT_TEMPLATE_NAMES:
        return value
    if not isinstance(value, str) or len(value) < 20 or "{" not in value:
        raise RecipeError(
            f"chat_template: must be auto, one of {', '.join(CHAT_TEMPLATE_NAMES)} or a Jinja chat template "
            f"(got {shown(value)})"
        )
    return value


def named_chat_template(name: str) -> str:
    """The Jinja text of the chat template called `name` (one of CHAT_TEMPLATE_NAMES)."""
    return (Path(__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def _parse_layers(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise RecipeError(f"layers: must be a positive whole number, the models' layer count (got {shown(value)})")
    return value


def _parse_push(raw: Any) -> PushTarget | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"repo": raw}
    if not isinstance(raw, dict):
        raise RecipeError("push: must be a mapping like {repo: org/name, private: true}")
    _check_keys(raw, PUSH_KEYS, "push")
    repo = raw.get("repo")
    if not is_repo_id(repo):
        raise RecipeError(f"push.repo: must be a Hub id 'org/name' (got {shown(repo)})")
    for key in ("private", "create_pr"):
        if not isinstance(raw.get(key, False), bool):
            raise RecipeError(f"push.{key}: must be true or false")
    for key in ("revision", "tag"):
        value = raw.get(key)
        if value is not None and not is_revision(value):
            raise RecipeError(f"push.{key}: must be a branch or tag name (got {shown(value)})")
    return PushTarget(
        repo=repo,
        private=raw.get("private", False),
        create_pr=raw.get("create_pr", False),
        revision=raw.get("revision"),
        tag=raw.get("tag"),
    )


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
        raise RecipeError(f"eval.tasks: must be a list of lm-eval task names (got {shown(tasks)})")
    limit = raw.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RecipeError(f"eval.limit: must be a positive whole number (got {shown(limit)})")
    include = raw.get("include_path")
    if include is not None:
        if not isinstance(include, str):
            raise RecipeError("eval.include_path: must be a folder of lm-eval task YAML files")
        include = local_path(include, base_dir, "eval.include_path").resolve()
    compare = raw.get("compare", False)
    if not isinstance(compare, bool):
        raise RecipeError("eval.compare: must be true or false")
    backend = raw.get("backend", "server")
    if backend not in ("server", "vllm", "hf"):
        raise RecipeError(f"eval.backend: must be one of server, vllm, hf (got {shown(backend)})")
    parity_check = raw.get("parity_check", True)
    if not isinstance(parity_check, bool):
        raise RecipeError(
            "eval.parity_check: must be true or false (false: scores from a served model "
            "are recorded without checking it against transformers)"
        )
    return EvalSpec(
        tasks=tuple(tasks),
        limit=limit,
        include_path=include,
        compare=compare,
        backend=backend,
        parity_check=parity_check,
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file (ours or a mergekit config), a model card
    (README.md) holding a mergekit config, or the card of a Hub model `org/name[@rev]` when
    no such file exists. Raises RecipeError."""
    path = Path(path)
    hub_card = (
        path.suffix.lower() not in (".yaml", ".yml")
        and not os.path.lexists(path)
        and is_repo_id(str(path).partition("@")[0])
    )
    if path.suffix.lower() == ".md" or hub_card:
        from .mergekit import card_from_hub, config_from_card

        if path.suffix.lower() == ".md":
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except (OSError, ValueError) as e:
                raise RecipeError(
                    f"recipe: cannot read {shown(str(path))}: {getattr(e, 'strerror', None) or e}"
                ) from None
            return parse_recipe(config_from_card(text, path.name), path.resolve().parent, source_file=path.resolve())
        return parse_recipe(config_from_card(card_from_hub(str(path)), f"the card of {path}"), Path.cwd())
    try:
        raw = path.read_bytes()
    except (OSError, ValueError) as e:
        raise RecipeError(f"recipe: cannot read {shown(str(path))}: {getattr(e, 'strerror', None) or e}") from None
    data = read_recipe_yaml(raw, path.name)
    return parse_recipe(data, path.resolve().parent, source_file=path.resolve())
