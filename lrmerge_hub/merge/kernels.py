"""Fused CPU kernels for ties and slack_ties: the same results as methods.ties_family, faster.

methods.ties_family is the reference: clear, pure torch, about a dozen full passes over
float32 copies plus a selection (kthvalue) per model. Here one tensor costs three passes
over the raw inputs (bfloat16 or float32, read in place, e.g. straight from a memory-mapped
shard; no float32 copy of a whole tensor is ever made), all on every core:

1. a histogram of the top 16 bits of |delta_i| per model (the bits of a non-negative float
   order like the float), which locates the bin holding the k-th largest magnitude;
2. a histogram of the low 16 bits of the entries in that bin: the exact k-th largest
   magnitude, the count above it and the count equal to it ("radix select");
3. trim, weight, elect, agree, disjoint mean, lambda and the cast to the output dtype,
   fused in one loop that also counts kept and agreed entries.

Ties at the threshold are kept in index order until exactly k entries survive, exactly as
methods.trim_to_density does; when there are more tied entries than room, one extra
counting pass tells each parallel chunk how many of its tied entries it may keep.
Every delta is computed as float32(x_i) - float32(base) and every later step in float32 in
the reference's order, so float32 results match the reference to float rounding and the
counts match exactly.

Small tensors (norms, biases) go to the reference: histograms of 65536 bins would cost
more than they save there.
"""

from __future__ import annotations

import math
from typing import Callable

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .methods import ties_family, trim_count

BINS = 1 << 16
# below this many entries the reference is as fast and certainly exact
MIN_FAST_NUMEL = 1 << 18
# parallel chunks per tensor: more than the cores, so a busy core does not stall the rest
CHUNKS = 16
# entries per block inside a chunk: a few rows of float32 that stay in L1/L2
BLOCK = 2048

# -- scalar helpers compiled into the kernels ----------------------------------------------


