"""A merge never writes a broken model with exit code 0, and nothing is lost or half-written:
non-finite outputs, parameters float32 cannot hold, huge slacks, cancelling normalize divisors,
the output lock, a folder appearing mid-merge, stop signals, and one model spelled two ways."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from lrmerge_hub.cli import main
from lrmerge_hub.errors import OutputError, RecipeError
from lrmerge_hub.merge import kernels
from lrmerge_hub.merge.engine import local_sources, merge
from lrmerge_hub.merge.methods import METHODS
from lrmerge_hub.recipe.spec import load_recipe, parse_recipe

from test_methods import ref_ties

REPO_ROOT = Path(__file__).resolve().parents[1]

TIES = """
method: {method}
base: ./models/base
models:
  - {{model: ./models/language, role: language, weight: {w0}, density: 0.2}}
  - {{model: {task}, role: task, weight: {w1}, density: 0.3{slack}}}
parameters: {{lambda: {lam}, normalize: {normalize}}}
{extra}output: ./merged
"""


def recipe_text(
    method="slack_ties", w0=1.0, w1=1.0, lam=1.0, normalize="true", slack=0.5, task="./models/task", extra=""
):
    num = lambda x: yaml.safe_dump(x).splitlines()[0]  # noqa: E731 (1.0e+35: YAML reads 1e+35 as a string)
    return TIES.format(
        method=method,
        w0=num(w0),
        w1=num(w1),
        lam=num(lam),
        normalize=normalize,
        task=task,
        extra=extra,
        slack=f", slack: {num(slack)}" if method == "slack_ties" else "",
    )


def without_density(text: str) -> str:  # task_arithmetic has no density
    return text.replace(", density: 0.2", "").replace(", density: 0.3", "")


def lrmerge(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def leftovers(folder: Path) -> list[str]:
    """Temporary folders and lock files beside the output."""
    return sorted(p.name for p in folder.glob(".merged*"))


def assert_refused(tmp_path: Path, recipe: Path, *needles: str) -> str:
    code, lines = lrmerge("merge", str(recipe), "--device", "cpu", "--format", "quiet")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []
    return lines[0]


# --- a merge never writes a broken model with exit code 0 ------------------------------------


@pytest.mark.parametrize(
    "method,dtype",
    [
        ("slack_ties", "float32"),  # the fused kernels, float32 out
        ("slack_ties", "bfloat16"),  # the fused kernels, bfloat16 out
        ("task_arithmetic", "float32"),  # the torch path
    ],
)
def test_overflow_in_float32_is_refused_naming_tensor_and_parameter(tmp_path, family, write_recipe, method, dtype):
    family(dtype=dtype)
    text = recipe_text(method, w0=1e10, w1=1e10, lam=1e35, normalize="false")
    text = without_density(text).replace("normalize: false", "") if method == "task_arithmetic" else text
    line = assert_refused(tmp_path, write_recipe(text), "tensor ", "NaN or Inf", "parameters.lambda = 1e+35")
    assert "nothing was written" in line


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_float16_output_past_its_range_is_refused_naming_the_dtype(tmp_path, family, write_recipe, method):
    family()  # float32 inputs; deltas of about 0.02 times lambda 1e7 exceed float16's 65504
    text = recipe_text(method, lam=1e7, extra="dtype: float16\n")
    text = without_density(text).replace(", normalize: true", "") if method == "task_arithmetic" else text
    assert_refused(tmp_path, write_recipe(text), "NaN or Inf", "float16", "bfloat16 or float32")


def test_kernels_count_nonfinite_output():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(5000).astype(np.float32)
    task = base + np.float32(0.5)
    with pytest.raises(kernels.NonFiniteOutput) as e:
        kernels.fused_ties(base, [task], [1e30], [1.0], [0.0], 1e30, False, check_finite=True)
    assert e.value.count == 5000
    out, _, _ = kernels.fused_ties(base, [task], [1.0], [1.0], [0.0], 1.0, False, check_finite=True)
    assert np.isfinite(out).all()


@pytest.mark.parametrize(
    "change,needles",
    [
        (dict(lam=1e39), ["parameters.lambda", "float32"]),
        (dict(w0=1e300), ["models[0].weight", "float32"]),
        (dict(w1=-1e-50), ["models[1].weight", "0 or at least"]),
        (dict(slack=1e201), ["models[1].slack", "<= 1e+200"]),
    ],
)
def test_parameters_the_math_cannot_hold_are_refused(tmp_path, family, write_recipe, change, needles):
    family()
    assert_refused(tmp_path, write_recipe(recipe_text(**change)), *needles)


@pytest.mark.parametrize("densities", [[0.2, 0.3], [1.0, 0.1]])
def test_election_is_exact_with_slack_1e39(densities):
    """(1 + 1e39) * delta overflows float32 and 0 * Inf is NaN: the vote is float64, and
    language retention equals that of a float64 reference (ref_ties votes in float64)."""
    rng = np.random.default_rng(1)
    n = 300_000  # above kernels.MIN_FAST_NUMEL: the sampled selection runs too
    base = rng.standard_normal(n).astype(np.float32)
    models = [base + rng.standard_normal(n).astype(np.float32) * s for s in (0.05, 0.01)]
    weights, slacks = [1.0, 0.8], [0.0, 1e39]
    expected, ref_kept, ref_agreed = ref_ties(base, models, weights, densities, slacks, 1.0, True)
    assert ref_agreed[1] == ref_kept[1]  # the task model wins every sign conflict
    assert ref_agreed[0] < ref_kept[0]  # and the language model loses some

    out, kept, agreed = kernels.fused_ties(base, models, weights, densities, slacks, 1.0, True, check_finite=True)
    assert (kept, agreed) == (ref_kept, ref_agreed)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)

    mp = [{"weight": w, "density": d, "slack": s} for w, d, s in zip(weights, densities, slacks, strict=True)]
    result, stats = METHODS["slack_ties"].fn(
        torch.from_numpy(base), [torch.from_numpy(m) for m in models], mp, {"lambda": 1.0, "normalize": True}
    )
    assert stats.kept.tolist() == ref_kept and stats.agreed.tolist() == ref_agreed
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_slack_1e39_merges_end_to_end(tmp_path, family, write_recipe):
    family()
    code, lines = lrmerge("merge", str(write_recipe(recipe_text(slack=1e39))), "--device", "cpu", "--format", "json")
    assert code == 0, lines
    task = json.loads("\n".join(lines))["models"][1]["retention"]
    assert task["agreed"] == task["kept"] > 0


@pytest.mark.parametrize(
    "method,weights,normalize,refused",
    [
        ("linear", [1.0, -1.0], True, "sum to 0"),
        ("linear", [1.0, -0.999999999], True, "too close to 0"),
        ("linear", [0.0, 0.0], True, "sum to 0"),
        ("linear", [1.0, -0.5], True, None),  # extrapolation by 2x: allowed
        ("linear", [1.0, -1.0], False, None),
        ("ties", [1.0, -1.0], True, "where they agree"),
        ("ties", [1.0, -1.0], False, None),
        ("ties", [1.0, 0.5], True, None),
    ],
)
def test_normalize_by_weights_that_cancel_is_refused(tmp_path, method, weights, normalize, refused):
    data = {
        "method": method,
        "models": [{"model": f"org/m{i}", "weight": w} for i, w in enumerate(weights)],
        "parameters": {"normalize": normalize},
    }
    if method == "ties":
        data["base"] = "org/base"
    if refused:
        with pytest.raises(RecipeError, match=refused) as e:
            parse_recipe(data, tmp_path)
        assert str(e.value).startswith("parameters.normalize:") and "normalize: false" in str(e.value)
    else:
        parse_recipe(data, tmp_path)


def test_linear_with_cancelling_weights_refused_from_the_cli(tmp_path, family, write_recipe):
    family()
    text = (
        "method: linear\nmodels: [{model: ./models/language, weight: 1}, {model: ./models/task, weight: -1}]\n"
        "output: ./merged\n"
    )
    assert_refused(tmp_path, write_recipe(text), "parameters.normalize", "sum to 0")


# --- nothing is lost, nothing half-written ---------------------------------------------------

# The CLI with a merge held inside its first kernel call until the test creates the file
# $HOLD (it writes $HOLD.held when it gets there): the test acts while the merge runs. While
# held it loops in a parallel numba function, where a signal used to surface as a SystemError.
HELD_CLI = """
import os, sys, time, numba, numpy as np
from lrmerge_hub.merge import kernels

