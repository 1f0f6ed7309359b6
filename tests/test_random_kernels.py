"""DARE's kernels (kernels.fused_dare: dare_linear, dare_ties) and their torch-engine twin
(torch_engine.dare_merge) write the bits of the references in methods.py: the keep mask
drawn in the kernel from draws.py's hash, the L1 rescale from exact norms (l1.py), on
bfloat16 and float32 inputs, at sizes that are not a multiple of a block or chunk, with
several seeds, density 1, slacks, negative weights, lambda != 1 and normalize and rescale
on and off; NaN/Inf inputs are refused; and the engine takes them."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from tests.kernel_support import assert_same_outputs, merge_both_ways
from lrmerge_hub.merge import kernels
from lrmerge_hub.merge.draws import stream_key, uniforms
from lrmerge_hub.merge.engine import RESCALED, SUMMED_MODELS_MAX, covered
from lrmerge_hub.merge.kernels import FAST_PATHS, NonFiniteInput
from lrmerge_hub.merge.l1 import L1_EPS, exponent_sums, l1_ratio
from lrmerge_hub.merge.methods import METHODS
from lrmerge_hub.merge.torch_engine import CHUNK, TORCH_METHODS, host_tensor
from tests.test_elementwise_kernels import bits, make_inputs

NAME = "model.layers.0.mlp.up_proj.weight"
# 1 and 7 entries; one more than a block; a size that splits into uneven parallel chunks
SIZES = [1, 7, kernels.BLOCK + 1, kernels.CHUNKS * kernels.BLOCK * 3 + 13]

CASES = [  # (method, model params, params)
    ("dare_linear", [{"weight": 1.0, "density": 0.5}], {"rescale": True, "normalize": False, "seed": 0}),
    (
        "dare_linear",
        [{"weight": 0.6, "density": 0.3}, {"weight": -0.25, "density": 0.9}, {"weight": 1.1, "density": 1.0}],
        {"rescale": True, "normalize": True, "lambda": 0.7, "seed": 11},
    ),
    (
        "dare_linear",
        [{"weight": 0.6, "density": 0.2}, {"weight": 0.5, "density": 0.7}],
        {"rescale": False, "normalize": True, "seed": 2**63 - 1},
    ),
    (
        "dare_ties",
        [{"weight": 0.8, "density": 0.4}, {"weight": -0.45, "density": 0.6}, {"weight": 1.3, "density": 0.5}],
        {"rescale": True, "normalize": True, "lambda": 1.2, "seed": 3},
    ),
    (
        "dare_ties",
        [{"weight": 1.0, "density": 0.1, "slack": 0.5}, {"weight": 0.7, "density": 0.3, "slack": 0.0}],
        {"rescale": True, "normalize": False, "seed": 99},
    ),
    (
        "dare_ties",
        [{"weight": 0.5, "density": 1.0}, {"weight": 0.5, "density": 1.0, "slack": 1e200}],
        {"rescale": True, "normalize": True, "seed": 4},
    ),
    (
        "dare_ties",
        [{"weight": 0.9, "density": 0.25}, {"weight": 0.4, "density": 0.75}],
        {"rescale": False, "normalize": False, "seed": 5},
    ),
]


def full_params(method: str, params: dict) -> dict:
    return {"lambda": 1.0, "int8_mask": False, **params}


def check_case(method: str, model_params: list[dict], params: dict, n: int, bf16: bool, seed: int) -> None:
    """Kernels == reference == torch engine, bit for bit, and the same retention counts."""
    params = full_params(method, params)
    base, xs = make_inputs(n, len(model_params), bf16, seed=seed)
    want, stats = METHODS[method].fn(base.float(), [x.float() for x in xs], model_params, params, tensor_name=NAME)
    want_bits = bits(want.to(torch.bfloat16) if bf16 else want)
    got, kept, agreed = FAST_PATHS[method](
        bits(base), [bits(x) for x in xs], model_params, params, out_bf16=bf16, check_finite=True, tensor_name=NAME
    )
    assert got.dtype == want_bits.dtype and np.array_equal(got.view(np.uint8), want_bits.view(np.uint8))
    want_counts = (None, None) if stats is None else (stats.kept.tolist(), stats.agreed.tolist())
    assert (kept, agreed) == want_counts
    merged, t_kept, t_agreed, bad_inputs, bad_32, bad_out = TORCH_METHODS[method](
        host_tensor(bits(base)),
        [host_tensor(bits(x)) for x in xs],
        model_params,
        params,
        torch.bfloat16 if bf16 else torch.float32,
        tensor_name=NAME,
    )
    assert bad_inputs == [0] * (len(xs) + 1) and bad_32 == bad_out == 0
    assert (t_kept, t_agreed) == want_counts
    assert np.array_equal(bits(merged).view(np.uint8), want_bits.view(np.uint8))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernels_and_torch_engine_equal_the_reference_bit_for_bit(n, bf16, case):
    method, model_params, params = CASES[case]
    check_case(method, model_params, params, n, bf16, seed=n + case)


@pytest.mark.parametrize("case", [1, 3])
def test_more_than_a_torch_engine_chunk(case):
    """The torch engine's chunks start the draws and the norms mid-tensor."""
    method, model_params, params = CASES[case]
    check_case(method, model_params, params, CHUNK + 12_345, True, seed=case)


