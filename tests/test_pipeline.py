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

from lrmerge_hub.run import pipeline
from lrmerge_hub.cli import main
from lrmerge_hub.errors import LrmergeError
from lrmerge_hub.synth.tiny import make_family
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
    env = {
        **os.environ,
        "RECIPE": str(tmp_path / "{language}.yaml"),
        "LANGUAGE": "bo",
        "PUSH_REPO": "alice/tiny-{language}",
        "DRY_RUN": "false",
        "OUT_DIR": str(tmp_path / "out"),
        "GITHUB_STEP_SUMMARY": str(summary_md),
        "HF_OIDC_RESOURCE": "",
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", str(ROOT / ".github/scripts/release.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out/bo/run-summary.json").read_text())
    assert summary["steps"]["push"]["repo_id"] == "alice/tiny-bo"
    assert "README.md" in hub_server.files("alice/tiny-bo")
    text = summary_md.read_text()
    assert "| push | done |" in text and "retention" in text
    assert "Pushed: http" in text  # the commit URL
    assert TOKEN not in done.stdout + done.stderr + text


# -- the files decide, not the record; nothing replaced without --overwrite --------------------

LOCAL_RECIPE = """
method: slack_ties
base: ./models/base
models:
  - {model: ./models/language, role: language, density: 0.2}
  - {model: ./models/task, role: task, density: 0.2, slack: 0.5}
languages: [bo]
license: apache-2.0
output: ./merged
"""


def local_run(tmp_path, *extra):
    code, out, err = lrmerge("run", str(tmp_path / "recipe.yaml"), "--format", "json", *extra)
    return code, (json.loads(out) if code == 0 else None), err


@pytest.fixture
def local_recipe(tmp_path):
    make_family(tmp_path / "models")
    (tmp_path / "recipe.yaml").write_text(LOCAL_RECIPE)
    return tmp_path / "recipe.yaml"


def test_a_step_whose_files_were_removed_or_rewritten_runs_again(local_recipe, tmp_path):
    code, first, err = local_run(tmp_path)
    assert code == 0, err
    merged = tmp_path / "merged"
    shard = (merged / "model.safetensors").read_bytes()
    # `lrmerge merge --overwrite` of the same recipe: the same weights, no card any more
    code, _, err = lrmerge("merge", str(local_recipe), "--overwrite", "--format", "quiet")
    assert code == 0 and not (merged / "README.md").exists(), err
    code, second, err = local_run(tmp_path)
    assert code == 0, err
    steps = second["steps"]
    assert steps["merge"].get("reused") and (merged / "model.safetensors").read_bytes() == shard  # still its merge
    assert steps["card"]["status"] == "done" and not steps["card"].get("reused")  # made again
    assert (merged / "README.md").is_file()
    # a hand edit of the card: the card step runs again (keeping the hand-written text outside its block)
    (merged / "README.md").write_text((merged / "README.md").read_text() + "\nA note by hand.\n")
    code, third, err = local_run(tmp_path)
    assert code == 0 and not third["steps"]["card"].get("reused") and third["steps"]["merge"].get("reused"), err
    assert "A note by hand." in (merged / "README.md").read_text()
    code, fourth, err = local_run(tmp_path)  # nothing changed since: nothing runs
    assert code == 0 and all(s.get("reused") for s in fourth["steps"].values()), fourth
    state = json.loads((Path(first["run_dir"]) / "state.json").read_text())
    assert state["steps"]["merge"]["made"]["model.safetensors"]["sha256"]  # what the record holds


def test_run_replaces_only_its_own_output(local_recipe, tmp_path):
    merged = tmp_path / "merged"
    code, _, err = lrmerge("merge", str(local_recipe), "--format", "quiet")  # made by hand, not by this run
    assert code == 0, err
    (merged / "notes.txt").write_text("mine")
    code, _, err = local_run(tmp_path)
    assert code == 2 and err.strip().splitlines()[-1].startswith("Error: output ") and "--overwrite" in err, err
    assert len(err.strip().splitlines()) == 1 and (merged / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("state.json"))  # no work began
    code, summary, err = local_run(tmp_path, "--overwrite")
    assert code == 0 and not (merged / "notes.txt").exists() and summary["steps"]["merge"]["status"] == "done", err
    code, summary, err = local_run(tmp_path, "--force")  # its own output, unchanged: --force may remake it
    assert code == 0 and summary["steps"]["merge"]["status"] == "done" and not summary["steps"]["merge"].get("reused")
    # its own output changed by hand since (a different merge there): not replaced without --overwrite
    code, _, err = lrmerge("merge", str(local_recipe), "--out", str(merged), "--overwrite", "--format", "quiet")
    (merged / "config.json").write_text((merged / "config.json").read_text().replace("}", ', "x": 1}', 1))
    code, _, err = local_run(tmp_path, "--force")
    assert code == 2 and "--overwrite" in err and '"x": 1' in (merged / "config.json").read_text(), err


@pytest.mark.parametrize(
    "args,error",
    [
        (["--languages", "x..y,bo", "--push", "org/m-{language}"], "--languages: unknown ISO 639 code 'x..y'"),
        (["--languages", "bo,Tibetan", "--push", "org/m-{language}"], "--languages: unknown ISO 639 code 'Tibetan'"),
        (["--languages", "bo", "--push", "org/a..b-{language}"], "--push: 'org/a..b-bo' is not a Hub repo id"),
        (["--languages", "bo", "--push", "alice/ok name"], "--push: 'alice/ok name' is not a Hub repo id"),
        (["--languages", "bo", "--push", "org/m-{language}-" + "x" * 100], "--push: 'org/m-bo-x"),
    ],
    ids=["dots-code", "name-not-code", "dots-repo", "space", "too-long"],
)
def test_push_targets_and_languages_are_checked_before_any_work(tmp_path, args, error):
    make_family(tmp_path / "models")
    (tmp_path / "r-bo.yaml").write_text(LOCAL_RECIPE)
    code, out, err = lrmerge("run", str(tmp_path / "r-{language}.yaml"), *args)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and err.startswith(f"Error: {error}"), err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "runs").exists()