@numba.njit(parallel=True, nogil=True)
def spin(n):
    acc = np.zeros(16)
    for c in numba.prange(16):
        x = 0.0
        for j in range(n):
            x += np.sqrt(j + c + 1.0)
        acc[c] = x
    return acc.sum()

spin(10)  # compiled before the merge starts
real, hold = kernels.fused_ties, os.environ["HOLD"]

def held(*args, **kwargs):
    if not os.path.exists(hold):
        open(hold + ".held", "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(hold) and time.monotonic() < deadline:
            spin(100_000)
    return real(*args, **kwargs)

kernels.fused_ties = held
from lrmerge_hub.cli import main
main(sys.argv[1:], prog_name="lrmerge")
"""


def start_held_merge(recipe: Path, hold: Path) -> subprocess.Popen:
    """A merge of `recipe` from the CLI, held inside its first kernel call until `hold` exists."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD_CLI, "merge", str(recipe), "--device", "cpu", "--format", "quiet"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HOLD": str(hold)},
    )
    marker = Path(f"{hold}.held")
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the merge never reached its first kernel call"
        time.sleep(0.02)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_mid_merge_leaves_nothing_and_exits_128_plus_signal(tmp_path, family, write_recipe, sig):
    family(dtype="bfloat16")
    hold = tmp_path / "hold"
    proc = start_held_merge(write_recipe(recipe_text()), hold)
    assert (tmp_path / f".merged.lrmerge-tmp-{proc.pid}").is_dir() and (tmp_path / ".merged.lrmerge-lock").is_file()
    proc.send_signal(sig)  # inside a numba kernel
    time.sleep(0.2)
    hold.touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert err.strip() == f"Error: interrupted by {sig.name}; nothing half-written was left at the output path"
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_second_merge_to_the_same_output_is_refused_while_the_first_runs(tmp_path, family, write_recipe):
    family()
    recipe = write_recipe(recipe_text())
    hold = tmp_path / "hold"
    first = start_held_merge(recipe, hold)
    for extra in ([], ["--overwrite"]):
        second = subprocess.run(
            [sys.executable, "-m", "lrmerge_hub", "merge", str(recipe), "--device", "cpu", "--format", "quiet", *extra],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        )
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip() == (
            f"Error: output {tmp_path / 'merged'} is being written by another lrmerge "
            f"(pid {first.pid}); wait for it to finish or choose another output"
        )
    hold.touch()
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert (tmp_path / "merged" / "merge_report.json").is_file() and leftovers(tmp_path) == []


