"""`lrmerge run` end to end on tiny models: Hub sources and push against the test Hub, resume
after a failure in each step, idempotent re-runs, and the release workflow's command lines."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from lrmerge_hub import pipeline
from lrmerge_hub.cli import main
from lrmerge_hub.errors import LrmergeError
from lrmerge_hub.synth import make_family
from tests.hub_support import TOKEN

ROOT = Path(__file__).resolve().parent.parent

HUB_RECIPE = """
method: slack_ties
base: org/base
models:
  - {model: org/language@v2, role: language, density: 0.2}
  - {model: org/task@v1, role: task, density: 0.2, slack: 0.5}
languages: [bo]
license: apache-2.0
output: ./merged
push: {repo: alice/tiny-bo, tag: v1}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("tiny"), extend_language_vocab=8)


@pytest.fixture
def seeded(hub_server, tiny, monkeypatch):
    """base on main, language on branch v2, task tagged v1; a token that may push as alice."""
    shas = {"base": hub_server.seed("org/base", tiny["base"])}
    hub_server.create_repo("org/language")
    shas["language"] = hub_server.seed("org/language", tiny["language"], branch="v2")
    shas["task"] = hub_server.seed("org/task", tiny["task"])
    hub_server.tag("org/task", "v1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return shas


def lrmerge(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def run_json(recipe, *extra):
    code, out, err = lrmerge("run", str(recipe), "--format", "json", *extra)
    return code, (json.loads(out) if out.strip() else None), err


def test_run_pulls_merges_cards_and_pushes_once(seeded, hub_server, tmp_path, write_recipe):
    recipe = write_recipe(HUB_RECIPE)
    code, summary, err = run_json(recipe)
    assert code == 0, err
    steps = summary["steps"]
    assert set(steps) == {"pull", "merge", "eval", "card", "push"}
    assert steps["eval"]["status"] == "skipped"
    assert steps["pull"]["sources"]["base"]["revision"] == seeded["base"]
    repo = hub_server.repos["alice/tiny-bo"]
    files = hub_server.files("alice/tiny-bo")
    assert {"README.md", "merge_report.json", "recipe.yaml", "config.json"} <= set(files)
    assert not any(name.startswith(".lrmerge") for name in files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.language == ["bo"] and card.data.base_model_relation == "merge"
    assert json.loads(files["merge_report.json"])["models"][1]["revision"] == seeded["task"]
    assert repo.tags["v1"] == steps["push"]["commit"]
    commits = len(repo.commits)

    code, again, err = run_json(recipe)  # a finished recipe: nothing to do
    assert code == 0, err
    assert all(s.get("reused") for s in again["steps"].values())
    assert len(repo.commits) == commits
    assert TOKEN not in err + json.dumps(again)
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("failing", ["pull", "merge", "eval", "card", "push"])
def test_resume_after_a_failure_in_each_step(seeded, hub_server, write_recipe, monkeypatch, failing):
    recipe = write_recipe(HUB_RECIPE)
    real = pipeline.STEP_FUNCTIONS[failing]
    calls = {name: 0 for name in pipeline.STEPS}

    def counting(name, fn):
        def step(ctx):
            calls[name] += 1
            return fn(ctx)
        return step

    def broken(ctx):
        raise LrmergeError(f"injected failure in {failing}")

    for name in pipeline.STEPS:
        monkeypatch.setitem(pipeline.STEP_FUNCTIONS, name, counting(name, pipeline.STEP_FUNCTIONS[name]))
    monkeypatch.setitem(pipeline.STEP_FUNCTIONS, failing, counting(failing, broken))
    code, summary, err = run_json(recipe)
    assert code == 2 and f"injected failure in {failing}" in err
    assert summary["steps"][failing]["status"] == "failed"
    assert "alice/tiny-bo" not in hub_server.repos or not hub_server.repos["alice/tiny-bo"].tags

    monkeypatch.setitem(pipeline.STEP_FUNCTIONS, failing, counting(failing, real))
    code, summary, err = run_json(recipe)
    assert code == 0, err
    order = list(pipeline.STEPS)
    for name in order:
        before = order.index(name) < order.index(failing)
        assert calls[name] == (2 if name == failing else 1), name  # earlier: first run only; later: second
        assert summary["steps"][name].get("reused", False) == before, name
    assert len(hub_server.repos["alice/tiny-bo"].tags) == 1


def test_dry_run_and_force(seeded, hub_server, write_recipe):
    recipe = write_recipe(HUB_RECIPE)
    code, plan, _ = run_json(recipe, "--dry-run")
    assert code == 0 and [p["action"] for p in plan["plan"]] == ["run"] * 5
    assert not (recipe.parent / "merged").exists() and "alice/tiny-bo" not in hub_server.repos
    assert run_json(recipe)[0] == 0
    time.sleep(1.1)  # the forced merge's report gets a later created_at (whole seconds): new files
    code, forced, err = run_json(recipe, "--force")
    # everything runs again; the new merge report (timings) is a new commit, and tag v1 is
    # already taken by the first release: a clear one-line error, not a moved tag
    assert code == 2 and "tag 'v1' already exists" in err
    assert not any(s.get("reused") for name, s in forced["steps"].items() if name != "push")
    code, forced, err = run_json(recipe, "--force", "--push", "alice/tiny-bo-2")
    assert code == 0, err
    assert hub_server.repos["alice/tiny-bo-2"].tags["v1"] == forced["steps"]["push"]["commit"]


def test_release_script_runs_the_workflow_command_lines(seeded, hub_server, tmp_path):
    (tmp_path / "bo.yaml").write_text(HUB_RECIPE.replace("push: {repo: alice/tiny-bo, tag: v1}\n", ""))
    summary_md = tmp_path / "job-summary.md"
    env = {**os.environ, "RECIPE": str(tmp_path / "{language}.yaml"), "LANGUAGE": "bo",
           "PUSH_REPO": "alice/tiny-{language}", "DRY_RUN": "false", "OUT_DIR": str(tmp_path / "out"),
           "GITHUB_STEP_SUMMARY": str(summary_md), "HF_OIDC_RESOURCE": "", "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(ROOT / ".github/scripts/release.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out/bo/run-summary.json").read_text())
    assert summary["steps"]["push"]["repo_id"] == "alice/tiny-bo"
    assert "README.md" in hub_server.files("alice/tiny-bo")
    text = summary_md.read_text()
    assert "| push | done |" in text and "retention" in text
    assert "Pushed: http" in text  # the commit URL
    assert TOKEN not in done.stdout + done.stderr + text
