"""Safetensors without loading models: checked headers (st_header), zero-copy mmap reads, streamed writes.

Reading a tensor returns a view of the memory-mapped file (no copy until it is converted),
so the engine holds a few tensors at a time, never a model. Views are numpy arrays
(`array`), which is all the CPU merge needs, or torch tensors (`get`) for the reference
methods and the GPU; torch is imported only then (importing it costs seconds). Writing lays
out every shard's header up front (the plan knows every output shape) and then streams
tensor bytes in order.
"""

from __future__ import annotations

import errno
import itertools
import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputModelError, OutputError, shown
from .st_header import MAX_HEADER, HeaderError, TensorSpec, parse_header

if TYPE_CHECKING:
    import torch

# numpy has no bfloat16 or float8: those arrive as their bits
NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": np.uint8,
    "F8_E5M2": np.uint8,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python 3.13+ names it


@dataclass(frozen=True)
class StoredTensor:
    spec: TensorSpec
    file: Path
    start: int  # absolute byte offset of the data in the file
    end: int


def corrupt(path: Path, why: str) -> InputModelError:
    return InputModelError(
        f"{path.name} in {path.parent.name}: corrupt or truncated safetensors file ({why}); download or save it again"
    )


def read_header(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Parse and check one safetensors file's header (see st_header.parse_header). Raises
    InputModelError, one line, when the file is corrupt or truncated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = header_length(f.read(8), size, path)
            raw = f.read(n)
    except OSError as e:
        raise InputModelError(f"{path}: cannot read ({e.strerror or e})") from None
    return header_tensors(raw, size, path)


def header_length(head: bytes, size: int, path: Path) -> int:
    """The JSON header's length from a shard's first 8 bytes, checked against safetensors'
    limit and the file's size."""
    if len(head) < 8:
        raise corrupt(path, "shorter than 8 bytes")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER:
        raise corrupt(path, f"a header of {n} bytes, over safetensors' limit of {MAX_HEADER}")
    if 8 + n > size:
        raise corrupt(path, f"a header of {n} bytes in a file of {size}")
    return n


def header_tensors(raw: bytes, size: int, path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors (absolute offsets) and metadata of a shard of `size` bytes whose JSON
    header is `raw`: the same checks whether the shard is on disk or read from the Hub."""
    try:
        entries, metadata = parse_header(raw, size - 8 - len(raw))
    except HeaderError as e:
        raise corrupt(path, str(e)) from None
    data_start = 8 + len(raw)
    tensors = {
        name: StoredTensor(spec, path, data_start + begin, data_start + end)
        for name, (spec, begin, end) in entries.items()
    }
    return tensors, metadata


def index_shards(index: Any, where: str) -> list[str]:
    """The shard files a model.safetensors.index.json names (pure), each a relative path
    inside the model folder: a name with `..` or an absolute path is refused (it would
    read, or download, a file outside the folder). Raises InputModelError."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputModelError(f"{where}: model.safetensors.index.json has no weight_map")
    names = set()
    for name in weight_map.values():
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            raise InputModelError(
                f"{where}: model.safetensors.index.json names a shard {shown(name)}; "
                "its weight_map must map tensor names to file names"
            )
        normal = os.path.normpath(name)
        if os.path.isabs(name) or normal in (".", "..") or normal.startswith("../"):
            raise InputModelError(
                f"{where}: model.safetensors.index.json names shard {shown(name)}, which lies "
                "outside the model folder; refusing to read it"
            )
        names.add(normal)
    return sorted(names)


class TensorSource:
    """Where a model's tensor bytes come from, as the merge loop sees it: a mapped local
    folder (SafetensorsModel) or ranged reads from the Hub (hub_stream.HubModel).

    The loop announces the order it will read tensors in (`read_order`), asks for each one
    before reading it (`populate`), reads it (`array`, `get`), lets it go (`release`), and at
    the end asks the source to vouch for every byte it served (`finish`). Side files
    (config, tokenizer) are read from `folder`."""

    folder: Path
    label: str
    tensors: dict[str, StoredTensor]
    config: dict[str, Any]
    network_bytes = 0  # bytes this source received over the network so far

    def _read_json(self, name: str, required: bool = False) -> dict[str, Any]:
        """A JSON object file of the folder; {} when it is absent and not required."""
        path = self.folder / name
        if not path.exists():
            if required:
                raise InputModelError(f"{self.label}: {name} is missing from {self.folder.name}")
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            raise InputModelError(f"{self.label}: {name} in {self.folder.name} is not valid JSON (UTF-8)") from None
        if not isinstance(data, dict):
            raise InputModelError(
                f"{self.label}: {name} in {self.folder.name} must hold a JSON object, not {type(data).__name__}"
            )
        return data

    def _shard_path(self, name: str) -> Path:
        """A shard file of the folder (a name index_shards passed), refused when a symlink
        leads out of the folder (a Hugging Face cache snapshot's files are links into the
        repo's own `blobs/`: those are fine)."""
        folder = self.folder.resolve()
        allowed = [folder]
        if folder.parent.name == "snapshots":
            allowed.append(folder.parent.parent / "blobs")
        if not any(a in (folder / name).resolve().parents for a in allowed):
            raise InputModelError(
                f"{self.label}: shard {shown(name)} is a symlink out of {self.folder.name}; refusing to read it"
            )
        return self.folder / name

    @property
    def specs(self) -> dict[str, TensorSpec]:
        return {name: st.spec for name, st in self.tensors.items()}

    def array(self, name: str) -> np.ndarray:
        """The tensor as a flat read-only numpy array (bfloat16 and float8 as their bits:
        see NUMPY_DTYPES), valid until `release(name)`."""
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a zero-copy, read-only torch view of `array(name)`."""
        import torch

        spec = self.tensors[name].spec
        flat = self.array(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the buffer is read-only; we never write to it
            t = torch.from_numpy(flat)
        if spec.dtype in ("BF16", "F8_E4M3", "F8_E5M2"):  # numpy holds their bits
            t = t.view(torch_dtype(spec.dtype))
        return t.view(spec.shape)

    def read_order(self, names: list[str]) -> None:
        """The tensors the merge will read from this source, in the order it reads them."""

    def populate(self, name: str) -> None:
        """Have the tensor's bytes at hand before the kernels read it."""

    def release(self, name: str) -> None:
        """The merge is done with the tensor."""

    def finish(self) -> None:
        """Check, once every tensor was read, that the bytes were the right ones."""

    def close(self) -> None:
        """Let go of mappings, buffers and connections (also after a failure)."""


class SafetensorsModel(TensorSource):
    """One local model folder: its tensors (by name, lazily mapped) and its config."""

    def __init__(self, folder: Path, label: str):
        self.folder = Path(folder)
        self.label = label
        if not self.folder.is_dir():
            raise InputModelError(f"{label}: folder {self.folder} does not exist or is not a folder")
        self.tensors = self._index()
        self.config = check_config(self._read_json("config.json", required=True), label)
        self._read_json("tokenizer_config.json")  # the engine copies it, and reads its chat template
        self._maps: dict[Path, mmap.mmap] = {}
        self._next: dict[str, str] = {}  # tensor -> the one read after it

    def _index(self) -> dict[str, StoredTensor]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            index_data = self._read_json(index.name)
            files = [self._shard_path(name) for name in index_shards(index_data, self.label)]
            weight_map = index_data["weight_map"]  # index_shards checked it
        else:
            files = sorted(self._shard_path(p.name) for p in self.folder.glob("*.safetensors"))
            if not files:
                pickles = [p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
                if pickles:
                    raise InputModelError(
                        f"{self.label}: only pickle weights ({pickles[0]}) in {self.folder.name}; "
                        "lrmerge reads safetensors only and never unpickles (convert the model to safetensors first)"
                    )
                raise InputModelError(f"{self.label}: no safetensors weights in {self.folder.name}")
        tensors: dict[str, StoredTensor] = {}
        for path in files:
            if not path.is_file():
                raise InputModelError(f"{self.label}: shard {shown(path.name)} listed in the index is missing")
            found, _ = read_header(path)
            for name, st in found.items():
                if name in tensors:
                    raise InputModelError(f"{self.label}: tensor {shown(name)} appears in two shards")
                tensors[name] = st
        if index.exists():
            listed = set(weight_map)
            if listed != set(tensors):
                name = sorted(listed ^ set(tensors))[0]
                raise InputModelError(
                    f"{self.label}: tensor {shown(name)} is in the index but not in the shards (or the reverse)"
                )
        return tensors

    def array(self, name: str) -> np.ndarray:
        """A zero-copy, read-only flat numpy view of the tensor in the memory-mapped file
        (bfloat16 and float8 as their bits: see NUMPY_DTYPES)."""
        st = self.tensors[name]
        dtype = NUMPY_DTYPES[st.spec.dtype]
        if st.spec.numel == 0:
            return np.empty(0, dtype=dtype)
        return np.frombuffer(self._map(st.file), dtype=dtype, count=st.spec.numel, offset=st.start)

    def _map(self, file: Path) -> mmap.mmap:
        """The read-only mapping of a shard, made on first use."""
        if file not in self._maps:
            with open(file, "rb") as f:
                self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[file]

    def _advise(self, name: str, advice: int) -> None:
        """madvise the pages of a tensor's mapping (mapping the shard if needed); a kernel
        that does not know the advice (older than Linux 5.14 for POPULATE_READ) is ignored."""
        st = self.tensors[name]
        if st.end <= st.start:
            return
        start = st.start - st.start % mmap.PAGESIZE
        try:
            self._map(st.file).madvise(advice, start, st.end - start)
        except OSError:
            pass

    def read_order(self, names: list[str]) -> None:
        self._next = dict(itertools.pairwise(names))

    def populate(self, name: str) -> None:
        """Map all of a tensor's pages into this process in one call, before the kernels
        read it (many times cheaper than a page fault per 64 KB, one thread at a time), and
        ask the OS to read the next tensor's pages ahead (WILLNEED, asynchronously), so its
        reads from disk overlap this one's merge."""
        self._advise(name, MADV_POPULATE_READ)
        if name in self._next:
            self._advise(self._next[name], mmap.MADV_WILLNEED)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident set once it is merged: the
        mapped file pages otherwise count as resident until the shard is closed, so peak
        RSS would grow to the size of every input. The OS page cache keeps them."""
        if name in self.tensors and self.tensors[name].file in self._maps:
            self._advise(name, mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._maps.clear()  # mappings close when no tensor views them any more


def to_float32(a: torch.Tensor) -> torch.Tensor:
    """float32 of a flat input on its device: bfloat16 bits (int16/uint16) widen exactly."""
    import torch

    if a.dtype in (torch.int16, torch.uint16):
        return (a.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    return a.to(torch.float32)


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code."""
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }[code]


def as_array(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as the flat numpy array the writer takes (same bytes; bfloat16 and
    float8 as their bits)."""
    import torch

    flat = t.detach().contiguous().cpu().reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    if flat.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return flat.view(torch.uint8).numpy()
    return flat.numpy()


def shard_layout(tensors: Iterable[tuple[str, TensorSpec]], shard_size: int) -> list[list[tuple[str, TensorSpec]]]:
    """Split tensors, in order, into shards of at most shard_size bytes (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, TensorSpec]]] = [[]]
    size = 0
    for name, spec in tensors:
        if shards[-1] and size + spec.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, spec))
        size += spec.nbytes
    return shards


