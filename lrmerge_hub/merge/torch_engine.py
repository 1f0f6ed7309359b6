"""The torch engine: the kernels' methods on any torch device, bit-identical to kernels.py.

kernels.py is the fast CPU path; this is the same computation written with torch
operations, so that it runs on a GPU (or on a CPU, where CI proves the two agree). Equal
bits follow from doing exactly what the kernels do, in the same order, in float32:

- delta = float32(x) - float32(base); bfloat16 widens exactly.
- The trim threshold is selected on the float bits (an int32 view of |delta|, ordered like
  the magnitudes): a radix select by two 65536-bin histograms (`bincount`), exact on every
  device. `topk` and `kthvalue` are not used: neither promises which of several equal
  magnitudes it picks, and kthvalue is slow on CUDA.
- Ties at the threshold are kept in index order until exactly k entries survive.
- DARE keeps an entry where its draw (draws.uniforms, on the CPU) is below the density;
  DELLA where it is below the probability of its magnitude rank within its row (ranked by
  a sort of unique int64 keys: the magnitude's bits, then the reversed index); with
  rescale, a first pass sums each model's exact L1 norms (l1.py) chunk by chunk.
- Per model, in model order: wd = (delta where kept, else 0) * L1 ratio (DARE's rescale;
  a ratio of 1 is skipped: the same bits) * w; total = wd * vote (first
  model), total = total + wd * vote (the others), the votes in float64 as the kernels take
  them (a large slack would overflow float32). Each product and sum is its own operation
  (no fused multiply-add, which the kernels do not use either).
- agree = wd != 0 and (wd > 0) == (total >= 0); merged and divisor are summed in model
  order; out = base + lambda * (merged / divisor, a divisor of 0 counting as 1). Without
  the election (dare_linear) merged = 0 + the wd in model order, divided by Python's sum
  of the weights with normalize.
- The cast to bfloat16 rounds to nearest even, as the kernels' store does.

The engine hands over the same flat numpy views it gives the kernels (bfloat16 as uint16
bits); TorchEngine moves them to the device raw (bfloat16 as int16 bits) and ties_merge
widens them chunk by chunk.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .draws import stream_key, uniforms
from .l1 import EXPONENTS, exponent_sums, l1_ratio
from .st_io import to_float32
from .trim import outlier_ranks, rank_layout, trim_count

if TYPE_CHECKING:
    import torch

# a model's keep mask for entries s..e-1 of a tensor, given their float32 deltas
Keep = Callable[[int, int, "torch.Tensor"], "torch.Tensor"]

BINS = 1 << 16
INF_BITS = 0x7F800000  # above the bits of every finite magnitude


# entries per chunk: the selection's histograms and the merge run chunk by chunk over the raw
# inputs, so the work memory is a few float32 chunks whatever the tensor's size
CHUNK = 1 << 22


def store_chunk(out: torch.Tensor, s: int, e: int, result: torch.Tensor, bad: torch.Tensor, at: int) -> None:
    """out[s:e] = a chunk's float32 result in out's dtype, counting the NaN/Inf entries of the
    result into bad[at] (an overflow in float32) and of the stored values into bad[at + 1]
    (an overflow of the cast)."""
    import torch

    bad[at] += (~torch.isfinite(result)).sum()
    stored = result.to(out.dtype)
    out[s:e] = stored
    bad[at + 1] += (~torch.isfinite(stored)).sum()


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """The IEEE bits of |delta| as int32: non-negative, and ordered like the magnitudes."""
    import torch

    return delta.abs().view(torch.int32)


def chunks(n: int) -> list[tuple[int, int]]:
    return [(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]


def _delta(x: torch.Tensor, base: torch.Tensor, s: int, e: int) -> torch.Tensor:
    return to_float32(x[s:e]) - to_float32(base[s:e])


def _top_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value, and how many values lie in higher bins."""
    import torch

    from_top = torch.cumsum(hist.flip(0), 0)
    idx = int(torch.searchsorted(from_top, torch.tensor([k], device=hist.device, dtype=from_top.dtype))[0])
    b = BINS - 1 - idx
    return b, int(from_top[idx]) - int(hist[b])


def select_threshold(x: torch.Tensor, base: torch.Tensor, k: int) -> tuple[int, int]:
    """(threshold bits t, tie index limit) for keeping the k largest |x - base| (raw flat
    inputs): entries whose |delta| bits are > t are kept, and those equal to t at indices
    below the limit. A radix select: a histogram of the top 16 bits, then of the low 16
    within the chosen bin, each summed over chunks."""
    import torch

    n = base.numel()
    zeros = torch.zeros(BINS, dtype=torch.int64, device=base.device)
    high = zeros.clone()
    for s, e in chunks(n):
        high += torch.bincount(magnitude_bits(_delta(x, base, s, e)) >> 16, minlength=BINS)
    high_bin, above = _top_bin(high, k)
    low = zeros.clone()
    for s, e in chunks(n):
        bits = magnitude_bits(_delta(x, base, s, e))
        low += torch.bincount(bits[(bits >> 16) == high_bin] & 0xFFFF, minlength=BINS)
    low_bin, above_low = _top_bin(low, k - above)
    t = (high_bin << 16) | low_bin
    room = k - above - above_low
    if int(low[low_bin]) <= room:
        return t, n
    for s, e in chunks(n):  # the room-th entry equal to t, in index order
        tied = torch.nonzero(magnitude_bits(_delta(x, base, s, e)) == t).view(-1)
        if tied.numel() >= room:
            return t, s + int(tied[room - 1]) + 1
        room -= tied.numel()
    raise AssertionError("the histogram counted more ties than there are")  # pragma: no cover


def _top_cut(x: torch.Tensor, base: torch.Tensor, k: int) -> tuple[int, int]:
    """(threshold bits, tie index limit) of the top k |x - base|; -1 (every entry) when
    k >= n, and no entry (above every finite magnitude, no ties) when k <= 0."""
    n = base.numel()
    if k >= n:
        return -1, n
    if k <= 0:
        return INF_BITS, 0
    return select_threshold(x, base, k)


def _in_top(bits: torch.Tensor, cut: tuple[int, int], s: int) -> torch.Tensor:
    """Which entries of a chunk starting at s are in a cut's top (see _top_cut)."""
    t, limit = cut
    top = bits > t
    ties_end = min(max(limit - s, 0), bits.numel())
    top[:ties_end] |= bits[:ties_end] == t
    return top


