"""The miniature experiment's reduced version (examples/miniature/run.py --preset test):
trains tiny models, merges them with `lrmerge merge`, evaluates them with `lrmerge eval`
(lm-eval, hf backend). Asserts only what must hold for the experiment to mean anything,
never which method wins."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_reduced_miniature_preconditions(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [
            sys.executable,
            "examples/miniature/run.py",
            "--preset",
            "test",
            "--models",
            str(tmp_path / "models"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=1800)
    finally:  # its training workers and lm-eval processes too, whatever happened
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    by_model = {r["model"]: r for r in data["records"]}  # one seed, one CT length

    # the language model models its language better than the base does
    assert by_model["language model"]["lr_ppl"] < by_model["base"]["lr_ppl"]
    # the task model answers English questions well above chance
    chance = data["meta"]["chance"]
    assert 0 < chance < 0.3
    assert by_model["task model"]["en_acc"] > max(0.6, 3 * chance)

    # every merge was made, loads, and was evaluated
    merges = [r for r in data["records"] if r.get("method")]
    assert sorted(r["model"] for r in merges) == sorted(m[0] for m in data["meta"]["methods"])
    for r in merges:
        merged = tmp_path / "models" / r["folder"]
        report = json.loads((merged / "merge_report.json").read_text())
        assert report["method"] == r["method"]
        assert [m["model"] for m in report["models"]] == [f"lm-{r['ct']}x", "task"]
        assert report["vocab"]["output_rows"] > report["vocab"]["base_rows"]  # the LM's extended vocabulary
        assert list(merged.glob("eval/*/results_*.json")), f"{merged.name} has no lm-eval results"
        assert all(math.isfinite(r[k]) for k in ("lr_acc", "en_acc", "lr_ppl"))
        if r["method"] != "task_arithmetic":
            assert 0 < r["task_retention"] <= 1
    assert (out / "results.md").read_text().count("| slack_ties s=1 |") == 4  # one row per table
