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
for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
             "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
    os.environ.pop(_var, None)
# --- end test Hub ---
