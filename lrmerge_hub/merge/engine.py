"""The streaming merge engine: one tensor at a time from mmapped shards to streamed shards.

Peak memory is a small multiple of the largest tensor, never a model. Output is atomic:
everything goes to a temporary folder beside the target, renamed into place at the end.
The engine knows nothing of the Hub: it takes local folders (`Source`) with provenance.
Tensors travel as flat numpy arrays; torch is imported only for the reference methods and
the GPU (a CPU ties/slack_ties merge never pays its seconds of import time).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import math
import os
import resource
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..errors import DegenerateInput, DeviceError, InputModelError, NonFiniteOutputError, OutputError, ZeroOutputError
from ..interrupt import at_once, deferred
from ..recipe.spec import CHAT_TEMPLATE_NAMES, Recipe, named_chat_template
from ..settings import default_engine

try:  # fused CPU kernels for ties/slack_ties (numba); the reference path works without them
    from .kernels import (
        FAST_PATHS,
        NonFiniteInput,
        NonFiniteOutput,
        as_float32,
        float32_to,
        kernel_inputs,
    )
    from .sphere_fills import release_scratch
except ImportError:  # pragma: no cover - numba is a dependency; this only guards odd installs
    FAST_PATHS = {}  # no fast path, so the `except NonFiniteInput/Output` clauses are never reached

    def release_scratch() -> None:
        pass


from .buffers import recycle, release_outputs
from .methods import SUMMED_MODELS_MAX, MergeMethod, get_method
from .plan import BASE, ST_TO_RECIPE, MergePlan, TensorJob, config_vocab_size, model_keys, plan_merge
from .st_io import Source
from .st_header import TensorSpec
from .st_io import SafetensorsModel, ShardedWriter, StoredTensor, TensorSource, as_array, torch_dtype
from .tensor_params import TensorParams, layer_count, set_layer_count
from .vocabulary import UNION, align, output_tokenizer, permute, tokenizer_vocab
from ..recipe.mergekit import to_mergekit

if TYPE_CHECKING:
    import torch

    from .torch_engine import TorchEngine

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


# device files a CUDA (or ROCm) GPU shows on Linux; without any, torch would find none
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def cuda_available() -> bool:
    """Whether torch sees a GPU. Asking imports torch (seconds), so a machine without any
    GPU device file is answered without it."""
    if not any(os.path.exists(p) for p in GPU_DEVICE_FILES):
        return False
    import torch

    return torch.cuda.is_available()


# Input bytes per CPU-second that a whole CPU merge (kernels, reads and writes) gets through,
# measured by bench/merge_bench.py: 8.19 GB of bf16 inputs in 17.2 CPU-seconds at 1.36B
# (bench/results-1.4b.json), 0.48 GB/s per core. The torch engine on a GPU is bound instead
# by the host-to-device copy of the same bytes.
KERNEL_BYTES_PER_CORE_S = 0.48e9


def auto_device(host_to_device_rate: float | None, cores: int) -> str:
    """The measured rule behind --device auto: the GPU wins when its host-to-device link
    (bytes/s, None without a GPU) moves bytes faster than all the cores running the kernels
    get through them; a box with many cores and a slow PCIe link keeps the CPU."""
    if host_to_device_rate is not None and host_to_device_rate > cores * KERNEL_BYTES_PER_CORE_S:
        return "cuda"
    return "cpu"


def resolve_device(device: str) -> str:
    """'auto' decides by auto_device (measuring the link when a GPU is visible), else the
    device asked for; 'cuda' without a GPU is an error."""
    if device == "auto":
        rate = None
        if cuda_available():
            from .torch_engine import host_to_device_rate

            rate = host_to_device_rate("cuda")
        return auto_device(rate, os.cpu_count() or 1)
    if device == "cuda" and not cuda_available():
        raise InputModelError("device: cuda was asked for but no GPU is visible (use --device cpu or auto)")
    return device


ENGINES = ("auto", "kernels", "torch")


def resolve_engine(engine: str, device: str) -> str:
    """'auto' is the numba kernels on a CPU and the torch engine on a GPU."""
    if engine == "auto":
        return "kernels" if device == "cpu" else "torch"
    if engine == "kernels" and device != "cpu":
        raise InputModelError(f"engine: the kernels run on the CPU only; use --engine torch with --device {device}")
    return engine


def check_output_path(out_dir: Path, sources: dict[str, Source], overwrite: bool, *, dry_run: bool = False) -> None:
    """Refuse an output inside (or around) an input folder, and an existing output without
    `overwrite`; a dry run writes nothing, so it plans anyway (its report says the output exists)."""
    out = out_dir.resolve()
    for key, src in sources.items():
        folder = src.path.resolve()
        if out == folder or folder in out.parents:
            raise OutputError(
                f"output {out_dir.name} lies inside the input folder of {key}; choose another output path"
            )
        if out in folder.parents:
            raise OutputError(f"output {out_dir.name} contains the input folder of {key}; choose another output path")
    if out.exists() and not overwrite and not dry_run:
        raise OutputError(f"output {out_dir} already exists (pass --overwrite to replace it)")


def beside(out_dir: Path, kind: str, pid: int | None = None) -> Path:
    """A hidden path next to the output: `.NAME.lrmerge-KIND[-PID]` (tmp, old, lock)."""
    return (
        out_dir.parent / f".{out_dir.name}.lrmerge-{kind}"
        if pid is None
        else out_dir.parent / f".{out_dir.name}.lrmerge-{kind}-{pid}"
    )


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold `.NAME.lrmerge-lock` beside the output for the whole merge, so that a second
    merge to the same output fails instead of replacing it. The lock is an flock, which
    the kernel drops when its process dies: a lock file left by a killed merge is free."""
    path = beside(out_dir, "lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(
                f"output {out_dir}: cannot create files beside it ({e.strerror}); choose a folder you can write to"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"output {out_dir} is being written by another lrmerge (pid {holder}); "
                "wait for it to finish or choose another output"
            ) from None
        except OSError as e:  # a filesystem without locks (some NFS): go on, the rename is still re-checked
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                os.close(fd)
                raise
        try:  # the previous holder may have removed the file between our open and flock
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove what merges to `out_dir` that died without cleaning up left beside it: their
    temporary folders; an old output set aside at the rename comes back when no new one
    took its place. Only folders of dead processes (by the PID in their name). A driver's
    re-merge of a cluster's result (`.NAME.lrmerge-verify-PID`, itself a merge output) leaves
    its own temporary folder and lock beside that: `..NAME.lrmerge-verify-PID.lrmerge-*`.
    Call it holding the output lock. Returns the paths removed or restored."""
    handled = []
    for p in out_dir.parent.glob(glob.escape(f".{out_dir.name}.lrmerge-") + "*-*"):
        kind, _, pid = p.name[len(out_dir.name) + 10 :].partition("-")
        if kind not in ("tmp", "old", "promote", "verify") or not pid.isdigit() or pid_alive(int(pid)):
            continue
        if kind == "old" and not out_dir.exists():
            p.rename(out_dir)
        else:
            shutil.rmtree(p, ignore_errors=True)
        handled.append(p)
    for p in out_dir.parent.glob(glob.escape(f"..{out_dir.name}.lrmerge-verify-") + "*.lrmerge-*"):
        pid = p.name[len(out_dir.name) + 18 :].partition(".")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            handled.append(p)
    return handled


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RetentionCounter:
    """Adds up, per non-base model, the entries kept by the trim and kept by the election."""

    def __init__(self, n: int):
        self.total = [0] * n
        self.kept = [0] * n
        self.agreed = [0] * n

    def add(self, numel: int, kept: list[int], agreed: list[int]) -> None:
        for i in range(len(self.kept)):
            self.total[i] += numel
            self.kept[i] += int(kept[i])
            self.agreed[i] += int(agreed[i])

    def for_model(self, i: int) -> dict[str, Any]:
        kept = self.kept[i]
        return {
            "total": self.total[i],
            "kept": kept,
            "agreed": self.agreed[i],
            "fraction": round(self.agreed[i] / kept, 6) if kept else None,
        }


def input_labels(keys: list[str]) -> list[str]:
    """The inputs of a merged tensor in the order methods take them: the base (when the
    recipe has one), then the models."""
    return ([BASE] if BASE in keys else []) + [k for k in keys if k != BASE]


def shared_entries(job: TensorJob) -> int | None:
    """How many leading entries every model has (None: all of them)."""
    return job.shared_rows * math.prod(job.out_shape[1:]) if job.shared_rows is not None else None


class Renamed:
    """A source seen under a slice's output tensor name: its tensor `in_name` (the same
    tensor of the source layer the slice maps the output layer to)."""

    def __init__(self, source: TensorSource, out_name: str, in_name: str):
        self.source, self.in_name = source, in_name
        self.tensors = {out_name: source.tensors[in_name]}

    def array(self, name: str) -> np.ndarray:
        return self.source.array(self.in_name)


class Aligned:
    """A source's vocabulary tensor with its rows in the output vocabulary's order
    (vocabulary.permute): float32, held in memory."""

    def __init__(self, name: str, array: np.ndarray):
        self.flat = array.reshape(-1)
        self.tensors = {name: StoredTensor(TensorSpec("F32", array.shape), Path(), 0, self.flat.nbytes)}

    def array(self, name: str) -> np.ndarray:
        return self.flat


def aligned_sources(job: TensorJob, readers: dict[str, TensorSource], plan: MergePlan) -> dict[str, Any]:
    """Every input's tensor of an aligned job in the output vocabulary's order."""
    assert plan.vocabulary is not None  # the plan aligns only when it has a vocabulary
    arrays = {}
    for key in dict(plan.vocabulary.rows):
        spec = readers[key].tensors[job.name].spec
        arrays[key] = as_float32(readers[key].array(job.name), spec.dtype == "BF16").reshape(spec.shape)
    return {key: Aligned(job.name, a) for key, a in permute(arrays, plan.vocabulary).items()}


def job_sources(
    job: TensorJob, readers: dict[str, TensorSource], keys: list[str], plan: MergePlan | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The readers and keys a job's merge sees: every model's tensor of the job's name (in
    the output vocabulary's order for an aligned job), or a slice's inputs under their
    labels (its base as 'base')."""
    if job.aligned and plan is not None:
        return aligned_sources(job, readers, plan), keys
    if job.inputs is None:
        return readers, keys
    return {label: Renamed(readers[key], job.name, name) for label, key, name in job.inputs}, [
        label for label, _, _ in job.inputs
    ]