@intrinsic
def _float_bits(typingctx, x):
    """The IEEE bits of a float32 as a (non-negative) int64."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.int64(types.float32), codegen


@intrinsic
def _bits_float(typingctx, x):
    """The float32 whose IEEE bits are the low 32 bits of an int64."""
    if x != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return types.float32(types.int64), codegen


def _load(a, j):  # pragma: no cover - replaced by the overload inside kernels
    raise NotImplementedError


@overload(_load, inline="always")
def _load_impl(a, j):
    """Entry j of an input as float32: bfloat16 arrives as its uint16 bits."""
    if a.dtype == types.uint16:
        return lambda a, j: _bits_float(np.int64(a[j]) << 16)
    if a.dtype == types.float32:
        return lambda a, j: a[j]
    return None


def _store(a, j, v):  # pragma: no cover - replaced by the overload inside kernels
    raise NotImplementedError


@overload(_store, inline="always")
def _store_impl(a, j, v):
    """Write float32 v to an output: bfloat16 (as uint16 bits) rounds to nearest even."""
    if a.dtype == types.uint16:

        def store_bf16(a, j, v):
            u = _float_bits(v)
            if v != v:  # NaN stays a quiet NaN of the same sign
                a[j] = np.uint16((u >> 16) | 0x40)
            else:
                a[j] = np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)

        return store_bf16
    if a.dtype == types.float32:

        def store_f32(a, j, v):
            a[j] = v

        return store_f32
    return None


@numba.njit(inline="always")
def _chunk_bounds(n, chunks, c):
    return n * c // chunks, n * (c + 1) // chunks


# -- the three passes -----------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _sum_chunks(local):
    total = np.zeros(local.shape[1:], dtype=np.int64)
    for c in range(local.shape[0]):
        total += local[c]
    return total


@numba.njit(parallel=True, cache=True, nogil=True)
def _count_nonfinite(a):
    """How many entries of a bfloat16 (uint16 bits) or float32 input are NaN or Inf."""
    n = a.shape[0]
    counts = np.zeros(CHUNKS, dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        s = 0
        for j in range(lo, hi):
            s += (_float_bits(_load(a, j)) & 0x7F800000) == 0x7F800000
        counts[c] = s
    return counts.sum()


@numba.njit(parallel=True, cache=True, nogil=True)
def _hist_high(xs, base, active):
    """Per model, the histogram of the top 16 bits of |x_i - base| (float32 bits)."""
    m, n = len(xs), base.shape[0]
    local = np.zeros((CHUNKS, m, BINS), dtype=np.int32)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for i in range(m):
            if not active[i]:
                continue
            x = xs[i]
            h = local[c, i]
            for j in range(lo, hi):
                d = _load(x, j) - _load(base, j)
                h[(_float_bits(d) & 0x7FFFFFFF) >> 16] += 1
    return _sum_chunks(local)


@numba.njit(parallel=True, cache=True, nogil=True)
def _hist_low(xs, base, active, high_bin):
    """Per model, the histogram of the low 16 bits of |delta| among entries whose top 16
    bits equal high_bin[i]."""
    m, n = len(xs), base.shape[0]
    local = np.zeros((CHUNKS, m, BINS), dtype=np.int32)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for i in range(m):
            if not active[i]:
                continue
            x = xs[i]
            h = local[c, i]
            want = high_bin[i]
            for j in range(lo, hi):
                u = _float_bits(_load(x, j) - _load(base, j)) & 0x7FFFFFFF
                if (u >> 16) == want:
                    h[u & 0xFFFF] += 1
    return _sum_chunks(local)


@numba.njit(parallel=True, cache=True, nogil=True)
def _count_ties(xs, base, threshold):
    """Per chunk and model, how many entries have |delta| bits equal to the threshold."""
    m, n = len(xs), base.shape[0]
    counts = np.zeros((CHUNKS, m), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for i in range(m):
            x = xs[i]
            t = threshold[i]
            s = 0
            for j in range(lo, hi):
                s += (_float_bits(_load(x, j) - _load(base, j)) & 0x7FFFFFFF) == t
            counts[c, i] = s
    return counts


@numba.njit(parallel=True, cache=True, nogil=True)
def _merge(xs, base, threshold, limit, weights, votes, normalize, lam, out):
    """Trim (keep |delta| bits > threshold[i], and bits == threshold[i] at indices below
    limit[chunk, i]), weight, elect with votes, disjoint-merge and write base + lam * merged.
    Returns per-chunk kept and agreed counts, each (CHUNKS, m).

    Works on blocks of BLOCK entries, model by model, so that every inner loop is a
    branch-free loop over contiguous memory that the compiler vectorizes."""
    m, n = len(xs), base.shape[0]
    kept = np.zeros((CHUNKS, m), dtype=np.int64)
    agreed = np.zeros((CHUNKS, m), dtype=np.int64)
    zero = np.float32(0.0)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        rows = np.empty((m, BLOCK), dtype=np.float32)
        b = np.empty(BLOCK, dtype=np.float32)
        total = np.empty(BLOCK, dtype=np.float32)
        merged = np.empty(BLOCK, dtype=np.float32)
        divisor = np.empty(BLOCK, dtype=np.float32)
        for s in range(lo, hi, BLOCK):
            size = min(BLOCK, hi - s)
            for j in range(size):
                b[j] = _load(base, s + j)
            for i in range(m):
                x, t, lim = xs[i], threshold[i], limit[c, i] - s
                w, v = weights[i], votes[i]
                row = rows[i]
                count = 0
                for j in range(size):
                    d = _load(x, s + j) - b[j]
                    u = _float_bits(d) & 0x7FFFFFFF
                    wd = d * w if (u > t) | ((u == t) & (j < lim)) else zero
                    row[j] = wd
                    count += wd != zero
                kept[c, i] += count
                if i == 0:
                    for j in range(size):
                        total[j] = row[j] * v
                else:
                    for j in range(size):
                        total[j] += row[j] * v
            for j in range(size):
                merged[j] = zero
                divisor[j] = zero
            for i in range(m):
                row, w = rows[i], weights[i]
                count = 0
                for j in range(size):
                    wd = row[j]
                    agree = (wd != zero) & ((wd > zero) == (total[j] >= zero))
                    merged[j] += wd if agree else zero
                    divisor[j] += w if agree else zero
                    count += agree
                agreed[c, i] += count
            if normalize:
                for j in range(size):
                    dv = divisor[j] if divisor[j] != zero else np.float32(1.0)
                    _store(out, s + j, b[j] + lam * (merged[j] / dv))
            else:
                for j in range(size):
                    _store(out, s + j, b[j] + lam * merged[j])
    return kept, agreed


@numba.njit(cache=True, nogil=True)
def _tie_limit(x, base, t, lo, hi, room):
    """The index in [lo, hi) just after the room-th entry whose |delta| bits equal t."""
    for j in range(lo, hi):
        if (_float_bits(_load(x, j) - _load(base, j)) & 0x7FFFFFFF) == t:
            room -= 1
            if room == 0:
                return j + 1
    return hi


# -- selection from the histograms ------------------------------------------------------------


def _top_bin(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value, and how many values lie in higher bins."""
    from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(from_top, k))  # first position where the running count >= k
    b = BINS - 1 - idx
    return b, int(from_top[idx] - hist[b])


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A flat zero-copy numpy view: bfloat16 as its uint16 bits, float32 as is."""
    flat = t.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def _kernel_inputs(base: torch.Tensor, tensors: list[torch.Tensor]) -> tuple:
    """Inputs as same-typed flat numpy views; anything but all-bf16 or all-f32 becomes f32."""
    dtypes = {base.dtype, *(t.dtype for t in tensors)}
    if dtypes not in ({torch.bfloat16}, {torch.float32}):
        base, tensors = base.float(), [t.float() for t in tensors]
    cont = [t.contiguous() for t in (base, *tensors)]
    return _as_numpy(cont[0]), tuple(_as_numpy(t) for t in cont[1:]), cont


class NonFiniteInput(ValueError):
    """An input holds NaN or Inf; `which` is -1 for the base, else the model's index."""

    def __init__(self, which: int):
        super().__init__(f"input {which} contains NaN or Inf")
        self.which = which


