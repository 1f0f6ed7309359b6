"""The fused elementwise kernels (kernels.fused_elementwise: linear, task_arithmetic,
passthrough, nearswap) and their torch-engine twin (torch_engine.elementwise_merge) write the bits of
the references in methods.py, on bfloat16 and float32 inputs, at sizes that are not a
multiple of a block or chunk, with -0.0 entries (Python's sum() starts from +0), negative
weights, lambda != 1 and normalize on and off; and the engine takes them for a recipe with
and without a base."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrmerge_hub.merge import kernels
from lrmerge_hub.merge.kernels import FAST_PATHS, NonFiniteInput, NonFiniteOutput
from lrmerge_hub.merge.methods import METHODS
from lrmerge_hub.merge.torch_engine import CHUNK, TORCH_METHODS, host_tensor

# 1 and 7 entries; one more than a block; a size that splits into uneven parallel chunks;
# more than the torch engine's chunk
SIZES = [1, 7, kernels.BLOCK + 1, kernels.CHUNKS * kernels.BLOCK * 3 + 13, CHUNK + 12_345]


def make_inputs(n: int, models: int, bf16: bool, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and models (bfloat16 or float32) whose first entries are +-0.0."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    xs = [base + 0.05 * torch.randn(n, generator=g) for _ in range(models)]
    zeros = min(n, 5)
    base[:zeros] = 0.0
    for x in xs:
        x[:zeros] = -0.0
    dtype = torch.bfloat16 if bf16 else torch.float32
    return base.to(dtype), [x.to(dtype) for x in xs]


def bits(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view as the kernels take it: bfloat16 as its uint16 bits."""
    flat = t.reshape(-1)
    return flat.view(torch.int16).numpy().view(np.uint16) if flat.dtype == torch.bfloat16 else flat.numpy()


def reference(method: str, base, xs, model_params, params, out_bf16: bool) -> np.ndarray:
    """methods.py's function on float32 copies, stored as the engine stores it."""
    has_base = METHODS[method].takes_base
    out, _ = METHODS[method].fn(base.float() if has_base else None, [x.float() for x in xs], model_params, params)
    return bits(out.to(torch.bfloat16) if out_bf16 else out.float())


CASES = [  # (method, weights (scale for passthrough), params)
    ("linear", [0.3, 0.7], {"normalize": True}),
    ("linear", [0.6, -0.25, 1.1], {"normalize": True}),
    ("linear", [0.6, -0.25, 1.1], {"normalize": False}),
    ("linear", [-1.7], {"normalize": False}),
    ("task_arithmetic", [1.0, 1.0], {"lambda": 1.0}),
    ("task_arithmetic", [0.8, -0.45, 1.3], {"lambda": 0.7}),
    ("task_arithmetic", [-0.3], {"lambda": 1.9}),
    ("passthrough", [1.0], {}),
    ("passthrough", [-0.37], {}),
    ("nearswap", [1.0], {"t": 0.03}),  # deltas ~0.05: some entries swapped, some blended
    ("nearswap", [1.0], {"t": 1e-7}),  # below the 1e-6 floor of the distance
]


def case_params(method: str, weights: list[float]) -> list[dict]:
    key = "scale" if method == "passthrough" else "weight"
    return [{key: w} for w in weights]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernels_and_torch_engine_equal_the_reference_bit_for_bit(n, bf16, case):
    method, weights, params = CASES[case]
    model_params = case_params(method, weights)
    base, xs = make_inputs(n, len(weights), bf16, seed=n + case)
    want = reference(method, base, xs, model_params, params, out_bf16=bf16)
    raw_base = bits(base) if METHODS[method].takes_base else None
    got, kept, agreed = FAST_PATHS[method](
        raw_base, [bits(x) for x in xs], model_params, params, out_bf16=bf16, check_finite=True
    )
    assert (kept, agreed) == (None, None)
    assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8))
    out_dtype = torch.bfloat16 if bf16 else torch.float32
    merged, *_, bad_inputs, bad_32, bad_out = TORCH_METHODS[method](
        host_tensor(raw_base) if raw_base is not None else None,
        [host_tensor(bits(x)) for x in xs],
        model_params,
        params,
        out_dtype,
    )
    assert bad_inputs == [0] * (len(xs) + (raw_base is not None)) and bad_32 == bad_out == 0
    assert np.array_equal(bits(merged).view(np.uint8), want.view(np.uint8))


def test_linear_with_a_base_ignores_it_but_refuses_nan_in_it():
    base, xs = make_inputs(1000, 2, False, seed=5)
    model_params, params = case_params("linear", [0.4, 0.6]), {"normalize": True}
    with_base, _, _ = FAST_PATHS["linear"](bits(base), [bits(x) for x in xs], model_params, params)
    without, _, _ = FAST_PATHS["linear"](None, [bits(x) for x in xs], model_params, params)
    assert np.array_equal(with_base.view(np.uint8), without.view(np.uint8))
    base[17] = float("nan")
    with pytest.raises(NonFiniteInput) as e:
        FAST_PATHS["linear"](bits(base), [bits(x) for x in xs], model_params, params, check_finite=True)
    assert e.value.which == -1


