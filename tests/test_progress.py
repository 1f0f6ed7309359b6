"""Progress lines for long waits (progress.py): rewritten in place on a real terminal (a pty),
a plain line every interval elsewhere, and nothing unless the human format asked for it."""

from __future__ import annotations

import os
import select
import time

from lrmerge_hub import progress
from lrmerge_hub.evaluate.lm_eval import lm_eval_cause, lm_eval_failed
from lrmerge_hub.run.sweep import parse_grid, run_sweep


def tick_for(ticker: progress.Ticker, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ticker.tick()
        time.sleep(0.05)


def test_on_a_terminal_one_line_is_rewritten_with_the_logs_last_line(tmp_path):
    log = tmp_path / "vllm.log"
    log.write_text("$ python -m vllm...\nINFO Loading weights took 1.2 s\n")
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        ticker = progress.Ticker("vLLM for m: starting", log=log, stream=tty)
        assert ticker.on_tty
        tick_for(ticker, 1.3)
        ticker.close("vLLM for m: ready after 1 s")
    chunks = []
    while select.select([master], [], [], 1.0)[0]:  # a pty hands its output over in pieces
        try:
            chunks.append(os.read(master, 65536))
        except OSError:  # the terminal's other end is closed and drained
            break
    os.close(master)
    shown = b"".join(chunks).decode()
    updates = shown.split("\r\x1b[K")
    assert len(updates) >= 3  # two rewrites of the one line, then the line cleared for the last text
    assert updates[1].startswith("vLLM for m: starting, ") and updates[1].endswith(": INFO Loading weights took 1.2 s")
    assert "\n" not in "".join(updates[:-1])  # rewritten in place, never a new line meanwhile
    assert updates[-1] == "vLLM for m: ready after 1 s\r\n"


def test_elsewhere_a_line_every_interval(tmp_path):
    log = tmp_path / "lm-eval.log"
    log.write_text(
        "Running loglikelihood requests:  10%|#  | 1/10\rRunning loglikelihood requests:  50%|##### | 5/10\x1b[31m\r"
    )
    out = tmp_path / "stderr.txt"
    with open(out, "w") as stream:
        ticker = progress.Ticker("lm-eval: evaluating", log=log, stream=stream, every=0.3)
        assert not ticker.on_tty
        tick_for(ticker, 1.1)
        ticker.close()
    lines = out.read_text().splitlines()
    assert 1 <= len(lines) <= 4, lines  # at most one per 0.3 s (a busy machine may give fewer)
    for line in lines:  # lm-eval's own progress bar shows through, its escape written out
        assert line.startswith("lm-eval: evaluating, ")
        assert line.endswith(": Running loglikelihood requests:  50%|##### | 5/10\\x1b[31m")


def test_nothing_is_printed_unless_the_human_format_turned_it_on(tmp_path, capsys):
    log = tmp_path / "x.log"
    log.write_text("line\n")
    progress.show(False)
    ticker = progress.Ticker("lm-eval: evaluating", log=log, every=0)
    tick_for(ticker, 0.2)
    ticker.close("done")
    progress.note("Starting vLLM")
    assert capsys.readouterr().err == ""
    progress.show(True)
    try:
        ticker = progress.Ticker("lm-eval: evaluating", log=log, every=0)
        ticker.tick()
        progress.note("Starting vLLM")
    finally:
        progress.show(False)
    assert capsys.readouterr().err.splitlines() == ["lm-eval: evaluating, 0 s: line", "Starting vLLM"]


def test_lm_eval_failures_are_named_from_their_logs():
    # the last lines of real lm-eval 0.4.13 logs: a task name typo, Belebele offline, the server gone
    typo = (
        '  File ".../lm_eval/config/evaluate_config.py", line 477, in process_tasks\n'
        '    raise ValueError(f"Tasks not found: {missing}")\nValueError: Tasks not found: tiny_mcq\n'
    )
    assert lm_eval_cause(typo).startswith("lm-eval has no task named tiny_mcq: check the names in --tasks")
    offline = (
        "    raise ConnectionError(f\"Couldn't reach '{path}' on the Hub ({e.__class__.__name__})\") from e\n"
        "ConnectionError: Couldn't reach 'facebook/belebele' on the Hub (OfflineModeIsEnabled)\n"
    )
    assert lm_eval_cause(offline).startswith(
        "the data set facebook/belebele of a task could not be downloaded "
        "from the Hub (offline, or HF_HUB_OFFLINE is set)"
    )
    gone = (
        "requests.exceptions.ConnectionError: HTTPConnectionPool(host='127.0.0.1', port=9): Max retries "
        "exceeded with url: /v1/completions (Caused by NewConnectionError(\"HTTPConnection(host='127.0.0.1', "
        'port=9): Failed to establish a new connection: [Errno 111] Connection refused"))\n'
        "Requesting API:   0%|          | 0/4 [00:05<?, ?it/s]\n"
    )
    assert lm_eval_cause(gone).startswith("the server lm-eval was evaluating did not answer")
    assert lm_eval_cause("Traceback ...\nKeyError: 'acc'\n") == "lm-eval failed with KeyError: 'acc'"
    assert lm_eval_cause("killed\n") is None


def test_an_lm_eval_failure_is_one_line_with_the_log_below(tmp_path):
    log = tmp_path / "merged-m.log"
    log.write_text("$ python -m lm_eval run ...\nRunning loglikelihood requests:  40%\n")
    error = lm_eval_failed(-9, log)  # killed: nothing in the log says why
    assert str(error) == f"lm-eval exited with status -9 (log: {log})"
    assert error.detail.splitlines() == [
        "--- last lines of the log ---",
        "$ python -m lm_eval run ...",
        "Running loglikelihood requests:  40%",
    ]
    log.write_text("Traceback (most recent call last):\nValueError: Tasks not found: tiny_mcq\n")
    assert str(lm_eval_failed(1, log)).startswith("lm-eval has no task named tiny_mcq: ")
    assert str(lm_eval_failed(1, log)).endswith(f"; lm-eval exited with status 1 (log: {log})")


def test_each_sweep_point_says_when_its_evaluation_starts(family, write_recipe):
    from lrmerge_hub.merge.engine import local_sources
    from lrmerge_hub.recipe.spec import load_recipe

    family()
    recipe = load_recipe(
        write_recipe(
            "method: slack_ties\nbase: ./models/base\nmodels:\n  - {model: ./models/language, role: language, "
            "density: 0.3}\n  - {model: ./models/task, role: task, density: 0.3}\noutput: ./merged\n"
        )
    )
    lines: list[str] = []

    def evaluate(folder):
        lines.append(f"evaluated {folder.name}")
        return [{"task": "t", "metric": "acc", "value": 0.5}]

    run_sweep(
        recipe,
        parse_grid(["slack=0,1"]),
        sources=local_sources(recipe),
        output=recipe.output,
        evaluate=evaluate,
        device="cpu",
        progress=False,
        echo=lines.append,
    )
    assert lines == [
        "point 1 of 2, slack0: evaluating",
        "evaluated slack0",
        "slack0: acc=0.5",
        "point 2 of 2, slack1: evaluating",
        "evaluated slack1",
        "slack1: acc=0.5",
    ]
