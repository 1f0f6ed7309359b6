"""The output writer (st_io.ShardedWriter): direct writes through the aligned stage and
buffered writes lay down the same bytes, a file system that refuses direct I/O gets
buffered writes, and a write the disk refuses is a one-line error."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lrmerge_hub.merge import buffers, st_io
from lrmerge_hub.merge.kernels import FAST_PATHS

from kernel_support import engine_recipe
from lrmerge_hub.merge.st_header import TensorSpec

# sizes around a block (4096) and the shrunken stage: tensors that end mid-block, fill the
# stage exactly, span several stages, and a shard whose end is not block-aligned
SHAPES = {"a": (3, 5), "b": (1024,), "c": (2048, 3), "d": (7,), "e": (4096, 2), "f": (1,)}


def tensors(dtype: str = "F32") -> list[tuple[str, TensorSpec, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for name, shape in SHAPES.items():
        values = rng.standard_normal(int(np.prod(shape))).astype(np.float32)
        array = values if dtype == "F32" else (values.view(np.uint32) >> 16).astype(np.uint16)
        out.append((name, TensorSpec(dtype, shape), array))
    return out


def write(folder: Path, items, shard_size: int, direct: bool, used: list[bool] | None = None) -> Path:
    folder.mkdir()
    writer = st_io.ShardedWriter(folder, [(n, s) for n, s, _ in items], shard_size, direct=direct)
    for name, _, array in items:
        writer.write(name, array)
    writer.close()
    if used is not None:
        used.append(writer.direct)
    return folder


def takes_direct_io(folder: Path) -> bool:
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    return True


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def small_stage(monkeypatch):
    monkeypatch.setattr(st_io, "STAGE_BYTES", 3 * st_io.DIRECT_BLOCK)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("shard_size", [1 << 30, 20_000])
def test_direct_and_buffered_writes_lay_down_the_same_shards(tmp_path, small_stage, dtype, shard_size):
    items, used = tensors(dtype), []
    direct = write(tmp_path / "direct", items, shard_size, direct=True, used=used)
    buffered = write(tmp_path / "buffered", items, shard_size, direct=False)
    assert used == [takes_direct_io(tmp_path)]  # direct wherever the file system takes it
    assert files(direct) == files(buffered)
    shards = [p for p in direct.iterdir() if p.suffix == ".safetensors"]
    assert (len(shards) > 1) == (shard_size < 1 << 20)
    assert any(p.stat().st_size % st_io.DIRECT_BLOCK for p in shards)  # a file cut back after its padded block
    from safetensors.torch import load_file  # the safetensors library reads what we wrote

    read = {k: v for p in shards for k, v in load_file(p).items()}
    for name, spec, array in items:
        got = read[name]
        assert tuple(got.shape) == spec.shape
        raw = got.reshape(-1).view(torch.int16 if spec.dtype == "BF16" else torch.int32).numpy().tobytes()
        assert raw == array.tobytes()


def test_a_file_system_without_direct_io_gets_buffered_writes(tmp_path, small_stage, monkeypatch):
    opened = os.open

    def refuse_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return opened(path, flags, *args)

    items = tensors()
    expected = files(write(tmp_path / "expected", items, 40_000, direct=False))
    monkeypatch.setattr(st_io.os, "open", refuse_direct)
    assert files(write(tmp_path / "refused", items, 40_000, direct=True)) == expected


def test_a_direct_write_refused_mid_shard_goes_on_buffered(tmp_path, small_stage, monkeypatch):
    """A file system may take O_DIRECT at open and refuse its alignment at the first write."""
    written = os.write
    refused = []

    def refuse_direct_writes(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return written(fd, data)

    items = tensors()
    expected = files(write(tmp_path / "expected", items, 40_000, direct=False))
    monkeypatch.setattr(st_io.os, "write", refuse_direct_writes)
    assert files(write(tmp_path / "refused", items, 40_000, direct=True)) == expected
    assert refused  # the direct write was tried, and refused, before the buffered one


@pytest.mark.parametrize("direct", [True, False])
def test_a_write_the_disk_refuses_is_an_output_error(tmp_path, direct):
    """A file size limit (as a full disk would) refuses the write: OutputError naming the
    shard, not a traceback from os.write."""
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        import numpy as np
        from lrmerge_hub.errors import OutputError
        from lrmerge_hub.merge.st_header import TensorSpec
        from lrmerge_hub.merge.st_io import ShardedWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        w = ShardedWriter(Path(sys.argv[1]), [("t", TensorSpec("F32", (1 << 19,)))], 1 << 30, direct={direct})
        try:
            w.write("t", np.ones(1 << 19, dtype=np.float32))
            w.close()
        except OutputError as e:
            print(str(e))
            sys.exit(2)
        """
    )
    (tmp_path / "out").mkdir()
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip() == "cannot write model.safetensors: File too large"


