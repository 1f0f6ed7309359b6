"""The spherical methods' fast paths (kernels.py and torch_engine.py, spherical sections:
slerp, nuslerp, multislerp, model_stock, karcher) write the bits of the references in
geometric.py: their scalars come from the reference's own torch reductions of arrays the
kernels fill (sphere_scalars.py), every entry from one combine pass in the reference's
float32 order. On bfloat16 and float32
inputs, 1-D and 2-D shapes, sizes past a block and past a torch-engine chunk, near-collinear
inputs (the linear branches), t at 0 and 1, with and without a base; multislerp's
degenerate branches run the reference; NaN/Inf inputs are refused; the engine takes them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.kernel_support import assert_same_outputs, merge_both_ways
from lrmerge_hub.errors import DegenerateInput
from lrmerge_hub.merge import kernels, sphere_fills
from lrmerge_hub.merge.engine import SHAPED, covered
from lrmerge_hub.merge.kernels import FAST_PATHS, NonFiniteInput
from lrmerge_hub.merge.methods import METHODS
from lrmerge_hub.merge.sphere_scalars import nuslerp_coefficients, slerp_coefficients
from lrmerge_hub.merge.torch_engine import CHUNK, TORCH_METHODS, host_tensor
from tests.test_elementwise_kernels import bits, make_inputs

NUSLERP = {"nuslerp_flatten": True, "nuslerp_row_wise": False}
MULTI = {"normalize_weights": True, "eps": 1e-8}
CASES = [  # (method, model params, params, base given)
    ("slerp", [{}], {"t": 0.3}, True),
    ("slerp", [{}], {"t": 0.0}, True),
    ("slerp", [{}], {"t": 1.0}, True),
    ("nuslerp", [{"weight": 0.4}, {"weight": 0.9}], NUSLERP, True),
    ("nuslerp", [{"weight": 0.4}, {"weight": 0.9}], NUSLERP, False),
    ("nuslerp", [{"weight": 1.0}, {"weight": 0.0}], NUSLERP, True),  # t = 0
    ("nuslerp", [{"weight": 0.0}, {"weight": 2.0}], NUSLERP, False),  # t = 1
    ("multislerp", [{"weight": 0.7}, {"weight": 0.2}], MULTI, True),
    ("multislerp", [{"weight": 0.7}, {"weight": -0.2}, {"weight": 1.3}], MULTI, False),
    ("multislerp", [{"weight": 0.5}] * 5, {"normalize_weights": False, "eps": 1e-3}, True),
    ("multislerp", [{"weight": 0.6}], MULTI, True),  # one model: the model itself
    ("model_stock", [{}, {}], {"filter_wise": False}, True),
    ("model_stock", [{}, {}, {}, {}, {}], {"filter_wise": False}, True),
    ("nuslerp", [{"weight": 0.4}, {"weight": 0.9}], {"nuslerp_flatten": False, "nuslerp_row_wise": False}, True),
    ("nuslerp", [{"weight": 0.3}, {"weight": 0.5}], {"nuslerp_flatten": False, "nuslerp_row_wise": True}, False),
    ("nuslerp", [{"weight": 0.0}, {"weight": 0.5}], {"nuslerp_flatten": False, "nuslerp_row_wise": True}, True),
    ("model_stock", [{}, {}], {"filter_wise": True}, True),
    ("model_stock", [{}, {}, {}], {"filter_wise": True}, True),
    ("karcher", [{}, {}], {"max_iter": 10, "tol": 1e-5}, True),
    ("karcher", [{}, {}], {"max_iter": 10, "tol": 1e-5}, False),
    ("karcher", [{}, {}, {}], {"max_iter": 3, "tol": 1e-5}, True),
    ("karcher", [{}], {"max_iter": 10, "tol": 1e-5}, False),  # one input: the input itself
    ("multislerp", [{"weight": 0.3}, {"weight": 0.2}, {"weight": 0.4}, {"weight": 0.6}], MULTI, True),
]
SHAPES = [(), (1,), (7,), (kernels.BLOCK * 3 + 1,), (203, 67), (4, 6, 5), (3, 2 * kernels.BLOCK + 5)]


def check(method, model_params, params, base, xs, shape, bf16):
    """Kernels == reference == torch engine, bit for bit."""
    shaped = {"shape": shape} if method in SHAPED else {}
    want, _ = METHODS[method].fn(
        base.float().reshape(shape) if base is not None else None,
        [x.float().reshape(shape) for x in xs],
        model_params,
        params,
    )
    want_bits = bits(want.to(torch.bfloat16) if bf16 else want.float())
    got, kept, agreed = FAST_PATHS[method](
        bits(base) if base is not None else None,
        [bits(x) for x in xs],
        model_params,
        params,
        out_bf16=bf16,
        check_finite=True,
        **shaped,
    )
    assert kept is agreed is None
    assert got.dtype == want_bits.dtype and np.array_equal(got.view(np.uint8), want_bits.view(np.uint8))
    merged, *counts, bad_inputs, bad_32, bad_out = TORCH_METHODS[method](
        host_tensor(bits(base)) if base is not None else None,
        [host_tensor(bits(x)) for x in xs],
        model_params,
        params,
        torch.bfloat16 if bf16 else torch.float32,
        **shaped,
    )
    assert counts == [None, None] and bad_inputs == [0] * (len(xs) + (base is not None)) and bad_32 == bad_out == 0
    assert np.array_equal(bits(merged).view(np.uint8), want_bits.view(np.uint8))


def inputs(n, models, bf16, seed, with_base):
    base, xs = make_inputs(n, models, bf16, seed)
    return (base if with_base else None), xs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernels_and_torch_engine_equal_the_reference_bit_for_bit(shape, bf16, case):
    method, model_params, params, with_base = CASES[case]
    base, xs = inputs(math.prod(shape), len(model_params), bf16, math.prod(shape) + case, with_base)
    check(method, model_params, params, base, xs, shape, bf16)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("case", [0, 4, 7, 8, 11])
def test_more_than_a_torch_engine_chunk(bf16, case):
    method, model_params, params, with_base = CASES[case]
    n = CHUNK + 3
    base, xs = inputs(n, len(model_params), bf16, case, with_base)
    check(method, model_params, params, base, xs, (n,), bf16)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("case", [0, 2, 3, 4])
def test_near_collinear_inputs_take_the_linear_branch(bf16, case):
    """Inputs (task vectors, for nuslerp with a base) nearly parallel: slerp's |cos| > 0.9995
    and nuslerp's 1 - cos^2 <= 1e-16 take the linear interpolation."""
    method, model_params, params, with_base = CASES[case]
    n = 4096  # a power of 4: unit vectors of entries +-0.25 are +-1/64, their dot exactly +-1
    g = torch.Generator().manual_seed(case)
    base = torch.randint(-60, 61, (n,), generator=g) / 64.0
    if method == "slerp":
        xs = [base * 1.5 + 1e-3 * torch.randn(n, generator=g)]
    else:
        d = torch.where(torch.rand(n, generator=g) < 0.5, -0.25, 0.25)
        xs = [base + d, base + 2 * d] if with_base else [d, -4 * d]
    dtype = torch.bfloat16 if bf16 else torch.float32
    base, xs = base.to(dtype), [x.to(dtype) for x in xs]
    if method == "slerp":
        c0, c1 = slerp_coefficients(params["t"], host_tensor(bits(base)), host_tensor(bits(xs[0])))
        assert c0 == 1 - c1  # the linear branch's (1 - t, t)
    else:
        raw = [host_tensor(bits(x)) for x in xs]
        co = nuslerp_coefficients(0.5, *raw, host_tensor(bits(base)) if with_base else None, (n,), False)
        assert co.count == 1 and co.d[0] == 1  # the linear branch: nothing to divide by
    check(method, model_params, params, base if with_base else None, xs, (n,), bf16)


