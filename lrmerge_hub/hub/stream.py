"""A Hub model's tensors read with HTTP range requests at a pinned commit, never written to disk.

`HubModel` is the merge loop's TensorSource (merge/st_io.py) for a Hub model that is not in
the HF cache. Requests go through the official client: its shared session (`get_session`,
via `http_stream_backoff`), its auth headers (`build_hf_headers`), its endpoint
(`hf_hub_url`: HF_ENDPOINT) and its errors (`hf_raise_for_status`, turned into one-line
errors by `hub.hub_errors`).

Bounds: the retries of 429 and 5xx answers are ours, not the client's backoff, because its
waits cannot be bounded or interrupted (it sleeps whatever `Retry-After` says: 100000 s is
obeyed). Every range request, retries and resumes included, ends within a deadline
(`settings.hub_range_deadline`); a `Retry-After` longer than `settings.hub_max_wait` fails at
once; waits end as soon as the model is closed. An answer must be the range asked for
(its `Content-Range`), never longer; a few answers in a row without a byte fail the read.
The requests run on daemon threads that `close()` never waits for, so a stop signal's
cleanup and the process's exit are not held by a request stalled on the network.

Reads: the loop announces the order it reads tensors in; tensors that lie next to each other
in a shard and are read one after the other are fetched as one block, up to
`request_bytes`; a bigger tensor is fetched in parts of `request_bytes`, several at a time.
Blocks are fetched ahead, up to `read_ahead` bytes held, by `workers` threads. A connection
that breaks in the middle of a range is resumed from the byte where it stopped.

Integrity: the blocks and the header reads cover every byte of every shard exactly once (a
block also holds the padding after its tensors, and the tensors nobody reads), so each
shard is hashed as its bytes arrive and checked against the sha256 the Hub lists for it
(its LFS oid; the git blob sha1 for a file not in LFS). A mismatch stops the merge before
anything is written in place of the output.
"""

from __future__ import annotations

import hashlib
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import httpx2
import numpy as np
from huggingface_hub import HfApi, RepoFile, hf_hub_url
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

from .. import settings
from ..errors import HubError, HubIntegrityError, HubOfflineError, InputModelError, shown
from . import hosts
from .retries import note_retry
from ..merge.st_io import NUMPY_DTYPES, StoredTensor, TensorSource, header_length, header_tensors

hosts.install()  # before any request: the client's answers are checked for other hosts

RESUMES = 5  # a range whose connection breaks more often than this fails the merge
RETRIES = 5  # answers 408, 429 or 5xx to one range before it fails (the client's max_retries)
RETRY_STATUS = (408, 429, 500, 502, 503, 504)  # the client's backoff retries these
EMPTY_ANSWERS = 3  # answers in a row without a byte before a range fails
MAX_BACKOFF = 8.0  # seconds: the longest wait between tries without a Retry-After (the client's)


@dataclass(frozen=True)
class RemoteShard:
    name: str  # path in the repo
    size: int
    sha256: str | None  # the LFS oid, or None for a file kept in git
    blob_id: str  # git blob sha1 (checked when there is no LFS oid)


class ShardHash:
    """The hash of one shard whose byte ranges arrive in any order: a range is hashed as soon
    as every byte before it has been; one that arrives early waits (its bytes are held)."""

    def __init__(self, shard: RemoteShard):
        self.shard = shard
        self.hash = hashlib.sha256() if shard.sha256 else hashlib.sha1(b"blob %d\0" % shard.size)
        self.hashed = 0  # bytes hashed, from the start of the file
        self.waiting: dict[int, memoryview] = {}
        self.lock = threading.Lock()

    def add(self, offset: int, data: memoryview) -> bool:
        """Hash what can be hashed; True once the whole shard has been."""
        with self.lock:
            self.waiting[offset] = data
            while self.hashed in self.waiting:
                chunk = self.waiting.pop(self.hashed)
                self.hash.update(chunk)
                self.hashed += len(chunk)
            return self.hashed == self.shard.size

    @property
    def waiting_bytes(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.waiting.values())

    def check(self, label: str) -> None:
        """Raise unless every byte was hashed and the hash is the one the Hub lists."""
        expected = self.shard.sha256 or self.shard.blob_id
        if self.hashed != self.shard.size:
            raise HubIntegrityError(
                f"{label}: only {self.hashed} of {self.shard.size} bytes of {self.shard.name} were read; run again"
            )
        got = self.hash.hexdigest()
        if got != expected:
            raise HubIntegrityError(
                f"{label}: {self.shard.name} does not match the {'sha256' if self.shard.sha256 else 'git sha1'} the "
                f"Hub lists for it (got {got[:12]}, listed {expected[:12]}): the bytes were corrupted on the way; "
                "nothing was written or pushed, run again (or use --download)"
            )