def job_reads(job: TensorJob, keys: list[str]) -> list[tuple[str, str]]:
    """(model key, tensor name) of every input of a job."""
    if job.inputs is None:
        return [(k, job.name) for k in keys]
    return [(key, name) for _, key, name in job.inputs]


def merge_inputs(job: TensorJob, readers: dict[str, TensorSource], keys: list[str]) -> list[np.ndarray]:
    """Flat zero-copy views of a merged tensor's shared entries in every input."""
    shared = shared_entries(job)
    return [readers[k].array(job.name)[:shared] for k in input_labels(keys)]


def merge_with_torch(
    job: TensorJob,
    method: MergeMethod,
    readers: dict[str, TensorSource],
    keys: list[str],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    compute: TorchEngine,
) -> tuple[np.ndarray, list[int] | None, list[int] | None, bool]:
    """One tensor on the torch engine's device: (flat output, kept, agreed, whether NaN/Inf
    in the output were counted already). Raises like merge_tensor."""
    from .torch_engine import TORCH_METHODS

    labels = input_labels(keys)
    raw = compute.take(job.name, merge_inputs(job, readers, keys))
    has_base = BASE in keys
    fn = TORCH_METHODS.get(method.name) if covered(method, has_base, params, len(model_params)) else None
    if fn is not None:  # the kernels' computation, the same bits (torch_engine.py)
        try:
            merged, kept, agreed, bad_inputs, bad_float32, bad_stored = fn(
                raw[0] if has_base else None,
                raw[int(has_base) :],
                model_params,
                params,
                torch_dtype(job.out_dtype),
                **fast_path_args(method, job),
            )
        except DegenerateInput as e:  # a fast path that ran the reference (multislerp's degenerate inputs)
            raise InputModelError(f"tensor {job.name}: {e}") from None
        for label, bad in zip(labels, bad_inputs, strict=True):
            if bad:
                raise InputModelError(f"{label}: tensor {job.name} contains NaN or Inf")
        if bad_stored:
            raise nonfinite_output(job, bad_stored, model_params, params, bad_float32 > 0)
        return compute.to_host(merged, job.out_dtype), kept, agreed, True
    result, kept, agreed = reference_merge(job, method, raw, labels, model_params, params)
    return compute.to_host(result, job.out_dtype), kept, agreed, False