def test_a_folder_created_during_the_merge_is_kept_and_the_merge_fails(tmp_path, family, write_recipe):
    family()
    recipe = load_recipe(write_recipe(recipe_text()))
    calls = []

    def someone_else_writes(name: str) -> None:
        calls.append(name)
        if len(calls) == 3:
            recipe.output.mkdir()
            (recipe.output / "theirs.txt").write_text("keep me")

    with pytest.raises(OutputError, match="appeared while merging") as e:
        merge(recipe, local_sources(recipe), recipe.output, device="cpu", progress=False, on_tensor=someone_else_writes)
    assert e.value.exit_code == 2
    assert [p.name for p in recipe.output.iterdir()] == ["theirs.txt"]
    assert (recipe.output / "theirs.txt").read_text() == "keep me" and leftovers(tmp_path) == []
    merge(recipe, local_sources(recipe), recipe.output, device="cpu", progress=False, overwrite=True)
    assert (recipe.output / "merge_report.json").is_file() and not (recipe.output / "theirs.txt").exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_and_lock_of_dead_merges_are_cleaned(tmp_path, family, write_recipe):
    family()
    recipe = load_recipe(write_recipe(recipe_text()))
    dead, alive = dead_pid(), os.getppid()
    for pid in (dead, alive):
        stale = tmp_path / f".merged.lrmerge-tmp-{pid}"
        stale.mkdir()
        (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    (tmp_path / ".merged.lrmerge-lock").write_text(f"{dead}\n")  # left by a killed merge: no flock on it
    merge(recipe, local_sources(recipe), recipe.output, device="cpu", progress=False)
    assert (recipe.output / "merge_report.json").is_file()
    assert leftovers(tmp_path) == [f".merged.lrmerge-tmp-{alive}"]  # a live process's folder is its own


def test_an_output_set_aside_by_a_killed_merge_comes_back(tmp_path, family, write_recipe):
    family()
    recipe = load_recipe(write_recipe(recipe_text()))
    old = tmp_path / f".merged.lrmerge-old-{dead_pid()}"  # killed between its two renames
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="already exists"):
        merge(recipe, local_sources(recipe), recipe.output, device="cpu", progress=False)
    assert (recipe.output / "config.json").read_text() == "{}" and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "spelling", ["./models/../models/task", "./models/task/", "./models/./task", "ABSOLUTE", "./alias"]
)
def test_one_folder_spelled_two_ways_is_named_twice(tmp_path, family, write_recipe, spelling):
    family()
    (tmp_path / "alias").symlink_to(tmp_path / "models" / "task")
    spelling = str(tmp_path / "models" / "task") if spelling == "ABSOLUTE" else spelling
    text = f"method: ties\nbase: ./models/base\nmodels: [./models/language, ./models/task, '{spelling}']\n"
    with pytest.raises(
        RecipeError, match=r"models\[2\]\.model: .* is named twice in the recipe \(as './models/task'\)"
    ):
        load_recipe(write_recipe(text))