def test_a_merge_past_a_file_size_limit_fails_with_one_line_and_leaves_nothing(tmp_path, family, write_recipe):
    fam = family(hidden=256, intermediate=512)
    recipe = write_recipe(
        f"method: linear\nmodels:\n  - model: {fam['language']}\n  - model: {fam['task']}\ndtype: float32\n"
    )
    out = tmp_path / "merged"
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    limit += "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
    code = limit + "import sys; from lrmerge_hub.cli import main; sys.argv[0] = 'lrmerge'; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, "merge", str(recipe), "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "Error: cannot write model.safetensors: File too large"
    assert "Traceback" not in done.stderr
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if p.name.startswith("merged")]


# -- output arrays reused tensor after tensor (buffers.py) ------------------------------------


def test_a_written_output_is_reused_by_the_next_tensor_that_fits():
    buffers.release_outputs()
    first = buffers.output_array(1 << 20, bf16=False)  # 4 MB
    first[:] = 1.0
    buffers.recycle(first)
    smaller = buffers.output_array(1 << 20, bf16=True)  # 2 MB: fits the 4 MB buffer
    assert np.shares_memory(smaller, first) and smaller.dtype == np.uint16 and smaller.size == 1 << 20
    larger = buffers.output_array(3 << 20, bf16=False)  # 12 MB: a new one
    assert not np.shares_memory(larger, first)
    buffers.recycle(np.empty(1 << 21, dtype=np.float32))  # not made here: left alone
    buffers.recycle(smaller[10:])  # a view gives its buffer back
    buffers.recycle(smaller)  # twice: still once
    assert len(buffers._free) == 1
    buffers.release_outputs()
    assert not np.shares_memory(buffers.output_array(1 << 20, bf16=False), first)


def test_at_most_two_buffers_wait_and_they_are_the_largest():
    buffers.release_outputs()
    arrays = [buffers.output_array(n << 18, bf16=False) for n in (1, 4, 2)]  # 1, 4 and 2 MB
    for a in arrays:
        buffers.recycle(a)
    assert sorted(b.nbytes for b in buffers._free) == [2 << 20, 4 << 20]
    small = buffers.output_array(100, bf16=False)  # under POOLED_BYTES: malloc's
    assert not any(np.shares_memory(small, b) for b in buffers._free)
    buffers.release_outputs()


@pytest.fixture(scope="module")
def pooled_family(tmp_path_factory):
    """float32 checkpoints whose layer tensors (512 x 1024) take pooled outputs."""
    from lrmerge_hub.synth.tiny import make_family

    root = tmp_path_factory.mktemp("pooled") / "models"
    make_family(root, hidden=512, intermediate=1024, layers=1, heads=8, dtype="float32")
    return root


@pytest.mark.parametrize("method", sorted(FAST_PATHS))
def test_every_fast_path_writes_every_entry_of_its_output(pooled_family, tmp_path, monkeypatch, method):
    """Reused outputs hold the last tensor's bytes, where a fresh array held zeros: merged into
    arrays filled first with zero bits and then with all-one bits (NaN), a method writes the
    same model, so no entry is left as it was found."""
    from lrmerge_hub.merge import kernels
    from lrmerge_hub.merge.engine import local_sources, merge
    from lrmerge_hub.recipe.spec import load_recipe

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(engine_recipe(method, pooled_family))
    recipe = load_recipe(recipe_path)
    taken = []
    outputs = {}
    for fill in (0x00, 0xFF):

        def filled(n: int, bf16: bool, fill: int = fill) -> np.ndarray:
            array = buffers.output_array(n, bf16)
            array.view(np.uint8)[:] = fill
            taken.append(n)
            return array

        monkeypatch.setattr(kernels, "output_array", filled)
        merge(recipe, local_sources(recipe), tmp_path / f"fill-{fill}", device="cpu", engine="kernels", progress=False)
        outputs[fill] = files(tmp_path / f"fill-{fill}")
    assert taken  # the method's kernels took their outputs here
    shards = [k for k in outputs[0] if k.endswith(".safetensors")]
    assert shards and all(outputs[0][k] == outputs[0xFF][k] for k in shards)