def random_draws(method: MergeMethod, job: TensorJob) -> dict[str, str]:
    """The tensor name a random method's draws depend on (with the seed and entry index: the
    same bits on every path and device), as its keyword argument; nothing for the others."""
    return {"tensor_name": job.name} if method.random else {}


def fast_path_args(method: MergeMethod, job: TensorJob) -> dict[str, Any]:
    """The keyword arguments of a method's fast path (FAST_PATHS, TORCH_METHODS): random_draws,
    and the merged shape for a method that ranks along its rows (SHAPED)."""
    return {**random_draws(method, job), **({"shape": merged_shape(job)} if method.name in SHAPED else {})}


def merged_shape(job: TensorJob) -> tuple[int, ...]:
    """The shape of the part of a tensor that is merged: the rows every model shares."""
    rows = job.shared_rows if job.shared_rows is not None else (job.out_shape[0] if job.out_shape else None)
    return (rows, *job.out_shape[1:]) if rows is not None else ()


def reference_merge(
    job: TensorJob,
    method: MergeMethod,
    raw: list[torch.Tensor],
    labels: list[str],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
) -> tuple[torch.Tensor, list[int] | None, list[int] | None]:
    """The method's reference function on one tensor's flat inputs (in `input_labels` order,
    on any device): (flat float32 result, kept, agreed). Refuses NaN/Inf inputs and a
    float32 result that overflowed."""
    from .st_io import to_float32

    inputs = [to_float32(t) for t in raw]
    for label, x in zip(labels, inputs, strict=True):
        if not bool(x.isfinite().all()):
            raise InputModelError(f"{label}: tensor {job.name} contains NaN or Inf")
    shape = merged_shape(job)
    has_base = BASE in labels
    try:
        result, stats = method.fn(
            inputs[0].view(shape) if has_base else None,
            [m.view(shape) for m in inputs[1 if has_base else 0 :]],
            model_params,
            params,
            **random_draws(method, job),
        )
    except DegenerateInput as e:
        raise InputModelError(f"tensor {job.name}: {e}") from None
    bad = int((~result.isfinite()).sum())  # NaN/Inf in float32: an overflow of the scales
    if bad:
        raise nonfinite_output(job, bad, model_params, params, True)
    kept = stats.kept.tolist() if stats is not None else None
    agreed = stats.agreed.tolist() if stats is not None else None
    return result.reshape(-1), kept, agreed


# methods whose fast paths add the stacked models in order (methods.SUMMED_MODELS_MAX): past
# that many models the reference runs for them (multislerp's fast path then runs torch's
# own sums itself)
SUMMED_IN_ORDER = ("breadcrumbs", "breadcrumbs_ties", "della", "ram", "ramplus_tl", "sce")
# methods whose kernels and torch-engine code do mergekit's L1 rescale (the others' do not)
RESCALED = frozenset({"dare_linear", "dare_ties", "della", "della_linear"})
# methods whose fast paths work along rows (DELLA's ranks; nuslerp's and model_stock's
# vectors per row; arcee_fusion's divergence per row of the last dim): they take the merged shape=
SHAPED = frozenset({"della", "della_linear", "nuslerp", "model_stock", "arcee_fusion"})


def covered(method: MergeMethod, has_base: bool, params: dict[str, Any], models: int) -> bool:
    """Whether the kernels (FAST_PATHS) and the torch engine's own code (TORCH_METHODS), where
    they have the method, cover this recipe: a base where the method needs one (ties reads
    one always), no L1 rescale unless they implement it (RESCALED), and for breadcrumbs,
    della and RAM, the models a sum in order covers (SUMMED_MODELS_MAX)."""
    if method.name in SUMMED_IN_ORDER and models > SUMMED_MODELS_MAX:
        return False
    return (has_base or not method.needs_base) and (not params.get("rescale") or method.name in RESCALED)