def _cut_keep(inner: tuple[int, int] | None, outer: tuple[int, int] | None) -> Keep | None:
    """The keep mask of a trim: in the top of the inner cut (None: every entry) and not in
    the top of the outer cut (None: no entry); None when every entry is kept."""
    import torch

    if inner is None and outer is None:
        return None

    def keep(s: int, e: int, delta: torch.Tensor) -> torch.Tensor:
        bits = magnitude_bits(delta)
        kept = _in_top(bits, inner, s) if inner is not None else torch.ones_like(bits, dtype=torch.bool)
        if outer is not None:
            kept &= ~_in_top(bits, outer, s)
        return kept

    return keep


def _draw_keep(key: np.uint64, density: float) -> Keep:
    """The keep mask of DARE's draws (draws.py, on the CPU), moved to the delta's device."""
    import torch

    def keep(s: int, e: int, delta: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(uniforms(key, s, e) < density).to(delta.device)

    return keep


def ties_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    slacks: list[float],
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[int], list[int], list[int], int, int]:
    """ties / slack_ties of one tensor given as raw flat inputs on one device (bfloat16 as
    int16 bits, or float16/float32), equal bit for bit to kernels.fused_ties.

    Returns (merged, in out_dtype (default float32); kept and agreed per model; NaN/Inf
    entries per input, base first; NaN/Inf entries of the float32 result; NaN/Inf entries
    of the merged tensor as stored)."""
    n = base.numel()
    ranks = [(0, trim_count(n, d)) for d in densities]
    return cut_merge(base, tensors, weights, ranks, slacks, lam, normalize, True, out_dtype)


def cut_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    ranks: list[tuple[int, int]],
    slacks: list[float],
    lam: float,
    normalize: bool,
    elect: bool,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[int], list[int], list[int], int, int]:
    """kernels.fused_cuts on one device, bit for bit: model i keeps the entries of its delta
    whose magnitude rank lies in ranks[i] = [start, stop) (the top `stop` minus the top
    `start`); then the election and disjoint mean (elect), or the weighted sum in model
    order from +0.0, divided by the sum of the weights with normalize. Returns what
    ties_merge returns (agreed all 0 without elect)."""
    n = base.numel()
    # per model: the cut of its top `stop` (None: every entry) and of its top `start`,
    # dropped again (None: no entry)
    keeps = [
        _cut_keep(None if stop >= n else _top_cut(x, base, stop), None if start <= 0 else _top_cut(x, base, start))
        for x, (start, stop) in zip(tensors, ranks, strict=True)
    ]
    ratios = [1.0] * len(tensors)
    return sparse_merge(base, tensors, weights, keeps, ratios, slacks, elect, lam, normalize, out_dtype)


def _magprune_keep(
    x: torch.Tensor, base: torch.Tensor, shape: tuple[int, ...], key: np.uint64, density: float, epsilon: float
) -> Keep | None:
    """The keep mask of DELLA's MagPrune (kernels._magprune_pass): each row along dim 1 of
    the tensor of this shape (trim.rank_layout) ranked by |delta|, equal magnitudes by index
    (the lower ranks higher), and entry f kept where its draw (draws.py, on the CPU) is below
    (density - epsilon) + (rank / (cols - 1)) * (2 epsilon), in float64 in that order; below
    density in rows of one column. A chunk's mask ranks the whole outer rows it touches,
    from the raw inputs. None (every entry) when density >= 1."""
    import torch

    if density >= 1:
        return None
    outer, cols, inner = rank_layout(shape)
    size = cols * inner
    dev = base.device
    low, step = density - epsilon, 2 * epsilon
    divisor = torch.tensor(float(cols - 1), dtype=torch.float64, device=dev)  # a true division on CUDA too
    last: dict[tuple[int, int], torch.Tensor] = {}  # the rows ranked last: a long row spans chunks

    def keep(s: int, e: int, delta: torch.Tensor) -> torch.Tensor:
        if cols == 1:
            return torch.from_numpy(uniforms(key, s, e) < density).to(dev)
        first, stop = s // size * size, -(-e // size) * size  # the outer rows the chunk touches
        if (first, stop) not in last:
            last.clear()
            last[first, stop] = rows_keep(first, stop)
        return last[first, stop][s - first : e - first]

    def rows_keep(first: int, stop: int) -> torch.Tensor:
        rows = (stop - first) // size
        bits = magnitude_bits(_delta(x, base, first, stop)).view(rows, cols, inner).transpose(1, 2)
        column = torch.arange(cols, dtype=torch.int64, device=dev)
        # unique keys: ascending magnitude, and among equal ones the higher index first
        order = torch.sort((bits.to(torch.int64) << 32) | (cols - 1 - column), dim=-1).indices
        del bits
        ranks = torch.empty_like(order).scatter_(-1, order, column.expand_as(order))
        del order
        probability = (ranks.to(torch.float64) / divisor * step + low).transpose(1, 2).reshape(-1)
        del ranks
        return torch.from_numpy(uniforms(key, first, stop)).to(dev) < probability

    return keep


def dare_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    slacks: list[float],
    keys: list[np.uint64],
    rescale: bool,
    elect: bool,
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[int] | None, list[int] | None, list[int], int, int]:
    """dare_ties (elect) / dare_linear of one tensor given as raw flat inputs on one device,
    equal bit for bit to kernels.fused_dare: with rescale, a first pass over the chunks sums
    the exact L1 norms (l1.py) of every delta and of its kept entries. Returns what
    ties_merge returns (no kept/agreed counts without elect: None)."""
    keeps: list[Keep | None] = [_draw_keep(key, d) for key, d in zip(keys, densities, strict=True)]
    return drawn_merge(base, tensors, weights, keeps, slacks, rescale, elect, lam, normalize, out_dtype)


def della_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
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
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[int] | None, list[int] | None, list[int], int, int]:
    """della (elect) / della_linear of one tensor of the given shape, given as raw flat inputs
    on one device, equal bit for bit to kernels.fused_della: dare_merge with MagPrune's
    masks (_magprune_keep) in place of the draws."""
    keeps = [
        _magprune_keep(x, base, shape, key, d, eps)
        for x, key, d, eps in zip(tensors, keys, densities, epsilons, strict=True)
    ]
    return drawn_merge(base, tensors, weights, keeps, slacks, rescale, elect, lam, normalize, out_dtype)


