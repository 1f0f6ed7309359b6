"""Reproducible random draws for DARE and DELLA: the same bits on every device and run.

A device RNG stream (what mergekit's `torch.bernoulli` uses) gives different masks on CPU
and GPU and depends on the order tensors are visited. Here every entry's uniform number
is a pure function of (seed, tensor name, model index, entry index): a counter-based hash
(splitmix64's finalizer), computed with numpy integer arithmetic on the CPU. The tensor
name enters through blake2b, never Python's per-process `hash`.
"""

from __future__ import annotations

import hashlib

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
# entries hashed per step: bounds the temporaries to a few MB whatever the tensor's size
CHUNK = 1 << 20


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


def stream_key(seed: int, tensor_name: str, model_index: int) -> np.uint64:
    """The key of one model's draws for one tensor."""
    name = int.from_bytes(hashlib.blake2b(tensor_name.encode(), digest_size=8).digest(), "little")
    with np.errstate(over="ignore"):
        key = np.array([seed % 2**64], dtype=np.uint64)
        for part in (name, model_index):
            key = _mix(key + GOLDEN) ^ np.uint64(part % 2**64)
        return _mix(key + GOLDEN)[0]


def uniforms(key: np.uint64, start: int, stop: int) -> np.ndarray:
    """float64 numbers in [0, 1) for entries start..stop-1: the top 53 bits of
    mix(key + (j + 1) * GOLDEN)."""
    j = np.arange(start + 1, stop + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _mix(key + j * GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def keep_mask(key: np.uint64, probability: float | np.ndarray, n: int) -> np.ndarray:
    """Bernoulli draws for n entries: entry j is kept when its uniform < its probability
    (a number, or a flat float64 array of n probabilities)."""
    keep = np.empty(n, dtype=np.bool_)
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        keep[s:e] = uniforms(key, s, e) < (probability[s:e] if isinstance(probability, np.ndarray) else probability)
    return keep
