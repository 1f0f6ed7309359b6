"""The reduction pass of the spherical methods' fast paths (kernels.py, torch_engine.py):
the few scalars of slerp, nuslerp, multislerp and model_stock, computed exactly as
geometric.py computes them.

Their norms and dot products are torch's own float32 CPU reductions, whose summation order
(vector width, thread split) no chunked kernel reproduces, so they run here with the
reference's torch operations on float32 CPU tensors holding the same values. Every input
is widened into a fresh float32 tensor and later steps run in place on it (an in-place op
writes the bits of its out-of-place twin), so a few whole-tensor copies are alive at once
instead of the reference's dozen; the combine pass then computes every entry from the
raw inputs and these scalars in the reference's operation order.

Inputs are raw flat CPU tensors as the torch engine holds them: bfloat16 as int16 bits,
or float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .geometric import NORM_EPS, SLERP_LINEAR_DOT

if TYPE_CHECKING:
    import torch


def float32_copy(raw: torch.Tensor) -> torch.Tensor:
    """A fresh float32 tensor of a raw flat input's values, free to be changed in place."""
    from .torch_engine import to_float32

    widened = to_float32(raw)
    return widened.clone() if widened.data_ptr() == raw.data_ptr() else widened


def scalar(v: float) -> torch.Tensor:
    """A Python float as torch takes it beside a float32 tensor: rounded to float32."""
    import torch

    return torch.tensor(v, dtype=torch.float32)


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1), 0-d float32, with geometric.slerp(t, v0, v1) = c0 * v0 + c1 * v1 entry by
    entry: (1 - t, t) where the two are collinear, else sin((1 - t) theta) / sin(theta) and
    sin(t theta) / sin(theta)."""
    import torch

    tt = scalar(t)
    a = float32_copy(v0)
    na = torch.linalg.vector_norm(a)
    a.div_(torch.where(na > NORM_EPS, na, 1.0))
    b = float32_copy(v1)
    nb = torch.linalg.vector_norm(b)
    dot = a.mul_(b.div_(torch.where(nb > NORM_EPS, nb, 1.0))).sum().clamp(-1, 1)
    del a, b
    if dot.abs() > SLERP_LINEAR_DOT:
        return 1 - tt, tt
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta


def _delta(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    d = float32_copy(x)
    return d if base is None else d.sub_(base)


def nuslerp_coefficients(
    t: float, x0: torch.Tensor, x1: torch.Tensor, base: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(c0, c1, divisor) of the flattened geometric.nuslerp of x0 and x1 (minus the base when
    given): the result is c0 * v0 + c1 * v1, divided by the divisor unless it is None (the
    collinear case, c0 = 1 - t and c1 = t as float32). 0-d float32 tensors."""
    import torch

    b = float32_copy(base) if base is not None else None
    v0 = _delta(x0, b)
    v0.div_(torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7))
    v1 = _delta(x1, b)
    del b
    v1.div_(torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7))
    cos = v0.mul_(v1).sum(-1, keepdim=True).clamp(-1, 1)
    del v0, v1
    collinear = (1 - cos.square()) <= NORM_EPS**2
    if bool(collinear):
        return scalar(1 - t), scalar(t), None
    theta = torch.acos(torch.where(collinear, 0.0, cos))
    return torch.sin((1 - t) * theta)[0], torch.sin(t * theta)[0], torch.sin(theta)[0]


def model_stock_ratio(base: torch.Tensor, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, 1 - t), 0-d float32, of the flattened geometric.model_stock: the result is
    t * average + (1 - t) * base."""
    import torch

    w0 = float32_copy(base)
    offsets = [float32_copy(x).sub_(w0) for x in tensors]
    del w0
    norms = [torch.linalg.vector_norm(a, dim=-1) for a in offsets]
    product = torch.empty_like(offsets[0])
    cosines = []
    for i, a in enumerate(offsets):
        for j in range(i + 1, len(offsets)):
            dot = torch.mul(a, offsets[j], out=product).sum(-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    del offsets, product
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    count = len(tensors)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))
    return t[0], (1 - t)[0]


class MultislerpTerms:
    """The flattened geometric.multislerp of the deltas, as mean * cs + step * k, all times
    scale: mean and step are float32 CPU tensors of the tensor's size, the rest 0-d."""

    def __init__(self, mean: torch.Tensor, step: torch.Tensor, cs: torch.Tensor, k: torch.Tensor, scale: torch.Tensor):
        self.mean, self.step, self.cs, self.k, self.scale = mean, step, cs, k, scale


def multislerp_terms(
    tensors: list[torch.Tensor], base: torch.Tensor | None, weights: list[float], normalize: bool, eps: float
) -> MultislerpTerms | None:
    """geometric.multislerp's terms of two or more inputs (their deltas with a base), each
    step with the reference's torch operations on the stacked float32 inputs; None where
    the reference takes another branch (the weighted directions cancel out, or with a base
    no model changed the tensor): the caller runs the reference there."""
    import torch

    b = float32_copy(base) if base is not None else None
    stack = torch.empty((len(tensors), tensors[0].numel()), dtype=torch.float32)
    for i, x in enumerate(tensors):
        stack[i] = _delta(x, b)
    del b
    if base is not None and not bool(stack.any()):
        return None
    w = torch.tensor(weights, dtype=torch.float32)
    if normalize:
        w = w / w.sum()
    column = w.view(-1, 1)
    norms = torch.linalg.vector_norm(stack, dim=-1, keepdim=True)
    units = stack.div_(norms + eps)
    work = torch.mul(units, column)
    mean = work.sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        return None
    mean.div_(mean_norm)
    dots = torch.mul(units, mean, out=work).sum(-1, keepdim=True)
    tangents = units.sub_(torch.mul(dots, mean, out=work))
    step = torch.mul(tangents, column, out=work).sum(0)
    del stack, units, tangents, work
    step_norm = torch.linalg.vector_norm(step) + eps
    scale = (norms.squeeze(-1) * w).sum()
    return MultislerpTerms(mean, step, torch.cos(step_norm), torch.sin(step_norm) / step_norm, scale)
