"""A Hub model's tensors read with HTTP range requests at a pinned commit, never written to disk.

`HubModel` is the merge loop's TensorSource (merge/st_io.py) for a Hub model that is not in
the HF cache. Requests go through the official client: its shared session (`get_session`,
via `http_stream_backoff`, which retries 429 and 5xx answers), its auth headers
(`build_hf_headers`), its endpoint (`hf_hub_url`: HF_ENDPOINT) and its errors
(`hf_raise_for_status`, turned into one-line errors by `hub.hub_errors`).

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
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import httpx2
import numpy as np
from huggingface_hub import HfApi, RepoFile, hf_hub_url
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

from .errors import HubError, HubIntegrityError, HubOfflineError, InputModelError
from .merge.st_io import NUMPY_DTYPES, StoredTensor, TensorSource, header_length, header_tensors

RESUMES = 5  # a range whose connection breaks more often than this fails the merge
RESUME_WAIT = 0.5  # seconds before the first resume; doubles each time


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
            raise HubIntegrityError(f"{label}: only {self.hashed} of {self.shard.size} bytes of {self.shard.name} "
                                    "were read; run again")
        got = self.hash.hexdigest()
        if got != expected:
            raise HubIntegrityError(
                f"{label}: {self.shard.name} does not match the {'sha256' if self.shard.sha256 else 'git sha1'} the "
                f"Hub lists for it (got {got[:12]}, listed {expected[:12]}): the bytes were corrupted on the way; "
                "nothing was written or pushed, run again (or use --download)")


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


def plan_blocks(order: list[str], tensors: dict[str, StoredTensor], shards: dict[str, RemoteShard],
                data_start: dict[str, int], request_bytes: int) -> list[Block]:
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


class HubModel(TensorSource):
    """A Hub model at a pinned commit: config and tokenizer from `folder` (downloaded, small),
    tensors read with range requests."""

    def __init__(self, label: str, *, repo_id: str, revision: str, folder: Path, token: str | None,
                 read_ahead: int, request_bytes: int, workers: int):
        self.label, self.repo_id, self.revision, self.folder = label, repo_id, revision, Path(folder)
        self.read_ahead, self.request_bytes = read_ahead, request_bytes
        self.config = self._read_json("config.json", required=True)
        self.headers = build_hf_headers(token=token)
        self._count_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"lrmerge-range-{label[:16]}")
        self._blocks: list[Block] = []
        self._block_of: dict[str, Block] = {}
        self._submitted = 0  # blocks handed to the pool, in order
        self._held = 0  # bytes of submitted blocks not yet released
        from .hub import hub_errors

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
        listed = {f.path: f for f in HfApi(token=token).list_repo_tree(self.repo_id, revision=self.revision)
                  if isinstance(f, RepoFile)}
        names = sorted(set(index.get("weight_map", {}).values())) if index else sorted(
            p for p in listed if p.endswith(".safetensors"))
        missing = [n for n in names if n not in listed]
        if not names or missing:
            raise InputModelError(f"{self.label}: shard {missing[0] if missing else 'model.safetensors'} is not in "
                                  f"the repo at {self.revision[:12]}")
        return {n: RemoteShard(n, listed[n].size, listed[n].lfs.sha256 if listed[n].lfs else None,
                               listed[n].blob_id) for n in names}

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
        """Fill `view` with the shard's bytes from `start`, resuming a broken connection from
        the byte where it stopped, then hash them. 401/403/404 and gated repos raise the
        client's errors (hub_errors turns them into one line); 429 and 5xx are retried by
        the client's backoff."""
        url = hf_hub_url(self.repo_id, shard.name, revision=self.revision)
        got = resumes = 0
        while got < len(view):
            rng = f"bytes={start + got}-{start + len(view) - 1}"
            try:
                with http_stream_backoff("GET", url, headers={**self.headers, "Range": rng},
                                         timeout=hf_constants.HF_HUB_DOWNLOAD_TIMEOUT,
                                         retry_on_exceptions=()) as response:
                    hf_raise_for_status(response)
                    if response.status_code != 206:
                        raise HubError(f"{self.label}: the Hub answered a range request for {shard.name} with the "
                                       f"whole file (HTTP {response.status_code}); use --download")
                    for chunk in response.iter_bytes():
                        n = min(len(chunk), len(view) - got)
                        view[got:got + n] = chunk[:n]
                        got += n
            except httpx2.TransportError as e:
                resumes += 1
                if resumes > RESUMES:
                    raise HubOfflineError(f"{self.label}: the connection to the Hub broke {resumes} times while "
                                          f"reading {shard.name} ({type(e).__name__}); check the network and run "
                                          "again") from None
                time.sleep(RESUME_WAIT * 2 ** (resumes - 1))
        with self._count_lock:
            self.network_bytes += len(view)  # each byte once: a resumed range asks only for the rest
        if self._hashes[shard.name].add(start, view):  # the shard's last bytes: fail as early as possible
            self._hashes[shard.name].check(self.label)

    def _fetch_part(self, shard: RemoteShard, start: int, view: memoryview) -> None:
        from .hub import hub_errors

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
        return np.frombuffer(block.buffer, dtype=dtype, count=st.spec.numel, offset=st.start - block.start)

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
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._blocks, self._block_of = [], {}


def hub_reader(*, repo_id: str, revision: str, folder: Path, token: str | None, read_ahead: int,
               request_bytes: int, workers: int) -> Callable[[str], HubModel]:
    """Source.reader for a Hub model: opens a HubModel under the merge's label."""
    return lambda label: HubModel(label, repo_id=repo_id, revision=revision, folder=folder, token=token,
                                  read_ahead=read_ahead, request_bytes=request_bytes, workers=workers)
