"""The torch engine writes the same bits as the CPU kernels (issue 13), proven on the CPU.

The torch engine is what runs on a GPU; here it runs on the CPU through the same code, so
every comparison below is the one a GPU box and a laptop would make of their outputs.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lrmerge_hub.merge.engine import local_sources, merge
from lrmerge_hub.merge.kernels import FAST_PATHS
from lrmerge_hub.merge.methods import METHODS
from lrmerge_hub.merge.torch_engine import CHUNK, TORCH_METHODS, TorchEngine, host_tensor, select_threshold

from lrmerge_hub.recipe.spec import load_recipe

from kernel_support import engine_recipe
from test_engine import load_all


def bf16_bits(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def inputs(n: int, kind: str, seed: int, models: int = 3) -> tuple[np.ndarray, list[np.ndarray]]:
    """A base and model inputs: float32 noise, bfloat16 noise (few distinct deltas), or
    deltas on a coarse grid so that thousands of entries share each magnitude."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n).astype(np.float32)
    if kind == "ties":
        xs = [base + np.float32(0.01) * rng.integers(-3, 4, n).astype(np.float32) for _ in range(models)]
    else:
        xs = [base + np.float32(0.01) * rng.standard_normal(n).astype(np.float32) for _ in range(models)]
    if kind == "bf16":
        return bf16_bits(base), [bf16_bits(x) for x in xs]
    return base, xs


MODEL_PARAMS = [
    dict(weight=1.0, density=0.2, slack=0.0),
    dict(weight=0.7, density=0.5, slack=0.5),
    dict(weight=1.3, density=1.0, slack=2.0),
]


def run_torch(method, base, xs, model_params, params, out_bf16, device="cpu"):
    tensors = [host_tensor(a).to(device) for a in [base, *xs]]
    out_dtype = torch.bfloat16 if out_bf16 else torch.float32
    merged, kept, agreed, bad_in, bad_32, bad_out = TORCH_METHODS[method](
        tensors[0], tensors[1:], model_params, params, out_dtype
    )
    assert bad_in == [0] * len(tensors) and bad_32 == bad_out == 0
    merged = merged.cpu()
    return (merged.view(torch.int16).numpy().view(np.uint16) if out_bf16 else merged.numpy()), kept, agreed


# 5_000 entries select exactly from all of them in the kernels; 300_000 take the sampled
# bracket; CHUNK + 12_345 spans two of the torch engine's chunks; the "ties" inputs put the
# threshold inside a run of thousands of equal magnitudes
@pytest.mark.parametrize("n", [5_000, 300_000, CHUNK + 12_345])
@pytest.mark.parametrize("kind", ["f32", "bf16", "ties"])
@pytest.mark.parametrize("method", ["ties", "slack_ties"])
@pytest.mark.parametrize("normalize", [True, False])
def test_torch_ties_equals_the_kernels_bit_for_bit(n, kind, method, normalize):
    base, xs = inputs(n, kind, seed=n + len(kind))
    params = {"lambda": 0.9, "normalize": normalize}
    want, want_kept, want_agreed = FAST_PATHS[method](base, xs, MODEL_PARAMS, params, out_bf16=kind == "bf16")
    got, kept, agreed = run_torch(method, base, xs, MODEL_PARAMS, params, out_bf16=kind == "bf16")
    assert got.dtype == want.dtype
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    assert (kept, agreed) == (want_kept, want_agreed)


def test_threshold_selection_is_exact_and_keeps_the_first_ties():
    # 1000 entries share the largest magnitude: keeping 10 keeps the first 10 of them
    base = torch.zeros(5000)
    x = torch.zeros(5000)
    x[::5] = 7.0
    t, limit = select_threshold(x, base, 10)
    bits = x.abs().view(torch.int32)
    assert t == int(torch.tensor(7.0).view(torch.int32))
    kept = (bits > t) | ((bits == t) & (torch.arange(5000) < limit))
    assert kept.nonzero().view(-1).tolist() == list(range(0, 50, 5))
    # distinct magnitudes: the k-th largest, and every tie (none) kept
    values = torch.randperm(70_000, generator=torch.Generator().manual_seed(1)).to(torch.float32) * 0.5
    t, limit = select_threshold(values, torch.zeros(70_000), 123)
    assert t == int(torch.sort(values, descending=True).values[122].view(torch.int32)) and limit == 70_000


