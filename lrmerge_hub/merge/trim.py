"""How many entries a magnitude trim keeps: one rule for the reference methods (methods.py,
sparsify.py), the fused kernels and the torch engine."""

from __future__ import annotations

import math


def trim_count(numel: int, density: float) -> int:
    """k = max(1, floor(density * n)): how many entries the trim keeps (all when density >= 1)."""
    if density >= 1.0:
        return numel
    return max(1, int(math.floor(density * numel)))
