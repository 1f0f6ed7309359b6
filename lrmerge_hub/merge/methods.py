"""Merge methods as pure tensor functions, and the registry that declares their parameters.

Spec: shared/reference/slack-ties.md. A method sees one tensor name at a time: the base
tensor (float32, or None when the method needs no base) and one float32 tensor per
non-base model, all of the same shape and on the same device. It returns the merged
float32 tensor and, for methods that trim and elect, per-model counts for the report.

Adding a method touches this file only: write the function and decorate it with
`@merge_method(...)`, declaring its per-model and global parameters.

torch is imported inside the functions that compute: validating a recipe needs only the
registry, and a CPU ties merge runs the fused kernels (kernels.py) without torch, whose
import costs seconds.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

# -- registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """A declared parameter: its default and a check returning an error text or None."""

    default: Any
    check: Callable[[Any], str | None]
    doc: str = ""


FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_MIN_NORMAL = 1.1754943508222875e-38
# Votes of the sign election are computed in float64: (1 + slack) * delta, for every finite
# float32 delta (|delta| in [1.4e-45, 3.4e38]) and slack in [0, SLACK_MAX], neither
# overflows nor underflows there, so the election is exact to float64 rounding.
SLACK_MAX = 1e200


def _number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, float32: bool = False):
    """A check for a number in [lo, hi] (lo excluded with lo_open); with float32, one the
    float32 math can hold: not beyond float32's range, and not so small that it would
    become 0 or lose precision (a subnormal)."""
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or abs(v) > sys.float_info.max or not math.isfinite(v):
            return "must be a finite number"  # (an int beyond every float is caught before isfinite raises)
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        if float32 and abs(v) > FLOAT32_MAX:
            return f"must be at most {FLOAT32_MAX:.4g} in magnitude (the merge computes in float32)"
        if float32 and v != 0 and abs(v) < FLOAT32_MIN_NORMAL:
            return f"must be 0 or at least {FLOAT32_MIN_NORMAL:.4g} in magnitude (the merge computes in float32)"
        return None

    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


WEIGHT = Param(1.0, _number(float32=True), "scale of this model's task vector (or of its weights, for linear)")
DENSITY = Param(1.0, _number(0.0, 1.0, lo_open=True), "fraction of entries kept by the trim, in (0, 1]")
SLACK = Param(0.0, _number(0.0, SLACK_MAX), "extra vote in the sign election, 0 to 1e200 (0 is plain TIES)")
LAMBDA = Param(1.0, _number(float32=True), "scale of the merged task vector")
NORMALIZE = Param(True, _boolean, "divide by the sum of the agreeing weights")


@dataclass
class MergeStats:
    """Per non-base model counts for one tensor: entries kept by the trim (nonzero after
    trimming) and, of those, entries whose sign agrees with the elected sign."""

    kept: torch.Tensor  # int64, shape (num_models,)
    agreed: torch.Tensor  # int64, shape (num_models,)


MethodFn = Callable[
    ["torch.Tensor | None", "list[torch.Tensor]", list[dict[str, Any]], dict[str, Any]],
    "tuple[torch.Tensor, MergeStats | None]",
]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    needs_base: bool
    model_params: dict[str, Param] = field(default_factory=dict)
    global_params: dict[str, Param] = field(default_factory=dict)
    doc: str = ""
    reports_retention: bool = False


METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    needs_base: bool,
    model_params: dict[str, Param],
    global_params: dict[str, Param] | None = None,
    reports_retention: bool = False,
):
    """Register a pure merge function under `name` with its declared parameters."""

    def register(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(
            name=name,
            fn=fn,
            needs_base=needs_base,
            model_params=model_params,
            global_params=global_params or {},
            doc=(fn.__doc__ or "").strip().splitlines()[0],
            reports_retention=reports_retention,
        )
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (allowed: {', '.join(sorted(METHODS))})") from None


# -- building blocks --------------------------------------------------------------------


def trim_count(numel: int, density: float) -> int:
    """k = max(1, floor(density * n)): how many entries the trim keeps (all when density >= 1)."""
    if density >= 1.0:
        return numel
    return max(1, int(math.floor(density * numel)))


def magnitude_threshold(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a flat non-negative float32 tensor, found by selection.

    A full sort (what mergekit does) is the slow path; `kthvalue` selects in linear time.
    """
    import torch

    n = magnitudes.numel()
    if magnitudes.device.type == "cpu":
        return torch.kthvalue(magnitudes, n - k + 1).values
    # kthvalue is slow on CUDA; topk of the k largest is fast there for the sizes we see.
    return torch.topk(magnitudes, k, sorted=False).values.min()


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, floor(d * n)) largest-magnitude entries of `delta`, zero the rest.

    Entries strictly above the k-th magnitude are kept, then entries equal to it in index
    order until exactly k are kept (the spec leaves the choice among ties open).
    """
    import torch

    n = delta.numel()
    k = trim_count(n, density)
    if k >= n:
        return delta
    flat = delta.reshape(-1)
    mag = flat.abs()
    t = magnitude_threshold(mag, k)
    keep = mag > t
    room = k - int(keep.sum())
    if room > 0:
        at_t = mag == t
        # keep the first `room` entries equal to the threshold
        keep |= at_t & (torch.cumsum(at_t, 0, dtype=torch.int64) <= room)
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)).reshape(
        delta.shape
    )


def elect_signs(weighted: torch.Tensor, slacks: list[float]) -> torch.Tensor:
    """gamma = sign(sum_i (1 + s_i) * delta_i), +1 where that sum is exactly 0.

    `weighted` is stacked (num_models, ...) weighted, trimmed deltas. With every slack 0
    this is TIES's `sum` consensus. The vote is summed in float64 (see SLACK_MAX): in
    float32 a large slack overflows it to Inf, and 0 * Inf is NaN.
    """
    import torch

    total = torch.zeros(weighted.shape[1:], dtype=torch.float64, device=weighted.device)
    for row, s in zip(weighted, slacks):
        total += row.double() * (1.0 + s)
    return torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype)


def disjoint_merge(
    weighted: torch.Tensor, weights: list[float], gamma: torch.Tensor, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the weighted deltas that agree with gamma, divided by the agreeing weights.

    Returns (merged delta, agree mask of shape (num_models, ...)). A zero entry never
    agrees; a divisor of 0 becomes 1.
    """
    import torch

    agree = torch.sign(weighted) == gamma
    merged = (weighted * agree).sum(0)
    if normalize:
        w = torch.tensor(weights, dtype=weighted.dtype, device=weighted.device)
        divisor = (agree * w.view(-1, *([1] * (weighted.dim() - 1)))).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        merged = merged / divisor
    return merged, agree