@pytest.mark.parametrize("with_base", [True, False])
def test_nan_inputs_and_overflow_are_reported_with_their_position(with_base):
    base, xs = make_inputs(40_000, 3, False, seed=6)
    xs[1][39_999] = float("inf")
    raw_base = bits(base) if with_base else None
    method = "task_arithmetic" if with_base else "linear"
    params = {"lambda": 1.0} if with_base else {"normalize": False}
    with pytest.raises(NonFiniteInput) as e:
        FAST_PATHS[method](raw_base, [bits(x) for x in xs], case_params(method, [1, 1, 1]), params, check_finite=True)
    assert e.value.which == 1
    _, *_, bad_inputs, _, _ = TORCH_METHODS[method](
        host_tensor(raw_base) if with_base else None,
        [host_tensor(bits(x)) for x in xs],
        case_params(method, [1, 1, 1]),
        params,
        torch.float32,
    )
    assert bad_inputs == [0] * with_base + [0, 1, 0]
    xs[1][39_999] = 0.0
    huge, params = case_params(method, [3e38, 3e38, 1.0]), {**params, "lambda": 100.0}  # deltas are ~0.05
    with pytest.raises(NonFiniteOutput):
        FAST_PATHS[method](raw_base, [bits(x) for x in xs], huge, params, check_finite=True)


@pytest.mark.parametrize(("method", "has_base"), [("linear", True), ("linear", False), ("task_arithmetic", True)])
def test_engine_takes_the_kernels_and_writes_the_reference_bytes(tmp_path, monkeypatch, method, has_base):
    """A merge through the engine gives the same bytes with the kernels as with the reference
    path (FAST_PATHS emptied), and the kernels are the ones called."""
    from lrmerge_hub.merge import engine
    from lrmerge_hub.merge.st_io import SafetensorsModel
    from lrmerge_hub.recipe.spec import parse_recipe
    from lrmerge_hub.synth.tiny import make_family

    fam = make_family(
        tmp_path / "fam", hidden=256, intermediate=512, layers=1, heads=4, dtype="bfloat16", extend_language_vocab=3
    )
    data = {
        "method": method,
        "models": [
            {"model": str(fam["language"]), "role": "language", "weight": 0.7},
            {"model": str(fam["task"]), "role": "task", "weight": -0.2},
        ],
        "parameters": {"normalize": True} if method == "linear" else {"lambda": 0.8},
        "languages": ["bo"],
        "license": "apache-2.0",
        "output": str(tmp_path / "out"),
    }
    if has_base:
        data["base"] = str(fam["base"])
    recipe = parse_recipe(data, tmp_path)
    sources = engine.local_sources(recipe)
    calls = []
    fast_path = FAST_PATHS[method]
    monkeypatch.setitem(engine.FAST_PATHS, method, lambda *a, **kw: calls.append(1) or fast_path(*a, **kw))
    engine.merge(recipe, sources, tmp_path / "fast", device="cpu", engine="kernels", progress=False)
    assert calls  # the kernels merged the tensors
    monkeypatch.setattr(engine, "FAST_PATHS", {})
    engine.merge(recipe, sources, tmp_path / "slow", device="cpu", engine="kernels", progress=False)
    a, b = SafetensorsModel(tmp_path / "fast", "fast"), SafetensorsModel(tmp_path / "slow", "slow")
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert torch.equal(a.get(name).view(torch.int16), b.get(name).view(torch.int16)), name


def test_linear_accumulates_with_one_rounding_per_model_as_mergekits_addcmul():
    """mergekit's linear is out.addcmul_(t, w) from zeros: each model's w * t added with one
    rounding (a fused multiply-add). Ours gives that, checked against exact rationals; two
    roundings (multiply, then add) would differ in many entries at these weights."""
    from fractions import Fraction

    g = torch.Generator().manual_seed(3)
    t0, t1 = torch.randn(400, generator=g), torch.randn(400, generator=g)
    w0, w1 = np.float32(0.3), np.float32(0.7)
    got, _ = METHODS["linear"].fn(None, [t0, t1], [{"weight": 0.3}, {"weight": 0.7}], {"normalize": False})
    two_roundings = (t0 * float(w0)) + (t1 * float(w1))
    assert (got != two_roundings).sum() > 10  # the test tells the two apart
    for a, b, r in zip(t0.tolist(), t1.tolist(), got.tolist(), strict=True):
        first = np.float32(np.float32(a) * w0)  # the first model: one product, rounded
        exact = Fraction(float(b)) * Fraction(float(w1)) + Fraction(float(first))
        r32 = np.float32(r)
        neighbours = (np.nextafter(r32, np.float32(-np.inf)), np.nextafter(r32, np.float32(np.inf)))
        assert all(abs(exact - Fraction(float(r32))) <= abs(exact - Fraction(float(n))) for n in neighbours)
