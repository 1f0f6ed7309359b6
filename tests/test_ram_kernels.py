"""RAM's, RAM+'s and layer swapping's kernels (kernels.fused_ram, fused_layer_swap) and their
torch-engine twins (torch_engine.ram_merge, layer_swap_merge) write the bits of the
references in methods.py: on bfloat16 and float32 inputs, 1-D and 2-D, at sizes past a
block and a chunk, with 1-4 models that change overlapping subsets of the entries, task
vectors exactly at +-epsilon and its float32 neighbours, epsilon 0 and an epsilon that
float32 rounds up, +-0.0 everywhere, RAM+'s counts and gains, and layer swapping's whole and
blended shares; NaN/Inf inputs are refused; and the engine takes them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.kernel_support import assert_same_outputs, merge_both_ways
from lrmerge_hub.merge import kernels
from lrmerge_hub.merge.engine import SUMMED_MODELS_MAX, covered
from lrmerge_hub.merge.kernels import FAST_PATHS, NonFiniteInput, NonFiniteOutput
from lrmerge_hub.merge.methods import METHODS, _layer_swap_shares, _ram_terms, ramplus_gains
from lrmerge_hub.merge.torch_engine import CHUNK, TORCH_METHODS, host_tensor
from tests.test_elementwise_kernels import bits

# a scalar; 1-D: one entry, 7, one more than a block, uneven parallel chunks; 2-D
SHAPES = [(), (1,), (7,), (kernels.BLOCK + 1,), (kernels.CHUNKS * kernels.BLOCK * 3 + 13,), (203, 67)]
RAM_CASES = [  # (method, models, params)
    ("ram", 2, {"epsilon": 1e-5}),
    ("ram", 3, {"epsilon": 0.02}),
    ("ram", 4, {"epsilon": 0.0}),
    ("ram", 1, {"epsilon": 0.1}),  # float32 rounds 0.1 up: a task vector of float32(0.1) is no change
    ("ramplus_tl", 2, {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}),
    ("ramplus_tl", 3, {"epsilon": 0.02, "r": 3.0, "alpha": 50.0}),  # rho uncapped: every count shows
    ("ramplus_tl", 4, {"epsilon": 0.1, "r": 0.7, "alpha": 0.5}),
]


def dtype_of(bf16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float32


def near(value: float, bf16: bool) -> list[float]:
    """value as the input dtype holds it, and its neighbours on either side."""
    if not bf16:
        v = np.float32(value)
        return [float(v), float(np.nextafter(v, np.float32(1.0))), float(np.nextafter(v, np.float32(0.0)))]
    b = int(torch.tensor([value]).to(torch.bfloat16).view(torch.int16)[0])  # non-negative: value >= 0
    return [float(torch.tensor([c], dtype=torch.int16).view(torch.bfloat16)[0]) for c in (b, b + 1, max(b - 1, 0))]


def ram_inputs(n: int, models: int, bf16: bool, epsilon: float, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and models, each of which changes a random half of the entries (so entries are
    changed by none, one or several), with a leading run of +-0.0 and task vectors of
    exactly +-epsilon (as the input dtype holds it, and its neighbours) over a base of +-0."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    xs = []
    for _ in range(models):
        changes = torch.rand(n, generator=g) < 0.5
        xs.append(torch.where(changes, base + 0.05 * torch.randn(n, generator=g), base))
    edges = [s * v for v in near(epsilon, bf16) for s in (1.0, -1.0)] + [0.0, -0.0]
    head = min(n, 4 * len(edges))
    for j in range(head):
        base[j] = -0.0 if j % 3 else 0.0
        for i, x in enumerate(xs):
            x[j] = edges[(j + i * 5) % len(edges)]
    dtype = dtype_of(bf16)
    return base.to(dtype), [x.to(dtype) for x in xs]


def reference(method: str, base, xs, model_params, params, shape, bf16: bool) -> np.ndarray:
    out, _ = METHODS[method].fn(
        base.float().reshape(shape) if base is not None else None,
        [x.float().reshape(shape) for x in xs],
        model_params,
        params,
    )
    return bits(out.to(dtype_of(bf16)) if bf16 else out)


def fast(method, base, xs, model_params, params, bf16):
    got, kept, agreed = FAST_PATHS[method](
        bits(base) if base is not None else None,
        [bits(x) for x in xs],
        model_params,
        params,
        out_bf16=bf16,
        check_finite=True,
    )
    assert kept is None and agreed is None
    return got


def torch_engine(method, base, xs, model_params, params, out_dtype):
    return TORCH_METHODS[method](
        host_tensor(bits(base)) if base is not None else None,
        [host_tensor(bits(x)) for x in xs],
        model_params,
        params,
        out_dtype,
    )


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))


def check_ram(method, models, params, shape, bf16, seed):
    n = math.prod(shape)
    base, xs = ram_inputs(n, models, bf16, params["epsilon"], seed)
    model_params = [{}] * models
    want = reference(method, base, xs, model_params, params, shape, bf16)
    assert_same_bits(fast(method, base, xs, model_params, params, bf16), want)
    merged, kept, agreed, bad_inputs, bad_32, bad_out = torch_engine(
        method, base, xs, model_params, params, dtype_of(bf16)
    )
    assert (kept, agreed) == (None, None)
    assert bad_inputs == [0] * (models + 1) and bad_32 == bad_out == 0
    assert_same_bits(bits(merged), want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("case", range(len(RAM_CASES)))
def test_ram_kernels_and_torch_engine_equal_the_reference_bit_for_bit(shape, bf16, case):
    method, models, params = RAM_CASES[case]
    check_ram(method, models, params, shape, bf16, seed=math.prod(shape) + case)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_past_a_torch_engine_chunk(method):
    check_ram(method, 3, {"epsilon": 0.02, "r": 2.0, "alpha": 10.0}, (CHUNK + 9,), True, seed=5)


def test_epsilon_is_compared_in_float32_and_a_change_of_exactly_epsilon_is_none():
    """|tv| > epsilon as torch compares a float32 tensor with a Python float: in float32, so a
    task vector of float32(0.1) (above 0.1 as a double) is no change, and the next float is
    one; the reference agrees, so the test tells the two comparisons apart."""
    e32 = np.float32(0.1)
    assert float(e32) > 0.1
    above = np.nextafter(e32, np.float32(1.0))
    x = torch.tensor([e32, -e32, above, -above, 0.0], dtype=torch.float32)
    base = torch.zeros(5)
    want = np.array([0.0, 0.0, above, -above, 0.0], dtype=np.float32)
    for method in ("ram", "ramplus_tl"):
        params = {"epsilon": 0.1, "r": 0.1, "alpha": 0.2}
        ref = reference(method, base, [x], [{}], params, (5,), False)
        assert_same_bits(ref, want)
        assert_same_bits(fast(method, base, [x], [{}], params, False), want)
        assert_same_bits(bits(torch_engine(method, base, [x], [{}], params, None)[0]), want)


def test_ramplus_counts_what_the_reference_counts(monkeypatch):
    """The counting pass gives each model's shared and unique changed entries exactly (the
    reference's int64 sums), and the gains come from them."""
    n, models, params = kernels.CHUNKS * kernels.BLOCK + 77, 3, {"epsilon": 0.02, "r": 0.5, "alpha": 4.0}
    base, xs = ram_inputs(n, models, True, params["epsilon"], seed=11)
    _, changed, _, overlap, unique = _ram_terms(base.float(), [x.float() for x in xs], params["epsilon"])
    want = ((changed & overlap).sum(dim=1).tolist(), (changed & unique).sum(dim=1).tolist())
    assert all(want[0]) and all(want[1])
    seen = []
    real = kernels.ramplus_gains_float32

    def spy(shared, unique, params):
        seen.append((shared, unique))
        return real(shared, unique, params)

    monkeypatch.setattr(kernels, "ramplus_gains_float32", spy)
    fast("ramplus_tl", base, xs, [{}] * models, params, True)
    assert seen == [want]


