"""Sparsifications of a task vector: which entries DARE, DELLA, Breadcrumbs and SCE keep.

Pure functions on float32 torch tensors (spec: merge/methods.md). Magnitude cuts use
`top_k_mask` (below), the selection TIES uses, so every method breaks ties at a cut by
the same rule: among equal magnitudes the entry with the lower flat index ranks larger.
Random masks are drawn on the CPU by draws.py from (seed, tensor name, model index,
entry index) and moved to the tensor's device, so they are the same on every device.
"""

from __future__ import annotations

import numpy as np
import torch

from .draws import CHUNK, keep_mask, uniforms
from .l1 import exponent_sums, l1_ratio
from .trim import outlier_ranks


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


def top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a flat non-negative float32 tensor.

    Entries strictly above the k-th largest value are kept, then entries equal to it in
    index order until exactly k are kept: among equal magnitudes the lower index ranks
    larger. Every magnitude cut (TIES, Breadcrumbs, SCE) selects by this rule, with torch's
    own selection here, independent of the kernels' radix select that the tests hold
    against it.
    """
    import torch

    n = magnitudes.numel()
    if k >= n or k <= 0:
        return torch.full((n,), k > 0, dtype=torch.bool, device=magnitudes.device)
    t = magnitude_threshold(magnitudes, k)
    keep = magnitudes > t
    room = k - int(keep.sum())
    if room > 0:
        at_t = magnitudes == t
        # keep the first `room` entries equal to the threshold
        keep |= at_t & (torch.cumsum(at_t, 0, dtype=torch.int64) <= room)
    return keep


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """`kept` (a masked `delta`) scaled so its L1 norm equals delta's, as mergekit's
    `rescale: true` does: times l1.l1_ratio of the exact norms (1 when either is below
    l1.L1_EPS), a float32 value, so the kernels and the torch engine get the same bits."""
    return kept * l1_ratio(exponent_sums(delta), exponent_sums(kept))


def outlier_cut(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma * n) largest magnitudes and keep the next
    int(density * n); fewer are dropped when both do not fit (mergekit's rule)."""
    if density >= 1:
        return delta
    dropped, stop = outlier_ranks(delta.numel(), density, gamma)
    mag = delta.reshape(-1).abs()
    keep = top_k_mask(mag, stop) & ~top_k_mask(mag, dropped)
    return torch.where(keep, delta.reshape(-1), 0.0).reshape(delta.shape)


def random_keep(delta: torch.Tensor, density: float, key: np.uint64) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (all when density >= 1)."""
    if density >= 1:
        return delta
    return _masked(delta, keep_mask(key, float(density), delta.numel()))


def _masked(delta: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """delta with the entries where the flat CPU mask `keep` is False set to 0."""
    keep_t = torch.from_numpy(keep).to(delta.device)
    return torch.where(keep_t, delta.reshape(-1), 0.0).reshape(delta.shape)


def ascending_ranks(magnitudes: np.ndarray) -> np.ndarray:
    """Per row (axis 1), each entry's rank from 0 (smallest) to cols - 1; among equal
    magnitudes the lower index ranks larger (the cut rule of top_k_mask)."""
    cols = magnitudes.shape[1]
    # a stable sort of the row reversed puts equal values with a higher index first
    order = cols - 1 - np.argsort(magnitudes[:, ::-1], axis=1, kind="stable")
    ranks = np.empty_like(order)
    counting = np.arange(cols).reshape((1, cols) + (1,) * (magnitudes.ndim - 2))
    np.put_along_axis(ranks, order, np.broadcast_to(counting, order.shape), axis=1)
    return ranks


def magprune_probabilities(magnitudes: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """DELLA: per entry of rows of magnitudes (rank along axis 1), keep probability
    (density - epsilon) + 2 * epsilon * r / (cols - 1), r its ascending rank; a row of one
    column gets `density`. float64, flat in the rows' order."""
    cols = magnitudes.shape[1]
    if cols == 1:
        return np.full(magnitudes.size, float(density))
    ranks = ascending_ranks(magnitudes).astype(np.float64)
    return ((density - epsilon) + ranks / (cols - 1) * (2 * epsilon)).reshape(-1)


def magprune(delta: torch.Tensor, density: float, epsilon: float, key: np.uint64) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with its rank's probability (all when density >= 1).

    Ranks are per row (dim 1; a 1-D tensor is one row), so rows are ranked and drawn in
    blocks of about draws.CHUNK entries: the sort's temporaries stay small whatever the
    tensor's size, and each entry's draw still depends only on its flat index."""
    if density >= 1:
        return delta
    mag = delta.abs().cpu().numpy()
    if mag.ndim < 2:
        mag = mag.reshape(1, -1)
    per_row = mag[0].size
    keep = np.empty(mag.size, dtype=np.bool_)
    step = max(1, CHUNK // per_row)
    for r in range(0, mag.shape[0], step):
        p = magprune_probabilities(mag[r : r + step], density, epsilon)
        start = r * per_row
        keep[start : start + p.size] = uniforms(key, start, start + p.size) < p
    return _masked(delta, keep)


def variance_top(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """SCE's select: the mask of the int(fraction * nonzero) entries whose variance across
    models (population variance) is largest; all when fraction >= 1."""
    if fraction >= 1:
        return torch.ones(task_vectors.shape[1:], dtype=torch.bool, device=task_vectors.device)
    var = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction)
    return top_k_mask(var.abs().reshape(-1), k).reshape(var.shape)
