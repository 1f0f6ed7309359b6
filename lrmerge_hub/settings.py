"""The one place where environment variables and defaults are read."""

from __future__ import annotations

import os

DEFAULT_SHARD_SIZE = 5 * 1000**3  # bytes per output shard, like transformers' "5GB"
# Streaming Hub inputs (hub_stream.py): bytes fetched ahead of the merge, in all (shared by
# the streamed models); the largest range request; requests in flight per model.
DEFAULT_READ_AHEAD = 1024**3
RANGE_REQUEST_BYTES = 8 * 1024**2  # bench/range_bench.py: best of 2-32 MiB at 20 and 100 ms latency
RANGE_WORKERS = 4
RUN_DIR_NAME = ".lrmerge"  # hidden folder beside outputs for temporary and run state


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


def parity_answer_timeout() -> float:
    """Seconds one request of the parity check may take before the served model counts as
    not answering (`LRMERGE_PARITY_TIMEOUT`, else 120)."""
    try:
        return max(1.0, float(os.environ.get("LRMERGE_PARITY_TIMEOUT", "120")))
    except ValueError:
        return 120.0
