"""The reduction fills of the spherical methods' fast paths (sphere_scalars.py): numba
passes that write, into float32 arrays of a tensor's size, exactly the values the reference
reduces (each input or task vector, each product it sums, each running mean of
multislerp and karcher), so that torch's own reduction of those arrays has the reference's
bits; and the scratch arrays they write into, reused tensor after tensor.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from .kernel_base import BLOCK, CHUNKS, _chunk_bounds, _load, _next_vector


@numba.njit(inline="always")
def _signal(x, base, deltas, j):
    """float32(x[j]) [- float32(base[j])]."""
    v = _load(x, j)
    if deltas:
        v = v - _load(base, j)
    return v


# Scratch arrays of the reduction passes, reused tensor after tensor by the thread that merges:
# fresh memory costs a page fault and a zeroing per page (under perf, page clearing was about
# a fifth of the CPU time of a slerp merge at 0.54B), a reused array nothing. The engine
# frees them when a merge ends (release_scratch).
_SCRATCH = threading.local()


def scratch(slot: str, n: int) -> np.ndarray:
    """A float32 array of n entries for one use at a time (`slot`), this thread's own,
    reused by the next call for that slot."""
    held = _SCRATCH.__dict__.setdefault("arrays", {})
    if slot not in held or held[slot].shape[0] < n:
        held.pop(slot, None)  # freed before its larger successor is made
        held[slot] = np.empty(n, dtype=np.float32)
    return held[slot][:n]


def release_scratch() -> None:
    """Free this thread's scratch arrays."""
    _SCRATCH.__dict__.pop("arrays", None)


# The reduction pass's fills (sphere_scalars.py): each writes one float32 array of the
# tensor's size with exactly the values the reference reduces (an input or task vector, or
# the product of two, each divided first by its vector's norm where `divide`), so torch's
# own reduction of that array has the reference's bits while one float32 array is alive.


@numba.njit(parallel=True, cache=True, nogil=True)
def _fill_signal(x, base, deltas, out):
    """out = float32(x) [- float32(base)]."""
    n = out.shape[0]
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for j in range(lo, hi):
            out[j] = _signal(x, base, deltas, j)


