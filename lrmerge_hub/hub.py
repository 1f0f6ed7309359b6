"""Models on the Hugging Face Hub: pin, check before downloading, download, push.

Everything goes through the official `huggingface_hub` client, so `HF_ENDPOINT`, `HF_HOME`,
`HF_HUB_CACHE`, `HF_HUB_OFFLINE` and the token places (`HF_OIDC_RESOURCE` in CI, `HF_TOKEN`,
the token file) work as they do for `hf`. Tokens are passed to the client and never printed,
logged or written by this module.

Pull: every Hub id (`org/name`, `org/name@branch-or-tag`, `org/name@<sha>`) is pinned to its
commit sha first; the merge is planned (`merge.plan.plan_merge`, the engine's own check) from
the safetensors headers and config.json alone, before any weights are downloaded; then only
the files a merge needs are downloaded into the HF cache.

Push: the folder becomes ONE commit with `parent_commit` (optimistic locking), optionally as a
pull request, on a branch, and tagged. A failed push leaves the remote as it was; running it
again completes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    get_token,
    hf_hub_download,
    is_offline_mode,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    NotASafetensorsRepoError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    SafetensorsParsingError,
)

from . import hub_hosts
from .card_rules import is_repo_id, is_revision
from .errors import (
    HubAuthError,
    HubError,
    HubNotFoundError,
    HubOfflineError,
    HubPushError,
    HubRevisionError,
    HubUntrustedHostError,
    InputModelError,
    PickleOnlyRepoError,
    RecipeError,
    shown,
)
from .merge.plan import BASE, DTYPE_SIZES, MergePlan, Source, TensorSpec, check_config, model_keys, plan_merge
from .merge.st_io import PICKLE_SUFFIXES, SafetensorsModel, index_shards
from .recipe import SHA, ModelEntry, ModelRef, Recipe, load_recipe, parse_model_ref
from .settings import DEFAULT_READ_AHEAD, RANGE_REQUEST_BYTES, RANGE_WORKERS

SAFETENSORS_INDEX = "model.safetensors.index.json"
EVAL_RESULTS_DIR = ".eval_results"  # the Hub's newer evaluation results format, written by the card
# Besides the weights, what a merge (and the merged model) needs from a source repo.
SIDE_FILES = (
    "config.json", "generation_config.json", SAFETENSORS_INDEX,
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
RETRY_STATUS = (429, 500, 502, 503, 504)
RETRY_WAIT = 0.5  # seconds before the first retry; doubles each time
T = TypeVar("T")
hub_hosts.install()  # before any request: the client's answers are checked for other hosts


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
            "model": self.spec if self.repo_id else self.name, "repo_id": self.repo_id,
            "revision": self.revision, "sha": self.sha, "files": len(self.files),
            "download_bytes": self.download_bytes, "tensors": len(self.tensors),
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
        return {"compatible": True, "models": models, **self.merge_plan.summary(),
                "download_bytes": self.download_bytes, "downloaded": self.downloaded}


# --- errors -------------------------------------------------------------------------------
def _token_hint(write: bool = False) -> str:
    if get_token() is None:
        return ("set HF_TOKEN (or run `hf auth login`, or pass --token) with a token that can "
                + ("write to it" if write else "read it"))
    return "check that your token can " + ("write to it" if write else "read it")


@contextlib.contextmanager
def hub_errors(what: str, *, write: bool = False) -> Iterator[None]:
    """Turn the client's exceptions into one-line HubErrors that say how to fix them."""
    try:
        yield
    except GatedRepoError:
        raise HubAuthError(f"{what} is gated: accept its conditions on its Hub page, then "
                           f"{_token_hint()}") from None
    except RevisionNotFoundError:
        raise HubRevisionError(f"{what}: no such branch, tag or commit on the Hub "
                               "(check the part after '@')") from None
    except RepositoryNotFoundError:
        if get_token() is None:
            raise HubAuthError(f"{what}: not found, or private/gated: {_token_hint(write)}") from None
        raise HubNotFoundError(f"{what}: repository not found (or your token cannot read it); "
                               "check the id 'org/name'") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        raise HubOfflineError(f"{what}: HF_HUB_OFFLINE is set and the files are not in the HF cache; "
                              "pull it once online (`lrmerge pull`)") from None
    except httpx2.TransportError as e:
        raise HubOfflineError(f"{what}: cannot reach the Hub at {hf_constants.ENDPOINT} ({type(e).__name__}); "
                              "check the network or proxy, or set HF_HUB_OFFLINE=1 to use the HF cache") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        if status in (401, 403):
            raise HubAuthError(f"{what}: the Hub refused the token (HTTP {status}); "
                               f"{_token_hint(write)}") from None
        raise HubError(f"{what}: the Hub answered HTTP {status}; try again later") from None


