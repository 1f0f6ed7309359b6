"""A Ray head on this machine for the tests and the sweep benchmark: `ray start --head` on
127.0.0.1 as a subprocess in its own process group (killed on exit), workers importing this
checkout.

Import this before anything imports ray: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it
is imported (0: bind to loopback only, Ray's own single-machine switch; it also refuses a
second node joining, which a real cluster does with `ray start --address HEAD:PORT`), and
RAY_AUTH_TOKEN (token authentication with a token of this run's own, not ~/.ray/auth_token).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(num_cpus: int, timeout: float = 120.0) -> Iterator[str]:
    """Yield the address (127.0.0.1:PORT) of a running Ray head with `num_cpus` CPUs."""
    import ray
    from ray._private.services import get_node_ip_address

    assert get_node_ip_address() == "127.0.0.1", "ray was imported before tests/ray_support.py"
    port = free_port()
    temp = tempfile.mkdtemp(prefix="lrmerge-ray-", dir="/tmp")  # short: Ray's socket paths
    head = subprocess.Popen(
        ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus",
         str(num_cpus), "--include-dashboard=false", "--disable-usage-stats", "--block", "--temp-dir", temp],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:  # up once a driver sees its node
            try:
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
                alive = [n for n in ray.nodes() if n["Alive"]]
                ray.shutdown()
                if alive:
                    break
            except (ConnectionError, RuntimeError):
                pass
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # SIGTERM takes Ray ~30 s; its workers exit with the raylet
        head.wait(30)
        shutil.rmtree(temp, ignore_errors=True)
