"""The L1 rescale of the sparsifying methods (merge/methods.md): one definition for the
reference (sparsify.rescale_l1), the kernels and the torch engine.

A float32 `.sum()` depends on its order, which chunked, parallel or GPU passes cannot
share. Here a norm is exact instead: |v| of a float32 is s * 2^(e - 150), with e its
exponent field (1 for subnormals) and s its 24-bit significand, so a norm is held as the
integer sums of s per exponent field (EXPONENTS int64 counters: exact, in any order, for
tensors under 2^39 entries). The ratio of two norms is formed once from those integers,
rounded to float64 and then to the float32 every path multiplies the kept entries by.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

EXPONENTS = 256
L1_EPS = 1e-7  # below this L1 norm (before or after the mask) no rescale happens (ratio 1)


def exponent_sums(t: torch.Tensor) -> np.ndarray:
    """A float32 tensor's L1 norm as its per-exponent significand sums (int64, on the CPU)."""
    import torch

    bits = t.detach().abs().reshape(-1).view(torch.int32)
    exponent = bits >> 23
    significand = (bits & 0x7FFFFF) | ((exponent > 0).to(torch.int32) << 23)
    sums = torch.zeros(EXPONENTS, dtype=torch.int64, device=t.device)
    sums.index_add_(0, exponent.long(), significand.long())
    return sums.cpu().numpy()


def _scaled_norm(sums: np.ndarray) -> int:
    """The norm times 2^150, exactly."""
    return sum(int(s) << max(e, 1) for e, s in enumerate(sums.tolist()) if s)


def l1_ratio(before: np.ndarray, after: np.ndarray) -> float:
    """||delta||_1 / ||kept||_1 from their exponent sums, as the float32 value (a Python
    float) the kept entries are multiplied by: the exact quotient rounded to float64, then
    to float32; 1.0 when either norm is below L1_EPS."""
    b, a = _scaled_norm(before), _scaled_norm(after)
    if float(b) * 2.0**-150 < L1_EPS or float(a) * 2.0**-150 < L1_EPS:
        return 1.0
    with np.errstate(over="ignore"):  # past float32's range the merge overflows and is refused
        return float(np.float32(b / a))