# --- reading models -----------------------------------------------------------------------
def local_meta(ref: ModelRef, folder: Path | None = None) -> ModelMeta:
    """Tensor specs and config of a local folder (or a cached snapshot), from the headers."""
    model = SafetensorsModel(folder or ref.path, label=ref.display)
    return ModelMeta(spec=ref.spec, name=ref.display, repo_id=ref.repo_id, revision=ref.revision,
                     path=model.folder, tensors=model.specs, config=model.config)


def _cached_snapshot(ref: ModelRef) -> Path:
    """Offline: the cached snapshot of a Hub model, found through the HF cache layout
    (`models--org--name/refs/<branch or tag>` holds the sha, `snapshots/<sha>/` the files)."""
    assert ref.repo_id
    storage = Path(hf_constants.HF_HUB_CACHE) / f"models--{ref.repo_id.replace('/', '--')}"
    revision = ref.revision or "main"
    ref_file = storage / "refs" / revision
    sha = revision if SHA.fullmatch(revision) else ref_file.read_text().strip() if ref_file.is_file() else None
    if sha is None or not (storage / "snapshots" / sha).is_dir():
        raise HubOfflineError(f"{ref.spec}: HF_HUB_OFFLINE is set and it is not in the HF cache "
                              f"({hf_constants.HF_HUB_CACHE}); pull it once online (`lrmerge pull {ref.spec}`)")
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
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        if not any(f.endswith(".safetensors") for f in sizes):
            pickles = [f for f in sizes if f.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise PickleOnlyRepoError(
                    f"{ref.spec} ships only pickle weights ({', '.join(sorted(pickles)[:3])}); lrmerge never "
                    "loads them because unpickling can run arbitrary code: use a revision with *.safetensors "
                    "(many repos have a `refs/pr/N` that adds them) or convert them with a tool you trust")
            raise HubError(f"{ref.spec} has no *.safetensors weights at {sha[:12]}: choose a model repo")
        if SAFETENSORS_INDEX in sizes:  # checked first: the client trusts its shard names and types
            index_file = Path(hf_hub_download(ref.repo_id, SAFETENSORS_INDEX, revision=sha, token=token))
            index_shards(_json_file(index_file, f"{ref.spec}: {SAFETENSORS_INDEX}"), ref.spec)
        try:
            st = api.get_safetensors_metadata(ref.repo_id, revision=sha)
        except NotASafetensorsRepoError:
            raise HubError(f"{ref.spec}: no {SAFETENSORS_INDEX} or model.safetensors at {sha[:12]}") from None
        except SafetensorsParsingError:
            raise InputModelError(f"{ref.spec}: a safetensors header (or the index) at {sha[:12]} is corrupt: "
                                  "the file is not a model lrmerge can read") from None
        if "config.json" not in sizes:
            raise HubError(f"{ref.spec} has no config.json at {sha[:12]}: is it a transformers model?")
        config_file = Path(hf_hub_download(ref.repo_id, "config.json", revision=sha, token=token))
    config = check_config(_json_file(config_file, f"{ref.spec}: config.json"), ref.spec)
    tensors = {name: _remote_spec(name, t.dtype, t.shape, ref.spec)
               for header in st.files_metadata.values() for name, t in header.tensors.items()}
    needed = set(st.files_metadata) | {f for f in SIDE_FILES if f in sizes}
    return ModelMeta(spec=ref.spec, name=ref.display, repo_id=ref.repo_id, revision=ref.revision,
                     sha=sha, files={f: sizes.get(f, 0) for f in sorted(needed)}, tensors=tensors, config=config)


def _remote_spec(name: str, dtype: Any, shape: Any, where: str) -> TensorSpec:
    """A tensor's spec from a Hub header, refused (one line) unless the merge plan can use
    it; the downloaded file's header is checked in full before its data is read."""
    if dtype not in DTYPE_SIZES or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputModelError(f"{where}: tensor {shown(name)} has a corrupt or unsupported safetensors header "
                              f"(dtype {shown(dtype)}, shape {shown(shape)})")
    return TensorSpec(dtype, tuple(shape))


def _json_file(path: Path, what: str) -> Any:
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
    metas = {key: model_meta(ref, token=token) for key, ref in recipe_refs(recipe).items()}
    check_pinned_twins(metas)
    merge_plan = plan_merge({k: m.tensors for k, m in metas.items()},
                            {k: m.config for k, m in metas.items()}, recipe)
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
                raise RecipeError(f"models: {meta.spec!r} and {twin!r} are the same commit {meta.sha[:12]}; "
                                  "name each model once")


def recipe_for_models(refs: list[ModelRef]) -> Recipe:
    """A recipe that checks models against the first one (for `lrmerge pull MODEL...`)."""
    unique = list({r.identity: r for r in refs}.values())
    return Recipe(method="task_arithmetic", base=unique[0], parameters={},
                  models=[ModelEntry(ref=r, role="task", params={}) for r in unique[1:]])


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
        meta.path = Path(snapshot_download(meta.repo_id, revision=meta.sha, token=token,
                                           allow_patterns=sorted(meta.files)))
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
    return {key: Source(path=m.path, repo_id=m.repo_id, revision=m.sha)  # type: ignore[arg-type]
            for key, m in plan.models.items()}


def stream_sources(recipe: Recipe, *, token: str | None = None, read_ahead: int = DEFAULT_READ_AHEAD) -> dict[str, Source]:
    """Like materialize_sources, without downloading weights: a Hub model whose weights are
    not in the HF cache is read by range requests during the merge (hub_stream.HubModel);
    only its small side files (config, tokenizer) are downloaded. Cached models and local
    folders are read from disk. The streamed models share the read-ahead window."""
    plan = plan_recipe(recipe, token=token)
    streamed = [k for k, m in plan.models.items() if m.repo_id and m.path is None and not _weights_cached(m)]
    sources = {}
    for key, m in plan.models.items():
        if key not in streamed:
            download(m, token=token)
            sources[key] = Source(path=m.path, repo_id=m.repo_id, revision=m.sha)  # type: ignore[arg-type]
            continue
        with hub_errors(m.spec):
            folder = Path(snapshot_download(m.repo_id, revision=m.sha, token=token,  # type: ignore[arg-type]
                                            allow_patterns=[f for f in m.files if not f.endswith(".safetensors")]))
        _remember_revision(folder, m.revision or "main", m.sha)
        sources[key] = streamed_source(m.repo_id, m.sha, folder, token=token,  # type: ignore[arg-type]
                                       read_ahead=read_ahead // len(streamed))
    return sources


def streamed_source(repo_id: str, sha: str, folder: Path, *, token: str | None, read_ahead: int) -> Source:
    """A Source whose tensors are read from the Hub at `sha`; `folder` holds its side files."""
    from .hub_stream import hub_reader

    return Source(path=folder, repo_id=repo_id, revision=sha,
                  reader=hub_reader(repo_id=repo_id, revision=sha, folder=folder, token=token, read_ahead=read_ahead,
                                    request_bytes=RANGE_REQUEST_BYTES, workers=RANGE_WORKERS))


def _weights_cached(meta: ModelMeta) -> bool:
    """Whether every weight file of the model, at its pinned sha, is in the HF cache."""
    return all(isinstance(try_to_load_from_cache(meta.repo_id, f, revision=meta.sha), str)  # type: ignore[arg-type]
               for f in meta.files if f.endswith(".safetensors"))


# --- push ---------------------------------------------------------------------------------
@dataclass
class PushResult:
    repo_id: str
    revision: str  # the branch pushed to
    commit: str  # sha of the new commit (or of the head when nothing changed)
    commit_url: str
    pr_url: str | None
    tag: str | None
    files: int
    changed: bool  # False: the branch already held exactly these files; no commit was made

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _retry(call: Callable[[], T], *, attempts: int = 3) -> T:
    """Run an idempotent Hub call, retrying on network errors, 429 and 5xx."""
    for attempt in range(attempts):
        try:
            return call()
        except (HfHubHTTPError, httpx2.TransportError) as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            retryable = isinstance(e, httpx2.TransportError) or status in RETRY_STATUS
            if not retryable or attempt == attempts - 1:
                raise
            time.sleep(RETRY_WAIT * 2**attempt)
    raise AssertionError("unreachable")


def folder_files(folder: Path, *, weights_uploaded: bool = False) -> dict[str, Path]:
    """The files to upload: everything in the folder except hidden files and folders (run
    state like .lrmerge/), but with the card's .eval_results/ (the Hub reads it); refuses
    pickle weights and folders without a model."""

    def published(rel: Path) -> bool:
        return rel.parts[0] == EVAL_RESULTS_DIR or not any(part.startswith(".") for part in rel.parts)

    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
             if p.is_file() and published(p.relative_to(folder))}
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise HubPushError(f"{folder.name}: refusing to publish pickle files ({', '.join(pickles[:3])}); "
                           "remove them, the model is in *.safetensors")
    if "config.json" not in files or not (weights_uploaded or any(f.endswith(".safetensors") for f in files)):
        raise HubPushError(f"{folder.name}: not a merged model folder (needs config.json and *.safetensors); "
                           "run `lrmerge merge` first")
    return files


def commit_message(folder: Path) -> tuple[str, str]:
    """Summary and description naming the recipe and the source revisions (merge_report.json,
    recipe.yaml); a plain message for folders without them."""
    report_path, recipe_path = folder / "merge_report.json", folder / "recipe.yaml"
    report = _json_file(report_path, f"{folder.name}/merge_report.json") if report_path.is_file() else None
    if not isinstance(report, dict):
        return f"Upload {folder.name} with lrmerge", ""
    sources = [s for s in ([report.get("base")] + list(report.get("models") or [])) if isinstance(s, dict)]

    def name(s: dict[str, Any]) -> str:
        rev = s.get("revision")
        return f"{s.get('repo_id') or s.get('model')}@{str(rev)[:12]}" if rev else f"{s.get('model')} (local)"

    recipe_id = (report.get("recipe_sha256") or "")[:12]
    summary = f"lrmerge {report.get('method', 'merge')} (recipe {recipe_id}): " + ", ".join(map(name, sources))
    lines = [f"Recipe sha256: {report.get('recipe_sha256')}", "", "Sources:"]
    lines += [f"- {s.get('model')}: {s.get('repo_id') or 'local folder'} @ {s.get('revision') or 'no revision'}"
              for s in sources]
    if recipe_path.is_file():
        lines += ["", "Recipe:", "```yaml", recipe_path.read_text().rstrip(), "```"]
    return summary[:300], "\n".join(lines)


def push(folder: Path | str, repo_id: str, *, private: bool = False, create_pr: bool = False,
         revision: str | None = None, tag: str | None = None, message: str | None = None,
         token: str | None = None, uploaded: tuple[CommitOperationAdd, ...] = ()) -> PushResult:
    """Upload a merged model folder as one commit (or one pull request) and tag it.

    The repo is created if needed, the branch `revision` too. The commit names the recipe and
    the source revisions. Calls are retried on network errors, 429 and 5xx: the commit carries
    `parent_commit`, so a retry never lands on top of someone else's change, and files the
    branch already holds are skipped by the client, so a commit whose answer was lost is not
    made twice. A PR commit is not retried (a retry could open a second PR). On failure the
    remote is unchanged: run the push again. `uploaded`: shards a ShardUploader already
    sent (for this repo, branch and create_pr), committed without reading them again."""
    folder = Path(folder)
    if not is_repo_id(repo_id):
        raise HubPushError(f"{shown(repo_id)} is not a Hub model id 'org/name' (letters, digits, '-', '_', '.'; "
                           "no '--' or '..')")
    for what, name in (("--revision", revision), ("--tag", tag)):
        if name is not None and not is_revision(name):
            raise HubPushError(f"{what} {shown(name)} is not a branch or tag name")
    if not folder.is_dir():
        raise HubPushError(f"{folder}: no such folder")
    if tag and create_pr:
        raise HubPushError("--tag needs a commit on a branch: tag after merging the PR, or drop --create-pr")
    files = folder_files(folder, weights_uploaded=bool(uploaded))
    token = token or get_token()
    if not token:
        raise HubAuthError("pushing needs a Hub token with write access: set HF_TOKEN, run `hf auth login`, "
                           "pass --token, or use trusted publishing (HF_OIDC_RESOURCE) in CI")
    hub_hosts.protect(token)
    summary, description = commit_message(folder)
    branch = revision or "main"
    api = HfApi(token=token)
    try:
        with hub_errors(repo_id, write=True):
            _retry(lambda: api.create_repo(repo_id, private=private, exist_ok=True))
            if branch != "main":
                _retry(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True))
            parent = _retry(lambda: api.model_info(repo_id, revision=branch).sha)
            sha, url, pr_url = _commit(api, repo_id, files, message or summary, description, branch, create_pr,
                                       parent, list(uploaded))
    except (HubAuthError, HubPushError):
        raise
    except HubError as e:
        raise HubPushError(f"push to {repo_id}@{branch} failed ({e}); nothing was committed: "
                           "run the same command again to complete it") from None
    if tag:
        try:
            with hub_errors(repo_id, write=True):
                _tag(api, repo_id, tag, sha)
        except (HubAuthError, HubPushError):
            raise
        except HubError as e:
            raise HubPushError(f"committed {sha[:12]} to {repo_id}@{branch} but could not tag it {tag!r} ({e}): "
                               "run the same command again to add the tag") from None
    return PushResult(repo_id=repo_id, revision=branch, commit=sha, commit_url=url, pr_url=pr_url,
                      tag=tag, files=len(set(files) | {op.path_in_repo for op in uploaded}), changed=sha != parent)


