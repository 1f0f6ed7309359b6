"""Breadcrumbs and Breadcrumbs-TIES on the fused kernels (kernels.fused_cuts: the TIES trim
with a second, upper cut per model) and on the torch engine (torch_engine.cut_merge): the
bits of the references in methods.py, on float32 and bfloat16 inputs, at sizes below and
above MIN_FAST_NUMEL that are not a multiple of a block or chunk, with densities and gammas
at their edges, thousands of equal magnitudes at the cuts, -0.0 entries and negative
weights; NaN/Inf inputs refused; and the engine's choice of path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrmerge_hub.merge import kernels
from lrmerge_hub.merge.engine import SUMMED_MODELS_MAX, covered
from lrmerge_hub.merge.kernels import FAST_PATHS, NonFiniteInput, NonFiniteOutput
from lrmerge_hub.merge.methods import METHODS
from lrmerge_hub.merge.torch_engine import CHUNK, TORCH_METHODS, host_tensor
from lrmerge_hub.merge.trim import outlier_ranks

METHOD_NAMES = ["breadcrumbs", "breadcrumbs_ties"]
# 1 and 7 entries; one more than a block (below MIN_FAST_NUMEL: every entry selected
# exactly); above MIN_FAST_NUMEL (the sampled bracket), in uneven parallel chunks
SIZES = [1, 7, kernels.BLOCK + 1, kernels.MIN_FAST_NUMEL + 12_345]

CASES = [  # (model params, global params)
    (
        [
            dict(weight=1.0, density=0.3, gamma=0.01, slack=0.0),
            dict(weight=-0.7, density=0.5, gamma=0.2, slack=0.5),
            dict(weight=1.3, density=1.0, gamma=0.1, slack=2.0),  # density 1: every entry
        ],
        {"lambda": 0.9, "normalize": True},
    ),
    (
        [
            dict(weight=0.6, density=0.25, gamma=0.0, slack=0.0),  # gamma 0: the TIES trim
            dict(weight=0.4, density=0.9, gamma=0.5, slack=0.0),  # target + top > n: fewer dropped
        ],
        {"lambda": 1.0, "normalize": False},
    ),
    (
        [
            dict(weight=0.8, density=0.05, gamma=1.0, slack=1.0),  # keeps the smallest magnitudes
            dict(weight=0.5, density=1e-6, gamma=0.3, slack=0.0),  # int(density * n) = 0: none
            dict(weight=-0.2, density=0.5, gamma=0.5, slack=0.0),  # target + top = n
            dict(weight=0.3, density=0.7, gamma=0.02, slack=0.0),
        ],
        {"lambda": -1.1, "normalize": True},
    ),
]


def bf16_bits(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def make_inputs(n: int, kind: str, models: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A base and models as the kernels take them: float32 noise ("f32"), bfloat16 bits
    ("bf16"), float32 deltas on a coarse grid ("tied": thousands of entries share each
    magnitude), or a zero base and four magnitudes ("levels": each shared by about a
    quarter of the entries). The first entries are +0.0 in the base and -0.0 in the models."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n).astype(np.float32)
    if kind == "levels":
        base[:] = 0.0
        levels = np.array([0.25, 0.5, 1.0, 2.0], dtype=np.float32)
        xs = [levels[rng.integers(0, 4, n)] * rng.choice(np.float32([-1, 1]), n) for _ in range(models)]
    elif kind == "tied":
        xs = [base + np.float32(0.01) * rng.integers(-3, 4, n).astype(np.float32) for _ in range(models)]
    else:
        xs = [base + np.float32(0.05) * rng.standard_normal(n).astype(np.float32) for _ in range(models)]
    zeros = min(n, 5)
    base[:zeros] = 0.0
    for x in xs:
        x[:zeros] = -0.0
    if kind == "bf16":
        return bf16_bits(base), [bf16_bits(x) for x in xs]
    return base, xs


def as_torch(a: np.ndarray) -> torch.Tensor:
    """float32 of a kernel input (bfloat16 bits widen exactly)."""
    return torch.from_numpy(kernels.as_float32(a, a.dtype == np.uint16))


def stored_bits(t: torch.Tensor, out_bf16: bool) -> np.ndarray:
    t = t.reshape(-1)
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16) if out_bf16 else t.numpy()


def reference(method, base, xs, model_params, params, out_bf16):
    """methods.py's function on float32 copies, stored as the engine stores it."""
    merged, stats = METHODS[method].fn(
        as_torch(base), [as_torch(x) for x in xs], model_params, {**params, "rescale": False}
    )
    counts = (stats.kept.tolist(), stats.agreed.tolist()) if stats is not None else (None, None)
    return stored_bits(merged, out_bf16), *counts