def test_ramplus_gains_in_numpy_are_the_references_bits():
    """ramplus_gains_float32 (numpy) against methods.ramplus_gains (torch) on random counts up
    to 10^10 (past float32's exact integers), no unique entry, and parameters of 0, subnormal,
    ordinary and near float32's largest; beyond float32's range the reference itself runs."""
    rng = np.random.default_rng(0)

    def number() -> float:
        return [0.0, 1e-45, 0.1, 0.2, float(rng.random()), float(10 ** rng.uniform(-45, 38.5))][rng.integers(0, 6)]

    for trial in range(3000):
        models, scale = int(rng.integers(1, 5)), 10 ** int(rng.integers(0, 11))
        shared, unique = rng.integers(0, scale + 1, models).tolist(), rng.integers(0, scale + 1, models).tolist()
        if trial % 7 == 0:
            unique = [0] * models
        params = {"r": number(), "alpha": number(), "epsilon": number()}
        want = ramplus_gains(torch.tensor(shared), torch.tensor(unique), params).numpy()
        got = kernels.ramplus_gains_float32(shared, unique, params)
        assert got.dtype == np.float32 and np.array_equal(got.view(np.int32), want.view(np.int32)), params
    with pytest.raises(RuntimeError):  # torch refuses a cap it cannot hold: so does the fast path
        kernels.ramplus_gains_float32([1], [2], {"r": 0.1, "alpha": 1e39, "epsilon": 1e-5})


