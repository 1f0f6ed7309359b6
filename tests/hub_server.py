"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only).

It implements the part of the Hub API that the official `huggingface_hub` client calls to
read model info, list files, download files (HEAD, ETag, X-Repo-Commit, Range), read
safetensors headers, create repos, upload to LFS storage (preupload answers `uploadMode: lfs`
for *.safetensors and *.bin, or `regular` for every file with `regular_uploads`; the git-lfs
batch API, a PUT per object), commit (NDJSON: `file`, `lfsFile`, `deletedFile`), open pull
requests, and create branches and tags. Repos are in memory: each commit is a full snapshot
{path: bytes} with a 40-hex sha; branches, tags and `refs/pr/N` point at commits.

For tests it adds: private and gated repos that need a Bearer token, fault injection
(`fail(...)`: errors, with headers such as Retry-After, dropped or cut connections, corrupted
bytes, range answers that are empty, endless or trickled, after N good answers), a
request log without credentials (`log`, `downloads()`; each entry has its byte range and the
bytes sent), LFS sha256s in file listings (`lfs.oid`), batch answers that send the upload or
verify step to another host (`lfs_upload_href`, `lfs_verify_href`), and an optional bandwidth
limit with latency (`limit_bandwidth`: one link each way that all connections share) for
benchmarks; each logged request has the times it began and ended.

    server = HubServer(port=0).start()
    server.add_token("hf_test", "alice")
    server.seed("org/model", folder)            # one commit on main from a local folder
    ...
    server.stop()
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

EMPTY_SHA = "0" * 40
DROP = 0  # Fault.status: close the connection without an answer (a network error)
CUT = -1  # Fault.status: answer, but close the connection halfway through the body
CORRUPT = -2  # Fault.status: answer, with one byte of the body changed
# Range answers that misbehave (a download's `206` made wrong on purpose; see `_Handler._range_fault`):
EMPTY = -3  # Fault.status: `206` with the range's Content-Range but `Content-Length: 0` and no body
OVERLONG = -4  # Fault.status: `206` with the right bytes, then zeros without end (`Content-Length: 10**15`)
TRICKLE = -5  # Fault.status: `206` with the right headers, the body one byte every `Fault.interval` seconds
SHIFTED = -6  # Fault.status: `206` for the range asked less its first byte (said so in Content-Range)
RANGE_FAULTS = (EMPTY, OVERLONG, TRICKLE, SHIFTED)
BODY_FAULTS = (CUT, CORRUPT, *RANGE_FAULTS)  # the request is answered, its answer spoiled
LFS_POINTER_SIZE = 134  # bytes of a git-lfs pointer file (what the Hub lists as pointerSize)
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


@functools.lru_cache(maxsize=1024)  # every answer names its file's oid: hash each content once
def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.lru_cache(maxsize=1024)
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_lfs(path: str) -> bool:
    """Whether the repo's .gitattributes (GITATTRIBUTES) keeps the file in LFS."""
    return path.endswith((".safetensors", ".bin"))


def lfs_info(path: str, data: bytes, key: str = "oid") -> dict[str, Any]:
    """The `lfs` entry the Hub lists for a file kept in LFS: the content's sha256 is `oid` in
    tree and paths-info entries, `sha256` in model info siblings."""
    return {"lfs": {key: sha256(data), "size": len(data), "pointerSize": LFS_POINTER_SIZE}} if is_lfs(path) else {}


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool = False
    gated: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: list[str] = field(default_factory=list)  # refs/pr/N -> prs[N - 1]

    def resolve(self, rev: str) -> str | None:
        """Commit sha for a branch, tag, `refs/pr/N`, `refs/heads/x`, `refs/tags/x` or a sha."""
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if m := re.fullmatch(r"refs/pr/(\d+)", rev):
            n = int(m[1])
            return self.prs[n - 1] if 0 < n <= len(self.prs) else None
        if rev.startswith("refs/heads/"):
            return self.branches.get(rev[len("refs/heads/") :])
        if rev.startswith("refs/tags/"):
            return self.tags.get(rev[len("refs/tags/") :])
        return rev if rev in self.commits else None