@numba.njit(parallel=True, cache=True, nogil=True)
def _fill_product(x0, x1, base, deltas, divide, n0, n1, stride, count, out):
    """out = (v0 [/ n0]) * (v1 [/ n1]), v = x [- base], each operation rounded to float32;
    n0, n1 per vector: entry j's is (j // stride) % count."""
    n = out.shape[0]
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        v, within = (lo // stride) % count, lo % stride
        for j in range(lo, hi):
            v0, v1 = _signal(x0, base, deltas, j), _signal(x1, base, deltas, j)
            if divide:
                v0 = v0 / n0[v]
                v1 = v1 / n1[v]
            out[j] = v0 * v1
            v, within = _next_vector(v, within, stride, count)


def fill_signal(x: np.ndarray, base: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    """out = float32(x) [- float32(base)], flat; returns out."""
    _fill_signal(x, base if base is not None else x, base is not None, out)
    return out


def fill_product(x0, x1, base, norms, stride: int, count: int, out: np.ndarray) -> np.ndarray:
    """out = (v0 [/ n0]) * (v1 [/ n1]) of the flat raw inputs (v = x [- base]), with norms =
    (n0, n1) float32 per vector (entry j's is (j // stride) % count) or None; returns out."""
    if out.shape[0] == 0:
        return out
    n0, n1 = norms if norms is not None else (np.ones(1, np.float32), np.ones(1, np.float32))
    has_base = base is not None
    _fill_product(x0, x1, base if has_base else x0, has_base, norms is not None, n0, n1, stride, count, out)
    return out


# multislerp (up to methods.SUMMED_MODELS_MAX models: its sums over the models are torch's
# stacked sums, from +0.0 in model order) and karcher: sphere_scalars.py calls torch's own
# reductions on arrays these fills write; each entry's unit vector v_i / denom_i is
# recomputed from the raw input rather than stored.


@numba.njit(cache=True, nogil=True)
def _multislerp_unit_block(xs, base, deltas, denom, w, mean_norm, s, e, units, mean):
    """Over entries [s, e): units[i] = v_i / denom_i (v = x [- base]) and mean = (+0.0 +
    units_0 * w_0) + units_1 * w_1 ..., divided by mean_norm unless it is 0 (the weighted
    sum itself). Loops over a block, each of which vectorizes."""
    size = e - s
    for i in range(len(xs)):
        x, u, d = xs[i], units[i], denom[i]
        for j in range(size):
            u[j] = _signal(x, base, deltas, s + j) / d
    mean[:size] = 0.0
    for i in range(len(xs)):
        u, wi = units[i], w[i]
        for j in range(size):
            mean[j] = mean[j] + u[j] * wi
    if mean_norm != np.float32(0.0):
        for j in range(size):
            mean[j] = mean[j] / mean_norm


@numba.njit(cache=True, nogil=True)
def _multislerp_step_block(units, dots, w, mean, size, step):
    """step = (+0.0 + t_0 * w_0) + t_1 * w_1 ..., t_i = units_i - dots_i * mean, over a block."""
    step[:size] = 0.0
    for i in range(units.shape[0]):
        u, di, wi = units[i], dots[i], w[i]
        for j in range(size):
            step[j] = step[j] + (u[j] - di * mean[j]) * wi


@numba.njit(parallel=True, cache=True, nogil=True)
def _multislerp_fill(xs, base, deltas, denom, w, mean_norm, dots, which, out):
    """out = by `which`: -1 the weighted sum of the unit vectors (mean_norm 0: undivided);
    i >= 0 model i's products units_i * mean with the unit mean; -2 the step. The unit
    vectors and the unit mean are recomputed a block at a time, not stored."""
    m, n = len(xs), out.shape[0]
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        units = np.empty((m, BLOCK), dtype=np.float32)
        mean = np.empty(BLOCK, dtype=np.float32)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            size = e - s
            _multislerp_unit_block(xs, base, deltas, denom, w, mean_norm, s, e, units, mean)
            if which == -1:
                out[s:e] = mean[:size]
            elif which >= 0:
                u = units[which]
                for j in range(size):
                    out[s + j] = u[j] * mean[j]
            else:
                _multislerp_step_block(units, dots, w, mean, size, out[s:e])


def multislerp_mean(xs: tuple, base, denom: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The weighted sum of the unit vectors v_i / denom_i of the flat raw inputs into out."""
    return _multislerp_into(xs, base, denom, w, np.float32(0.0), w, -1, out)


def multislerp_product(xs: tuple, i: int, base, denom, w, mean_norm: np.float32, out: np.ndarray) -> np.ndarray:
    """Model i's products (v_i / denom_i) * unit mean into out (n); returns out."""
    return _multislerp_into(xs, base, denom, w, mean_norm, w, i, out)


def multislerp_step(xs: tuple, base, denom, dots, w, mean_norm: np.float32, out: np.ndarray) -> np.ndarray:
    """The step, the weighted sum of the tangents v_i / denom_i - dots_i * unit mean, into out."""
    return _multislerp_into(xs, base, denom, w, mean_norm, dots, -2, out)


def _multislerp_into(xs, base, denom, w, mean_norm, dots, which: int, out: np.ndarray) -> np.ndarray:
    _multislerp_fill(xs, base if base is not None else xs[0], base is not None, denom, w, mean_norm, dots, which, out)
    return out


@numba.njit(parallel=True, cache=True, nogil=True)
def _karcher_unit(x, norm, out):
    """out = x / norm (the unit vector; norm 0 gives zeros, as the reference's zeros_like)."""
    n = out.shape[0]
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for j in range(lo, hi):
            out[j] = _load(x, j) / norm if norm != np.float32(0.0) else np.float32(0.0)


@numba.njit(parallel=True, cache=True, nogil=True)
def _karcher_tangent(xs, norms, which, dots, coefficients, mean, tangent):
    """tangent = (+0.0 + c_0 * (u_0 - dot_0 * mean)) + c_1 * (u_1 - dot_1 * mean) ... over the
    inputs `which` in order, each operation rounded to float32, u = x / norm as _karcher_unit
    computes it (the reference's zero tangent and its in-place adds, in one pass, a block
    at a time in a loop per input that vectorizes)."""
    n = tangent.shape[0]
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for s in range(lo, hi, BLOCK):
            e = min(s + BLOCK, hi)
            acc, m = tangent[s:e], mean[s:e]
            acc[:] = 0.0
            for r in range(which.shape[0]):
                x, norm, dot, coefficient = xs[which[r]][s:e], norms[which[r]], dots[r], coefficients[r]
                for j in range(e - s):
                    u = _load(x, j) / norm if norm != np.float32(0.0) else np.float32(0.0)
                    acc[j] = acc[j] + coefficient * (u - dot * m[j])


@numba.njit(parallel=True, cache=True, nogil=True)
def _karcher_turn(mean, tangent, cos_norm, sin_norm, tangent_norm):
    """mean = cos_norm * mean + sin_norm * (tangent / tangent_norm), in place."""
    n = mean.shape[0]
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for j in range(lo, hi):
            mean[j] = cos_norm * mean[j] + sin_norm * (tangent[j] / tangent_norm)


@numba.njit(parallel=True, cache=True, nogil=True)
def _karcher_scaled(share, xs, norms, use, mean):
    """mean = (+0.0 + share * u_0) + share * u_1 ... over the steering inputs (use), u = x / norm."""
    m, n = len(xs), mean.shape[0]
    for c in numba.prange(CHUNKS):
        lo, hi = _chunk_bounds(n, CHUNKS, c)
        for j in range(lo, hi):
            acc = np.float32(0.0)
            for i in range(m):
                if use[i]:
                    acc = acc + share * (_load(xs[i], j) / norms[i])
            mean[j] = acc


def karcher_unit(x: np.ndarray, norm: np.float32, out: np.ndarray) -> np.ndarray:
    """out = x / norm (zeros where norm is 0); returns out."""
    _karcher_unit(x, norm, out)
    return out


def karcher_initial(share: float, xs: tuple, norms: list[np.float32], steering: list[int], mean: np.ndarray):
    """The first running mean into `mean`: (+0.0 + share * u_0) + share * u_1 ... over the
    steering inputs; returns mean."""
    use = np.zeros(len(xs), dtype=np.bool_)
    use[steering] = True
    _karcher_scaled(np.float32(share), xs, np.array(norms, dtype=np.float32), use, mean)
    return mean


def karcher_tangent(xs: tuple, norms: np.ndarray, steps: list, mean: np.ndarray, tangent: np.ndarray) -> np.ndarray:
    """The tangent sum_i c_i * (x_i / norm_i - dot_i * mean) into `tangent`, over steps =
    [(input index, dot, coefficient)] in order (float32 scalars); returns tangent."""
    which = np.array([i for i, _, _ in steps], dtype=np.int64)
    dots = np.array([d for _, d, _ in steps], dtype=np.float32)
    coefficients = np.array([c for _, _, c in steps], dtype=np.float32)
    _karcher_tangent(xs, norms, which, dots, coefficients, mean, tangent)
    return tangent


def karcher_turn(mean, tangent, cos_norm: np.float32, sin_norm: np.float32, tangent_norm: np.float32) -> None:
    """mean = cos_norm * mean + sin_norm * (tangent / tangent_norm), in place."""
    _karcher_turn(mean, tangent, cos_norm, sin_norm, tangent_norm)