LAYER_SWAP_SHARES = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1 / 3, 1 - 1 / 3), (0.75, 0.25)]


def swap_inputs(n: int, bf16: bool, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=g) for _ in range(2)]
    for x in xs:
        x[: min(n, 3)] = -0.0
    return [x.to(dtype_of(bf16)) for x in xs]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shares", LAYER_SWAP_SHARES)
def test_layer_swap_kernels_and_torch_engine_equal_the_reference_bit_for_bit(shape, bf16, shares):
    xs = swap_inputs(math.prod(shape), bf16, seed=len(shape) + int(shares[0] * 100))
    model_params = [{"share": s} for s in shares]
    want = reference("layer_swap", None, xs, model_params, {}, shape, bf16)
    got = fast("layer_swap", None, xs, model_params, {}, bf16)
    assert_same_bits(got, want)
    if 1.0 in shares:  # the expert's own bits, copied: the writer may read them after the input is released
        assert not np.shares_memory(got, bits(xs[shares.index(1.0)]))
    merged, _, _, bad_inputs, bad_32, bad_out = torch_engine("layer_swap", None, xs, model_params, {}, dtype_of(bf16))
    assert bad_inputs == [0, 0] and bad_32 == bad_out == 0
    assert_same_bits(bits(merged), want)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("shares", [(1.0, 0.0), (0.25, 0.75)])
def test_layer_swap_into_the_other_float_dtype(bf16, shares):
    """bfloat16 in, float32 out, and float32 in (values past bfloat16's range included, which
    round to Inf and are refused), bfloat16 out."""
    n = kernels.BLOCK * 3 + 5
    xs = swap_inputs(n, bf16, seed=3)
    model_params = [{"share": s} for s in shares]
    out_bf16 = not bf16
    want = reference("layer_swap", None, xs, model_params, {}, (n,), out_bf16)
    assert_same_bits(fast("layer_swap", None, xs, model_params, {}, out_bf16), want)
    assert_same_bits(bits(torch_engine("layer_swap", None, xs, model_params, {}, dtype_of(out_bf16))[0]), want)
    if not bf16:
        xs[0][7] = xs[1][7] = 3.4e38  # finite in float32, Inf in bfloat16 (and so is the blend)
        with pytest.raises(NonFiniteOutput):
            fast("layer_swap", None, xs, model_params, {}, True)
        *_, bad_32, bad_out = torch_engine("layer_swap", None, xs, model_params, {}, torch.bfloat16)
        assert bad_32 == 0 and bad_out == 1


def test_layer_swap_blends_with_two_roundings_not_a_fused_multiply_add():
    """share0 * x0 + share1 * x1 is rounded after each product and after the sum, as torch's
    separate operations; a fused multiply-add would differ in many entries."""
    xs = swap_inputs(5000, False, seed=9)
    shares = (1 / 3, 2 / 3)
    s0, s1 = np.float32(shares[0]), np.float32(shares[1])
    x0, x1 = xs[0].numpy(), xs[1].numpy()
    two = (s0 * x0) + (s1 * x1)
    fma = (x0.astype(np.float64) * s0 + (s1 * x1).astype(np.float64)).astype(np.float32)
    assert np.count_nonzero(two != fma) > 10
    got = fast("layer_swap", None, xs, [{"share": s} for s in shares], {}, False)
    assert_same_bits(got, two)


