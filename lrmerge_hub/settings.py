"""The one place where environment variables and defaults are read."""

from __future__ import annotations

import os

DEFAULT_SHARD_SIZE = 5 * 1000**3  # bytes per output shard, like transformers' "5GB"
# Streaming Hub inputs (hub/stream.py): bytes fetched ahead of the merge, in all (shared by
# the streamed models); the largest range request; requests in flight per model.
DEFAULT_READ_AHEAD = 1024**3
RANGE_REQUEST_BYTES = 8 * 1024**2  # bench/range_bench.py: best of 2-32 MiB at 20 and 100 ms latency
RANGE_WORKERS = 4
RUN_DIR_NAME = ".lrmerge"  # hidden folder beside outputs for temporary and run state
# Bounds on waiting for the Hub while streaming (hub/stream.py), each overridable by its
# environment variable: a range request, its retries and resumes included, gives up after
# HUB_RANGE_DEADLINE seconds; an answer whose Retry-After asks for more than HUB_MAX_WAIT
# seconds fails at once; retries wait HUB_RETRY_WAIT seconds first, doubling up to 8.
HUB_RANGE_DEADLINE = 600.0  # LRMERGE_HUB_RANGE_DEADLINE: 8 MiB in 10 minutes, about 14 KB/s at the least
HUB_MAX_WAIT = 300.0  # LRMERGE_HUB_MAX_WAIT: the Hub's rate limits reset within 5 minutes
HUB_RETRY_WAIT = 0.5  # LRMERGE_HUB_RETRY_WAIT


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def default_device() -> str:
    """Device used when neither recipe nor CLI names one (`LRMERGE_DEVICE`, else auto)."""
    return os.environ.get("LRMERGE_DEVICE", "auto")


def default_engine() -> str:
    """Merge engine used when the CLI names none (`LRMERGE_ENGINE`, else auto)."""
    return os.environ.get("LRMERGE_ENGINE", "auto")


def vllm_api_key() -> str | None:
    """The API key vLLM itself reads (`VLLM_API_KEY`); `--api-key` overrides it."""
    return os.environ.get("VLLM_API_KEY") or None


def vllm_cpu_kvcache_set() -> bool:
    """True when the user sized vLLM's CPU KV cache themselves (`VLLM_CPU_KVCACHE_SPACE`)."""
    return bool(os.environ.get("VLLM_CPU_KVCACHE_SPACE"))


def ray_address() -> str | None:
    """The Ray cluster to run on (`RAY_ADDRESS`, as Ray itself reads it); `--ray-address`
    overrides it; none: `--executor ray` starts a local Ray instance."""
    return os.environ.get("RAY_ADDRESS") or None


def _seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable `name`, else `default`."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        from .errors import LrmergeError

        raise LrmergeError(
            f"{name}={text[:20]!r} is not a positive number of seconds; unset it or set e.g. {name}={default:g}"
        )
    return value


def hub_range_deadline() -> float:
    """Seconds a streamed range request may take in all, retries and resumes included."""
    return _seconds("LRMERGE_HUB_RANGE_DEADLINE", HUB_RANGE_DEADLINE)


def hub_max_wait() -> float:
    """The longest Retry-After (seconds) a streamed read waits for; a longer one fails at once."""
    return _seconds("LRMERGE_HUB_MAX_WAIT", HUB_MAX_WAIT)


def hub_retry_wait() -> float:
    """Seconds before a streamed read's first retry or resume (doubling, up to 8)."""
    return _seconds("LRMERGE_HUB_RETRY_WAIT", HUB_RETRY_WAIT)


def hub_storage_hosts() -> list[str]:
    """Hosts (`host` or `host:port`) besides the Hub endpoint and huggingface.co's storage that a
    self-hosted Hub's LFS answers may send uploads to (`LRMERGE_HUB_STORAGE_HOSTS`, comma-separated);
    the token never goes there."""
    return [h.strip() for h in os.environ.get("LRMERGE_HUB_STORAGE_HOSTS", "").split(",") if h.strip()]


def progress_interval() -> float:
    """Seconds between progress lines when stderr is not a terminal (`LRMERGE_PROGRESS_INTERVAL`,
    as tqdm's TQDM_MININTERVAL; default 12). On a terminal the one line is rewritten in place."""
    try:
        return max(0.0, float(os.environ.get("LRMERGE_PROGRESS_INTERVAL", "12")))
    except ValueError:
        return 12.0


def parity_answer_timeout() -> float:
    """Seconds one request of the parity check may take before the served model counts as
    not answering (`LRMERGE_PARITY_TIMEOUT`, else 120)."""
    return _seconds("LRMERGE_PARITY_TIMEOUT", 120.0)
