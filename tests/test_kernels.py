"""The fused CPU kernels (merge/kernels.py) give the reference's results (methods.ties_family):
float32 outputs to float rounding, kept/agreed counts exactly, on the inputs where a fast
selection is easiest to get wrong: tied magnitudes at the cut, bfloat16 deltas of a few
units in the last place (few distinct values, each shared by many entries), zero deltas,
slack flipping a sign conflict, density 1, bfloat16 inputs read in place, every selection
path (counted, collected, exact fallback), and the engine's use of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lrmerge_hub.merge import kernels
from lrmerge_hub.merge.methods import ties_family

N = kernels.MIN_FAST_NUMEL * 2 + 12345  # large enough for the fast path, odd-sized chunks


def reference(base, tensors, weights, densities, slacks, lam=1.0, normalize=True):
    params = [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)]
    merged, stats = ties_family(
        base.float(), [t.float() for t in tensors], params, {"lambda": lam, "normalize": normalize}, slacks
    )
    return merged, stats.kept.tolist(), stats.agreed.tolist()


def as_array(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view as the kernels take it: bfloat16 as its uint16 bits."""
    flat = t.reshape(-1)
    return flat.view(torch.int16).numpy().view(np.uint16) if flat.dtype == torch.bfloat16 else flat.numpy()


def fused(base, tensors, weights, densities, slacks, lam=1.0, normalize=True, out_bf16=False, **kw):
    out, kept, agreed = kernels.fused_ties(
        as_array(base), [as_array(t) for t in tensors], weights, densities, slacks, lam, normalize, out_bf16, **kw
    )
    out = torch.from_numpy(out)
    out = out.view(torch.bfloat16) if out_bf16 else out
    return out.reshape(base.shape), kept, agreed


def check(base, tensors, weights, densities, slacks, lam=1.0, normalize=True):
    out, kept, agreed = fused(base, tensors, weights, densities, slacks, lam, normalize)
    ref, ref_kept, ref_agreed = reference(base, tensors, weights, densities, slacks, lam, normalize)
    assert out.dtype == torch.float32 and out.shape == base.shape
    assert kept == ref_kept
    assert agreed == ref_agreed
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    return out, kept, agreed