@pytest.mark.parametrize("bf16", [False, True])
def test_karcher_degenerate_inputs(bf16):
    """Inputs too short to steer: zeros; inputs that cancel (the first steering unit vector
    starts the iteration); an input that is zero beside one that is not."""
    n = 3000
    dtype = torch.bfloat16 if bf16 else torch.float32
    v = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype)
    params = {"max_iter": 10, "tol": 1e-5}
    check("karcher", [{}], params, (v * 1e-9).to(dtype), [(v * 1e-9).to(dtype)], (n,), bf16)
    check("karcher", [{}, {}], params, None, [v, -v], (n,), bf16)
    check("karcher", [{}, {}], params, torch.zeros(n, dtype=dtype), [v, (2 * v).to(dtype)], (n,), bf16)


@pytest.mark.parametrize("bf16", [False, True])
def test_multislerp_degenerate_inputs_run_the_reference(bf16):
    """Weighted directions that cancel: two models give their weighted sum, three raise
    DegenerateInput on every path; with a base no model changed, the base."""
    n = 3000
    dtype = torch.bfloat16 if bf16 else torch.float32
    v = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    two = [{"weight": 1.0}, {"weight": 1.0}]
    check("multislerp", two, MULTI, None, [v, -v], (n,), bf16)
    check("multislerp", two, MULTI, v, [v.clone(), v.clone()], (n,), bf16)
    three = [{"weight": 1.0}, {"weight": 1.0}, {"weight": 2.0}]
    xs = [v, v, -v]
    with pytest.raises(DegenerateInput):
        FAST_PATHS["multislerp"](None, [bits(x) for x in xs], three, MULTI, out_bf16=bf16)
    with pytest.raises(DegenerateInput):
        TORCH_METHODS["multislerp"](None, [host_tensor(bits(x)) for x in xs], three, MULTI, None)


