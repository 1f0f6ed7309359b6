"""The reduction pass of the spherical methods' fast paths (kernels.py, torch_engine.py):
the few scalars of slerp, nuslerp, multislerp and model_stock, computed exactly as
geometric.py computes them.

Their norms and dot products are torch's own float32 CPU reductions, whose summation order
(vector width, thread split) no chunked kernel reproduces, so they run here with the
reference's torch calls, on tensors of the reference's shapes holding the reference's
values. For slerp, nuslerp and model_stock those values are written by the kernels' fills
(kernels.fill_signal, fill_product: each input or task vector, then each product the
reference sums) into one float32 array of the tensor's size, reused for every reduction, so
one float32 copy is alive instead of the reference's several. multislerp's chain of
reductions runs the reference's operations on a float32 stack of the inputs, changed in
place (an in-place op writes the bits of its out-of-place twin): a few copies alive at once
instead of the reference's dozen. The combine pass then computes every entry from the raw
inputs and these scalars in the reference's operation order.

Inputs are raw flat CPU arrays or tensors as the engines hold them: bfloat16 as its 16 bits
(uint16 arrays, int16 tensors), or float32.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .geometric import NORM_EPS, SLERP_LINEAR_DOT

if TYPE_CHECKING:
    import torch


def float32_copy(raw: torch.Tensor) -> torch.Tensor:
    """A fresh float32 tensor of a raw flat input's values, free to be changed in place."""
    from .st_io import to_float32

    widened = to_float32(raw)
    return widened.clone() if widened.data_ptr() == raw.data_ptr() else widened


def scalar(v: float) -> torch.Tensor:
    """A Python float as torch takes it beside a float32 tensor: rounded to float32."""
    import torch

    return torch.tensor(v, dtype=torch.float32)


def raw_array(x: Any) -> np.ndarray:
    """A flat raw input as the kernels read it: a numpy array, bfloat16 as its uint16 bits."""
    a = x if isinstance(x, np.ndarray) else x.cpu().numpy()
    return a.view(np.uint16) if a.dtype == np.int16 else a


class Scratch:
    """One float32 array of a tensor's size that the kernels' fills write and torch reduces
    (as a tensor sharing its memory)."""

    def __init__(self, n: int):
        import torch

        self.array = np.empty(n, dtype=np.float32)
        self.tensor = torch.from_numpy(self.array)

    def signal(self, x: Any, base: Any = None) -> torch.Tensor:
        """float32(x) [- float32(base)]."""
        from .kernels import fill_signal

        fill_signal(raw_array(x), None if base is None else raw_array(base), self.array)
        return self.tensor

    def product(self, x0: Any, x1: Any, base: Any, norms=None, stride: int = 1, count: int = 1) -> torch.Tensor:
        """(v0 [/ n0]) * (v1 [/ n1]), v = x [- base], norms (n0, n1) per vector as
        kernels.fill_product takes them."""
        from .kernels import fill_product

        raw = [raw_array(x) for x in (x0, x1)]
        fill_product(*raw, None if base is None else raw_array(base), norms, stride, count, self.array)
        return self.tensor


def slerp_coefficients(t: float, v0: Any, v1: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1), 0-d float32, with geometric.slerp(t, v0, v1) = c0 * v0 + c1 * v1 entry by
    entry: (1 - t, t) where the two are collinear, else sin((1 - t) theta) / sin(theta) and
    sin(t theta) / sin(theta)."""
    import torch

    tt = scalar(t)
    scratch = Scratch(raw_array(v0).shape[0])
    na = torch.linalg.vector_norm(scratch.signal(v0))
    na = torch.where(na > NORM_EPS, na, 1.0)
    nb = torch.linalg.vector_norm(scratch.signal(v1))
    nb = torch.where(nb > NORM_EPS, nb, 1.0)
    norms = (na.reshape(1).numpy(), nb.reshape(1).numpy())
    dot = scratch.product(v0, v1, None, norms).sum().clamp(-1, 1)
    del scratch
    if dot.abs() > SLERP_LINEAR_DOT:
        return 1 - tt, tt
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta


def _delta(x: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    d = float32_copy(x)
    return d if base is None else d.sub_(base)


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

    n = math.prod(shape)
    scratch = Scratch(n)

    def vectors(flat: torch.Tensor) -> torch.Tensor:  # the reference's view: vectors along the last dim
        v = flat.view(shape)
        return v.transpose(0, -1) if row_wise else v

    norms = []
    for x in (x0, x1):
        norms.append(torch.linalg.vector_norm(vectors(scratch.signal(x, base)), dim=-1, keepdim=True).clamp(min=1e-7))
    # entry j's vector: j % (n / shape[0]) along dim 0 (row_wise), else j // shape[-1]
    stride, count = (1, n // shape[0]) if row_wise else (shape[-1], n // shape[-1])
    per_entry = [(m.transpose(0, -1) if row_wise else m).reshape(-1).numpy() for m in norms]
    cos = vectors(scratch.product(x0, x1, base, per_entry, stride, count)).sum(-1, keepdim=True).clamp(-1, 1)
    del scratch
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

    scratch = Scratch(math.prod(rows))
    norms = [torch.linalg.vector_norm(scratch.signal(x, base).view(rows), dim=-1) for x in tensors]
    cosines = []
    for i, a in enumerate(tensors):
        for j in range(i + 1, len(tensors)):
            dot = scratch.product(a, tensors[j], base).view(rows).sum(-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    del scratch
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    count = len(tensors)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))
    return PerVector(t.reshape(-1), (1 - t).reshape(-1), torch.ones(t.numel()), rows[-1], t.numel())


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