def on_torch_engine(method, base, xs, model_params, params, out_bf16):
    tensors = [host_tensor(a) for a in [base, *xs]]
    out_dtype = torch.bfloat16 if out_bf16 else torch.float32
    merged, kept, agreed, bad_in, bad_32, bad_out = TORCH_METHODS[method](
        tensors[0], tensors[1:], model_params, params, out_dtype
    )
    assert bad_in == [0] * len(tensors) and bad_32 == bad_out == 0
    return merged.view(torch.int16).numpy().view(np.uint16) if out_bf16 else merged.numpy(), kept, agreed


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    unsigned = f"u{a.itemsize}"
    differ = int(np.count_nonzero(a.view(unsigned) != b.view(unsigned)))
    assert differ == 0, f"{differ} of {a.size} entries differ"


def check(method, n, kind, case, seed=0):
    model_params, params = CASES[case]
    base, xs = make_inputs(n, kind, len(model_params), seed)
    out_bf16 = kind == "bf16"
    want, want_kept, want_agreed = reference(method, base, xs, model_params, params, out_bf16)
    got, kept, agreed = FAST_PATHS[method](base, xs, model_params, params, out_bf16=out_bf16, check_finite=True)
    assert_same_bits(got, want)
    assert (kept, agreed) == (want_kept, want_agreed)
    on_torch, t_kept, t_agreed = on_torch_engine(method, base, xs, model_params, params, out_bf16)
    assert_same_bits(on_torch, got)
    assert (t_kept, t_agreed) == (kept, agreed)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["f32", "bf16", "tied"])
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernels_and_torch_engine_equal_the_reference_bit_for_bit(n, kind, method, case):
    check(method, n, kind, case, seed=n + case)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_tensor_over_two_torch_engine_chunks(method):
    check(method, CHUNK + 12_345, "tied", 0, seed=3)


def test_the_kept_entries_are_the_ranks_between_the_two_cuts():
    """Against an independent count: per model, the kept entries are exactly those whose
    rank by (magnitude descending, index ascending) lies in outlier_ranks' [start, stop)."""
    n = kernels.MIN_FAST_NUMEL + 999
    base, xs = make_inputs(n, "tied", 2, seed=5)
    model_params = [dict(weight=1.0, density=0.3, gamma=0.1), dict(weight=1.0, density=0.6, gamma=0.05)]
    params = {"lambda": 1.0, "normalize": False}
    for i, p in enumerate(model_params):
        magnitude = np.abs(xs[i] - base)
        order = np.lexsort((np.arange(n), -magnitude))  # rank 0: largest, lower index first
        start, stop = outlier_ranks(n, p["density"], p["gamma"])
        assert 0 < start < stop < n
        want = np.zeros(n, dtype=bool)
        want[order[start:stop]] = True
        one = [{**q, "weight": 1.0 if j == i else 0.0} for j, q in enumerate(model_params)]
        out, _, _ = FAST_PATHS["breadcrumbs"](base, xs, one, params)
        kept = out != base
        assert np.array_equal(kept, want & (xs[i] != base))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_each_selection_path_is_taken_for_both_cuts_and_exact(monkeypatch, method):
    """The candidates inside the sampled bracket, the bracket's end with a tie limit from
    per-chunk counts, and the exact radix select when the candidates do not fit: each runs
    once per cut (two for each of the first two models, none for density 1) and gives the
    reference's bits."""
    calls = []
    for name in ("_select_among", "_tie_limit_in_chunks", "_exact_select"):
        original = getattr(kernels, name)

        def counted(*a, _f=original, _name=name):
            calls.append(_name)
            return _f(*a)

        monkeypatch.setattr(kernels, name, counted)
    n = kernels.MIN_FAST_NUMEL + 12_345
    model_params, params = CASES[0]

    def selections(kind: str) -> list[str]:
        check(method, n, kind, 0)  # the bits (the reference's cuts select with the kernels' too)
        calls.clear()
        base, xs = make_inputs(n, kind, len(model_params), seed=0)
        FAST_PATHS[method](base, xs, model_params, params)
        return list(calls)

    assert selections("f32") == ["_select_among"] * 4
    assert selections("levels") == ["_tie_limit_in_chunks"] * 4
    monkeypatch.setattr(kernels, "BRACKET_ROOM", 0.0)
    monkeypatch.setattr(kernels, "BRACKET_SLACK", 0.0)
    assert selections("f32") == ["_exact_select"] * 4


