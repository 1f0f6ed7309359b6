"""Every bad input: one-line error naming the problem, exit code 2, nothing written."""

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lrmerge_hub.cli import main

GOOD = """
method: slack_ties
base: ./models/base
models:
  - {model: ./models/language, role: language, density: 0.2}
  - {model: ./models/task, role: task, density: 0.2, slack: 0.5}
output: ./merged
"""


def lrmerge(*args):
    result = CliRunner().invoke(main, list(args))
    # stderr may hold a cleared progress bar before the error; the error is its last line
    last = result.stderr.strip().replace("\r", "\n").splitlines()[-1:] if result.stderr.strip() else []
    return result.exit_code, result.stdout + "\n".join(last)


def assert_clean_error(tmp_path: Path, recipe: Path, *needles: str, extra=()):
    code, output = lrmerge("merge", str(recipe), *extra)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "merged").exists()
    assert not list(tmp_path.glob(".merged*"))
    return lines[0]


@pytest.fixture
def models(family):
    return family()


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


def test_good_recipe_merges(tmp_path, models, write_recipe):
    code, output = lrmerge("merge", str(write_recipe(GOOD)), "--format", "json")
    assert code == 0, output
    assert json.loads(output)["stats"]["tensors"] == 21


def test_dry_run_writes_nothing(tmp_path, models, write_recipe):
    code, output = lrmerge("merge", str(write_recipe(GOOD)), "--dry-run")
    assert code == 0 and "plan: slack_ties of 21 tensors" in output
    assert not (tmp_path / "merged").exists()


def test_dry_run_plans_when_the_output_exists(tmp_path, models, write_recipe):
    """A dry run writes nothing, so an existing output does not stop it: it plans and says
    the output is there (a real merge still needs --overwrite); `run --dry-run` says so too."""
    recipe = write_recipe(GOOD)
    assert lrmerge("merge", str(recipe))[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()}
    code, output = lrmerge("merge", str(recipe), "--dry-run")
    assert code == 0, output
    assert "plan: slack_ties of 21 tensors" in output
    assert "already exists: a merge replaces it only with --overwrite" in output
    code, output = lrmerge("merge", str(recipe), "--dry-run", "--format", "json")
    assert code == 0 and json.loads(output)["output_exists"] is True
    assert lrmerge("merge", str(recipe))[0] == 2  # the real merge still refuses
    code, output = lrmerge("run", str(recipe), "--dry-run")
    assert code == 0 and "merge: would run" in output and "already exists" in output
    assert {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()} == before
    assert not list(tmp_path.glob(".merged*")) and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "text,needles",
    [
        (GOOD.replace("slack_ties", "tie"), ["method", "'tie'", "slack_ties"]),
        (GOOD.replace("density: 0.2}", "density: 0.2, densty: 1}", 1), ["models[0]", "'densty'"]),
        (GOOD.replace("density: 0.2}", "density: 0}", 1), ["models[0].density", "> 0.0"]),
        (GOOD.replace("density: 0.2}", "density: 1.5}", 1), ["models[0].density", "<= 1.0"]),
        (GOOD.replace("slack: 0.5", "slack: -1"), ["models[1].slack", ">= 0.0"]),
        (GOOD + "parameters: {lambda: 1, normalise: true}\n", ["'normalise'"]),
        (GOOD + "outptu: x\n", ["'outptu'"]),
        (GOOD.replace("method: slack_ties", "method: sce"), ["'density'", "method 'sce'"]),  # ties takes a slack now
        (GOOD.replace("role: language", "role: lang"), ["models[0].role", "language, task"]),
        (GOOD.replace("./models/base", "./models/nowhere"), ["base", "does not exist"]),
        (GOOD + "dtype: int8\n", ["dtype", "bfloat16"]),
        ("method: ties\n  bad: [", ["not valid YAML"]),
        (GOOD.replace("base: ./models/base\n", ""), ["base", "required"]),
    ],
)
def test_recipe_mistakes(tmp_path, models, write_recipe, text, needles):
    assert_clean_error(tmp_path, write_recipe(text), *needles)


def test_output_inside_input(tmp_path, models, write_recipe):
    recipe = write_recipe(GOOD.replace("output: ./merged", "output: ./models/task/merged"))
    code, output = lrmerge("merge", str(recipe))
    assert code == 2 and "inside the input folder" in output
    assert not (tmp_path / "models/task/merged").exists()