def merge_tensor(
    job: TensorJob,
    method: MergeMethod,
    readers: dict[str, TensorSource],
    keys: list[str],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    device: str,
    retention: RetentionCounter | None,
    compute: TorchEngine | None = None,
) -> np.ndarray:
    """Merge one tensor in float32 and return it flat in the output dtype (bfloat16 as its
    bits): the rows every model shares are merged, extra vocabulary rows are copied.
    With `compute`, the torch engine merges on its device; else the CPU kernels where the
    method has them, and the reference functions otherwise. Raises NonFiniteOutputError
    when a merged value is NaN or Inf."""
    shared = shared_entries(job)
    labels = input_labels(keys)
    has_base = BASE in keys
    fast = (
        FAST_PATHS.get(method.name)
        if compute is None and device == "cpu" and covered(method, has_base, params, len(model_params))
        else None
    )
    kept = agreed = None
    counted = fast is not None and job.out_dtype in ("BF16", "F32")  # NaN/Inf of the output already
    if compute is not None:
        merged, kept, agreed, counted = merge_with_torch(job, method, readers, keys, model_params, params, compute)
    elif fast is not None:  # fused kernels reading the mapped inputs in place (kernels.py)
        inputs = kernel_inputs(
            merge_inputs(job, readers, keys), [readers[k].tensors[job.name].spec.dtype for k in labels]
        )
        try:
            merged, kept, agreed = fast(
                inputs[0] if has_base else None,
                inputs[int(has_base) :],
                model_params,
                params,
                out_bf16=job.out_dtype == "BF16",
                check_finite=True,
                **fast_path_args(method, job),
            )
        except NonFiniteInput as e:
            raise InputModelError(f"{labels[e.which + int(has_base)]}: tensor {job.name} contains NaN or Inf") from None
        except NonFiniteOutput as e:
            raise nonfinite_output(job, e.count, model_params, params, True) from None
        except DegenerateInput as e:  # a fast path that ran the reference (multislerp's degenerate inputs)
            raise InputModelError(f"tensor {job.name}: {e}") from None
        if job.out_dtype not in ("BF16", "F32"):
            merged = float32_to(merged, job.out_dtype)
    else:  # the reference function, on the CPU, reading the mapped inputs in place
        from .torch_engine import host_tensor

        raw = [host_tensor(a) for a in merge_inputs(job, readers, keys)]
        result, kept, agreed = reference_merge(job, method, raw, labels, model_params, params)
        merged = as_array(result.to(torch_dtype(job.out_dtype)))
    if all_zero(merged, job.out_dtype) and not any(
        all_zero(a, readers[k].tensors[job.name].spec.dtype)
        for k, a in zip(labels, merge_inputs(job, readers, keys), strict=True)
    ):
        raise zero_output(job, method, model_params, params)
    if retention is not None and kept is not None and agreed is not None:  # the methods count both or neither
        retention.add(merged.size, kept, agreed)
    if job.extra_rows_from is not None:
        src = readers[job.extra_rows_from]
        extra, dtype = src.array(job.name)[shared:], src.tensors[job.name].spec.dtype
        values = extra if dtype == "F32" else as_float32(extra, dtype == "BF16")
        if not np.isfinite(values).all():
            raise InputModelError(f"{job.extra_rows_from}: tensor {job.name} contains NaN or Inf")
        merged = np.concatenate([merged, extra if dtype == job.out_dtype else float32_to(values, job.out_dtype)])
    # the kernels (bfloat16/float32 output) and the torch engine's ties count NaN/Inf as they
    # store; everything else is counted here. Every path refused a float32 result that
    # overflowed, so what is left here is the cast's overflow
    if not counted or job.extra_rows_from is not None:
        bad = nonfinite_count(merged, job.out_dtype)
        if bad:
            raise nonfinite_output(job, bad, model_params, params, False)
    return merged


def nonfinite_count(flat: np.ndarray, dtype: str) -> int:
    """NaN/Inf entries of a flat array in a safetensors float dtype (BF16 as its bits)."""
    if dtype == "BF16":
        return int(np.count_nonzero((flat & 0x7F80) == 0x7F80))  # exponent all ones
    return int(flat.size - np.count_nonzero(np.isfinite(flat)))


def all_zero(flat: np.ndarray, dtype: str) -> bool:
    """Whether every entry of a flat array in a safetensors dtype (bfloat16, float16 and
    float8 as their bits) is zero, -0 included. A nonzero among the first entries answers
    at once, so a healthy tensor costs nothing."""
    if dtype in ("BF16", "F16"):
        flat, magnitude = flat.view(np.uint16), 0x7FFF
    elif dtype.startswith("F8"):
        flat, magnitude = flat.view(np.uint8), 0x7F
    else:
        return not flat[:64].any() and not flat.any()
    return not np.any(flat[:64] & magnitude) and not np.any(flat & magnitude)


def zero_output(
    job: TensorJob, method: MergeMethod, model_params: list[dict[str, Any]], params: dict[str, Any]
) -> ZeroOutputError:
    """The one-line error for a merged tensor that is all zeros though no input is, naming the
    parameters the recipe set away from their defaults (the likely cause)."""

    def set_away(value: Any, declared: dict[str, Any], key: str) -> bool:
        return (
            key in declared
            and key != "seed"
            and not isinstance(value, bool)
            and isinstance(value, (int, float))
            and value != declared[key].default
        )

    changed = [f"parameters.{k} = {v:g}" for k, v in params.items() if set_away(v, method.global_params, k)]
    changed += [
        f"models[{i}].{k} = {v:g}"
        for i, p in enumerate(model_params)
        for k, v in p.items()
        if set_away(v, method.model_params, k)
    ]
    cause = f"check {', '.join(changed)}" if changed else "the models cancel out there (check the weights)"
    return ZeroOutputError(
        f"tensor {job.name}: every merged value is 0 although no input is all zeros, a broken "
        f"model; nothing was written. {method.name}: {cause}"
    )


