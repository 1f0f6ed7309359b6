"""The torch engine: ties and slack_ties on any torch device, bit-identical to kernels.py.

kernels.py is the fast CPU path; this is the same computation written with torch
operations, so that it runs on a GPU (or on a CPU, where CI proves the two agree). Equal
bits follow from doing exactly what the kernels do, in the same order, in float32:

- delta = float32(x) - float32(base); bfloat16 widens exactly.
- The trim threshold is selected on the float bits (an int32 view of |delta|, ordered like
  the magnitudes): a radix select by two 65536-bin histograms (`bincount`), exact on every
  device. `topk` and `kthvalue` are not used: neither promises which of several equal
  magnitudes it picks, and kthvalue is slow on CUDA.
- Ties at the threshold are kept in index order until exactly k entries survive.
- Per model, in model order: wd = delta * w where kept (else 0); total = wd * vote (first
  model), total = total + wd * vote (the others). Each product and sum is its own operation
  (no fused multiply-add, which the kernels do not use either).
- agree = wd != 0 and (wd > 0) == (total >= 0); merged and divisor are summed in model
  order; out = base + lambda * (merged / divisor, a divisor of 0 counting as 1).
- The cast to bfloat16 rounds to nearest even, as the kernels' store does.

The functions take and return flat numpy arrays like the kernels (bfloat16 as uint16 bits),
so the engine calls either one the same way.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .methods import trim_count

if TYPE_CHECKING:
    import torch

BINS = 1 << 16


def to_float32(a: torch.Tensor) -> torch.Tensor:
    """float32 of a flat input on its device: bfloat16 bits (int16/uint16) widen exactly."""
    import torch

    if a.dtype in (torch.int16, torch.uint16):
        return (a.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    return a.to(torch.float32)


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """The IEEE bits of |delta| as int32: non-negative, and ordered like the magnitudes."""
    import torch

    return delta.abs().view(torch.int32)


def _top_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value, and how many values lie in higher bins."""
    import torch

    from_top = torch.cumsum(hist.flip(0), 0)
    idx = int(torch.searchsorted(from_top, torch.tensor([k], device=hist.device, dtype=from_top.dtype))[0])
    b = BINS - 1 - idx
    return b, int(from_top[idx]) - int(hist[b])


def select_threshold(bits: torch.Tensor, k: int) -> tuple[int, int]:
    """(threshold bits t, tie index limit) for keeping the k largest of flat int32 `bits`:
    entries with bits > t are kept, and entries equal to t at indices below the limit."""
    import torch

    n = bits.numel()
    high = bits >> 16
    high_bin, above = _top_bin(torch.bincount(high, minlength=BINS), k)
    low = torch.bincount(bits[high == high_bin] & 0xFFFF, minlength=BINS)
    low_bin, above_low = _top_bin(low, k - above)
    t = (high_bin << 16) | low_bin
    room = k - above - above_low
    if int(low[low_bin]) <= room:
        return t, n
    tied = torch.nonzero(bits == t).view(-1)
    return t, int(tied[room - 1]) + 1


def trim_mask(delta: torch.Tensor, k: int) -> torch.Tensor | None:
    """Which entries of a flat float32 delta the trim keeps (None: all of them)."""

    n = delta.numel()
    if k >= n:
        return None
    bits = magnitude_bits(delta)
    t, limit = select_threshold(bits, k)
    keep = bits > t
    if limit > 0:
        at_t = bits[:limit] == t
        keep[:limit] |= at_t
    return keep