@dataclass
class Fault:
    """Answer `status` to requests matching `method` and the path regex, `times` times.

    `after=True` runs the request first (its changes stick) and then answers the error, like
    a response lost on the way back; otherwise the request body is read and nothing changes.
    `status=DROP` closes the connection instead of answering, `status=CUT` halfway through
    the answer's body (a download interrupted by the network), `status=CORRUPT` changes a
    byte of the answer's body; EMPTY, OVERLONG and TRICKLE spoil a range answer (see their
    comments). `headers` are added to an error answer (e.g. `Retry-After`). `skip` matching
    requests are answered normally first."""

    method: str
    path: re.Pattern
    status: int | None  # None: do not fail, only run `action`
    times: int
    after: bool = False
    action: Callable[[], None] | None = None  # run first, e.g. someone else's commit
    skip: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    interval: float = 5.0  # TRICKLE: seconds between bytes


@dataclass
class Request:
    method: str
    path: str  # unquoted, without the query
    query: dict[str, list[str]]
    range: str | None
    authenticated: bool
    status: int = 0
    sent: int = 0  # body bytes written to the client
    received: int = 0  # body bytes read from the client
    began: float = 0.0  # time.monotonic() when the request's headers arrived (one clock for all processes)
    ended: float = 0.0  # when its answer's last byte was written (0: not answered yet)

    @property
    def byte_range(self) -> tuple[int, int] | None:
        """(first, last) byte of a `Range: bytes=a-b` request (served in full)."""
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", (self.range or "").strip())
        return (int(m[1]), int(m[2])) if m else None


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubServer:
    """The Hub's state plus a ThreadingHTTPServer that serves it on 127.0.0.1."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1"):
        self.host, self.port = host, port
        self.lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._counter = itertools.count(1)
        self._pace_lock = threading.Lock()
        self.reset()

    # --- life cycle ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        ThreadingHTTPServer.allow_reuse_address = True
        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def reset(self) -> None:
        """Forget all repos, tokens, faults and logged requests."""
        with self.lock:
            self.repos: dict[str, Repo] = {}
            self.lfs_objects: dict[str, bytes] = {}  # LFS storage: sha256 -> content (uploaded or committed)
            self.tokens: dict[str, str] = {}
            self.faults: list[Fault] = []
            self.log: list[Request] = []
            self.bandwidth: float | None = None  # bytes/s each way, shared by all connections
            self.burst = 0.0  # bytes a link idle long enough may send at once (the token bucket's depth)
            self.latency = 0.0  # seconds before each answer (a far-away server's time to first byte)
            self._link_free_at = {"down": 0.0, "up": 0.0}  # when each direction of the link is free
            # Like a mirror or proxy: preupload answers `uploadMode: regular` for every file, so
            # shards travel inside the commit (base64) instead of LFS storage.
            self.regular_uploads = False
            # A hostile Hub: the LFS batch answer names these URLs (an `{oid}` in them is
            # filled in) for the upload and the verify step instead of its own storage.
            self.lfs_upload_href: str | None = None
            self.lfs_verify_href: str | None = None

    # --- test helpers -------------------------------------------------------------------
    def add_token(self, token: str, user: str) -> None:
        self.tokens[token] = user

    def fail(
        self,
        method: str,
        path_regex: str,
        *,
        status: int = 500,
        times: int = 1,
        after: bool = False,
        skip: int = 0,
        headers: dict[str, str] | None = None,
        interval: float = 5.0,
    ) -> None:
        """Inject a failure, e.g. `fail("POST", r"/commit/", status=500)`; with `skip=N` the
        first N matching requests are answered normally; `headers` go with an error answer
        (`{"Retry-After": "100000"}`); `interval` paces a TRICKLE."""
        with self.lock:
            self.faults.append(
                Fault(
                    method,
                    re.compile(path_regex),
                    status,
                    times,
                    after,
                    skip=skip,
                    headers=dict(headers or {}),
                    interval=interval,
                )
            )

    def limit_bandwidth(self, bytes_per_second: float | None, latency: float = 0.0, burst: float = 0.0) -> None:
        """Pace request and answer bodies to this rate, each way (None: as fast as possible),
        and wait `latency` seconds before each answer. Each way is one link that every
        connection shares: a token bucket filled at `bytes_per_second`, `burst` bytes deep
        (0: the link never sends faster than its rate, not even after a pause)."""
        self.bandwidth, self.latency, self.burst = bytes_per_second, latency, burst

    def pace(self, n: int, way: str) -> None:
        """Wait until `n` more bytes fit through the link `way` ("down" to clients, "up" from
        them), shared by all connections (a no-op without a limit). `_link_free_at` is when the
        bytes let through so far are paid for at the rate; a link idle for a while has up to
        `burst` bytes paid in advance, so that a thread which wakes late (a busy CPU) does not
        waste the link's time."""
        if not self.bandwidth or n <= 0:
            return
        with self._pace_lock:
            now = time.monotonic()
            full = now - self.burst / self.bandwidth  # the clock of a bucket that is full now
            self._link_free_at[way] = max(self._link_free_at[way], full) + n / self.bandwidth
            wait = self._link_free_at[way] - now
        if wait > 0:
            time.sleep(wait)

    def before(
        self, method: str, path_regex: str, action: Callable[[], None], *, times: int = 1, skip: int = 0
    ) -> None:
        """Run `action` (under the lock) before handling the next matching request(s), after
        `skip` of them."""
        with self.lock:
            self.faults.append(Fault(method, re.compile(path_regex), None, times, action=action, skip=skip))

    def create_repo(self, repo_id: str, *, private: bool = False, gated: bool = False) -> Repo:
        """Create a repo with an initial commit on main (like the Hub: one `.gitattributes`)."""
        with self.lock:
            if repo_id in self.repos:
                raise HttpError(409, f"You already created this model repo: {repo_id}")
            repo = Repo(repo_id, owner=repo_id.split("/")[0], private=private, gated=gated)
            self.repos[repo_id] = repo
            repo.branches["main"] = self._commit(repo, None, "initial commit", "", {".gitattributes": GITATTRIBUTES})
            return repo

    def commit_files(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        branch: str = "main",
        message: str = "Upload files",
        deletions: tuple[str, ...] = (),
    ) -> str:
        """Commit files straight into a branch (creating the repo if needed); returns the sha."""
        with self.lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id)
            parent = repo.branches.get(branch) or repo.branches["main"]
            snapshot = {p: d for p, d in repo.commits[parent].files.items() if p not in deletions}
            snapshot.update(files)
            repo.branches[branch] = self._commit(repo, parent, message, "", snapshot)
            return repo.branches[branch]

    def seed(
        self,
        repo_id: str,
        folder: Path | str,
        *,
        branch: str = "main",
        private: bool = False,
        gated: bool = False,
        message: str = "Add model",
    ) -> str:
        """Create (or update) a repo from a local folder's files; returns the new commit sha."""
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        with self.lock:
            if repo_id not in self.repos:
                self.create_repo(repo_id, private=private, gated=gated)
            return self.commit_files(repo_id, files, branch=branch, message=message)

    def tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        with self.lock:
            repo = self.repos[repo_id]
            repo.tags[tag] = repo.resolve(revision)
            return repo.tags[tag]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision (a copy)."""
        with self.lock:
            repo = self.repos[repo_id]
            return dict(repo.commits[repo.resolve(revision)].files)

    def downloads(self, suffix: str = ".safetensors") -> list[str]:
        """Paths of files downloaded (GET on resolve/), not counting reads of a safetensors
        header (the client's `Range: bytes=0-100000`, then `bytes=8-N` for big headers)."""
        header_read = re.compile(r"bytes=(0-100000|8-\d+)$")
        return [
            r.path
            for r in self.log
            if r.method == "GET"
            and "/resolve/" in r.path
            and r.path.endswith(suffix)
            and r.status < 400
            and not (r.range and header_read.match(r.range))
        ]

    # --- internals ----------------------------------------------------------------------
    def _commit(self, repo: Repo, parent: str | None, title: str, description: str, files: dict[str, bytes]) -> str:
        seed = f"{repo.repo_id}\n{parent}\n{title}\n{next(self._counter)}\n"
        seed += "\n".join(f"{p} {git_blob_sha1(d)}" for p, d in sorted(files.items()))
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, title, description, files)
        return oid


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the Hub's endpoints; everything runs under the server's lock."""

    hub: HubServer
    protocol_version = "HTTP/1.1"

    ROUTES: list[tuple[str, str, str]] = [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "repo_create"),
        ("DELETE", r"/api/repos/delete", "repo_delete"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", "model_info"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/refs", "refs"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<name>[^/]+)", "branch_create"),
        ("DELETE", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<name>[^/]+)", "branch_delete"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/tag/(?P<rev>[^/]+)", "tag_create"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # --- plumbing -----------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        began = time.monotonic()
        split = urlsplit(self.path)
        # Match on the raw path so that a quoted revision like `refs%2Fpr%2F1` stays one segment.
        raw_path, query = split.path, parse_qs(split.query)
        body = self._read_body()
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        record = Request(
            method,
            unquote(raw_path),
            query,
            self.headers.get("Range"),
            token is not None,
            received=len(body),
            began=began,
        )
        hub = self.hub
        with hub.lock:
            hub.log.append(record)
            fault = next(
                (f for f in hub.faults if f.times > 0 and f.method == method and f.path.search(record.path)), None
            )
            if fault and fault.skip > 0:
                fault.skip -= 1
                fault = None
            if fault:
                fault.times -= 1
                if fault.action:
                    fault.action()
                if fault.status is None:
                    fault = None
        if fault and not fault.after and fault.status not in BODY_FAULTS:  # fail without changing anything
            if fault.status == DROP:
                self.close_connection = True
                return
            answer = self._error(HttpError(fault.status, "Injected failure", headers=fault.headers))
        else:
            answer = self._route(method, raw_path, query, body, token)
            if fault and fault.status == DROP:  # applied, then the connection drops
                self.close_connection = True
                return
            if fault and fault.status not in BODY_FAULTS:
                answer = self._error(
                    HttpError(fault.status, "Injected failure after the request was applied", headers=fault.headers)
                )
            if fault and fault.status == CORRUPT and answer[2]:
                body = bytearray(answer[2])
                body[-1] ^= 0xFF
                answer = (answer[0], answer[1], bytes(body))
            if fault and fault.status in RANGE_FAULTS and answer[0] == 206:
                answer = self._range_fault(fault, *answer)
        record.status = answer[0]
        if hub.latency:
            time.sleep(hub.latency)
        record.sent = self._send(method, *answer, cut=bool(fault and fault.status == CUT))
        record.ended = time.monotonic()

    def _route(self, method: str, raw_path: str, query: dict, body: bytes, token: str | None) -> tuple[int, dict, Any]:
        route_method = "GET" if method == "HEAD" else method
        try:
            for m, pattern, name in self.ROUTES:
                match = re.fullmatch(pattern, raw_path)
                if m == route_method and match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with self.hub.lock:
                        user = self.hub.tokens.get(token) if token else None
                        if token and user is None:
                            raise HttpError(401, "Invalid credentials in Authorization header")
                        return getattr(self, "h_" + name)(user=user, query=query, body=body, **args)
            raise HttpError(404, f"Not found: {method} {unquote(raw_path)}")
        except HttpError as e:
            return self._error(e)

    @staticmethod
    def _error(e: HttpError) -> tuple[int, dict, Any]:
        headers = {**e.headers, "X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        return e.status, headers, json.dumps({"error": e.message}).encode()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        self.hub.pace(length, "up")
        return self.rfile.read(length) if length else b""

    @staticmethod
    def _range_fault(fault: Fault, status: int, headers: dict, payload: bytes) -> tuple[int, dict, Any]:
        """A `206` answer spoiled as `fault.status` says; the body may be an iterator of chunks
        (`_send` writes them as they come, until the client goes away)."""
        if fault.status == EMPTY:
            return status, {**headers, "Content-Length": "0"}, b""
        if fault.status == SHIFTED:
            first, rest = headers["Content-Range"].removeprefix("bytes ").split("-", 1)
            return status, {**headers, "Content-Range": f"bytes {int(first) + 1}-{rest}"}, payload[1:]
        if fault.status == OVERLONG:

            def zeros_without_end():
                yield payload
                while True:
                    yield bytes(64 * 1024)

            return status, {**headers, "Content-Length": str(10**15)}, zeros_without_end()

        def trickle():
            for i in range(len(payload)):
                if i:
                    time.sleep(fault.interval)
                yield payload[i : i + 1]

        return status, {**headers, "Content-Length": str(len(payload))}, trickle()

    def _send(self, method: str, status: int, headers: dict, payload: Any, cut: bool = False) -> int:
        """Answer; returns the body bytes written (paced by the bandwidth limit). A payload that
        is an iterator of byte chunks is written chunk by chunk (headers give its length)."""
        if hasattr(payload, "__next__"):
            return self._send_chunks(method, status, headers, payload)
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
            headers.setdefault("Content-Type", "application/json")
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        body = b"" if method == "HEAD" else payload[: len(payload) // 2] if cut else payload
        step = 256 * 1024
        try:
            for i in range(0, len(body), step):
                self.hub.pace(min(step, len(body) - i), "down")
                self.wfile.write(body[i : i + step])
        except (BrokenPipeError, ConnectionResetError):  # the client went away (e.g. a merge that failed)
            self.close_connection = True
            return 0
        if cut:
            self.close_connection = True
        return len(body)

    def _send_chunks(self, method: str, status: int, headers: dict, chunks: Any) -> int:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.end_headers()
        sent = 0
        try:
            for chunk in [] if method == "HEAD" else chunks:
                self.wfile.write(chunk)
                self.wfile.flush()
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True
        return sent

    # --- access -------------------------------------------------------------------------
    def _repo(self, repo_id: str, user: str | None, *, write: bool = False, files: bool = False) -> Repo:
        """The repo if `user` may read it (and write it); errors like the Hub's otherwise."""
        repo = self.hub.repos.get(repo_id)
        # Like the Hub: a private repo answers 401 RepoNotFound without a token (any valid token
        # reads it here: this server has no organisations or permissions).
        if repo is None or (repo.private and user is None):
            raise HttpError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if repo.gated and files and user is None:
            raise HttpError(
                401,
                f"Access to model {repo_id} is restricted. You must have access to it "
                "and be authenticated to access it.",
                "GatedRepo",
            )
        if write and user is None:
            raise HttpError(401, "You must be authenticated to write to this repo")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        sha = repo.resolve(rev)
        if sha is None:
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    @staticmethod
    def _file_entry(path: str, data: bytes) -> dict:
        return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data), **lfs_info(path, data)}

    # --- endpoints ----------------------------------------------------------------------
    def h_whoami(self, user, **_):
        if user is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        return 200, {}, {"type": "user", "name": user, "orgs": [], "auth": {"type": "access_token"}}

    def h_repo_create(self, user, body, **_):
        data = json.loads(body or b"{}")
        if user is None:
            raise HttpError(401, "You must be authenticated to create a repo")
        repo_id = f"{data.get('organization') or user}/{data['name']}"
        private = data.get("private") or data.get("visibility") == "private"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:  # the Hub's 409 names the existing repo's url
            message = f"You already created this model repo: {repo_id}"
            return 409, {"X-Error-Message": message}, {"error": message, "url": url}
        self.hub.create_repo(repo_id, private=bool(private))
        return 200, {}, {"url": url, "name": repo_id}

    def h_repo_delete(self, user, body, **_):
        data = json.loads(body or b"{}")
        repo_id = f"{data.get('organization') or user}/{data['name']}"
        self._repo(repo_id, user, write=True)
        del self.hub.repos[repo_id]
        return 200, {}, {}

    def h_validate_yaml(self, body, **_):
        content = json.loads(body or b"{}").get("content", "")
        errors = []
        m = re.match(r"^---\n(.*?)\n---", content, re.S)
        meta: Any = {}
        if m:
            try:
                meta = yaml.safe_load(m[1]) or {}
            except yaml.YAMLError as e:
                errors.append(f"YAML could not be parsed: {e}")
        if not errors and not isinstance(meta, dict):
            errors.append("YAML metadata must be a mapping")
        elif not errors:
            lang = meta.get("language")
            if lang is not None and not (
                isinstance(lang, list) and all(isinstance(x, str) for x in lang) or isinstance(lang, str)
            ):
                errors.append('"language" must be a string or an array of strings')
            if "license" in meta and not isinstance(meta["license"], str):
                errors.append('"license" must be a string')
            if json.loads(body or b"{}").get("repoType", "model") == "model":
                # the Hub's rules for the keys model cards carry (language codes, license ids,
                # base_model, model-index, ...), as lrmerge checks them offline
                from lrmerge_hub.metadata import check_metadata

                errors += [p for p in check_metadata(meta) if p not in errors]
        if errors:
            return 400, {}, {"errors": [{"message": e} for e in errors], "warnings": []}
        warnings = [] if m else [{"message": "empty or missing yaml metadata in repo card"}]
        return 200, {}, {"errors": [], "warnings": warnings}

    def h_model_info(self, user, repo, query, rev="main", **_):
        r = self._repo(repo, user)
        commit = self._commit_at(r, rev)
        siblings = []
        for path, data in sorted(commit.files.items()):
            sib: dict[str, Any] = {"rfilename": path}
            if query.get("blobs"):
                sib.update(size=len(data), blobId=git_blob_sha1(data), **lfs_info(path, data, "sha256"))
            siblings.append(sib)
        return (
            200,
            {},
            {
                "_id": r.repo_id,
                "id": r.repo_id,
                "modelId": r.repo_id,
                "author": r.owner,
                "sha": commit.oid,
                "private": r.private,
                "gated": "auto" if r.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
                "lastModified": "2026-11-25T00:00:00.000Z",
            },
        )

    def h_tree(self, user, repo, rev, query, path="", **_):
        commit = self._commit_at(self._repo(repo, user), rev)
        prefix = path.strip("/") + "/" if path else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for p, data in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append(self._file_entry(p, data))
        if path and not entries and not folders:
            raise HttpError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        entries += [{"type": "directory", "path": f, "oid": EMPTY_SHA, "size": 0} for f in sorted(folders)]
        return 200, {}, entries

    def h_paths_info(self, user, repo, rev, body, **_):
        commit = self._commit_at(self._repo(repo, user), rev)
        form = parse_qs(body.decode())
        out = []
        for p in form.get("paths", []):
            if p in commit.files:
                out.append(self._file_entry(p, commit.files[p]))
            elif any(f.startswith(p.rstrip("/") + "/") for f in commit.files):
                out.append({"type": "directory", "path": p, "oid": EMPTY_SHA, "size": 0})
        return 200, {}, out

    def h_refs(self, user, repo, **_):
        r = self._repo(repo, user)
        ref = lambda name, kind, sha: {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}  # noqa: E731
        return (
            200,
            {},
            {
                "branches": [ref(n, "heads", s) for n, s in sorted(r.branches.items())],
                "tags": [ref(n, "tags", s) for n, s in sorted(r.tags.items())],
                "converts": [],
                "pullRequests": [
                    {"name": str(i + 1), "ref": f"refs/pr/{i + 1}", "targetCommit": s} for i, s in enumerate(r.prs)
                ],
            },
        )

    def h_branch_create(self, user, repo, name, body, **_):
        r = self._repo(repo, user, write=True)
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        if name in r.branches:
            raise HttpError(409, f"Reference refs/heads/{name} already exists")
        r.branches[name] = self._commit_at(r, start).oid
        return 200, {}, {}

    def h_branch_delete(self, user, repo, name, **_):
        r = self._repo(repo, user, write=True)
        if r.branches.pop(name, None) is None:
            raise HttpError(404, f"Invalid rev id: {name}", "RevisionNotFound")
        return 200, {}, {}

    def h_tag_create(self, user, repo, rev, body, **_):
        r = self._repo(repo, user, write=True)
        tag = json.loads(body or b"{}")["tag"]
        if tag in r.tags:
            raise HttpError(409, f"Tag {tag} already exists")
        r.tags[tag] = self._commit_at(r, rev).oid
        return 200, {}, {}

    def h_preupload(self, user, repo, rev, body, query, **_):
        r = self._repo(repo, user, write=not query.get("create_pr"))
        commit = self._commit_at(r, rev)
        files = json.loads(body)["files"]

        # Like the Hub: files .gitattributes puts in LFS go to LFS storage first (their oid is
        # the sha256), the others travel inside the commit (their oid is the git blob sha1).
        def in_lfs(path: str) -> bool:
            return is_lfs(path) and not self.hub.regular_uploads

        def oid(path: str) -> str | None:
            data = commit.files.get(path)
            return None if data is None else sha256(data) if in_lfs(path) else git_blob_sha1(data)

        return (
            200,
            {},
            {
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if in_lfs(f["path"]) else "regular",
                        "shouldIgnore": False,
                        "oid": oid(f["path"]),
                    }
                    for f in files
                ]
            },
        )

    def h_lfs_batch(self, user, repo, body, **_):
        """The git-lfs batch API: where to PUT each object the storage does not hold yet."""
        self._repo(repo, user, write=True)
        objects = []
        for o in json.loads(body)["objects"]:
            entry = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.hub.lfs_objects:  # no actions: already stored, nothing to upload
                upload = self.hub.lfs_upload_href or f"{self.hub.url}/lfs-storage/{{oid}}"
                entry["actions"] = {"upload": {"href": upload.format(oid=o["oid"])}}
                if self.hub.lfs_verify_href:
                    entry["actions"]["verify"] = {"href": self.hub.lfs_verify_href.format(oid=o["oid"])}
            objects.append(entry)
        return 200, {}, {"transfer": "basic", "objects": objects}

    def h_lfs_put(self, oid, body, **_):
        """LFS storage (a signed URL on the Hub: no token): keeps the object if it hashes to its oid."""
        if sha256(body) != oid:
            raise HttpError(400, "Content does not match its sha256")
        self.hub.lfs_objects[oid] = body
        return 200, {}, {}

    def h_commit(self, user, repo, rev, body, query, **_):
        r = self._repo(repo, user, write=True)
        head = self._commit_at(r, rev)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "The first line must be the commit header")
        header = lines[0]["value"]
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != head.oid:
            raise HttpError(
                412,
                f"A commit has happened since. Please refresh and try again. "
                f"(expected parent {parent_commit}, head is {head.oid})",
            )
        base = r.commits[parent_commit] if parent_commit else head
        files = dict(base.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    raise HttpError(400, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                files[value["path"]] = self.hub.lfs_objects[value["oid"]]
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HttpError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HttpError(400, f"Unsupported commit operation {key!r}")
        oid = self.hub._commit(r, base.oid, header.get("summary", ""), header.get("description", ""), files)
        pr_url = None
        if query.get("create_pr"):
            r.prs.append(oid)
            pr_url = f"{self.hub.url}/{r.repo_id}/discussions/{len(r.prs)}"
        elif rev in r.branches or rev.startswith("refs/heads/"):
            r.branches[rev.removeprefix("refs/heads/")] = oid
        elif m := re.fullmatch(r"refs/pr/(\d+)", rev):
            r.prs[int(m[1]) - 1] = oid
        else:
            raise HttpError(400, f"Cannot commit to {rev}: not a branch")
        return (
            200,
            {},
            {
                "commitUrl": f"{self.hub.url}/{r.repo_id}/commit/{oid}",
                "commitOid": oid,
                "commitMessage": header.get("summary", ""),
                "pullRequestUrl": pr_url,
                "success": True,
            },
        )

    def h_resolve(self, user, repo, rev, path, **_):
        r = self._repo(repo, user, files=True)
        commit = self._commit_at(r, rev)
        base_headers = {"X-Repo-Commit": commit.oid}
        if path not in commit.files:
            raise HttpError(404, "Entry not found", "EntryNotFound", base_headers)
        data = commit.files[path]
        headers = {
            **base_headers,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        rng = self.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
            start = int(m[1])
            end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            if start >= len(data):
                raise HttpError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, headers, data[start : end + 1]
        return 200, headers, data