def _commit(api: HfApi, repo_id: str, files: dict[str, Path], summary: str, description: str,
            branch: str, create_pr: bool, parent: str,
            uploaded: list[CommitOperationAdd]) -> tuple[str, str, str | None]:
    """One commit of `files` and the pre-`uploaded` shards on top of `parent`, the branch
    head; returns (sha, url, pr_url). A commit (or pull request) that landed although its
    answer was lost is recognised by its files and returned, never made twice."""
    prs_before = _pr_refs(api, repo_id) if create_pr else {}
    for attempt in range(3):
        # Fresh operations each attempt: the client then asks the Hub again which files it
        # already holds, so a retry after a commit whose answer was lost commits nothing twice.
        # (Pre-uploaded shards are committed by their sha256; their files may be gone.)
        done = {op.path_in_repo for op in uploaded}
        operations = uploaded + [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f))
                                 for p, f in files.items() if p not in done]
        try:
            try:
                info = api.create_commit(repo_id, operations, commit_message=summary, commit_description=description,
                                         revision=branch, create_pr=create_pr, parent_commit=parent)
                return info.oid, info.commit_url, info.pr_url
            except RuntimeError as e:
                if _upload_error(e) is None:
                    raise
                raise _upload_error(e) from None
        except (HfHubHTTPError, httpx2.TransportError) as e:  # first: a 400 is a ValueError too
            status = getattr(getattr(e, "response", None), "status_code", None)
            retryable = isinstance(e, httpx2.TransportError) or status in RETRY_STATUS
            # A lost answer (or, on a retry, the branch "moved" by our own landed commit): the
            # pre-uploaded shards' operations cannot tell the client that the Hub holds them,
            # so look at the branch (or the new pull requests) for exactly these files.
            if retryable or (status == 412 and attempt > 0):
                landed = _landed(api, repo_id, operations, branch, parent, prs_before if create_pr else None)
                if landed:
                    return landed
            if status == 412:
                raise HubPushError(f"push to {repo_id}@{branch} failed: the branch moved while pushing "
                                   "(another push?); nothing was changed, run the same command again") from None
            if create_pr or not retryable or attempt == 2:
                raise
            time.sleep(RETRY_WAIT * 2**attempt)
        except ValueError as e:  # the Hub rejected README.md's YAML metadata (before any upload)
            raise HubPushError(f"{repo_id}: {' '.join(str(e).split())}; fix README.md's metadata "
                               "(`lrmerge card` writes valid metadata)") from None
    raise AssertionError("unreachable")


