"""What every fused CPU kernel is compiled with: loads and stores of bfloat16 bits and
float32, the IEEE bits of a float, chunk bounds, the NaN/Inf test, and numba's threading
setup. kernels.py (the methods' fused kernels) and sphere_fills.py (the spherical methods'
reduction fills) both build on it.

numba caches compiled kernels per source file and does not notice a change here: after
editing this file, remove the __pycache__ folder beside it.
"""

from __future__ import annotations

import os
import sys

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

# numba's "workqueue" threads sleep when idle; the OpenMP layer spins, which on a shared
# 2-core machine burns the CPU time the other worker needs (measured: ~25% more CPU for
# the same merge). The kernels are only ever called from one Python thread at a time.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"


def _load_array_math_without_scipy() -> None:
    """numba loads its array math with the first kernel, and that imports scipy.linalg (0.2 s
    of every merge's start-up, where scipy is installed) only to learn whether inner products
    may call a BLAS; no kernel here takes one. Loaded now with scipy hidden, numba keeps its
    own loop for them; an np.dot compiled later still imports scipy.linalg when it is typed,
    and scipy.linalg imports as usual afterwards."""
    if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return
    sys.modules["scipy.linalg"] = None  # type: ignore[assignment]  # its import raises ImportError
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        del sys.modules["scipy.linalg"]


_load_array_math_without_scipy()

# parallel chunks per tensor: more than the cores, so a busy core does not stall the rest
CHUNKS = 16
# entries per block inside a chunk: a few rows of float32 that stay in L1/L2
BLOCK = 2048

# -- scalar helpers compiled into the kernels ----------------------------------------------


@intrinsic
def _float_bits(typingctx, x):
    """The IEEE bits of a float32 as a (non-negative) int64."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.int64(types.float32), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c in float32 with one rounding (llvm.fma: the FMA instruction where the CPU has
    one), as torch's addcmul computes it."""
    if not (a == b == c == types.float32):
        return None

    def codegen(context, builder, sig, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _bf16_to_float(typingctx, h):
    """The float32 of bfloat16 bits (in 32-bit integer ops, which vectorize 8 wide)."""
    if h != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _float_to_bf16(typingctx, v):
    """bfloat16 bits of a float32, rounded to nearest even; NaN stays a quiet NaN of the
    same sign. Branch-free 32-bit integer ops."""
    if v != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        u = builder.bitcast(args[0], i32)
        high = builder.lshr(u, ir.Constant(i32, 16))
        odd = builder.and_(high, ir.Constant(i32, 1))
        rounded = builder.lshr(builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), odd), ir.Constant(i32, 16))
        quiet_nan = builder.or_(high, ir.Constant(i32, 0x40))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))

    return types.uint16(types.float32), codegen


def _load(a, j):  # pragma: no cover - replaced by the overload inside kernels
    raise NotImplementedError


@overload(_load, inline="always")
def _load_impl(a, j):
    """Entry j of an input as float32: bfloat16 arrives as its uint16 bits."""
    if a.dtype == types.uint16:
        return lambda a, j: _bf16_to_float(a[j])
    if a.dtype == types.float32:
        return lambda a, j: a[j]
    return None


def _store(a, j, v):  # pragma: no cover - replaced by the overload inside kernels
    raise NotImplementedError


@overload(_store, inline="always")
def _store_impl(a, j, v):
    """Write float32 v to an output: bfloat16 (as uint16 bits) rounds to nearest even."""
    if a.dtype == types.uint16:

        def store_bf16(a, j, v):
            a[j] = _float_to_bf16(v)

        return store_bf16
    if a.dtype == types.float32:

        def store_f32(a, j, v):
            a[j] = v

        return store_f32
    return None


@numba.njit(inline="always")
def _chunk_bounds(n, chunks, c):
    return n * c // chunks, n * (c + 1) // chunks


@numba.njit(inline="always")
def _is_nonfinite(v):
    return (v - v) != np.float32(0.0)  # NaN for NaN and +-Inf; float ops vectorize 8 wide


@numba.njit(inline="always")
def _next_vector(v, within, stride, count):
    """The vector of the next entry, entries in runs of `stride` per vector, `count` vectors
    in turn (incremented: no integer division per entry)."""
    within += 1
    if within == stride:
        within = 0
        v += 1
        if v == count:
            v = 0
    return v, within


def as_float32(a: np.ndarray, bf16: bool) -> np.ndarray:
    """A float32 copy of a flat input (bfloat16 given as its uint16 bits when bf16)."""
    if bf16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)
