"""Merge methods as pure tensor functions, and the registry that declares their parameters.

Spec: shared/reference/slack-ties.md (ties, slack_ties) and methods.md beside this file
(mergekit's other methods, the slack on every election, the seeded draws). A method sees
one tensor name at a time: the base tensor (float32, or None when the recipe has no base)
and one float32 tensor per non-base model, all of the same shape and on the same device;
random methods also get `tensor_name=`. It returns the merged float32 tensor and, for
methods that elect signs, per-model counts for the report.

Adding a method touches this file only: write the function and decorate it with
`@merge_method(...)`, declaring its per-model and global parameters and its contract (base
taken or required, how many models, random or not, title and papers for the card). The
math of the longer methods lives in sparsify.py and geometric.py, imported when they run.

torch is imported inside the functions that compute: validating a recipe needs only the
registry, and a CPU ties merge runs the fused kernels (kernels.py) without torch, whose
import costs seconds.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .trim import trim_count

if TYPE_CHECKING:
    import torch

# torch's sum over stacked models (stacked.sum(0): the disjoint mean, RAM's merged terms,
# multislerp's weighted sums) adds them in order from +0.0 for up to 4 models; for more,
# part of the entries (where depends on the CPU's vector width and the thread split) are
# added in another order, which the fast paths that add in order cover no further.
SUMMED_MODELS_MAX = 4


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


def _number(
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    float32: bool = False,
    nonzero: str | None = None,
):
    """A check for a number in [lo, hi] (lo excluded with lo_open); with float32, one the
    float32 math can hold: not beyond float32's range, and not so small that it would
    become 0 or lose precision (a subnormal); with `nonzero` (the reason), not 0."""

    def check(v: Any) -> str | None:
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or abs(v) > sys.float_info.max
            or not math.isfinite(v)
        ):
            return "must be a finite number"  # (an int beyond every float is caught before isfinite raises)
        if nonzero and v == 0:
            return f"must not be 0 ({nonzero})"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and v > hi:
            return f"must be <= {hi}"
        if float32 and abs(v) > FLOAT32_MAX:
            return f"must be at most {FLOAT32_MAX:.4g} in magnitude (the merge computes in float32)"
        if float32 and v != 0 and abs(v) < FLOAT32_MIN_NORMAL:
            return (
                f"must be {'' if nonzero else '0 or '}at least {FLOAT32_MIN_NORMAL:.4g} in magnitude "
                "(the merge computes in float32)"
            )
        return None

    return check


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _integer(lo: int, hi: int):
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            return f"must be a whole number from {lo} to {hi}"
        return None

    return check


WEIGHT = Param(1.0, _number(float32=True), "scale of this model's task vector (or of its weights, for linear)")
DENSITY = Param(1.0, _number(0.0, 1.0, lo_open=True), "fraction of entries kept by the trim, in (0, 1]")
SLACK = Param(0.0, _number(0.0, SLACK_MAX), "extra vote in the sign election, 0 to 1e200 (0 is plain TIES)")
LAMBDA = Param(1.0, _number(float32=True), "scale of the merged task vector")
NORMALIZE = Param(True, _boolean, "divide by the sum of the agreeing weights")
NORMALIZE_OFF = Param(False, _boolean, "divide by the sum of the (agreeing) weights")
RESCALE = Param(False, _boolean, "scale each sparsified task vector back to its L1 norm")
RESCALE_ON = Param(True, _boolean, "scale each sparsified task vector back to its L1 norm")
INT8_MASK = Param(False, _boolean, "accepted for mergekit recipes; changes nothing here (masks are boolean)")
SEED = Param(0, _integer(0, 2**63 - 1), "seed of the random masks (with the tensor name and entry index)")
GAMMA = Param(0.01, _number(0.0, 1.0), "fraction of the largest magnitudes dropped as outliers, in [0, 1]")
EPSILON = Param(
    0.15,
    _number(0.0, 1.0, lo_open=True),
    "half-width of the keep probabilities around density (density +- epsilon in (0, 1))",
)
SELECT_TOPK = Param(
    1.0,
    _number(0.0, 1.0, lo_open=True),
    "fraction of the entries with the largest variance across models kept, in (0, 1]",
)
T = Param(0.5, _number(0.0, 1.0), "interpolation position: 0 is the base, 1 the other model")
NEAR_T = Param(0.5, _number(0.0, lo_open=True), "distance below which the other model's value is taken, > 0")
SCALE = Param(
    1.0,
    _number(float32=True, nonzero="that gives an all-zero model"),
    "factor applied to the model's weights, nonzero, within float32's range",
)
# Karcher's tol is an angle (radians) and the norm below which an input does not steer the
# mean: much larger, whole tensors stop steering (the mean is then zero) or it stops early
KARCHER_TOL_MAX = 0.01


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
    takes_base: bool = True  # False: a base is an error (passthrough)
    min_models: int = 1  # non-base models
    max_models: int | None = None
    random: bool = False  # its fn takes tensor_name= for reproducible draws
    title: str = ""
    papers: tuple[tuple[str, str], ...] = ()  # (citation, url)
    # cross-parameter check of one recipe's values: an error text or None
    check: Callable[[list[dict[str, Any]], dict[str, Any]], str | None] | None = None
    # the models' roles, in recipe order: an error text or None (layer_swap needs one of each)
    roles: Callable[[list[str]], str | None] | None = None
    # per tensor, before the method runs: (model params, params, roles, layer index or None,
    # number of layers or None) -> (model params, params) for this tensor (layer_swap's shares)
    per_tensor: Callable[..., tuple[list[dict[str, Any]], dict[str, Any]]] | None = None

    def recipe_problem(
        self, models: int, has_base: bool, model_params: list[dict[str, Any]], params: dict[str, Any]
    ) -> str | None:
        """The first thing wrong with a recipe's shape or values for this method, or None."""
        if has_base and not self.takes_base:
            return f"base: method {self.name!r} takes no base model (remove it)"
        if self.max_models == self.min_models and models != self.min_models:
            count = "exactly one model" if self.min_models == 1 else f"exactly {self.min_models} models"
            besides = " besides the base" if self.needs_base else ""
            return f"models: method {self.name!r} takes {count}{besides} (got {models})"
        if models < self.min_models:
            return f"models: method {self.name!r} takes at least {self.min_models} models (got {models})"
        if self.max_models is not None and models > self.max_models:
            return f"models: method {self.name!r} takes at most {self.max_models} models (got {models})"
        return self.check(model_params, params) if self.check else None