def ties_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    slacks: list[float],
    lam: float,
    normalize: bool,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """ties / slack_ties of one flat float32 tensor on its device: (merged float32, kept,
    agreed), equal bit for bit to kernels.fused_ties."""
    import torch

    dev, f32 = base.device, torch.float32
    zero = torch.zeros((), dtype=f32, device=dev)

    def scalar(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=f32, device=dev)  # rounded to float32 as the kernels do

    n = base.numel()
    rows, kept = [], []
    total: torch.Tensor | None = None
    for x, w, d, s in zip(tensors, weights, densities, slacks):
        delta = x - base
        keep = trim_mask(delta, trim_count(n, d))
        wd = delta * scalar(w)
        if keep is not None:
            wd = torch.where(keep, wd, zero)
        del delta, keep
        vote = wd * scalar(1.0 + s)
        total = vote if total is None else total + vote
        del vote
        kept.append(int(torch.count_nonzero(wd)))
        rows.append(wd)
    merged: torch.Tensor | None = None
    divisor: torch.Tensor | None = None
    agreed = []
    positive_total = total >= 0
    for wd, w in zip(rows, weights):
        agree = (wd != 0) & ((wd > 0) == positive_total)
        agreed.append(int(torch.count_nonzero(agree)))
        part = torch.where(agree, wd, zero)
        merged = part if merged is None else merged + part
        if normalize:
            share = torch.where(agree, scalar(w), zero)
            divisor = share if divisor is None else divisor + share
    del rows, total, positive_total
    if normalize:
        merged = merged / torch.where(divisor != 0, divisor, scalar(1.0))
    return base + scalar(lam) * merged, kept, agreed


def host_tensor(a: np.ndarray) -> torch.Tensor:
    """A zero-copy torch view of a flat numpy array, read-only ones (memory-mapped shards)
    included: nothing here writes to it."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the array is not writable
        return torch.from_numpy(a)


def device_tensor(a: np.ndarray, device: str) -> torch.Tensor:
    """A flat numpy input (bfloat16 as uint16 bits) as a float32 tensor on `device`."""
    return to_float32(host_tensor(a.view(np.int16) if a.dtype == np.uint16 else a).to(device, non_blocking=True))


def torch_ties(base: torch.Tensor, tensors: list[torch.Tensor], model_params: list[dict[str, Any]],
               params: dict[str, Any], slack: bool) -> tuple[torch.Tensor, list[int], list[int]]:
    """ties (slack False) or slack_ties of float32 device tensors, with the recipe's parameters."""
    return ties_merge(
        base, tensors,
        [float(p["weight"]) for p in model_params],
        [float(p["density"]) for p in model_params],
        [float(p.get("slack", 0.0)) if slack else 0.0 for p in model_params],
        float(params["lambda"]), bool(params["normalize"]),
    )


# methods whose torch implementation here replaces the reference in methods.METHODS (the
# others' reference functions are already plain torch, the same on every device)
TORCH_METHODS: dict[str, Callable] = {
    "ties": lambda b, t, mp, p: torch_ties(b, t, mp, p, slack=False),
    "slack_ties": lambda b, t, mp, p: torch_ties(b, t, mp, p, slack=True),
}

# output dtype code -> the numpy dtype the writer takes (bfloat16 as its bits)
_NUMPY_OUT = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
# below this many entries a tensor is merged on the CPU even when the device is a GPU: the
# same torch code gives the same bits there, and norms and biases cost more in launches,
# synchronisations and copies than in arithmetic
SMALL_NUMEL = 1 << 16