def drawn_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    keeps: list[Keep | None],
    slacks: list[float],
    rescale: bool,
    elect: bool,
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, list[int] | None, list[int] | None, list[int], int, int]:
    """DARE's and DELLA's merge after the keep masks: with rescale, a first pass over the
    chunks sums the exact L1 norms (l1.py) of every delta and of its kept entries; then
    sparse_merge. Returns what ties_merge returns (no kept/agreed counts without elect: None)."""
    import torch

    ratios = [1.0] * len(tensors)
    if rescale:
        zero = torch.zeros((), dtype=torch.float32, device=base.device)
        sums = np.zeros((len(tensors), 2, EXPONENTS), dtype=np.int64)
        for s, e in chunks(base.numel()):
            b = to_float32(base[s:e])
            for i, (x, keep) in enumerate(zip(tensors, keeps, strict=True)):
                delta = to_float32(x[s:e]) - b
                sums[i, 0] += exponent_sums(delta)
                sums[i, 1] += exponent_sums(delta if keep is None else torch.where(keep(s, e, delta), delta, zero))
        ratios = [l1_ratio(before, after) for before, after in sums]
    merged, kept, agreed, *bad = sparse_merge(
        base, tensors, weights, keeps, ratios, slacks, elect, lam, normalize, out_dtype
    )
    return (merged, kept, agreed, *bad) if elect else (merged, None, None, *bad)  # type: ignore[return-value]


def sparse_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    keeps: list[Keep | None],
    ratios: list[float],
    slacks: list[float],
    elect: bool,
    lam: float,
    normalize: bool,
    out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, list[int], list[int], list[int], int, int]:
    """The merge pass of cut_merge and dare_merge, as kernels._merge: per model, the delta
    where keeps[i] keeps it (else 0), times ratios[i], times the weight; then the election
    and disjoint merge (elect), or the sum (divided by Python's sum of the weights with
    normalize); base + lam * that. Returns what ties_merge returns."""
    import torch

    dev, f32 = base.device, torch.float32
    zero = torch.zeros((), dtype=f32, device=dev)

    def scalar(v: float, dtype: torch.dtype = f32) -> torch.Tensor:
        return torch.tensor(v, dtype=dtype, device=dev)  # rounded to float32 as the kernels do

    n, m = base.numel(), len(tensors)
    counts = torch.zeros((3, m), dtype=torch.int64, device=dev)  # kept, agreed, input NaN/Inf
    bad = torch.zeros(3, dtype=torch.int64, device=dev)  # NaN/Inf: base, float32 result, stored
    out = torch.empty(n, dtype=out_dtype or f32, device=dev)
    w32 = [scalar(w) for w in weights]
    r32 = [scalar(r) for r in ratios]
    votes = [scalar(1.0 + s, torch.float64) for s in slacks]
    total_weight = sum(weights)  # as kernels' _combine: Python's sum, then float32
    sum_divisor = scalar(total_weight if abs(total_weight) >= 1e-8 else 1.0)
    for s, e in chunks(n):
        b = to_float32(base[s:e])
        bad[0] += (~torch.isfinite(b)).sum()
        rows: list[torch.Tensor] = []
        total: torch.Tensor | None = None
        for i, x in enumerate(tensors):
            xi = to_float32(x[s:e])
            counts[2, i] += (~torch.isfinite(xi)).sum()
            delta = xi - b
            del xi
            keep = keeps[i]
            if keep is not None:
                delta = torch.where(keep(s, e, delta), delta, zero)  # masked, then rescaled and weighted
            if ratios[i] != 1.0:  # times 1 is the same bits
                delta = delta * r32[i]
            wd = delta * w32[i]
            del delta
            if elect:
                vote = wd.double() * votes[i]
                total = vote if total is None else total + vote
            counts[0, i] += torch.count_nonzero(wd)
            rows.append(wd)
        merged: torch.Tensor | None = None
        divisor: torch.Tensor | None = None
        if elect:
            assert total is not None  # at least one model
            positive_total = total >= 0
            del total
            for i, wd in enumerate(rows):
                agree = (wd != 0) & ((wd > 0) == positive_total)
                counts[1, i] += torch.count_nonzero(agree)
                part = torch.where(agree, wd, zero)
                merged = part if merged is None else merged + part
                if normalize:
                    share = torch.where(agree, w32[i], zero)
                    divisor = share if divisor is None else divisor + share
            del positive_total
            if normalize:
                assert divisor is not None
                divisor = torch.where(divisor != 0, divisor, scalar(1.0))
        else:
            for wd in rows:  # from +0.0, in model order, as the kernels and the reference sum
                merged = (zero if merged is None else merged) + wd
            divisor = sum_divisor
        del rows
        assert merged is not None
        if normalize:
            assert divisor is not None
            merged = merged / divisor
        result = b + scalar(lam) * merged
        store_chunk(out, s, e, result, bad, 1)
    kept, agreed, nonfinite = counts.tolist()
    bad_base, bad_float32, bad_stored = bad.tolist()
    return out, kept, agreed, [bad_base, *nonfinite], bad_float32, bad_stored


def torch_ties(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    out_dtype: torch.dtype | None,
):
    """ties or slack_ties (both elect with the models' slack) with the recipe's parameters:
    see ties_merge. Like the kernels, not for mergekit's rescale (the engine checks)."""
    return ties_merge(
        base,
        tensors,
        [float(p["weight"]) for p in model_params],
        [float(p["density"]) for p in model_params],
        [float(p.get("slack", 0.0)) for p in model_params],
        float(params["lambda"]),
        bool(params["normalize"]),
        out_dtype,
    )


def torch_breadcrumbs(base, tensors, model_params, params, out_dtype, elect=False):
    """breadcrumbs (the weighted sum) or breadcrumbs_ties (elect): see cut_merge."""
    n = base.numel()
    merged, kept, agreed, bad_inputs, bad_float32, bad_stored = cut_merge(
        base,
        tensors,
        [float(p["weight"]) for p in model_params],
        [outlier_ranks(n, float(p["density"]), float(p["gamma"])) for p in model_params],
        [float(p.get("slack", 0.0)) for p in model_params],
        float(params["lambda"]),
        bool(params["normalize"]),
        elect,
        out_dtype,
    )
    counts = (kept, agreed) if elect else (None, None)
    return merged, *counts, bad_inputs, bad_float32, bad_stored


