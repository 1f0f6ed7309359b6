"""A Ray cluster on this machine for the tests and the sweep benchmark: `ray start --head` on
127.0.0.1, and more nodes joining it with `ray start --address HEAD:PORT`, as on a real
cluster (every node is a subprocess in its own process group, killed on exit); workers
import this checkout.

Import this before anything imports ray: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it
is imported (0: bind to loopback only, Ray's own single-machine switch; `ray start --address`
refuses to run under it, so each joining node gets 1, with a loopback --node-ip-address of its
own, 127.0.0.2 and on), and RAY_AUTH_TOKEN (token authentication with a token of this run's
own, not ~/.ray/auth_token).
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
NODES: dict[str, list[subprocess.Popen]] = {}  # the `ray start` processes of each cluster, by head address


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_node_ids(address: str) -> set[str]:
    """The ids of the live nodes of the Ray cluster at `address`, seen by a driver."""
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()


@contextlib.contextmanager
def ray_cluster(cpus_per_node: tuple[int, ...], timeout: float = 120.0) -> Iterator[str]:
    """Yield the head's address (127.0.0.1:PORT) once a Ray cluster of one node per entry of
    `cpus_per_node` (that many CPUs each; the first is the head) is up."""
    from ray._private.services import get_node_ip_address

    assert get_node_ip_address() == "127.0.0.1", "ray was imported before tests/ray_support.py"
    port = free_port()
    temp = tempfile.mkdtemp(prefix="lrmerge-ray-", dir="/tmp")  # short: Ray's socket paths
    address = f"127.0.0.1:{port}"
    common = ["--disable-usage-stats", "--block", "--temp-dir", temp]
    nodes = NODES[address] = []

    def start(args: list[str], env: dict[str, str]) -> None:
        nodes.append(
            subprocess.Popen(
                ["ray", "start", *args, *common],
                env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
        )

    def wait_for(count: int, deadline: float) -> None:
        while True:  # up once a driver sees `count` live nodes
            try:
                if len(live_node_ids(address)) >= count:
                    return
            except (ConnectionError, RuntimeError):
                pass
            assert all(n.poll() is None for n in nodes), "a `ray start` exited"
            assert time.monotonic() < deadline, f"the Ray cluster did not reach {count} node(s)"
            time.sleep(1)

    try:
        deadline = time.monotonic() + timeout
        start(
            [
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--num-cpus",
                str(cpus_per_node[0]),
                "--include-dashboard=false",
            ],
            {},
        )
        wait_for(1, deadline)
        for cpus in cpus_per_node[1:]:
            # Once multi-node is enabled Ray replaces "127.0.0.1" with the machine's outward
            # address; it keeps [::ffff:127.0.0.1] (the same address) and 127.0.0.N (loopback,
            # one per node, as hosts of a real cluster have addresses of their own)
            start(
                [
                    "--address",
                    f"[::ffff:127.0.0.1]:{port}",
                    "--node-ip-address",
                    f"127.0.0.{len(nodes) + 1}",
                    "--num-cpus",
                    str(cpus),
                ],
                {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"},
            )
        wait_for(len(cpus_per_node), deadline)
        yield address
    finally:
        for node in reversed(nodes):  # SIGTERM takes Ray ~30 s; its workers exit with the raylet
            with contextlib.suppress(ProcessLookupError):  # a test may have killed it
                os.killpg(node.pid, signal.SIGKILL)
            node.wait(30)
        NODES.pop(address, None)
        shutil.rmtree(temp, ignore_errors=True)


def kill_head(address: str) -> None:
    """Kill the head node of the cluster at `address` (its GCS, raylet and workers), as a
    machine that dies would."""
    head = NODES[address][0]
    os.killpg(head.pid, signal.SIGKILL)
    head.wait(30)
