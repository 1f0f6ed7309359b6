"""Models on the Hugging Face Hub, written: a folder becomes ONE commit with `parent_commit`
(optimistic locking), optionally as a pull request, on a branch, and tagged. A failed push
leaves the remote as it was; running it again completes it. Tokens are passed to the client
and never printed, logged or written by this module.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    get_token,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
)

from . import hosts as hub_hosts
from ..metadata import is_repo_id, is_revision
from .errors import hub_errors
from .sources import read_json_file
from ..errors import HubAuthError, HubError, HubPushError, HubUntrustedHostError, shown
from ..merge.st_io import PICKLE_SUFFIXES

EVAL_RESULTS_DIR = ".eval_results"  # the Hub's newer evaluation results format, written by the card
RETRY_STATUS = (429, 500, 502, 503, 504)
RETRY_WAIT = 0.5  # seconds before the first retry; doubles each time
T = TypeVar("T")


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

    files = {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and published(p.relative_to(folder))
    }
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise HubPushError(
            f"{folder.name}: refusing to publish pickle files ({', '.join(pickles[:3])}); "
            "remove them, the model is in *.safetensors"
        )
    if "config.json" not in files or not (weights_uploaded or any(f.endswith(".safetensors") for f in files)):
        raise HubPushError(
            f"{folder.name}: not a merged model folder (needs config.json and *.safetensors); run `lrmerge merge` first"
        )
    return files


def commit_message(folder: Path) -> tuple[str, str]:
    """Summary and description naming the recipe and the source revisions (merge_report.json,
    recipe.yaml); a plain message for folders without them."""
    report_path, recipe_path = folder / "merge_report.json", folder / "recipe.yaml"
    report = read_json_file(report_path, f"{folder.name}/merge_report.json") if report_path.is_file() else None
    if not isinstance(report, dict):
        return f"Upload {folder.name} with lrmerge", ""
    sources = [s for s in ([report.get("base")] + list(report.get("models") or [])) if isinstance(s, dict)]

    def name(s: dict[str, Any]) -> str:
        rev = s.get("revision")
        return f"{s.get('repo_id') or s.get('model')}@{str(rev)[:12]}" if rev else f"{s.get('model')} (local)"

    recipe_id = (report.get("recipe_sha256") or "")[:12]
    summary = f"lrmerge {report.get('method', 'merge')} (recipe {recipe_id}): " + ", ".join(map(name, sources))
    lines = [f"Recipe sha256: {report.get('recipe_sha256')}", "", "Sources:"]
    lines += [
        f"- {s.get('model')}: {s.get('repo_id') or 'local folder'} @ {s.get('revision') or 'no revision'}"
        for s in sources
    ]
    if recipe_path.is_file():
        lines += ["", "Recipe:", "```yaml", recipe_path.read_text().rstrip(), "```"]
    return summary[:300], "\n".join(lines)


def push(
    folder: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    create_pr: bool = False,
    revision: str | None = None,
    tag: str | None = None,
    message: str | None = None,
    token: str | None = None,
    uploaded: tuple[CommitOperationAdd, ...] = (),
) -> PushResult:
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
        raise HubPushError(
            f"{shown(repo_id)} is not a Hub model id 'org/name' (letters, digits, '-', '_', '.'; no '--' or '..')"
        )
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
        raise HubAuthError(
            "pushing needs a Hub token with write access: set HF_TOKEN, run `hf auth login`, "
            "pass --token, or use trusted publishing (HF_OIDC_RESOURCE) in CI"
        )
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
            sha, url, pr_url = _commit(
                api, repo_id, files, message or summary, description, branch, create_pr, parent, list(uploaded)
            )
    except (HubAuthError, HubPushError):
        raise
    except HubError as e:
        raise HubPushError(
            f"push to {repo_id}@{branch} failed ({e}); nothing was committed: run the same command again to complete it"
        ) from None
    if tag:
        try:
            with hub_errors(repo_id, write=True):
                _tag(api, repo_id, tag, sha)
        except (HubAuthError, HubPushError):
            raise
        except HubError as e:
            raise HubPushError(
                f"committed {sha[:12]} to {repo_id}@{branch} but could not tag it {tag!r} ({e}): "
                "run the same command again to add the tag"
            ) from None
    return PushResult(
        repo_id=repo_id,
        revision=branch,
        commit=sha,
        commit_url=url,
        pr_url=pr_url,
        tag=tag,
        files=len(set(files) | {op.path_in_repo for op in uploaded}),
        changed=sha != parent,
    )


def _commit(
    api: HfApi,
    repo_id: str,
    files: dict[str, Path],
    summary: str,
    description: str,
    branch: str,
    create_pr: bool,
    parent: str | None,
    uploaded: list[CommitOperationAdd],
) -> tuple[str, str, str | None]:
    """One commit of `files` and the pre-`uploaded` shards on top of `parent`, the branch
    head; returns (sha, url, pr_url). A commit (or pull request) that landed although its
    answer was lost is recognised by its files and returned, never made twice."""
    prs_before = _pr_refs(api, repo_id) if create_pr else {}
    for attempt in range(3):
        # Fresh operations each attempt: the client then asks the Hub again which files it
        # already holds, so a retry after a commit whose answer was lost commits nothing twice.
        # (Pre-uploaded shards are committed by their sha256; their files may be gone.)
        done = {op.path_in_repo for op in uploaded}
        operations = uploaded + [
            CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in files.items() if p not in done
        ]
        try:
            try:
                info = api.create_commit(
                    repo_id,
                    operations,
                    commit_message=summary,
                    commit_description=description,
                    revision=branch,
                    create_pr=create_pr,
                    parent_commit=parent,
                )
                return info.oid, info.commit_url, info.pr_url
            except RuntimeError as e:
                cause = _upload_error(e)
                if cause is None:
                    raise
                raise cause from None
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
                raise HubPushError(
                    f"push to {repo_id}@{branch} failed: the branch moved while pushing "
                    "(another push?); nothing was changed, run the same command again"
                ) from None
            if create_pr or not retryable or attempt == 2:
                raise
            time.sleep(RETRY_WAIT * 2**attempt)
        except ValueError as e:  # the Hub rejected README.md's YAML metadata (before any upload)
            raise HubPushError(
                f"{repo_id}: {' '.join(str(e).split())}; fix README.md's metadata "
                "(`lrmerge card` writes valid metadata)"
            ) from None
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


def _landed(
    api: HfApi,
    repo_id: str,
    operations: list[CommitOperationAdd],
    branch: str,
    parent: str | None,
    prs_before: dict[str, str] | None,
) -> tuple[str, str, str | None] | None:
    """(sha, url, pr_url) of the commit that holds exactly the files of `operations`: the
    branch head if it moved from `parent`, or (`prs_before` given) a pull request opened since;
    None when there is none or the Hub cannot say."""
    candidates: list[tuple[str, str | None]]
    try:
        if prs_before is None:
            head = _retry(lambda: api.model_info(repo_id, revision=branch).sha)
            candidates = [(head, None)] if head and head != parent else []
        else:
            candidates = [(sha, ref) for ref, sha in _pr_refs(api, repo_id).items() if ref not in prs_before]
        paths = [op.path_in_repo for op in operations]
        for sha, ref in candidates:
            remote = {e.path: e for e in _retry(functools.partial(api.get_paths_info, repo_id, paths, revision=sha))}
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
            raise HubPushError(
                f"tag {tag!r} already exists on {repo_id} at {str(tags.get(tag))[:12]}: choose another --tag"
            ) from None


class ShardUploader:
    """The merge's output sink when the model will be pushed: each finished shard is handed to
    the client's pre-upload (LFS storage, or Xet where the client uses it) for the commit that
    `push` makes at the end, once, with `parent_commit`; the Hub shows nothing until then.
    With `keep=False` the shard leaves the disk once uploaded, so a merge-and-push holds
    about one output shard on disk. Storage the Hub already holds (an earlier, interrupted
    run) is not uploaded again. A shard the Hub wants in regular mode is not pre-uploaded: it
    stays in the output folder and goes inside the commit."""

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        create_pr: bool = False,
        private: bool = False,
        keep: bool = True,
        token: str | None = None,
    ):
        token = token or get_token()
        if not token:
            raise HubAuthError(
                "pushing needs a Hub token with write access: set HF_TOKEN, run `hf auth login`, "
                "pass --token, or use trusted publishing (HF_OIDC_RESOURCE) in CI"
            )
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
                _retry(
                    lambda: self.api.preupload_lfs_files(
                        self.repo_id, additions=[op], revision=self.branch, create_pr=self.create_pr
                    )
                )
            except RuntimeError as e:
                cause = _upload_error(e)
                if cause is None:
                    raise
                raise cause from None
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
