"""`lrmerge eval`: task selection, source discovery, result files; lm-eval's hf backend for real."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from lrmerge_hub.evaluate import lm_eval as evaluate
from lrmerge_hub.cli import main
from lrmerge_hub.errors import EvalError
from tests.serve_support import cli_env, make_models, merge_tiny, run_cli, write_tiny_task


def test_default_tasks_follow_the_languages():
    assert evaluate.select_tasks(None, ["bo"]) == ["belebele_bod_Tibt"]
    assert evaluate.select_tasks(None, ["ug"]) == ["global_piqa_parallel_cloze_uig_arab"]
    assert evaluate.select_tasks(None, ["mon", "bo", "bod"]) == ["belebele_khk_Cyrl", "belebele_bod_Tibt"]
    assert evaluate.select_tasks(None, ["ta"])[0] == "belebele_tam_Taml"
    assert evaluate.select_tasks("tiny_mc, other", ["bo"]) == ["tiny_mc", "other"]  # --tasks wins
    with pytest.raises(EvalError, match="pass --tasks"):
        evaluate.select_tasks(None, [])
    with pytest.raises(EvalError, match=r"no default tasks for languages \['xx'\]"):
        evaluate.select_tasks(None, ["xx"])


def test_default_tasks_exist_in_lm_eval():
    """Every default task name is one lm-eval 0.4.13 ships (a typo would fail only at run time)."""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    known = set()
    for path in root.rglob("*.yaml"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("task:"):
                known.add(line.split(":", 1)[1].strip().strip("'\""))
    wanted = {t for tasks in evaluate.LANGUAGE_TASKS.values() for t in tasks}
    assert wanted - known == set()


def test_redaction_and_summary():
    data = {
        "results": {
            "t": {
                "alias": "t",
                "acc,none": 0.5,
                "acc_stderr,none": 0.1,
                "sample_len": 4,
                "exact_match,strict-match": 0.25,
            }
        },
        "config": {"model_args": "pretrained=/home/u/runs/merged-bo,dtype=float32"},
    }
    red = evaluate.redact_paths(data, {"/home/u/runs/merged-bo": "merged-bo", "/home/u": "~"})
    assert red["config"]["model_args"] == "pretrained=merged-bo,dtype=float32"
    assert evaluate.summarize(data) == {"t": {"acc": 0.5, "exact_match (strict-match)": 0.25}}
    table = evaluate.format_table({"merged": {"t": {"acc": 0.5}}, "task": {"t": {"acc": 0.25}}})
    assert table.splitlines()[0].split() == ["task", "metric", "merged", "task"]
    assert table.splitlines()[2].split() == ["t", "acc", "0.5000", "0.2500"]


def test_sources_are_found_beside_the_merge_or_given(tmp_path):
    root = make_models(tmp_path / "models")
    merged = merge_tiny(root, "merged-bo")
    found = evaluate.source_models(merged, {})
    assert [(m.role, m.name) for m in found] == [("language", "language"), ("task", "task")]
    assert found[0].model == str((root / "language").resolve())
    moved = tmp_path / "elsewhere"
    merged.rename(moved)
    with pytest.raises(EvalError, match="pass --source language=PATH"):
        evaluate.source_models(moved, {})
    given = evaluate.source_models(moved, {"language": str(root / "language"), "task": str(root / "task")})
    assert sorted(m.role for m in given) == ["language", "task"]


def test_run_step_uses_the_recipes_eval_section(tmp_path):
    """evaluate_for_run (the `eval` step of `lrmerge run`) maps recipe models to roles."""
    root = make_models(tmp_path / "models")
    merged = merge_tiny(root, "merged-bo")
    recipe = SimpleNamespace(
        languages=["bo"],
        models=[
            SimpleNamespace(ref=SimpleNamespace(spec="./language"), role="language"),
            SimpleNamespace(ref=SimpleNamespace(spec="./task"), role="task"),
        ],
    )
    spec = SimpleNamespace(tasks=("tiny_mc",), limit=2, include_path=tmp_path / "missing", compare=True, backend="hf")
    with pytest.raises(EvalError, match="not a folder of task YAML"):
        evaluate.evaluate_for_run(merged, recipe, spec, sources={})


def test_missing_model_folder(tmp_path):
    r = run_cli(["eval", str(tmp_path / "nope"), "--tasks", "x"])
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.slow
def test_hf_backend_with_compare_writes_results_for_merge_and_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval logs go to ./.lrmerge/eval
    root = make_models(tmp_path / "models")
    merged = merge_tiny(root, "merged-bo")
    tasks = write_tiny_task(tmp_path / "tasks")
    result = CliRunner().invoke(
        main,
        [
            "eval",
            str(merged),
            "--backend",
            "hf",
            "--tasks",
            "tiny_mc",
            "--include-path",
            str(tasks),
            "--compare",
            "--limit",
            "4",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["backend"] == "hf" and set(out["files"]) == {"merged", "language", "task"}
    eval_dir = merged / "eval"
    merged_files = list((eval_dir / "merged-bo").glob("results_*.json"))
    lang_files = list((eval_dir / "sources" / "language").glob("results_*.json"))
    task_files = list((eval_dir / "sources" / "task").glob("results_*.json"))
    assert len(merged_files) == len(lang_files) == len(task_files) == 1
    for path, role in ((merged_files[0], "merged"), (lang_files[0], "language"), (task_files[0], "task")):
        data = json.loads(path.read_text())
        assert data["lrmerge"]["role"] == role and data["lrmerge"]["limit"] == 4
        assert 0.0 <= data["results"]["tiny_mc"]["acc,none"] <= 1.0
        assert data["n-samples"]["tiny_mc"]["effective"] == 4
        assert str(tmp_path) not in path.read_text()
    assert {s["role"] for s in out["scores"]} == {"merged", "language", "task"}
    assert not list(eval_dir.glob(".lm-eval-*"))  # scratch folders are gone
    from lrmerge_hub.card.build import write_card  # the card picks the results up from eval/

    card = write_card(merged).read_text()
    evaluation = card.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    assert "tiny_mc" in evaluation and "No evaluation results yet" not in evaluation
    assert "lm_eval run --model hf" in evaluation and str(tmp_path) not in card
    logs = list((tmp_path / ".lrmerge" / "eval").rglob("*.log"))
    assert len(logs) == 3 and all(log.read_text().startswith("$ ") for log in logs)


def test_several_models_take_no_compare_and_distinct_names(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = run_cli(["eval", a, b, "--tasks", "x", "--compare"])
    assert r.returncode == 2 and "take one MODEL (got 2)" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["eval", a, a, "--tasks", "x"])
    assert r.returncode == 2 and "both be served as 'a'" in r.stderr and "Traceback" not in r.stderr


def without_output_path(command: str) -> str:
    words = command.split()
    return " ".join(words[: words.index("--output_path")] + words[words.index("--output_path") + 2 :])


@pytest.mark.slow
def test_several_models_in_one_lm_eval_process_score_as_each_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_models(tmp_path / "models")
    merged, language = merge_tiny(root, "merged-bo"), root / "language"
    tasks = write_tiny_task(tmp_path / "tasks")
    common = ["--backend", "hf", "--tasks", "tiny_mc", "--include-path", str(tasks), "--limit", "4", "--format", "json"]
    together = CliRunner().invoke(main, ["eval", str(merged), str(language), *common])
    assert together.exit_code == 0, together.output
    out = json.loads(together.output)
    assert set(out["files"]) == set(out["summary"]) == {"merged-bo", "language"}
    assert Path(out["files"]["merged-bo"]).parent == merged / "eval" / "merged-bo"
    assert Path(out["files"]["language"]).parent == language / "eval" / "language"
    logs = sorted((tmp_path / ".lrmerge" / "eval").rglob("*.log"))
    assert len(logs) == 2 and all("in one Python process with 1 other model" in log.read_text() for log in logs)

    alone = CliRunner().invoke(main, ["eval", str(language), "--out", str(tmp_path / "alone"), *common])
    assert alone.exit_code == 0, alone.output
    one = json.loads(Path(json.loads(alone.output)["files"]["merged"]).read_text())
    two = json.loads(Path(out["files"]["language"]).read_text())
    assert one["results"] == two["results"] and one["n-samples"] == two["n-samples"]
    assert without_output_path(one["lrmerge"]["command"]) == without_output_path(two["lrmerge"]["command"])
    assert two["lrmerge"]["command"].startswith("lm_eval run --model hf --model_args pretrained=language,")


@pytest.mark.slow
def test_a_model_that_fails_stops_the_batch_and_keeps_the_results_before_it(tmp_path):
    root = make_models(tmp_path / "models")
    broken = tmp_path / "broken"
    shutil.copytree(root / "language", broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    tasks = write_tiny_task(tmp_path / "tasks")
    r = run_cli(
        [
            "eval",
            str(root / "task"),
            str(broken),
            str(root / "base"),
            "--backend",
            "hf",
            "--tasks",
            "tiny_mc",
            "--include-path",
            str(tasks),
            "--limit",
            "4",
        ]
    )
    assert r.returncode == 2 and "lm-eval exited with status 1" in r.stderr and "Traceback" not in r.stderr
    error = next(line for line in r.stderr.splitlines() if line.startswith("Error: "))  # progress lines come first
    log = Path(error.split("(log: ", 1)[1].split(")", 1)[0])
    assert log.name == "merged-broken.log" and "Traceback" in log.read_text()
    assert len(list((root / "task" / "eval" / "task").glob("results_*.json"))) == 1
    assert not (broken / "eval").exists() or not list((broken / "eval").rglob("results_*.json"))
    assert not (root / "base" / "eval").exists()  # the batch stopped at the failure
    assert not list(Path(log).parent.glob(".lm-eval-*"))  # scratch folders are gone


@pytest.mark.slow
def test_run_step_serves_the_merge_with_vllm_and_stops_it(tmp_path, monkeypatch):
    """The `eval` step of `lrmerge run` with the server backend: vLLM is started for the
    merged folder on a free port, lm-eval runs against it, and vLLM is gone afterwards."""
    from lrmerge_hub.recipe.spec import load_recipe

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))
    root = make_models(tmp_path / "models")
    merged = merge_tiny(root, "merged-bo")
    tasks = write_tiny_task(tmp_path / "tasks")
    recipe = load_recipe(root / "merged-bo.yaml")
    spec = SimpleNamespace(tasks=("tiny_mc",), limit=None, include_path=tasks, compare=False, backend="server")
    before = {p.name for p in Path("/proc").iterdir() if p.name.isdigit()}
    out = evaluate.evaluate_for_run(merged, recipe, spec, sources={})
    assert out["backend"] == "server" and out["tasks"] == ["tiny_mc"]
    assert [s["metric"] for s in out["scores"]] == ["acc"] and out["scores"][0]["model"] == "merged-bo"
    data = json.loads(open(out["files"]["merged"]).read())
    assert data["lrmerge"]["backend"] == "server" and "local-completions" in data["lrmerge"]["command"]
    logs = list((root / ".lrmerge" / "eval").rglob("vllm-merged-bo.log"))
    assert len(logs) == 1 and "--generation-config vllm" in logs[0].read_text().splitlines()[0]
    after = {p.name for p in Path("/proc").iterdir() if p.name.isdigit()}
    ours = []
    for pid in after - before:
        try:
            if "vllm" in open(f"/proc/{pid}/cmdline").read() and str(merged) in open(f"/proc/{pid}/cmdline").read():
                ours.append(int(pid))
        except OSError:
            pass
    assert ours == []  # no vLLM process for this model survived the step


def run_both_formats(args: list[str], cwd: Path) -> dict[str, tuple[int, str, str]]:
    """`lrmerge ARGS` in the human and the json format at once, progress every second:
    {format: (exit status, stdout, stderr)}."""
    env = cli_env({"LRMERGE_PROGRESS_INTERVAL": "1"})
    runs = {
        fmt: subprocess.Popen(
            [sys.executable, "-m", "lrmerge_hub", *args, "--format", fmt],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for fmt in ("human", "json")
    }
    out = {fmt: p.communicate(timeout=900) for fmt, p in runs.items()}
    return {fmt: (runs[fmt].returncode, *out[fmt]) for fmt in runs}


@pytest.mark.slow
def test_an_lm_eval_failure_says_its_cause_first_and_the_log_below(tmp_path):
    root = make_models(tmp_path / "models")
    tasks = write_tiny_task(tmp_path / "tasks")
    out = run_both_formats(
        [
            "eval",
            str(root / "task"),
            "--backend",
            "hf",
            "--tasks",
            "tiny_mcq",
            "--include-path",
            str(tasks),
            "--limit",
            "2",
        ],
        tmp_path,
    )
    status, stdout, stderr = out["human"]
    err = stderr.splitlines()
    error = next(i for i, line in enumerate(err) if line.startswith("Error: "))
    assert status == 2 and stdout == ""
    assert err[error].startswith("Error: lm-eval has no task named tiny_mcq: check the names in --tasks")
    assert "; lm-eval exited with status 1 (log: " in err[error]
    log = Path(err[error].split("(log: ", 1)[1].rstrip(")"))
    assert log.is_file() and log.name == "merged-task.log" and "\\n" not in err[error]
    assert err[error + 1] == "--- last lines of the log ---"
    assert err[-1] == "ValueError: Tasks not found: tiny_mcq" and "Traceback (most recent call last):" in err
    # before it: the command, then progress while lm-eval ran
    assert err[0].startswith("$ ") and " -m lm_eval run --model hf " in err[0]
    assert err[1] == f"lm-eval: evaluating task on tiny_mcq (log: {log}) ..."
    assert all(line.startswith("lm-eval: evaluating, ") for line in err[2:error]) and error > 2, err

    status, stdout, stderr = out["json"]
    assert status == 2 and stdout == ""
    assert stderr.startswith("Error: lm-eval has no task named tiny_mcq") and "lm-eval: evaluating" not in stderr


@pytest.mark.slow
def test_the_eval_step_of_run_shows_progress_and_json_stays_clean(tmp_path):
    root = make_models(tmp_path / "models")
    tasks = write_tiny_task(tmp_path / "tasks")
    for fmt in ("human", "json"):  # one output folder each: both run at once
        (root / f"{fmt}.yaml").write_text(
            "method: slack_ties\nbase: ./base\nmodels:\n  - {model: ./language, role: language, density: 0.3}\n"
            f"  - {{model: ./task, role: task, density: 0.3}}\nlanguages: [bo]\noutput: ./merged-{fmt}\n"
            f"eval: {{tasks: [tiny_mc], limit: 4, backend: hf, include_path: {tasks}}}\n"
        )
    env = cli_env({"LRMERGE_PROGRESS_INTERVAL": "1"})
    runs = {
        fmt: subprocess.Popen(
            [sys.executable, "-m", "lrmerge_hub", "run", str(root / f"{fmt}.yaml"), "--format", fmt],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for fmt in ("human", "json")
    }
    out = {fmt: (p.communicate(timeout=900), p.returncode) for fmt, p in runs.items()}
    out = {fmt: (code, *texts) for fmt, (texts, code) in out.items()}
    status, _, stderr = out["human"]
    err = stderr.splitlines()
    assert status == 0, stderr
    start = next(i for i, line in enumerate(err) if line.startswith("lm-eval: evaluating merged-human on tiny_mc"))
    done = next(i for i, line in enumerate(err) if line.startswith("eval: done in "))
    between = err[start + 1 : done]
    assert any(line.startswith("lm-eval: evaluating, ") for line in between), err
    assert between[-1].startswith("lm-eval: finished in ")

    status, stdout, stderr = out["json"]
    assert status == 0 and json.loads(stdout)["steps"]["eval"]["status"] == "done"
    assert "lm-eval:" not in stderr, stderr


def test_server_models_lists_only_entries_with_a_name(monkeypatch):
    listed = {"data": [{"id": "merged"}, {"object": "model"}, "junk"]}
    monkeypatch.setattr(evaluate, "http_json", lambda *a, **kw: listed)
    assert evaluate.server_models("http://127.0.0.1:1/v1", None) == ["merged"]


INDEX_ONCE = """
import sys
from pathlib import Path
from lm_eval.tasks import _index
from lrmerge_hub.evaluate import lm_eval_many

builds = []
real = _index.TaskIndex.build
_index.TaskIndex.build = staticmethod(lambda paths, **kw: builds.append(1) or real(paths, **kw))
lm_eval_many.index_once()
first = _index.TaskIndex.build([Path(sys.argv[1])])
first["tiny_ppl"].cfg["metadata"] = "changed by a job"
second = _index.TaskIndex.build(iter([Path(sys.argv[1])]))
assert len(builds) == 1, builds
assert list(first) == list(second) == ["tiny_ppl"], (first, second)
assert "metadata" not in second["tiny_ppl"].cfg, second
"""


def test_several_jobs_in_one_process_index_the_tasks_once(tmp_path):
    """lm_eval_many builds lm-eval's task index once per set of folders; each job gets its
    own copy, so what one job changes in it no other job sees."""
    (tmp_path / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\ndataset_path: json\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
    )
    proc = subprocess.run([sys.executable, "-c", INDEX_ONCE, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
