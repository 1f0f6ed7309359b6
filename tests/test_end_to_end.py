"""The slow end-to-end paths with real lm-eval: a sweep that picks its best point (evaluated with
lm-eval's transformers backend: three vLLM start-ups would cost minutes on 2 cores; the
vLLM path is covered by the README job below and the serve/eval tests), and README's main-job
command from a clean checkout (a real model, SmolLM2-135M-Instruct, and two copies: merge,
vLLM-served evaluation and answer, card)."""

import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from click.testing import CliRunner

from lrmerge_hub.cli import main
from lrmerge_hub.synth.tiny import make_family, make_tiny_task

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SWEEP_RECIPE = """
method: slack_ties
base: ./models/base
models:
  - {model: ./models/language, role: language, density: 0.3}
  - {model: ./models/task, role: task, density: 0.3}
languages: [bo]
license: apache-2.0
output: ./best
eval: {tasks: [tiny_mc], include_path: ./tasks, limit: 6}
"""


def test_sweep_of_three_points_promotes_the_best(tmp_path):
    make_family(tmp_path / "models")
    make_tiny_task(tmp_path / "tasks")
    (tmp_path / "recipe.yaml").write_text(SWEEP_RECIPE)
    result = CliRunner().invoke(
        main, ["sweep", str(tmp_path / "recipe.yaml"), "--grid", "slack=0,0.5,4", "--backend", "hf", "--format", "json"]
    )
    assert result.exit_code == 0, result.stderr
    table = json.loads(result.stdout)
    points = table["points"]
    assert len(points) == 3 and table["metric"] == "acc"
    scores = [p["score"] for p in points]
    assert all(0 <= s <= 1 for s in scores) and scores == sorted(scores, reverse=True)
    best = tmp_path / "best"
    report = json.loads((best / "merge_report.json").read_text())
    assert report["models"][1]["params"]["slack"] == points[0]["point"]["slack"]
    # each point was really evaluated on its own merge: its results sit in its own folder
    for p in points:
        files = list((tmp_path / "best.sweep" / p["name"] / "eval").rglob("results_*.json"))
        assert len(files) == 1
        acc = json.loads(files[0].read_text())["results"]["tiny_mc"]["acc,none"]
        assert acc == pytest.approx(p["score"])
    card = (best / "README.md").read_text()
    assert "slack" in card and all(p["name"] in card for p in points)  # every point's score in the card
    assert json.loads((best / "sweep.json").read_text())["best"] == points[0]["name"]


def readme_main_job() -> str:
    block = re.search(r"## Set up.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [line for line in block.strip().splitlines() if line.strip()]
    assert len(commands) == 2, "README has exactly two set-up commands"
    assert commands[1].strip() == "python3 -m pytest -q"
    return commands[0]


def test_readme_main_job_from_a_clean_checkout(tmp_path):
    command = readme_main_job()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # A venv that sees the packages of the interpreter running the tests (a user's venv, the
    # system's, CI's), so the install step resolves offline and builds with the setuptools
    # README's install brought (torch requires >= 77); the package itself is installed from the
    # clone as README says. Not `system_site_packages`: inside a venv that is the base
    # interpreter's site-packages, not the venv's.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bin_dir = env_dir / "bin"
    (Path(sysconfig.get_path("purelib", "venv", vars={"base": str(env_dir)})) / "tests-runner.pth").write_text(
        "".join(f"{p}\n" for p in sys.path if Path(p).name in ("site-packages", "dist-packages"))
    )
    steps = [step.strip() for step in command.split("&&")]
    install = [shlex.split(step) for step in steps if step.startswith("python3 -m pip")]
    assert install[0][:4] == ["python3", "-m", "pip", "install"], steps
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(bin_dir / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            *install[0][4:],
        ],
        cwd=clone,
        check=True,
    )
    rest = " && ".join(step for step in steps if not step.startswith("python3 -m pip"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_TOKEN", "PYTHONPATH"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1")
    done = subprocess.run(["bash", "-c", rest], cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = clone / "examples/smollm2/merged"
    summary = done.stdout + done.stderr
    assert "push: skipped (the recipe names no push target)" in summary
    # the last word is the real merged model's own, served by vLLM: a readable, right answer
    answer = re.search(r"served answer to '(.*?)': '(.*)'", done.stdout)
    assert answer and "capital of France" in answer.group(1) and "Paris" in answer.group(2), done.stdout
    scores = re.search(r"tiny_capitals\s+acc\s+([01]\.\d+)", done.stdout)
    assert scores and float(scores.group(1)) >= 0.5, done.stdout  # chance is 0.25: SmolLM2 knows capitals
    assert (merged / "README.md").exists() and list((merged / "eval").rglob("results_*.json"))
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["method"] == "slack_ties" and report["stats"]["parameters"] == 134_515_008