@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "layer_swap"])
@pytest.mark.parametrize("which", [-1, 0, 1])
@pytest.mark.parametrize("bad_value", [math.nan, -math.inf])
def test_nan_and_inf_inputs_are_refused(method, which, bad_value):
    n = kernels.BLOCK * 5 + 3
    takes_base = method != "layer_swap"
    if which == -1 and not takes_base:
        which = 1
    base, xs = ram_inputs(n, 2, False, 1e-5, seed=4)
    # layer_swap refuses even the input a share of 1.0 does not use
    model_params = [{"share": 0.0}, {"share": 1.0}] if not takes_base else [{}, {}]
    params = {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}
    (base if which == -1 else xs[which])[n - 9] = bad_value
    with pytest.raises(NonFiniteInput) as e:
        fast(method, base if takes_base else None, xs, model_params, params, False)
    assert e.value.which == which
    *_, bad_inputs, _, _ = torch_engine(method, base if takes_base else None, xs, model_params, params, None)
    labels = [-1, 0, 1] if takes_base else [0, 1]
    assert bad_inputs == [int(which == k) for k in labels]


def test_a_task_vector_past_float32_is_refused_as_the_reference_refuses_it():
    base = torch.zeros(100)
    x = torch.ones(100)
    base[4], x[4] = -3e38, 3e38  # x - base overflows to Inf
    params = {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}
    for method in ("ram", "ramplus_tl"):
        ref, _ = METHODS[method].fn(base, [x, x], [{}, {}], params)
        assert not bool(ref.isfinite().all())
        with pytest.raises(NonFiniteOutput):
            fast(method, base, [x, x], [{}, {}], params, False)
        *_, bad_32, bad_out = torch_engine(method, base, [x, x], [{}, {}], params, None)
        assert bad_32 == bad_out == 1


def test_covered_takes_ram_up_to_the_summed_models_and_layer_swap_without_a_base():
    for name in ("ram", "ramplus_tl"):
        assert name in FAST_PATHS and name in TORCH_METHODS
        assert covered(METHODS[name], True, {}, SUMMED_MODELS_MAX)
        assert not covered(METHODS[name], True, {}, SUMMED_MODELS_MAX + 1)
        assert not covered(METHODS[name], False, {}, 2)
    assert covered(METHODS["layer_swap"], False, {}, 2)


def test_layer_swap_shares_reach_the_fast_path_per_tensor():
    """The shares the engine hands over come from methods._layer_swap_shares."""
    params = {"bottom": 1, "top": 1, "blend": 1}
    mp, _ = _layer_swap_shares([{}, {}], params, ["task", "language"], 2, 5)
    assert [p["share"] for p in mp] == [1.0, 0.0]
    mp, _ = _layer_swap_shares([{}, {}], params, ["task", "language"], 1, 5)
    assert [p["share"] for p in mp] == [0.5, 0.5]


ENGINE_RECIPES = {
    "ram": ({"epsilon": 0.01}, True),
    "ramplus_tl": ({"epsilon": 0.01, "r": 2.0, "alpha": 5.0}, True),
    "layer_swap": ({"bottom": 1, "top": 1, "blend": 1}, False),
}


@pytest.mark.parametrize("method", sorted(ENGINE_RECIPES))
@pytest.mark.parametrize("engine_name", ["kernels", "torch"])
def test_engine_takes_the_fast_paths_and_writes_the_reference_bytes(tmp_path, monkeypatch, method, engine_name):
    """A merge through the engine (layer_swap over 5 layers: whole, blended and middle
    layers) gives the same bytes with the kernels, or the torch engine on the CPU, as with
    the reference path; the fast path is the one called, for every tensor."""
    from lrmerge_hub.recipe.spec import parse_recipe
    from lrmerge_hub.synth.tiny import make_family

    params, has_base = ENGINE_RECIPES[method]
    fam = make_family(tmp_path / "fam", hidden=128, intermediate=256, layers=5, heads=2, dtype="bfloat16")
    data = {
        "method": method,
        "models": [
            {"model": str(fam["task"]), "role": "task"},
            {"model": str(fam["language"]), "role": "language"},
        ],
        "parameters": params,
        "languages": ["bo"],
        "license": "apache-2.0",
        "output": str(tmp_path / "out"),
    }
    if has_base:
        data["base"] = str(fam["base"])
    recipe = parse_recipe(data, tmp_path)
    a, b, calls = merge_both_ways(monkeypatch, tmp_path, recipe, method, engine_name)
    assert len(calls) == len(a.tensors)
    if method == "layer_swap":  # model_params, the third argument, carry the shares
        assert {tuple(p["share"] for p in args[2]) for args, _ in calls} == {(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)}
    assert_same_outputs(a, b)