def family(n=N, models=2, dtype=torch.float32, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    tensors = [base + 0.05 * (i + 1) * torch.randn(n, generator=g) for i in range(models)]
    shape = shape or (n,)
    return base.to(dtype).reshape(shape), [t.to(dtype).reshape(shape) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("models", [1, 2, 3])
def test_random_tensors_match_reference(dtype, models):
    base, tensors = family(models=models, dtype=dtype, shape=(N // 3, 3) if N % 3 == 0 else None)
    check(base, tensors, [1.0] * models, [0.2] * models, [0.0] * models)


def test_weights_densities_lambda_and_no_normalize():
    base, tensors = family(models=3, seed=1)
    check(base, tensors, [0.7, 1.3, -0.5], [0.1, 0.5, 0.3], [0.0, 0.0, 0.0], lam=0.8, normalize=False)
    check(base, tensors, [0.7, 1.3, 0.5], [0.1, 0.5, 0.3], [0.0, 0.0, 0.0], lam=1.7, normalize=True)


def test_density_one_keeps_every_entry():
    base, tensors = family(seed=2)
    _, kept, _ = check(base, tensors, [1.0, 1.0], [1.0, 0.2], [0.0, 0.0])
    assert kept[0] == N  # random deltas are never exactly zero


def test_tied_magnitudes_at_the_cut_keep_exactly_k_in_index_order():
    # magnitudes from a handful of values: the threshold value is shared by many entries
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(N)
    levels = torch.tensor([0.25, 0.5, 1.0, 2.0])
    tensors = [
        levels[torch.randint(0, 4, (N,), generator=g)] * torch.sign(torch.randn(N, generator=g)) for _ in range(2)
    ]
    _, kept, _ = check(base, tensors, [1.0, 1.0], [0.2, 0.37], [0.0, 0.0])
    assert kept == [int(0.2 * N), int(0.37 * N)]


def test_zero_deltas_are_never_kept_or_agreed():
    base, tensors = family(seed=4)
    tensors[0] = base.clone()  # model 0 equals the base: all deltas zero
    tensors[1][: N // 2] = base[: N // 2]  # half of model 1's deltas are zero
    _, kept, agreed = check(base, tensors, [1.0, 1.0], [0.2, 0.9], [0.0, 0.0])
    assert kept[0] == 0 and agreed[0] == 0
    assert kept[1] == N - N // 2


def test_slack_flips_sign_conflicts_to_the_task_model():
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(N)
    lang = 0.03 * torch.randn(N, generator=g)
    task = -0.8 * lang  # always opposite, smaller: TIES gives every entry to lang
    plain = check(base, [lang, task], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0])
    slack = check(base, [lang, task], [1.0, 1.0], [1.0, 1.0], [0.0, 0.5])  # 1.5 * 0.8 > 1
    assert plain[2][1] == 0 and slack[2][1] == N
    assert slack[2][0] == 0


def test_bfloat16_output_is_the_rounded_float32_result():
    base, tensors = family(dtype=torch.bfloat16, seed=6)
    out, kept, agreed = fused(base, tensors, [1.0, 1.0], [0.2, 0.2], [0.0, 0.3], 1.0, True, out_bf16=True)
    ref, ref_kept, ref_agreed = reference(base, tensors, [1.0, 1.0], [0.2, 0.2], [0.0, 0.3])
    assert out.dtype == torch.bfloat16 and (kept, agreed) == (ref_kept, ref_agreed)
    assert torch.equal(out, ref.to(torch.bfloat16))


def test_small_and_one_element_tensors_select_from_every_entry():
    for n in (1, 7, 2048):
        base, tensors = family(n=n, seed=7)
        check(base, tensors, [1.0, 1.0], [0.2, 0.2], [0.0, 0.0])


def test_nan_input_is_reported_with_its_position():
    base, tensors = family(seed=8, dtype=torch.bfloat16)
    tensors[1][17] = float("nan")
    with pytest.raises(kernels.NonFiniteInput) as e:
        fused(base, tensors, [1.0, 1.0], [0.2, 0.2], [0.0, 0.0], check_finite=True)
    assert e.value.which == 1
    base[5] = float("inf")
    with pytest.raises(kernels.NonFiniteInput) as e:
        fused(base, tensors, [1.0, 1.0], [0.2, 0.2], [0.0, 0.0], check_finite=True)
    assert e.value.which == -1
    small = base[:100].clone()
    with pytest.raises(kernels.NonFiniteInput) as e:
        fused(small, [small + 1, small.clone()], [1.0, 1.0], [0.2, 0.2], [0.0, 0.0], check_finite=True)
    assert e.value.which == -1


def test_engine_fast_path_matches_the_reference_path(tmp_path, monkeypatch):
    """A merge whose big tensors take the fused path gives the same bytes as the reference."""
    from lrmerge_hub.merge import engine
    from lrmerge_hub.merge.st_io import SafetensorsModel
    from lrmerge_hub.recipe.spec import parse_recipe
    from lrmerge_hub.synth.tiny import make_family

    fam = make_family(
        tmp_path / "fam", hidden=768, intermediate=1024, layers=1, heads=8, dtype="float32", extend_language_vocab=3
    )
    recipe = parse_recipe(
        {
            "method": "slack_ties",
            "base": str(fam["base"]),
            "models": [
                {"model": str(fam["language"]), "role": "language", "density": 0.2},
                {"model": str(fam["task"]), "role": "task", "density": 0.3, "slack": 0.5},
            ],
            "parameters": {"lambda": 1.0, "normalize": True},
            "languages": ["bo"],
            "license": "apache-2.0",
            "dtype": "float32",
            "output": str(tmp_path / "out"),
        },
        tmp_path,
    )
    sources = engine.local_sources(recipe)
    fast = engine.merge(recipe, sources, tmp_path / "fast", device="cpu", progress=False)
    monkeypatch.setattr(engine, "FAST_PATHS", {})
    slow = engine.merge(recipe, sources, tmp_path / "slow", device="cpu", progress=False)
    assert [m["retention"] for m in fast["models"]] == [m["retention"] for m in slow["models"]]
    a, b = SafetensorsModel(tmp_path / "fast", "fast"), SafetensorsModel(tmp_path / "slow", "slow")
    big = [n for n, st in a.tensors.items() if st.spec.numel >= kernels.MIN_FAST_NUMEL]
    assert big  # the fused path was exercised
    for name in a.tensors:
        torch.testing.assert_close(a.get(name), b.get(name), rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "fast" / "merge_report.json").read_text())["method"] == "slack_ties"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_radix_select_when_the_sample_bracket_misses(monkeypatch, dtype):
    """The fallback selection (two histograms) gives the same results as the reference,
    tied magnitudes at the cut included."""
    monkeypatch.setattr(kernels, "_bracket", lambda x, b, k: (0x7F7FFFFF, 0x7F7FFFFF, 0.0))
    base, tensors = family(models=2, dtype=dtype, seed=9)
    check(base, tensors, [1.0, 1.0], [0.2, 0.05], [0.0, 0.5])
    g = torch.Generator().manual_seed(10)
    levels = torch.tensor([0.25, 0.5, 1.0, 2.0])
    tied = [levels[torch.randint(0, 4, (N,), generator=g)] * torch.sign(torch.randn(N, generator=g)) for _ in range(2)]
    check(torch.zeros(N), tied, [1.0, 1.0], [0.2, 0.37], [0.0, 0.0])


def test_bfloat16_deltas_of_a_few_units_in_the_last_place():
    """What fine-tuned bf16 checkpoints look like: each delta is a few ulps of the base, so
    |delta| takes few distinct values and the k-th largest is shared by many entries."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(N, generator=g).to(torch.bfloat16)
    bits = base.view(torch.int16)
    tensors = [
        (bits + torch.randint(-s, s + 1, (N,), generator=g, dtype=torch.int16)).view(torch.bfloat16) for s in (3, 2)
    ]
    for density in (0.2, 0.5, 0.05):
        check(base, tensors, [1.0, 1.0], [density, density], [0.0, 0.5])


def test_each_selection_path_is_taken_and_exact(monkeypatch):
    """Random float32 deltas select among the candidates collected inside the bracket;
    heavily tied ones find the threshold at the bracket's end, with a tie limit from
    per-chunk counts; too many candidates for their room fall back to the exact select.
    Every path agrees with the reference (asserted by check)."""
    calls = []
    for name in ("_select_among", "_tie_limit_in_chunks", "_exact_select"):
        original = getattr(kernels, name)

        def counted(*a, _f=original, _name=name):
            calls.append(_name)
            return _f(*a)

        monkeypatch.setattr(kernels, name, counted)
    base, tensors = family(seed=12)
    check(base, tensors, [1.0, 1.0], [0.2, 0.3], [0.0, 0.0])
    assert calls == ["_select_among"] * 2
    calls.clear()
    g = torch.Generator().manual_seed(13)
    levels = torch.tensor([0.25, 0.5, 1.0, 2.0])
    tied = [levels[torch.randint(0, 4, (N,), generator=g)] for _ in range(2)]
    check(torch.zeros(N), tied, [1.0, 1.0], [0.2, 0.37], [0.0, 0.0])
    assert calls == ["_tie_limit_in_chunks"] * 2
    calls.clear()
    monkeypatch.setattr(kernels, "BRACKET_ROOM", 0.0)
    monkeypatch.setattr(kernels, "BRACKET_SLACK", 0.0)
    check(base, tensors, [1.0, 1.0], [0.2, 0.3], [0.0, 0.0])
    assert calls == ["_exact_select"] * 2
