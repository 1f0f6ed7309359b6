"""Interpolations on spheres and the two-model methods: pure float32 torch functions.

SLERP, NuSLERP, Multi-SLERP, the Karcher mean, Model Stock and NearSwap, with the
formulas, thresholds and epsilons of mergekit 0.1.5 (spec: merge/methods.md), so a
float32 merge agrees with mergekit's to float rounding.
"""

from __future__ import annotations

import math

import torch

from ..errors import DegenerateInput

SLERP_LINEAR_DOT = 0.9995  # |cos| above this: the two are collinear, interpolate linearly
NORM_EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of the flattened tensors: t = 0 gives v0, t = 1 gives v1."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    # t in the tensors' dtype, as mergekit 0.1.5 takes it: 1 - t and t · theta round there
    t = torch.tensor(t, dtype=a.dtype, device=a.device)  # type: ignore[assignment]  # t is a float, then a tensor
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = torch.where(na > NORM_EPS, na, 1.0)
    nb = torch.where(nb > NORM_EPS, nb, 1.0)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > SLERP_LINEAR_DOT:
        return ((1 - t) * a + t * b).reshape(v0.shape)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / sin_theta * a + torch.sin(t * theta) / sin_theta * b).reshape(v0.shape)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool) -> torch.Tensor:
    """SLERP per vector: the whole tensor (flatten), its columns (row_wise: vectors along
    dim 0) or its rows (vectors along the last dim); linear where a pair is collinear."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= NORM_EPS**2
    theta = torch.acos(torch.where(collinear, 0.0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(collinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def multislerp(vectors: list[torch.Tensor], weights: list[float], normalize_weights: bool, eps: float) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere: tangent space at the weighted mean of
    the unit vectors, weighted sum there, back by the exponential map, scaled by the
    weighted mean norm."""
    if len(vectors) == 1:
        return vectors[0]
    stack = torch.stack([v.reshape(-1) for v in vectors])
    w = torch.tensor(weights, dtype=stack.dtype, device=stack.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(stack, dim=-1, keepdim=True)
    units = stack / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(vectors) == 2:
            return (stack[0] * w[0] + stack[1] * w[1]).reshape(vectors[0].shape)
        if not bool(stack.any()):  # every input is zero here: so is their mean
            return torch.zeros_like(vectors[0])
        raise DegenerateInput(
            "multislerp: the weighted directions of the inputs cancel out (their weighted "
            "unit vectors sum to zero), so the interpolation has no direction; change the weights"
        )
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * w.view(-1, 1)).sum(0)
    step_norm = torch.linalg.vector_norm(step) + eps
    out = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    return (out * (norms.squeeze(-1) * w).sum()).reshape(vectors[0].shape)


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The equally weighted Karcher (Riemannian) mean of the unit vectors by fixed-point
    iteration, scaled by the mean norm; inputs with norm <= tol do not steer it."""
    if len(tensors) == 1:
        return tensors[0]
    alpha = 1.0 / len(tensors)
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [t / n if n.item() != 0.0 else torch.zeros_like(t) for t, n in zip(tensors, norms, strict=True)]
    steering = [u for u, n in zip(units, norms, strict=True) if n.item() > tol]
    if not steering:
        return torch.zeros_like(tensors[0])
    share = 1.0 / len(steering)
    mean = sum(share * u for u in steering)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = steering[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in steering:
            dot = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(alpha * n for n in norms) * mean


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """Model Stock: move from the base toward the models' average by
    t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors
    (per row with filter_wise); t = 0 where the denominator is ~0."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
    else:
        w0, ws = base.reshape(-1), [t.reshape(-1) for t in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(shape)


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Take `other` where it lies within t of the base, blend toward the base elsewhere:
    w = clamp(t / max(|base - other|, 1e-6), 0, 1); w * other + (1 - w) * base."""
    w = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * other + (1 - w) * base


def interpolation_fraction(weights: list[float]) -> float:
    """NuSLERP's t from two weights: w1 / (w0 + w1), 0.5 when they sum to ~0."""
    total = sum(weights)
    return 0.5 if math.fabs(total) < 1e-6 else weights[1] / total