METHODS: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    needs_base: bool,
    model_params: dict[str, Param],
    global_params: dict[str, Param] | None = None,
    reports_retention: bool = False,
    **contract: Any,
):
    """Register a pure merge function under `name` with its declared parameters and its
    contract (takes_base, min_models, max_models, random, title, papers, check)."""

    def register(fn: MethodFn) -> MethodFn:
        METHODS[name] = MergeMethod(
            name=name,
            fn=fn,
            needs_base=needs_base,
            model_params=model_params,
            global_params=global_params or {},
            # the card's one-line summary: the docstring's first paragraph, which may wrap
            doc=" ".join(line.strip() for line in (fn.__doc__ or "").strip().split("\n\n")[0].splitlines()),
            reports_retention=reports_retention,
            **contract,
        )
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (allowed: {', '.join(sorted(METHODS))})") from None


# -- building blocks --------------------------------------------------------------------


def trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, floor(d * n)) largest-magnitude entries of `delta`, zero the rest
    (ties at the cut by top_k_mask's rule)."""
    import torch

    from .sparsify import top_k_mask

    n = delta.numel()
    k = trim_count(n, density)
    if k >= n:
        return delta
    flat = delta.reshape(-1)
    # torch's own selection: this is the reference the fused kernels are tested against
    keep = top_k_mask(flat.abs(), k)
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)).reshape(delta.shape)


def elect_signs(weighted: torch.Tensor, slacks: list[float]) -> torch.Tensor:
    """gamma = sign(sum_i (1 + s_i) * delta_i), +1 where that sum is exactly 0.

    `weighted` is stacked (num_models, ...) weighted, trimmed deltas. With every slack 0
    this is TIES's `sum` consensus. The vote is summed in float64 (see SLACK_MAX): in
    float32 a large slack overflows it to Inf, and 0 * Inf is NaN.
    """
    import torch

    total = torch.zeros(weighted.shape[1:], dtype=torch.float64, device=weighted.device)
    for row, s in zip(weighted, slacks, strict=True):
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


Sparsifier = Callable[["torch.Tensor", int, dict[str, Any]], "torch.Tensor"]