def _writeback_starter() -> Callable[[int], None]:
    """fd -> start writing the file's dirty pages to disk without waiting (Linux's
    sync_file_range with SYNC_FILE_RANGE_WRITE), or a no-op where libc has no such call."""
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # no such call (not Linux), or no libc to load
        return lambda fd: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def start(fd: int) -> None:
        call(fd, 0, 0, 2)  # SYNC_FILE_RANGE_WRITE over the whole file; a refusal leaves it to fsync

    return start


start_writeback = _writeback_starter()
DIRECT_BLOCK = 4096  # what O_DIRECT asks offsets, lengths and buffers to be multiples of
STAGE_BYTES = 16 << 20  # the aligned buffer direct writes go through


class ShardedWriter:
    """Streams tensors, in the planned order, into safetensors shards plus an index.

    Where the file system takes it (`direct`), shards are written with O_DIRECT through one
    aligned staging buffer: the bytes go from the buffer to the disk, not into the page
    cache first, whose fresh pages cost a copy and a fault each (a third of a one-pass
    merge's CPU time), and the closing fsync has nothing left to wait for. Elsewhere the
    writes are buffered, and writeback starts after each tensor.

    Each finished shard is handed to `on_shard` (the uploader of a merge with a push target),
    which returns True when it removed the file from disk."""

    def __init__(
        self,
        folder: Path,
        tensors: list[tuple[str, TensorSpec]],
        shard_size: int,
        on_shard: Callable[[Path], bool] | None = None,
        direct: bool = True,
    ):
        self.folder = folder
        self.on_shard = on_shard
        self.on_disk = self.peak_on_disk = 0  # bytes of shards on disk now, and at most
        self.shards = shard_layout(tensors, shard_size)
        n = len(self.shards)
        self.names = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.order = [name for shard in self.shards for name, _ in shard]
        self.specs = dict(tensors)
        self._next = 0
        self._shard = -1
        self._left_in_shard = 0
        self._fd: int | None = None
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._stage: np.ndarray | None = None  # page-aligned (mmap), reused shard after shard
        self._staged = 0  # bytes in the stage not yet written
        self.bytes_written = 0
        self.shard_bytes: list[int] = []  # size of each shard opened so far

    def _refused(self, e: OSError) -> OutputError:
        """The one-line error for a write the disk or file system refused."""
        return OutputError(f"cannot write {self.names[self._shard]}: {e.strerror or e}")

    def _write_out(self, data: memoryview) -> None:
        """os.write all of `data` at the shard's current position (an OSError as it comes)."""
        assert self._fd is not None  # a shard is open
        while data:
            data = data[os.write(self._fd, data) :]

    def _write(self, data: memoryview) -> None:
        try:
            self._write_out(data)
        except OSError as e:
            raise self._refused(e) from None

    def _flush_stage(self) -> None:
        """Write the staged bytes: a full stage, or a shard's last bytes, padded to a block and
        the file cut back to its size."""
        assert self._fd is not None and self._stage is not None
        size = self._staged
        padded = -(-size // DIRECT_BLOCK) * DIRECT_BLOCK
        self._stage[size:padded] = 0
        start = os.lseek(self._fd, 0, os.SEEK_CUR)
        try:
            self._write_out(self._stage[:padded].data)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise self._refused(e) from None
            self._no_direct(start)  # a file system that refuses the alignment: buffered from here
            self._write(self._stage[:size].data)
            padded = size
        if padded != size:
            os.ftruncate(self._fd, start + size)
        self._staged = 0

    def _no_direct(self, position: int) -> None:
        assert self._fd is not None
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        os.lseek(self._fd, position, os.SEEK_SET)
        self.direct = False

    def _put(self, data: np.ndarray) -> None:
        """Append bytes (a flat uint8 array) to the open shard."""
        if not self.direct:
            self._write(data.data)
            return
        if self._stage is None:
            self._stage = np.frombuffer(mmap.mmap(-1, STAGE_BYTES), dtype=np.uint8)
        while data.size:
            take = min(data.size, STAGE_BYTES - self._staged)
            self._stage[self._staged : self._staged + take] = data[:take]  # numpy copies without the GIL
            self._staged += take
            data = data[take:]
            if self._staged == STAGE_BYTES:
                self._flush_stage()
            if not self.direct:  # the file system refused: the rest unstaged
                self._write(data.data)
                return

    def _finish_shard(self) -> None:
        """Close the current shard (synced: an uploader or a rename may follow) and hand it on."""
        assert self._fd is not None  # a shard is open
        if self._staged:
            self._flush_stage()
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise self._refused(e) from None
        os.close(self._fd)
        self._fd = None
        path = self.folder / self.names[self._shard]
        if self.on_shard is not None and self.on_shard(path):
            self.on_disk -= self.shard_bytes[self._shard]

    def _open_next_shard(self) -> None:
        if self._fd is not None:
            self._finish_shard()
        self._shard += 1
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, spec in self.shards[self._shard]:
            header[name] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align tensor data to 8 bytes
        path = self.folder / self.names[self._shard]
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._fd = None
        if self.direct:
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError:  # e.g. EINVAL: a file system without direct I/O
                self.direct = False
        if self._fd is None:
            try:
                self._fd = os.open(path, flags, 0o644)
            except OSError as e:
                raise self._refused(e) from None
        self._put(np.frombuffer(struct.pack("<Q", len(raw)) + raw, dtype=np.uint8))
        self.shard_bytes.append(8 + len(raw) + offset)
        self.on_disk += self.shard_bytes[-1]  # the file grows to this as it is written
        self.peak_on_disk = max(self.peak_on_disk, self.on_disk)
        self._left_in_shard = len(self.shards[self._shard])

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor: a flat array of its planned dtype (see NUMPY_DTYPES)."""
        expected = self.order[self._next]
        if name != expected:
            raise RuntimeError(f"tensor {name} written out of order (expected {expected})")
        spec = self.specs[name]
        if array.dtype != NUMPY_DTYPES[spec.dtype] or array.size != spec.numel:
            raise RuntimeError(f"tensor {name}: got {array.dtype}[{array.size}], planned {spec}")
        if self._left_in_shard == 0:
            self._open_next_shard()
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self._put(data)
        if not self.direct:  # the disk writes while the next tensors are merged: the closing
            assert self._fd is not None  # fsync then has little left to wait for
            start_writeback(self._fd)
        self.bytes_written += data.nbytes
        self._next += 1
        self._left_in_shard -= 1

    def close(self) -> None:
        if self._next != len(self.order):
            raise RuntimeError(f"only {self._next} of {len(self.order)} tensors were written")
        if self._fd is not None:
            self._finish_shard()
        if len(self.names) > 1:
            weight_map = {name: self.names[i] for i, shard in enumerate(self.shards) for name, _ in shard}
            total = sum(spec.nbytes for spec in self.specs.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# config.json keys the plan reads, and the JSON type each must have when present
CONFIG_TYPES = {
    "architectures": list,
    "model_type": str,
    "vocab_size": int,
    "text_config": dict,
    "torch_dtype": str,
    "dtype": str,
}


def check_config(config: Any, where: str) -> dict[str, Any]:
    """A model's config.json as read from disk or the Hub, checked for the keys a merge
    reads (pure). Raises InputModelError naming the key."""
    if not isinstance(config, dict):
        raise InputModelError(f"{where}: config.json must hold a JSON object, not {type(config).__name__}")
    for key, kind in CONFIG_TYPES.items():
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputModelError(f"{where}: config.json {key} must be a {kind.__name__} (got {shown(value)})")
        if isinstance(value, list) and not all(isinstance(a, str) for a in value):  # architectures
            raise InputModelError(
                f"{where}: config.json architectures must be a list of class names (got {shown(value)})"
            )
    return config


@dataclass(frozen=True)
class Source:
    """A model ready to read: a local folder and, for Hub models, the repo and pinned sha.

    `reader` opens the model's tensor bytes when they are not in `path` (a Hub model read by
    ranged requests; `path` then holds its config and tokenizer only)."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    reader: Callable[[str], Any] | None = field(default=None, compare=False, repr=False)

    def open(self, label: str) -> Any:
        """The model's TensorSource, labelled `label` in errors."""
        if self.reader is not None:
            return self.reader(label)
        return SafetensorsModel(self.path, label)