def _upload_error(e: RuntimeError) -> BaseException | None:
    """The error inside the client's RuntimeError for a failed LFS upload (an HTTP or network
    error, or a refused host), so that it is retried or reported like any other; else None."""
    if isinstance(e.__cause__, (HfHubHTTPError, httpx2.TransportError, HubUntrustedHostError)):
        return e.__cause__
    return None


def _pr_refs(api: HfApi, repo_id: str) -> dict[str, str]:
    """The repo's pull requests: `refs/pr/N` -> head commit."""
    refs = _retry(lambda: api.list_repo_refs(repo_id, include_pull_requests=True))
    return {r.ref: r.target_commit for r in refs.pull_requests or []}


def _landed(api: HfApi, repo_id: str, operations: list[CommitOperationAdd], branch: str, parent: str,
            prs_before: dict[str, str] | None) -> tuple[str, str, str | None] | None:
    """(sha, url, pr_url) of the commit that holds exactly the files of `operations`: the
    branch head if it moved from `parent`, or (`prs_before` given) a pull request opened since;
    None when there is none or the Hub cannot say."""
    try:
        if prs_before is None:
            head = _retry(lambda: api.model_info(repo_id, revision=branch).sha)
            candidates = [(head, None)] if head and head != parent else []
        else:
            candidates = [(sha, ref) for ref, sha in _pr_refs(api, repo_id).items() if ref not in prs_before]
        for sha, ref in candidates:
            paths = [op.path_in_repo for op in operations]
            remote = {e.path: e for e in _retry(lambda: api.get_paths_info(repo_id, paths, revision=sha))}
            if all(op.path_in_repo in remote and _same_content(op, remote[op.path_in_repo]) for op in operations):
                pr_url = f"{api.endpoint}/{repo_id}/discussions/{ref.rsplit('/', 1)[1]}" if ref else None
                return sha, f"{api.endpoint}/{repo_id}/commit/{sha}", pr_url
    except (HfHubHTTPError, httpx2.TransportError, OSError):
        return None
    return None