def elementwise_merge(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    weights: list[float],
    mode: str,
    lam: float = 1.0,
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, None, None, list[int], int, int]:
    """linear, task_arithmetic, passthrough's scale or nearswap (mode "linear",
    "task_arithmetic", "scale", "nearswap"; for nearswap, weights is [t]) of one tensor
    given as raw flat inputs on one device, chunk by chunk, equal bit for bit to
    kernels.fused_elementwise (and so to the references in methods.py): the
    accumulator starts at +0.0 (Python's sum() starts from 0) and adds w_i * x_i (for linear
    after the first model as a fused multiply-add, mergekit's addcmul_), or
    w_i * (x_i - base), in model order; then base + lambda * that, or that / sum(weights)
    with normalize; the scale alone is w_0 * x_0. Weights, lambda and the divisor are float32
    tensors on the device: divided by a CPU scalar, CUDA would multiply by its reciprocal
    instead, which is not the same bits.

    Returns what ties_merge returns, with no kept/agreed counts (None); base may be None
    except for task_arithmetic and nearswap (linear refuses NaN/Inf in it but does not use it)."""
    import torch

    if base is None and mode in ("task_arithmetic", "nearswap"):
        raise ValueError("task_arithmetic and nearswap need a base")
    dev, f32 = tensors[0].device, torch.float32

    def scalar(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=f32, device=dev)  # rounded to float32 as the kernels do

    n = tensors[0].numel()
    zero, one, w32 = scalar(0.0), scalar(1.0), [scalar(w) for w in weights]
    divisor = torch.tensor(weights, dtype=f32, device=dev).sum()  # methods.linear's divisor
    near_floor = float(np.float32(1e-6))  # clamp's bound, as the float32 the kernels use
    inputs = ([base] if base is not None else []) + list(tensors)
    bad = torch.zeros(len(inputs) + 2, dtype=torch.int64, device=dev)  # inputs, float32 result, stored
    out = torch.empty(n, dtype=out_dtype or f32, device=dev)
    for s, e in chunks(n):
        b = to_float32(base[s:e]) if base is not None else None
        if b is not None:
            bad[0] += (~torch.isfinite(b)).sum()
        acc: torch.Tensor | None = None
        for i, x in enumerate(tensors):
            xi = to_float32(x[s:e])
            bad[i + (b is not None)] += (~torch.isfinite(xi)).sum()
            if mode == "nearswap":  # geometric.nearswap; its t / tensor is torch's reciprocal, times t
                assert b is not None  # nearswap and task_arithmetic declare a base: the recipe has one
                share = (torch.reciprocal((b - xi).abs().clamp(min=near_floor)) * w32[0]).clamp(0, 1)
                acc = share * xi + (one - share) * b
                continue
            if mode == "linear" and acc is not None:  # mergekit's addcmul_: a fused multiply-add
                acc = torch.addcmul(acc, xi, w32[i])
                continue
            if mode == "task_arithmetic":
                assert b is not None
                term = w32[i] * (xi - b)
            else:
                term = w32[i] * xi
            del xi
            if mode == "scale":
                acc = term
            else:
                acc = zero + term if acc is None else acc + term
            del term
        assert acc is not None
        if mode == "task_arithmetic":
            assert b is not None
            acc = b + scalar(lam) * acc
        elif normalize:
            acc = acc / divisor
        store_chunk(out, s, e, acc, bad, -2)
    counts = bad.tolist()
    return out, None, None, counts[:-2], counts[-2], counts[-1]


def torch_linear(base, tensors, model_params, params, out_dtype):
    """linear with the recipe's parameters: see elementwise_merge."""
    weights = [float(p["weight"]) for p in model_params]
    return elementwise_merge(base, tensors, weights, "linear", normalize=bool(params["normalize"]), out_dtype=out_dtype)


def torch_task_arithmetic(base, tensors, model_params, params, out_dtype):
    """task_arithmetic with the recipe's parameters: see elementwise_merge."""
    weights = [float(p["weight"]) for p in model_params]
    return elementwise_merge(
        base, tensors, weights, "task_arithmetic", lam=float(params["lambda"]), out_dtype=out_dtype
    )


def torch_nearswap(base, tensors, model_params, params, out_dtype):
    """nearswap (one model, toward the base where it is farther than t): see elementwise_merge."""
    return elementwise_merge(base, tensors, [float(params["t"])], "nearswap", out_dtype=out_dtype)


def torch_passthrough(base, tensors, model_params, params, out_dtype):
    """passthrough (the one model times its scale): see elementwise_merge."""
    return elementwise_merge(base, tensors, [float(model_params[0]["scale"])], "scale", out_dtype=out_dtype)


# methods whose torch implementation here replaces the reference in methods.METHODS, each
# fn(base, models, model_params, params, out_dtype) on raw flat inputs (and tensor_name= for
# a random method) -> what ties_merge
# returns (base None for a method that takes none and a recipe without one); the other
# methods' reference functions are plain torch, run on whole float32 tensors
def torch_dare(base, tensors, model_params, params, out_dtype, *, tensor_name, elect):
    """dare_ties (elect) or dare_linear with the recipe's parameters: see dare_merge."""
    return dare_merge(
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
        out_dtype,
    )


def torch_della(base, tensors, model_params, params, out_dtype, *, tensor_name, shape, elect):
    """della (elect) or della_linear with the recipe's parameters: see della_merge."""
    return della_merge(
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
        out_dtype,
    )


TORCH_METHODS: dict[str, Callable] = {
    "ties": torch_ties,
    "slack_ties": torch_ties,
    "linear": torch_linear,
    "task_arithmetic": torch_task_arithmetic,
    "passthrough": torch_passthrough,
    "nearswap": torch_nearswap,
    "breadcrumbs": torch_breadcrumbs,
    "breadcrumbs_ties": partial(torch_breadcrumbs, elect=True),
    "dare_linear": partial(torch_dare, elect=False),
    "dare_ties": partial(torch_dare, elect=True),
    "della": partial(torch_della, elect=True),
    "della_linear": partial(torch_della, elect=False),
}