def fused_ties(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    slacks: list[float],
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype = torch.float32,
    check_finite: bool = False,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """ties / slack_ties of one tensor on CPU: (merged tensor in out_dtype, kept, agreed).

    Inputs: the base and one tensor per model, same shape, on CPU, bfloat16 or float32
    (other dtypes are converted). Results equal methods.ties_family's to float rounding
    (computed in float32); kept/agreed have the meaning of methods.MergeStats.
    With check_finite, a NaN or Inf in any input raises NonFiniteInput.
    """
    n = base.numel()
    if n < MIN_FAST_NUMEL or base.device.type != "cpu":
        if check_finite:
            for which, t in enumerate((base, *tensors)):
                if not torch.isfinite(t).all():
                    raise NonFiniteInput(which - 1)
        return _reference(base, tensors, weights, densities, slacks, lam, normalize, out_dtype)
    m = len(tensors)
    b, xs, keep_alive = _kernel_inputs(base, tensors)
    if check_finite:
        for which, a in enumerate((b, *xs)):
            if _count_nonfinite(a):
                raise NonFiniteInput(which - 1)
    ks = [trim_count(n, d) for d in densities]
    active = np.array([k < n for k in ks], dtype=np.bool_)
    threshold = np.full(m, -1, dtype=np.int64)  # -1: every entry is above it (no trim)
    above = [0] * m
    ties_at = [0] * m
    if active.any():
        high = _hist_high(xs, b, active)
        high_bin = np.zeros(m, dtype=np.int64)
        for i in np.flatnonzero(active):
            high_bin[i], above[i] = _top_bin(high[i], ks[i])
        low = _hist_low(xs, b, active, high_bin)
        for i in np.flatnonzero(active):
            low_bin, above_low = _top_bin(low[i], ks[i] - above[i])
            threshold[i] = (high_bin[i] << 16) | low_bin
            above[i] += above_low
            ties_at[i] = int(low[i][low_bin])
    # entries equal to the threshold are kept below limit[chunk, i] (all of them unless
    # there are more than room for: then the first ones in index order)
    limit = np.full((CHUNKS, m), n, dtype=np.int64)
    crowded = [i for i in range(m) if active[i] and ties_at[i] > ks[i] - above[i]]
    if crowded:
        per_chunk = _count_ties(xs, b, threshold)
        for i in crowded:
            room = ks[i] - above[i]
            for c in range(CHUNKS):
                lo, hi = n * c // CHUNKS, n * (c + 1) // CHUNKS
                if room <= 0:
                    limit[c, i] = lo
                elif room < per_chunk[c, i]:
                    limit[c, i] = _tie_limit(xs[i], b, threshold[i], lo, hi, room)
                room -= per_chunk[c, i]
    use_bf16 = out_dtype == torch.bfloat16
    out = np.empty(n, dtype=np.uint16 if use_bf16 else np.float32)
    kept, agreed = _merge(
        xs, b, threshold, limit,
        np.array(weights, dtype=np.float32), np.array([1.0 + s for s in slacks], dtype=np.float32),
        bool(normalize), np.float32(lam), out,
    )
    del keep_alive
    result = torch.from_numpy(out)
    result = result.view(torch.bfloat16) if use_bf16 else result.to(out_dtype)
    return (result.reshape(base.shape), [int(v) for v in kept.sum(0)],
            [int(v) for v in agreed.sum(0)])


def _reference(base, tensors, weights, densities, slacks, lam, normalize, out_dtype):
    model_params = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    merged, stats = ties_family(base.float(), [t.float() for t in tensors], model_params,
                                {"lambda": lam, "normalize": normalize}, list(slacks))
    return merged.to(out_dtype), stats.kept.tolist(), stats.agreed.tolist()


def _fast_path(slack: bool) -> Callable:
    def run(base, tensors, model_params, params, out_dtype=torch.float32, check_finite=False):
        return fused_ties(
            base, tensors,
            [float(p["weight"]) for p in model_params],
            [float(p["density"]) for p in model_params],
            [float(p.get("slack", 0.0)) if slack else 0.0 for p in model_params],
            float(params["lambda"]), bool(params["normalize"]), out_dtype, check_finite,
        )

    return run


# method name -> fn(base, tensors, model_params, params, out_dtype, check_finite)
#   -> (tensor in out_dtype, kept, agreed);
# the engine uses these on CPU instead of the reference in methods.METHODS.
FAST_PATHS: dict[str, Callable] = {"ties": _fast_path(False), "slack_ties": _fast_path(True)}
