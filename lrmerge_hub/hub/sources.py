"""Models on the Hugging Face Hub, read: pin, check before downloading, download or stream.

Everything goes through the official `huggingface_hub` client, so `HF_ENDPOINT`, `HF_HOME`,
`HF_HUB_CACHE`, `HF_HUB_OFFLINE` and the token places (`HF_OIDC_RESOURCE` in CI, `HF_TOKEN`,
the token file) work as they do for `hf`. Tokens are passed to the client and never printed,
logged or written by this module.

Every Hub id (`org/name`, `org/name@branch-or-tag`, `org/name@<sha>`) is pinned to its
commit sha first; the merge is planned (`merge.plan.plan_merge`, the engine's own check) from
the safetensors headers and config.json alone, before any weights are downloaded; then only
the files a merge needs are downloaded into the HF cache, or read by ranges (hub.stream).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import (
    HfApi,
    hf_hub_download,
    is_offline_mode,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    NotASafetensorsRepoError,
    SafetensorsParsingError,
)

from .errors import hub_errors
from ..errors import HubError, HubOfflineError, InputModelError, PickleOnlyRepoError, RecipeError, shown
from ..interrupt import at_once
from ..merge.plan import BASE, MergePlan, model_keys, plan_merge
from ..merge.st_header import DTYPE_SIZES, TensorSpec
from ..merge.st_io import Source, check_config
from ..merge.st_io import PICKLE_SUFFIXES, SafetensorsModel, index_shards
from ..recipe.spec import SHA, ModelEntry, ModelRef, Recipe, load_recipe, parse_model_ref
from ..settings import DEFAULT_READ_AHEAD, RANGE_REQUEST_BYTES, RANGE_WORKERS

SAFETENSORS_INDEX = "model.safetensors.index.json"
EVAL_RESULTS_DIR = ".eval_results"  # the Hub's newer evaluation results format, written by the card
# Besides the weights, what a merge (and the merged model) needs from a source repo.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    SAFETENSORS_INDEX,
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class ModelMeta:
    """What is known about one source model before its weights are downloaded."""

    spec: str  # as written
    name: str  # display name: the repo id, or the local folder's name (never a path)
    repo_id: str | None = None
    revision: str | None = None  # as requested (branch, tag, sha; None: main)
    sha: str | None = None  # the pinned commit
    path: Path | None = None  # local folder, or the snapshot folder once downloaded
    files: dict[str, int] = field(default_factory=dict)  # files to download -> bytes
    tensors: dict[str, TensorSpec] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def download_bytes(self) -> int:
        return sum(self.files.values())

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.spec if self.repo_id else self.name,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "sha": self.sha,
            "files": len(self.files),
            "download_bytes": self.download_bytes,
            "tensors": len(self.tensors),
            "parameters": sum(t.numel for t in self.tensors.values()),
            "dtypes": sorted({t.dtype for t in self.tensors.values()}),
        }


@dataclass
class PullPlan:
    """The pinned models (by the merge engine's keys: 'base' and the models' specs), the
    merge plan checked from their headers, and where the files are once downloaded."""

    models: dict[str, ModelMeta]
    merge_plan: MergePlan
    downloaded: bool = False

    @property
    def download_bytes(self) -> int:
        return sum(m.download_bytes for m in self.models.values())

    def to_dict(self) -> dict[str, Any]:
        models = []
        for m in self.models.values():
            entry = m.summary()
            if self.downloaded and m.repo_id:
                entry["path"] = str(m.path)
            models.append(entry)
        return {
            "compatible": True,
            "models": models,
            **self.merge_plan.summary(),
            "download_bytes": self.download_bytes,
            "downloaded": self.downloaded,
        }


# --- reading models -----------------------------------------------------------------------
def local_meta(ref: ModelRef, folder: Path | None = None) -> ModelMeta:
    """Tensor specs and config of a local folder (or a cached snapshot), from the headers."""
    path = folder or ref.path
    assert path is not None  # a local ref, or a Hub model's snapshot folder
    model = SafetensorsModel(path, label=ref.display)
    return ModelMeta(
        spec=ref.spec,
        name=ref.display,
        repo_id=ref.repo_id,
        revision=ref.revision,
        path=model.folder,
        tensors=model.specs,
        config=model.config,
    )


def _cached_snapshot(ref: ModelRef) -> Path:
    """Offline: the cached snapshot of a Hub model, found through the HF cache layout
    (`models--org--name/refs/<branch or tag>` holds the sha, `snapshots/<sha>/` the files)."""
    assert ref.repo_id
    storage = Path(hf_constants.HF_HUB_CACHE) / f"models--{ref.repo_id.replace('/', '--')}"
    revision = ref.revision or "main"
    ref_file = storage / "refs" / revision
    sha = revision if SHA.fullmatch(revision) else ref_file.read_text().strip() if ref_file.is_file() else None
    if sha is None or not (storage / "snapshots" / sha).is_dir():
        raise HubOfflineError(
            f"{ref.spec}: HF_HUB_OFFLINE is set and it is not in the HF cache "
            f"({hf_constants.HF_HUB_CACHE}); pull it once online (`lrmerge pull {ref.spec}`)"
        )
    return storage / "snapshots" / sha


def remote_meta(ref: ModelRef, *, token: str | None = None) -> ModelMeta:
    """Pin a Hub model to its commit sha and read its tensors and config, without the weights.

    Offline (HF_HUB_OFFLINE), the model is read from the HF cache instead."""
    assert ref.repo_id
    if is_offline_mode():
        folder = _cached_snapshot(ref)
        meta = local_meta(ref, folder)
        meta.sha = folder.name
        return meta
    api = HfApi(token=token)
    with hub_errors(ref.spec):
        info = api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        sha = info.sha
        if sha is None:
            raise HubError(f"{ref.spec}: the Hub did not name the commit of {ref.revision or 'main'}")
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        if not any(f.endswith(".safetensors") for f in sizes):
            pickles = [f for f in sizes if f.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise PickleOnlyRepoError(
                    f"{ref.spec} ships only pickle weights ({', '.join(sorted(pickles)[:3])}); lrmerge never "
                    "loads them because unpickling can run arbitrary code: use a revision with *.safetensors "
                    "(many repos have a `refs/pr/N` that adds them) or convert them with a tool you trust"
                )
            raise HubError(f"{ref.spec} has no *.safetensors weights at {sha[:12]}: choose a model repo")
        if SAFETENSORS_INDEX in sizes:  # checked first: the client trusts its shard names and types
            index_file = Path(hf_hub_download(ref.repo_id, SAFETENSORS_INDEX, revision=sha, token=token))
            index_shards(read_json_file(index_file, f"{ref.spec}: {SAFETENSORS_INDEX}"), ref.spec)
        try:
            st = api.get_safetensors_metadata(ref.repo_id, revision=sha)
        except NotASafetensorsRepoError:
            raise HubError(f"{ref.spec}: no {SAFETENSORS_INDEX} or model.safetensors at {sha[:12]}") from None
        except SafetensorsParsingError:
            raise InputModelError(
                f"{ref.spec}: a safetensors header (or the index) at {sha[:12]} is corrupt: "
                "the file is not a model lrmerge can read"
            ) from None
        if "config.json" not in sizes:
            raise HubError(f"{ref.spec} has no config.json at {sha[:12]}: is it a transformers model?")
        config_file = Path(hf_hub_download(ref.repo_id, "config.json", revision=sha, token=token))
    config = check_config(read_json_file(config_file, f"{ref.spec}: config.json"), ref.spec)
    tensors = {
        name: _remote_spec(name, t.dtype, t.shape, ref.spec)
        for header in st.files_metadata.values()
        for name, t in header.tensors.items()
    }
    needed = set(st.files_metadata) | {f for f in SIDE_FILES if f in sizes}
    return ModelMeta(
        spec=ref.spec,
        name=ref.display,
        repo_id=ref.repo_id,
        revision=ref.revision,
        sha=sha,
        files={f: sizes.get(f, 0) for f in sorted(needed)},
        tensors=tensors,
        config=config,
    )


def _remote_spec(name: str, dtype: Any, shape: Any, where: str) -> TensorSpec:
    """A tensor's spec from a Hub header, refused (one line) unless the merge plan can use
    it; the downloaded file's header is checked in full before its data is read."""
    if dtype not in DTYPE_SIZES or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputModelError(
            f"{where}: tensor {shown(name)} has a corrupt or unsupported safetensors header "
            f"(dtype {shown(dtype)}, shape {shown(shape)})"
        )
    return TensorSpec(dtype, tuple(shape))


