"""Which entries a magnitude trim keeps: one rule for the reference methods (methods.py,
sparsify.py), the fused kernels and the torch engine."""

from __future__ import annotations

import math


def trim_count(numel: int, density: float) -> int:
    """k = max(1, floor(density * n)): how many entries the trim keeps (all when density >= 1)."""
    if density >= 1.0:
        return numel
    return max(1, int(math.floor(density * numel)))


def outlier_ranks(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs' kept magnitude ranks [start, stop) (rank 0 is the largest): the
    int(gamma * n) largest are dropped and the next int(density * n) kept; fewer are dropped
    when both do not fit (mergekit's rule); every entry when density >= 1."""
    if density >= 1:
        return 0, numel
    target, top = int(density * numel), int(gamma * numel)
    dropped = numel - max(0, numel - target - top) - target
    return dropped, dropped + target


def rank_layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """DELLA's rows (sparsify.magprune) as (outer, cols, inner): a tensor of this shape, in C
    order, is `outer` blocks of `cols` x `inner` entries; each row to rank is the cols
    entries along dim 1 at one outer and one inner index (stride inner). A tensor of fewer
    than 2 dimensions is one row."""
    if len(shape) < 2:
        return 1, math.prod(shape), 1
    return shape[0], shape[1], math.prod(shape[2:])
