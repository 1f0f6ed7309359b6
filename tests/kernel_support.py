"""The end-to-end check of a method's fast path: the same recipe merged through it and through
the reference, compared bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lrmerge_hub.merge import engine, torch_engine
from lrmerge_hub.merge.st_io import SafetensorsModel


def merge_both_ways(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, recipe: Any, method: str, engine_name: str = "kernels"
) -> tuple[SafetensorsModel, SafetensorsModel, list[tuple[tuple, dict]]]:
    """Merge `recipe` with `method`'s fast path on `engine_name` (the kernels' FAST_PATHS or the
    torch engine's TORCH_METHODS), recording each call's (args, kwargs), then with no fast path
    (the reference functions on the CPU). Returns (fast output, reference output, calls)."""
    sources = engine.local_sources(recipe)
    table = engine.FAST_PATHS if engine_name == "kernels" else torch_engine.TORCH_METHODS
    fast_path, calls = table[method], []

    def spy(*a, **kw):
        calls.append((a, kw))
        return fast_path(*a, **kw)

    monkeypatch.setitem(table, method, spy)
    engine.merge(recipe, sources, tmp_path / "fast", device="cpu", engine=engine_name, progress=False)
    monkeypatch.setattr(engine, "FAST_PATHS", {})
    engine.merge(recipe, sources, tmp_path / "slow", device="cpu", engine="kernels", progress=False)
    return SafetensorsModel(tmp_path / "fast", "fast"), SafetensorsModel(tmp_path / "slow", "slow"), calls


def assert_same_outputs(a: SafetensorsModel, b: SafetensorsModel) -> None:
    """The two outputs hold the same tensors with the same bits."""
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert torch.equal(a.get(name).view(torch.int16), b.get(name).view(torch.int16)), name