class TorchEngine:
    """Merges tensors with torch on one device, the next tensor's inputs staged ahead.

    On CUDA, a staging thread copies each input from its memory-mapped pages into a reused
    pinned host buffer and from there to the device on its own stream, while the main thread
    computes the previous tensor; results come back through two pinned buffers used in turn
    (the engine's writer holds at most one finished tensor while the next is merged). On a
    CPU, inputs are viewed in place and only widened to float32.
    """

    def __init__(self, device: str):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._stager = ThreadPoolExecutor(1, thread_name_prefix="lrmerge-stage")
        self._staged: dict[str, Future] = {}
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pinned_in: torch.Tensor | None = None
        self._pinned_out: list[torch.Tensor | None] = [None, None]
        self._turn = 0

    # -- inputs ---------------------------------------------------------------------------

    def stage(self, key: str, arrays: list[np.ndarray]) -> None:
        """Start moving a tensor's inputs (flat numpy arrays) to the device."""
        if key not in self._staged:
            self._staged[key] = self._stager.submit(self._upload, arrays)

    def _pinned(self, current: torch.Tensor | None, nbytes: int) -> torch.Tensor:
        import torch

        if current is None or current.numel() < nbytes:
            current = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
        return current

    def _upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        import torch

        if not self.cuda:
            return [device_tensor(a, "cpu") for a in arrays]
        if sum(a.size for a in arrays) < SMALL_NUMEL * len(arrays):
            return [device_tensor(a, "cpu") for a in arrays]  # see SMALL_NUMEL
        self._pinned_in = self._pinned(self._pinned_in, sum(a.nbytes for a in arrays))
        out, offset = [], 0
        # everything on the copy stream, widening included, so that the raw copies are freed
        # where they were used; the float32 results are handed to the compute stream in take()
        with torch.cuda.stream(self._copy_stream):
            for a in arrays:
                host = self._pinned_in[offset:offset + a.nbytes]
                host.copy_(host_tensor(a.view(np.uint8)))  # pages fault in here, ahead of use
                raw = torch.empty(a.nbytes, dtype=torch.uint8, device=self.device)
                raw.copy_(host, non_blocking=True)
                out.append(to_float32(raw.view(_torch_bits_dtype(a))))
                offset += a.nbytes
            self._copy_stream.synchronize()  # the pinned buffer is free again for the next tensor
        return out

    def take(self, key: str, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """The staged float32 inputs of a tensor (staged now if they were not)."""
        import torch

        self.stage(key, arrays)
        inputs = self._staged.pop(key).result()
        if self.cuda:
            for t in inputs:  # made on the copy stream, used (and freed) on the compute stream
                if t.is_cuda:
                    t.record_stream(torch.cuda.current_stream(self.device))
        return inputs

    # -- outputs --------------------------------------------------------------------------

    def to_host(self, t: torch.Tensor, out_dtype: str) -> np.ndarray:
        """A flat float32 result in the output dtype as a numpy array (bfloat16 as bits)."""
        import torch

        from .st_io import as_array, torch_dtype

        converted = t.reshape(-1).to(torch_dtype(out_dtype))
        if not converted.is_cuda or out_dtype not in _NUMPY_OUT:
            return as_array(converted)
        bits = converted.view(torch.uint8)
        turn, self._turn = self._turn, 1 - self._turn
        self._pinned_out[turn] = self._pinned(self._pinned_out[turn], bits.numel())
        host = self._pinned_out[turn][:bits.numel()]
        host.copy_(bits, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.numpy().view(_NUMPY_OUT[out_dtype])

    def peak_bytes(self) -> int | None:
        """Peak device memory allocated so far (CUDA), else None."""
        import torch

        return int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None

    def close(self) -> None:
        self._stager.shutdown(wait=True)
        self._staged.clear()


def _torch_bits_dtype(a: np.ndarray) -> torch.dtype:
    import torch

    return {np.dtype(np.uint16): torch.int16, np.dtype(np.float16): torch.float16,
            np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[a.dtype]


def device_budget(device: str) -> int | None:
    """Free memory on a CUDA device in bytes, else None (no limit we can tell)."""
    import torch

    if not str(device).startswith("cuda"):
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def device_bytes_needed(numel: int, models: int) -> int:
    """Device memory one tensor of `numel` entries needs here, at most: the float32 inputs
    (base and models), one weighted row per model, the vote total, merged and divisor,
    the selection's int32 view and masks, and the output; with room for the next tensor's
    staged inputs."""
    inputs = (models + 1) * numel * 4
    work = (models + 4) * numel * 4 + 3 * numel * 4
    return 2 * inputs + work


def host_to_device_rate(device: str, nbytes: int = 64 << 20) -> float:
    """Bytes per second of a pinned host-to-device copy (best of three), as measured now."""
    import time

    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best
