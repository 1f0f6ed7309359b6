"""Run whole units of work (a sweep point, a release) as Ray tasks.

A unit is a plain module-level function that takes plain data (a recipe, an eval spec) and
returns plain data (scores, a merge report, tensor hashes); the same function runs in
`--executor local` without Ray. This module ships the function and its arguments to the
cluster, each unit in a scratch folder of its own on the node that runs it, and brings the
result back with the node it ran on. Nothing in the merge, the evaluation or the card knows
that it runs on a cluster.

The cluster is found as Ray users expect: `--ray-address`, else `RAY_ADDRESS`, else a Ray
instance started on this machine for the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ClusterError, ClusterLostError, LrmergeError

PROBE_SECONDS = 5.0  # for the cluster's GCS port to accept a connection (ray.init would retry for minutes)
POLL_SECONDS = 2.0  # between looks at the cluster's head while tasks run
CANCEL_WAIT_SECONDS = 30.0  # for cancelled tasks to stop
CLEANUP_GRACE_SECONDS = 5.0  # for them to remove their scratch folders before the driver leaves
SCRATCH_PREFIX = "lrmerge-task-"  # + the worker's pid


@dataclass
class Unit:
    """A call of fn(folder, *args, **kwargs), `folder` being a scratch folder named `folder_name`
    (the name shows in evaluation results, as the output folder's does locally)."""

    folder_name: str
    fn: Callable[..., dict[str, Any]]
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What came back from one unit: its result, or its error as one line, and where it ran."""

    key: str
    result: dict[str, Any] | None = None
    error: str | None = None
    node: dict[str, Any] = field(default_factory=dict)


def in_scratch(unit: Unit) -> dict[str, Any]:
    """Runs on the worker: the unit in a scratch folder of its own, removed afterwards."""
    import ray

    context = ray.get_runtime_context()
    node = {
        "node_id": context.get_node_id(),
        "ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
    remove_stale_scratch()
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    try:
        return {"result": unit.fn(scratch / unit.folder_name, *unit.args, **unit.kwargs), "node": node}
    except LrmergeError as e:  # an expected failure of this unit: reported, not retried
        return {"error": str(e), "node": node}
    finally:
        while True:  # Ray interrupts a cancelled task more than once: finish removing the scratch
            try:
                shutil.rmtree(scratch, ignore_errors=True)
                break
            except KeyboardInterrupt:
                continue


def remove_stale_scratch() -> None:
    """Remove the scratch folders of workers that died mid-task (no process has their pid)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = folder.name[len(SCRATCH_PREFIX) :].partition("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def gcs_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address `HOST:PORT`, `[IPv6]:PORT` or `ray://HOST:PORT`; None
    for what Ray resolves itself (`auto`, `local`). Raises ClusterError for a bad port."""
    rest = address[len("ray://") :] if address.startswith("ray://") else address
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(
            f"Ray address {address!r}: the port must be a number from 1 to 65535 (check --ray-address / RAY_ADDRESS)"
        )
    return host.strip("[]"), int(port)


def unreachable(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to host:port fails within `timeout` seconds, or None when it opens."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except ConnectionRefusedError:
        return "nothing listens there (connection refused)"
    except socket.gaierror:
        return f"unknown host {host!r}"
    except OSError as e:
        return e.strerror or type(e).__name__


def lost_after_seconds() -> float:
    """How long the head may stay unreachable before the cluster counts as lost: a quarter of
    the time after which Ray itself ends a driver that cannot reach it
    (RAY_gcs_rpc_server_reconnect_timeout_s, 60 s by default), at most 15 s, so that the
    driver reports first."""
    try:
        ray_limit = float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", "60"))
    except ValueError:
        ray_limit = 60.0
    return max(1.0, min(15.0, ray_limit / 4))


def error_line(e: BaseException) -> str:
    """One line for a task that failed in Ray (worker or node died past its retries, a bug)."""
    import ray.exceptions as rex

    if isinstance(e, (rex.WorkerCrashedError, rex.NodeDiedError, rex.OwnerDiedError)):
        return f"its worker died and the retries ran out ({type(e).__name__})"
    if isinstance(e, rex.TaskCancelledError):
        return "cancelled"
    cause = getattr(e, "cause", None) or e
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"


class RayExecutor:
    """`--executor ray`: one Ray task per unit with declared resources; bounded retries when
    a worker or node dies; Ctrl-C cancels every task."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        cpus_per_task: float = 1.0,
        gpus_per_task: float = 0.0,
        max_retries: int = 2,
        echo: Callable[[str], None] = lambda s: None,
    ):
        self.address = address
        self.cpus_per_task = cpus_per_task
        self.gpus_per_task = gpus_per_task
        self.max_retries = max_retries
        self.echo = echo

    def __enter__(self) -> "RayExecutor":
        try:
            import ray
        except ImportError:
            raise ClusterError("Ray is not installed: pip install 'lrmerge-hub[cluster]'") from None
        where = self.address or "a local Ray instance"
        endpoint = gcs_endpoint(self.address) if self.address else None
        why = endpoint and unreachable(*endpoint, PROBE_SECONDS)
        if why:  # ray.init would retry for minutes, deaf to Ctrl-C and SIGTERM
            raise ClusterError(
                f"cannot reach the Ray cluster at {where}: {why}. Start it (ray start --head) "
                "or fix --ray-address / RAY_ADDRESS (unset both for a local instance)"
            )
        with contextlib.ExitStack() as stack:
            # Ray prints its notices (a worker died, ...) on the driver's stdout: send them to
            # stderr, so that `--format json` prints one JSON object
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))
            try:
                ray.init(
                    address=self.address or "local",
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                    configure_logging=False,
                )
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise ClusterError(
                    f"cannot connect to the Ray cluster at {where}: {str(e).splitlines()[0]} "
                    "(check --ray-address / RAY_ADDRESS, or leave both unset for a local "
                    "instance)"
                ) from None
            stack.callback(ray.shutdown)
            self.head = gcs_endpoint(ray.get_runtime_context().gcs_address)
            self.head_silent_since: float | None = None
            self.check_resources(ray.nodes())
            self.echo(f"Ray: {where}, {len([n for n in ray.nodes() if n['Alive']])} node(s)")
            self.connection = stack.pop_all()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.connection.close()

    def check_resources(self, nodes: list[dict[str, Any]]) -> None:
        """A task no node can hold would wait forever: refuse it up front."""
        wanted = {"CPU": self.cpus_per_task, "GPU": self.gpus_per_task}
        alive = [n["Resources"] for n in nodes if n["Alive"]]
        if not any(all(r.get(k, 0) >= v for k, v in wanted.items()) for r in alive):
            largest = max([(r.get("CPU", 0), r.get("GPU", 0)) for r in alive] or [(0, 0)])
            raise ClusterError(
                f"no node of the cluster has {self.cpus_per_task:g} CPU(s) and {self.gpus_per_task:g} "
                f"GPU(s) free for one task (the largest has {largest[0]:g} CPUs, {largest[1]:g} GPUs); "
                "lower --cpus-per-task / --gpus-per-task"
            )

    def run(self, units: dict[str, Unit]) -> Iterator[Outcome]:
        """Submit every unit (by key) as a task; yield each Outcome as its task finishes."""
        import ray

        task = ray.remote(in_scratch).options(
            num_cpus=self.cpus_per_task,
            num_gpus=self.gpus_per_task,
            max_retries=self.max_retries,
            retry_exceptions=False,
        )
        pending = {task.remote(unit): key for key, unit in units.items()}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
                if not done:
                    self.check_head()
                    continue
                key = pending.pop(done[0])
                try:
                    reply = ray.get(done[0])
                except ray.exceptions.RayError as e:
                    yield Outcome(key, error=error_line(e))
                    continue
                yield Outcome(key, result=reply.get("result"), error=reply.get("error"), node=reply["node"])
        except ClusterLostError:  # nothing left to cancel, and Ray would wait for the head
            raise
        except BaseException:  # Ctrl-C, or the caller failed: stop everything still running
            self.cancel(list(pending))
            raise

    def check_head(self) -> None:
        """Raise ClusterLostError once the cluster's head has not accepted a connection for
        lost_after_seconds(): Ray would end this process without a word a little later."""
        head = self.head
        why = head and unreachable(*head, 1.0)
        if not head or not why:
            self.head_silent_since = None
            return
        now = time.monotonic()
        self.head_silent_since = self.head_silent_since or now
        if now - self.head_silent_since >= lost_after_seconds():
            host, port = head
            raise ClusterLostError(
                f"lost the Ray cluster at {self.address or f'{host}:{port}'}: its head has not "
                f"answered for {now - self.head_silent_since:.0f} s ({why}); what had not "
                "finished was not built. Run the same command again once the cluster is back"
            )

    def cancel(self, refs: list[Any]) -> None:
        """Interrupt every task (each removes its scratch folder on the way out) and wait a
        little for them to end."""
        import ray

        for ref in refs:
            ray.cancel(ref, recursive=True)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_SECONDS)
            time.sleep(CLEANUP_GRACE_SECONDS)  # a cancelled task's result is set before its cleanup ran
