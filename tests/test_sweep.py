"""Sweep grid parsing, application and promotion (evaluation here is a stand-in scorer that
reads the merge report; the end-to-end sweep with real vLLM lives in the pipeline tests)."""

import json

import pytest
from click.testing import CliRunner

from lrmerge_hub.cli import main
from lrmerge_hub.errors import OutputError, RecipeError
from lrmerge_hub.merge.engine import local_sources
from lrmerge_hub.recipe.spec import load_recipe
from lrmerge_hub.run.sweep import apply_point, grid_points, parse_grid, run_sweep

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

    table = run_sweep(
        recipe,
        parse_grid(["slack=0,1,0.5"]),
        sources=local_sources(recipe),
        output=recipe.output,
        evaluate=task_retention,
        device="cpu",
        progress=False,
    )
    assert [p["point"]["slack"] for p in table["points"]] == [1, 0.5, 0]
    assert table["best"] == "slack1"
    promoted = json.loads((recipe.output / "merge_report.json").read_text())
    assert promoted["models"][1]["params"]["slack"] == 1
    assert json.loads((recipe.output / "sweep.json").read_text())["best"] == "slack1"
    assert len(list((recipe.output.parent / "merged.sweep").iterdir())) == 3


@pytest.mark.parametrize(
    "item,said",
    [
        ("slack=0,,1", "an empty value"),
        ("slack=0,1,", "an empty value"),
        ("slack=,", "an empty value"),
        ("slack=0,0.5,0", "the value 0 is given twice"),
    ],
)
def test_grid_values_are_never_silently_dropped_or_repeated(item, said):
    with pytest.raises(RecipeError, match=said):
        parse_grid([item])


def retention_scorer(calls):
    def score(folder):
        calls.append(folder.name)
        report = json.loads((folder / "merge_report.json").read_text())
        return [{"task": "retention", "metric": "acc", "value": report["models"][1]["retention"]["fraction"]}]

    return score


def test_sweep_replaces_an_existing_output_only_with_overwrite(family, write_recipe):
    family()
    recipe = load_recipe(write_recipe(RECIPE))
    recipe.output.mkdir()
    (recipe.output / "hand-made.txt").write_text("keep me")
    calls = []
    with pytest.raises(OutputError, match="--overwrite"):
        run_sweep(
            recipe,
            parse_grid(["slack=0,1"]),
            sources=local_sources(recipe),
            output=recipe.output,
            evaluate=retention_scorer(calls),
            device="cpu",
            progress=False,
        )
    assert (recipe.output / "hand-made.txt").read_text() == "keep me" and calls == []  # refused before any work
    table = run_sweep(
        recipe,
        parse_grid(["slack=0,1"]),
        sources=local_sources(recipe),
        output=recipe.output,
        evaluate=retention_scorer(calls),
        device="cpu",
        progress=False,
        overwrite=True,
    )
    assert not (recipe.output / "hand-made.txt").exists()
    assert json.loads((recipe.output / "sweep.json").read_text())["best"] == table["best"] == "slack1"
    assert not [p for p in recipe.output.parent.iterdir() if ".lrmerge-" in p.name]


def test_lrmerge_sweep_refuses_an_existing_output_before_any_work(family, write_recipe, tmp_path):
    family()
    recipe = write_recipe(RECIPE)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "hand-made.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["sweep", str(recipe), "--grid", "slack=0,1", "--backend", "hf"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("Error: output ") and "--overwrite" in result.stderr
    assert (tmp_path / "merged" / "hand-made.txt").read_text() == "keep me"
    assert not (tmp_path / "merged.sweep").exists()
    result = CliRunner().invoke(main, ["sweep", str(recipe), "--grid", "slack=0,,1", "--overwrite"])
    assert result.exit_code == 2 and "an empty value" in result.stderr and "Traceback" not in result.stderr


def test_points_evaluated_earlier_are_not_evaluated_again(family, write_recipe):
    family()
    recipe = load_recipe(write_recipe(RECIPE))
    spec = {"tasks": ["retention"], "limit": 10}
    calls = []

    def sweep(grid, evaluation=spec):
        return run_sweep(
            recipe,
            parse_grid([grid]),
            sources=local_sources(recipe),
            output=recipe.output,
            evaluate=retention_scorer(calls),
            device="cpu",
            progress=False,
            overwrite=True,
            evaluation=evaluation,
        )

    first = sweep("slack=0,1")
    assert sorted(calls) == ["slack0", "slack1"]
    again = sweep("slack=0,0.5,1")  # only the new point is merged and evaluated
    assert sorted(calls) == ["slack0", "slack0.5", "slack1"]
    assert {p["name"]: p["score"] for p in again["points"] if p["name"] != "slack0.5"} == {
        p["name"]: p["score"] for p in first["points"]
    }
    sweep("slack=0,1", evaluation={**spec, "limit": 20})  # another evaluation: scored again
    assert sorted(calls) == ["slack0", "slack0", "slack0.5", "slack1", "slack1"]
    assert not (recipe.output / "scores.json").exists()  # the points' bookkeeping stays in the sweep folder


def test_the_promoted_recipe_names_the_models_from_the_output_folder(family, write_recipe):
    family()
    recipe = load_recipe(write_recipe(RECIPE))
    run_sweep(
        recipe,
        parse_grid(["slack=0,1"]),
        sources=local_sources(recipe),
        output=recipe.output,
        evaluate=retention_scorer([]),
        device="cpu",
        progress=False,
    )
    copied = load_recipe(recipe.output / "recipe.yaml")  # read relative to the output folder
    assert [m.ref.path for m in copied.models] == [m.ref.path for m in recipe.models]
    assert copied.base.path == recipe.base.path and copied.models[1].params["slack"] == 1


def test_sweep_release_without_an_output_says_so(family, write_recipe):
    # the CLI checks this first; called directly, sweep_release used to fail with Path(None)'s TypeError
    from lrmerge_hub.run.sweep import sweep_release

    family()
    recipe = load_recipe(write_recipe(RECIPE.replace("output: ./merged\n", "")))
    with pytest.raises(RecipeError, match="names no output folder"):
        sweep_release(recipe, ["slack=0,1"], None, metric=None, device="cpu")
