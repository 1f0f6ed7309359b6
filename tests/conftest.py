"""Shared fixtures. Environment first: huggingface_hub reads HF_ENDPOINT and HF_HOME at import."""

import os
import tempfile

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="lrmerge-test-hf-home-")
os.environ.pop("HF_TOKEN", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lrmerge_hub.synth import make_family  # noqa: E402


@pytest.fixture
def family(tmp_path: Path):
    """Factory: tiny base/language/task checkpoints under tmp_path/<name>."""

    def make(name: str = "models", **kwargs):
        return make_family(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Factory: write a recipe YAML (text) into tmp_path and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
