"""The miniature experiment's reduced version (examples/miniature/run.py --design v2 --preset
test: world b, the second design's code paths, a smaller model): trains tiny models, merges
them with `lrmerge merge`, evaluates them with `lrmerge eval` (lm-eval, hf backend). Asserts
only what must hold for the experiment to mean anything, never which method wins."""

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
            "--design",
            "v2",
            "--preset",
            "test",
            "--models",
            str(tmp_path / "models"),
            "--out",
            str(out),
            "--all-arms",  # the merges' code paths, whatever this small model's precondition says
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
    assert "layer_swap" in {r["method"] for r in merges}
    for r in merges:
        assert r["world"] == "b"
        merged = tmp_path / "models" / r["folder"]
        report = json.loads((merged / "merge_report.json").read_text())
        assert report["method"] == r["method"]
        assert [m["model"] for m in report["models"]] == [f"lm-{r['ct']}x", "task"]
        assert list(merged.glob("eval/*/results_*.json")), f"{merged.name} has no lm-eval results"
        assert all(math.isfinite(r[k]) for k in ("lr_acc", "en_acc", "lr_ppl"))
        if r["method"] != "layer_swap":  # the sign-electing merges report the task model's retention
            assert report["vocab"]["output_rows"] > report["vocab"]["base_rows"]  # the LM's extended vocabulary
            assert 0 < r["task_retention"] <= 1
    results_md = (out / "results.md").read_text()
    assert results_md.count("| slack_ties s=1 |") == 4  # one row per table
    assert "Precondition (stated in advance)" in results_md


def test_first_design_texts_unchanged():
    """The first design's world, corpora, questions and vocabulary are the same bits as when
    its results were made (the second design's options default to it)."""
    import hashlib
    import random

    sys.path.insert(0, str(REPO / "examples" / "miniature"))
    try:
        import world as W
    finally:
        sys.path.remove(str(REPO / "examples" / "miniature"))
    w = W.make_world(0)
    rng = random.Random(0)
    docs = W.corpus(w, rng, "lr", 50) + W.corpus(w, rng, "en", 50)
    its = W.items(w, rng, 20)
    text = "\n".join(docs + [W.prompt(w, it, "lr") for it in its] + W.base_vocab(w) + W.lr_words(w))
    assert (
        hashlib.sha256(text.encode()).hexdigest() == "458d8d6d1a542a73a39ac54a70e8c4ca3899286e11a2088837224bf5b72e7358"
    )


def test_second_design_worlds_share_facts_and_order():
    """Worlds of one seed share names and facts; world a's LR is English word for word."""
    import random

    sys.path.insert(0, str(REPO / "examples" / "miniature"))
    try:
        import world as W
    finally:
        sys.path.remove(str(REPO / "examples" / "miniature"))
    sov, svo = W.make_world(3), W.make_world(3, order="svo")
    assert (sov.names, sov.facts) == (svo.names, svo.facts)
    item = W.sample_item(svo, random.Random(1))
    en, lr = W.passage(svo, item, "en").split(), W.passage(svo, item, "lr").split()
    assert len(en) == len(lr)
    for e, f in zip(en, lr, strict=True):
        assert f == (svo.lexicon[e] if e in svo.lexicon else e)  # names and punctuation shared
    assert not set(svo.lexicon.values()) & set(W.english_words())  # a disjoint lexicon
    doc = W.parallel_document(svo, item, with_dialogue=False)
    assert doc.split() == [
        w for f in item.facts for s in (W.statement(svo, f, "en"), W.statement(svo, f, "lr")) for w in s.split()
    ]


def test_second_design_stops_before_the_merges_unless_the_precondition_holds():
    """Fixed in advance: the merges run only when CT-then-SFT reaches 3x chance in world a or b."""
    import importlib

    sys.path.insert(0, str(REPO / "examples" / "miniature"))
    try:
        run = importlib.import_module("run")
    finally:
        sys.path.remove(str(REPO / "examples" / "miniature"))

    def records(a: float, b: float, c: float) -> list[dict]:
        return [
            {"world": w, "seed": 0, "model": "CT-then-SFT", "ct": ct, "lr_acc": acc - (ct == 1) * 0.01}
            for w, acc in (("a", a), ("b", b), ("c", c))
            for ct in (1, 4)
        ]

    assert not run.precondition_holds(records(0.44, 0.30, 0.90), 0.15)  # world c never counts
    assert run.precondition_holds(records(0.44, 0.46, 0.0), 0.15)  # 0.46 >= 3 x 0.15 in world b, CT 4x
    text = run.precondition(records(0.39, 0.30, 0.2), 0.15)
    assert "world a: best CT-then-SFT LR accuracy 0.390 (CT 4x of 1x, 4x): does not hold" in text
    assert "the run stops there (no merges" in text
    merged = records(0.39, 0.30, 0.2) + [{"world": "a", "seed": 0, "model": "ties", "ct": 1, "method": "ties"}]
    assert "the merges are not evidence" in run.precondition(merged, 0.15)