def ties_family(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    slacks: list[float],
) -> tuple[torch.Tensor, MergeStats]:
    import torch

    weights = [p["weight"] for p in model_params]
    trimmed = [trim_to_density(t - base, p["density"]) for t, p in zip(tensors, model_params)]
    weighted = torch.stack([d * w for d, w in zip(trimmed, weights)])
    del trimmed
    gamma = elect_signs(weighted, slacks)
    merged, agree = disjoint_merge(weighted, weights, gamma, params["normalize"])
    dims = tuple(range(1, weighted.dim()))
    stats = MergeStats(
        kept=(weighted != 0).sum(dim=dims, dtype=torch.int64) if dims else (weighted != 0).long(),
        agreed=agree.sum(dim=dims, dtype=torch.int64) if dims else agree.long(),
    )
    return base + params["lambda"] * merged, stats


# Dividing by a sum of weights that nearly cancels (|sum w| much smaller than sum |w|)
# multiplies the float32 rounding, and the merged weights, by that factor.
MAX_NORMALIZE_GAIN = 1e3


def _normalize_gain(weights: tuple[float, ...] | list[float]) -> float:
    total = math.fsum(weights)
    return math.fsum(abs(w) for w in weights) / abs(total) if total else math.inf


def normalize_problem(method: str, weights: list[float], normalize: bool) -> str | None:
    """Why dividing by the weights could blow the merge up, or None. linear divides by
    the sum of every weight; ties and slack_ties divide each entry by the sum of the
    weights that agree there, any subset of two or more (possible only with mixed signs)."""
    if not normalize:
        return None
    fix = "use weights that do not cancel, or normalize: false"
    if method == "linear":
        if _normalize_gain(weights) > MAX_NORMALIZE_GAIN:
            return (f"parameters.normalize: the weights sum to {math.fsum(weights):g}, too close to 0 "
                    f"to divide by; {fix}")
    elif method in ("ties", "slack_ties") and min(weights) < 0 < max(weights):
        from itertools import combinations

        if len(weights) > 16:
            return f"parameters.normalize: with over 16 models, weights must not mix signs; {fix}"
        for r in range(2, len(weights) + 1):
            for subset in combinations(weights, r):
                if _normalize_gain(subset) > MAX_NORMALIZE_GAIN:
                    return (f"parameters.normalize: the weights {', '.join(f'{w:g}' for w in subset)} sum to "
                            f"{math.fsum(subset):g}, too close to 0 to divide by where they agree; {fix}")
    return None


# -- methods ----------------------------------------------------------------------------


@merge_method("linear", needs_base=False, model_params={"weight": WEIGHT},
              global_params={"normalize": NORMALIZE})
def linear(base, tensors, model_params, params):
    """Weighted average of the models' full weights (the base is not averaged in)."""
    weights = [p["weight"] for p in model_params]
    out = sum(w * t for w, t in zip(weights, tensors))
    if params["normalize"]:  # recipes whose weights cancel are refused (normalize_problem)
        out = out / sum(weights)
    return out, None


@merge_method("task_arithmetic", needs_base=True, model_params={"weight": WEIGHT},
              global_params={"lambda": LAMBDA})
def task_arithmetic(base, tensors, model_params, params):
    """theta = theta0 + lambda * sum_i w_i * tau_i."""
    tau = sum(p["weight"] * (t - base) for t, p in zip(tensors, model_params))
    return base + params["lambda"] * tau, None


@merge_method("ties", needs_base=True, model_params={"weight": WEIGHT, "density": DENSITY},
              global_params={"lambda": LAMBDA, "normalize": NORMALIZE}, reports_retention=True)
def ties(base, tensors, model_params, params):
    """TIES (arXiv 2306.01708): trim, elect signs by sum, disjoint mean; as mergekit does."""
    return ties_family(base, tensors, model_params, params, [0.0] * len(tensors))


@merge_method("slack_ties", needs_base=True,
              model_params={"weight": WEIGHT, "density": DENSITY, "slack": SLACK},
              global_params={"lambda": LAMBDA, "normalize": NORMALIZE}, reports_retention=True)
def slack_ties(base, tensors, model_params, params):
    """TIES whose sign election weighs model i's vote by (1 + slack_i); slack 0 is TIES."""
    return ties_family(base, tensors, model_params, params, [p["slack"] for p in model_params])