def test_existing_output_needs_overwrite(tmp_path, models, write_recipe):
    (tmp_path / "merged").mkdir()
    code, output = lrmerge("merge", str(write_recipe(GOOD)))
    assert code == 2 and "--overwrite" in output
    assert list((tmp_path / "merged").iterdir()) == []


def test_pickle_only_weights_refused(tmp_path, models, write_recipe):
    task = models["task"]
    for f in task.glob("*.safetensors"):
        f.unlink()
    (task / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert_clean_error(tmp_path, write_recipe(GOOD), "pickle", "never unpickles")


def test_truncated_safetensors(tmp_path, models, write_recipe):
    shard = first_shard(models["language"])
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_clean_error(tmp_path, write_recipe(GOOD), "truncated")


def test_corrupt_header(tmp_path, models, write_recipe):
    shard = first_shard(models["language"])
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"
    shard.write_bytes(bytes(data))
    assert_clean_error(tmp_path, write_recipe(GOOD), "corrupt")


def test_different_architectures(tmp_path, models, write_recipe):
    cfg_path = models["task"] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    cfg_path.write_text(json.dumps(cfg))
    assert_clean_error(tmp_path, write_recipe(GOOD), "architecture", "MistralForCausalLM")


def rewrite_tensors(folder: Path, change):
    shard = first_shard(folder)
    from safetensors.torch import load_file

    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard))


def test_different_shapes(tmp_path, models, write_recipe):
    rewrite_tensors(models["task"], lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(64, 64)))
    assert_clean_error(tmp_path, write_recipe(GOOD), "model.layers.0.mlp.up_proj.weight", "[64, 64]", "[128, 64]")


def test_missing_tensor(tmp_path, models, write_recipe):
    rewrite_tensors(models["task"], lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    assert_clean_error(tmp_path, write_recipe(GOOD), "model.layers.0.mlp.up_proj.weight", "missing")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_in_input(tmp_path, models, write_recipe, bad):
    def poison(t):
        t["model.layers.0.mlp.up_proj.weight"][3, 5] = bad

    rewrite_tensors(models["language"], poison)
    assert_clean_error(tmp_path, write_recipe(GOOD), "NaN or Inf", "model.layers.0.mlp.up_proj.weight")


def test_missing_recipe_file(tmp_path):
    code, output = lrmerge("merge", str(tmp_path / "nope.yaml"))
    assert code == 2 and output.startswith("Error: recipe: cannot read")


# -- parameters that would erase the model, and a merge that comes out all zeros ------------

PASSTHROUGH = """
method: passthrough
models:
  - {model: ./models/task, scale: SCALE}
output: ./merged
"""

KARCHER = """
method: karcher
base: ./models/base
models:
  - {model: ./models/language}
  - {model: ./models/task}
parameters: {tol: 1.0e+9}
output: ./merged
"""


@pytest.mark.parametrize(
    "text, needles",
    [
        (KARCHER, ["parameters.tol: must be <= 0.01"]),
        (PASSTHROUGH.replace("SCALE", "1.0e-300"), ["models[0].scale: must be at least 1.175e-38", "float32"]),
        (PASSTHROUGH.replace("SCALE", "1.0e+300"), ["models[0].scale: must be at most 3.403e+38", "float32"]),
        (PASSTHROUGH.replace("SCALE", "0"), ["models[0].scale: must not be 0 (that gives an all-zero model)"]),
    ],
)
def test_parameters_that_would_erase_the_model_are_refused_up_front(tmp_path, models, write_recipe, text, needles):
    line = assert_clean_error(tmp_path, write_recipe(text), *needles)
    assert "merging" not in line and "inputs' values" not in line


def test_a_merge_that_comes_out_all_zeros_is_refused(tmp_path, family, write_recipe):
    family(dtype="float16")  # a scale float32 holds, whose products float16 rounds to 0
    text = PASSTHROUGH.replace("SCALE", "1.0e-30")
    assert_clean_error(
        tmp_path,
        write_recipe(text),
        "every merged value is 0 although no input is all zeros",
        "tensor ",
        "models[0].scale = 1e-30",
        "nothing was written",
    )
    (tmp_path / "merged").mkdir()  # an existing output is left as it was with --overwrite too
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    code, output = lrmerge("merge", str(write_recipe(text)), "--overwrite")
    assert code == 2 and "every merged value is 0" in output
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["keep.txt"]


def test_a_scale_that_overflows_float32_is_named(tmp_path, models, write_recipe):
    assert_clean_error(
        tmp_path, write_recipe(PASSTHROUGH.replace("SCALE", "3.0e+38")), "most likely through models[0].scale = 3e+38"
    )
