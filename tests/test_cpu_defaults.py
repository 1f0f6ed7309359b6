"""On vLLM's CPU build lrmerge serves in float32, eagerly, unless told otherwise (bf16 and the
compiled graph flip near-tied greedy tokens of a bf16 model: README "CPU defaults"). The
served answers themselves are checked on the real model in tests/test_parity_real.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrmerge_hub import evaluate, serve


def command(backend: str, **opts) -> list[str]:
    return serve.vllm_command(serve.resolve_target("org/m"), serve.ServeOptions(**opts), host="127.0.0.1",
                              port=1, backend=backend, memory_fraction=None)


def value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_cpu_default_is_float32_eager():
    cmd = command("cpu")
    assert value(cmd, "--dtype") == "float32" and "--enforce-eager" in cmd


@pytest.mark.parametrize("extra", [["-O2"], ["-O", "3"], ['--compilation-config={"mode": 3}'], ["--enforce-eager"],
                                   ["--optimization-level=1"], ["-cc.mode=0"]])
def test_a_chosen_compilation_mode_replaces_the_eager_default(extra):
    cmd = command("cpu", extra_args=extra)
    assert cmd.count("--enforce-eager") == extra.count("--enforce-eager") and cmd[-len(extra):] == extra


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_chosen_dtype_is_kept_on_cpu(dtype):
    assert value(command("cpu", dtype=dtype), "--dtype") == dtype


def test_gpu_defaults_are_unchanged():
    cmd = command("gpu")
    assert value(cmd, "--dtype") == "auto" and "--enforce-eager" not in cmd


def test_lm_eval_vllm_backend_gets_the_same_cpu_defaults():
    m = evaluate.EvalModel(name="m", model=str(Path("/models/m")), revision=None, role="merged")
    kwargs = dict(base_url="", num_concurrent=1, max_model_len=None, tensor_parallel_size=1,
                  gpu_memory_utilization=None)
    cpu = evaluate.model_args(m, "vllm", dtype="auto", device="cpu", **kwargs)
    assert "dtype=float32" in cpu.split(",") and "enforce_eager=True" in cpu.split(",")
    assert "dtype=bfloat16" in evaluate.model_args(m, "vllm", dtype="bfloat16", device="cpu", **kwargs).split(",")
    gpu = evaluate.model_args(m, "vllm", dtype="auto", device="cuda", **kwargs)
    assert "dtype=auto" in gpu.split(",") and "enforce_eager" not in gpu
