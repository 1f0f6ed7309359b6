"""The parity check: its tolerance rule, its reference (real transformers), where it is
recorded (card, .eval_results), and the one-line errors of bad input."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lrmerge_hub.serve import parity
from lrmerge_hub.card.build import write_card
from lrmerge_hub.errors import RecipeError
from lrmerge_hub.recipe.spec import load_recipe
from lrmerge_hub.synth.tiny import make_family
from tests.card_support import lm_eval_results, make_merged_folder

REPO_ROOT = Path(__file__).resolve().parent.parent


def ref(tokens, gaps):
    return parity.Reference(name="plain: 'x'", prompt_ids=[5, 6], tokens=list(tokens), gaps=list(gaps))


class Served:
    """A deterministic stand-in for a server's greedy continuation: the tolerance rule is pure
    logic over token lists, tested here without a model (the real server: slow tests)."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def __call__(self, ids, n):
        self.asked.append(tuple(ids))
        return list(self.table[tuple(ids)])[:n]


def test_identical_tokens_pass_with_one_request():
    served = Served({(5, 6): [1, 2, 3]})
    assert parity.compare(ref([1, 2, 3], [2.0, 2.0, 2.0]), served) == parity.Comparison(None, None, [])
    assert served.asked == [(5, 6)]


def test_a_flip_at_a_near_tie_is_checked_on_from_the_reference_token():
    # position 1 is a near-tie (gap 0.1): the server picked 9 instead of 2, which is allowed;
    # it is asked again from the reference's prefix and must then agree
    served = Served({(5, 6): [1, 9, 9], (5, 6, 1, 2): [3]})
    result = parity.compare(ref([1, 2, 3], [2.0, 0.1, 2.0]), served)
    assert result == parity.Comparison(None, None, [1])
    assert served.asked == [(5, 6), (5, 6, 1, 2)]


def test_a_difference_after_a_near_tie_is_still_caught():
    served = Served({(5, 6): [1, 9, 9], (5, 6, 1, 2): [4]})
    assert parity.compare(ref([1, 2, 3], [2.0, 0.1, 2.0]), served) == parity.Comparison(2, 4, [1])


def test_a_difference_where_the_reference_is_clear_fails_at_that_position():
    served = Served({(5, 6): [1, 2, 7]})
    assert parity.compare(ref([1, 2, 3], [2.0, 2.0, parity.NEAR_TIE]), served) == parity.Comparison(2, 7, [])
    short = Served({(5, 6): [1]})
    assert parity.compare(ref([1, 2, 3], [2.0, 0.0, 2.0]), short) == parity.Comparison(1, None, [])


def test_the_summary_says_what_ran():
    passed = parity.ParityResult(status="passed", prompts=4, chat=True, near_ties=1)
    assert passed.summary == (
        "served outputs checked against transformers: 4 prompts (chat-templated and plain), "
        "same greedy tokens for 16 tokens, except 1 near-tie(s) (top-2 logits within 0.5), "
        "checked on from transformers' token"
    )
    assert "plain only (no chat template)" in parity.ParityResult(status="passed", prompts=2).summary
    assert (
        parity.ParityResult(status="disabled").summary
        == "served outputs not checked against transformers (--no-parity-check)"
    )


def write_header_only(folder: Path, shape: list[int]) -> None:
    """A valid bf16 safetensors file of that shape whose data is a hole (a sparse file: nothing
    is written but the header, so a 70B-sized file costs no disk)."""
    size = 2 * shape[0] * shape[1]
    header = json.dumps({"w": {"dtype": "BF16", "shape": shape, "data_offsets": [0, size]}}).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)


def test_a_model_too_big_for_a_second_copy_is_skipped_with_the_reason(tmp_path):
    write_header_only(tmp_path, [8192, 8_544_000])  # 70B parameters: 280 GB in float32
    assert parity.float32_bytes(tmp_path) == 4 * 8192 * 8_544_000
    reason = parity.skip_reason(tmp_path)
    assert reason is not None and reason.startswith("the float32 reference needs 280.0 GB, more than half of the ")
    assert "not loaded twice" in reason
    write_header_only(tmp_path, [64, 64])
    assert parity.skip_reason(tmp_path) is None