def host_tensor(a: np.ndarray) -> torch.Tensor:
    """A zero-copy torch view of a flat numpy array, read-only ones (memory-mapped shards)
    included: nothing here writes to it. bfloat16 bits (uint16) are viewed as int16."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the array is not writable
        return torch.from_numpy(a.view(np.int16) if a.dtype == np.uint16 else a)


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
        """The raw inputs on the device (bfloat16 as int16 bits): widened chunk by chunk later."""
        import torch

        if not self.cuda or sum(a.size for a in arrays) < SMALL_NUMEL * len(arrays):
            return [host_tensor(a) for a in arrays]  # in place on a CPU; see SMALL_NUMEL
        self._pinned_in = self._pinned(self._pinned_in, sum(a.nbytes for a in arrays))
        out, offset = [], 0
        assert self._copy_stream is not None  # made when self.cuda
        with torch.cuda.stream(self._copy_stream):
            for a in arrays:
                host = self._pinned_in[offset : offset + a.nbytes]
                host.copy_(host_tensor(a.view(np.uint8)))  # pages fault in here, ahead of use
                raw = torch.empty(a.nbytes, dtype=torch.uint8, device=self.device)
                raw.copy_(host, non_blocking=True)
                out.append(raw.view(host_tensor(a[:0]).dtype))
                offset += a.nbytes
            self._copy_stream.synchronize()  # the pinned buffer is free again for the next tensor
        return out

    def take(self, key: str, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """The staged raw inputs of a tensor (staged now if they were not)."""
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
        pinned = self._pinned_out[turn] = self._pinned(self._pinned_out[turn], bits.numel())
        host = pinned[: bits.numel()]
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


def device_budget(device: str) -> int | None:
    """Free memory on a CUDA device in bytes, else None (no limit we can tell)."""
    import torch

    if not str(device).startswith("cuda"):
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def device_bytes_needed(numel: int, models: int, input_itemsize: int = 2) -> int:
    """Device memory one tensor of `numel` entries needs here, at most: its raw inputs (base
    and models) and the next tensor's staged ones, the float32 output, and one chunk's work
    (float32 and float64 rows per model, masks, histograms)."""
    inputs = (models + 1) * numel * input_itemsize
    work = min(numel, CHUNK) * (12 * models + 32)
    return 2 * inputs + 4 * numel + work


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


# -- RAM, RAM+ (tensor-local) and layer swapping -----------------------------------------------
# kernels.fused_ram and fused_layer_swap chunk by chunk, in the reference's own torch
# operations (methods.ram, ramplus_tl, layer_swap) on each chunk: every entry's value depends
# on that entry alone once RAM+'s gains are known (a counting pass of its own, as the
# kernels'), and the models' terms are summed from +0.0 in model order, as the reference's
# stacked sum adds up to methods.SUMMED_MODELS_MAX models.


def _ram_chunk(
    base: torch.Tensor, tensors: list[torch.Tensor], eps: torch.Tensor, s: int, e: int, bad: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(float32 base, task vectors, changed masks, per entry how many models changed it) of
    entries s..e-1, adding the inputs' NaN/Inf entries to bad (base first)."""
    import torch

    b = to_float32(base[s:e])
    bad[0] += (~torch.isfinite(b)).sum()
    tvs, changed = [], []
    for i, x in enumerate(tensors):
        xi = to_float32(x[s:e])
        bad[i + 1] += (~torch.isfinite(xi)).sum()
        tv = xi - b
        tvs.append(tv)
        changed.append(tv.abs() > eps)
    return b, tvs, changed, torch.stack(changed).sum(dim=0)


def ram_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    epsilon: float,
    params: dict[str, Any] | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, None, None, list[int], int, int]:
    """methods.ram, or with params (r, alpha, epsilon) methods.ramplus_tl, of one tensor given
    as raw flat inputs on one device, equal bit for bit to kernels.fused_ram. Returns what
    ties_merge returns, with no kept/agreed counts (None)."""
    import torch

    from .methods import ramplus_gains

    dev, f32 = base.device, torch.float32
    eps = torch.tensor(epsilon, dtype=f32, device=dev)  # compared as float32, as torch takes a Python float
    zero = torch.zeros((), dtype=f32, device=dev)
    n, m = base.numel(), len(tensors)
    bad = torch.zeros(m + 3, dtype=torch.int64, device=dev)  # inputs, float32 result, stored
    gains: list[torch.Tensor] | None = None
    if params is not None:  # RAM+: each model's changed entries shared with another model, and unique
        tally = torch.zeros((2, m), dtype=torch.int64, device=dev)
        for s, e in chunks(n):
            _, _, changed, counts = _ram_chunk(base, tensors, eps, s, e, bad)
            for i, ch in enumerate(changed):
                tally[0, i] += (ch & (counts > 1)).sum()
                tally[1, i] += (ch & (counts == 1)).sum()
        gains = list(ramplus_gains(tally[0].cpu(), tally[1].cpu(), params).to(dev))
        bad.zero_()  # counted again below
    out = torch.empty(n, dtype=out_dtype or f32, device=dev)
    for s, e in chunks(n):
        b, tvs, changed, counts = _ram_chunk(base, tensors, eps, s, e, bad)
        unique, overlap, divisor = counts == 1, counts > 1, counts.clamp(min=1)
        acc = zero
        for i, (tv, ch) in enumerate(zip(tvs, changed, strict=True)):
            tvz = tv * ch
            kept = tvz * unique if gains is None else tvz * unique * gains[i]
            acc = acc + (kept + tvz * overlap / divisor)
        del tvs, changed
        result = b + acc
        store_chunk(out, s, e, result, bad, -2)
    counts_ = bad.tolist()
    return out, None, None, counts_[:-2], counts_[-2], counts_[-1]


def torch_ram(base, tensors, model_params, params, out_dtype, *, plus=False):
    """ram, or ramplus_tl (plus), with the recipe's parameters: see ram_merge."""
    return ram_merge(base, tensors, float(params["epsilon"]), params if plus else None, out_dtype)


def layer_swap_merge(
    tensors: list[torch.Tensor], shares: list[float], out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, None, None, list[int], int, int]:
    """methods.layer_swap of one tensor given as raw flat inputs on one device, equal bit for
    bit to kernels.fused_layer_swap: where a share is 1.0, that model's tensor (the raw input
    itself when it is already in the output dtype), else shares[0] * x0 + shares[1] * x1
    with the shares as float32 tensors (two roundings and a third for the sum: no fused
    multiply-add). Returns what ties_merge returns, with no counts (None)."""
    import torch

    dev, f32 = tensors[0].device, torch.float32
    out_dtype = out_dtype or f32
    whole = tensors[shares.index(1.0)] if 1.0 in shares else None
    if whole is not None and whole.dtype == torch.int16:
        whole = whole.view(torch.bfloat16)  # bfloat16 bits
    s32 = [torch.tensor(v, dtype=f32, device=dev) for v in shares]
    n = tensors[0].numel()
    bad = torch.zeros(len(tensors) + 2, dtype=torch.int64, device=dev)  # inputs, float32 result, stored
    out = whole if whole is not None and whole.dtype == out_dtype else torch.empty(n, dtype=out_dtype, device=dev)
    for s, e in chunks(n):
        xs = [to_float32(x[s:e]) for x in tensors]
        for i, xi in enumerate(xs):
            bad[i] += (~torch.isfinite(xi)).sum()
        if out is whole:
            continue
        if whole is not None:
            result = whole[s:e].to(f32)
        else:
            result = s32[0] * xs[0] + s32[1] * xs[1]
            bad[-2] += (~torch.isfinite(result)).sum()
        stored = result.to(out_dtype)
        out[s:e] = stored
        bad[-1] += (~torch.isfinite(stored)).sum()
    counts = bad.tolist()
    return out, None, None, counts[:-2], counts[-2], counts[-1]