def read_json_file(path: Path, what: str) -> Any:
    """A JSON file's value; InputModelError, one line, when it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise InputModelError(f"{what} is not valid JSON (UTF-8)") from None


def model_meta(ref: ModelRef, *, token: str | None = None) -> ModelMeta:
    return local_meta(ref) if ref.is_local else remote_meta(ref, token=token)


# --- pull ---------------------------------------------------------------------------------
def recipe_refs(recipe: Recipe) -> dict[str, ModelRef]:
    """The recipe's models by the merge engine's keys ('base', then each model's spec)."""
    refs = {m.ref.spec: m.ref for m in recipe.models}
    if recipe.base is not None:
        refs[BASE] = recipe.base
    return {key: refs[key] for key in model_keys(recipe)}


def plan_recipe(recipe: Recipe, *, token: str | None = None) -> PullPlan:
    """Pin every Hub model of the recipe and plan the merge from headers and configs.

    Downloads no weights. Raises IncompatibleModelsError (with numbers) when the models do
    not fit together, HubError subclasses when the Hub says no."""
    refs = recipe_refs(recipe)
    # side by side: each model's pinning and header reads are requests one after another
    metas = dict(zip(refs, at_once(lambda ref: model_meta(ref, token=token), list(refs.values())), strict=True))
    check_pinned_twins(metas)
    merge_plan = plan_merge({k: m.tensors for k, m in metas.items()}, {k: m.config for k, m in metas.items()}, recipe)
    return PullPlan(models=metas, merge_plan=merge_plan)


def check_pinned_twins(metas: dict[str, ModelMeta]) -> None:
    """Refuse a Hub model named twice through revisions that pin to one commit
    (`org/x@main` and `org/x@<sha of main>`; a commit sha names its files, whatever the repo
    id's spelling); the recipe compares spellings it can resolve alone."""
    seen: dict[str, str] = {}
    for meta in metas.values():
        if meta.repo_id and meta.sha:
            twin = seen.setdefault(meta.sha, meta.spec)
            if twin != meta.spec:
                raise RecipeError(
                    f"models: {meta.spec!r} and {twin!r} are the same commit {meta.sha[:12]}; name each model once"
                )


def recipe_for_models(refs: list[ModelRef]) -> Recipe:
    """A recipe that checks models against the first one (for `lrmerge pull MODEL...`)."""
    unique = list({r.identity: r for r in refs}.values())
    return Recipe(
        method="task_arithmetic",
        base=unique[0],
        parameters={},
        models=[ModelEntry(ref=r, role="task", params={}) for r in unique[1:]],
    )


def targets_to_recipe(targets: list[str], cwd: Path | None = None) -> Recipe:
    """`lrmerge pull` arguments: one recipe file, or model specs (local folders, Hub ids)."""
    cwd = cwd or Path.cwd()
    recipes = [t for t in targets if t.endswith((".yaml", ".yml"))]
    if recipes:
        if len(targets) > 1:
            raise RecipeError("pull: give one recipe file, or model ids and folders, not both")
        return load_recipe(cwd / recipes[0])
    return recipe_for_models([parse_model_ref(t, cwd, "model") for t in targets])


def download(meta: ModelMeta, *, token: str | None = None) -> Path:
    """Download the files a merge needs, at the pinned sha, into the HF cache (resumable, with
    progress bars); returns the snapshot folder. Local (and offline cached) models are
    returned as they are."""
    if not meta.repo_id or meta.path is not None:
        assert meta.path is not None
        return meta.path
    with hub_errors(meta.spec):
        meta.path = Path(
            snapshot_download(meta.repo_id, revision=meta.sha, token=token, allow_patterns=sorted(meta.files))
        )
    _remember_revision(meta.path, meta.revision or "main", meta.sha)
    return meta.path


def _remember_revision(snapshot: Path, revision: str, sha: str | None) -> None:
    """Record branch/tag -> sha in the cache's `refs/` (the HF cache layout), as the client
    does when it resolves a branch itself, so that HF_HUB_OFFLINE finds `org/name@branch`."""
    if sha and revision != sha:
        ref_file = snapshot.parent.parent / "refs" / revision
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(sha)


def pull(recipe: Recipe, *, token: str | None = None, dry_run: bool = False) -> PullPlan:
    """Check, then (unless `dry_run`) download every Hub model of the recipe; returns the plan."""
    plan = plan_recipe(recipe, token=token)
    if not dry_run:
        for meta in plan.models.values():
            download(meta, token=token)
        plan.downloaded = True
    return plan


def materialize_sources(recipe: Recipe, *, token: str | None = None) -> dict[str, Source]:
    """Every model of a recipe as a local folder for the merge engine, keyed like the engine
    ('base', then each model's spec). Hub models are pinned to their sha, checked from their
    headers, and downloaded; local folders pass through (repo_id None, revision None)."""
    plan = pull(recipe, token=token)
    return {
        key: Source(path=m.path, repo_id=m.repo_id, revision=m.sha)  # type: ignore[arg-type]
        for key, m in plan.models.items()
    }


def stream_sources(
    recipe: Recipe, *, token: str | None = None, read_ahead: int = DEFAULT_READ_AHEAD
) -> dict[str, Source]:
    """Like materialize_sources, without downloading weights: a Hub model whose weights are
    not in the HF cache is read by range requests during the merge (hub_stream.HubModel);
    only its small side files (config, tokenizer) are downloaded. Cached models and local
    folders are read from disk. The streamed models share the read-ahead window."""
    plan = plan_recipe(recipe, token=token)
    streamed = [k for k, m in plan.models.items() if m.repo_id and m.path is None and not _weights_cached(m)]

    def source(key: str) -> Source:
        m = plan.models[key]
        if key not in streamed:
            download(m, token=token)
            return Source(path=m.path, repo_id=m.repo_id, revision=m.sha)  # type: ignore[arg-type]
        assert m.repo_id and m.sha  # streamed: a Hub model, pinned to a commit by plan_recipe
        with hub_errors(m.spec):
            folder = Path(
                snapshot_download(
                    m.repo_id,
                    revision=m.sha,
                    token=token,
                    allow_patterns=[f for f in m.files if not f.endswith(".safetensors")],
                )
            )
        _remember_revision(folder, m.revision or "main", m.sha)
        return streamed_source(m.repo_id, m.sha, folder, token=token, read_ahead=read_ahead // len(streamed))

    # side by side: each model's files are requests one after another
    return dict(zip(plan.models, at_once(source, list(plan.models)), strict=True))


def streamed_source(repo_id: str, sha: str, folder: Path, *, token: str | None, read_ahead: int) -> Source:
    """A Source whose tensors are read from the Hub at `sha`; `folder` holds its side files."""
    from .stream import hub_reader

    return Source(
        path=folder,
        repo_id=repo_id,
        revision=sha,
        reader=hub_reader(
            repo_id=repo_id,
            revision=sha,
            folder=folder,
            token=token,
            read_ahead=read_ahead,
            request_bytes=RANGE_REQUEST_BYTES,
            workers=RANGE_WORKERS,
        ),
    )


def _weights_cached(meta: ModelMeta) -> bool:
    """Whether every weight file of the model, at its pinned sha, is in the HF cache."""
    return all(
        isinstance(try_to_load_from_cache(meta.repo_id, f, revision=meta.sha), str)  # type: ignore[arg-type]
        for f in meta.files
        if f.endswith(".safetensors")
    )
