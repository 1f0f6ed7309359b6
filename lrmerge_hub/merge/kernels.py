"""Fused CPU kernels for ties and slack_ties: the same results as methods.ties_family, faster.

methods.ties_family is the reference: clear, pure torch, about a dozen full passes over
float32 copies plus a selection (kthvalue) per model. Here one tensor costs two passes over
the raw inputs (bfloat16 or float32, read in place, e.g. straight from a memory-mapped
shard; no float32 copy of a whole tensor is ever made), on every core:

1. select: the k-th largest |delta_i| is bracketed from a random sample of 65536 entries;
   one pass counts the entries above the bracket and collects (bits, index) of the few
   inside it (and checks every input for NaN/Inf); the exact threshold is then selected
   among those candidates. The bits of a non-negative float order like the float, so all
   of this works on integers. When the sample misleads (the k-th value falls outside the
   bracket, or too many entries fall inside), an exact radix select runs instead: a
   histogram of the top 16 bits, then one of the low 16 bits within the chosen bin.
2. merge: trim, weight, elect, agree, disjoint mean, lambda and the cast to the output
   dtype, fused in one blocked loop that also counts kept and agreed entries.

Ties at the threshold are kept in index order until exactly k entries survive, exactly as
methods.trim_to_density does: entries equal to the threshold are kept below an index limit.
Every delta is computed as float32(x_i) - float32(base) and every later step in float32 in
the reference's order, so float32 results match the reference to float rounding and the
counts match exactly.

Small tensors (norms, biases) go to the reference: the fixed costs would outweigh the gain.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .methods import ties_family, trim_count

# numba's "workqueue" threads sleep when idle; the OpenMP layer spins, which on a shared
# 2-core machine burns the CPU time the other worker needs (measured: ~25% more CPU for
# the same merge). The kernels are only ever called from one Python thread at a time.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

BINS = 1 << 16
# entries sampled to bracket the threshold, and the bracket's half-width in standard
# deviations of the sample's rank (a miss only costs the exact fallback)
SAMPLE = 1 << 16
SAMPLE_RUN = 256
SIGMAS = 6.0
# thresholds inside the bracket counted in the same pass, narrowing it this many fold
QS = 16
# brackets narrower than this many float bit patterns select by counting
COUNTING_RANGE = 1 << 22
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


@numba.njit(cache=True, nogil=True)
def _sample_bits(x, base, idx):
    """|delta| bits at the sampled positions."""
    out = np.empty(idx.shape[0], dtype=np.int64)
    for s in range(idx.shape[0]):
        j = idx[s]
        out[s] = _float_bits(_load(x, j) - _load(base, j)) & 0x7FFFFFFF
    return out


# Inner loops are separate functions over plain arrays: indexing the tuple of inputs with a
# loop variable inside the loop keeps the compiler from vectorizing it (5x slower).


@numba.njit(cache=True, nogil=True)
def _count_nonfinite(x, s, e):
    count = 0
    for j in range(s, e):
        count += (_float_bits(_load(x, j)) & 0x7F800000) == 0x7F800000
    return count


@numba.njit(cache=True, nogil=True)
def _count_block(x, base, s, e, qs, t_hi, u, counts):
    """Over [s, e): add to counts[q] the entries whose |delta| bits are >= qs[q]; return
    (NaN/Inf entries of x, entries above t_hi). Branch-free loops over a block buffer, so
    they vectorize: well under a nanosecond per entry."""
    size = e - s
    nonfinite = 0
    count_above = 0
    for j in range(size):
        v = _load(x, s + j)
        nonfinite += (_float_bits(v) & 0x7F800000) == 0x7F800000
        bits = _float_bits(v - _load(base, s + j)) & 0x7FFFFFFF
        u[j] = bits
        count_above += bits > t_hi
    for q in range(qs.shape[0]):
        t = qs[q]
        count = 0
        for j in range(size):
            count += u[j] >= t
        counts[q] += count
    return nonfinite, count_above


@numba.njit(parallel=True, cache=True, nogil=True)
def _count_pass(xs, base, active, qs, hi_bits):
    """One pass over every input. Per chunk and model: how many |delta| bits are >= each
    qs[i, q] (ascending thresholds inside the bracket) and how many exceed hi_bits[i]; and
    the NaN/Inf entries of the base (column 0) and of each model (column i + 1)."""
    m, n = len(xs), base.shape[0]
    at_least = np.zeros((CHUNKS, m, qs.shape[1]), dtype=np.int64)
    above = np.zeros((CHUNKS, m), dtype=np.int64)
    bad = np.zeros((CHUNKS, m + 1), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        u = np.empty(BLOCK, dtype=np.int32)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            bad[c, 0] += _count_nonfinite(base, s, e)
            for i in range(m):
                if active[i]:
                    nonfinite, count_above = _count_block(xs[i], base, s, e, qs[i], hi_bits[i], u,
                                                          at_least[c, i])
                    above[c, i] += count_above
                    bad[c, i + 1] += nonfinite
                else:
                    bad[c, i + 1] += _count_nonfinite(xs[i], s, e)
    return at_least, above, bad


@numba.njit(cache=True, nogil=True)
def _collect_range(x, base, s, e, t_lo, t_hi, bits, idx, pos):
    """Write (bits, index) of the entries of [s, e) with |delta| bits in [t_lo, t_hi] from
    position pos on; return the next position."""
    for j in range(s, e):
        u = _float_bits(_load(x, j) - _load(base, j)) & 0x7FFFFFFF
        if (u >= t_lo) & (u <= t_hi):
            bits[pos] = u
            idx[pos] = j
            pos += 1
    return pos


@numba.njit(parallel=True, cache=True, nogil=True)
def _collect(x, base, t_lo, t_hi, offsets, bits, idx):
    """The candidates of one model in index order; chunk c writes from offsets[c] (the
    counts of the pass before tell exactly how many each chunk holds)."""
    n = base.shape[0]
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        _collect_range(x, base, lo, hi, t_lo, t_hi, bits, idx, offsets[c])


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


@numba.njit(cache=True, nogil=True)
def _trim_block(x, base, s, e, t, lim, w, v, row, total, first):
    """row = w * trimmed delta over [s, e); total (=, or += unless first) row * vote.
    Returns how many entries of row are nonzero (kept)."""
    zero = np.float32(0.0)
    count = 0
    for j in range(s, e):
        d = _load(x, j) - _load(base, j)
        u = _float_bits(d) & 0x7FFFFFFF
        wd = d * w if (u > t) | ((u == t) & (j < lim)) else zero
        row[j - s] = wd
        count += wd != zero
        if first:
            total[j - s] = wd * v
        else:
            total[j - s] += wd * v
    return count


@numba.njit(cache=True, nogil=True)
def _agree_block(row, total, w, merged, divisor, size, first):
    """Add the entries of row whose sign agrees with sign(total) (>= 0 is +) to merged, and
    w to divisor there (=, unless first: +=). Returns how many agreed."""
    zero = np.float32(0.0)
    count = 0
    for j in range(size):
        wd = row[j]
        agree = (wd != zero) & ((wd > zero) == (total[j] >= zero))
        if first:
            merged[j] = wd if agree else zero
            divisor[j] = w if agree else zero
        else:
            merged[j] += wd if agree else zero
            divisor[j] += w if agree else zero
        count += agree
    return count


@numba.njit(cache=True, nogil=True)
def _write_block(base, out, s, e, merged, divisor, lam, normalize):
    """out = base + lam * merged (divided by the agreeing weights, 0 counting as 1)."""
    one, zero = np.float32(1.0), np.float32(0.0)
    for j in range(s, e):
        m = merged[j - s]
        if normalize:
            dv = divisor[j - s]
            m = m / (dv if dv != zero else one)
        _store(out, j, _load(base, j) + lam * m)


@numba.njit(parallel=True, cache=True, nogil=True)
def _merge(xs, base, threshold, limit, weights, votes, normalize, lam, out):
    """Trim (keep |delta| bits > threshold[i], and bits == threshold[i] at indices below
    limit[i]), weight, elect with votes, disjoint-merge and write base + lam * merged.
    Returns per-chunk kept and agreed counts, each (CHUNKS, m).

    Works on blocks of BLOCK entries, model by model, so that the inputs are read once and
    every inner loop is a branch-free loop over contiguous memory."""
    m, n = len(xs), base.shape[0]
    kept = np.zeros((CHUNKS, m), dtype=np.int64)
    agreed = np.zeros((CHUNKS, m), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        rows = np.empty((m, BLOCK), dtype=np.float32)
        total = np.empty(BLOCK, dtype=np.float32)
        merged = np.empty(BLOCK, dtype=np.float32)
        divisor = np.empty(BLOCK, dtype=np.float32)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            for i in range(m):
                kept[c, i] += _trim_block(xs[i], base, s, e, threshold[i], limit[i], weights[i],
                                          votes[i], rows[i], total, i == 0)
            for i in range(m):
                agreed[c, i] += _agree_block(rows[i], total, weights[i], merged, divisor, e - s, i == 0)
            _write_block(base, out, s, e, merged, divisor, lam, normalize)
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


_SAMPLES: dict[int, np.ndarray] = {}


def _sample_index(n: int) -> np.ndarray:
    """SAMPLE sorted positions in [0, n), the same for every tensor of that size: runs of
    SAMPLE_RUN consecutive entries at random places. Runs touch few pages of a memory-mapped
    input (scattered positions would fault in the whole tensor here, on one thread; the
    parallel pass after it is the better place for that)."""
    if n not in _SAMPLES:
        runs = SAMPLE // SAMPLE_RUN
        starts = np.sort(np.random.default_rng(n).integers(0, n - SAMPLE_RUN + 1, runs))
        _SAMPLES[n] = (starts[:, None] + np.arange(SAMPLE_RUN)[None, :]).reshape(-1)
    return _SAMPLES[n]


def _bracket(xs: tuple, b: np.ndarray, i: int, k: int, n: int) -> tuple[np.ndarray, int]:
    """From a sample of |delta_i| bits: a bracket [qs[0], hi] that holds the k-th largest
    with near certainty, and QS ascending thresholds qs splitting it by sample quantiles, so
    that one counting pass narrows the bracket QS-fold."""
    bits = np.sort(_sample_bits(xs[i], b, _sample_index(n)))[::-1]  # descending
    p = k / n
    rank = p * SAMPLE
    margin = SIGMAS * math.sqrt(SAMPLE * p * (1 - p)) + 8
    top, bottom = int(rank - margin), int(math.ceil(rank + margin))
    hi = int(bits[top]) if top >= 0 else 0x7FFFFFFF
    ranks = np.linspace(min(bottom, SAMPLE), max(top, 0), QS, endpoint=False).astype(np.int64)
    qs = np.array([int(bits[r]) if r < SAMPLE else 0 for r in ranks], dtype=np.int32)
    return qs, hi


def _narrow(qs: np.ndarray, hi: int, at_least: np.ndarray, above: np.ndarray,
            k: int) -> tuple[int, int, np.ndarray, np.ndarray] | None:
    """The sub-bracket [lo, hi] holding the k-th largest, with per-chunk counts of entries
    above it and inside it; None when the k-th largest lies outside the whole bracket."""
    total = at_least.sum(0)
    if int(above.sum()) >= k or int(total[0]) < k:
        return None
    q = int(np.flatnonzero(total >= k)[-1])
    if q == qs.shape[0] - 1:
        return int(qs[q]), hi, above, at_least[:, q] - above
    return int(qs[q]), int(qs[q + 1]) - 1, at_least[:, q + 1], at_least[:, q] - at_least[:, q + 1]


@numba.njit(cache=True, nogil=True)
def _kth_largest_in_range(bits, room, lo, hi):
    """The room-th largest of bits, all within [lo, hi], by counting: candidates are often
    heavily tied (bfloat16 deltas take few values), which makes partitioning slow."""
    counts = np.zeros(hi - lo + 1, dtype=np.int64)
    for j in range(bits.shape[0]):
        counts[bits[j] - lo] += 1
    for v in range(hi - lo, -1, -1):
        room -= counts[v]
        if room <= 0:
            return lo + v
    return lo


def _select(x: np.ndarray, b: np.ndarray, lo: int, hi: int, above: np.ndarray,
            inside: np.ndarray, k: int) -> tuple[int, int] | None:
    """(threshold bits, tie index limit) given per-chunk counts of entries above and within
    the bracket [lo, hi]; None when the k-th largest lies outside it."""
    n = b.shape[0]
    room = k - int(above.sum())
    if room < 1 or room > int(inside.sum()):
        return None
    if lo == hi:  # every candidate is tied at the threshold: find where the room runs out
        t, at_t = lo, inside
    else:
        offsets = np.concatenate([[0], np.cumsum(inside)])
        bits = np.empty(int(offsets[-1]), dtype=np.int32)
        idx = np.empty(int(offsets[-1]), dtype=np.int64)
        _collect(x, b, lo, hi, offsets[:-1].copy(), bits, idx)
        if hi - lo < COUNTING_RANGE:
            t = int(_kth_largest_in_range(bits, room, lo, hi))
        else:
            t = int(np.partition(bits, bits.shape[0] - room)[bits.shape[0] - room])
        room -= int(np.count_nonzero(bits > t))
        tied = idx[bits == t]
        return t, (int(tied[room - 1]) + 1 if room < tied.shape[0] else n)
    if room == int(at_t.sum()):
        return t, n
    before = np.concatenate([[0], np.cumsum(at_t)])
    c = int(np.searchsorted(before, room, side="left")) - 1  # chunk holding the room-th tie
    lo_c, hi_c = n * c // CHUNKS, n * (c + 1) // CHUNKS
    return t, int(_tie_limit(x, b, t, lo_c, hi_c, room - int(before[c])))


def _exact_select(xs: tuple, b: np.ndarray, i: int, k: int, n: int) -> tuple[int, int]:
    """(threshold bits, tie index limit) by radix select: two histograms and, when the
    threshold is shared by more entries than there is room for, a scan for the limit."""
    active = np.zeros(len(xs), dtype=np.bool_)
    active[i] = True
    high_bin, above = _top_bin(_hist_high(xs, b, active)[i], k)
    bins = np.zeros(len(xs), dtype=np.int64)
    bins[i] = high_bin
    low = _hist_low(xs, b, active, bins)[i]
    low_bin, above_low = _top_bin(low, k - above)
    t = (high_bin << 16) | low_bin
    room = k - above - above_low
    limit = n if int(low[low_bin]) <= room else _tie_limit(xs[i], b, t, 0, n, room)
    return t, limit


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
    ks = [trim_count(n, d) for d in densities]
    active = np.array([k < n for k in ks], dtype=np.bool_)
    threshold = np.full(m, -1, dtype=np.int64)  # -1: every entry is above it (no trim)
    limit = np.full(m, n, dtype=np.int64)  # entries equal to the threshold kept below this
    qs = np.zeros((m, QS), dtype=np.int32)
    hi_bits = np.zeros(m, dtype=np.int64)
    for i in np.flatnonzero(active):
        qs[i], hi_bits[i] = _bracket(xs, b, i, ks[i], n)
    at_least, above, bad = _count_pass(xs, b, active, qs, hi_bits)
    if check_finite and bad.any():
        raise NonFiniteInput(int(np.flatnonzero(bad.sum(0))[0]) - 1)
    for i in np.flatnonzero(active):
        narrowed = _narrow(qs[i], int(hi_bits[i]), at_least[:, i], above[:, i], ks[i])
        picked = _select(xs[i], b, *narrowed, ks[i]) if narrowed else None
        threshold[i], limit[i] = picked if picked is not None else _exact_select(xs, b, i, ks[i], n)
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
