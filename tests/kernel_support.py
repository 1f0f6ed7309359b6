"""The end-to-end check of a method's fast path (the same recipe merged through it and through
the reference, compared bit for bit), and a recipe for any method with every parameter set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lrmerge_hub.merge import engine, torch_engine
from lrmerge_hub.merge.methods import METHODS
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


ONE_MODEL = {"slerp", "nearswap", "passthrough", "arcee_fusion"}  # the methods that take one model besides the base
ENGINE_MODEL_PARAMS = {"density": 0.3, "epsilon": 0.1, "gamma": 0.02, "slack": 0.5, "weight": 0.8}


def engine_recipe(method: str, root: Path) -> str:
    """A recipe for `method` over the family in `root`, with every declared parameter set."""
    m = METHODS[method]
    roles = ["language"] if method in ONE_MODEL else ["language", "task"]
    data = {
        "method": method,
        "languages": ["bo"],
        "license": "mit",
        "models": [
            {"model": str(root / r), "role": r, **{k: v for k, v in ENGINE_MODEL_PARAMS.items() if k in m.model_params}}
            for r in roles
        ],
    }
    if m.takes_base:
        data["base"] = str(root / "base")
    if m.random:
        data["parameters"] = {"seed": 3}
    if method == "layer_swap":  # one layer here: the task expert's, the rest the language expert's
        data["parameters"] = {"bottom": 0, "top": 0}
    return yaml.safe_dump(data)