def torch_layer_swap(base, tensors, model_params, params, out_dtype):
    """layer_swap with this tensor's shares (methods._layer_swap_shares); it takes no base."""
    return layer_swap_merge(tensors, [float(p["share"]) for p in model_params], out_dtype)


TORCH_METHODS.update(
    {
        "ram": torch_ram,
        "ramplus_tl": partial(torch_ram, plus=True),
        "layer_swap": torch_layer_swap,
    }
)


# -- spherical methods: slerp, nuslerp, multislerp, model_stock ---------------------------------
# The kernels' two passes (kernels.py, spherical section): the scalars from sphere_scalars.py
# (the reference's own torch reductions, on the CPU), then each chunk combined on the device
# in the reference's float32 order. Scalars go to the device as tensors: divided by a CPU
# scalar, CUDA would multiply by its reciprocal instead.


def _finite_counts(inputs: list[torch.Tensor]) -> list[int]:
    import torch

    return [int(sum((~torch.isfinite(to_float32(x[s:e]))).sum() for s, e in chunks(x.numel()))) for x in inputs]


def _two_point_merge(x0, x1, base, deltas, add_base, c0, c1, post, d, out_dtype):
    """kernels._two_point chunk by chunk: [base +] ((c0 * v0 + c1 * v1) [post d]), v = x
    [- base]. post is "divide", "multiply" or None. Returns (out, NaN/Inf entries per
    input (base first when given), of the float32 result, of the stored result)."""
    import torch

    dev = x0.device
    c0, c1, d = (c.to(dev) for c in (c0, c1, d))
    n = x0.numel()
    out = torch.empty(n, dtype=out_dtype or torch.float32, device=dev)
    bad = torch.zeros(5, dtype=torch.int64, device=dev)  # base, x0, x1, float32 result, stored
    for s, e in chunks(n):
        v0, v1 = to_float32(x0[s:e]), to_float32(x1[s:e])
        b = to_float32(base[s:e]) if base is not None else None
        if b is not None:
            bad[0] += (~torch.isfinite(b)).sum()
        bad[1] += (~torch.isfinite(v0)).sum()
        bad[2] += (~torch.isfinite(v1)).sum()
        if deltas:
            assert b is not None  # deltas are taken from a base
            v0, v1 = v0 - b, v1 - b
        r = c0 * v0 + c1 * v1
        del v0, v1
        if post == "divide":
            r = r / d
        elif post == "multiply":
            r = r * d
        if add_base:
            r = b + r
        store_chunk(out, s, e, r, bad, 3)
    counts = bad.tolist()
    return out, counts[:3], counts[3], counts[4]


def torch_slerp(base, tensors, model_params, params, out_dtype):
    """slerp from the base toward the one model: see kernels._slerp_fast_path."""
    from .sphere_scalars import slerp_coefficients

    c0, c1 = slerp_coefficients(float(params["t"]), base.cpu(), tensors[0].cpu())
    out, bad, bad_float32, bad_stored = _two_point_merge(
        base, tensors[0], None, False, False, c0, c1, None, c0, out_dtype
    )
    return out, None, None, bad[1:3], bad_float32, bad_stored