def _same_content(op: CommitOperationAdd, remote: Any) -> bool:
    """Whether a file the Hub lists holds the operation's content: by sha256 in LFS storage,
    by git blob sha1 otherwise (read again from disk; a pre-uploaded shard's content is gone)."""
    lfs = getattr(remote, "lfs", None)
    if lfs is not None:
        return lfs.sha256 == op.upload_info.sha256.hex() and lfs.size == op.upload_info.size
    if not isinstance(op.path_or_fileobj, str) or getattr(remote, "blob_id", None) is None:
        return False
    blob = hashlib.sha1(b"blob %d\0" % op.upload_info.size)
    with open(op.path_or_fileobj, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            blob.update(chunk)
    return remote.blob_id == blob.hexdigest()


def _tag(api: HfApi, repo_id: str, tag: str, sha: str) -> None:
    """Tag `sha`; an existing tag is fine only if it already points there (a re-run)."""
    try:
        _retry(lambda: api.create_tag(repo_id, tag=tag, revision=sha))
    except HfHubHTTPError as e:
        if e.response is None or e.response.status_code != 409:
            raise
        tags = {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags}
        if tags.get(tag) != sha:
            raise HubPushError(f"tag {tag!r} already exists on {repo_id} at {str(tags.get(tag))[:12]}: "
                               "choose another --tag") from None


class ShardUploader:
    """The merge's output sink when the model will be pushed: each finished shard is handed to
    the client's pre-upload (LFS storage, or Xet where the client uses it) for the commit that
    `push` makes at the end, once, with `parent_commit`; the Hub shows nothing until then.
    With `keep=False` the shard leaves the disk once uploaded, so a merge-and-push holds
    about one output shard on disk. Storage the Hub already holds (an earlier, interrupted
    run) is not uploaded again. A shard the Hub wants in regular mode is not pre-uploaded: it
    stays in the output folder and goes inside the commit."""

    def __init__(self, repo_id: str, *, revision: str | None = None, create_pr: bool = False,
                 private: bool = False, keep: bool = True, token: str | None = None):
        token = token or get_token()
        if not token:
            raise HubAuthError("pushing needs a Hub token with write access: set HF_TOKEN, run `hf auth login`, "
                               "pass --token, or use trusted publishing (HF_OIDC_RESOURCE) in CI")
        self.repo_id, self.branch, self.create_pr, self.keep = repo_id, revision or "main", create_pr, keep
        self.private = private
        hub_hosts.protect(token)
        self.api = HfApi(token=token)
        self.operations: list[CommitOperationAdd] = []  # for push(uploaded=...)
        self.bytes_uploaded = 0  # handed to the Hub's storage (or found there already)

    def __call__(self, path: Path) -> bool:
        """Upload one finished shard; True when its file was removed."""
        op = CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        with hub_errors(self.repo_id, write=True):
            if not self.operations:  # the repo (and branch) the commit will go to, as push makes them
                _retry(lambda: self.api.create_repo(self.repo_id, private=self.private, exist_ok=True))
                if self.branch != "main":
                    _retry(lambda: self.api.create_branch(self.repo_id, branch=self.branch, exist_ok=True))
            try:
                _retry(lambda: self.api.preupload_lfs_files(self.repo_id, additions=[op], revision=self.branch,
                                                            create_pr=self.create_pr))
            except RuntimeError as e:
                if _upload_error(e) is None:
                    raise
                raise _upload_error(e) from None
        # The client lets go of content it has sent to storage. A shard the Hub takes in
        # regular mode (mirrors and proxies do) travels inside the commit instead: it stays on
        # disk, and push reads it from the output folder, where the merge has moved it by then.
        if op.path_or_fileobj != b"":
            return False
        self.operations.append(op)
        self.bytes_uploaded += op.upload_info.size
        if not self.keep:
            path.unlink()
            return True
        return False