def test_nonfinite_inputs_and_outputs_are_counted():
    base, xs = inputs(1000, "f32", seed=5, models=2)
    xs[1] = xs[1].copy()
    xs[1][17] = np.inf
    _, _, _, bad_in, _, _ = TORCH_METHODS["ties"](
        host_tensor(base), [host_tensor(x) for x in xs], MODEL_PARAMS[:2], {"lambda": 1.0, "normalize": True}, None
    )
    assert bad_in == [0, 0, 1]
    _, _, _, bad_in, bad_32, bad_out = TORCH_METHODS["ties"](
        host_tensor(base),
        [host_tensor(x) for x in xs[:1]],
        [dict(weight=1e30, density=0.5)],
        {"lambda": 1e30, "normalize": False},
        None,
    )
    assert bad_in == [0, 0] and bad_32 > 0 and bad_out > 0


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    """Sharded bfloat16 checkpoints with an extended vocabulary, tensors up to 2^18 entries
    (the kernels' sampled selection path)."""
    from lrmerge_hub.synth.tiny import make_family

    root = tmp_path_factory.mktemp("torch-engine") / "models"
    make_family(
        root,
        hidden=512,
        intermediate=512,
        layers=1,
        heads=8,
        dtype="bfloat16",
        shard_bytes=1_000_000,
        extend_language_vocab=8,
    )
    return root


@pytest.mark.parametrize("method", sorted(METHODS))
def test_engines_write_identical_models_for_every_method(bf16_family, tmp_path, method):
    recipe = load_recipe(write(tmp_path / "recipe.yaml", engine_recipe(method, bf16_family)))
    outputs, reports = {}, {}
    for engine in ("kernels", "torch"):
        outputs[engine] = tmp_path / engine
        reports[engine] = merge(
            recipe,
            local_sources(recipe),
            outputs[engine],
            device="cpu",
            engine=engine,
            shard_size=700_000,
            progress=False,
        )
    kernels, torch_out = (load_all(outputs[e]) for e in ("kernels", "torch"))
    assert set(kernels) == set(torch_out) and len(kernels) > 5
    for name, t in kernels.items():
        assert t.dtype == torch_out[name].dtype == torch.bfloat16
        assert torch.equal(t.view(torch.int16), torch_out[name].view(torch.int16)), name
    assert [m["retention"] for m in reports["kernels"]["models"]] == [
        m["retention"] for m in reports["torch"]["models"]
    ]
    assert [reports[e]["stats"]["engine"] for e in ("kernels", "torch")] == ["kernels", "torch"]


def test_engines_keep_the_base_of_a_tensor_no_model_changed_in_multislerp(bf16_family, tmp_path):
    from safetensors.torch import load_file, save_file

    frozen = "model.layers.0.mlp.up_proj.weight"  # as a frozen layer: every model has the base's values
    models = tmp_path / "models"
    shutil.copytree(bf16_family, models)
    shutil.copytree(models / "task", models / "other")
    base_value = load_all(models / "base")[frozen]
    for role in ("language", "task", "other"):
        for shard in (models / role).glob("*.safetensors"):
            tensors = load_file(str(shard))
            if frozen in tensors:
                tensors[frozen] = base_value.clone()
            elif role == "other":  # a third model with a task vector of its own elsewhere
                tensors = {k: v * 1.01 if v.is_floating_point() else v for k, v in tensors.items()}
            save_file(tensors, str(shard), metadata={"format": "pt"})
    data = {
        "method": "multislerp",
        "languages": ["bo"],
        "license": "mit",
        "base": str(models / "base"),
        "models": [
            {"model": str(models / folder), "role": role, "weight": w}
            for folder, role, w in (("language", "language", 1.0), ("task", "task", 2.0), ("other", "task", 0.5))
        ],
    }
    recipe = load_recipe(write(tmp_path / "recipe.yaml", yaml.safe_dump(data)))
    outputs = {}
    for engine in ("kernels", "torch"):
        merge(recipe, local_sources(recipe), tmp_path / engine, device="cpu", engine=engine, progress=False)
        outputs[engine] = load_all(tmp_path / engine)
    rows = base_value.shape[0]
    for engine, out in outputs.items():  # the base, bit for bit
        assert torch.equal(out[frozen][:rows].view(torch.int16), base_value.view(torch.int16)), engine
    for name, t in outputs["kernels"].items():
        assert torch.equal(t.view(torch.int16), outputs["torch"][name].view(torch.int16)), name
    changed = "model.layers.0.mlp.down_proj.weight"  # merged as before where the models differ
    assert not torch.equal(outputs["kernels"][changed], load_all(models / "base")[changed])