def _per_entry(co, s: int, e: int, dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The coefficients (sphere_scalars.PerVector) of entries s..e-1, each its vector's."""
    import torch

    vector = (torch.arange(s, e, device=dev) // co.stride) % co.count
    return co.c0.to(dev)[vector], co.c1.to(dev)[vector], co.d.to(dev)[vector]


def _reference_sphere(name, base, tensors, model_params, params, shape, out_dtype):
    """The method's reference on float32 copies viewed in the shape: the cases the fast
    paths leave to it (kernels._reference_sphere). Returns what the fast paths return."""
    import torch

    from .methods import METHODS

    inputs = ([base] if base is not None else []) + list(tensors)
    bad_inputs = _finite_counts(inputs)
    if any(bad_inputs):
        return torch.empty(0, device=tensors[0].device), None, None, bad_inputs, 0, 0
    raw = [to_float32(x).view(shape) for x in inputs]
    has_base = base is not None
    result, _ = METHODS[name].fn(raw[0] if has_base else None, raw[int(has_base) :], model_params, params)
    result = result.reshape(-1)
    stored = result.to(out_dtype or torch.float32)
    return stored, None, None, bad_inputs, int((~torch.isfinite(result)).sum()), int((~torch.isfinite(stored)).sum())


def torch_nuslerp(base, tensors, model_params, params, out_dtype, *, shape):
    """nuslerp per tensor, row or column: see kernels._nuslerp_fast_path."""
    import torch

    from .geometric import interpolation_fraction
    from .sphere_scalars import nuslerp_coefficients, nuslerp_layout

    layout = nuslerp_layout(shape, params)
    if layout is None:
        return _reference_sphere("nuslerp", base, tensors, model_params, params, shape, out_dtype)
    t = interpolation_fraction([p["weight"] for p in model_params])
    x0, x1 = tensors
    has_base = base is not None
    co = nuslerp_coefficients(t, x0.cpu(), x1.cpu(), base.cpu() if has_base else None, *layout)
    if co.count == 1:
        out, bad, bad_float32, bad_stored = _two_point_merge(
            x0, x1, base, has_base, has_base, co.c0[0], co.c1[0], "divide", co.d[0], out_dtype
        )
        return out, None, None, bad if has_base else bad[1:], bad_float32, bad_stored
    dev, n = x0.device, x0.numel()
    out = torch.empty(n, dtype=out_dtype or torch.float32, device=dev)
    counts = torch.zeros(5, dtype=torch.int64, device=dev)  # base, x0, x1, float32 result, stored
    for s, e in chunks(n):
        v0, v1 = to_float32(x0[s:e]), to_float32(x1[s:e])
        counts[1] += (~torch.isfinite(v0)).sum()
        counts[2] += (~torch.isfinite(v1)).sum()
        b = to_float32(base[s:e]) if has_base else None
        if b is not None:
            counts[0] += (~torch.isfinite(b)).sum()
            v0, v1 = v0 - b, v1 - b
        c0, c1, d = _per_entry(co, s, e, dev)
        r = (c0 * v0 + c1 * v1) / d
        if b is not None:
            r = b + r
        store_chunk(out, s, e, r, counts, 3)
    bad = counts.tolist()
    return out, None, None, bad[:3] if has_base else bad[1:3], bad[3], bad[4]


def torch_model_stock(base, tensors, model_params, params, out_dtype, *, shape):
    """model_stock per tensor or row: t * ((0 + x_1 + x_2 ...) / count) + (1 - t) * base, as
    kernels._stock."""
    import torch

    from .sphere_scalars import model_stock_ratio, model_stock_rows

    rows = model_stock_rows(shape, params)
    if rows is None:
        return _reference_sphere("model_stock", base, tensors, model_params, params, shape, out_dtype)
    dev = base.device
    co = model_stock_ratio(base.cpu(), [x.cpu() for x in tensors], rows)
    count = torch.tensor(float(len(tensors)), dtype=torch.float32, device=dev)
    n = base.numel()
    out = torch.empty(n, dtype=out_dtype or torch.float32, device=dev)
    bad = torch.zeros(len(tensors) + 3, dtype=torch.int64, device=dev)  # inputs, float32 result, stored
    for s, e in chunks(n):
        b = to_float32(base[s:e])
        bad[0] += (~torch.isfinite(b)).sum()
        acc = torch.zeros_like(b)
        for i, x in enumerate(tensors):
            xi = to_float32(x[s:e])
            bad[i + 1] += (~torch.isfinite(xi)).sum()
            acc = acc + xi
        t, u, _ = _per_entry(co, s, e, dev) if co.count > 1 else (co.c0.to(dev)[0], co.c1.to(dev)[0], None)
        r = t * (acc / count) + u * b
        store_chunk(out, s, e, r, bad, -2)
    counts = bad.tolist()
    return out, None, None, counts[:-2], counts[-2], counts[-1]


def torch_multislerp(base, tensors, model_params, params, out_dtype):
    """multislerp: see kernels._multislerp_fast_path (the reference where it takes it)."""
    from .sphere_scalars import multislerp_terms

    has_base = base is not None
    inputs = ([base] if has_base else []) + list(tensors)
    bad_inputs = _finite_counts(inputs)
    terms = None
    if len(tensors) > 1 and not any(bad_inputs):
        terms = multislerp_terms(
            [x.cpu() for x in tensors],
            base.cpu() if has_base else None,
            [float(p["weight"]) for p in model_params],
            bool(params["normalize_weights"]),
            float(params["eps"]),
        )
    if terms is None:
        shape = (tensors[0].numel(),)
        return _reference_sphere("multislerp", base, tensors, model_params, params, shape, out_dtype)
    dev = tensors[0].device
    mean, step = (a.to(dev) for a in terms.arrays())
    out, _, bad_float32, bad_stored = _two_point_merge(
        mean, step, base, False, has_base, terms.cs, terms.k, "multiply", terms.scale, out_dtype
    )
    return out, None, None, bad_inputs, bad_float32, bad_stored


def torch_karcher(base, tensors, model_params, params, out_dtype):
    """karcher: see kernels._karcher_fast_path (its iterations on the CPU, the reference
    where it takes it); scale * mean on the device."""
    import torch

    from .sphere_scalars import karcher_terms

    inputs = ([base] if base is not None else []) + list(tensors)
    bad_inputs = _finite_counts(inputs)
    terms = None if any(bad_inputs) else karcher_terms(inputs, int(params["max_iter"]), float(params["tol"]))
    if terms is None:
        return _reference_sphere("karcher", base, tensors, model_params, params, (inputs[0].numel(),), out_dtype)
    mean, scale = terms
    dev = inputs[0].device
    result = scale.to(dev) * torch.from_numpy(mean).to(dev)
    stored = result.to(out_dtype or torch.float32)
    return stored, None, None, bad_inputs, int((~torch.isfinite(result)).sum()), int((~torch.isfinite(stored)).sum())


TORCH_METHODS.update(
    karcher=torch_karcher,
    slerp=torch_slerp,
    nuslerp=torch_nuslerp,
    multislerp=torch_multislerp,
    model_stock=torch_model_stock,
)


# -- arcee_fusion ---------------------------------------------------------------------------------
# methods.arcee_fusion on whole tensors holds several float32 copies at once; here its per-row
# divergence runs on blocks of rows with the reference's own operations (softmax and a sum
# over the last dim give each row the same bits in any block: two rows at least, so that a
# block is reduced as the whole tensor is, along its rows and not split across threads), and
# the output chunk by chunk. The order statistics are the reference's kthvalue.

FUSION_BLOCK = 1 << 20  # entries per block of rows: few torch parallel regions (slow where a core is busy)


def fusion_rows(shape: tuple[int, ...], n: int) -> tuple[int, int]:
    """(rows, cols) of arcee_fusion's divergence: rows along the last dim; a 1-D tensor is one row."""
    cols = shape[-1] if shape else n
    return (n // cols if cols else 0), cols


def row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """Blocks [r, e) of about FUSION_BLOCK entries, none of one row unless the tensor is one."""
    step = max(2, FUSION_BLOCK // max(cols, 1))
    blocks = [(r, min(r + step, rows)) for r in range(0, rows, step)]
    if len(blocks) > 1 and blocks[-1][1] - blocks[-1][0] == 1:
        blocks[-2:] = [(blocks[-2][0], rows)]
    return blocks


def fusion_divergence(base: torch.Tensor, model: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """arcee_fusion's divergence of each row (float32) of raw flat inputs, block by block:
    methods.softmax_divergence's operations, those after the softmaxes in place (the same
    elementwise kernels, so the same bits), and the inputs widened into two reused buffers."""
    import torch

    rows, cols = fusion_rows(shape, model.numel())
    divergence = torch.empty(rows, dtype=torch.float32, device=model.device)
    blocks = row_blocks(rows, cols)
    size = max((e - r) * cols for r, e in blocks) if blocks else 0
    b32, x32 = (torch.empty(size, dtype=torch.float32, device=model.device) for _ in range(2))
    for r, e in blocks:
        b = widen_into(base[r * cols : e * cols], b32).view(e - r, cols)
        x = widen_into(model[r * cols : e * cols], x32).view(e - r, cols)
        p = torch.softmax(x, dim=-1).add_(1e-8)
        q = torch.softmax(b, dim=-1).add_(1e-8)
        terms = torch.div(p, q, out=q).log_().mul_(p)  # p * log(p / q)
        torch.sum(terms, dim=-1, keepdim=True, out=divergence[r:e].view(-1, 1))
    return divergence


def widen_into(a: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """to_float32 of a flat input, written into the front of a float32 buffer."""
    import torch

    out = buffer[: a.numel()]
    if a.dtype in (torch.int16, torch.uint16):
        bits = out.view(torch.int32)
        bits.copy_(a.view(torch.int16))  # sign-extends; the shift drops the extension
        bits.bitwise_left_shift_(16)
    else:
        out.copy_(a)
    return out


def fusion_importance(
    base: torch.Tensor, model: torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """arcee_fusion's importance |model - base| * divergence of the row (float32, flat) of raw
    flat inputs, each row's divergence, and the NaN/Inf count of base and model."""
    import torch

    n, dev = model.numel(), model.device
    rows, cols = fusion_rows(shape, n)
    divergence = fusion_divergence(base, model, shape)
    importance = torch.empty(n, dtype=torch.float32, device=dev)
    bad = torch.zeros(2, dtype=torch.int64, device=dev)
    for r, e in row_blocks(rows, cols):
        b, x = to_float32(base[r * cols : e * cols]), to_float32(model[r * cols : e * cols])
        bad[0] += (~torch.isfinite(b)).sum()
        bad[1] += (~torch.isfinite(x)).sum()
        importance[r * cols : e * cols] = ((x - b).view(e - r, cols).abs() * divergence[r:e].view(-1, 1)).view(-1)
    return importance, divergence, bad.tolist()


def fusion_merge(
    base: torch.Tensor, model: torch.Tensor, shape: tuple[int, ...], out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, None, None, list[int], int, int]:
    """arcee_fusion of one tensor of the given shape (raw flat inputs), bit for bit the
    reference: base + delta where the importance is at least the fence, base + delta * 0
    elsewhere. Returns what ties_merge returns, with no counts."""
    import torch

    from .methods import fusion_positions

    n, dev = model.numel(), model.device
    importance, _, bad_inputs = fusion_importance(base, model, shape)
    host = importance.cpu()
    q1, median, q3 = (torch.kthvalue(host, k + 1).values.to(dev) for k in fusion_positions(n))
    fence = median + 1.5 * (q3 - q1)
    out = torch.empty(n, dtype=out_dtype or torch.float32, device=dev)
    bad = torch.zeros(2, dtype=torch.int64, device=dev)
    for s, e in chunks(n):
        b = to_float32(base[s:e])
        merged = b + (to_float32(model[s:e]) - b) * (importance[s:e] >= fence).float()
        store_chunk(out, s, e, merged, bad, 0)
    counts = bad.tolist()
    return out, None, None, bad_inputs, counts[0], counts[1]


def torch_arcee_fusion(base, tensors, model_params, params, out_dtype, *, shape):
    """arcee_fusion (one model): see fusion_merge."""
    return fusion_merge(base, tensors[0], shape, out_dtype)


TORCH_METHODS["arcee_fusion"] = torch_arcee_fusion


# -- sce ------------------------------------------------------------------------------------------
# methods.sce chunk by chunk: torch.var over the models is per entry (Welford's update in
# model order), the selection is sparsify.top_k_mask of the whole variance, the shares come
# from methods.sce_shares of the whole (models, entries) array of squares (row means whose
# bits depend on the row whole), and the election and disjoint mean are per entry (the sums
# over up to methods.SUMMED_MODELS_MAX stacked models run in model order in any chunk).


def sce_merge(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    slacks: list[float],
    select_topk: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[int], list[int], list[int], int, int]:
    """sce of one tensor given as raw flat inputs, bit for bit kernels.fused_sce and the
    reference. Returns what ties_merge returns."""
    import torch

    from .methods import elect_signs, sce_shares
    from .sparsify import top_k_mask

    m, n, dev, f32 = len(tensors), base.numel(), base.device, torch.float32
    bad = torch.zeros(m + 3, dtype=torch.int64, device=dev)  # inputs, float32 result, stored

    def task_vectors(s: int, e: int, count: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        b, xs = to_float32(base[s:e]), [to_float32(x[s:e]) for x in tensors]
        if count:
            for i, v in enumerate([b, *xs]):
                bad[i] += (~torch.isfinite(v)).sum()
        tv = torch.stack([x - b for x in xs])
        return b, tv if keep is None else tv * keep[s:e]

    keep = None
    if select_topk < 1:
        var = torch.empty(n, dtype=f32, device=dev)
        for s, e in chunks(n):
            var[s:e] = torch.var(task_vectors(s, e)[1], dim=0, unbiased=False)
        keep = top_k_mask(var.abs(), int(int(torch.count_nonzero(var)) * select_topk))
        del var
    squares = torch.empty((m, n), dtype=f32, device=dev)
    for s, e in chunks(n):
        squares[:, s:e] = task_vectors(s, e, count=True)[1].square()
    share = sce_shares(squares).view(-1, 1)
    del squares
    out = torch.empty(n, dtype=out_dtype or f32, device=dev)
    kept = torch.zeros(m, dtype=torch.int64, device=dev)
    agreed = torch.zeros(m, dtype=torch.int64, device=dev)
    for s, e in chunks(n):
        b, tv = task_vectors(s, e)
        agree = torch.sign(tv) == elect_signs(tv, slacks)
        erased = share * agree
        merged = b + (tv * erased).sum(0) / erased.sum(0).clamp(min=1e-6)
        kept += (tv != 0).sum(1)
        agreed += agree.sum(1)
        store_chunk(out, s, e, merged, bad, -2)
    counts = bad.tolist()
    return out, kept.tolist(), agreed.tolist(), counts[:-2], counts[-2], counts[-1]


def torch_sce(base, tensors, model_params, params, out_dtype):
    """sce with the recipe's parameters: see sce_merge."""
    slacks = [float(p.get("slack", 0.0)) for p in model_params]
    return sce_merge(base, tensors, slacks, float(params["select_topk"]), out_dtype)


TORCH_METHODS["sce"] = torch_sce
