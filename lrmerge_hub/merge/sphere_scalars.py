"""The reduction pass of the spherical methods' fast paths (kernels.py, torch_engine.py):
the few scalars of slerp, nuslerp, multislerp, model_stock and karcher, computed exactly as
geometric.py computes them.

Their norms and dot products are torch's own float32 CPU reductions, whose summation order
(vector width, thread split) no chunked kernel reproduces, so they run here with the
reference's torch calls, on tensors of the reference's shapes holding the reference's
values, written by the fills of sphere_fills.py (each input or task vector, each product the
reference sums, each running mean) into float32 arrays of the tensor's size that are
reused, reduction after reduction: slerp, nuslerp, model_stock and multislerp keep one,
karcher two, where the reference keeps several times that. Entries are recomputed from the
raw inputs where the reference would read a stored copy, and the rows of a (models, n) array
are reduced one at a time (methods.two_rows). With more than methods.SUMMED_MODELS_MAX models, multislerp's sums over
the models (torch's stacked sums) run the reference's own operations, in place on a float32
stack (an in-place op writes the bits of its out-of-place twin). The combine pass then
computes every entry from the raw inputs and these scalars in the reference's order.

Inputs are raw flat arrays or tensors as the engines hold them: bfloat16 as its 16 bits
(uint16 arrays, int16 tensors), or another float dtype (widened to float32 here unless all
of a call's inputs are bfloat16).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .geometric import NORM_EPS, SLERP_LINEAR_DOT

if TYPE_CHECKING:
    import torch


def raw_arrays(xs: list[Any]) -> list[Any]:
    """Raw flat inputs as the kernels read them, None kept: numpy arrays, all bfloat16 bits
    (uint16) or else all float32."""
    from .kernel_base import as_float32

    arrays = [x if x is None or isinstance(x, np.ndarray) else x.cpu().numpy() for x in xs]
    arrays = [a.view(np.uint16) if a is not None and a.dtype == np.int16 else a for a in arrays]
    if all(a is None or a.dtype == np.uint16 for a in arrays):
        return arrays
    return [a if a is None or a.dtype == np.float32 else as_float32(a, a.dtype == np.uint16) for a in arrays]


class Scratch:
    """One float32 array of a tensor's size (sphere_fills.scratch: reused tensor after tensor)
    that sphere_fills writes and torch reduces, as a tensor sharing its memory."""

    def __init__(self, n: int, slot: str = "reduce"):
        import torch

        from .sphere_fills import scratch

        self.array = scratch(slot, n)
        self.tensor = torch.from_numpy(self.array)

    def signal(self, x: np.ndarray, base: np.ndarray | None = None) -> torch.Tensor:
        """float32(x) [- float32(base)]."""
        from .sphere_fills import fill_signal

        fill_signal(x, base, self.array)
        return self.tensor

    def product(self, x0, x1, base, norms=None, stride: int = 1, count: int = 1) -> torch.Tensor:
        """(v0 [/ n0]) * (v1 [/ n1]), v = x [- base], norms (n0, n1) per vector as
        sphere_fills.fill_product takes them."""
        from .sphere_fills import fill_product

        fill_product(x0, x1, base, norms, stride, count, self.array)
        return self.tensor


def scalar(v: float) -> torch.Tensor:
    """A Python float as torch takes it beside a float32 tensor: rounded to float32."""
    import torch

    return torch.tensor(v, dtype=torch.float32)


def _f32(t: torch.Tensor) -> np.float32:
    return np.float32(t.item())


def slerp_coefficients(t: float, v0: Any, v1: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1), 0-d float32, with geometric.slerp(t, v0, v1) = c0 * v0 + c1 * v1 entry by
    entry: (1 - t, t) where the two are collinear, else sin((1 - t) theta) / sin(theta) and
    sin(t theta) / sin(theta)."""
    import torch

    v0, v1 = raw_arrays([v0, v1])
    tt = scalar(t)
    scratch = Scratch(v0.shape[0])
    na = torch.linalg.vector_norm(scratch.signal(v0))
    na = torch.where(na > NORM_EPS, na, 1.0)
    nb = torch.linalg.vector_norm(scratch.signal(v1))
    nb = torch.where(nb > NORM_EPS, nb, 1.0)
    dot = scratch.product(v0, v1, None, (na.reshape(1).numpy(), nb.reshape(1).numpy())).sum().clamp(-1, 1)
    if dot.abs() > SLERP_LINEAR_DOT:
        return 1 - tt, tt
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta


class PerVector:
    """Coefficients of one vector per row (or column): the entry at flat index j (in the
    tensor's own layout) belongs to vector (j // stride) % count, and its value is
    (c0[v] * v0 + c1[v] * v1) / d[v] (d = 1 where that is exact: the linear ones)."""

    def __init__(self, c0: torch.Tensor, c1: torch.Tensor, d: torch.Tensor, stride: int, count: int):
        self.c0, self.c1, self.d, self.stride, self.count = c0, c1, d, stride, count


def nuslerp_coefficients(t: float, x0: Any, x1: Any, base: Any, shape: tuple[int, ...], row_wise: bool) -> PerVector:
    """geometric.nuslerp of x0 and x1 (minus the base when given) viewed in this shape (of
    one or more dims; flatten is the shape (n,)): vectors along the last dim, or (row_wise)
    along dim 0, with the reference's reductions on tensors of its shapes."""
    import torch

    x0, x1, base = raw_arrays([x0, x1, base])
    n = math.prod(shape)
    scratch = Scratch(n)

    def vectors(flat: torch.Tensor) -> torch.Tensor:  # the reference's view: vectors along the last dim
        v = flat.view(shape)
        return v.transpose(0, -1) if row_wise else v

    norms = [
        torch.linalg.vector_norm(vectors(scratch.signal(x, base)), dim=-1, keepdim=True).clamp(min=1e-7)
        for x in (x0, x1)
    ]
    # entry j's vector: j % (n / shape[0]) along dim 0 (row_wise), else j // shape[-1]
    stride, count = (1, n // shape[0]) if row_wise else (shape[-1], n // shape[-1])
    per_entry = [(m.transpose(0, -1) if row_wise else m).reshape(-1).numpy() for m in norms]
    cos = vectors(scratch.product(x0, x1, base, per_entry, stride, count)).sum(-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= NORM_EPS**2
    theta = torch.acos(torch.where(collinear, 0.0, cos))
    c0 = torch.where(collinear, scalar(1 - t), torch.sin((1 - t) * theta))
    c1 = torch.where(collinear, scalar(t), torch.sin(t * theta))
    d = torch.where(collinear, 1.0, torch.sin(theta))
    if row_wise:  # vectors along dim 0: entry j is in vector j % (entries per index of dim 0)
        c0, c1, d = (c.transpose(0, -1).reshape(-1) for c in (c0, c1, d))
        return PerVector(c0, c1, d, 1, c0.numel())
    return PerVector(c0.reshape(-1), c1.reshape(-1), d.reshape(-1), shape[-1], c0.numel())


def model_stock_ratio(base: Any, tensors: list, rows: tuple[int, ...]) -> PerVector:
    """geometric.model_stock's t per row (along the last dim) of the tensors viewed in the
    shape `rows` as it views them ((n,) without filter_wise): c0 = t, c1 = 1 - t."""
    import torch

    base, *xs = raw_arrays([base, *tensors])
    scratch = Scratch(math.prod(rows))
    norms = [torch.linalg.vector_norm(scratch.signal(x, base).view(rows), dim=-1) for x in xs]
    cosines = []
    for i, a in enumerate(xs):
        for j in range(i + 1, len(xs)):
            dot = scratch.product(a, xs[j], base).view(rows).sum(-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    count = len(xs)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))
    return PerVector(t.reshape(-1), (1 - t).reshape(-1), torch.ones(t.numel()), rows[-1], t.numel())


class MultislerpTerms:
    """The flattened geometric.multislerp of the deltas, as mean * cs + step * k, all times
    scale (cs, k, scale 0-d). mean and step are float32 CPU tensors of the tensor's size, or
    None where the kernels recompute them entry by entry from the raw inputs (xs, base) and
    the unit terms: per model the norm + eps (denom) and the dot product with the unit mean
    (dots), the weights (w), and the mean's norm (mean_norm)."""

    def __init__(self, mean, step, cs, k, scale, xs=None, base=None, denom=None, dots=None, w=None, mean_norm=None):
        self.mean, self.step, self.cs, self.k, self.scale = mean, step, cs, k, scale
        self.xs, self.base, self.denom, self.dots, self.w, self.mean_norm = xs, base, denom, dots, w, mean_norm

    def arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mean and step as float32 CPU tensors of the tensor's size (written if not held)."""
        import torch

        from .sphere_fills import multislerp_mean, multislerp_step

        if self.mean is not None:
            return self.mean, self.step
        n = self.xs[0].shape[0]
        mean = torch.from_numpy(multislerp_mean(self.xs, self.base, self.denom, self.w, np.empty(n, np.float32)))
        mean.div_(torch.tensor(self.mean_norm))  # the reference's in-place division by the 0-d norm
        step = multislerp_step(
            self.xs, self.base, self.denom, self.dots, self.w, self.mean_norm, np.empty(n, np.float32)
        )
        return mean, torch.from_numpy(step)


def _stack(xs, base) -> np.ndarray:
    """The float32 (models, n) stack of the deltas x_i [- base] (sphere_fills.fill_signal)."""
    from .sphere_fills import fill_signal, scratch

    stack = scratch("stack", len(xs) * xs[0].shape[0]).reshape(len(xs), xs[0].shape[0])
    for i, x in enumerate(xs):
        fill_signal(x, base, stack[i])
    return stack


def multislerp_terms(
    tensors: list, base: Any, weights: list[float], normalize: bool, eps: float
) -> MultislerpTerms | None:
    """geometric.multislerp's terms of two or more inputs (their deltas with a base): its
    reductions by torch on the fills of sphere_fills (_multislerp_by_rows), or with more than
    methods.SUMMED_MODELS_MAX models (whose stacked sums are not in model order) the
    reference's own torch operations, in place on the stacked deltas; None where
    the reference takes another branch (the weighted directions cancel out, or with a base
    no model changed the tensor): the caller runs the reference there."""
    import torch

    from .methods import SUMMED_MODELS_MAX

    base, *listed = raw_arrays([base, *tensors])
    xs = tuple(listed)
    w = torch.tensor(weights, dtype=torch.float32)
    if normalize:
        w = w / w.sum()
    if len(xs) <= SUMMED_MODELS_MAX:
        return _multislerp_by_rows(xs, base, w, eps)
    stacked = torch.from_numpy(_stack(xs, base))
    if base is not None and not bool(stacked.any()):
        return None
    norms = torch.linalg.vector_norm(stacked, dim=-1, keepdim=True)
    column = w.view(-1, 1)
    units = stacked.div_(norms + eps)
    work = torch.mul(units, column)
    mean = work.sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        return None
    mean.div_(mean_norm)
    dots = torch.mul(units, mean, out=work).sum(-1, keepdim=True)
    tangents = units.sub_(torch.mul(dots, mean, out=work))
    step = torch.mul(tangents, column, out=work).sum(0)
    return _multislerp_end(mean, step, norms, w, eps)


def _multislerp_by_rows(xs: tuple, base: Any, w: torch.Tensor, eps: float) -> MultislerpTerms | None:
    """multislerp_terms of up to methods.SUMMED_MODELS_MAX models, with one scratch array:
    each array the reference reduces (a delta, the weighted mean of the unit vectors, a
    model's products with the unit mean, the step) is filled there in turn, the unit mean
    recomputed entry by entry rather than stored; the norms and dot products of the
    reference's (models, n) arrays are reduced row by row (methods.two_rows gives each row
    its bits)."""
    import torch

    from .methods import two_rows
    from .sphere_fills import multislerp_mean, multislerp_product, multislerp_step

    row = Scratch(xs[0].shape[0])
    norm_rows, changed = [], base is None
    for x in xs:
        delta = row.signal(x, base)
        changed = changed or bool(delta.any())
        norm_rows.append(torch.linalg.vector_norm(two_rows(delta), dim=-1)[0])
    if not changed:  # a base no model changed: the reference returns it
        return None
    norms = torch.stack(norm_rows).view(-1, 1)
    denom, weights = (norms + eps).reshape(-1).numpy(), w.numpy()
    multislerp_mean(xs, base, denom, weights, row.array)
    mean_norm = torch.linalg.vector_norm(row.tensor)
    if mean_norm < eps:
        return None
    unit_norm = _f32(mean_norm)
    dot_rows = []
    for i in range(len(xs)):
        multislerp_product(xs, i, base, denom, weights, unit_norm, row.array)
        dot_rows.append(two_rows(row.tensor).sum(-1)[0])
    dots = torch.stack(dot_rows).numpy()
    step_norm = (
        torch.linalg.vector_norm(
            torch.from_numpy(multislerp_step(xs, base, denom, dots, weights, unit_norm, row.array))
        )
        + eps
    )
    scale = (norms.squeeze(-1) * w).sum()
    cs, k = torch.cos(step_norm), torch.sin(step_norm) / step_norm
    return MultislerpTerms(None, None, cs, k, scale, xs, base, denom, dots, weights, unit_norm)


def _multislerp_end(
    mean: torch.Tensor, step: torch.Tensor, norms: torch.Tensor, w: torch.Tensor, eps: float
) -> MultislerpTerms:
    """The terms from the unit mean direction, the step, the inputs' norms and the weights."""
    import torch

    step_norm = torch.linalg.vector_norm(step) + eps
    scale = (norms.squeeze(-1) * w).sum()
    return MultislerpTerms(mean, step, torch.cos(step_norm), torch.sin(step_norm) / step_norm, scale)


def karcher_terms(inputs: list, max_iter: int, tol: float) -> tuple[np.ndarray, torch.Tensor] | None:
    """geometric.karcher_mean of the inputs as (mean, scale): the result is scale * mean
    (float32, flat; scale 0-d). Each iteration's dot products, norms and angles are torch's
    on the running mean and a unit vector that the kernels write (kernels.karcher_*); None
    where the reference returns early (one input, or none steers): the caller runs it."""
    import torch

    from .sphere_fills import karcher_initial, karcher_tangent, karcher_turn, karcher_unit, scratch

    xs = raw_arrays(list(inputs))
    if len(xs) == 1:
        return None
    n = xs[0].shape[0]
    unit = Scratch(n)  # each input's unit vector in turn, then the tangent
    norms = [torch.linalg.vector_norm(unit.signal(x)) for x in xs]
    steering = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not steering:
        return None
    share = 1.0 / len(steering)
    norms32 = np.array([_f32(norm) for norm in norms], dtype=np.float32)
    mean_array = karcher_initial(share, tuple(xs), list(norms32), steering, scratch("mean", n))
    mean = torch.from_numpy(mean_array)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm.item() < tol:
        karcher_unit(xs[steering[0]], norms32[steering[0]], mean_array)
    else:
        mean.div_(mean_norm)
    for _ in range(max_iter):
        steps = []  # (input, dot, coefficient) of each input that moves the tangent, in order
        for i in steering:
            karcher_unit(xs[i], norms32[i], unit.array)
            dot = torch.clamp(torch.dot(mean, unit.tensor), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            steps.append((i, _f32(dot), _f32(share * (theta / torch.sin(theta)))))
        if not steps:  # the tangent is zero, its norm 0 < tol, where the reference stops
            break
        tangent_array = karcher_tangent(tuple(xs), norms32, steps, mean_array, unit.array)
        tangent_norm = torch.linalg.vector_norm(unit.tensor)
        if tangent_norm.item() < tol:
            break
        karcher_turn(
            mean_array, tangent_array, _f32(torch.cos(tangent_norm)), _f32(torch.sin(tangent_norm)), _f32(tangent_norm)
        )
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean.div_(unit_norm)
    alpha = 1.0 / len(xs)
    return mean_array, sum(alpha * norm for norm in norms)


def nuslerp_layout(shape: tuple[int, ...], params: dict) -> tuple[tuple[int, ...], bool] | None:
    """(the shape nuslerp views a tensor in, row_wise) as nuslerp_coefficients takes them;
    None for a 0-d tensor not flattened (the caller runs the reference)."""
    if params["nuslerp_flatten"] or len(shape) == 1:  # a 1-D tensor's one vector either way
        return (math.prod(shape),), False
    return (shape, bool(params["nuslerp_row_wise"])) if shape else None


def model_stock_rows(shape: tuple[int, ...], params: dict) -> tuple[int, ...] | None:
    """The shape model_stock views a tensor in (its rows along the last dim), as
    model_stock_ratio takes it; None for a 0-d tensor with filter_wise (the reference)."""
    if not params["filter_wise"]:
        return (math.prod(shape),)
    return ((1, *shape) if len(shape) == 1 else shape) if shape else None
