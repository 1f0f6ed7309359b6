"""`lrmerge card --push`: one commit with README.md and .eval_results/ only, against the test Hub."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from lrmerge_hub.card.build import write_card
from lrmerge_hub.cli import main
from tests.card_support import lm_eval_results, make_merged_folder, write_results
from tests.hub_support import TOKEN

REPO = "alice/bo-merge"


def lrmerge_card(*args: str):
    return CliRunner().invoke(main, ["card", *args])


@pytest.mark.slow
def test_push_updates_only_the_card_in_one_commit(hub_server, tmp_path):  # noqa: F811
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    (folder / "model.safetensors").write_bytes(b"weights")
    write_results(folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.30}, date=1795577400.0))
    write_card(folder, repo_id=REPO)
    seeded = hub_server.seed(REPO, folder)
    # someone edits the card on the Hub: a metadata key and a note below the generated block
    hub_card = ModelCard(hub_server.files(REPO)["README.md"].decode())
    hub_card.data["datasets"] = ["facebook/belebele"]
    hub_card.text += "\n## Contact\n\nOpen a discussion on the Hub.\n"
    edited = hub_server.commit_files(REPO, {"README.md": str(hub_card).encode()}, message="Edit card")
    before = hub_server.files(REPO)

    write_results(
        folder,
        lm_eval_results("belebele_bod_Tibt", {"acc": 0.42}, date=1795581000.0),
        under="later",
        stamp="2026-11-25T04-30-00.000000",
    )
    result = lrmerge_card(str(folder), "--push", REPO, "--token", TOKEN, "--format", "json")
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    assert json.loads(result.output)["files"] == ["README.md", ".eval_results/belebele_bod_Tibt.yaml"]

    repo = hub_server.repos[REPO]
    head = repo.branches["main"]
    assert repo.commits[head].parent == edited and edited != seeded  # one commit, on top of what was read
    after = hub_server.files(REPO)
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
def test_push_refusals_are_one_line_errors_that_leave_the_hub_alone(hub_server, tmp_path):  # noqa: F811
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    (folder / "model.safetensors").write_bytes(b"weights")
    head = hub_server.seed(REPO, folder)

    result = lrmerge_card(str(folder), "--push", "alice/nowhere", "--token", TOKEN)
    assert result.exit_code == 2
    assert result.output.startswith("Error: --push: alice/nowhere was not found on the Hub")

    hub_server.fail("POST", r"/commit/", status=412)  # someone pushed between our read and our commit
    result = lrmerge_card(str(folder), "--push", REPO, "--token", TOKEN)
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: --push: {REPO} changed while the card was being pushed")

    bad = "hf_not-a-valid-token"
    result = lrmerge_card(str(folder), "--push", REPO, "--token", bad)
    assert result.exit_code == 2 and result.output.startswith("Error: --push:")
    assert TOKEN not in result.output and bad not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert hub_server.repos[REPO].branches["main"] == head
    assert not (folder / "README.md").exists()