def test_torch_sums_up_to_the_limit_of_models_in_order():
    """What SUMMED_MODELS_MAX rests on: torch's sum over stacked models equals adding them in
    order from +0.0 (the kernels' order) up to that many models, at every position."""
    g = torch.Generator().manual_seed(0)
    for models in range(1, SUMMED_MODELS_MAX + 1):
        for n in (1, 3, 7, 31, 1003):
            scales = torch.logspace(-4, 4, models)[torch.randperm(models, generator=g)]
            rows = torch.randn(models, n, generator=g) * scales.unsqueeze(1)
            rows[:, 0] = -0.0
            in_order = torch.zeros(n)
            for row in rows:
                in_order = in_order + row
            assert torch.equal(rows.sum(0).view(torch.int32), in_order.view(torch.int32)), (models, n)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("n", [7, kernels.MIN_FAST_NUMEL + 12_345])
def test_nan_and_inf_inputs_and_an_overflow_are_refused(method, n):
    model_params, params = CASES[0]
    base, xs = make_inputs(n, "f32", 3, seed=1)
    xs[1][n // 2] = np.inf
    with pytest.raises(NonFiniteInput) as e:
        FAST_PATHS[method](base, xs, model_params, params, check_finite=True)
    assert e.value.which == 1
    xs[1][n // 2] = 0.0
    base[n - 1] = np.nan
    with pytest.raises(NonFiniteInput) as e:
        FAST_PATHS[method](base, xs, model_params, params, check_finite=True)
    assert e.value.which == -1
    base[n - 1] = 0.0
    huge = [{**p, "weight": 3e38} for p in model_params]
    with pytest.raises(NonFiniteOutput):
        FAST_PATHS[method](base, xs, huge, {"lambda": 1e30, "normalize": False}, check_finite=True)


def test_covered_needs_no_rescale_and_at_most_the_summed_models():
    for name in METHOD_NAMES:
        method = METHODS[name]
        assert covered(method, True, {"rescale": False}, SUMMED_MODELS_MAX)
        assert not covered(method, True, {"rescale": True}, 2)
        assert not covered(method, True, {"rescale": False}, SUMMED_MODELS_MAX + 1)
    assert covered(METHODS["ties"], True, {"rescale": False}, SUMMED_MODELS_MAX + 1)  # not a sum in order


@pytest.mark.parametrize(
    ("method", "rescale"), [("breadcrumbs", False), ("breadcrumbs_ties", False), ("breadcrumbs", True)]
)
def test_engine_takes_the_kernels_and_writes_the_reference_bytes(tmp_path, monkeypatch, method, rescale):
    """A merge through the engine gives the same bytes with the kernels as with the reference
    path (FAST_PATHS emptied); the kernels are the ones called, except under rescale."""
    from lrmerge_hub.merge import engine
    from lrmerge_hub.merge.st_io import SafetensorsModel
    from lrmerge_hub.recipe.spec import parse_recipe
    from lrmerge_hub.synth.tiny import make_family

    fam = make_family(
        tmp_path / "fam", hidden=256, intermediate=512, layers=1, heads=4, dtype="bfloat16", extend_language_vocab=3
    )
    recipe = parse_recipe(
        {
            "method": method,
            "base": str(fam["base"]),
            "models": [
                {"model": str(fam["language"]), "role": "language", "weight": 0.7, "density": 0.3, "gamma": 0.02},
                {"model": str(fam["task"]), "role": "task", "weight": -0.2, "density": 0.5, "gamma": 0.1},
            ],
            "parameters": {"lambda": 0.8, "normalize": True, "rescale": rescale},
            "languages": ["bo"],
            "license": "apache-2.0",
            "output": str(tmp_path / "out"),
        },
        tmp_path,
    )
    sources = engine.local_sources(recipe)
    calls = []
    fast_path = FAST_PATHS[method]
    monkeypatch.setitem(engine.FAST_PATHS, method, lambda *a, **kw: calls.append(1) or fast_path(*a, **kw))
    fast = engine.merge(recipe, sources, tmp_path / "fast", device="cpu", engine="kernels", progress=False)
    assert bool(calls) is not rescale
    monkeypatch.setattr(engine, "FAST_PATHS", {})
    slow = engine.merge(recipe, sources, tmp_path / "slow", device="cpu", engine="kernels", progress=False)
    assert [m.get("retention") for m in fast["models"]] == [m.get("retention") for m in slow["models"]]
    a, b = SafetensorsModel(tmp_path / "fast", "fast"), SafetensorsModel(tmp_path / "slow", "slow")
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert torch.equal(a.get(name).view(torch.int16), b.get(name).view(torch.int16)), name