def test_a_push_template_is_filled_in_for_one_recipe(tmp_path):
    make_family(tmp_path / "models")
    (tmp_path / "r-bo.yaml").write_text(LOCAL_RECIPE)
    code, out, err = lrmerge(
        "run",
        str(tmp_path / "r-{language}.yaml"),
        "--languages",
        "bo",
        "--push",
        "org/m-{language}",
        "--dry-run",
        "--format",
        "json",
    )
    assert code == 0, err
    assert json.loads(out)["push"] == "org/m-bo"


def test_the_cards_reproduce_command_works_in_the_output_folder(local_recipe, tmp_path, monkeypatch):
    code, summary, err = local_run(tmp_path)
    assert code == 0, err
    merged = tmp_path / "merged"
    card = (merged / "README.md").read_text()
    assert "`lrmerge merge recipe.yaml --out DIR` in this folder" in card
    written = (merged / "recipe.yaml").read_text()
    assert "model: ../models/language" in written and "base: ../models/base" in written
    monkeypatch.chdir(merged)  # as a reader of the card would: in the model's folder
    code, _, err = lrmerge("merge", "recipe.yaml", "--out", "../again", "--format", "quiet")
    assert code == 0, err
    assert pipeline.tensor_sha256(tmp_path / "again") == pipeline.tensor_sha256(merged)
    # and the copy's recipe.yaml reads the same models from its own folder
    assert (tmp_path / "again" / "recipe.yaml").read_text() == written


def test_an_evaluation_whose_results_are_gone_is_planned_again(tmp_path):
    """The eval step's record names its result files: once they are removed (a merge with
    --overwrite drops eval/), the eval step and everything after it run again."""
    output = tmp_path / "merged"
    (output / "eval" / "merged").mkdir(parents=True)
    results = output / "eval" / "merged" / "results_1.json"
    results.write_text('{"results": {}}')
    (output / "README.md").write_text("card")
    state = pipeline.RunState(tmp_path / "run", "sha")
    for name, result in [
        ("pull", {"sources": {}}),
        ("merge", {}),
        ("eval", {"files": {"merged": str(results)}}),
        ("card", {"card": str(output / "README.md")}),
        ("push", {"skipped": "no target"}),
    ]:
        state.record(
            name,
            status="done",
            result=result,
            made=pipeline.fingerprint(output, pipeline.step_files(name, output, result)),
        )
    assert state.step("eval")["made"] == {
        "eval/merged/results_1.json": {
            "sha256": pipeline.file_sha256(results),
            "size": results.stat().st_size,
            "mtime_ns": results.stat().st_mtime_ns,
        }
    }
    assert pipeline.plan_steps(state, False, output) == [(s, "done") for s in pipeline.STEPS]
    results.write_text('{"results": {"x": 1}}')  # other bytes: not what the step wrote
    assert dict(pipeline.plan_steps(state, False, output)) == {
        "pull": "done",
        "merge": "done",
        "eval": "run",
        "card": "run",
        "push": "run",
    }
    results.unlink()
    assert dict(pipeline.plan_steps(state, False, output))["eval"] == "run"