def test_cli_engine_option_and_summary(bf16_family, tmp_path):
    recipe = write(tmp_path / "recipe.yaml", engine_recipe("slack_ties", bf16_family))
    for engine in ("kernels", "torch"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "lrmerge_hub",
                "merge",
                str(recipe),
                "--out",
                str(tmp_path / engine),
                "--device",
                "cpu",
                "--engine",
                engine,
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert f"on cpu with the {engine} engine" in done.stdout
    assert load_all(tmp_path / "kernels").keys() == load_all(tmp_path / "torch").keys()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lrmerge_hub",
            "merge",
            str(recipe),
            "--out",
            str(tmp_path / "x"),
            "--device",
            "cpu",
            "--engine",
            "gpu",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "--engine" in done.stderr


def test_staged_inputs_are_the_inputs():
    engine = TorchEngine("cpu")
    try:
        a = bf16_bits(np.linspace(-3, 3, 1000, dtype=np.float32))
        b = np.linspace(0, 1, 1000, dtype=np.float32)
        engine.stage("x", [a, b])
        got = engine.take("x", [a, b])
        assert torch.equal(got[0], torch.from_numpy(a.view(np.int16)))
        assert torch.equal(got[1], torch.from_numpy(b))
    finally:
        engine.close()


def test_kernels_engine_on_a_gpu_is_a_one_line_error():
    from lrmerge_hub.errors import InputModelError
    from lrmerge_hub.merge.engine import resolve_engine

    with pytest.raises(InputModelError, match="kernels run on the CPU only"):
        resolve_engine("kernels", "cuda")
    assert resolve_engine("auto", "cpu") == "kernels" and resolve_engine("auto", "cuda") == "torch"


def test_device_auto_follows_the_measured_rule():
    from lrmerge_hub.merge.engine import KERNEL_BYTES_PER_CORE_S, auto_device

    assert auto_device(None, 2) == "cpu"  # no GPU
    assert auto_device(25e9, 16) == "cuda"  # PCIe 4 x16 against 16 cores
    assert auto_device(3e9, 128) == "cpu"  # a slow link against many cores
    assert auto_device(KERNEL_BYTES_PER_CORE_S * 8, 8) == "cpu"  # a tie keeps the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")
@pytest.mark.parametrize("kind", ["bf16", "ties"])
def test_cuda_equals_the_kernels(kind):
    base, xs = inputs(3 * CHUNK + 5, kind, seed=3)
    params = {"lambda": 1.0, "normalize": True}
    want = FAST_PATHS["slack_ties"](base, xs, MODEL_PARAMS, params, out_bf16=kind == "bf16")
    got = run_torch("slack_ties", base, xs, MODEL_PARAMS, params, out_bf16=kind == "bf16", device="cuda")
    assert np.array_equal(got[0].view(np.uint8), want[0].view(np.uint8))
    assert got[1:] == want[1:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")
def test_cuda_cli_merge_equals_the_cpu_kernels(bf16_family, tmp_path):
    recipe = write(tmp_path / "recipe.yaml", engine_recipe("slack_ties", bf16_family))
    for device, engine in (("cpu", "kernels"), ("cuda", "torch")):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "lrmerge_hub",
                "merge",
                str(recipe),
                "--out",
                str(tmp_path / device),
                "--device",
                device,
                "--engine",
                engine,
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    cpu, gpu = load_all(tmp_path / "cpu"), load_all(tmp_path / "cuda")
    for name in cpu:
        assert torch.equal(cpu[name].view(torch.int16), gpu[name].view(torch.int16)), name


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_torch_engine_refuses_an_overflowing_merge_like_the_kernels(bf16_family, tmp_path, method):
    from lrmerge_hub.errors import NonFiniteOutputError

    params = {"lambda": 100.0, **({"normalize": False} if method == "ties" else {})}  # weights x deltas x 100
    text = engine_recipe(method, bf16_family).replace("weight: 0.8", "weight: 3.0e+38") + yaml.safe_dump(
        {"parameters": params}
    )
    recipe = load_recipe(write(tmp_path / "recipe.yaml", text))
    for engine in ("kernels", "torch"):
        with pytest.raises(NonFiniteOutputError, match=r"tensor \S+: .* NaN or Inf; nothing was written") as e:
            merge(recipe, local_sources(recipe), tmp_path / engine, device="cpu", engine=engine, progress=False)
        assert "weight = 3e+38" in str(e.value)
        assert not (tmp_path / engine).exists() and not list(tmp_path.glob(f".{engine}.lrmerge-tmp-*"))