@dataclass
class Block:
    """A contiguous byte range of one shard, fetched into one buffer."""

    shard: RemoteShard
    start: int
    end: int
    names: list[str]
    buffer: bytearray | None = None
    parts: list[Future] = field(default_factory=list)
    unreleased: int = 0
    index: int = 0  # position in the read order

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_blocks(
    order: list[str],
    tensors: dict[str, StoredTensor],
    shards: dict[str, RemoteShard],
    data_start: dict[str, int],
    request_bytes: int,
) -> list[Block]:
    """The blocks to fetch, in the order they are needed, covering every byte after the
    headers once. Each read tensor owns the bytes from its start to the next read tensor of
    its shard (padding, tensors nobody reads); the first one also those after the header.
    Neighbours read one after the other share a block up to `request_bytes`."""
    read = set(order)
    owned: dict[str, tuple[int, int]] = {}
    for shard in shards.values():
        mine = sorted((tensors[n].start, n) for n in read if tensors[n].file.as_posix() == shard.name)
        for i, (start, name) in enumerate(mine):
            end = mine[i + 1][0] if i + 1 < len(mine) else shard.size
            owned[name] = (data_start[shard.name] if i == 0 else start, end)
    blocks: list[Block] = []
    for name in order:
        shard, (lo, hi) = shards[tensors[name].file.as_posix()], owned[name]
        last = blocks[-1] if blocks else None
        if last and last.shard is shard and last.end == lo and hi - last.start <= request_bytes:
            last.end = hi
            last.names.append(name)
        else:
            blocks.append(Block(shard, lo, hi, [name]))
    for shard in shards.values():  # a shard none of whose tensors is read is still checked
        if not any(tensors[n].file.as_posix() == shard.name for n in read) and shard.size > data_start[shard.name]:
            blocks.append(Block(shard, data_start[shard.name], shard.size, []))
    return blocks


