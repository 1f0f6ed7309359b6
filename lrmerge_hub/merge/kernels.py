"""Fused CPU kernels for every method: the results of methods.py, faster.

The sparsified task-vector methods (ties, slack_ties, breadcrumbs, breadcrumbs_ties,
dare_linear, dare_ties, della, della_linear) are described here; the sections at the end of
this file add the elementwise ones (linear, task_arithmetic, passthrough, nearswap), RAM,
RAM+ and layer swapping, the spherical methods and the Karcher mean (slerp, nuslerp,
multislerp, model_stock, karcher: torch's own reductions first, sphere_scalars.py), Arcee
Fusion and SCE, each with its own comment. Every one registers in FAST_PATHS. The loads,
stores and chunking they compile with are kernel_base.py's.

methods.ties_family is the reference: clear, pure torch, about a dozen full passes over
float32 copies plus a selection (kthvalue) per model. Here a tensor costs two passes over
the raw inputs (bfloat16 or float32 numpy views, e.g. straight from a memory-mapped shard;
no float32 copy of a tensor is made), on every core, and nothing here needs torch:

1. count: a sample of each model's |delta| brackets its k-th largest magnitude in a
   narrow range (a few percent of the entries; bfloat16 deltas take few values, so some
   are heavily tied). One pass counts the entries above the bracket, collects (bits,
   index) of those inside it, and checks every input for NaN/Inf; the threshold is then
   selected among the candidates, and ties at it are kept in index order up to a limit.
2. merge: trim, weight, elect, agree, disjoint mean, lambda and the cast to the output
   dtype, fused in one blocked loop that also counts kept and agreed entries and the
   NaN/Inf values of the output (an overflow the engine refuses to write).

Breadcrumbs (and breadcrumbs_ties) take the same two passes with a second cut per model:
the trim keeps the magnitude ranks [start, stop), the top `stop` minus the top `start`
(fused_cuts); breadcrumbs sums the trimmed task vectors instead of electing.

When the sample misleads (the k-th largest falls outside the bracket, or more candidates
fall inside it than were provisioned), an exact radix
select runs instead: a histogram of the top 16 bits of the float bits, then one of the low
16 bits within the chosen bin. The bits of a non-negative float order like the float, so
selection works on integers. Ties at the threshold are kept in index order until exactly k
entries survive, as methods.trim_to_density keeps them. Every delta is float32(x_i) -
float32(base) and every later step runs in float32 in the reference's order (the vote of
the election in float64, as there), so results match the reference to float rounding and
counts match exactly.

dare_linear and dare_ties (fused_dare) use the merge pass with DARE's draw in place of the
trim: each entry's uniform number is computed in the kernel from draws.py's hash, so no
mask of the whole tensor is stored. Their rescale needs the L1 norms first: one more pass
(_l1_pass) sums them exactly (l1.py), in any chunk order.

della and della_linear (fused_della) draw against probabilities from each entry's
magnitude rank within its row, so a first pass (_magprune_pass, in parallel over groups of
rows) sorts each row of |delta| (a stable radix sort), draws, and stores the keep
decisions as a packed mask, one bit per entry and model; the L1 pass and the merge pass
read it in place of DARE's draw.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import numba
import numpy as np

from .draws import GOLDEN, MIX1, MIX2, stream_key
from .buffers import output_array
from .kernel_base import (
    BLOCK,
    CHUNKS,
    _chunk_bounds,
    _float_bits,
    _fma,
    _is_nonfinite,
    _load,
    _next_vector,
    _store,
    as_float32,
)
from .l1 import EXPONENTS, l1_ratio
from .sphere_fills import _multislerp_step_block, _multislerp_unit_block
from .trim import outlier_ranks, rank_layout, trim_count

BINS = 1 << 16
# entries sampled to bracket the threshold, in runs of consecutive entries (runs touch few
# pages of a memory-mapped input), and the bracket's half-width in standard deviations of
# the sample's rank (a miss only costs the exact fallback)
SAMPLE = 1 << 16
SAMPLE_RUN = 256
SIGMAS = 6.0
# room for candidates per chunk: this many times the sample's fraction inside the bracket
# (a chunk may hold more than the average), plus a slack fraction; more falls back
BRACKET_ROOM = 4.0
BRACKET_SLACK = 0.01
INF_BITS = 0x7F800000  # above every finite magnitude
# below this many entries the threshold is selected exactly from every entry at once
MIN_FAST_NUMEL = 1 << 18


@numba.njit(inline="always")
def _magnitude_bits(x, base, j):
    """The bits of |float32(x[j]) - float32(base[j])|."""
    return _float_bits(_load(x, j) - _load(base, j)) & 0x7FFFFFFF


@numba.njit(inline="always")
def _uniform(key, j):
    """draws.uniforms for entry j of the stream `key` (uint64 arithmetic wraps, as numpy's)."""
    z = key + np.uint64(j + 1) * GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * (1.0 / (1 << 53))


@numba.njit(inline="always")
def _mask_bit(mask, j):
    """Bit j of a packed keep mask (byte j >> 3, bit j & 7): 1 where entry j is kept."""
    return (mask[j >> 3] >> (j & 7)) & 1


# -- the count pass -----------------------------------------------------------------------------
# Inner loops are separate functions over plain, zero-based array slices, written so that
# the compiler vectorizes them (measured 2-7x faster than otherwise): indexing the tuple of
# inputs, or an array at a shifted index, inside the loop keeps it from that; magnitudes are
# compared as float32 (the same order as their bits, for non-NaN values) and counts are
# kept as int32 within a block, because numba's 64-bit integers halve the vector width.


@numba.njit(cache=True, nogil=True)
def _nonfinite_block(x):
    """How many entries of x are NaN or Inf."""
    count = np.int32(0)
    for j in range(x.shape[0]):
        count = np.int32(count + _is_nonfinite(_load(x, j)))
    return count


@numba.njit(cache=True, nogil=True)
def _count_block(x, base, lo, hi, s, mags, inside, bits, idx, p, counts):
    """Over a block starting at index s: add to counts the entries with |delta| > hi, == hi
    and == lo, and append (bits, index) of the entries with lo < |delta| < hi to bits/idx
    from p on (bits/idx need room for the block). Returns (NaN/Inf entries of x, next p)."""
    size = base.shape[0]
    above = np.int32(0)
    at_hi = np.int32(0)
    at_lo = np.int32(0)
    nonfinite = np.int32(0)
    for j in range(size):
        xv = _load(x, j)
        ad = abs(xv - _load(base, j))
        mags[j] = ad
        nonfinite = np.int32(nonfinite + _is_nonfinite(xv))
        above = np.int32(above + (ad > hi))
        at_hi = np.int32(at_hi + (ad == hi))
        at_lo = np.int32(at_lo + (ad == lo))
        inside[j] = (ad > lo) & (ad < hi)
    counts[0] += above
    counts[1] += at_hi
    counts[2] += at_lo
    for j in range(size):  # candidates are few: a well-predicted branch beats writing all
        if inside[j]:
            bits[p] = _float_bits(mags[j])
            idx[p] = s + j
            p += 1
    return nonfinite, p


@numba.njit(parallel=True, cache=True, nogil=True)
def _count_pass(xs, base, first_cut, lo, hi, cap):
    """One pass over every input. Model i has the cuts q in [first_cut[i], first_cut[i + 1])
    (none, one, or Breadcrumbs' two). Per chunk and cut: how many |delta| are above hi[q],
    equal to hi[q] and equal to lo[q] (counts[c, q]); and (bits, index) of those strictly
    between, in index order: chunk c's are the first found[q, c] of bits[q, c] and
    idx[q, c], or found[q, c] is -1 when more than cap - BLOCK were there. Also the NaN/Inf
    entries of the base (column 0) and of each model (column i + 1)."""
    m, n, cuts = len(xs), base.shape[0], lo.shape[0]
    counts = np.zeros((CHUNKS, cuts, 3), dtype=np.int64)
    bad = np.zeros((CHUNKS, m + 1), dtype=np.int64)
    bits = np.empty((cuts, CHUNKS, cap), dtype=np.int64)
    idx = np.empty((cuts, CHUNKS, cap), dtype=np.int64)
    found = np.zeros((cuts, CHUNKS), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo_c, hi_c = _chunk_bounds(n, CHUNKS, c)
        mags = np.empty(BLOCK, dtype=np.float32)
        inside = np.empty(BLOCK, dtype=np.uint8)
        for s in range(lo_c, hi_c, BLOCK):
            e = min(s + BLOCK, hi_c)
            bb = base[s:e]
            bad[c, 0] += _nonfinite_block(bb)
            for i in range(m):
                x = xs[i][s:e]
                if first_cut[i] == first_cut[i + 1]:
                    bad[c, i + 1] += _nonfinite_block(x)
                for q in range(first_cut[i], first_cut[i + 1]):
                    p = found[q, c]
                    fits = p >= 0 and p + (e - s) <= cap  # else count only (and write from 0)
                    bad_i, p = _count_block(
                        x, bb, lo[q], hi[q], s, mags, inside, bits[q, c], idx[q, c], p if fits else 0, counts[c, q]
                    )
                    if q == first_cut[i]:  # one count of the model's NaN/Inf
                        bad[c, i + 1] += bad_i
                    found[q, c] = p if fits else -1
    return counts, bad, bits, idx, found


# -- the merge pass ---------------------------------------------------------------------------


@numba.njit(inline="always")
def _in_top(ad, t, ties):
    """Whether a magnitude is among a cut's top entries: above its threshold t, or equal to
    it where ties count (below the cut's index limit)."""
    return (ad > t) | (ties & (ad == t))


@numba.njit(cache=True, nogil=True)
def _sparsify_block(
    x, base, ties_in, t_in, ties_out, t_out, draw, mask, key, density, start, r, w, v, keep, row, total, first
):
    """row = w * (r * kept delta), the delta 0 where dropped (as the reference masks, then
    rescales, then weights; r is 1 for a trim, and (d * 1) * w is d * w bit for bit). Kept:
    with draw, where the packed mask has the entry's bit (index start + j; DELLA), or, when
    the mask is empty, where the entry's uniform (stream key) < density (DARE; either way
    the thresholds are ignored); else where |delta| is in the top of the cut that keeps
    (t_in: the top `stop`) and not in the top of the cut that drops again (t_out: the top
    `start`). total (=, or += unless first) row * vote, in float64 (v and total are
    float64). keep is scratch room for the block's mask: each loop stays branch-free, so
    the compiler vectorizes it. Returns how many entries of row are nonzero (kept)."""
    zero = np.float32(0.0)
    kept = np.int32(0)
    size = base.shape[0]
    if draw and mask.shape[0] > 0:
        for j in range(size):
            keep[j] = _mask_bit(mask, start + j)
    elif draw:
        for j in range(size):
            keep[j] = _uniform(key, start + j) < density
    else:
        for j in range(size):
            ad = abs(_load(x, j) - _load(base, j))
            keep[j] = _in_top(ad, t_in, ties_in) & ~_in_top(ad, t_out, ties_out)
    for j in range(size):
        d = _load(x, j) - _load(base, j)
        wd = ((d if keep[j] else zero) * r) * w
        row[j] = wd
        kept = np.int32(kept + (wd != zero))
        if first:
            total[j] = wd * v
        else:
            total[j] += wd * v
    return kept


@numba.njit(cache=True, nogil=True)
def _sum_block(row, merged, first):
    """merged = 0 + row (first) or merged + row: the models summed in their order, as the
    reference sums without an election (0 + d1 + d2 + ..., methods.task_arithmetic_family)."""
    for j in range(row.shape[0]):
        merged[j] = (np.float32(0.0) if first else merged[j]) + row[j]


@numba.njit(cache=True, nogil=True)
def _agree_block(row, total, w, merged, divisor, first):
    """Add the entries of row whose sign agrees with sign(total) (>= 0 is +) to merged, and
    w to divisor there (=, unless first: +=). Returns how many agreed."""
    zero = np.float32(0.0)
    count = np.int32(0)
    for j in range(row.shape[0]):
        wd = row[j]
        agree = (wd != zero) & ((wd > zero) == (total[j] >= zero))
        if first:
            merged[j] = wd if agree else zero
            divisor[j] = w if agree else zero
        else:
            merged[j] += wd if agree else zero
            divisor[j] += w if agree else zero
        count = np.int32(count + agree)
    return count


@numba.njit(cache=True, nogil=True)
def _write_block(base, out, merged, divisor, lam, normalize):
    """out = base + lam * merged (divided by the agreeing weights, 0 counting as 1).
    Returns how many entries of out (as stored) are NaN or Inf."""
    one, zero = np.float32(1.0), np.float32(0.0)
    nonfinite = np.int32(0)
    for j in range(base.shape[0]):
        m = merged[j]
        if normalize:
            dv = divisor[j]
            m = m / (dv if dv != zero else one)
        _store(out, j, _load(base, j) + lam * m)
        nonfinite = np.int32(nonfinite + _is_nonfinite(_load(out, j)))
    return nonfinite


@numba.njit(parallel=True, cache=True, nogil=True)
def _merge(
    xs,
    base,
    threshold,
    limit,
    draw,
    masks,
    keys,
    densities,
    ratios,
    weights,
    votes,
    elect,
    normalize,
    sum_divisor,
    lam,
    out,
):
    """Sparsify each model's delta: a trim (keep |delta| in the top of cut 0 and not in the
    top of cut 1: per model i and cut r, |delta| > threshold[i, r], or == it at indices
    below limit[i, r]) or, with draw, the packed keep masks[i] (DELLA's, drawn by
    _magprune_pass) or, when masks has no columns, DARE's draws from keys[i] with
    densities[i]; rescale
    by ratios[i] and weight. Then either elect with votes (float64: exact for any accepted
    slack, see methods.SLACK_MAX) and disjoint-merge, or sum (divided by sum_divisor with
    normalize); write base + lam * merged. Returns per-chunk kept and agreed counts, each
    (CHUNKS, m), and per-chunk NaN/Inf counts of the output (CHUNKS,).

    Works on blocks of BLOCK entries, model by model, so that the inputs are read once and
    every inner loop is a branch-free loop over contiguous memory."""
    m, n = len(xs), base.shape[0]
    kept = np.zeros((CHUNKS, m), dtype=np.int64)
    agreed = np.zeros((CHUNKS, m), dtype=np.int64)
    bad = np.zeros(CHUNKS, dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        rows = np.empty((m, BLOCK), dtype=np.float32)
        total = np.empty(BLOCK, dtype=np.float64)
        merged = np.empty(BLOCK, dtype=np.float32)
        divisor = np.full(BLOCK, sum_divisor, dtype=np.float32)  # elect: set per entry below
        keep = np.empty(BLOCK, dtype=np.uint8)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            size = e - s
            bb = base[s:e]
            for i in range(m):
                # ties at a cut count before its index limit only: the block in three parts
                x, row = xs[i][s:e], rows[i][:size]
                end_in = min(max(limit[i, 0] - s, 0), size)
                end_out = min(max(limit[i, 1] - s, 0), size)
                ends = (0, min(end_in, end_out), max(end_in, end_out), size)
                for part in range(3):
                    a, z = ends[part], ends[part + 1]
                    kept[c, i] += _sparsify_block(
                        x[a:z],
                        bb[a:z],
                        z <= end_in,
                        threshold[i, 0],
                        z <= end_out,
                        threshold[i, 1],
                        draw,
                        masks[i],
                        keys[i],
                        densities[i],
                        s + a,
                        ratios[i],
                        weights[i],
                        votes[i],
                        keep[a:z],
                        row[a:z],
                        total[a:z],
                        i == 0,
                    )
            for i in range(m):
                if elect:
                    agreed[c, i] += _agree_block(
                        rows[i][:size], total[:size], weights[i], merged[:size], divisor[:size], i == 0
                    )
                else:
                    _sum_block(rows[i][:size], merged[:size], i == 0)
            bad[c] += _write_block(bb, out[s:e], merged[:size], divisor[:size], lam, normalize)
    return kept, agreed, bad


# -- selection ----------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _gather_bits(x, base, idx):
    """|delta| bits at the given positions."""
    out = np.empty(idx.shape[0], dtype=np.int64)
    for s in range(idx.shape[0]):
        out[s] = _magnitude_bits(x, base, idx[s])
    return out


@numba.njit(cache=True, nogil=True)
def _tie_limit(x, base, t, lo, hi, room):
    """The index in [lo, hi) just after the room-th entry whose |delta| bits equal t."""
    for j in range(lo, hi):
        if _magnitude_bits(x, base, j) == t:
            room -= 1
            if room == 0:
                return j + 1
    return hi


@numba.njit(cache=True, nogil=True)
def _sum_chunks(local):
    total = np.zeros(local.shape[1:], dtype=np.int64)
    for c in range(local.shape[0]):
        total += local[c]
    return total


@numba.njit(parallel=True, cache=True, nogil=True)
def _histogram(x, base, high_bin):
    """A histogram of 16 bits of |x - base| (float32 bits): of the top 16 when high_bin is
    -1, else of the low 16 among the entries whose top 16 bits equal high_bin."""
    n = base.shape[0]
    local = np.zeros((CHUNKS, BINS), dtype=np.int32)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        h = local[c]
        for j in range(lo, hi):
            u = _magnitude_bits(x, base, j)
            if high_bin < 0:
                h[u >> 16] += 1
            elif (u >> 16) == high_bin:
                h[u & 0xFFFF] += 1
    return _sum_chunks(local)


def _top_bin(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value, and how many values lie in higher bins."""
    from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(from_top, k))  # first position where the running count >= k
    b = BINS - 1 - idx
    return b, int(from_top[idx] - hist[b])


def _exact_select(x: np.ndarray, b: np.ndarray, k: int) -> tuple[int, int]:
    """(threshold bits, tie index limit) of |x - b| by radix select (_radix_select)."""
    n = b.shape[0]
    return _radix_select(
        _histogram(x, b, -1), lambda high: _histogram(x, b, high), lambda t, room: _tie_limit(x, b, t, 0, n, room), k, n
    )


def _radix_select(
    top: np.ndarray, low_of: Callable[[int], np.ndarray], tie_limit: Callable[[int, int], int], k: int, n: int
) -> tuple[int, int]:
    """(threshold bits, tie index limit) of the k largest of n values from the histogram of
    their top 16 bits, that of the low 16 bits of the values in one top bin (low_of), and,
    when the threshold is shared by more entries than there is room for, a scan for the
    limit (tie_limit(t, room))."""
    high_bin, above = _top_bin(top, k)
    low = low_of(high_bin)
    low_bin, above_low = _top_bin(low, k - above)
    t = (high_bin << 16) | low_bin
    room = k - above - above_low
    return t, (n if int(low[low_bin]) <= room else int(tie_limit(t, room)))


def _select_among(bits: np.ndarray, idx: np.ndarray, room: int, n: int) -> tuple[int, int]:
    """(threshold bits, tie index limit) keeping the `room` largest of `bits` (at ascending
    positions idx): ties at the threshold are kept in index order."""
    t = int(np.partition(bits, bits.shape[0] - room)[bits.shape[0] - room])
    room -= int(np.count_nonzero(bits > t))
    tied = idx[bits == t]
    return t, (int(tied[room - 1]) + 1 if room < tied.shape[0] else n)


_SAMPLES: dict[int, np.ndarray] = {}


def _sample_index(n: int) -> np.ndarray:
    """SAMPLE sorted positions in [0, n), the same for every tensor of that size: runs of
    SAMPLE_RUN consecutive entries at random places."""
    if n not in _SAMPLES:
        runs = SAMPLE // SAMPLE_RUN
        starts = np.sort(np.random.default_rng(n).integers(0, n - SAMPLE_RUN + 1, runs))
        _SAMPLES[n] = (starts[:, None] + np.arange(SAMPLE_RUN)[None, :]).reshape(-1)
    return _SAMPLES[n]


def _bracket(x: np.ndarray, b: np.ndarray, k: int) -> tuple[int, int, float]:
    """From a sample of |delta| bits: a bracket [lo, hi] that holds the k-th largest with
    near certainty, and the fraction of the sample strictly inside it."""
    n = b.shape[0]
    bits = np.sort(_gather_bits(x, b, _sample_index(n)))  # ascending
    p = k / n
    rank = (1 - p) * SAMPLE  # ascending rank of the k-th largest
    margin = SIGMAS * math.sqrt(SAMPLE * p * (1 - p)) + 8
    low, high = int(rank - margin), int(math.ceil(rank + margin))
    lo = int(bits[low]) if low >= 0 else 0
    hi = int(bits[high]) if high < SAMPLE else INF_BITS
    return lo, hi, int(np.count_nonzero((bits > lo) & (bits < hi))) / SAMPLE


def _select(
    x: np.ndarray,
    b: np.ndarray,
    k: int,
    lo: int,
    hi: int,
    counts: np.ndarray,
    bits: np.ndarray,
    idx: np.ndarray,
    found: np.ndarray,
) -> tuple[int, int]:
    """(threshold bits, tie index limit) from the count pass's results for one model: per
    chunk, the entries above the bracket [lo, hi], at hi and at lo (counts), and the
    candidates strictly inside it. The k-th largest is at hi, among the candidates, or at
    lo; an exact radix select runs when it is elsewhere or the candidates did not fit."""
    n = b.shape[0]
    above, at_hi, at_lo = (counts[:, j] for j in range(3))
    room = k - int(above.sum())
    if 1 <= room <= int(at_hi.sum()):
        return hi, _tie_limit_in_chunks(x, b, hi, at_hi, room)
    room -= int(at_hi.sum())
    if (found >= 0).all() and 1 <= room <= int(found.sum()):
        return _select_among(
            np.concatenate([bits[c, : found[c]] for c in range(CHUNKS)]),
            np.concatenate([idx[c, : found[c]] for c in range(CHUNKS)]),
            room,
            n,
        )
    room -= int(found.sum())
    if (found >= 0).all() and lo != hi and 1 <= room <= int(at_lo.sum()):
        return lo, _tie_limit_in_chunks(x, b, lo, at_lo, room)
    return _exact_select(x, b, k)


def _tie_limit_in_chunks(x: np.ndarray, b: np.ndarray, t: int, ties: np.ndarray, room: int) -> int:
    """The tie index limit for threshold bits t with room for `room` of its ties, given the
    per-chunk counts of ties: only the chunk where the room runs out is scanned."""
    n = b.shape[0]
    if room == int(ties.sum()):
        return n
    before = np.concatenate([[0], np.cumsum(ties)])
    c = int(np.searchsorted(before, room, side="left")) - 1  # chunk holding the room-th tie
    lo_c, hi_c = _chunk_bounds(n, CHUNKS, c)
    return int(_tie_limit(x, b, t, lo_c, hi_c, room - int(before[c])))


class NonFiniteOutput(ValueError):
    """`count` merged values came out NaN or Inf (an overflow: weights or lambda too large)."""

    def __init__(self, count: int):
        super().__init__(f"{count} merged values are NaN or Inf")
        self.count = count


class NonFiniteInput(ValueError):
    """An input holds NaN or Inf; `which` is -1 for the base, else the model's index."""

    def __init__(self, which: int):
        super().__init__(f"input {which} contains NaN or Inf")
        self.which = which


def _magnitudes(bits: np.ndarray | int) -> np.ndarray:
    """The float32 magnitudes whose (non-negative) bits these are."""
    return np.asarray(bits, dtype=np.int64).astype(np.uint32).view(np.float32)


def fused_ties(
    base: np.ndarray,
    tensors: list[np.ndarray],
    weights: list[float],
    densities: list[float],
    slacks: list[float],
    lam: float,
    normalize: bool,
    out_bf16: bool = False,
    check_finite: bool = False,
) -> tuple[np.ndarray, list[int], list[int]]:
    """ties / slack_ties of one tensor: (merged flat array, kept, agreed).

    Inputs: the base and one array per model, flat and of one size, either all bfloat16
    given as their uint16 bits or all float32 (see kernel_inputs). The result is float32,
    or bfloat16 bits (uint16) with out_bf16. Results equal methods.ties_family's to float
    rounding (computed in float32); kept/agreed have the meaning of methods.MergeStats.
    With check_finite, a NaN or Inf in any input raises NonFiniteInput, and one in the
    output NonFiniteOutput.
    """
    n = base.shape[0]
    ranks = [(0, trim_count(n, d)) for d in densities]
    return fused_cuts(base, tensors, weights, ranks, slacks, lam, normalize, True, out_bf16, check_finite)


def fused_cuts(
    base: np.ndarray,
    tensors: list[np.ndarray],
    weights: list[float],
    ranks: list[tuple[int, int]],
    slacks: list[float],
    lam: float,
    normalize: bool,
    elect: bool,
    out_bf16: bool = False,
    check_finite: bool = False,
) -> tuple[np.ndarray, list[int], list[int]]:
    """A magnitude-trimmed task-vector merge of one tensor: (merged flat array, kept, agreed).

    Model i keeps the entries of its delta whose magnitude rank lies in ranks[i] = [start,
    stop) (rank 0 is the largest; among equal magnitudes the lower index ranks larger, as
    sparsify.top_k_mask): the top `stop` minus the top `start`, two cuts of one selection.
    TIES trims to [0, k); Breadcrumbs drops the largest too. Then, with elect, the
    sign election and disjoint mean of ties (agreed counted); else the weighted sum,
    divided by the sum of the weights with normalize (methods.task_arithmetic_family's
    order; agreed all 0). Inputs, output and check_finite as for fused_ties.
    """
    n, m = base.shape[0], len(tensors)
    xs = tuple(tensors)
    # per model, cut 0 (the top `stop`, kept) and cut 1 (the top `start`, dropped again):
    # |delta| above threshold is in a cut's top, and equal to it below the index limit
    ks = np.array([(stop, start) for start, stop in ranks], dtype=np.int64).reshape(m, 2)
    every_entry = ks >= n
    threshold = np.where(every_entry, -1.0, np.inf).astype(np.float32)  # trivial cuts: all, none
    limit = np.where(every_entry, n, 0).astype(np.int64)
    active = (ks > 0) & (ks < n)
    cuts = np.argwhere(active)  # (model, cut) pairs that select, in model order
    first_cut = np.searchsorted(cuts[:, 0], np.arange(m + 1))
    if n < MIN_FAST_NUMEL:  # small: select exactly from every entry's bits
        every = np.arange(n)
        for i in np.unique(cuts[:, 0]):
            magnitude_bits = _gather_bits(xs[i], base, every)
            for r in np.flatnonzero(active[i]):
                t, limit[i, r] = _select_among(magnitude_bits, every, int(ks[i, r]), n)
                threshold[i, r] = _magnitudes(t)
        if check_finite:
            none = np.zeros(0, dtype=np.float32)
            _raise_nonfinite(_count_pass(xs, base, np.zeros(m + 1, dtype=np.int64), none, none, 0)[1])
    else:
        lo = np.zeros(len(cuts), dtype=np.int64)
        hi = np.zeros(len(cuts), dtype=np.int64)
        fraction = 0.0
        for q, (i, r) in enumerate(cuts):
            lo[q], hi[q], inside = _bracket(xs[i], base, int(ks[i, r]))
            fraction = max(fraction, inside)
        chunk = -(-n // CHUNKS)
        cap = min(chunk, int(chunk * (BRACKET_ROOM * fraction + BRACKET_SLACK))) + BLOCK
        counts, bad, bits, idx, found = _count_pass(xs, base, first_cut, _magnitudes(lo), _magnitudes(hi), cap)
        if check_finite:
            _raise_nonfinite(bad)
        for q, (i, r) in enumerate(cuts):
            k = int(ks[i, r])
            t, limit[i, r] = _select(xs[i], base, k, int(lo[q]), int(hi[q]), counts[:, q], bits[q], idx[q], found[q])
            threshold[i, r] = _magnitudes(t)
        del bits, idx
    no_draws = (False, no_masks(m), np.zeros(m, dtype=np.uint64), np.zeros(m), np.ones(m, dtype=np.float32))
    return _combine(
        xs, base, (threshold, limit, *no_draws), weights, slacks, elect, lam, normalize, out_bf16, check_finite
    )


def _combine(
    xs: tuple[np.ndarray, ...],
    base: np.ndarray,
    sparsify: tuple,
    weights: list[float],
    slacks: list[float],
    elect: bool,
    lam: float,
    normalize: bool,
    out_bf16: bool,
    check_finite: bool,
) -> tuple[np.ndarray, list[int], list[int]]:
    """The _merge pass of fused_cuts, fused_dare and fused_della (sparsify: _merge's
    arguments threshold, limit, draw, masks, keys, densities, ratios): (merged, kept, agreed)."""
    n = base.shape[0]
    out = output_array(n, out_bf16)
    total = sum(weights)  # methods.task_arithmetic_family's divisor of the sum (Python's, then float32)
    with np.errstate(over="ignore"):
        sum_divisor = np.float32(total if abs(total) >= 1e-8 else 1.0)
    kept, agreed, bad = _merge(
        xs,
        base,
        *sparsify,
        np.array(weights, dtype=np.float32),
        np.array([1.0 + s for s in slacks], dtype=np.float64),
        bool(elect),
        bool(normalize),
        sum_divisor,
        np.float32(lam),
        out,
    )
    if check_finite and bad.any():
        raise NonFiniteOutput(int(bad.sum()))
    return out, [int(v) for v in kept.sum(0)], [int(v) for v in agreed.sum(0)]


@numba.njit(cache=True, nogil=True)
def _l1_block(x, base, key, density, mask, start, keep, sums):
    """Add each |delta|'s significand to sums[0, its exponent field] (l1.py) and, where the
    entry is kept (its bit in the packed mask, or with an empty mask its draw), to
    sums[1, ...]. keep is scratch room for the block's keep decisions: computed in a loop of
    their own, as _sparsify_block computes them, the draws vectorize (in the loop that adds
    to the sums, which cannot, they cost about as much as the whole merge pass). Returns
    how many entries of x are NaN or Inf."""
    size = base.shape[0]
    if mask.shape[0] > 0:
        for j in range(size):
            keep[j] = _mask_bit(mask, start + j)
    else:
        for j in range(size):
            keep[j] = _uniform(key, start + j) < density
    nonfinite = np.int32(0)
    for j in range(size):
        xv = _load(x, j)
        nonfinite = np.int32(nonfinite + _is_nonfinite(xv))
        bits = _float_bits(abs(xv - _load(base, j)))
        exponent = bits >> 23
        significand = (bits & 0x7FFFFF) | (np.int64(exponent > 0) << 23)
        sums[0, exponent] += significand
        sums[1, exponent] += significand * np.int64(keep[j])  # no branch
    return nonfinite


@numba.njit(parallel=True, cache=True, nogil=True)
def _l1_pass(xs, base, keys, densities, masks):
    """The rescale pass: per model the exponent sums of |delta| (sums[i, 0]) and of the
    kept |delta| (sums[i, 1]), kept as _merge keeps (masks, or DARE's draws); per chunk
    NaN/Inf entries of the base (column 0) and of each model (column i + 1)."""
    m, n = len(xs), base.shape[0]
    sums = np.zeros((CHUNKS, m, 2, EXPONENTS), dtype=np.int64)
    bad = np.zeros((CHUNKS, m + 1), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        keep = np.empty(BLOCK, dtype=np.uint8)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            bb = base[s:e]
            bad[c, 0] += _nonfinite_block(bb)
            for i in range(m):
                bad[c, i + 1] += _l1_block(xs[i][s:e], bb, keys[i], densities[i], masks[i], s, keep, sums[c, i])
    return sums.sum(0), bad


def no_masks(models: int) -> np.ndarray:
    """_merge's masks argument when it keeps by trims or DARE's draws: no columns."""
    return np.zeros((models, 0), dtype=np.uint8)


def fused_dare(
    base: np.ndarray,
    tensors: list[np.ndarray],
    weights: list[float],
    densities: list[float],
    slacks: list[float],
    keys: list[np.uint64],
    rescale: bool,
    elect: bool,
    lam: float,
    normalize: bool,
    out_bf16: bool = False,
    check_finite: bool = False,
) -> tuple[np.ndarray, list[int], list[int]]:
    """dare_ties (elect) / dare_linear of one tensor: (merged flat array, kept, agreed),
    bit for bit methods.dare_ties / dare_linear on float32. Model i keeps entry j where
    draws.uniforms(keys[i]) < densities[i], computed here entry by entry; with rescale,
    a first pass sums the exact L1 norms (l1.py) of every delta and of its kept entries.
    Inputs, output and check_finite as for fused_ties."""
    m = len(tensors)
    xs = tuple(tensors)
    if check_finite and not rescale:  # else the rescale pass checks
        none = np.zeros(0, dtype=np.float32)
        _raise_nonfinite(_count_pass(xs, base, np.zeros(m + 1, dtype=np.int64), none, none, 0)[1])
    return _drawn_merge(
        xs, base, no_masks(m), keys, densities, weights, slacks, rescale, elect, lam, normalize, out_bf16, check_finite
    )


def _drawn_merge(
    xs: tuple[np.ndarray, ...],
    base: np.ndarray,
    masks: np.ndarray,
    keys: list[np.uint64],
    densities: list[float],
    weights: list[float],
    slacks: list[float],
    rescale: bool,
    elect: bool,
    lam: float,
    normalize: bool,
    out_bf16: bool,
    check_finite: bool,
) -> tuple[np.ndarray, list[int], list[int]]:
    """DARE's and DELLA's passes after the draws: with rescale, the L1 pass (refusing NaN/Inf
    inputs with check_finite), then the merge pass, model i keeping its entries by masks[i]
    (DELLA) or, when masks has no columns, by its draws from keys[i] below densities[i]."""
    m = len(xs)
    key_array = np.array(keys, dtype=np.uint64)
    density_array = np.array(densities, dtype=np.float64)
    ratios = np.ones(m, dtype=np.float32)
    if rescale:
        sums, bad = _l1_pass(xs, base, key_array, density_array, masks)
        if check_finite:
            _raise_nonfinite(bad)
        ratios[:] = [l1_ratio(sums[i, 0], sums[i, 1]) for i in range(m)]
    # the draw ignores thresholds; tie limits at the end keep each block in one part
    no_trim = (np.zeros((m, 2), dtype=np.float32), np.full((m, 2), base.shape[0], dtype=np.int64))
    sparsify = (*no_trim, True, masks, key_array, density_array, ratios)
    return _combine(xs, base, sparsify, weights, slacks, elect, lam, normalize, out_bf16, check_finite)


# -- DELLA's MagPrune: keep probabilities by magnitude rank within a row ------------------------
# outer rows per parallel group of the mask pass: a group's first entry is a multiple of 8,
# so no two groups write one byte of a packed mask
GROUP_ROWS = 8
DIGITS = 256  # the rows' radix sort: 8 bits per pass, four passes over a float's 31 magnitude bits


@numba.njit(cache=True, nogil=True)
def _sort_by_bits(bits, order, bits_tmp, order_tmp, counts):
    """Sort bits (non-negative int32: magnitudes' float bits) ascending, permuting order
    alike, by a stable LSD radix sort (equal bits keep their order). The _tmp arrays are
    scratch of the same size, counts of DIGITS. Returns the sorted order (one of the two
    order arrays)."""
    n = bits.shape[0]
    for shift in range(0, 32, 8):
        counts[:] = 0
        for p in range(n):
            counts[(bits[p] >> shift) & 0xFF] += 1
        if counts[(bits[0] >> shift) & 0xFF] == n:  # one digit value: this pass moves nothing
            continue
        total = 0
        for b in range(DIGITS):
            c = counts[b]
            counts[b] = total
            total += c
        for p in range(n):
            d = (bits[p] >> shift) & 0xFF
            q = counts[d]
            counts[d] = q + 1
            bits_tmp[q] = bits[p]
            order_tmp[q] = order[p]
        bits, bits_tmp = bits_tmp, bits
        order, order_tmp = order_tmp, order
    return order


@numba.njit(cache=True, nogil=True)
def _pack_bits(keep, mask):
    """keep's 0/1 flags as mask bits, 8 to a byte from bit 0 (mask has (size + 7) // 8 bytes)."""
    n = keep.shape[0]
    for b in range(mask.shape[0]):
        byte = 0
        for t in range(min(8, n - 8 * b)):
            byte |= int(keep[8 * b + t]) << t
        mask[b] = byte


@numba.njit(parallel=True, cache=True, nogil=True)
def _magprune_pass(xs, base, outer, cols, inner, keys, densities, lows, steps, masks):
    """DELLA's keep masks (sparsify.magprune), packed into masks[i] (_mask_bit). The tensor
    is (outer, cols, inner) in C order; each of its rows (fixed outer and inner index, the
    cols entries along dim 1) is ranked by |delta|: ascending rank r in 0..cols-1, equal
    magnitudes ranked by index, the lower index higher (a stable sort of the row reversed).
    Entry f of model i is kept where draws.uniforms(keys[i]) at f is below lows[i] + (r /
    (cols - 1)) * steps[i] (density - epsilon, 2 epsilon: the reference's float64 order), or
    below densities[i] in a row of one column; every entry where densities[i] >= 1. Groups
    of GROUP_ROWS outer rows in parallel; returns per group the NaN/Inf entries of the base
    (column 0) and of each model (column i + 1)."""
    m = len(xs)
    size = cols * inner  # entries per outer row
    groups = (outer + GROUP_ROWS - 1) // GROUP_ROWS
    bad = np.zeros((groups, m + 1), dtype=np.int64)
    for g in numba.prange(groups):
        s = g * GROUP_ROWS * size
        e = min(outer, (g + 1) * GROUP_ROWS) * size
        bad[g, 0] = _nonfinite_block(base[s:e])
        keep = np.empty(e - s, dtype=np.uint8)
        bits, bits_tmp = np.empty(cols, dtype=np.int32), np.empty(cols, dtype=np.int32)
        order, order_tmp = np.empty(cols, dtype=np.int32), np.empty(cols, dtype=np.int32)
        counts = np.empty(DIGITS, dtype=np.int32)
        for i in range(m):
            x, key, density = xs[i], keys[i], densities[i]
            bad[g, i + 1] = _nonfinite_block(x[s:e])
            if density >= 1.0:
                keep[:] = 1
            elif cols == 1:
                for f in range(s, e):
                    keep[f - s] = _uniform(key, f) < density
            else:
                for first in range(s, e, size):
                    for k in range(inner):
                        row = first + k  # the row's entry j is at row + j * inner
                        for p in range(cols):
                            j = cols - 1 - p
                            bits[p] = _magnitude_bits(x, base, row + j * inner)
                            order[p] = j
                        ranked = _sort_by_bits(bits, order, bits_tmp, order_tmp, counts)
                        for r in range(cols):
                            f = row + ranked[r] * inner
                            probability = lows[i] + (np.float64(r) / np.float64(cols - 1)) * steps[i]
                            keep[f - s] = _uniform(key, f) < probability
            _pack_bits(keep, masks[i][s >> 3 : (e + 7) >> 3])
    return bad


def fused_della(
    base: np.ndarray,
    tensors: list[np.ndarray],
    shape: tuple[int, ...],
    weights: list[float],
    densities: list[float],
    epsilons: list[float],
    slacks: list[float],
    keys: list[np.uint64],
    rescale: bool,
    elect: bool,
    lam: float,
    normalize: bool,
    out_bf16: bool = False,
    check_finite: bool = False,
) -> tuple[np.ndarray, list[int], list[int]]:
    """della (elect) / della_linear of one tensor of the given shape (inputs flat, in C
    order): (merged flat array, kept, agreed), bit for bit methods.della / della_linear on
    float32. A first pass ranks each row (dim 1) of each model's |delta| and draws its keep
    mask (packed, one bit per entry: the only per-tensor memory besides the output); then
    fused_dare's passes with those masks. Inputs, output and check_finite as for fused_ties."""
    m, n = len(tensors), base.shape[0]
    xs = tuple(tensors)
    outer, cols, inner = rank_layout(shape)
    masks = np.empty((m, (n + 7) // 8), dtype=np.uint8)
    bad = _magprune_pass(
        xs,
        base,
        outer,
        cols,
        inner,
        np.array(keys, dtype=np.uint64),
        np.array(densities, dtype=np.float64),
        np.array([d - e for d, e in zip(densities, epsilons, strict=True)], dtype=np.float64),
        np.array([2 * e for e in epsilons], dtype=np.float64),
        masks,
    )
    if check_finite:
        _raise_nonfinite(bad)
    return _drawn_merge(
        xs, base, masks, keys, densities, weights, slacks, rescale, elect, lam, normalize, out_bf16, check_finite
    )


def _raise_nonfinite(bad: np.ndarray) -> None:
    if bad.any():
        raise NonFiniteInput(int(np.flatnonzero(bad.sum(0))[0]) - 1)


@numba.njit(cache=True, nogil=True)
def _round_to_bf16(a, out):
    for j in range(a.shape[0]):
        _store(out, j, a[j])


def float32_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """Flat float32 values in a safetensors float dtype (BF16 as its bits, rounded to
    nearest even like torch)."""
    if dtype == "BF16":
        out = np.empty(a.shape[0], dtype=np.uint16)
        _round_to_bf16(a, out)
        return out
    with np.errstate(over="ignore"):  # values past float16's range become Inf: the engine counts them
        return a.astype({"F32": np.float32, "F16": np.float16, "F64": np.float64}[dtype])


def kernel_inputs(arrays: list[np.ndarray], dtypes: list[str]) -> list[np.ndarray]:
    """Flat arrays of safetensors dtypes (BF16 given as uint16 bits) as the kernels take
    them: all bfloat16 bits as they are, else all float32 (converted where needed)."""
    if set(dtypes) == {"BF16"}:
        return arrays
    return [a if d == "F32" else as_float32(a, d == "BF16") for a, d in zip(arrays, dtypes, strict=True)]


def _ties_fast_path(
    base: np.ndarray,
    tensors: list[np.ndarray],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    out_bf16: bool = False,
    check_finite: bool = False,
) -> tuple[np.ndarray, list[int], list[int]]:
    return fused_ties(
        base,
        tensors,
        [float(p["weight"]) for p in model_params],
        [float(p["density"]) for p in model_params],
        [float(p.get("slack", 0.0)) for p in model_params],
        float(params["lambda"]),
        bool(params["normalize"]),
        out_bf16,
        check_finite,
    )


def _breadcrumbs_fast_path(
    base: np.ndarray,
    tensors: list[np.ndarray],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    out_bf16: bool = False,
    check_finite: bool = False,
    elect: bool = False,
) -> tuple[np.ndarray, list[int] | None, list[int] | None]:
    """breadcrumbs (elect False: the weighted sum) or breadcrumbs_ties (the election)."""
    n = base.shape[0]
    out, kept, agreed = fused_cuts(
        base,
        tensors,
        [float(p["weight"]) for p in model_params],
        [outlier_ranks(n, float(p["density"]), float(p["gamma"])) for p in model_params],
        [float(p.get("slack", 0.0)) for p in model_params],
        float(params["lambda"]),
        bool(params["normalize"]),
        elect,
        out_bf16,
        check_finite,
    )
    return (out, kept, agreed) if elect else (out, None, None)


def _dare_fast_path(base, tensors, model_params, params, out_bf16=False, check_finite=False, *, tensor_name, elect):
    merged, kept, agreed = fused_dare(
        base,
        tensors,
        [float(p["weight"]) for p in model_params],
        [float(p["density"]) for p in model_params],
        [float(p.get("slack", 0.0)) for p in model_params],
        [stream_key(params["seed"], tensor_name, i) for i in range(len(tensors))],
        bool(params["rescale"]),
        elect,
        float(params["lambda"]),
        bool(params["normalize"]),
        out_bf16,
        check_finite,
    )
    return (merged, kept, agreed) if elect else (merged, None, None)


def _della_fast_path(
    base, tensors, model_params, params, out_bf16=False, check_finite=False, *, tensor_name, shape, elect
):
    merged, kept, agreed = fused_della(
        base,
        tensors,
        shape,
        [float(p["weight"]) for p in model_params],
        [float(p["density"]) for p in model_params],
        [float(p["epsilon"]) for p in model_params],
        [float(p.get("slack", 0.0)) for p in model_params],
        [stream_key(params["seed"], tensor_name, i) for i in range(len(tensors))],
        bool(params["rescale"]),
        elect,
        float(params["lambda"]),
        bool(params["normalize"]),
        out_bf16,
        check_finite,
    )
    return (merged, kept, agreed) if elect else (merged, None, None)


# -- elementwise methods: linear, task_arithmetic, passthrough in one pass ---------------------
# One read of every input and one write of the output, chunk by chunk on every core, with no
# float32 copy of a tensor. Each entry is computed in float32 in the reference's order
# (methods.linear, task_arithmetic, passthrough): Python's sum() starts from 0, so the
# accumulator starts at +0.0 and each weighted term is added to it in model order (0 + -0.0
# is +0.0, as torch's 0 + tensor gives); weights, lambda and the divisor are rounded to float32
# first, as torch rounds a Python scalar operand of a float32 tensor.

LINEAR, TASK_ARITHMETIC, SCALE, NEARSWAP = 0, 1, 2, 3
NEAR_FLOOR = np.float32(1e-6)  # geometric.nearswap's clamp(min=1e-6), in float32 as torch takes it


@numba.njit(cache=True, nogil=True)
def _term_block(x, base, w, acc, first, mode):
    """acc (=, when first, else +=) w * x, or w * (x - base) in TASK_ARITHMETIC mode; in SCALE
    mode acc = w * x with no 0 + (the reference returns the scaled tensor itself); in NEARSWAP
    mode (one model, w = t) acc = geometric.nearswap's value. Returns how many entries of x
    are NaN or Inf."""
    zero, one = np.float32(0.0), np.float32(1.0)
    nonfinite = np.int32(0)
    for j in range(acc.shape[0]):
        v = _load(x, j)
        nonfinite = np.int32(nonfinite + _is_nonfinite(v))
        if mode == NEARSWAP:  # clamp(t / max(|b - v|, 1e-6), 0, 1), then s * v + (1 - s) * b
            b = _load(base, j)
            s = (one / max(abs(b - v), NEAR_FLOOR)) * w  # torch's scalar / tensor: reciprocal, times
            s = min(max(s, zero), one)
            acc[j] = s * v + (one - s) * b
            continue
        term = w * (v - _load(base, j)) if mode == TASK_ARITHMETIC else w * v
        if mode == SCALE:
            acc[j] = term
        elif first:
            acc[j] = zero + term  # fma(v, w, +0.0) is the same: one rounding of w * v, then + 0
        elif mode == LINEAR:
            acc[j] = _fma(v, w, acc[j])  # mergekit's addcmul_
        else:
            acc[j] += term
    return nonfinite


@numba.njit(cache=True, nogil=True)
def _finish_block(base, acc, out, lam, divisor, normalize, mode):
    """out = base + lam * acc (TASK_ARITHMETIC), acc / divisor (normalize), or acc. Returns how
    many entries of out (as stored) are NaN or Inf."""
    nonfinite = np.int32(0)
    for j in range(acc.shape[0]):
        if mode == TASK_ARITHMETIC:
            v = _load(base, j) + lam * acc[j]
        elif normalize:
            v = acc[j] / divisor
        else:
            v = acc[j]
        _store(out, j, v)
        nonfinite = np.int32(nonfinite + _is_nonfinite(_load(out, j)))
    return nonfinite


@numba.njit(parallel=True, cache=True, nogil=True)
def _elementwise(xs, base, has_base, weights, lam, divisor, normalize, mode, out):
    """The elementwise methods over blocks of every chunk, in parallel: per chunk, NaN/Inf
    entries of the base (column 0, counted when has_base), of each model (column i + 1) and
    of the output (last column)."""
    m, n = len(xs), out.shape[0]
    bad = np.zeros((CHUNKS, m + 2), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        acc = np.empty(BLOCK, dtype=np.float32)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            bb, a = base[s:e], acc[: e - s]
            if has_base:
                bad[c, 0] += _nonfinite_block(bb)
            for i in range(m):
                bad[c, i + 1] += _term_block(xs[i][s:e], bb, weights[i], a, i == 0, mode)
            bad[c, m + 1] += _finish_block(bb, a, out[s:e], lam, divisor, normalize, mode)
    return bad


def float32_sum(values: list[float]) -> np.float32:
    """The float32 sum of the values as float32, in order: torch's sum of a float32 tensor of
    a few weights (methods.linear's divisor)."""
    total = np.float32(0.0)
    for v in values:
        total = np.float32(total + np.float32(v))
    return total


def fused_elementwise(
    base: np.ndarray | None,
    tensors: list[np.ndarray],
    weights: list[float],
    mode: int,
    lam: float = 1.0,
    normalize: bool = False,
    out_bf16: bool = False,
    check_finite: bool = False,
) -> np.ndarray:
    """linear (mode LINEAR: sum_i w_i x_i, divided by sum_i w_i with normalize), task
    arithmetic (TASK_ARITHMETIC: base + lam * sum_i w_i (x_i - base)) or passthrough's scale
    (SCALE: w_0 x_0) or nearswap (NEARSWAP, one model, weights [t]) of one tensor, bit for
    bit methods.linear / task_arithmetic / passthrough / nearswap on float32 (the
    reference's operation order, in float32).

    Inputs as for fused_ties (flat, one size, all bfloat16 bits or all float32); base may be
    None except for TASK_ARITHMETIC (linear ignores it but, like the reference path, refuses
    NaN/Inf in it). The result is float32, or bfloat16 bits with out_bf16. With check_finite
    a NaN or Inf in any input raises NonFiniteInput, and one in the output NonFiniteOutput.
    """
    if base is None and mode in (TASK_ARITHMETIC, NEARSWAP):
        raise ValueError("task_arithmetic and nearswap need a base")
    n = tensors[0].shape[0]
    out = output_array(n, out_bf16)
    with np.errstate(over="ignore"):  # a sum past float32's range divides to Inf, as in torch: counted
        divisor = float32_sum(weights)  # linear's divisor, as the reference sums the weights
    bad = _elementwise(
        tuple(tensors),
        tensors[0] if base is None else base,
        base is not None,
        np.array(weights, dtype=np.float32),
        np.float32(lam),
        divisor,
        bool(normalize),
        mode,
        out,
    )
    if check_finite:
        totals = bad.sum(0)
        inputs = totals[:-1] if base is not None else totals[1:-1]
        if inputs.any():
            first = int(np.flatnonzero(inputs)[0])
            raise NonFiniteInput(first - 1 if base is not None else first)
        if totals[-1]:
            raise NonFiniteOutput(int(totals[-1]))
    return out


def _weighted_fast_path(mode, base, tensors, model_params, params, out_bf16=False, check_finite=False):
    """linear (mode LINEAR) or task_arithmetic (TASK_ARITHMETIC) with the recipe's weights;
    fused_elementwise reads lambda only for task arithmetic and normalize only for linear."""
    merged = fused_elementwise(
        base,
        tensors,
        [float(p["weight"]) for p in model_params],
        mode,
        lam=float(params.get("lambda", 1.0)),
        normalize=bool(params.get("normalize", False)),
        out_bf16=out_bf16,
        check_finite=check_finite,
    )
    return merged, None, None


def _passthrough_fast_path(base, tensors, model_params, params, out_bf16=False, check_finite=False):
    scale = [float(model_params[0]["scale"])]
    return fused_elementwise(base, tensors, scale, SCALE, out_bf16=out_bf16, check_finite=check_finite), None, None


def _nearswap_fast_path(base, tensors, model_params, params, out_bf16=False, check_finite=False):
    t = [float(params["t"])]
    return fused_elementwise(base, tensors, t, NEARSWAP, out_bf16=out_bf16, check_finite=check_finite), None, None


# method name -> fn(base, tensors, model_params, params, out_bf16, check_finite), and
# tensor_name= for a random method (methods.MergeMethod.random: its draws depend on it),
# shape= for one that ranks along rows (engine.SHAPED: DELLA)
#   -> (flat array: float32, or bfloat16 bits with out_bf16; kept; agreed (None: no counts));
# the engine uses these on CPU instead of the reference in methods.METHODS. base is None for
# a method that takes none and a recipe without one (methods.MergeMethod.needs_base).
# ties takes a slack too (slack_ties' election); only the DARE and DELLA methods cover
# rescale (engine.RESCALED), and the breadcrumbs methods, della, ram and ramplus_tl (added
# at the end of this file with layer_swap) only up to methods.SUMMED_MODELS_MAX models, where
# torch's sum of the reference's stacked models runs in model order (engine.covered checks both).
FAST_PATHS: dict[str, Callable] = {
    "ties": _ties_fast_path,
    "slack_ties": _ties_fast_path,
    "linear": partial(_weighted_fast_path, LINEAR),
    "task_arithmetic": partial(_weighted_fast_path, TASK_ARITHMETIC),
    "passthrough": _passthrough_fast_path,
    "nearswap": _nearswap_fast_path,
    "breadcrumbs": _breadcrumbs_fast_path,
    "breadcrumbs_ties": partial(_breadcrumbs_fast_path, elect=True),
    "dare_linear": partial(_dare_fast_path, elect=False),
    "dare_ties": partial(_dare_fast_path, elect=True),
    "della": partial(_della_fast_path, elect=True),
    "della_linear": partial(_della_fast_path, elect=False),
}


def top_k_threshold(magnitudes: np.ndarray, k: int) -> tuple[float, int]:
    """The selection of the fused TIES kernels for any flat non-negative float32 array (the
    magnitude cuts of Breadcrumbs and SCE): (threshold, tie index limit) such that the k
    largest are the entries above the threshold and those equal to it at indices below the
    limit (equal magnitudes in index order, as the trim keeps them). 0 < k < size."""
    n = magnitudes.shape[0]
    zeros = np.zeros(n, dtype=np.float32)  # the kernels select |x - base|: base 0
    if n < MIN_FAST_NUMEL:
        every = np.arange(n)
        t, limit = _select_among(_gather_bits(magnitudes, zeros, every), every, k, n)
    else:
        t, limit = _exact_select(magnitudes, zeros, k)
    return float(_magnitudes(t)), int(limit)


# -- RAM, RAM+ (tensor-local) and layer swapping -----------------------------------------------
# methods.ram and ramplus_tl are elementwise across the models once each entry's count of
# changing models is known, so a block of every input (in cache) gives its count, then its
# terms: one read of each input and one write, with no float32 copy of a tensor. Each entry
# follows the reference's float32 operations in order: tv = x - base; tvz = tv * 1.0 or
# tv * 0.0 (torch's float * bool, so -0.0 stays possible); term = tvz * unique (* gain, RAM+)
# + tvz * overlap / max(count, 1) (torch's float / int64 is a float32 division); the models'
# terms summed from +0.0 in model order (torch's stacked sum over up to
# methods.SUMMED_MODELS_MAX models); base + that. epsilon is compared as a float32, as torch
# compares a float32 tensor with a Python float. RAM+ first counts each model's changed
# entries that another model changed too (shared) or that none did (unique) in a pass of its
# own; its gains are methods.ramplus_gains's bits, computed in numpy float32 (ramplus_gains_float32).


@numba.njit(cache=True, nogil=True)
def _ram_count_block(x, base, eps, counts, first):
    """counts (=, when first, else +=) 1 where |x - base| > eps. Returns how many entries of x
    are NaN or Inf."""
    nonfinite = np.int32(0)
    for j in range(counts.shape[0]):
        v = _load(x, j)
        nonfinite = np.int32(nonfinite + _is_nonfinite(v))
        changed = np.int32(abs(v - _load(base, j)) > eps)
        counts[j] = changed if first else counts[j] + changed
    return nonfinite


@numba.njit(cache=True, nogil=True)
def _ram_tally_block(x, base, eps, counts):
    """(entries x changed that another model changed too, entries x alone changed)."""
    shared = np.int32(0)
    unique = np.int32(0)
    for j in range(counts.shape[0]):
        changed = abs(_load(x, j) - _load(base, j)) > eps
        shared = np.int32(shared + (changed & (counts[j] > 1)))
        unique = np.int32(unique + (changed & (counts[j] == 1)))
    return shared, unique


@numba.njit(cache=True, nogil=True)
def _ram_term_block(x, base, eps, gain, counts, acc, first):
    """acc = (+0.0 when first, else acc) + the model's term (see the section's comment)."""
    zero, one = np.float32(0.0), np.float32(1.0)
    for j in range(acc.shape[0]):
        tv = _load(x, j) - _load(base, j)
        tvz = tv * (one if abs(tv) > eps else zero)
        c = counts[j]
        unique = one if c == 1 else zero
        overlap = one if c > 1 else zero
        term = tvz * unique * gain + tvz * overlap / np.float32(max(c, 1))
        acc[j] = (zero if first else acc[j]) + term


@numba.njit(cache=True, nogil=True)
def _ram_write_block(base, acc, out):
    """out = base + acc. Returns how many entries of out (as stored) are NaN or Inf."""
    nonfinite = np.int32(0)
    for j in range(acc.shape[0]):
        _store(out, j, _load(base, j) + acc[j])
        nonfinite = np.int32(nonfinite + _is_nonfinite(_load(out, j)))
    return nonfinite


@numba.njit(parallel=True, cache=True, nogil=True)
def _ram_pass(xs, base, eps, gains, merge, out):
    """Over blocks of every chunk, in parallel: each entry's count of changing models, then
    with merge the merged output, else each model's shared and unique changed entries.
    Returns per chunk the NaN/Inf entries of the base (column 0), of each model (column
    i + 1) and of the output (last column), and the shared (row 0) and unique (row 1) counts."""
    m, n = len(xs), base.shape[0]
    bad = np.zeros((CHUNKS, m + 2), dtype=np.int64)
    tally = np.zeros((CHUNKS, 2, m), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        counts = np.empty(BLOCK, dtype=np.int32)
        acc = np.empty(BLOCK, dtype=np.float32)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            bb, k, a = base[s:e], counts[: e - s], acc[: e - s]
            bad[c, 0] += _nonfinite_block(bb)
            for i in range(m):
                bad[c, i + 1] += _ram_count_block(xs[i][s:e], bb, eps, k, i == 0)
            if merge:
                for i in range(m):
                    _ram_term_block(xs[i][s:e], bb, eps, gains[i], k, a, i == 0)
                bad[c, m + 1] += _ram_write_block(bb, a, out[s:e])
            else:
                for i in range(m):
                    shared, unique = _ram_tally_block(xs[i][s:e], bb, eps, k)
                    tally[c, 0, i] += shared
                    tally[c, 1, i] += unique
    return bad, tally


def _raise_bad(bad: np.ndarray, has_base: bool) -> None:
    """NonFiniteInput for the first input (the base first, when there is one) with NaN/Inf,
    else NonFiniteOutput for the output's, from per-chunk counts (inputs, then the output's
    last column)."""
    totals = bad.sum(0)
    if totals[:-1].any():
        raise NonFiniteInput(int(np.flatnonzero(totals[:-1])[0]) - has_base)
    if totals[-1]:
        raise NonFiniteOutput(int(totals[-1]))


def _float32_epsilon(epsilon: float) -> np.float32:
    with np.errstate(over="ignore"):  # past float32's range it is Inf, as torch casts it
        return np.float32(epsilon)


def fused_ram(
    base: np.ndarray,
    tensors: list[np.ndarray],
    epsilon: float,
    gain: Callable[[list[int], list[int]], np.ndarray] | None = None,
    out_bf16: bool = False,
    check_finite: bool = False,
) -> np.ndarray:
    """methods.ram (gain None) or, with gain (each model's from its shared and unique changed
    entries: methods.ramplus_gains), methods.ramplus_tl of one tensor, bit for bit on float32,
    for up to methods.SUMMED_MODELS_MAX models. Inputs as for fused_ties; the result is
    float32, or bfloat16 bits with out_bf16. With check_finite a NaN or Inf in any input
    raises NonFiniteInput, and one in the output NonFiniteOutput."""
    xs, eps, n = tuple(tensors), _float32_epsilon(epsilon), base.shape[0]
    out = output_array(n, out_bf16)
    gains = np.ones(len(tensors), dtype=np.float32)  # times 1.0 is the same bits: RAM is RAM+ without gain
    if gain is not None:
        bad, tally = _ram_pass(xs, base, eps, gains, False, out)
        if check_finite:
            _raise_bad(bad, True)
        shared, unique = tally.sum(0).tolist()
        gains = np.array(gain(shared, unique), dtype=np.float32)
    bad, _ = _ram_pass(xs, base, eps, gains, True, out)
    if check_finite:
        _raise_bad(bad, True)
    return out


FLOAT32_MAX = float(np.finfo(np.float32).max)


def ramplus_gains_float32(shared: list[int], unique: list[int], params: dict[str, Any]) -> np.ndarray:
    """methods.ramplus_gains in numpy float32, the same bits (torch's promotions: the int64
    counts and the parameters rounded to float32, every operation in float32), so that the
    kernels need not import torch. Parameters beyond float32's range go to the reference
    (torch refuses some of them)."""
    r, alpha, eps = (float(params[k]) for k in ("r", "alpha", "epsilon"))
    if max(abs(r), abs(alpha), abs(eps)) > FLOAT32_MAX:
        import torch

        from .methods import ramplus_gains

        return ramplus_gains(torch.tensor(shared), torch.tensor(unique), params).numpy()
    with np.errstate(all="ignore"):  # 0 / 0, x / 0 and overflows give NaN and Inf, as in torch
        floor = np.maximum(np.array(unique, dtype=np.int64).astype(np.float32), np.float32(eps))
        rho = np.array(shared, dtype=np.int64).astype(np.float32) / floor
        rho = np.minimum(np.maximum(rho, np.float32(0.0)), np.float32(alpha))
        return np.float32(1.0) + np.float32(r) * rho


def _ram_fast_path(base, tensors, model_params, params, out_bf16=False, check_finite=False, *, plus):
    gain = partial(ramplus_gains_float32, params=params) if plus else None
    return fused_ram(base, tensors, float(params["epsilon"]), gain, out_bf16, check_finite), None, None


@numba.njit(cache=True, nogil=True)
def _blend_block(x0, x1, s0, s1, out):
    """out = s0 * x0 + s1 * x1, each product rounded (no fused multiply-add, as torch's
    separate operations). Returns how many entries of out (as stored) are NaN or Inf."""
    nonfinite = np.int32(0)
    for j in range(out.shape[0]):
        _store(out, j, s0 * _load(x0, j) + s1 * _load(x1, j))
        nonfinite = np.int32(nonfinite + _is_nonfinite(_load(out, j)))
    return nonfinite


@numba.njit(parallel=True, cache=True, nogil=True)
def _swap_pass(xs, shares, blend, out):
    """Per chunk, the NaN/Inf entries of each input (column i) and, with blend, of the output
    shares[0] * xs[0] + shares[1] * xs[1] (last column)."""
    m, n = len(xs), xs[0].shape[0]
    bad = np.zeros((CHUNKS, m + 1), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            for i in range(m):
                bad[c, i] += _nonfinite_block(xs[i][s:e])
            if blend:
                bad[c, m] += _blend_block(xs[0][s:e], xs[1][s:e], shares[0], shares[1], out[s:e])
    return bad


def fused_layer_swap(
    tensors: list[np.ndarray], shares: list[float], out_bf16: bool = False, check_finite: bool = False
) -> np.ndarray:
    """methods.layer_swap of one tensor, bit for bit: where a share is 1.0, that model's
    tensor's bits (copied as they are when already in the output's form: bfloat16 bits with
    out_bf16, else float32), else shares[0] * x0 + shares[1] * x1 with
    the shares rounded to float32 as torch rounds a Python scalar. Both inputs are checked
    for NaN/Inf either way (the reference refuses them)."""
    whole = shares.index(1.0) if 1.0 in shares else None
    n = tensors[0].shape[0]
    out = output_array(0 if whole is not None else n, out_bf16)
    bad = _swap_pass(tuple(tensors), np.array(shares, dtype=np.float32), whole is None, out)
    if whole is not None:
        x = tensors[whole]
        if out_bf16 == (x.dtype == np.uint16):
            # copied, not the input itself: the writer reads an output after the merge has
            # released its inputs' mapped pages, and reading them there maps them again for
            # good (a layer_swap merge's RSS grew to the model's size)
            out = output_array(n, out_bf16)
            out[:] = x
        elif out_bf16:  # float32 in, bfloat16 out: rounded, which may overflow
            rounded = float32_to(x, "BF16")
            bad[0, -1] = np.count_nonzero((rounded & 0x7F80) == 0x7F80)  # exponent all ones
            out = rounded
        else:
            out = as_float32(x, True)
    if check_finite:
        _raise_bad(bad, False)
    return out


def _layer_swap_fast_path(base, tensors, model_params, params, out_bf16=False, check_finite=False):
    """The shares come per tensor (methods._layer_swap_shares); the method takes no base."""
    shares = [float(p["share"]) for p in model_params]
    return fused_layer_swap(tensors, shares, out_bf16, check_finite), None, None


FAST_PATHS.update(
    {
        "ram": partial(_ram_fast_path, plus=False),
        "ramplus_tl": partial(_ram_fast_path, plus=True),
        "layer_swap": _layer_swap_fast_path,
    }
)


# -- spherical methods: slerp, nuslerp, multislerp, model_stock, karcher -----------------------
# Two passes: sphere_scalars.py computes the few scalars (norms, cosines, angles: torch's own
# float32 reductions, whose summation order no chunk of a kernel reproduces) exactly as
# geometric.py does, on arrays that sphere_fills.py's kernels write (karcher's iterations
# too); then one fused pass here computes every entry from the raw inputs and those scalars
# in the reference's float32 order and stores it.

# what divides or multiplies c0 * v0 + c1 * v1 (nuslerp's sin(theta), multislerp's scale)
NO_POST, DIVIDE, MULTIPLY = 0, 1, 2


@numba.njit(cache=True, nogil=True)
def _two_point_block(x0, x1, base, deltas, add_base, c0, c1, post, d, out):
    """out = [base +] ((c0 * v0 + c1 * v1) [/ or * d]), v = x [- base] (with deltas), each
    operation rounded to float32 in this order. Returns how many stored entries are NaN/Inf."""
    nonfinite = np.int32(0)
    for j in range(out.shape[0]):
        v0, v1 = _load(x0, j), _load(x1, j)
        if deltas:
            v0 -= _load(base, j)
            v1 -= _load(base, j)
        r = c0 * v0 + c1 * v1
        if post == DIVIDE:
            r = r / d
        elif post == MULTIPLY:
            r = r * d
        if add_base:
            r = _load(base, j) + r
        _store(out, j, r)
        nonfinite = np.int32(nonfinite + _is_nonfinite(_load(out, j)))
    return nonfinite


@numba.njit(parallel=True, cache=True, nogil=True)
def _two_point(x0, x1, base, has_base, deltas, add_base, c0, c1, post, d, out):
    """_two_point_block over every chunk in parallel. Per chunk, NaN/Inf entries of the base
    (column 0, when has_base), x0, x1 and the output (columns 1-3)."""
    n = out.shape[0]
    bad = np.zeros((CHUNKS, 4), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            if has_base:
                bad[c, 0] += _nonfinite_block(base[s:e])
            bad[c, 1] += _nonfinite_block(x0[s:e])
            bad[c, 2] += _nonfinite_block(x1[s:e])
            bad[c, 3] += _two_point_block(x0[s:e], x1[s:e], base[s:e], deltas, add_base, c0, c1, post, d, out[s:e])
    return bad


@numba.njit(cache=True, nogil=True)
def _add_block(x, acc, first):
    """acc = (+0.0 when first, else acc) + x. Returns how many entries of x are NaN/Inf."""
    nonfinite = np.int32(0)
    for j in range(acc.shape[0]):
        v = _load(x, j)
        nonfinite = np.int32(nonfinite + _is_nonfinite(v))
        acc[j] = (np.float32(0.0) if first else acc[j]) + v
    return nonfinite


@numba.njit(cache=True, nogil=True)
def _stock_block(base, acc, t, u, count, out):
    """out = t * (acc / count) + u * base. Returns how many stored entries are NaN/Inf."""
    nonfinite = np.int32(0)
    for j in range(out.shape[0]):
        _store(out, j, t * (acc[j] / count) + u * _load(base, j))
        nonfinite = np.int32(nonfinite + _is_nonfinite(_load(out, j)))
    return nonfinite


@numba.njit(parallel=True, cache=True, nogil=True)
def _stock(xs, base, t, u, count, stride, out):
    """geometric.model_stock's t * average + (1 - t) * base, the average (0 + x_1 + x_2 ...)
    / count summed in model order as Python's sum() adds; t and u = 1 - t per row of
    `stride` entries (one row: the whole tensor). Per chunk, NaN/Inf entries of the base
    (column 0), each model (column i + 1) and the output (last column)."""
    m, n = len(xs), out.shape[0]
    bad = np.zeros((CHUNKS, m + 2), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        acc = np.empty(BLOCK, dtype=np.float32)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            bb, a = base[s:e], acc[: e - s]
            bad[c, 0] += _nonfinite_block(bb)
            for i in range(m):
                bad[c, i + 1] += _add_block(xs[i][s:e], a, i == 0)
            if t.shape[0] == 1:
                bad[c, m + 1] += _stock_block(bb, a, t[0], u[0], count, out[s:e])
            else:
                bad[c, m + 1] += _stock_rows_block(bb, a, t, u, count, s, stride, t.shape[0], out[s:e])
    return bad


@numba.njit(cache=True, nogil=True)
def _two_point_rows_block(x0, x1, base, deltas, c0, c1, d, start, stride, count, out):
    """_two_point_block's [base +] ((c0 * v0 + c1 * v1) / d) with the coefficients of each
    entry's vector (see sphere_scalars.PerVector), for entries from `start` on."""
    nonfinite = np.int32(0)
    v, within = (start // stride) % count, start % stride
    for j in range(out.shape[0]):
        v0, v1 = _load(x0, j), _load(x1, j)
        if deltas:
            v0 -= _load(base, j)
            v1 -= _load(base, j)
        r = (c0[v] * v0 + c1[v] * v1) / d[v]
        if deltas:
            r = _load(base, j) + r
        _store(out, j, r)
        nonfinite = np.int32(nonfinite + _is_nonfinite(_load(out, j)))
        v, within = _next_vector(v, within, stride, count)
    return nonfinite


@numba.njit(parallel=True, cache=True, nogil=True)
def _two_point_rows(x0, x1, base, has_base, c0, c1, d, stride, count, out):
    """nuslerp per vector over every chunk in parallel; NaN/Inf counts as _two_point's."""
    n = out.shape[0]
    bad = np.zeros((CHUNKS, 4), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            if has_base:
                bad[c, 0] += _nonfinite_block(base[s:e])
            bad[c, 1] += _nonfinite_block(x0[s:e])
            bad[c, 2] += _nonfinite_block(x1[s:e])
            bad[c, 3] += _two_point_rows_block(
                x0[s:e], x1[s:e], base[s:e], has_base, c0, c1, d, s, stride, count, out[s:e]
            )
    return bad


@numba.njit(cache=True, nogil=True)
def _stock_rows_block(base, acc, t, u, count, start, stride, rows, out):
    """_stock_block with t and u of each entry's row."""
    nonfinite = np.int32(0)
    v, within = (start // stride) % rows, start % stride
    for j in range(out.shape[0]):
        _store(out, j, t[v] * (acc[j] / count) + u[v] * _load(base, j))
        nonfinite = np.int32(nonfinite + _is_nonfinite(_load(out, j)))
        v, within = _next_vector(v, within, stride, rows)
    return nonfinite


@numba.njit(parallel=True, cache=True, nogil=True)
def _nonfinite_inputs(xs):
    """NaN/Inf entries of each input (CHUNKS, len(xs))."""
    m, n = len(xs), xs[0].shape[0]
    bad = np.zeros((CHUNKS, m), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for i in range(m):
            bad[c, i] = _nonfinite_block(xs[i][lo:hi])
    return bad


def _check_sphere(inputs: np.ndarray, output: int, has_base: bool, check_finite: bool) -> None:
    """Raise for NaN/Inf counted in the inputs (base first, where has_base) or the output."""
    if not check_finite:
        return
    if inputs.any():
        raise NonFiniteInput(int(np.flatnonzero(inputs)[0]) - int(has_base))
    if output:
        raise NonFiniteOutput(int(output))


def _f32(t: Any) -> np.float32:
    return np.float32(t.item())


def two_point(x0, x1, base, deltas, add_base, c0, c1, post, d, out_bf16):
    """The two-input combine (_two_point) of flat inputs: (out, NaN/Inf counts per chunk)."""
    out = output_array(x0.shape[0], out_bf16)
    has_base = base is not None
    bad = _two_point(
        x0, x1, base if has_base else x0, has_base, deltas, add_base, _f32(c0), _f32(c1), post, _f32(d), out
    )
    return out, bad


def _slerp_fast_path(base, tensors, model_params, params, out_bf16=False, check_finite=False):
    """slerp from the base (v0) toward the one model: c0 * v0 + c1 * v1 (sphere_scalars)."""
    from .sphere_scalars import slerp_coefficients

    c0, c1 = slerp_coefficients(float(params["t"]), base, tensors[0])
    out, bad = two_point(base, tensors[0], None, False, False, c0, c1, NO_POST, c0, out_bf16)
    totals = bad.sum(0)
    _check_sphere(totals[1:3], totals[3], True, check_finite)  # x0 is the base
    return out, None, None


def _reference_sphere(name, base, tensors, model_params, params, shape, out_bf16, check_finite):
    """The method's reference on float32 copies viewed in the shape, stored as the engine
    stores it: the cases a fast path leaves to it. NaN/Inf inputs are refused first."""
    import torch

    from .methods import METHODS
    from .torch_engine import host_tensor, to_float32

    inputs = ([base] if base is not None else []) + list(tensors)
    if check_finite:
        _check_sphere(_nonfinite_inputs(tuple(inputs)).sum(0), 0, base is not None, True)
    raw = [to_float32(host_tensor(a)).view(shape) for a in inputs]
    has_base = base is not None
    result, _ = METHODS[name].fn(raw[0] if has_base else None, raw[int(has_base) :], model_params, params)
    out = float32_to(result.to(torch.float32).reshape(-1).numpy(), "BF16" if out_bf16 else "F32")
    _check_sphere(np.zeros(0), int(np.count_nonzero(~np.isfinite(as_float32(out, out_bf16)))), has_base, check_finite)
    return out, None, None


def _nuslerp_fast_path(base, tensors, model_params, params, out_bf16=False, check_finite=False, *, shape):
    """nuslerp (of the task vectors with a base): one vector per tensor (flatten), or per
    row or column (sphere_scalars.nuslerp_layout)."""
    from .geometric import interpolation_fraction
    from .sphere_scalars import nuslerp_coefficients, nuslerp_layout

    layout = nuslerp_layout(shape, params)
    if layout is None:
        return _reference_sphere("nuslerp", base, tensors, model_params, params, shape, out_bf16, check_finite)
    t = interpolation_fraction([p["weight"] for p in model_params])
    has_base = base is not None
    x0, x1 = tensors
    co = nuslerp_coefficients(t, x0, x1, base, *layout)
    if co.count == 1:
        out, bad = two_point(x0, x1, base, has_base, has_base, co.c0[0], co.c1[0], DIVIDE, co.d[0], out_bf16)
    else:
        out = output_array(x0.shape[0], out_bf16)
        c0, c1, d = (c.numpy() for c in (co.c0, co.c1, co.d))
        bad = _two_point_rows(x0, x1, base if has_base else x0, has_base, c0, c1, d, co.stride, co.count, out)
    totals = bad.sum(0)
    _check_sphere(totals[:3] if has_base else totals[1:3], totals[3], has_base, check_finite)
    return out, None, None


def _model_stock_fast_path(base, tensors, model_params, params, out_bf16=False, check_finite=False, *, shape):
    """model_stock with one ratio per tensor, or per row with filter_wise."""
    from .sphere_scalars import model_stock_ratio, model_stock_rows

    rows = model_stock_rows(shape, params)
    if rows is None:
        return _reference_sphere("model_stock", base, tensors, model_params, params, shape, out_bf16, check_finite)
    co = model_stock_ratio(base, list(tensors), rows)
    out = output_array(base.shape[0], out_bf16)
    t, u = co.c0.numpy(), co.c1.numpy()
    totals = _stock(tuple(tensors), base, t, u, np.float32(len(tensors)), co.stride, out).sum(0)
    _check_sphere(totals[:-1], totals[-1], True, check_finite)
    return out, None, None


def _multislerp_fast_path(base, tensors, model_params, params, out_bf16=False, check_finite=False):
    """multislerp: sphere_scalars.multislerp_terms computes the mean direction and the
    tangent step (whole-tensor reductions, as the reference); one pass combines them. One
    model, the degenerate branches, and a base no model changed run the reference."""
    from .sphere_scalars import multislerp_terms
    from .torch_engine import host_tensor

    has_base = base is not None
    if check_finite:
        inputs = ([base] if has_base else []) + list(tensors)
        _check_sphere(_nonfinite_inputs(tuple(inputs)).sum(0), 0, has_base, True)
    terms = None
    if len(tensors) > 1:
        terms = multislerp_terms(
            [host_tensor(x) for x in tensors],
            host_tensor(base) if has_base else None,
            [float(p["weight"]) for p in model_params],
            bool(params["normalize_weights"]),
            float(params["eps"]),
        )
    if terms is None:
        shape = (tensors[0].shape[0],)
        return _reference_sphere("multislerp", base, tensors, model_params, params, shape, out_bf16, check_finite)
    if terms.mean is not None:  # more models than the kernels sum in model order: the arrays
        mean, step = terms.mean.numpy(), terms.step.numpy()
        out, bad = two_point(mean, step, base, False, has_base, terms.cs, terms.k, MULTIPLY, terms.scale, out_bf16)
        _check_sphere(np.zeros(0), bad.sum(0)[3], has_base, check_finite)  # the inputs were checked
        return out, None, None
    out = output_array(tensors[0].shape[0], out_bf16)
    raw_base = terms.base if has_base else terms.xs[0]
    scalars = (_f32(terms.cs), _f32(terms.k), _f32(terms.scale))
    bad = _multislerp_combine(
        terms.xs, raw_base, has_base, terms.denom, terms.dots, terms.w, terms.mean_norm, *scalars, out
    )
    _check_sphere(np.zeros(0), int(bad.sum()), has_base, check_finite)  # the inputs were checked
    return out, None, None


@numba.njit(parallel=True, cache=True, nogil=True)
def _multislerp_combine(xs, base, has_base, denom, dots, w, mean_norm, cs, k, scale, out):
    """[base +] ((cs * mean + k * step) * scale) at every entry, the unit mean and the step
    recomputed from the raw inputs a block at a time (sphere_fills, the reference's float32
    order); NaN/Inf outputs per chunk."""
    m, n = len(xs), out.shape[0]
    bad = np.zeros(CHUNKS, dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        units = np.empty((m, BLOCK), dtype=np.float32)
        mean = np.empty(BLOCK, dtype=np.float32)
        step = np.empty(BLOCK, dtype=np.float32)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            size = e - s
            _multislerp_unit_block(xs, base, has_base, denom, w, mean_norm, s, e, units, mean)
            _multislerp_step_block(units, dots, w, mean, size, step)
            bad[c] += _multislerp_store_block(base[s:e], has_base, mean, step, cs, k, scale, out[s:e])
    return bad


@numba.njit(cache=True, nogil=True)
def _multislerp_store_block(base, has_base, mean, step, cs, k, scale, out):
    """out = [base +] ((cs * mean + k * step) * scale); returns the NaN/Inf stored."""
    nonfinite = np.int32(0)
    for j in range(out.shape[0]):
        r = (cs * mean[j] + k * step[j]) * scale
        if has_base:
            r = _load(base, j) + r
        _store(out, j, r)
        nonfinite = np.int32(nonfinite + _is_nonfinite(_load(out, j)))
    return nonfinite


FAST_PATHS.update(
    slerp=_slerp_fast_path,
    nuslerp=_nuslerp_fast_path,
    multislerp=_multislerp_fast_path,
    model_stock=_model_stock_fast_path,
)


@numba.njit(parallel=True, cache=True, nogil=True)
def _scale_store(s, mean, out):
    """out = s * mean in the output dtype; per chunk, the NaN/Inf entries stored."""
    n = out.shape[0]
    bad = np.zeros(CHUNKS, dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for j in range(lo, hi):
            _store(out, j, s * mean[j])
            bad[c] += _is_nonfinite(_load(out, j))
    return bad


def _karcher_fast_path(base, tensors, model_params, params, out_bf16=False, check_finite=False):
    """karcher: sphere_scalars.karcher_terms iterates on the running mean (torch's reductions
    on arrays the kernels write); one pass stores scale * mean. One input, or none that
    steers, runs the reference."""
    from .sphere_scalars import karcher_terms

    inputs = ([base] if base is not None else []) + list(tensors)
    if check_finite:
        _check_sphere(_nonfinite_inputs(tuple(inputs)).sum(0), 0, base is not None, True)
    terms = karcher_terms(inputs, int(params["max_iter"]), float(params["tol"]))
    if terms is None:
        shape = (inputs[0].shape[0],)
        return _reference_sphere("karcher", base, tensors, model_params, params, shape, out_bf16, check_finite)
    mean, scale = terms
    out = output_array(mean.shape[0], out_bf16)
    _check_sphere(np.zeros(0), int(_scale_store(_f32(scale), mean, out).sum()), base is not None, check_finite)
    return out, None, None


FAST_PATHS["karcher"] = _karcher_fast_path


# -- arcee_fusion -----------------------------------------------------------------------------
# The per-row divergence comes from torch_engine.fusion_divergence (the reference's torch
# operations on blocks of rows). The three order statistics of the importance
# |delta| * divergence come from an exact radix select that recomputes the importance in
# the reference's float32 operations on every pass instead of storing it: a histogram of the
# top 16 bits of each score's order key (which also counts the NaN/Inf inputs), then one of
# the low 16 bits within the bins that hold a statistic. Then one pass writes base + delta *
# (importance >= fence).

ORDER_NAN = 0xFFFFFFFF  # the order key of every NaN: above +Inf, as kthvalue and sort place NaN


@numba.njit(inline="always")
def _order_key(v):
    """A float32's key in ascending order of value (-0.0 just below +0.0), NaN last."""
    if v != v:
        return np.int64(ORDER_NAN)
    u = _float_bits(v)
    return u ^ 0x80000000 if u < 0x80000000 else u ^ 0xFFFFFFFF


@numba.njit(cache=True, nogil=True)
def _importance_keys(x, base, divergence, keys):
    """The order keys of |x - base| * divergence over a piece of one row (a loop that vectorizes)."""
    for j in range(keys.shape[0]):
        keys[j] = _order_key(abs(_load(x, j) - _load(base, j)) * divergence)


@numba.njit(parallel=True, cache=True, nogil=True)
def _importance_histogram(x, base, divergence, cols, bins):
    """Per chunk: with no `bins`, a histogram of the top 16 bits of the importance's order keys
    (row 0) and the NaN/Inf counts of base and x (columns 0 and 1); else, for each top bin in
    `bins`, a histogram of the low 16 bits of the keys in that bin."""
    n = base.shape[0]
    top = bins.shape[0] == 0
    hist = np.zeros((CHUNKS, max(bins.shape[0], 1), BINS), dtype=np.int32)
    bad = np.zeros((CHUNKS, 2), dtype=np.int64)
    slot = np.full(BINS, -1, dtype=np.int8)  # top bin -> its histogram, -1 for the others
    for i in range(bins.shape[0]):
        slot[bins[i]] = i
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        keys = np.empty(BLOCK, dtype=np.int64)
        h = hist[c]
        s = lo
        while s < hi:
            r = s // cols
            e = min(hi, (r + 1) * cols, s + BLOCK)
            _importance_keys(x[s:e], base[s:e], divergence[r], keys[: e - s])
            if top:
                bad[c, 0] += _nonfinite_block(base[s:e])
                bad[c, 1] += _nonfinite_block(x[s:e])
                for j in range(e - s):
                    h[0, keys[j] >> 16] += 1
            else:
                for j in range(e - s):
                    i = slot[keys[j] >> 16]
                    if i >= 0:
                        h[i, keys[j] & 0xFFFF] += 1
            s = e
    return hist, bad


def _key_value(key: int) -> np.float32:
    """The float32 of an order key (a NaN for ORDER_NAN)."""
    if key == ORDER_NAN:
        return np.float32(np.nan)
    u = key ^ 0x80000000 if key >= 0x80000000 else key ^ 0xFFFFFFFF
    return np.array([u], dtype=np.uint32).view(np.float32)[0]


def _bin_at(hist: np.ndarray, position: int) -> tuple[int, int]:
    """The bin of a histogram holding the value at an ascending 0-based position, and how many
    values lie in lower bins."""
    below = np.cumsum(hist, dtype=np.int64)
    b = int(np.searchsorted(below, position, side="right"))
    return b, int(below[b] - hist[b])


def importance_order_statistics(
    base: np.ndarray, model: np.ndarray, divergence: np.ndarray, cols: int, positions: list[int]
) -> tuple[list[np.float32], np.ndarray]:
    """The importance scores at the given ascending 0-based positions (exact: the values
    kthvalue gives), and the NaN/Inf counts of base and model per chunk."""
    top, bad = _importance_histogram(model, base, divergence, cols, np.zeros(0, dtype=np.int64))
    top = top.sum(0, dtype=np.int64)[0]
    found = [_bin_at(top, p) for p in positions]
    bins = sorted({b for b, _ in found})
    low = _importance_histogram(model, base, divergence, cols, np.array(bins, dtype=np.int64))[0].sum(0, dtype=np.int64)
    values = []
    for p, (b, below) in zip(positions, found, strict=True):
        low_bin, _ = _bin_at(low[bins.index(b)], p - below)
        values.append(_key_value((b << 16) | low_bin))
    return values, bad


@numba.njit(cache=True, nogil=True)
def _fusion_block(x, base, divergence, fence, out):
    """out = base + delta * 1.0 where |delta| * divergence >= fence, else base + delta * 0.0
    (which keeps the reference's signed zeros); returns how many stored values are NaN or Inf."""
    nonfinite = np.int32(0)
    for j in range(out.shape[0]):
        b = _load(base, j)
        d = _load(x, j) - b
        keep = np.float32(1.0) if abs(d) * divergence >= fence else np.float32(0.0)
        _store(out, j, b + d * keep)
        nonfinite = np.int32(nonfinite + _is_nonfinite(_load(out, j)))
    return nonfinite


@numba.njit(parallel=True, cache=True, nogil=True)
def _fusion_pass(x, base, divergence, cols, fence, out):
    """_fusion_block over every chunk, row piece by row piece; NaN/Inf outputs per chunk."""
    n = base.shape[0]
    bad = np.zeros(CHUNKS, dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        s = lo
        while s < hi:
            r = s // cols
            e = min(hi, (r + 1) * cols)
            bad[c] += _fusion_block(x[s:e], base[s:e], divergence[r], fence, out[s:e])
            s = e
    return bad


def fused_arcee_fusion(
    base: np.ndarray, model: np.ndarray, shape: tuple[int, ...], out_bf16: bool = False, check_finite: bool = False
) -> np.ndarray:
    """arcee_fusion of one tensor of the given shape (inputs flat, in C order, as for
    fused_ties), bit for bit methods.arcee_fusion on float32."""
    from .methods import fusion_positions
    from .torch_engine import fusion_divergence, fusion_rows, host_tensor

    n, cols = base.shape[0], fusion_rows(shape, base.shape[0])[1]
    divergence = fusion_divergence(host_tensor(base), host_tensor(model), shape).numpy()
    (q1, median, q3), bad = importance_order_statistics(base, model, divergence, cols, fusion_positions(n))
    if check_finite:
        _raise_nonfinite(bad)
    fence = median + np.float32(1.5) * (q3 - q1)  # float32 scalars, as the reference's 0-d tensors
    out = output_array(n, out_bf16)
    bad = _fusion_pass(model, base, divergence, cols, fence, out)
    if check_finite and bad.any():
        raise NonFiniteOutput(int(bad.sum()))
    return out


def _arcee_fusion_fast_path(base, tensors, model_params, params, out_bf16=False, check_finite=False, *, shape):
    return fused_arcee_fusion(base, tensors[0], shape, out_bf16, check_finite), None, None


FAST_PATHS["arcee_fusion"] = _arcee_fusion_fast_path


# -- sce ----------------------------------------------------------------------------------------
# methods.sce stacks the task vectors and makes about ten whole copies of the stack. Here:
# 1. (with select_topk < 1) each entry's population variance across the models, as torch.var
#    computes it on the CPU (Welford's update in float64, in model order, then m2 / models
#    rounded to float32), recomputed a block at a time in every pass rather than stored; the
#    top entries by sparsify.top_k_mask's rule (an exact radix select on the variances' bits:
#    ties at the threshold in index order);
# 2. the squares of the masked task vectors, one model at a time, into one float32 row whose
#    mean torch takes as it takes that row of the reference's (models, entries) array
#    (methods.row_mean; a single model's row as the reference's, whole);
# 3. one pass: mask, the float64 vote, agree, the share-weighted disjoint mean (both sums
#    from +0.0 in model order, as torch sums up to methods.SUMMED_MODELS_MAX stacked models),
#    the clamp, base + merged, and the retention counts.


@numba.njit(cache=True, nogil=True)
def _welford_block(x, base, mean, m2, count):
    """One model's step of Welford's update (torch's WelfordOps) of every entry, in float64."""
    nf = np.float64(count)
    for j in range(mean.shape[0]):
        v = np.float64(_load(x, j) - _load(base, j))
        d = v - mean[j]
        mean[j] = mean[j] + d / nf
        m2[j] = m2[j] + d * (v - mean[j])


@numba.njit(cache=True, nogil=True)
def _variance_block(xs, base, s, e, mean, m2, var):
    """var[: e - s] = the population variance across the models of entries [s, e): torch.var's
    Welford update in float64, in model order, then m2 / models rounded to float32."""
    size = e - s
    mean[:size] = 0.0
    m2[:size] = 0.0
    for i in range(len(xs)):
        _welford_block(xs[i][s:e], base[s:e], mean[:size], m2[:size], i + 1)
    for j in range(size):
        var[j] = np.float32(m2[j] / np.float64(len(xs)))


@numba.njit(parallel=True, cache=True, nogil=True)
def _variance_histogram(xs, base, high_bin):
    """A histogram of 16 bits of every entry's variance (float32 bits, sign dropped): of the
    top 16 when high_bin is -1, else of the low 16 among the entries whose top 16 bits equal
    high_bin; and how many variances are not zero."""
    n = base.shape[0]
    local = np.zeros((CHUNKS, BINS), dtype=np.int32)
    nonzero = np.zeros(CHUNKS, dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        mean = np.empty(BLOCK, dtype=np.float64)
        m2 = np.empty(BLOCK, dtype=np.float64)
        var = np.empty(BLOCK, dtype=np.float32)
        h = local[c]
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            _variance_block(xs, base, s, e, mean, m2, var)
            for j in range(e - s):
                nonzero[c] += var[j] != np.float32(0.0)
                u = _float_bits(var[j]) & 0x7FFFFFFF
                if high_bin < 0:
                    h[u >> 16] += 1
                elif (u >> 16) == high_bin:
                    h[u & 0xFFFF] += 1
    return _sum_chunks(local), nonzero.sum()


@numba.njit(cache=True, nogil=True)
def _variance_tie_limit(xs, base, t, room):
    """The index just after the room-th entry whose variance bits equal t."""
    n = base.shape[0]
    mean = np.empty(BLOCK, dtype=np.float64)
    m2 = np.empty(BLOCK, dtype=np.float64)
    var = np.empty(BLOCK, dtype=np.float32)
    for s in range(0, n, BLOCK):
        e = min(s + BLOCK, n)
        _variance_block(xs, base, s, e, mean, m2, var)
        for j in range(e - s):
            if (_float_bits(var[j]) & 0x7FFFFFFF) == t:
                room -= 1
                if room == 0:
                    return s + j + 1
    return n


@numba.njit(inline="always")
def _sce_keep(var, j, s, t, limit, select):
    """1.0 where entry s + j (var[j] its variance) is among the selected variances (above t,
    or at t below the limit), else 0.0; 1.0 everywhere without a selection."""
    if not select:
        return np.float32(1.0)
    v = var[j]
    return np.float32(1.0) if (v > t) | ((v == t) & (s + j < limit)) else np.float32(0.0)


@numba.njit(cache=True, nogil=True)
def _square_block(x, base, var, t, limit, s, select, sq):
    """sq = (delta * mask) ** 2 over a block starting at s; returns x's NaN/Inf count."""
    nonfinite = np.int32(0)
    for j in range(sq.shape[0]):
        v = _load(x, j)
        nonfinite = np.int32(nonfinite + _is_nonfinite(v))
        d = (v - _load(base, j)) * _sce_keep(var, j, s, t, limit, select)
        sq[j] = d * d
    return nonfinite


@numba.njit(parallel=True, cache=True, nogil=True)
def _sce_squares(xs, which, base, t, limit, select, sq):
    """sq[r] = model which[r]'s masked task vector squared; NaN/Inf of the inputs per chunk
    (base first, then each model; those not in which stay 0)."""
    m, n = len(xs), base.shape[0]
    bad = np.zeros((CHUNKS, m + 1), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        mean = np.empty(BLOCK, dtype=np.float64)
        m2 = np.empty(BLOCK, dtype=np.float64)
        var = np.empty(BLOCK, dtype=np.float32)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            if select:
                _variance_block(xs, base, s, e, mean, m2, var)
            bad[c, 0] += _nonfinite_block(base[s:e])
            for r in range(which.shape[0]):
                i = which[r]
                bad[c, i + 1] += _square_block(xs[i][s:e], base[s:e], var, t, limit, s, select, sq[r, s:e])
    return bad


@numba.njit(cache=True, nogil=True)
def _vote_block(x, base, var, t, limit, s, select, vote, row, total, first):
    """row = the masked task vector; total (=, unless first: +=) row * vote in float64."""
    for j in range(row.shape[0]):
        d = (_load(x, j) - _load(base, j)) * _sce_keep(var, j, s, t, limit, select)
        row[j] = d
        total[j] = (0.0 if first else total[j]) + np.float64(d) * vote


@numba.njit(cache=True, nogil=True)
def _erase_block(row, total, share, num, den, first, counts):
    """num += row * erased, den += erased (from +0.0 when first), erased = share where the
    entry agrees with the elected sign, else 0; counts += (nonzero, agreeing) entries."""
    zero = np.float32(0.0)
    kept = np.int32(0)
    agreed = np.int32(0)
    for j in range(row.shape[0]):
        d = row[j]
        agree = (d != zero) & ((d > zero) == (total[j] >= 0.0))
        erased = share * (np.float32(1.0) if agree else zero)
        num[j] = (zero if first else num[j]) + d * erased
        den[j] = (zero if first else den[j]) + erased
        kept = np.int32(kept + (d != zero))
        agreed = np.int32(agreed + agree)
    counts[0] += kept
    counts[1] += agreed


@numba.njit(cache=True, nogil=True)
def _sce_write_block(base, num, den, out):
    """out = base + num / max(den, 1e-6); returns how many stored values are NaN or Inf."""
    nonfinite = np.int32(0)
    for j in range(out.shape[0]):
        _store(out, j, _load(base, j) + num[j] / max(den[j], NEAR_FLOOR))
        nonfinite = np.int32(nonfinite + _is_nonfinite(_load(out, j)))
    return nonfinite


@numba.njit(parallel=True, cache=True, nogil=True)
def _sce_merge(xs, base, t, limit, select, votes, shares, out):
    """SCE's election and share-weighted disjoint mean: per chunk, NaN/Inf outputs (column 0)
    and each model's kept and agreed entries (columns 1 + 2i, 2 + 2i)."""
    m, n = len(xs), base.shape[0]
    stats = np.zeros((CHUNKS, 1 + 2 * m), dtype=np.int64)
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        rows = np.empty((m, BLOCK), dtype=np.float32)
        total = np.empty(BLOCK, dtype=np.float64)
        num = np.empty(BLOCK, dtype=np.float32)
        den = np.empty(BLOCK, dtype=np.float32)
        mean = np.empty(BLOCK, dtype=np.float64)
        m2 = np.empty(BLOCK, dtype=np.float64)
        var = np.empty(BLOCK, dtype=np.float32)
        counts = np.zeros(2, dtype=np.int64)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            size = e - s
            if select:
                _variance_block(xs, base, s, e, mean, m2, var)
            for i in range(m):
                _vote_block(
                    xs[i][s:e], base[s:e], var, t, limit, s, select, votes[i], rows[i, :size], total[:size], i == 0
                )
            for i in range(m):
                counts[:] = 0
                _erase_block(rows[i, :size], total[:size], shares[i], num[:size], den[:size], i == 0, counts)
                stats[c, 1 + 2 * i] += counts[0]
                stats[c, 2 + 2 * i] += counts[1]
            stats[c, 0] += _sce_write_block(base[s:e], num[:size], den[:size], out[s:e])
    return stats


def sce_selection(xs: tuple, base: np.ndarray, fraction: float) -> tuple[np.float32, int]:
    """(threshold, tie index limit) of sparsify.variance_top's mask of the float32 variances
    across the models: entry j is kept where its variance > threshold, or == threshold and
    j < limit. An exact radix select that recomputes the variances on every pass."""
    n = base.shape[0]
    top, nonzero = _variance_histogram(xs, base, -1)
    k = int(int(nonzero) * fraction)
    if k <= 0:
        return np.float32(np.inf), 0  # none: every variance is finite
    if k >= n:
        return np.float32(-1.0), 0  # all: a variance is >= 0
    t, limit = _radix_select(
        top,
        lambda high: _variance_histogram(xs, base, high)[0],
        lambda t, room: _variance_tie_limit(xs, base, t, room),
        k,
        n,
    )
    return np.float32(_magnitudes(t)), limit


def fused_sce(
    base: np.ndarray,
    tensors: list[np.ndarray],
    slacks: list[float],
    select_topk: float,
    out_bf16: bool = False,
    check_finite: bool = False,
) -> tuple[np.ndarray, list[int], list[int]]:
    """sce of one tensor: (merged flat array, kept, agreed), bit for bit methods.sce on
    float32 for up to methods.SUMMED_MODELS_MAX models. Inputs, output and check_finite as
    for fused_ties."""
    import torch

    from .methods import energy_shares, row_mean

    m, n = len(tensors), base.shape[0]
    xs = tuple(tensors)
    select = select_topk < 1  # else every entry is kept
    t, limit = np.float32(-1.0), 0
    if select:
        t, limit = sce_selection(xs, base, select_topk)  # NaN/Inf inputs are refused below
    if m == 1:  # torch splits a single row's mean across threads: reduce it as the reference does
        squares = torch.empty((1, n), dtype=torch.float32)  # torch's allocation, as the reference's
        bad = _sce_squares(xs, np.zeros(1, dtype=np.int64), base, t, limit, select, squares.numpy())
        energy = squares.mean(dim=1)
    else:  # one model's squares at a time: row_mean gives each row's bits of the (m, n) array
        square = torch.empty((1, n), dtype=torch.float32)
        energy = torch.empty(m, dtype=torch.float32)
        bad = np.zeros((CHUNKS, m + 1), dtype=np.int64)
        for i in range(m):
            counts = _sce_squares(xs, np.array([i], dtype=np.int64), base, t, limit, select, square.numpy())
            bad[:, 0], bad[:, i + 1] = counts[:, 0], counts[:, i + 1]
            energy[i] = row_mean(square[0])
        del square
    if check_finite:
        _raise_nonfinite(bad)
    shares = energy_shares(energy).numpy()
    out = output_array(n, out_bf16)
    votes = np.array([1.0 + s for s in slacks], dtype=np.float64)
    stats = _sce_merge(xs, base, t, limit, select, votes, shares, out).sum(0)
    if check_finite and stats[0]:
        raise NonFiniteOutput(int(stats[0]))
    return out, stats[1::2].tolist(), stats[2::2].tolist()


def _sce_fast_path(base, tensors, model_params, params, out_bf16=False, check_finite=False):
    slacks = [float(p.get("slack", 0.0)) for p in model_params]
    return fused_sce(base, tensors, slacks, float(params["select_topk"]), out_bf16, check_finite)


FAST_PATHS["sce"] = _sce_fast_path