def task_arithmetic_family(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    sparsify: Sparsifier,
    elect: bool,
) -> tuple[torch.Tensor, MergeStats | None]:
    """mergekit's generalized task arithmetic: sparsify each task vector (sparsify(delta,
    model index, its params)), rescale it to its L1 norm when `rescale` is on, weight it;
    then either elect signs (votes weighted by 1 + slack) and take the disjoint mean, or
    sum (divided by the sum of the weights with `normalize`); add lambda times that."""
    import torch

    weights = [p["weight"] for p in model_params]
    weighted = []
    for i, (t, p) in enumerate(zip(tensors, model_params, strict=True)):
        delta = t - base
        kept = sparsify(delta, i, p)
        if params.get("rescale"):
            from .sparsify import rescale_l1

            kept = rescale_l1(delta, kept)
        weighted.append(kept * p["weight"])
        del delta, kept
    stacked = torch.stack(weighted)
    del weighted
    if not elect:
        # from +0 in model order, as the kernels add (torch's sum(0) reorders 5+ models)
        merged = sum(stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device))
        total = sum(weights)
        if params["normalize"]:
            merged = merged / (total if abs(total) >= 1e-8 else 1.0)
        return base + params["lambda"] * merged, None
    gamma = elect_signs(stacked, [p.get("slack", 0.0) for p in model_params])
    merged, agree = disjoint_merge(stacked, weights, gamma, params["normalize"])
    return base + params["lambda"] * merged, count_retention(stacked, agree)


def count_retention(sparsified: torch.Tensor, agree: torch.Tensor) -> MergeStats:
    """Per model: nonzero entries after sparsification, and of those, entries that agree."""
    import torch

    dims = tuple(range(1, sparsified.dim()))
    if not dims:
        return MergeStats(kept=(sparsified != 0).long(), agreed=agree.long())
    return MergeStats(
        kept=(sparsified != 0).sum(dim=dims, dtype=torch.int64), agreed=agree.sum(dim=dims, dtype=torch.int64)
    )


def ties_family(base, tensors, model_params, params, slacks):
    """TIES with the given slacks (kept for callers of the first version: kernels' tests)."""
    mp = [{**p, "slack": s} for p, s in zip(model_params, slacks, strict=True)]
    return task_arithmetic_family(base, tensors, mp, {**params, "rescale": False}, _magnitude_trim, True)


def _magnitude_trim(delta, index, p):
    return trim_to_density(delta, p["density"])


def _random_trim(seed: int, tensor_name: str) -> Sparsifier:
    from .draws import stream_key
    from .sparsify import random_keep

    return lambda delta, i, p: random_keep(delta, p["density"], stream_key(seed, tensor_name, i))


def _magprune(seed: int, tensor_name: str) -> Sparsifier:
    from .draws import stream_key
    from .sparsify import magprune

    return lambda delta, i, p: magprune(delta, p["density"], p["epsilon"], stream_key(seed, tensor_name, i))


def _outlier_trim(delta, index, p):
    from .sparsify import outlier_cut

    return outlier_cut(delta, p["density"], p["gamma"])


def _della_bounds(model_params: list[dict[str, Any]], params: dict[str, Any]) -> str | None:
    """DELLA's keep probabilities density +- epsilon must lie in (0, 1) (when density < 1)."""
    for i, p in enumerate(model_params):
        d, e = p["density"], p["epsilon"]
        if d < 1 and not (0 < d - e and d + e < 1):
            return (
                f"models[{i}].epsilon: density - epsilon and density + epsilon must lie in (0, 1) "
                f"(density {d}, epsilon {e})"
            )
    return None


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
            return (
                f"parameters.normalize: the weights sum to {math.fsum(weights):g}, too close to 0 to divide by; {fix}"
            )
    elif method in ("ties", "slack_ties") and min(weights) < 0 < max(weights):
        from itertools import combinations

        if len(weights) > 16:
            return f"parameters.normalize: with over 16 models, weights must not mix signs; {fix}"
        for r in range(2, len(weights) + 1):
            for subset in combinations(weights, r):
                if _normalize_gain(subset) > MAX_NORMALIZE_GAIN:
                    return (
                        f"parameters.normalize: the weights {', '.join(f'{w:g}' for w in subset)} sum to "
                        f"{math.fsum(subset):g}, too close to 0 to divide by where they agree; {fix}"
                    )
    return None


# -- methods ----------------------------------------------------------------------------

