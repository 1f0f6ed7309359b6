"""Shared fixtures. Environment first: huggingface_hub reads HF_ENDPOINT and HF_HOME at import."""

# --- test Hub (hub helper): set before anything imports huggingface_hub (transformers does too) ---
import atexit, os, shutil, socket, tempfile  # noqa: E401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HF_HOME = tempfile.mkdtemp(prefix="lrmerge-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{_free_port()}"  # tests/hub_support.py serves it
os.environ["HF_HOME"] = _HF_HOME  # never touch the real cache or token file
os.environ.update(HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
os.environ["NO_PROXY"] = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1,localhost"]))
for _var in (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_OIDC_RESOURCE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_TOKEN_PATH",
):
    os.environ.pop(_var, None)
# --- end test Hub ---

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lrmerge_hub.synth.tiny import make_family  # noqa: E402
from tests.hub_support import hub_server, hub_session  # noqa: E402, F401 (fixtures for every module)
from tests.real_model import smollm2  # noqa: E402, F401 (the real model, for slow tests)


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
