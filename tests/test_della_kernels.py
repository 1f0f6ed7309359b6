"""DELLA's kernels (kernels.fused_della: della, della_linear) and their torch-engine twin
(torch_engine.della_merge) write the bits of the references in methods.py: each row's
magnitude ranks (ties by index) and the draws against the rank's probability, the L1
rescale, the election or the sum; on bfloat16 and float32 inputs, heavily tied
magnitudes, 0-, 1-, 2- and 3-D shapes (rows of one column, one long row, many rows), with
several seeds, density 1, epsilon 0 and its largest legal value, slacks, 2-4 models, and
rescale and normalize on and off; NaN/Inf inputs are refused; and the engine takes them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.kernel_support import assert_same_outputs, merge_both_ways
from lrmerge_hub.merge import kernels
from lrmerge_hub.merge.draws import stream_key, uniforms
from lrmerge_hub.merge.engine import RESCALED, SHAPED, SUMMED_MODELS_MAX, covered
from lrmerge_hub.merge.kernels import FAST_PATHS, NonFiniteInput
from lrmerge_hub.merge.methods import METHODS
from lrmerge_hub.merge.torch_engine import CHUNK, TORCH_METHODS, host_tensor
from tests.test_elementwise_kernels import bits, make_inputs

NAME = "model.layers.0.self_attn.o_proj.weight"
# a scalar; 1-D (one row of 1, 7, and one more than a block); rows of one column; one row
# of a block and one; many odd rows in more parallel groups than chunks; a 3-D tensor
# (ranked along dim 1, strided)
SHAPES = [(), (1,), (7,), (kernels.BLOCK + 1,), (5, 1), (1, 2049), (203, 67), (4, 6, 5)]


def largest_epsilon(density: float) -> float:
    """The largest epsilon the recipe check accepts: density +- epsilon inside (0, 1)."""
    e = min(density, 1 - density)
    while not (0 < density - e and density + e < 1):
        e = float(np.nextafter(e, 0.0))
    assert METHODS["della"].check([{"density": density, "epsilon": e}], {}) is None
    assert METHODS["della"].check([{"density": density, "epsilon": float(np.nextafter(e, 1.0))}], {}) is not None
    return e


CASES = [  # (method, model params, params)
    (
        "della",
        [{"weight": 0.7, "density": 0.5, "epsilon": 0.15}, {"weight": 0.4, "density": 0.4, "epsilon": 0.3}],
        {"rescale": True, "normalize": True, "lambda": 0.7, "seed": 3},
    ),
    (
        "della",
        [
            {"weight": 1.0, "density": 0.2, "epsilon": 0.1, "slack": 0.5},
            {"weight": -0.45, "density": 0.6, "epsilon": 0.35, "slack": 0.0},
            {"weight": 1.3, "density": 0.5, "epsilon": largest_epsilon(0.5), "slack": 1e200},
        ],
        {"rescale": False, "normalize": False, "seed": 2**63 - 1},
    ),
    (
        "della",
        [{"weight": 0.5, "density": 1.0, "epsilon": 0.15}, {"weight": 0.5, "density": 1.0, "epsilon": 0.15}],
        {"rescale": True, "normalize": True, "seed": 4},
    ),
    (
        "della",
        [
            {"weight": 0.9, "density": 0.05, "epsilon": largest_epsilon(0.05)},
            {"weight": 0.3, "density": 0.95, "epsilon": largest_epsilon(0.95)},
            {"weight": 0.6, "density": 0.7, "epsilon": 0.0},
            {"weight": 0.2, "density": 1.0, "epsilon": 0.15},
        ],
        {"rescale": True, "normalize": True, "lambda": 1.2, "seed": 5},
    ),
    (
        "della_linear",
        [{"weight": 1.0, "density": 0.5, "epsilon": 0.0}, {"weight": 0.8, "density": 0.3, "epsilon": 0.2}],
        {"rescale": False, "normalize": False, "seed": 0},
    ),
    (
        "della_linear",
        [
            {"weight": 0.6, "density": 0.3, "epsilon": largest_epsilon(0.3)},
            {"weight": -0.25, "density": 0.9, "epsilon": 0.05},
            {"weight": 1.1, "density": 1.0, "epsilon": 0.15},
            {"weight": 0.5, "density": 0.5, "epsilon": 0.25},
        ],
        {"rescale": True, "normalize": True, "lambda": 0.8, "seed": 11},
    ),
]


def full_params(params: dict) -> dict:
    return {"lambda": 1.0, "int8_mask": False, **params}


def tied_inputs(n: int, models: int, bf16: bool, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and models whose deltas take 7 values (exact in bfloat16 and float32): most
    magnitudes are tied with hundreds of others."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-60, 61, (n,), generator=g) / 64.0
    xs = [base + torch.randint(-3, 4, (n,), generator=g) / 8.0 for _ in range(models)]
    dtype = torch.bfloat16 if bf16 else torch.float32
    assert all(torch.equal(t.to(dtype).float(), t) for t in [base, *xs])
    return base.to(dtype), [x.to(dtype) for x in xs]


def check_case(
    method: str, model_params: list[dict], params: dict, shape: tuple, bf16: bool, seed: int, tied: bool = False
) -> None:
    """Kernels == reference == torch engine, bit for bit, and the same retention counts."""
    params = full_params(params)
    n = math.prod(shape)
    base, xs = (tied_inputs if tied else make_inputs)(n, len(model_params), bf16, seed)
    want, stats = METHODS[method].fn(
        base.float().reshape(shape), [x.float().reshape(shape) for x in xs], model_params, params, tensor_name=NAME
    )
    want_bits = bits(want.to(torch.bfloat16) if bf16 else want)
    got, kept, agreed = FAST_PATHS[method](
        bits(base),
        [bits(x) for x in xs],
        model_params,
        params,
        out_bf16=bf16,
        check_finite=True,
        tensor_name=NAME,
        shape=shape,
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
        shape=shape,
    )
    assert bad_inputs == [0] * (len(xs) + 1) and bad_32 == bad_out == 0
    assert (t_kept, t_agreed) == want_counts
    assert np.array_equal(bits(merged).view(np.uint8), want_bits.view(np.uint8))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernels_and_torch_engine_equal_the_reference_bit_for_bit(shape, bf16, case):
    method, model_params, params = CASES[case]
    check_case(method, model_params, params, shape, bf16, seed=math.prod(shape) + case)


@pytest.mark.parametrize("shape", [(2049,), (37, 301), (3, 257, 2)])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("case", [0, 1, 5])
def test_ties_in_magnitude_rank_by_index(shape, bf16, case):
    """Deltas of 7 values: each rank among hundreds of equal magnitudes is set by the index
    rule alone, and a rank changes the entry's keep probability."""
    method, model_params, params = CASES[case]
    check_case(method, model_params, params, shape, bf16, seed=case, tied=True)