@pytest.mark.slow  # three transformers processes
def test_the_reference_of_a_tiny_model_plain_only_without_a_chat_template(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the child process finds this copy of lrmerge_hub from any folder
    monkeypatch.delenv("PYTHONPATH", raising=False)
    paths = make_family(tmp_path, hidden=64, heads=2)  # base: no chat template; task: one
    base = parity.reference_tokens(paths["base"])
    assert [r.name for r in base] == [f"plain: {p!r}" for p in parity.PLAIN_PROMPTS]
    task = parity.reference_tokens(paths["task"])
    assert [r.name for r in task] == [f"chat: {p}" for p in parity.CHAT_PROMPTS] + [r.name for r in base]
    for r in base + task:
        assert len(r.tokens) == len(r.gaps) == parity.NEW_TOKENS and all(g >= 0 for g in r.gaps)
    # greedy from float32 on the CPU is deterministic: a second run gives the same tokens
    assert [r.tokens for r in parity.reference_tokens(paths["base"])] == [r.tokens for r in base]


@pytest.mark.slow  # a transformers process
def test_serve_refuses_a_folder_transformers_cannot_load_before_starting_vllm(tmp_path):
    pytest.importorskip("vllm")
    paths = make_family(tmp_path, hidden=64, heads=2)
    broken = paths["base"]
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated weights
    done = subprocess.run(
        [sys.executable, "-m", "lrmerge_hub", "serve", str(broken), "--port", "1", "--log-dir", str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=600,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0] == done.stderr.strip().splitlines()[-1]
    assert errors[0].startswith("Error: parity check: transformers cannot load base (")
    assert errors[0].endswith("fix the folder, or pass --no-parity-check to serve it unchecked")
    assert "Traceback" not in done.stderr and not (tmp_path / "logs").exists()  # vLLM never started


def test_the_recipe_can_turn_the_check_off_and_says_so(write_recipe, tmp_path):
    base = "method: linear\nmodels:\n  - {model: org/a, weight: 0.5}\n  - {model: org/b, weight: 0.5}\noutput: ./out\n"
    on = load_recipe(write_recipe(base + "eval: {tasks: [t]}\n"))
    assert on.eval.parity_check is True and "parity_check" not in on.to_dict()["eval"]
    off = load_recipe(write_recipe(base + "eval: {tasks: [t], parity_check: false}\n", "off.yaml"))
    assert off.eval.parity_check is False and off.to_dict()["eval"]["parity_check"] is False
    with pytest.raises(RecipeError, match="eval.parity_check: must be true or false"):
        load_recipe(write_recipe(base + "eval: {parity_check: maybe}\n", "bad.yaml"))


def test_the_card_and_eval_results_say_which_check_ran(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    results = lm_eval_results("belebele_bod_Tibt", {"acc": 0.41})
    check = parity.ParityResult(status="passed", prompts=4, chat=True)
    results["lrmerge"] = {"role": "merged", "backend": "server", "parity": check.to_json()}
    target = folder / "eval" / folder.name
    target.mkdir(parents=True)
    (target / "results_2026-11-25T03-30-00.json").write_text(json.dumps(results))
    write_card(folder)
    body = (folder / "README.md").read_text()
    assert f"Before scoring, {check.summary}." in body
    entries = yaml.safe_load((folder / ".eval_results" / "belebele_bod_Tibt.yaml").read_text())
    assert entries[0]["notes"].endswith(f"; {check.summary}")


class Silent:
    """An endpoint that lists a model and never answers a completion (a hung server)."""

    def __init__(self, name: str):
        import http.server
        import threading

        listing = json.dumps({"data": [{"id": name}]}).encode()
        self.release = threading.Event()
        release = self.release

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(listing)))
                self.end_headers()
                self.wfile.write(listing)

            def do_POST(self):  # noqa: N802
                release.wait(60)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.release.set()
        self.server.shutdown()


@pytest.mark.slow  # a transformers process for the reference
def test_eval_against_a_server_that_never_answers_stops_within_the_bound(tmp_path):
    import os
    import time

    model = make_family(tmp_path / "m", hidden=64, heads=2)["base"]
    silent = Silent(model.name)
    try:
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "lrmerge_hub",
                "eval",
                str(model),
                "--backend",
                "server",
                "--base-url",
                silent.base_url,
                "--tasks",
                "tiny_mc",
                "--out",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "LRMERGE_PARITY_TIMEOUT": "3"},
        )
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: parity check: base did not answer the prompt plain: {parity.PLAIN_PROMPTS[0]!r} within 3 s "
        "(TimeoutError); see the server's log, or raise LRMERGE_PARITY_TIMEOUT"
    )
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
    assert elapsed < 300