def test_the_masks_are_the_draws_and_change_with_the_seed():
    """With one model, weight 1 and no rescale, dare_linear keeps exactly the entries whose
    uniform is below the density, and another seed or tensor name keeps others."""
    n, density = 10_000, 0.3
    base, xs = make_inputs(n, 1, False, seed=1)
    xs[0][:] = base + 1.0  # every delta is nonzero
    kept = {}
    for seed, name in [(0, NAME), (1, NAME), (0, "other")]:
        params = full_params("dare_linear", {"rescale": False, "normalize": False, "seed": seed})
        out, _, _ = FAST_PATHS["dare_linear"](
            bits(base), [bits(xs[0])], [{"weight": 1.0, "density": density}], params, tensor_name=name
        )
        kept[seed, name] = out != bits(base)
        np.testing.assert_array_equal(kept[seed, name], uniforms(stream_key(seed, name, 0), 0, n) < density)
    assert abs(kept[0, NAME].mean() - density) < 0.02
    assert (kept[0, NAME] != kept[1, NAME]).any() and (kept[0, NAME] != kept[0, "other"]).any()


def test_l1_ratio_is_the_exact_ratio_rounded_to_float32():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(5000, generator=g) * torch.logspace(-30, 30, 5000)
    delta[:3] = torch.tensor([1e-45, -3e-42, 0.0])  # subnormals and a zero
    kept = torch.where(torch.rand(5000, generator=g) < 0.3, delta, 0.0)

    def exact(t: torch.Tensor) -> Fraction:
        return sum((Fraction(float(v)) for v in t.abs().tolist()), Fraction(0))

    want = float(np.float32(float(exact(delta) / exact(kept))))
    assert l1_ratio(exponent_sums(delta), exponent_sums(kept)) == want
    tiny = torch.full((10,), L1_EPS / 20)  # norm L1_EPS / 2: no rescale
    assert l1_ratio(exponent_sums(tiny), exponent_sums(tiny * 0.5)) == 1.0
    assert math.isinf(l1_ratio(exponent_sums(torch.tensor([3e38, 3e38])), exponent_sums(torch.tensor([0.0, 1e-6]))))


def test_covered_takes_rescale_for_the_dare_methods_only():
    """The DARE paths take rescale and any number of models; the trims refuse rescale, and
    the breadcrumbs methods more than SUMMED_MODELS_MAX models with it or without."""
    many = SUMMED_MODELS_MAX + 1
    for name in ("dare_linear", "dare_ties"):
        assert name in RESCALED and name in FAST_PATHS and name in TORCH_METHODS
        assert covered(METHODS[name], True, {"rescale": True}, many)
        assert covered(METHODS[name], True, {"rescale": False}, many)
        assert not covered(METHODS[name], False, {"rescale": True}, 2)  # no base
    for name in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        assert not covered(METHODS[name], True, {"rescale": True}, 2)
    for name in ("breadcrumbs", "breadcrumbs_ties"):
        assert not covered(METHODS[name], True, {"rescale": False}, many)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("which", [-1, 1])
def test_nan_and_inf_inputs_are_refused_even_where_dropped(method, rescale, which):
    n, density, seed = 40_000, 0.2, 8
    base, xs = make_inputs(n, 2, False, seed=6)
    model_params = [{"weight": 1.0, "density": density}, {"weight": 0.5, "density": density}]
    params = full_params(method, {"rescale": rescale, "normalize": False, "seed": seed})
    dropped = int(np.flatnonzero(uniforms(stream_key(seed, NAME, 1), 0, n) >= density)[-1])
    (base if which == -1 else xs[which])[dropped] = float("nan") if rescale else float("inf")
    with pytest.raises(NonFiniteInput) as e:
        FAST_PATHS[method](bits(base), [bits(x) for x in xs], model_params, params, check_finite=True, tensor_name=NAME)
    assert e.value.which == which
    *_, bad_inputs, _, _ = TORCH_METHODS[method](
        host_tensor(bits(base)), [host_tensor(bits(x)) for x in xs], model_params, params, None, tensor_name=NAME
    )
    assert bad_inputs == [int(which == -1), 0, int(which == 1)]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("engine_name", ["kernels", "torch"])
def test_engine_takes_the_fast_paths_and_writes_the_reference_bytes(tmp_path, monkeypatch, method, engine_name):
    """A merge (rescale on, its default) through the engine gives the same bytes with the
    kernels, or the torch engine on the CPU, as with the reference path, and the kernels or
    the torch engine's own code are the ones called."""
    from lrmerge_hub.recipe.spec import parse_recipe
    from lrmerge_hub.synth.tiny import make_family

    fam = make_family(tmp_path / "fam", hidden=256, intermediate=512, layers=1, heads=4, dtype="bfloat16")
    recipe = parse_recipe(
        {
            "method": method,
            "base": str(fam["base"]),
            "models": [
                {"model": str(fam["language"]), "role": "language", "weight": 0.7, "density": 0.4},
                {"model": str(fam["task"]), "role": "task", "weight": -0.2, "density": 0.6},
            ],
            "parameters": {"seed": 21},
            "languages": ["bo"],
            "license": "apache-2.0",
            "output": str(tmp_path / "out"),
        },
        tmp_path,
    )
    assert recipe.parameters["rescale"] is True
    a, b, spied = merge_both_ways(monkeypatch, tmp_path, recipe, method, engine_name)
    calls = [kw["tensor_name"] for _, kw in spied]
    assert len(calls) > 1 and len(set(calls)) == len(calls)  # every tensor, each under its name
    assert_same_outputs(a, b)