def test_the_base_spelled_again_is_named_twice(tmp_path, family, write_recipe):
    family()
    with pytest.raises(RecipeError, match="named twice"):
        load_recipe(write_recipe(recipe_text(task="./models/base/")))


@pytest.mark.parametrize("first,second", [("org/task", "org/task@main"), ("org/task@v1", "org/task@v1")])
def test_a_hub_id_at_one_revision_spelled_two_ways_is_named_twice(tmp_path, first, second):
    data = {"method": "ties", "base": "org/base", "models": [first, second]}
    with pytest.raises(RecipeError, match=r"models\[1\]\.model: .* named twice"):
        parse_recipe(data, tmp_path)


def test_a_branch_and_the_sha_it_points_to_are_named_twice(hub_server, family, tmp_path):
    from lrmerge_hub.hub import sources as hub_sources

    paths = family()
    hub_server.seed("org/base", paths["base"])
    sha = hub_server.seed("org/task", paths["task"])
    recipe = parse_recipe(
        {"method": "ties", "base": "org/base", "models": ["org/task@main", f"org/task@{sha}"]}, tmp_path
    )
    with pytest.raises(RecipeError, match=f"'org/task@{sha}' and 'org/task@main' are the same commit {sha[:12]}"):
        hub_sources.plan_recipe(recipe)


def test_a_sweep_point_with_cancelling_weights_is_refused_before_any_merge(tmp_path, family, write_recipe):
    from lrmerge_hub.run.sweep import apply_point

    family()
    recipe = load_recipe(write_recipe(recipe_text(method="ties", w0=1.0, w1=0.5)))
    apply_point(recipe, {"task.weight": -0.5})  # 1 and -0.5: no cancellation
    with pytest.raises(RecipeError, match=r"--grid task.weight=-1.0: parameters.normalize: .* sum to 0"):
        apply_point(recipe, {"task.weight": -1.0})
    with pytest.raises(RecipeError, match=r"--grid lambda: .*float32"):
        apply_point(recipe, {"lambda": 1e39})


@pytest.mark.parametrize(
    "value,problem",
    [(10**400, "finite number"), (10**39, "float32"), (-(10**39), "float32"), (3.0e38, None), (0, None)],
)
def test_whole_numbers_beyond_float_range_are_refused_not_raised(tmp_path, value, problem):
    data = {"method": "task_arithmetic", "base": "org/base", "models": [{"model": "org/a", "weight": value}]}
    if problem:
        with pytest.raises(RecipeError, match=rf"models\[0\]\.weight: .*{problem}"):
            parse_recipe(data, tmp_path)
    else:
        assert parse_recipe(data, tmp_path).models[0].params["weight"] == value
