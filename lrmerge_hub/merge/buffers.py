"""Output arrays reused tensor after tensor.

A fresh array's pages are zeroed by the OS as the kernel first writes them: on a 2-core VM
that was a seventh of a one-pass merge's CPU time, for bytes the kernel overwrites at once.
So the kernels take their outputs from `output_array`, and the engine's writer hands each one
back (`recycle`) once its bytes are written; the next tensor of at most that size reuses it.
At most FREE_BUFFERS wait to be reused (the largest), and `release_outputs` lets them go when
a merge ends. An array nobody recycles (a test's, a caller's) is freed as usual.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

import numpy as np

POOLED_BYTES = 1 << 20  # smaller arrays come from malloc, which reuses its own memory
FREE_BUFFERS = 2  # with one tensor merged while the one before is written, two cycle

_lock = threading.Lock()
_free: list[np.ndarray] = []  # uint8 buffers the writer is done with
_made: dict[int, weakref.ref] = {}  # id -> each buffer output_array created and that still lives


def _forget(key: int) -> Callable[[weakref.ref], None]:
    def forget(_: weakref.ref) -> None:  # the buffer was freed: its id may be reused
        _made.pop(key, None)

    return forget


def output_array(n: int, bf16: bool) -> np.ndarray:
    """A flat output array of `n` entries, bfloat16 bits or float32, whose contents are
    undefined (as np.empty's): a buffer the writer gave back, else a new one."""
    dtype = np.dtype(np.uint16 if bf16 else np.float32)
    nbytes = n * dtype.itemsize
    if nbytes < POOLED_BYTES:
        return np.empty(n, dtype=dtype)
    with _lock:
        fitting = [i for i, b in enumerate(_free) if b.nbytes >= nbytes]
        if fitting:
            buffer = _free.pop(min(fitting, key=lambda i: _free[i].nbytes))
        else:
            buffer = np.empty(nbytes, dtype=np.uint8)
            _made[id(buffer)] = weakref.ref(buffer, _forget(id(buffer)))
    return buffer[:nbytes].view(dtype)


def recycle(array: np.ndarray) -> None:
    """Give back an array output_array made (a view of one is fine) once nothing reads it any
    more; anything else is left alone."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    with _lock:
        ref = _made.get(id(root))
        if ref is None or ref() is not root or any(b is root for b in _free):
            return
        _free.append(root)
        if len(_free) > FREE_BUFFERS:  # keep the largest: any smaller tensor fits them
            del _free[min(range(len(_free)), key=lambda i: _free[i].nbytes)]


def release_outputs() -> None:
    """Let the buffers waiting for reuse go (a merge ended)."""
    with _lock:
        _free.clear()