def test_the_index_rule_decides_ties():
    """One tied row, one model, weight 1, no rescale: the kept entries are those whose draw is
    below the probability of the rank the index rule gives (the lower index ranks higher),
    and not those of the opposite rule."""
    cols, density, epsilon, seed = 4001, 0.5, 0.45, 7
    base = torch.zeros(cols)
    x = torch.ones(cols)  # every magnitude equal: the rank is the index's
    params = full_params({"rescale": False, "normalize": False, "seed": seed})
    mp = [{"weight": 1.0, "density": density, "epsilon": epsilon}]
    out, _, _ = FAST_PATHS["della_linear"](bits(base), [bits(x)], mp, params, tensor_name=NAME, shape=(1, cols))
    u = uniforms(stream_key(seed, NAME, 0), 0, cols)
    ranks = np.arange(cols)[::-1]  # index 0 ranks highest: ascending rank cols - 1
    for rule, expected in ((ranks, True), (ranks[::-1], False)):
        keep = u < (density - epsilon) + rule / (cols - 1) * (2 * epsilon)
        assert np.array_equal(out != 0, keep) == expected


@pytest.mark.parametrize("shape", [(CHUNK // 1000 + 7, 1000), (CHUNK + 9,)])
def test_more_than_a_torch_engine_chunk(shape):
    """The torch engine's chunks start mid-row (ranked whole from the raw inputs), or inside
    a row longer than a chunk."""
    method, model_params, params = CASES[0]
    check_case(method, model_params, params, shape, True, seed=1)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("which", [-1, 0, 1])
def test_nan_and_inf_inputs_are_refused_even_where_dropped(method, rescale, which):
    shape, density, epsilon, seed = (200, 150), 0.3, 0.2, 8
    n = math.prod(shape)
    base, xs = make_inputs(n, 2, False, seed=6)
    model_params = [{"weight": 1.0, "density": density, "epsilon": epsilon, "slack": 0.0}] * 2
    params = full_params({"rescale": rescale, "normalize": False, "seed": seed})
    # dropped by both models whatever its rank: its draws are at least the largest keep probability
    draws = [uniforms(stream_key(seed, NAME, i), 0, n) for i in range(2)]
    dropped = int(np.flatnonzero((draws[0] >= density + epsilon) & (draws[1] >= density + epsilon))[-1])
    (base if which == -1 else xs[which])[dropped] = float("nan") if rescale else float("-inf")
    with pytest.raises(NonFiniteInput) as e:
        FAST_PATHS[method](
            bits(base),
            [bits(x) for x in xs],
            model_params,
            params,
            check_finite=True,
            tensor_name=NAME,
            shape=shape,
        )
    assert e.value.which == which
    *_, bad_inputs, _, _ = TORCH_METHODS[method](
        host_tensor(bits(base)),
        [host_tensor(bits(x)) for x in xs],
        model_params,
        params,
        None,
        tensor_name=NAME,
        shape=shape,
    )
    assert bad_inputs == [int(which == -1), int(which == 0), int(which == 1)]


def test_covered_takes_della_with_rescale_and_up_to_the_summed_models():
    """Both DELLA paths take rescale and the shape; della's disjoint mean (the reference's
    stacked sum) only up to SUMMED_MODELS_MAX models, della_linear's in-order sum any."""
    many = SUMMED_MODELS_MAX + 1
    for name in ("della", "della_linear"):
        assert name in RESCALED and name in SHAPED and name in FAST_PATHS and name in TORCH_METHODS
        for rescale in (True, False):
            assert covered(METHODS[name], True, {"rescale": rescale}, SUMMED_MODELS_MAX)
        assert not covered(METHODS[name], False, {"rescale": True}, 2)  # no base
    assert covered(METHODS["della_linear"], True, {"rescale": True}, many)
    assert not covered(METHODS["della"], True, {"rescale": True}, many)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize(("engine_name", "extend"), [("kernels", 0), ("torch", 0), ("kernels", 8)])
def test_engine_takes_the_fast_paths_and_writes_the_reference_bytes(tmp_path, monkeypatch, method, engine_name, extend):
    """A merge (rescale on, its default) through the engine gives the same bytes with the
    kernels, or the torch engine on the CPU, as with the reference path; the kernels or the
    torch engine's own code are the ones called, for every tensor, with its name and the
    shape of its merged part (the shared rows where the language model extends the
    vocabulary by `extend` rows)."""
    from lrmerge_hub.recipe.spec import parse_recipe
    from lrmerge_hub.synth.tiny import make_family

    fam = make_family(
        tmp_path / "fam",
        hidden=256,
        intermediate=512,
        layers=1,
        heads=4,
        dtype="bfloat16",
        extend_language_vocab=extend,
    )
    recipe = parse_recipe(
        {
            "method": method,
            "base": str(fam["base"]),
            "models": [
                {"model": str(fam["language"]), "role": "language", "weight": 0.7, "density": 0.4, "epsilon": 0.3},
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
    calls = {kw["tensor_name"]: kw["shape"] for _, kw in spied}
    assert set(a.tensors) == set(calls) and len(calls) == len(spied)  # every tensor, each under its name
    assert {len(shape) for shape in calls.values()} == {1, 2}
    for name in a.tensors:
        shape = tuple(a.tensors[name].spec.shape)
        assert calls[name] in (shape, (shape[0] - extend, *shape[1:])), name
    assert_same_outputs(a, b)
    assert any(calls[name] != tuple(a.tensors[name].spec.shape) for name in a.tensors) == (extend > 0)