@pytest.mark.parametrize("case", [0, 3, 4, 8, 11])
@pytest.mark.parametrize("which", [-1, 0, 1])
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_nan_and_inf_inputs_are_refused(case, which, bad):
    method, model_params, params, with_base = CASES[case]
    if (which == -1 and not with_base) or which >= len(model_params):
        return
    n = kernels.BLOCK * 5
    base, xs = inputs(n, len(model_params), False, 4, with_base)
    (base if which == -1 else xs[which])[n - 7] = bad
    shaped = {"shape": (n,)} if method in SHAPED else {}
    with pytest.raises(NonFiniteInput) as e:
        FAST_PATHS[method](
            bits(base) if base is not None else None,
            [bits(x) for x in xs],
            model_params,
            params,
            check_finite=True,
            **shaped,
        )
    assert e.value.which == which
    *_, bad_inputs, _, _ = TORCH_METHODS[method](
        host_tensor(bits(base)) if base is not None else None,
        [host_tensor(bits(x)) for x in xs],
        model_params,
        params,
        None,
        **shaped,
    )
    everyone = ([base] if base is not None else []) + xs
    assert bad_inputs == [int(t is (base if which == -1 else xs[which])) for t in everyone]


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_per_vector_mixes_the_linear_and_spherical_branches(bf16, row_wise, with_base):
    """Vectors (rows, or columns with row_wise) of 64 entries: some exactly proportional (the
    linear branch, 1 - cos^2 = 0), the others not; each takes its own branch."""
    from lrmerge_hub.merge.geometric import nuslerp

    g = torch.Generator().manual_seed(int(row_wise) + 2 * int(with_base))
    vectors, size = 9, 64  # 64 entries of +-0.25: unit entries +-1/8, a dot of exactly +-1
    base = torch.randint(-60, 61, (vectors, size), generator=g) / 64.0
    d0 = torch.where(torch.rand(vectors, size, generator=g) < 0.5, -0.25, 0.25)
    d1 = -2 * d0
    flips = torch.where(torch.rand(vectors // 2, size, generator=g) < 0.125, -1.0, 1.0)
    d1[1::2] *= flips  # cos about 0.75 there: not collinear
    xs = [base + d0, base + d1] if with_base else [d0, d1]
    if row_wise:
        base, xs = base.T.contiguous(), [x.T.contiguous() for x in xs]
    dtype = torch.bfloat16 if bf16 else torch.float32
    base, xs = base.to(dtype), [x.to(dtype) for x in xs]
    params = {"nuslerp_flatten": False, "nuslerp_row_wise": row_wise}
    model_params = [{"weight": 0.4}, {"weight": 0.9}]
    raw = [host_tensor(bits(x)) for x in xs]
    co = nuslerp_coefficients(0.3, *raw, host_tensor(bits(base)) if with_base else None, tuple(base.shape), row_wise)
    assert co.count == vectors and (co.d == 1).sum() == (vectors + 1) // 2
    check("nuslerp", model_params, params, base if with_base else None, xs, tuple(base.shape), bf16)
    b = base.float() if with_base else 0.0
    got = nuslerp(0.3, xs[0].float() - b, xs[1].float() - b, row_wise=row_wise, flatten=False)
    assert not torch.equal(
        got, nuslerp(0.3, xs[0].float() - b, xs[1].float() - b, row_wise=not row_wise, flatten=False)
    )


def test_shaped_and_covered():
    assert {"nuslerp", "model_stock"} <= SHAPED
    assert covered(METHODS["nuslerp"], False, NUSLERP, 2)
    assert covered(METHODS["nuslerp"], True, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, 2)
    assert covered(METHODS["model_stock"], True, {"filter_wise": True}, 7)
    assert covered(METHODS["multislerp"], False, MULTI, 9)


ENGINE_CASES = [
    ("slerp", {"t": 0.35}, [{}], True),
    ("nuslerp", {}, [{"weight": 0.7}, {"weight": 0.4}], True),
    ("multislerp", {}, [{"weight": 0.7}, {"weight": 0.4}], False),
    ("model_stock", {}, [{}, {}], True),
    ("model_stock", {"filter_wise": True}, [{}, {}], True),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, [{"weight": 0.7}, {"weight": 0.4}], False),
    ("karcher", {}, [{}, {}], True),
    ("karcher", {"max_iter": 4}, [{}, {}], False),
]


@pytest.mark.parametrize("case", range(len(ENGINE_CASES)))
@pytest.mark.parametrize("engine_name", ["kernels", "torch"])
def test_engine_takes_the_fast_paths_and_writes_the_reference_bytes(tmp_path, monkeypatch, case, engine_name):
    """A merge through the engine gives the same bytes with the kernels, or the torch engine
    on the CPU, as with the reference path, and the fast path is the one called for every
    tensor (the language model extending the vocabulary: the shared rows are merged)."""
    from lrmerge_hub.recipe.spec import parse_recipe
    from lrmerge_hub.synth.tiny import make_family

    method, params, model_params, with_base = ENGINE_CASES[case]
    fam = make_family(
        tmp_path / "fam", hidden=128, intermediate=256, layers=1, heads=4, dtype="bfloat16", extend_language_vocab=8
    )
    roles = ["language", "task"][-len(model_params) :]
    recipe = parse_recipe(
        {
            "method": method,
            **({"base": str(fam["base"])} if with_base else {}),
            "models": [
                {"model": str(fam[role]), "role": role, **p} for role, p in zip(roles, model_params, strict=True)
            ],
            "parameters": params,
            "languages": ["bo"],
            "license": "apache-2.0",
            "output": str(tmp_path / "out"),
        },
        tmp_path,
    )
    a, b, calls = merge_both_ways(monkeypatch, tmp_path, recipe, method, engine_name)
    assert len(calls) == len(a.tensors)
    assert_same_outputs(a, b)


def test_scratch_arrays_are_reused_per_slot_and_freed_after_a_merge(tmp_path, monkeypatch):
    """sphere_fills.scratch hands the same memory to the next call for a slot (no fresh pages per
    tensor), a larger one when a tensor needs more, and the engine frees them after a merge."""
    first = sphere_fills.scratch("reduce", 1000)
    assert sphere_fills.scratch("reduce", 400).__array_interface__["data"][0] == first.__array_interface__["data"][0]
    assert sphere_fills.scratch("mean", 400).__array_interface__["data"][0] != first.__array_interface__["data"][0]
    assert sphere_fills.scratch("reduce", 5000).shape == (5000,)
    karcher = 6  # ENGINE_CASES[6]: three slots
    test_engine_takes_the_fast_paths_and_writes_the_reference_bytes(tmp_path, monkeypatch, karcher, "kernels")
    assert "arrays" not in sphere_fills._SCRATCH.__dict__