def nonfinite_output(
    job: TensorJob, count: int, model_params: list[dict[str, Any]], params: dict[str, Any], float32_overflowed: bool
) -> NonFiniteOutputError:
    """The one-line error for a merged tensor with NaN/Inf, naming the likely cause: the
    largest scale (lambda or a weight) when float32 overflowed, else the output dtype."""
    what = f"tensor {job.name}: {count:,} merged values are NaN or Inf; nothing was written"
    if not float32_overflowed:
        return NonFiniteOutputError(
            f"{what}. They exceed the range of the output dtype "
            f"{ST_TO_RECIPE.get(job.out_dtype, job.out_dtype)}: use dtype: bfloat16 or float32"
        )
    scales = [(f"models[{i}].{k}", p[k]) for i, p in enumerate(model_params) for k in ("weight", "scale") if k in p]
    if "lambda" in params:
        scales.append(("parameters.lambda", params["lambda"]))
    if not scales:
        return NonFiniteOutputError(f"{what}. The inputs' values are too large for float32")
    field, value = max(scales, key=lambda s: abs(s[1]))
    return NonFiniteOutputError(
        f"{what}. The merge overflowed float32, most likely through {field} = {value:g}: "
        "lower it (lambda times the weights times the deltas must stay within float32)"
    )


def copy_side_files(plan: MergePlan, recipe: Recipe, readers: dict[str, TensorSource], tmp: Path) -> None:
    """config.json from the reference model (vocab and dtype updated), generation config and
    chat template from the task model when it has them, tokenizer from the tokenizer source."""
    config = dict(readers[plan.reference].config)
    if plan.output_vocab is not None and "vocab_size" in config:
        config["vocab_size"] = plan.output_vocab
    dtype = ST_TO_RECIPE.get(plan.out_dtype, "float32")
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype
    if plan.layers is not None:
        config = set_layer_count(config, plan.layers)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    task_keys = [m.ref.spec for m in recipe.models if m.role == "task"]
    prefer = task_keys + [plan.reference] + [k for k in readers if k not in task_keys]

    def first_with(name: str) -> Path | None:
        for k in prefer:
            p = readers[k].folder / name
            if p.is_file():
                return p
        return None

    gen = first_with("generation_config.json")
    if gen:
        shutil.copyfile(gen, tmp / gen.name)
    if recipe.tokenizer is not None and (recipe.tokenizer == UNION or recipe.tokens):
        # built from every model's, or with tokens added, as mergekit builds and saves it
        keys = model_keys(recipe)
        sizes = {k: config_vocab_size(readers[k].config) or plan.vocab_rows.get(k, 0) for k in keys}
        folders = {k: readers[k].folder for k in keys}
        output_tokenizer(recipe.tokenizer, folders, sizes, BASE, recipe.tokens).save_pretrained(str(tmp))
    else:
        tok_dir = readers[plan.tokenizer_source].folder
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, tmp / name)
    for name in CHAT_TEMPLATE_FILES:
        p = first_with(name)
        if p:
            shutil.copyfile(p, tmp / name)
    # A chat template kept inside tokenizer_config.json travels with the task model's tokenizer.
    tok_cfg_path = tmp / "tokenizer_config.json"
    if tok_cfg_path.exists() and not any((tmp / n).exists() for n in CHAT_TEMPLATE_FILES):
        for k in prefer:
            cfg_file = readers[k].folder / "tokenizer_config.json"
            if cfg_file.is_file():
                template = json.loads(cfg_file.read_text(encoding="utf-8")).get("chat_template")
                if template:
                    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
                    tok_cfg["chat_template"] = template
                    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
                    break
    template = recipe.chat_template
    if template in CHAT_TEMPLATE_NAMES:
        template = named_chat_template(template)
    elif template == "auto":  # the template most models have (mergekit's plurality; none: as above)
        found = [t for t in (model_chat_template(r.folder) for r in readers.values()) if t]
        template = Counter(found).most_common(1)[0][0] if found else None
    if template is not None:  # as mergekit writes it: chat_template.jinja, and only there
        for name in CHAT_TEMPLATE_FILES:
            (tmp / name).unlink(missing_ok=True)
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        if tok_cfg_path.exists():
            tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
            if tok_cfg.pop("chat_template", None) is not None:
                tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")