class DaemonPool:
    """Worker threads for range requests. Unlike ThreadPoolExecutor's, which the interpreter
    joins at exit, these are daemon threads, and `shutdown` does not wait for them: a request
    stalled on the network holds neither a stop signal's cleanup nor the process's exit."""

    def __init__(self, workers: int, name: str):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable, *args: object) -> Future:
        future: Future = Future()
        self._tasks.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)

    def shutdown(self) -> None:
        """Cancel what has not started; each thread ends after its current task."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)


class HubModel(TensorSource):
    """A Hub model at a pinned commit: config and tokenizer from `folder` (downloaded, small),
    tensors read with range requests."""

    def __init__(
        self,
        label: str,
        *,
        repo_id: str,
        revision: str,
        folder: Path,
        token: str | None,
        read_ahead: int,
        request_bytes: int,
        workers: int,
    ):
        self.label, self.repo_id, self.revision, self.folder = label, repo_id, revision, Path(folder)
        self.read_ahead, self.request_bytes = read_ahead, request_bytes
        self.config = self._read_json("config.json", required=True)
        self.headers = build_hf_headers(token=token)
        self.deadline, self.max_wait = settings.hub_range_deadline(), settings.hub_max_wait()
        self.retry_wait = settings.hub_retry_wait()
        self._count_lock = threading.Lock()
        self._closed = threading.Event()  # set by close(): waits end, workers stop
        self._pool = DaemonPool(workers, f"lrmerge-range-{label[:16]}")
        self._blocks: list[Block] = []
        self._block_of: dict[str, Block] = {}
        self._submitted = 0  # blocks handed to the pool, in order
        self._held = 0  # bytes of submitted blocks not yet released
        from .errors import hub_errors

        try:
            with hub_errors(label):
                self.shards = self._list_shards(token)
                self._hashes = {name: ShardHash(s) for name, s in self.shards.items()}
                self.tensors, self._data_start = self._read_headers()
        except BaseException:
            self.close()
            raise

    # --- opening ------------------------------------------------------------------------
    def _list_shards(self, token: str | None) -> dict[str, RemoteShard]:
        """The weight files at the pinned commit, with the sizes and hashes the Hub lists."""
        index = self._read_json("model.safetensors.index.json")
        listed = {
            f.path: f
            for f in HfApi(token=token).list_repo_tree(self.repo_id, revision=self.revision)
            if isinstance(f, RepoFile)
        }
        names = (
            sorted(set(index.get("weight_map", {}).values()))
            if index
            else sorted(p for p in listed if p.endswith(".safetensors"))
        )
        missing = [n for n in names if n not in listed]
        if not names or missing:
            raise InputModelError(
                f"{self.label}: shard {missing[0] if missing else 'model.safetensors'} is not in "
                f"the repo at {self.revision[:12]}"
            )
        return {
            n: RemoteShard(n, listed[n].size, lfs.sha256 if (lfs := listed[n].lfs) else None, listed[n].blob_id)
            for n in names
        }

    def _read_headers(self) -> tuple[dict[str, StoredTensor], dict[str, int]]:
        """Every shard's header, read (and hashed) as the first bytes of the shard."""
        tensors: dict[str, StoredTensor] = {}
        data_start = {}
        for shard in self.shards.values():
            where = Path(self.repo_id) / shard.name  # errors name the shard and the repo
            if shard.size < 8:
                raise InputModelError(f"{shard.name}: not a safetensors file (too short) in {self.repo_id}")
            head = self._read(shard, 0, 8)
            n = header_length(bytes(head), shard.size, where)
            found, _ = header_tensors(bytes(self._read(shard, 8, 8 + n)), shard.size, where)
            data_start[shard.name] = 8 + n
            for name, st in found.items():
                if name in tensors:
                    raise InputModelError(f"{self.label}: tensor {name} appears in two shards")
                tensors[name] = replace(st, file=Path(shard.name))  # a shard may sit in a subfolder
        return tensors, data_start

    def _read(self, shard: RemoteShard, start: int, end: int) -> bytearray:
        buffer = bytearray(end - start)
        self._fetch(shard, start, memoryview(buffer))
        return buffer

    # --- fetching -----------------------------------------------------------------------
    def _fetch(self, shard: RemoteShard, start: int, view: memoryview) -> None:
        """Fill `view` with the shard's bytes from `start`, then hash them. A broken connection
        is resumed from the byte where it stopped; 408, 429 and 5xx answers are retried;
        everything within the deadline. 401/403/404 and gated repos raise the client's
        errors (hub_errors turns them into one line), as do answers still failing after
        RETRIES tries."""
        url = hf_hub_url(self.repo_id, shard.name, revision=self.revision)
        deadline = time.monotonic() + self.deadline
        got = resumes = retries = empty = 0
        while got < len(view):
            first, last = start + got, start + len(view) - 1
            wait = 0.0
            try:
                with http_stream_backoff(
                    "GET",
                    url,
                    headers={**self.headers, "Range": f"bytes={first}-{last}"},
                    timeout=min(hf_constants.HF_HUB_DOWNLOAD_TIMEOUT, self._time_left(deadline, shard, first, last)),
                    max_retries=0,
                    retry_on_exceptions=(),
                    retry_on_status_codes=(),
                ) as response:
                    if response.status_code in RETRY_STATUS:
                        retries += 1
                        if retries > RETRIES:
                            hf_raise_for_status(response)
                        wait = self._retry_wait(response, retries, shard)
                        note_retry(
                            f"{self.label}: HTTP {response.status_code} reading {shard.name}", retries, RETRIES, wait
                        )
                    else:
                        hf_raise_for_status(response)
                        before = got
                        for n in self._read_answer(response, shard, first, last, view[got:], deadline):
                            got += n  # counted as it arrives: a broken connection resumes from here
                        if got == before:
                            empty += 1
                            if empty >= EMPTY_ANSWERS:
                                raise HubError(
                                    f"{self.label}: the Hub answered {empty} range requests for "
                                    f"{shard.name} without a byte; try again later, or use --download"
                                )
                            wait = self.retry_wait * 2 ** (empty - 1)
                        else:
                            empty = 0
            except httpx2.TransportError as e:
                self._time_left(deadline, shard, first, last)  # a read that timed out at the deadline
                resumes += 1
                if resumes > RESUMES:
                    raise HubOfflineError(
                        f"{self.label}: the connection to the Hub broke {resumes} times while "
                        f"reading {shard.name} ({type(e).__name__}); check the network and run "
                        "again"
                    ) from None
                wait = self.retry_wait * 2 ** (resumes - 1)
            if wait:
                self._pause(wait, deadline, shard, first, last)
        with self._count_lock:
            self.network_bytes += len(view)  # each byte once: a resumed range asks only for the rest
        if self._hashes[shard.name].add(start, view):  # the shard's last bytes: fail as early as possible
            self._hashes[shard.name].check(self.label)

    def _read_answer(
        self, response: httpx2.Response, shard: RemoteShard, first: int, last: int, view: memoryview, deadline: float
    ) -> Iterator[int]:
        """Copy a `206` answer for bytes first-last into `view`, yielding each chunk's size. The answer
        must say it holds bytes from `first` on (no further than `last`) and may not be
        longer than that: a longer one is refused, not read."""
        if response.status_code != 206:
            raise HubError(
                f"{self.label}: the Hub answered a range request for {shard.name} with the "
                f"whole file (HTTP {response.status_code}); use --download"
            )
        content_range = response.headers.get("Content-Range", "")
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
        if not m or int(m[1]) != first or not first <= int(m[2]) <= last or m[3] not in ("*", str(shard.size)):
            raise HubError(
                f"{self.label}: the Hub answered a request for bytes {first}-{last} of {shard.name} "
                f"with Content-Range {shown(content_range)}; try again later, or use --download"
            )
        expected = int(m[2]) - first + 1
        length = response.headers.get("Content-Length", "").strip()
        too_long = (
            length.isdigit()
            and int(length) > expected
            and response.headers.get("Content-Encoding", "identity") == "identity"
        )
        got = 0
        for chunk in [] if too_long else response.iter_bytes():
            if got + len(chunk) > expected:
                too_long = True
                break
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
            yield len(chunk)
            if got == expected:
                break  # exactly the range: whatever the server would send after it is not read
            if self._closed.is_set():
                raise HubError(f"{self.label}: closed")
            self._time_left(deadline, shard, first, last)
        if too_long:
            raise HubError(
                f"{self.label}: the Hub's answer to a request for bytes {first}-{last} of {shard.name} "
                f"is longer than the range ({length or 'more'} bytes for {expected}); refused: try again "
                "later, or use --download"
            )

    def _retry_wait(self, response: httpx2.Response, attempt: int, shard: RemoteShard) -> float:
        """Seconds to wait before trying again: the answer's Retry-After (refused when longer
        than max_wait), else a backoff."""
        retry_after = response.headers.get("Retry-After", "").strip()
        if not retry_after.isdigit():
            return min(MAX_BACKOFF, self.retry_wait * 2 ** (attempt - 1))
        if len(retry_after) > 9 or int(retry_after) > self.max_wait:
            asked = retry_after if len(retry_after) <= 9 else "over 10^9"
            raise HubError(
                f"{self.label}: the Hub asks to wait {asked} s before reading "
                f"{shard.name} again (HTTP {response.status_code}), longer than lrmerge waits "
                f"({self.max_wait:g} s, LRMERGE_HUB_MAX_WAIT); run again later"
            )
        return float(retry_after)

    def _time_left(self, deadline: float, shard: RemoteShard, first: int, last: int) -> float:
        """Seconds left before the deadline; raises once it has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise HubOfflineError(
                f"{self.label}: reading bytes {first}-{last} of {shard.name} from the Hub took "
                f"longer than {self.deadline:g} s (LRMERGE_HUB_RANGE_DEADLINE); check the "
                "network and run again, or raise the limit"
            )
        return left

    def _pause(self, wait: float, deadline: float, shard: RemoteShard, first: int, last: int) -> None:
        """Wait before trying again; fail at once when the wait would end past the deadline,
        end early when the model is closed."""
        if time.monotonic() + wait >= deadline:
            raise HubOfflineError(
                f"{self.label}: reading bytes {first}-{last} of {shard.name} from the Hub would "
                f"take longer than {self.deadline:g} s (LRMERGE_HUB_RANGE_DEADLINE) with the "
                f"retries it needs; check the network and run again, or raise the limit"
            )
        if self._closed.wait(wait):
            raise HubError(f"{self.label}: closed")

    def _fetch_part(self, shard: RemoteShard, start: int, view: memoryview) -> None:
        from .errors import hub_errors

        with hub_errors(self.label):
            self._fetch(shard, start, view)

    def _submit(self, block: Block) -> None:
        block.buffer = bytearray(block.size)
        block.unreleased = len(block.names)
        view = memoryview(block.buffer)
        for lo in range(0, block.size, self.request_bytes):
            hi = min(lo + self.request_bytes, block.size)
            block.parts.append(self._pool.submit(self._fetch_part, block.shard, block.start + lo, view[lo:hi]))
        self._held += block.size
        self._submitted += 1

    def _read_ahead(self, needed: Block | None = None) -> None:
        """Submit blocks in order: all up to `needed`, then more while under the window."""
        waiting = sum(h.waiting_bytes for h in self._hashes.values())
        while self._submitted < len(self._blocks):
            block = self._blocks[self._submitted]
            must = needed is not None and needed.index >= self._submitted
            if not must and self._held + waiting + block.size > self.read_ahead and self._held > 0:
                break
            self._submit(block)
            if block.unreleased == 0:  # bytes read for the hash only
                self._held -= block.size

    # --- the TensorSource interface -------------------------------------------------------
    def read_order(self, names: list[str]) -> None:
        self._blocks = plan_blocks(names, self.tensors, self.shards, self._data_start, self.request_bytes)
        self._block_of = {name: b for b in self._blocks for name in b.names}
        for i, b in enumerate(self._blocks):
            b.index = i
        self._submitted = 0

    def populate(self, name: str) -> None:
        block = self._block_of[name]
        self._read_ahead(needed=block)
        for part in block.parts:
            part.result()  # raises the part's error (one line)

    def array(self, name: str) -> np.ndarray:
        st = self.tensors[name]
        dtype = NUMPY_DTYPES[st.spec.dtype]
        if st.spec.numel == 0:
            return np.empty(0, dtype=dtype)
        self.populate(name)
        block = self._block_of[name]
        assert block.buffer is not None  # populate() fetched it
        array: np.ndarray = np.frombuffer(block.buffer, dtype=dtype, count=st.spec.numel, offset=st.start - block.start)
        # read-only, as a mapped shard's view is: the kernels see the same array type from
        # either source, so the machine code numba compiled and cached for one serves the other
        # (a writable view would be compiled anew, seconds to half a minute, on first use)
        array.flags.writeable = False
        return array

    def release(self, name: str) -> None:
        block = self._block_of.get(name)
        if block is None or block.buffer is None:
            return
        block.unreleased -= 1
        if block.unreleased == 0:
            block.buffer = None  # the hash may still hold parts of it until the bytes before arrive
            self._held -= block.size

    def finish(self) -> None:
        """Fetch what is left (blocks read for the hash only) and check every shard's hash."""
        self._read_ahead(needed=self._blocks[-1] if self._blocks else None)
        for block in self._blocks:
            for part in block.parts:
                part.result()
        for h in self._hashes.values():
            h.check(self.label)

    def close(self) -> None:
        """Stop fetching without waiting: requests not started are cancelled, waits end, and a
        request in flight stops at its next chunk (its thread is a daemon)."""
        self._closed.set()
        self._pool.shutdown()
        self._blocks, self._block_of = [], {}


def hub_reader(
    *, repo_id: str, revision: str, folder: Path, token: str | None, read_ahead: int, request_bytes: int, workers: int
) -> Callable[[str], HubModel]:
    """Source.reader for a Hub model: opens a HubModel under the merge's label."""
    return lambda label: HubModel(
        label,
        repo_id=repo_id,
        revision=revision,
        folder=folder,
        token=token,
        read_ahead=read_ahead,
        request_bytes=request_bytes,
        workers=workers,
    )
