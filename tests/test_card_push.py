"""`lrmerge card --push`: one commit with README.md and .eval_results/ only, against the test Hub.

The CLI runs as a subprocess pointed (HF_ENDPOINT) at a test Hub of this module's own, on its
own port: the session-wide server of tests/hub_support.py belongs to the Hub tests, and a
second fixture instance of it would try to bind the same port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from lrmerge_hub.card import write_card
from tests.card_support import lm_eval_results, make_merged_folder, write_results
from tests.hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO = "alice/bo-merge"
TOKEN = "hf_CardTestTokenNeverPrinted0123456789"


@pytest.fixture
def hub(tmp_path):
    """A test Hub with user `alice` (token TOKEN) on a free port of 127.0.0.1."""
    server = HubServer(port=0).start()
    server.add_token(TOKEN, "alice")
    yield server
    server.stop()


def lrmerge_card(hub: HubServer, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `python -m lrmerge_hub card FOLDER ARGS` against `hub`, with a fresh HF home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(folder.parent / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", PYTHONPATH=str(REPO_ROOT), NO_PROXY="127.0.0.1,localhost")
    return subprocess.run([sys.executable, "-m", "lrmerge_hub", "card", str(folder), *args],
                          env=env, capture_output=True, text=True, timeout=120, cwd=folder.parent)


@pytest.mark.slow
def test_push_updates_only_the_card_in_one_commit(hub, tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    (folder / "model.safetensors").write_bytes(b"weights")
    write_results(folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.30}, date=1795577400.0))
    write_card(folder, repo_id=REPO)
    seeded = hub.seed(REPO, folder)
    # someone edits the card on the Hub: a metadata key and a note below the generated block
    hub_card = ModelCard(hub.files(REPO)["README.md"].decode())
    hub_card.data["datasets"] = ["facebook/belebele"]
    hub_card.text += "\n## Contact\n\nOpen a discussion on the Hub.\n"
    edited = hub.commit_files(REPO, {"README.md": str(hub_card).encode()}, message="Edit card")
    before = hub.files(REPO)

    write_results(folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.42}, date=1795581000.0),
                  under="later", stamp="2026-11-25T04-30-00.000000")
    result = lrmerge_card(hub, folder, "--push", REPO, "--token", TOKEN, "--format", "json")
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert json.loads(result.stdout)["files"] == ["README.md", ".eval_results/belebele_bod_Tibt.yaml"]

    repo = hub.repos[REPO]
    head = repo.branches["main"]
    assert repo.commits[head].parent == edited and edited != seeded  # one commit, on top of what was read
    after = hub.files(REPO)
    assert {p for p in after if before.get(p) != after[p]} == {"README.md", ".eval_results/belebele_bod_Tibt.yaml"}
    assert after["model.safetensors"] == b"weights"

    pushed = after["README.md"].decode()
    meta = ModelCard(pushed).data.to_dict()
    assert meta["datasets"] == ["facebook/belebele"]  # the Hub-side edit is kept
    assert "Open a discussion on the Hub." in pushed
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.42
    assert b"value: 0.42" in after[".eval_results/belebele_bod_Tibt.yaml"]
    assert (folder / "README.md").read_text() == pushed  # the local card matches the Hub's
    assert TOKEN not in pushed


@pytest.mark.slow
def test_push_refusals_are_one_line_errors_that_leave_the_hub_alone(hub, tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    (folder / "model.safetensors").write_bytes(b"weights")
    head = hub.seed(REPO, folder)

    result = lrmerge_card(hub, folder, "--push", "alice/nowhere", "--token", TOKEN)
    assert result.returncode == 2
    assert result.stderr.startswith("Error: --push: alice/nowhere was not found on the Hub")

    hub.fail("POST", r"/commit/", status=412)  # someone pushed between our read and our commit
    result = lrmerge_card(hub, folder, "--push", REPO, "--token", TOKEN)
    assert result.returncode == 2
    assert result.stderr.startswith(f"Error: --push: {REPO} changed while the card was being pushed")

    bad = "hf_NotAValidTokenAtAll0123456789abcd"
    result = lrmerge_card(hub, folder, "--push", REPO, "--token", bad)
    assert result.returncode == 2 and result.stderr.startswith("Error: --push:")
    for output in (result.stdout, result.stderr):
        assert TOKEN not in output and bad not in output
    assert len(result.stderr.strip().splitlines()) == 1
    assert hub.repos[REPO].branches["main"] == head
    assert not (folder / "README.md").exists()