PAPERS = {
    "linear": ("Wortsman et al. 2022, Model soups", "https://arxiv.org/abs/2203.05482"),
    "task_arithmetic": ("Ilharco et al. 2023, Editing Models with Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": (
        "Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models",
        "https://arxiv.org/abs/2306.01708",
    ),
    "lowres": (
        "Tao et al. 2024, Unlocking the Potential of Model Merging for Low-Resource Languages",
        "https://arxiv.org/abs/2407.03994",
    ),
    "dare": (
        ("Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch"),
        "https://arxiv.org/abs/2311.03099",
    ),
    "della": (
        ("Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling"),
        "https://arxiv.org/abs/2406.11617",
    ),
    "breadcrumbs": (
        ("Davari and Belilovsky 2024, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks"),
        "https://arxiv.org/abs/2312.06795",
    ),
    "sce": (
        "Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models (SCE merging)",
        "https://arxiv.org/abs/2408.07990",
    ),
    "slerp": (
        "Shoemake 1985, Animating rotation with quaternion curves (SLERP)",
        "https://en.wikipedia.org/wiki/Slerp",
    ),
    "multislerp": ("Goddard 2025, Multi-SLERP", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    "karcher": ("Karcher mean merging (mergekit's reference)", "https://arxiv.org/abs/2603.04972"),
    "model_stock": (
        "Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models",
        "https://arxiv.org/abs/2403.19522",
    ),
    "nearswap": (
        "alchemonaut 2024, NearSwap (QuartetAnemoi-70B)",
        "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    ),
    "mergekit": (
        "Goddard et al. 2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models",
        "https://arxiv.org/abs/2403.13257",
    ),
}


def _papers(*keys: str) -> tuple[tuple[str, str], ...]:
    return tuple(PAPERS[k] for k in keys)


TA_GLOBALS = {"lambda": LAMBDA, "int8_mask": INT8_MASK}


@merge_method(
    "linear",
    needs_base=False,
    model_params={"weight": WEIGHT},
    global_params={"normalize": NORMALIZE},
    title="Linear (weighted average)",
    papers=_papers("linear"),
)
def linear(base, tensors, model_params, params):
    """Weighted average of the models' full weights (the base is not averaged in).

    Computed as mergekit 0.1.5 computes it: from zeros, `out.addcmul_(t_i, w_i)` per model in
    order (a fused multiply-add on CPUs with FMA: one rounding per model), then divided by the
    float32 sum of the float32 weights."""
    import torch

    weights = [p["weight"] for p in model_params]
    first = tensors[0]
    out = torch.zeros_like(first)
    for w, t in zip(weights, tensors, strict=True):
        out.addcmul_(t, torch.tensor(w, dtype=first.dtype, device=first.device))
    if params["normalize"]:  # recipes whose weights cancel are refused (normalize_problem)
        out = out / torch.tensor(weights, dtype=first.dtype, device=first.device).sum()
    return out, None


@merge_method(
    "task_arithmetic",
    needs_base=True,
    model_params={"weight": WEIGHT},
    global_params={"lambda": LAMBDA},
    title="Task Arithmetic",
    papers=_papers("task_arithmetic"),
)
def task_arithmetic(base, tensors, model_params, params):
    """theta = theta0 + lambda * sum_i w_i * tau_i."""
    tau = sum(p["weight"] * (t - base) for t, p in zip(tensors, model_params, strict=True))
    return base + params["lambda"] * tau, None


TIES_MODEL = {"weight": WEIGHT, "density": DENSITY, "slack": SLACK}


@merge_method(
    "ties",
    needs_base=True,
    model_params=TIES_MODEL,
    global_params={**TA_GLOBALS, "normalize": NORMALIZE, "rescale": RESCALE},
    reports_retention=True,
    title="TIES",
    papers=_papers("ties"),
)
def ties(base, tensors, model_params, params):
    """TIES: trim each task vector to its largest magnitudes, elect signs by the (slack-weighted)
    sum, average the agreeing entries."""
    return task_arithmetic_family(base, tensors, model_params, params, _magnitude_trim, True)


@merge_method(
    "slack_ties",
    needs_base=True,
    model_params=TIES_MODEL,
    global_params={"lambda": LAMBDA, "normalize": NORMALIZE},
    reports_retention=True,
    title="slack-TIES",
    papers=_papers("ties", "lowres"),
)
def slack_ties(base, tensors, model_params, params):
    """TIES whose sign election weighs model i's vote by (1 + slack_i); slack 0 is TIES."""
    return task_arithmetic_family(base, tensors, model_params, params, _magnitude_trim, True)


DARE_MODEL = {"weight": WEIGHT, "density": DENSITY}
RANDOM_GLOBALS = {**TA_GLOBALS, "rescale": RESCALE_ON, "seed": SEED}


@merge_method(
    "dare_linear",
    needs_base=True,
    model_params=DARE_MODEL,
    global_params={**RANDOM_GLOBALS, "normalize": NORMALIZE_OFF},
    random=True,
    title="DARE (linear)",
    papers=_papers("dare"),
)
def dare_linear(base, tensors, model_params, params, *, tensor_name):
    """DARE: keep each task-vector entry with probability density (seeded draws), rescale, add the weighted sum."""
    return task_arithmetic_family(base, tensors, model_params, params, _random_trim(params["seed"], tensor_name), False)


@merge_method(
    "dare_ties",
    needs_base=True,
    model_params={**DARE_MODEL, "slack": SLACK},
    global_params={**RANDOM_GLOBALS, "normalize": NORMALIZE_OFF},
    random=True,
    reports_retention=True,
    title="DARE-TIES",
    papers=_papers("dare", "ties"),
)
def dare_ties(base, tensors, model_params, params, *, tensor_name):
    """DARE's random drop and rescale, then TIES's (slack-weighted) sign election and disjoint merge."""
    return task_arithmetic_family(base, tensors, model_params, params, _random_trim(params["seed"], tensor_name), True)


DELLA_MODEL = {"weight": WEIGHT, "density": DENSITY, "epsilon": EPSILON}


@merge_method(
    "della",
    needs_base=True,
    model_params={**DELLA_MODEL, "slack": SLACK},
    global_params={**RANDOM_GLOBALS, "normalize": NORMALIZE},
    random=True,
    reports_retention=True,
    check=_della_bounds,
    title="DELLA",
    papers=_papers("della"),
)
def della(base, tensors, model_params, params, *, tensor_name):
    """DELLA: drop entries with probabilities by magnitude rank (MagPrune), rescale, elect signs
    (slack-weighted), disjoint merge."""
    return task_arithmetic_family(base, tensors, model_params, params, _magprune(params["seed"], tensor_name), True)


@merge_method(
    "della_linear",
    needs_base=True,
    model_params=DELLA_MODEL,
    global_params={**RANDOM_GLOBALS, "normalize": NORMALIZE_OFF},
    random=True,
    check=_della_bounds,
    title="DELLA (linear)",
    papers=_papers("della"),
)
def della_linear(base, tensors, model_params, params, *, tensor_name):
    """DELLA's MagPrune and rescale, then the weighted sum of the task vectors (no election)."""
    return task_arithmetic_family(base, tensors, model_params, params, _magprune(params["seed"], tensor_name), False)


BREADCRUMBS_MODEL = {"weight": WEIGHT, "density": DENSITY, "gamma": GAMMA}
BREADCRUMBS_GLOBALS = {**TA_GLOBALS, "normalize": NORMALIZE_OFF, "rescale": RESCALE}


@merge_method(
    "breadcrumbs",
    needs_base=True,
    model_params=BREADCRUMBS_MODEL,
    global_params=BREADCRUMBS_GLOBALS,
    title="Model Breadcrumbs",
    papers=_papers("breadcrumbs"),
)
def breadcrumbs(base, tensors, model_params, params):
    """Model Breadcrumbs: drop each task vector's largest (gamma) and smallest magnitudes, keep
    density, add the weighted sum."""
    return task_arithmetic_family(base, tensors, model_params, params, _outlier_trim, False)


@merge_method(
    "breadcrumbs_ties",
    needs_base=True,
    model_params={**BREADCRUMBS_MODEL, "slack": SLACK},
    global_params=BREADCRUMBS_GLOBALS,
    reports_retention=True,
    title="Model Breadcrumbs with TIES",
    papers=_papers("breadcrumbs", "ties"),
)
def breadcrumbs_ties(base, tensors, model_params, params):
    """Breadcrumbs' two magnitude cuts, then TIES's (slack-weighted) sign election and disjoint merge."""
    return task_arithmetic_family(base, tensors, model_params, params, _outlier_trim, True)


def sce_shares(squares: torch.Tensor) -> torch.Tensor:
    """SCE's weight of each model: its task vector's mean square (row i of the (models,
    entries) float32 `squares`, by torch's mean) over the sum of those, equal shares when that
    sum is about 0."""
    return energy_shares(squares.mean(dim=1))


def energy_shares(energy: torch.Tensor) -> torch.Tensor:
    """sce_shares from the models' mean squares (float32, one per model)."""
    import torch

    total = float(energy.sum())
    return torch.full_like(energy, 1.0 / energy.shape[0]) if abs(total) < 1e-6 else energy / total


def two_rows(row: torch.Tensor) -> torch.Tensor:
    """A flat float32 tensor viewed as two equal rows (no copy). With two outputs or more,
    torch's CPU reductions over the last dim (sum, mean, vector_norm) split over the outputs,
    each row reduced whole by one thread, so reducing this view gives in either row the bits
    of that row's reduction in a whole (rows, entries) array of two rows or more; a single
    row would be split across threads."""
    return row.view(1, -1).expand(2, -1)


def row_mean(row: torch.Tensor) -> torch.Tensor:
    """torch's mean of one row of a float32 (rows, entries) array of two rows or more, from
    that row alone (0-d): see two_rows."""
    return two_rows(row).mean(dim=1)[0]


@merge_method(
    "sce",
    needs_base=True,
    model_params={"slack": SLACK},
    global_params={"select_topk": SELECT_TOPK, "int8_mask": INT8_MASK},
    reports_retention=True,
    title="SCE",
    papers=_papers("sce"),
)
def sce(base, tensors, model_params, params):
    """SCE: select the entries that vary most across models, elect signs (slack-weighted), merge
    weighted by each task vector's mean square."""
    import torch

    from .sparsify import variance_top

    tv = torch.stack([t - base for t in tensors])
    if params["select_topk"] < 1:
        tv = tv * variance_top(tv, params["select_topk"])
    gamma = elect_signs(tv, [p["slack"] for p in model_params])
    agree = torch.sign(tv) == gamma
    share = sce_shares(tv.square().reshape(tv.shape[0], -1))
    erased = share.view(-1, *([1] * (tv.dim() - 1))) * agree
    merged = (tv * erased).sum(0) / erased.sum(0).clamp(min=1e-6)
    return base + merged, count_retention(tv, agree)


@merge_method(
    "slerp",
    needs_base=True,
    model_params={},
    global_params={"t": T},
    min_models=1,
    max_models=1,
    title="SLERP",
    papers=_papers("slerp"),
)
def slerp(base, tensors, model_params, params):
    """SLERP: spherical interpolation between the base (t = 0) and the one other model (t = 1)."""
    from .geometric import slerp as spherical

    return spherical(params["t"], base, tensors[0]), None


@merge_method(
    "nuslerp",
    needs_base=False,
    model_params={"weight": WEIGHT},
    global_params={
        "nuslerp_flatten": Param(True, _boolean, "one vector per tensor (else per row)"),
        "nuslerp_row_wise": Param(False, _boolean, "with flatten off: vectors along dim 0"),
    },
    min_models=2,
    max_models=2,
    title="NuSLERP",
    papers=_papers("slerp", "mergekit"),
)
def nuslerp(base, tensors, model_params, params):
    """NuSLERP: SLERP between two models at t = w_2 / (w_1 + w_2), of their task vectors when a base is given."""
    from .geometric import interpolation_fraction
    from .geometric import nuslerp as spherical

    t = interpolation_fraction([p["weight"] for p in model_params])
    shape = {"row_wise": params["nuslerp_row_wise"], "flatten": params["nuslerp_flatten"]}
    if base is None:
        return spherical(t, tensors[0], tensors[1], **shape), None
    return base + spherical(t, tensors[0] - base, tensors[1] - base, **shape), None


@merge_method(
    "multislerp",
    needs_base=False,
    model_params={"weight": WEIGHT},
    global_params={
        "normalize_weights": Param(True, _boolean, "divide the weights by their sum"),
        "eps": Param(1e-8, _number(0.0, lo_open=True), "guard against zero norms, > 0"),
    },
    title="Multi-SLERP",
    papers=_papers("multislerp"),
)
def multislerp(base, tensors, model_params, params):
    """Multi-SLERP: weighted barycentric interpolation of any number of models on the hypersphere
    (of task vectors with a base)."""
    from .geometric import multislerp as barycentric

    weights = [p["weight"] for p in model_params]
    if base is None or len(tensors) == 1:
        return barycentric(tensors, weights, params["normalize_weights"], params["eps"]), None
    deltas = [t - base for t in tensors]
    if not any(bool(d.any()) for d in deltas):  # no model changed it (a frozen layer): the base
        return base, None
    merged = barycentric(deltas, weights, params["normalize_weights"], params["eps"])
    return base + merged, None


@merge_method(
    "karcher",
    needs_base=False,
    model_params={},
    global_params={
        "max_iter": Param(10, _integer(1, 10_000), "iterations at most, >= 1"),
        "tol": Param(
            1e-5, _number(0.0, KARCHER_TOL_MAX, lo_open=True), f"convergence tolerance, in (0, {KARCHER_TOL_MAX:g}]"
        ),
    },
    title="Karcher mean",
    papers=_papers("karcher"),
)
def karcher(base, tensors, model_params, params):
    """Karcher mean: the equally weighted Riemannian mean on the hypersphere of every input, the
    base included when given."""
    from .geometric import karcher_mean

    inputs = ([base] if base is not None else []) + list(tensors)
    return karcher_mean(inputs, params["max_iter"], params["tol"]), None


@merge_method(
    "model_stock",
    needs_base=True,
    model_params={},
    global_params={"filter_wise": Param(False, _boolean, "one interpolation ratio per row")},
    min_models=2,
    title="Model Stock",
    papers=_papers("model_stock"),
)
def model_stock(base, tensors, model_params, params):
    """Model Stock: move from the base toward the models' average by a ratio from the angle between
    their task vectors."""
    from .geometric import model_stock as stock

    return stock(base, tensors, params["filter_wise"]), None


@merge_method(
    "nearswap",
    needs_base=True,
    model_params={},
    global_params={"t": NEAR_T},
    min_models=1,
    max_models=1,
    title="NearSwap",
    papers=_papers("nearswap"),
)
def nearswap(base, tensors, model_params, params):
    """NearSwap: take the other model's value where it is within t of the base, blend toward the
    base where it is farther."""
    from .geometric import nearswap as swap

    return swap(params["t"], base, tensors[0]), None


@merge_method(
    "passthrough",
    needs_base=False,
    takes_base=False,
    model_params={"scale": SCALE},
    global_params={},
    min_models=1,
    max_models=1,
    title="Passthrough",
    papers=_papers("mergekit"),
)
def passthrough(base, tensors, model_params, params):
    """Passthrough: the one model's weights, times its scale."""
    scale = model_params[0]["scale"]
    return (tensors[0] if scale == 1.0 else tensors[0] * scale), None


# -- mergekit's last three methods, and layer swapping ------------------------------------

PAPERS.update(
    {
        "arcee_fusion": ("Arcee AI 2025, Arcee Fusion (mergekit's reference)", "https://arcee.ai"),
        "ram": ("Reinforced Agent Merging (RAM, RAM+)", "https://arxiv.org/abs/2601.13572"),
        "layer_swap": (
            ("Bandarkar et al. 2025, Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large Language Models"),
            "https://arxiv.org/abs/2410.01335",
        ),
    }
)

# arcee_fusion's outlier fence: median + 1.5 * interquartile range of the importance scores
FUSION_QUANTILES = (0.25, 0.5, 0.75)


def fusion_positions(n: int) -> list[int]:
    """The 0-based sorted positions of arcee_fusion's order statistics among n importance
    scores: floor(q * (n - 1)) in float32 (mergekit's sorted index), found by selection;
    mergekit samples 1M entries with replacement above 1M."""
    import torch

    return (torch.tensor(FUSION_QUANTILES, dtype=torch.float32) * (n - 1)).long().tolist()


def softmax_divergence(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """arcee_fusion's KL divergence of each row's softmax (the last dim; a 1-D tensor is one
    row) from the base's, keeping the reduced dim. Each row's value depends on that row alone
    (the fast paths compute it on blocks of rows, with these same operations)."""
    import torch

    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


@merge_method(
    "arcee_fusion",
    needs_base=True,
    model_params={},
    global_params={},
    min_models=1,
    max_models=1,
    title="Arcee Fusion",
    papers=_papers("arcee_fusion"),
)
def arcee_fusion(base, tensors, model_params, params):
    """Arcee Fusion: take the other model's change only where its importance (magnitude of the
    change times the rows' softmax KL divergence) is an outlier."""
    import torch

    model = tensors[0]
    delta = model - base
    importance = delta.abs() * softmax_divergence(model, base)
    flat = importance.reshape(-1)
    q1, median, q3 = (torch.kthvalue(flat.cpu(), k + 1).values.to(flat.device) for k in fusion_positions(flat.numel()))
    fence = median + 1.5 * (q3 - q1)
    return base + delta * (importance >= fence).float(), None


RAM_EPSILON = Param(1e-5, _number(0.0), "a task-vector entry counts as changed when |entry| > epsilon, >= 0")


def _ram_terms(base, tensors, epsilon):
    """Flat task vectors with entries of at most epsilon zeroed, and per entry the masks of
    the entries changed by exactly one model (unique) and by several (overlap), and how many."""
    import torch

    tv = torch.stack([t - base for t in tensors]).reshape(len(tensors), -1)
    changed = tv.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return tv * changed, changed, counts, counts > 1, counts == 1


@merge_method(
    "ram",
    needs_base=True,
    model_params={},
    global_params={"epsilon": RAM_EPSILON},
    title="Reinforced Agent Merging (RAM)",
    papers=_papers("ram"),
)
def ram(base, tensors, model_params, params):
    """RAM: an entry changed by one model takes that change; one changed by several takes their mean."""
    tvz, _, counts, overlap, unique = _ram_terms(base, tensors, params["epsilon"])
    merged = (tvz * unique + tvz * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape(base.shape), None


def ramplus_gains(shared_n, unique_n, params):
    """Each model's gain on its unique entries (float32, as torch computes it from the int64
    counts of its changed entries that another model changed too, and that none did): 1 +
    r * rho, rho = shared / unique entries capped at alpha. The fast paths call it too."""
    rho = shared_n / unique_n.clamp(min=params["epsilon"])
    return 1 + params["r"] * rho.clamp(min=0, max=params["alpha"])


@merge_method(
    "ramplus_tl",
    needs_base=True,
    model_params={},
    global_params={
        "r": Param(0.1, _number(0.0), "gain on a model's unique entries per unit of rho, >= 0"),
        "alpha": Param(0.2, _number(0.0), "cap on rho = shared / unique entries, >= 0"),
        "epsilon": RAM_EPSILON,
    },
    title="Reinforced Agent Merging Plus (tensor-local)",
    papers=_papers("ram"),
)
def ramplus_tl(base, tensors, model_params, params):
    """RAM+ (tensor-local): RAM, with each model's unique entries scaled up by r times its ratio of
    shared to unique entries, capped at alpha."""
    tvz, changed, counts, overlap, unique = _ram_terms(base, tensors, params["epsilon"])
    gain = ramplus_gains((changed & overlap).sum(dim=1), (changed & unique).sum(dim=1), params)
    merged = (tvz * unique * gain.unsqueeze(-1) + tvz * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape(base.shape), None


def layer_swap_share(layer: int | None, num_layers: int | None, params: dict[str, Any]) -> float:
    """The language expert's share of one tensor in layer swapping: 1 in the bottom `bottom`
    and top `top` layers and outside the layers (embeddings, final norm, output head), 0 in
    the middle, and, `blend` layers deep into the middle from each seam, j / (blend + 1) for
    the layer j + 1 layers from it (the larger of the two seams' shares where they meet)."""
    if layer is None or num_layers is None:
        return 1.0
    bottom, top, blend = params["bottom"], params["top"], params["blend"]
    if bottom + top > num_layers:
        raise ValueError(f"layer_swap: bottom ({bottom}) + top ({top}) exceeds the model's {num_layers} layers")
    if layer < bottom or layer >= num_layers - top:
        return 1.0
    depth = min(layer - bottom + 1 if bottom else math.inf, num_layers - top - layer if top else math.inf)
    return max(0.0, (blend + 1 - depth) / (blend + 1)) if blend else 0.0


def _layer_swap_shares(model_params, params, roles, layer, num_layers):
    """Each model's share of this tensor: the language expert's from layer_swap_share, the
    task expert's the rest."""
    a = layer_swap_share(layer, num_layers, params)
    return [
        {**p, "share": a if role == "language" else 1.0 - a} for p, role in zip(model_params, roles, strict=True)
    ], params


def _layer_swap_roles(roles: list[str]) -> str | None:
    if sorted(roles) != ["language", "task"]:
        return (
            "models: method 'layer_swap' takes one model with role: language and one with role: task "
            f"(got {', '.join(roles)})"
        )
    return None


@merge_method(
    "layer_swap",
    needs_base=False,
    takes_base=False,
    model_params={},
    global_params={
        "bottom": Param(1, _integer(0, 100_000), "bottom layers taken from the language expert"),
        "top": Param(1, _integer(0, 100_000), "top layers taken from the language expert"),
        "blend": Param(0, _integer(0, 100_000), "layers at each seam blended linearly between the experts"),
    },
    min_models=2,
    max_models=2,
    roles=_layer_swap_roles,
    per_tensor=_layer_swap_shares,
    title="Layer swapping",
    papers=_papers("layer_swap"),
)
def layer_swap(base, tensors, model_params, params):
    """Layer swapping: the language expert's bottom and top layers (and embeddings, head) around the
    task expert's middle, blended at the seams."""
    share = [p["share"] for p in model_params]  # per tensor (per_tensor: _layer_swap_shares)
    if 1.0 in share:  # a swapped layer is the expert's own bits
        return tensors[share.index(1.0)], None
    return share[0] * tensors[0] + share[1] * tensors[1], None