def model_chat_template(folder: Path) -> str | None:
    """A model's chat template as transformers finds it (its default one when it names
    several), stripped; None when it has none."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8").strip()
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            template = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):  # absent, or not a JSON object: no template there
            continue
        if isinstance(template, list):
            named = (t for t in template if isinstance(t, dict) and t.get("name") == "default")
            template = next((t.get("template") for t in named), None)
        if isinstance(template, str) and template.strip():
            return template.strip()
    return None


def open_sources(recipe: Recipe, sources: dict[str, Source]) -> dict[str, TensorSource]:
    """Every model's TensorSource, opened all at once: a Hub model's opening is a few requests
    one after another (its file list, each shard's header), so the models' latencies overlap."""
    keys = model_keys(recipe)
    for key in keys:
        if key not in sources:
            raise InputModelError(f"{key}: no local folder for this model (pull it first)")
    readers = at_once(lambda key: sources[key].open(key), keys, undo=lambda reader: reader.close())
    return dict(zip(keys, readers, strict=True))


def build_plan(recipe: Recipe, readers: dict[str, TensorSource]) -> MergePlan:
    keys = model_keys(recipe)
    if recipe.layers is not None:  # a mergekit slice's layer_range: every layer of each model
        for k in keys:
            n = layer_count(readers[k].config)
            if n != recipe.layers:
                raise InputModelError(
                    f"layers: the layer ranges name {recipe.layers} layers but {k} has {n}; one slice "
                    "that starts at layer 0 takes every layer (several slices may take parts of models)"
                )
    configs = {k: readers[k].config for k in keys}
    vocabulary = None
    if recipe.tokenizer is not None:  # mergekit's tokenizer source: the inputs' rows in its vocabulary's order
        vocabs = {k: tokenizer_vocab(readers[k].folder, k) for k in keys}
        sizes = {k: config_vocab_size(configs[k]) or len(vocabs[k]) for k in keys}
        if recipe.tokenizer == UNION or recipe.tokens:
            folders = {k: readers[k].folder for k in keys}
            out_vocab = output_tokenizer(recipe.tokenizer, folders, sizes, BASE, recipe.tokens).get_vocab()
        else:
            out_vocab = vocabs[recipe.tokenizer]
        base = BASE if BASE in keys else None
        vocabulary = align(out_vocab, vocabs, sizes, base, recipe.pad_to_multiple_of, recipe.tokens)
    return plan_merge({k: readers[k].specs for k in keys}, configs, recipe, vocabulary)


@dataclass
class Output:
    """One model the loop writes: its recipe (a sweep point's), method, folder and writer."""

    recipe: Recipe
    out_dir: Path
    method: MergeMethod
    tmp: Path
    writer: ShardedWriter
    retention: RetentionCounter | None
    # this tensor's parameters (gradients, filters, layer_swap's shares), resolved before its
    # kernel: the recipe's (key None) or its slice's
    resolvers: dict[int | None, TensorParams] = field(default_factory=dict)

    def merged(
        self,
        job: TensorJob,
        readers: dict[str, TensorSource],
        plan: MergePlan,
        keys: list[str],
        device: str,
        compute: TorchEngine | None,
    ) -> np.ndarray:
        if not job.merge:  # copied from the reference model, or a slice's first source
            key, name = job.inputs[0][1:] if job.inputs else (plan.reference, job.name)
            return readers[key].array(name)
        resolver = self.resolvers.get(job.slice)
        if resolver is None:
            if job.slice is None:
                resolver = TensorParams.of(self.recipe, layer_count(readers[plan.reference].config))
            else:  # the plan gives each tensor's position in its slice
                assert self.recipe.slices is not None  # a job of a slice comes from a sliced recipe
                resolver = TensorParams.of(self.recipe.slices[job.slice].part, None)
            self.resolvers[job.slice] = resolver
        try:
            names = [n for label, _, n in job.inputs if label != BASE] if job.inputs else None
            model_params, params = resolver(job.name, job.t, names)
        except ValueError as e:
            raise InputModelError(str(e)) from None
        view, labels = job_sources(job, readers, keys, plan)
        return merge_tensor(job, self.method, view, labels, model_params, params, device, self.retention, compute)


def write_all(outputs: list[Output], name: str, arrays: list[np.ndarray]) -> None:
    for o, array in zip(outputs, arrays, strict=True):
        o.writer.write(name, array)
    for array in arrays:  # all written: the next tensor's kernels may reuse their memory (buffers.py)
        recycle(array)


def merge(recipe: Recipe, sources: dict[str, Source], out_dir: Path, **options: Any) -> dict[str, Any]:
    """Merge the recipe's models into `out_dir` and return the merge report (see merge_many)."""
    return merge_many([(recipe, out_dir)], sources, **options)[0]


def merge_many(
    targets: list[tuple[Recipe, Path]],
    sources: dict[str, Source],
    *,
    device: str = "auto",
    engine: str | None = None,
    shard_size: int = 5 * 1000**3,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    on_tensor: Callable[[str], None] | None = None,
    on_shard: Callable[[Path], bool] | None = None,
) -> list[dict[str, Any]]:
    """Merge each (recipe, folder) target and return their merge reports. The recipes name
    the same models (a sweep's points differ in parameters only): the loop reads each input
    tensor once and merges it for every target.

    `sources` maps 'base' and each model's recipe spec to a local folder or a streamed Hub
    model with provenance. `engine` is 'kernels' (CPU), 'torch' (any device) or 'auto'
    (kernels on a CPU, torch on a GPU; the default, or LRMERGE_ENGINE); both write the same
    bits. With dry_run, every input is checked and the plan returned; nothing is written.
    `on_tensor` is called after each tensor is written (tests inject failures with it).
    `on_shard` gets each finished output shard (hub.ShardUploader uploads it; True: it
    removed the file, which the output folder then lacks).
    """
    with sleeping_openmp_threads():
        return _merge_many(
            targets,
            sources,
            device=device,
            engine=engine,
            shard_size=shard_size,
            overwrite=overwrite,
            dry_run=dry_run,
            progress=progress,
            on_tensor=on_tensor,
            on_shard=on_shard,
        )


@contextmanager
def sleeping_openmp_threads() -> Iterator[None]:
    """Inside, torch's OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE), if torch is
    first imported there and the user set no policy: by default they spin after every torch
    operation, and on 2 cores that spinning took 23% of a karcher merge's CPU samples (perf)
    from the kernels' threads. libgomp reads the variable once, when torch loads it; it is
    removed afterwards, so processes started later (vLLM, lm-eval) keep their defaults."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        yield
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        yield
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)


def _merge_many(
    targets: list[tuple[Recipe, Path]],
    sources: dict[str, Source],
    *,
    device: str,
    engine: str | None,
    shard_size: int,
    overwrite: bool,
    dry_run: bool,
    progress: bool,
    on_tensor: Callable[[str], None] | None,
    on_shard: Callable[[Path], bool] | None,
) -> list[dict[str, Any]]:
    """merge_many's work (see there)."""
    started = time.perf_counter()
    targets = [(recipe, Path(out_dir).absolute()) for recipe, out_dir in targets]
    recipe = targets[0][0]
    for _, out_dir in targets:
        check_output_path(out_dir, sources, overwrite, dry_run=dry_run)
    readers = open_sources(recipe, sources)
    compute: TorchEngine | None = None
    try:
        plan = build_plan(recipe, readers)
        keys = model_keys(recipe)
        if any(model_keys(r) != keys or build_plan(r, readers) != plan for r, _ in targets[1:]):
            raise InputModelError("recipes merged in one pass must name the same models and plan the same output")
        if dry_run:
            return [
                {
                    "dry_run": True,
                    "method": r.method,
                    "output": str(o),
                    **plan.summary(),
                    "output_exists": o.exists() or o.is_symlink(),
                }
                for r, o in targets
            ]
        dev = resolve_device(device)
        engine = resolve_engine(engine or default_engine(), dev)
        if engine == "torch":
            compute = open_torch_engine(plan, dev, len(recipe.models))
        with ExitStack() as locks:
            for _, out_dir in targets:
                out_dir.parent.mkdir(parents=True, exist_ok=True)
                locks.enter_context(output_lock(out_dir))
                clean_stale(out_dir)  # may bring back an output a killed merge had set aside
                check_output_path(out_dir, sources, overwrite)  # again: another merge may have finished
            return write_merge(
                targets,
                sources,
                plan,
                readers,
                dev,
                compute,
                shard_size=shard_size,
                overwrite=overwrite,
                progress=progress,
                on_tensor=on_tensor,
                on_shard=on_shard,
                started=started,
            )
    finally:
        if compute is not None:
            compute.close()
        for r in readers.values():
            r.close()


def write_merge(
    targets: list[tuple[Recipe, Path]],
    sources: dict[str, Source],
    plan: MergePlan,
    readers: dict[str, TensorSource],
    dev: str,
    compute: TorchEngine | None,
    *,
    shard_size: int,
    overwrite: bool,
    progress: bool,
    on_tensor: Callable[[str], None] | None,
    on_shard: Callable[[Path], bool] | None,
    started: float,
) -> list[dict[str, Any]]:
    """The streaming loop: merge and write every tensor, for every target, into a temporary
    folder beside each output, then rename them into place. On any failure or signal the
    folders are removed."""
    keys = model_keys(targets[0][0])
    specs = [(j.name, TensorSpec(j.out_dtype, j.out_shape)) for j in plan.jobs]
    outputs: list[Output] = []
    # the torch engine copies the next tensor's inputs while this one is merged: from mapped
    # local files only (a streamed source has a tensor's bytes only once it is populated)
    stage_ahead = compute is not None and all(isinstance(r, SafetensorsModel) for r in readers.values())
    staging = compute if stage_ahead else None
    # Each tensor is written by a background thread while the next one is read and merged
    # (the write releases the GIL, the kernels too); one write in flight at a time, so at
    # most two output tensors per target are held.
    pool = ThreadPoolExecutor(1, thread_name_prefix="lrmerge-write")
    pending: Future | None = None
    try:
        for r, out_dir in targets:
            tmp = beside(out_dir, "tmp", os.getpid())
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            method = get_method(r.method)
            outputs.append(
                Output(
                    r,
                    out_dir,
                    method,
                    tmp,
                    ShardedWriter(tmp, specs, shard_size, on_shard),
                    # kept/agreed per model: one set of models (a slice's differ)
                    RetentionCounter(len(r.models)) if method.reports_retention and r.slices is None else None,
                )
            )
        with tqdm(
            total=plan.bytes_to_read, unit="B", unit_scale=True, desc="merging", disable=not progress, leave=False
        ) as bar:
            # a copied (non-float) tensor is read from the reference model only
            read_by = [job_reads(job, keys) if job.merge else job_reads(job, [plan.reference])[:1] for job in plan.jobs]
            for k in keys:  # each source reads ahead in this order (st_io.TensorSource)
                readers[k].read_order([name for by in read_by for key, name in by if key == k])
            for index, job in enumerate(plan.jobs):
                for k, name in read_by[index]:
                    readers[k].populate(name)
                following = plan.jobs[index + 1] if index + 1 < len(plan.jobs) else None
                if staging is not None and following is not None and following.merge:  # its copy overlaps this merge
                    staging.stage(following.name, merge_inputs(following, *job_sources(following, readers, keys, plan)))
                with deferred():  # a signal inside a numba kernel would surface as a SystemError
                    out = [o.merged(job, readers, plan, keys, dev, compute) for o in outputs]
                if pending is not None:
                    pending.result()
                pending = pool.submit(write_all, outputs, job.name, out)
                del out
                for k, name in job_reads(job, keys):  # its input pages leave our resident set (st_io.release)
                    readers[k].release(name)
                bar.update(sum(readers[k].tensors[name].spec.nbytes for k, name in job_reads(job, keys)))
                bar.set_postfix_str(
                    f"{job.name} | {sum(r.network_bytes for r in readers.values()) / 1e6:.0f} MB "
                    f"from the Hub | {sum(o.writer.bytes_written for o in outputs) / 1e6:.0f} MB "
                    "written",
                    refresh=False,
                )
                if on_tensor:
                    on_tensor(job.name)
        if pending is not None:
            pending.result()
            pending = None
        for reader in readers.values():  # e.g. each streamed shard's sha256, before the last output shard is handed on
            reader.finish()
        reports = []
        for o in outputs:
            o.writer.close()
            copy_side_files(plan, o.recipe, readers, o.tmp)
            report = build_report(
                o.recipe,
                sources,
                plan,
                o.retention,
                dev,
                started,
                o.writer,
                sum(r.network_bytes for r in readers.values()),
            )
            report["stats"]["engine"] = "torch" if compute is not None else "kernels"
            if compute is not None and compute.peak_bytes() is not None:
                report["stats"]["peak_device_bytes"] = compute.peak_bytes()
            # local models named relative to the output, so `lrmerge merge recipe.yaml` there reproduces it
            (o.tmp / "recipe.yaml").write_text(o.recipe.to_yaml(seen_from=o.out_dir), encoding="utf-8")
            (o.tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            reports.append(report)
        for o in outputs:
            install_atomically(o.tmp, o.out_dir, overwrite=overwrite)
    except BaseException:
        if pending is not None:
            wait([pending])  # never abort the writer under a write in flight
        for o in outputs:
            o.writer.abort()
            shutil.rmtree(o.tmp, ignore_errors=True)
        raise
    finally:
        pool.shutdown(wait=True)
        release_scratch()
        release_outputs()
    return reports


def open_torch_engine(plan: MergePlan, device: str, models: int) -> TorchEngine:
    """The torch engine on `device`, once the largest merged tensor is known to fit there
    (a one-line error before any output is written otherwise)."""
    from .torch_engine import TorchEngine, device_budget, device_bytes_needed

    merged = [j for j in plan.jobs if j.merge]
    if merged:
        largest = max(merged, key=lambda j: math.prod(j.out_shape))
        need = device_bytes_needed(math.prod(largest.out_shape), models)
        free = device_budget(device)
        if free is not None and need > free:
            raise DeviceError(
                f"device: merging tensor {largest.name} needs about {need / 1e9:.1f} GB on {device} "
                f"but {free / 1e9:.1f} GB are free; use --device cpu or free GPU memory"
            )
    return TorchEngine(device)


def install_atomically(tmp: Path, out_dir: Path, overwrite: bool = True) -> None:
    """Rename the finished folder into place; an existing output is replaced only then, and
    only with `overwrite` (a folder may have appeared there since the merge started)."""
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise OutputError(
                f"output {out_dir} appeared while merging; it was left as it is and nothing "
                "was written (pass --overwrite to replace it)"
            )
        trash = beside(out_dir, "old", os.getpid())
        with deferred():  # a signal between the two renames would leave no output
            out_dir.rename(trash)
            tmp.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out_dir)


def build_report(
    recipe: Recipe,
    sources: dict[str, Source],
    plan: MergePlan,
    retention: RetentionCounter | None,
    device: str,
    started: float,
    writer: ShardedWriter,
    bytes_from_network: int,
) -> dict[str, Any]:
    def source_entry(key: str, display: str) -> dict[str, Any]:
        src = sources[key]
        return {"model": display, "repo_id": src.repo_id, "revision": src.revision}

    models = []
    for i, m in enumerate(recipe.models):
        entry = source_entry(m.ref.spec, m.ref.spec if not m.ref.is_local else m.ref.display)
        entry.update(
            {
                "hub_id": m.hub_id,
                "role": m.role,
                "params": {**m.params, **m.settings},
                "retention": retention.for_model(i) if retention else None,
            }
        )
        models.append(entry)
    display = {BASE: recipe.base.display if recipe.base else None}
    display.update({m.ref.spec: (m.ref.spec if not m.ref.is_local else m.ref.display) for m in recipe.models})
    return {
        "tool": {"name": "lrmerge-hub", "version": __version__},
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "recipe_sha256": recipe.sha256(),
        "method": recipe.method,
        "parameters": {**recipe.parameters, **recipe.settings},
        # the same merge as a mergekit 0.1.5 config (None: mergekit has no equivalent)
        # (none when vocabularies differ and ours are kept: mergekit 0.1.5 truncates to the base's only)
        "mergekit_config": to_mergekit(recipe)
        if recipe.tokenizer_source == "base" or recipe.tokenizer or len(set(plan.vocab_rows.values())) <= 1
        else None,
        "dtype": ST_TO_RECIPE.get(plan.out_dtype, plan.out_dtype),
        "languages": list(recipe.languages),
        "license": recipe.license,
        "base": source_entry(BASE, recipe.base.display) if recipe.base else None,
        "models": models,
        "tokenizer_source": display.get(plan.tokenizer_source, plan.tokenizer_source),
        "vocab": {"base_rows": plan.vocab_rows.get(plan.reference), "output_rows": plan.output_vocab},
        "stats": {
            "tensors": len(plan.jobs),
            "parameters": plan.parameters,
            "bytes_read": plan.bytes_to_read,
            "bytes_from_network": bytes_from_network,  # streamed Hub inputs, headers and gaps included
            "bytes_written": writer.bytes_written,
            "peak_disk_bytes": writer.peak_on_disk,  # of weights: shards uploaded and removed no longer count
            "seconds": round(time.perf_counter() - started, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "device": device,
        },
    }


def local_sources(recipe: Recipe) -> dict[str, Source]:
    """Sources for a recipe whose models are all local folders (no Hub access)."""
    sources = {}
    refs = ([(BASE, recipe.base)] if recipe.base else []) + [(m.ref.spec, m.ref) for m in recipe.models]
    for key, ref in refs:
        if ref.path is None:
            raise InputModelError(f"{ref.spec}: a Hub id; pull it first or use a local folder")
        sources[key] = Source(path=ref.path)
    return sources
