"""Sweep grid parsing, application and promotion (evaluation here is a stand-in scorer that
reads the merge report; the end-to-end sweep with real vLLM lives in the pipeline tests)."""

import json

import pytest

from lrmerge_hub.errors import RecipeError
from lrmerge_hub.merge.engine import local_sources
from lrmerge_hub.recipe import load_recipe
from lrmerge_hub.sweep import apply_point, grid_points, parse_grid, run_sweep

RECIPE = """
method: slack_ties
base: ./models/base
models:
  - {model: ./models/language, role: language, density: 0.2}
  - {model: ./models/task, role: task, density: 0.2}
output: ./merged
"""


def test_grid_parsing_and_points():
    grid = parse_grid(["slack=0,0.5,1", "lambda=0.8,1.0", "language.density=0.1"])
    assert grid == {"slack": [0, 0.5, 1], "lambda": [0.8, 1.0], "language.density": [0.1]}
    points = grid_points(grid)
    assert len(points) == 6 and points[0] == {"slack": 0, "lambda": 0.8, "language.density": 0.1}
    with pytest.raises(RecipeError, match="NAME=V1,V2"):
        parse_grid(["slack"])


def test_apply_point_targets_roles(family, write_recipe):
    family()
    recipe = load_recipe(write_recipe(RECIPE))
    r = apply_point(recipe, {"slack": 0.5, "lambda": 0.9, "language.density": 0.1, "weight": 0.7})
    lang, task = r.models
    assert task.params == {"weight": 0.7, "density": 0.2, "slack": 0.5}
    assert lang.params == {"weight": 0.7, "density": 0.1, "slack": 0.0}
    assert r.parameters["lambda"] == 0.9 and recipe.parameters["lambda"] == 1.0  # original untouched
    with pytest.raises(RecipeError, match="slack"):
        apply_point(recipe, {"slack": -1})
    with pytest.raises(RecipeError, match="not a parameter"):
        apply_point(recipe, {"temperature": 1})


def test_sweep_promotes_the_best_point(family, write_recipe):
    family()
    recipe = load_recipe(write_recipe(RECIPE))

    def task_retention(folder):  # a deterministic score: higher slack keeps more of the task model
        report = json.loads((folder / "merge_report.json").read_text())
        return [{"task": "retention", "metric": "acc", "value": report["models"][1]["retention"]["fraction"]}]

    table = run_sweep(recipe, parse_grid(["slack=0,1,0.5"]), sources=local_sources(recipe),
                      output=recipe.output, evaluate=task_retention, device="cpu", progress=False)
    assert [p["point"]["slack"] for p in table["points"]] == [1, 0.5, 0]
    assert table["best"] == "slack1"
    promoted = json.loads((recipe.output / "merge_report.json").read_text())
    assert promoted["models"][1]["params"]["slack"] == 1
    assert json.loads((recipe.output / "sweep.json").read_text())["best"] == "slack1"
    assert len(list((recipe.output.parent / "merged.sweep").iterdir())) == 3
