"""mergekit's method family against independent float64 numpy references (deterministic
methods), distribution and reproducibility tests (random methods), the slack on every
sign election, and the recipe contracts (spec: lrmerge_hub/merge/methods.md)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lrmerge_hub.errors import RecipeError
from lrmerge_hub.merge import draws
from lrmerge_hub.merge.methods import METHODS
from lrmerge_hub.recipe.spec import parse_recipe

from test_methods import random_models


def call(method, base, models, model_params, params, tensor_name="model.layers.0.mlp.up_proj.weight"):
    """Run a registered method on numpy inputs with its declared defaults filled in."""
    m = METHODS[method]
    mp = [{**{k: p.default for k, p in m.model_params.items()}, **given} for given in model_params]
    gp = {**{k: p.default for k, p in m.global_params.items()}, **params}
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    named = {"tensor_name": tensor_name} if m.random else {}
    out, stats = m.fn(t(base) if base is not None else None, [t(x) for x in models], mp, gp, **named)
    return out.numpy(), stats


# -- independent references (float64; selections on the float32 deltas, as the spec says) --


def ref_order(tau32):
    """Flat indices from the largest magnitude down; equal magnitudes: lower index first."""
    return np.argsort(-np.abs(tau32.ravel()), kind="stable")


def ref_breadcrumbs_mask(tau32, density, gamma):
    n = tau32.size
    if density >= 1:
        return np.ones(tau32.shape, bool)
    target, top = int(density * n), int(gamma * n)
    top = min(top, n - target)
    mask = np.zeros(n, bool)
    mask[ref_order(tau32)[top : top + target]] = True
    return mask.reshape(tau32.shape)


def ref_ties_mask(tau32, density):
    n = tau32.size
    k = n if density >= 1 else max(1, int(np.floor(density * n)))
    mask = np.zeros(n, bool)
    mask[ref_order(tau32)[:k]] = True
    return mask.reshape(tau32.shape)


def ref_combine(base, taus, weights, slacks, elect, normalize, lam):
    """Weighted sum, or sign election with slack-weighted votes and the disjoint mean."""
    wd = [np.float64(w) * t for w, t in zip(weights, taus, strict=True)]
    if not elect:
        merged = sum(wd)
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            merged = merged / total
        return base + lam * merged, None
    votes = sum((1 + s) * x for s, x in zip(slacks, wd, strict=True))
    gamma = np.where(votes >= 0, 1.0, -1.0)
    agree = [(np.sign(x) == gamma) for x in wd]
    merged = sum(np.where(a, x, 0.0) for a, x in zip(agree, wd, strict=True))
    if normalize:
        div = sum(np.where(a, w, 0.0) for a, w in zip(agree, weights, strict=True))
        merged = merged / np.where(div == 0, 1.0, div)
    return base + lam * merged, ([int((x != 0).sum()) for x in wd], [int(a.sum()) for a in agree])


def ref_l1(tau, kept):
    before, after = np.abs(tau).sum(), np.abs(kept).sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def ref_sce(base, models, select_topk, slacks):
    tv = np.stack([(m - base).astype(np.float32) for m in models]).astype(np.float64)
    if select_topk < 1:
        var = tv.var(axis=0)
        k = int(np.count_nonzero(var) * select_topk)
        mask = np.zeros(var.size, bool)
        mask[np.argsort(-var.ravel(), kind="stable")[:k]] = True
        tv = tv * mask.reshape(var.shape)
    votes = sum((1 + s) * x for s, x in zip(slacks, tv, strict=True))
    gamma = np.where(votes >= 0, 1.0, -1.0)
    agree = np.sign(tv) == gamma
    energy = (tv**2).reshape(len(models), -1).mean(1)
    share = energy / energy.sum()
    weight = share.reshape(-1, *([1] * (tv.ndim - 1))) * agree
    return base + (tv * weight).sum(0) / np.maximum(weight.sum(0), 1e-6), agree


def ref_slerp(t, a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    cos = np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    th = np.arccos(cos)
    return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)


def ref_nuslerp(t, a, b, row_wise, flatten):
    a, b = a.astype(np.float64), b.astype(np.float64)
    if flatten:
        return ref_slerp_exact(t, a.ravel(), b.ravel()).reshape(a.shape)
    if row_wise:  # vectors along dim 0: the columns
        return np.stack([ref_slerp_exact(t, a[:, j], b[:, j]) for j in range(a.shape[1])], axis=1)
    return np.stack([ref_slerp_exact(t, a[i], b[i]) for i in range(a.shape[0])])


def ref_slerp_exact(t, a, b):
    """SLERP with the collinear fallback only at exact collinearity (NuSLERP's rule)."""
    cos = np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * a + t * b
    th = np.arccos(cos)
    return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)


def ref_multislerp(vectors, weights, eps=1e-8):
    x = np.stack([v.astype(np.float64).ravel() for v in vectors])
    w = np.asarray(weights, np.float64) / np.sum(weights)
    norms = np.linalg.norm(x, axis=1)
    u = x / (norms[:, None] + eps)
    mean = (w[:, None] * u).sum(0)
    mean /= np.linalg.norm(mean)
    tangent = (w[:, None] * (u - (u @ mean)[:, None] * mean)).sum(0)
    r = np.linalg.norm(tangent) + eps
    return (np.cos(r) * mean + np.sin(r) * tangent / r) * (w @ norms)


def ref_model_stock(base, models, filter_wise):
    b = base.astype(np.float64)
    ws = [m.astype(np.float64) for m in models]
    if not filter_wise or b.ndim == 1:
        b2, ws2 = b.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    else:
        b2, ws2 = b, ws
    taus = [w - b2 for w in ws2]
    n = len(taus)
    cos = np.mean(
        [
            (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
            for i, x in enumerate(taus)
            for y in taus[i + 1 :]
        ],
        axis=0,
    )[:, None]
    t = n * cos / (1 + (n - 1) * cos)
    return (t * (sum(ws2) / n) + (1 - t) * b2).reshape(base.shape)


def ref_nearswap(t, base, other):
    b, o = base.astype(np.float64), other.astype(np.float64)
    w = np.clip(t / np.maximum(np.abs(b - o), 1e-6), 0, 1)
    return w * o + (1 - w) * b


# -- deterministic methods against the references ---------------------------------------

SHAPES = [(257,), (33, 65)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("quantize", [False, True])
def test_breadcrumbs_matches_reference(method, shape, quantize):
    base, models = random_models(shape, n=3, seed=11, quantize=quantize)
    weights, densities, gammas, slacks = [1.0, 0.6, 1.4], [0.3, 0.8, 0.5], [0.05, 0.3, 0.0], [0.0, 0.7, 0.2]
    elect = method == "breadcrumbs_ties"
    for normalize, rescale, lam in [(False, False, 1.0), (True, True, 0.7)]:
        mp = [
            {"weight": w, "density": d, "gamma": g, **({"slack": s} if elect else {})}
            for w, d, g, s in zip(weights, densities, gammas, slacks, strict=True)
        ]
        out, stats = call(method, base, models, mp, {"normalize": normalize, "rescale": rescale, "lambda": lam})
        taus = []
        for m, d, g in zip(models, densities, gammas, strict=True):
            tau32 = (m - base).astype(np.float32)
            kept = np.where(ref_breadcrumbs_mask(tau32, d, g), tau32, 0).astype(np.float64)
            taus.append(ref_l1(tau32.astype(np.float64), kept) if rescale else kept)
        expected, counts = ref_combine(
            base.astype(np.float64), taus, weights, slacks if elect else [0] * 3, elect, normalize, lam
        )
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
        if elect:
            assert (stats.kept.tolist(), stats.agreed.tolist()) == counts
        else:
            assert stats is None


def test_breadcrumbs_cut_points_by_hand():
    base = np.zeros(10, np.float32)
    tau = np.array([9, -8, 7, 6, -5, 4, 3, 2, -1, 0.5], np.float32)
    out, _ = call("breadcrumbs", base, [tau], [{"density": 0.5, "gamma": 0.2}], {})
    # drop the 2 largest (9, -8), keep the next 5 (7, 6, -5, 4, 3)
    assert out.tolist() == [0, 0, 7, 6, -5, 4, 3, 0, 0, 0]
    # density + gamma > 1: fewer outliers are dropped (mergekit's rule): keep 9 of 10
    out, _ = call("breadcrumbs", base, [tau], [{"density": 0.9, "gamma": 0.3}], {})
    assert out.tolist() == [0, -8, 7, 6, -5, 4, 3, 2, -1, 0.5]
    # ties at a cut: the lower index ranks larger
    tied = np.array([1, 2, 2, 2, 1, 1], np.float32)
    out, _ = call("breadcrumbs", np.zeros(6, np.float32), [tied], [{"density": 0.5, "gamma": 0.17}], {})
    assert out.tolist() == [1, 0, 2, 2, 0, 0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_matches_reference(shape, select_topk):
    base, models = random_models(shape, n=3, seed=5)
    slacks = [0.0, 0.5, 0.0]
    out, stats = call("sce", base, models, [{"slack": s} for s in slacks], {"select_topk": select_topk})
    expected, agree = ref_sce(base.astype(np.float64), models, select_topk, slacks)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert stats.agreed.tolist() == [int(a.sum()) for a in agree]


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_reference(t):
    base, (other,) = random_models((40, 24), n=1, seed=2)
    other = other + np.random.default_rng(1).standard_normal(other.shape).astype(np.float32)
    out, _ = call("slerp", base, [other], [{}], {"t": t})
    np.testing.assert_allclose(out.ravel(), ref_slerp(t, base, other), rtol=1e-5, atol=1e-6)
    # nearly collinear inputs interpolate linearly
    out, _ = call("slerp", base, [base * 1.001], [{}], {"t": t})
    np.testing.assert_allclose(out, (1 - t) * base + t * base * 1.001, rtol=1e-6)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False)])
def test_nuslerp_matches_reference(with_base, row_wise, flatten):
    base, models = random_models((12, 20), n=2, seed=9)
    params = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    out, _ = call("nuslerp", base if with_base else None, models, [{"weight": 1.0}, {"weight": 3.0}], params)
    b = base.astype(np.float64) if with_base else 0.0
    a0, a1 = (models[0] - b, models[1] - b) if with_base else (models[0], models[1])
    expected = b + ref_nuslerp(0.75, np.asarray(a0), np.asarray(a1), row_wise, flatten)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_matches_reference(with_base):
    base, models = random_models((30, 10), n=3, seed=4)
    weights = [0.5, 1.0, 2.0]
    out, _ = call("multislerp", base if with_base else None, models, [{"weight": w} for w in weights], {})
    if with_base:
        expected = base + ref_multislerp([m - base for m in models], weights).reshape(base.shape)
    else:
        expected = ref_multislerp(models, weights).reshape(base.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    single, _ = call("multislerp", base if with_base else None, models[:1], [{"weight": 2.0}], {})
    np.testing.assert_array_equal(single, models[0])  # one model: itself


def test_multislerp_keeps_the_base_where_no_model_changed_a_tensor():
    base, _ = random_models((30, 10), n=1, seed=5)
    base[0, 0] = -0.0  # kept as it is, sign bit included
    frozen = [base.copy() for _ in range(3)]  # a frozen layer: every task vector is zero
    out, _ = call("multislerp", base, frozen, [{"weight": w} for w in (0.5, 1.0, 2.0)], {})
    np.testing.assert_array_equal(out.view(np.uint32), base.view(np.uint32))
    zeros = [np.zeros((30, 10), np.float32) for _ in range(3)]  # without a base: zero inputs, zero mean
    out, _ = call("multislerp", None, zeros, [{}] * 3, {})
    assert not out.any()


def test_multislerp_names_directions_that_cancel():
    from lrmerge_hub.errors import DegenerateInput

    _, (model,) = random_models((30, 10), n=1, seed=6)
    base = np.zeros_like(model)  # equal weights on u, -u and 0: no direction to go
    with pytest.raises(DegenerateInput, match="weighted directions of the inputs cancel out") as e:
        call("multislerp", base, [model, -model, base], [{}] * 3, {})
    assert "antipodal" not in str(e.value)


def test_karcher_is_the_riemannian_mean():
    rng = np.random.default_rng(3)
    vectors = [rng.standard_normal(64).astype(np.float32) * s for s in (1.0, 2.0, 0.5)]
    # two inputs: the midpoint of the unit vectors on the sphere, scaled by the mean norm
    out, _ = call("karcher", None, vectors[:2], [{}, {}], {})
    mid = sum(v.astype(np.float64) / np.linalg.norm(v.astype(np.float64)) for v in vectors[:2])
    mean_norm = np.mean([np.linalg.norm(v.astype(np.float64)) for v in vectors[:2]])
    np.testing.assert_allclose(out, mid / np.linalg.norm(mid) * mean_norm, rtol=1e-4, atol=1e-5)
    # three inputs (the base counts as one): at the mean, the log maps sum to zero
    out, _ = call("karcher", vectors[0], vectors[1:], [{}, {}], {"max_iter": 200, "tol": 1e-9})
    m = out.astype(np.float64) / np.linalg.norm(out)
    logs = []
    for v in vectors:
        u = v.astype(np.float64) / np.linalg.norm(v)
        th = np.arccos(np.clip(u @ m, -1, 1))
        logs.append(th / np.sin(th) * (u - (u @ m) * m))
    assert np.linalg.norm(sum(logs)) < 1e-4
    assert np.linalg.norm(out) == pytest.approx(np.mean([np.linalg.norm(v) for v in vectors]), rel=1e-5)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_model_stock_matches_reference(filter_wise, shape):
    base, models = random_models(shape, n=3, seed=8)
    models[1] = models[1] + 0.5 * (models[0] - base)  # correlated task vectors: t away from 0
    out, _ = call("model_stock", base, models, [{}] * 3, {"filter_wise": filter_wise})
    np.testing.assert_allclose(out, ref_model_stock(base, models, filter_wise), rtol=1e-5, atol=1e-6)


def test_nearswap_and_passthrough_match_reference():
    base, (other,) = random_models((50,), n=1, seed=6)
    out, _ = call("nearswap", base, [other], [{}], {"t": 0.05})
    np.testing.assert_allclose(out, ref_nearswap(0.05, base, other), rtol=1e-6, atol=1e-7)
    out, _ = call("passthrough", None, [other], [{"scale": 0.5}], {})
    np.testing.assert_array_equal(out, other * np.float32(0.5))


# -- the slack on every sign election ------------------------------------------------------

ELECTING = {  # parameters that make each deterministic for this test (no drop, no cut)
    "ties": {},
    "dare_ties": {},
    "della": {},
    "breadcrumbs_ties": {"gamma": 0.0},
    "sce": {},
}


@pytest.mark.parametrize("method", sorted(ELECTING))
def test_slack_decides_a_sign_conflict_in_every_electing_method(method):
    # entry 0: language +0.3, task -0.2 (conflict); entry 1: both positive
    base = np.zeros(2, np.float32)
    language, task = np.array([0.3, 0.1], np.float32), np.array([-0.2, 0.1], np.float32)
    assert METHODS[method].reports_retention and "slack" in METHODS[method].model_params

    def merged(slack):
        extra = ELECTING[method]
        return call(method, base, [language, task], [dict(extra), {**extra, "slack": slack}], {})

    plain, stats = merged(0.0)
    assert plain[0] > 0 and stats.agreed.tolist() == [2, 1]  # larger magnitude wins
    protected, stats = merged(0.6)  # 1.6 * 0.2 > 0.3
    assert protected[0] < 0 and stats.agreed.tolist() == [1, 2]
    assert merged(0.4)[0][0] > 0  # 1.4 * 0.2 < 0.3


@pytest.mark.parametrize("method", sorted(ELECTING))
def test_slack_zero_is_the_method_without_it(method):
    base, models = random_models((48, 40), n=3, seed=12)
    m = METHODS[method]
    extra = {k: v for k, v in {"density": 0.4, "gamma": 0.05, "epsilon": 0.1}.items() if k in m.model_params}
    params = {"select_topk": 0.5} if method == "sce" else {}
    with_zero, s1 = call(method, base, models, [{**extra, "slack": 0.0}] * 3, params)
    without, s2 = call(method, base, models, [dict(extra)] * 3, params)
    np.testing.assert_array_equal(with_zero, without)
    assert s1.kept.tolist() == s2.kept.tolist() and s1.agreed.tolist() == s2.agreed.tolist()
    if method == "ties":  # and plain ties is slack_ties at slack 0, bit for bit
        other, _ = call("slack_ties", base, models, [{**extra, "slack": 0.0}] * 3, params)
        np.testing.assert_array_equal(with_zero, other)


# -- random methods: distribution and reproducibility ------------------------------------


def test_dare_keeps_density_and_rescales_l1():
    base = np.zeros(200_000, np.float32)
    tau = np.random.default_rng(0).standard_normal(base.shape).astype(np.float32)
    for density in (0.1, 0.5, 0.9):
        out, stats = call("dare_ties", base, [tau], [{"density": density}], {"seed": 7})
        kept = np.count_nonzero(out)
        n = tau.size
        assert abs(kept - density * n) < 6 * np.sqrt(n * density * (1 - density))
        assert stats.kept.tolist() == [kept]
        assert np.abs(out).sum(dtype=np.float64) == pytest.approx(np.abs(tau).sum(dtype=np.float64), rel=1e-4)
        survivors = out != 0
        scale = out[survivors] / tau[survivors]
        np.testing.assert_allclose(scale, scale[0], rtol=1e-5)  # one factor for the tensor
        plain, _ = call("dare_linear", base, [tau], [{"density": density}], {"seed": 7, "rescale": False})
        np.testing.assert_array_equal(plain != 0, survivors)  # same draws, no rescale
        np.testing.assert_array_equal(plain[survivors], tau[survivors])


def test_dare_expectation_is_the_task_vector():
    base = np.zeros(500, np.float32)
    tau = np.random.default_rng(1).standard_normal(base.shape).astype(np.float32)
    p, seeds = 0.4, 400
    mean = np.mean([call("dare_linear", base, [tau], [{"density": p}], {"seed": s})[0] for s in range(seeds)], 0)
    bound = 6 * np.abs(tau) * np.sqrt((1 - p) / (p * seeds)) + 1e-3
    assert (np.abs(mean - tau) <= bound).all()
    assert np.abs(mean - tau).mean() < 0.1 * np.abs(tau).mean()


def test_della_keep_probability_follows_rank():
    base = np.zeros((4, 20_000), np.float32)
    tau = np.random.default_rng(2).standard_normal(base.shape).astype(np.float32)
    density, eps = 0.5, 0.3
    out, _ = call("della_linear", base, [tau], [{"density": density, "epsilon": eps}], {"seed": 3, "rescale": False})
    kept = out != 0
    ranks = np.argsort(np.argsort(np.abs(tau), axis=1), axis=1) / (tau.shape[1] - 1)
    for lo in np.arange(0, 1, 0.1):  # per decile of rank: the mean of its probabilities
        sel = (ranks >= lo) & (ranks < lo + 0.1)
        expected = density - eps + 2 * eps * ranks[sel].mean()
        assert abs(kept[sel].mean() - expected) < 6 * np.sqrt(expected * (1 - expected) / sel.sum())
    assert abs(kept.mean() - density) < 0.01


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_are_reproducible(method):
    base, models = random_models((64, 96), n=2, seed=1)
    mp = [{"density": 0.5, "epsilon": 0.2} if "della" in method else {"density": 0.5}] * 2
    a, _ = call(method, base, models, mp, {"seed": 11})
    b, _ = call(method, base, models, mp, {"seed": 11})
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, call(method, base, models, mp, {"seed": 12})[0])
    assert not np.array_equal(a, call(method, base, models, mp, {"seed": 11}, tensor_name="other.weight")[0])


def test_draws_are_the_same_in_another_process_and_in_any_chunking():
    key = draws.stream_key(123, "model.embed_tokens.weight", 1)
    here = draws.uniforms(key, 0, 5000)
    np.testing.assert_array_equal(here[1000:3000], draws.uniforms(key, 1000, 3000))
    code = (
        "import numpy as np; from lrmerge_hub.merge import draws; "
        "k = draws.stream_key(123, 'model.embed_tokens.weight', 1); "
        "print(draws.uniforms(k, 0, 5000).tobytes().hex())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "99", "PATH": ""},
        cwd=str(__import__("pathlib").Path(__file__).parent.parent),
    )
    assert other.stdout.strip() == here.tobytes().hex()
    assert 0 <= here.min() and here.max() < 1 and abs(here.mean() - 0.5) < 0.02
    mask = draws.keep_mask(key, 0.3, 3 * draws.CHUNK + 17)  # across chunk boundaries
    np.testing.assert_array_equal(mask[-5000:], draws.uniforms(key, mask.size - 5000, mask.size) < 0.3)


# -- recipe contracts and parameter checks ---------------------------------------------------


def recipe(method, models=2, base=True, model_extra=None, parameters=None):
    data = {"method": method, "models": [{"model": f"org/m{i}", **(model_extra or {})} for i in range(models)]}
    if base:
        data["base"] = "org/base"
    if parameters:
        data["parameters"] = parameters
    return data


@pytest.mark.parametrize(
    "data,needle",
    [
        (recipe("slerp", models=2), "models: method 'slerp' takes exactly one model besides the base (got 2)"),
        (recipe("slerp", models=1, base=False), "base: required by method 'slerp'"),
        (recipe("nearswap", models=2), "takes exactly one model besides the base"),
        (recipe("passthrough", models=1), "base: method 'passthrough' takes no base model"),
        (recipe("passthrough", models=2, base=False), "takes exactly one model (got 2)"),
        (recipe("model_stock", models=1), "takes at least 2 models (got 1)"),
        (recipe("nuslerp", models=3, base=False), "takes exactly 2 models (got 3)"),
        (recipe("della", model_extra={"density": 0.5, "epsilon": 0.5}), "models[0].epsilon: density - epsilon"),
        (recipe("della", model_extra={"epsilon": 0}), "models[0].epsilon: must be > 0.0"),
        (recipe("dare_ties", model_extra={"gamma": 0.1}), "models[0]: unknown key 'gamma'"),
        (recipe("breadcrumbs", model_extra={"gamma": 1.5}), "models[0].gamma: must be <= 1.0"),
        (recipe("dare_linear", parameters={"seed": -1}), "parameters.seed: must be a whole number"),
        (recipe("dare_linear", parameters={"seed": 1.5}), "parameters.seed: must be a whole number"),
        (recipe("sce", parameters={"select_topk": 0}), "parameters.select_topk: must be > 0.0"),
        (recipe("slerp", models=1, parameters={"t": 1.2}), "parameters.t: must be <= 1.0"),
        (recipe("karcher", parameters={"max_iter": 0}), "parameters.max_iter"),
        (recipe("karcher", parameters={"tol": 1e9}), "parameters.tol: must be <= 0.01"),
        (
            recipe("passthrough", models=1, base=False, model_extra={"scale": 1e-300}),
            "models[0].scale: must be at least",
        ),
        (recipe("passthrough", models=1, base=False, model_extra={"scale": 1e300}), "models[0].scale: must be at most"),
        (recipe("passthrough", models=1, base=False, model_extra={"scale": 0}), "models[0].scale: must not be 0"),
        (recipe("sce", parameters={"lambda": 1.0}), "unknown key 'lambda'"),
    ],
)
def test_contracts_and_parameters_are_one_line_errors(tmp_path, data, needle):
    with pytest.raises(RecipeError) as e:
        parse_recipe(data, tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_mergekit_parameter_names_and_defaults(tmp_path):
    r = parse_recipe(recipe("della", parameters={"int8_mask": True, "seed": 5}), tmp_path)
    assert r.parameters == {"lambda": 1.0, "int8_mask": True, "rescale": True, "seed": 5, "normalize": True}
    assert r.models[0].params == {"weight": 1.0, "density": 1.0, "epsilon": 0.15, "slack": 0.0}
    assert parse_recipe(recipe("dare_linear"), tmp_path).parameters["normalize"] is False
    assert parse_recipe(recipe("breadcrumbs"), tmp_path).models[0].params["gamma"] == 0.01
    assert parse_recipe(recipe("sce"), tmp_path).parameters == {"select_topk": 1.0, "int8_mask": False}
    assert set(parse_recipe(recipe("ties"), tmp_path).parameters) == {"lambda", "int8_mask", "normalize", "rescale"}
    for name, method in METHODS.items():  # every method says what it is and where it comes from
        assert method.title and method.papers and method.doc, name
        assert all(p.doc for p in {**method.model_params, **method.global_params}.values()), name


def test_int8_mask_changes_nothing():
    base, models = random_models((32, 16), n=2, seed=3)
    mp = [{"density": 0.5}] * 2
    a, _ = call("ties", base, models, mp, {"int8_mask": False})
    b, _ = call("ties", base, models, mp, {"int8_mask": True})
    np.testing.assert_array_equal(a, b)


# -- every method through the streaming engine (sharded, bf16, extended vocabulary) ------

ONE_MODEL = {"slerp", "nearswap", "passthrough", "arcee_fusion"}
E2E_MODEL_PARAMS = {"density": 0.4, "epsilon": 0.2, "gamma": 0.02, "slack": 0.5, "weight": 0.8}


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    from lrmerge_hub.synth.tiny import make_family

    root = tmp_path_factory.mktemp("family")
    return make_family(root / "models", dtype="bfloat16", shard_bytes=60_000, extend_language_vocab=8)


def e2e_recipe(method, folder, seed=3, output="merged"):
    m = METHODS[method]
    roles = ["language"] if method in ONE_MODEL else ["language", "task"]
    models = [
        {"model": f"./models/{r}", "role": r, **{k: v for k, v in E2E_MODEL_PARAMS.items() if k in m.model_params}}
        for r in roles
    ]
    data = {"method": method, "models": models, "output": f"./{output}"}
    if m.takes_base:
        data["base"] = "./models/base"
    if m.random:
        data["parameters"] = {"seed": seed}
    return parse_recipe(data, folder)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_merges_a_sharded_bf16_family_with_an_extended_vocabulary(bf16_family, method):
    from lrmerge_hub.card.build import build_card
    from lrmerge_hub.merge.engine import local_sources, merge
    from lrmerge_hub.merge.tensor_params import TensorParams
    from test_engine import load_all

    folder = bf16_family["base"].parent.parent
    recipe = e2e_recipe(method, folder, output=f"merged-{method}")
    report = merge(
        recipe, local_sources(recipe), recipe.output, device="cpu", progress=False, shard_size=150_000, overwrite=True
    )
    out = load_all(recipe.output)
    src = {r: load_all(p) for r, p in bf16_family.items()}
    m = METHODS[method]
    roles = [e.role for e in recipe.models]
    assert len(list(recipe.output.glob("*.safetensors"))) > 1
    for name, merged in out.items():
        assert merged.dtype == torch.bfloat16
        rows = src["base"][name].shape[0]
        inputs = [src[r][name][:rows].float() for r in roles]
        base = src["base"][name].float() if m.takes_base else None
        named = {"tensor_name": name} if m.random else {}
        model_params, params = TensorParams.of(recipe, 2)(name)  # per tensor: layer_swap's shares
        expected, _ = m.fn(base, inputs, model_params, params, **named)
        torch.testing.assert_close(merged[:rows].float(), expected.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
        if merged.shape[0] > rows:  # the extended vocabulary's rows come from the language model
            assert torch.equal(merged[rows:], src["language"][name][rows:])
    assert ("model.embed_tokens.weight" in out) and out["model.embed_tokens.weight"].shape[0] == 392
    assert report["method"] == method and report["parameters"] == recipe.parameters
    retention = [e["retention"] for e in report["models"]]
    assert all(r is not None and 0 < r["agreed"] <= r["kept"] for r in retention) == m.reports_retention
    card = build_card(recipe.output).text  # names the method, its papers and parameters
    assert f"with {m.title}" in card and all(url in card for _, url in m.papers)
    assert m.doc in card or method in ("ties", "slack_ties", "task_arithmetic")
    if m.random:
        assert "`seed=3`" in card
    if m.random:  # the same bits again, and other bits from another seed
        again = e2e_recipe(method, folder, output=f"again-{method}")
        merge(again, local_sources(again), again.output, device="cpu", progress=False, overwrite=True)
        assert all(torch.equal(v, load_all(again.output)[k]) for k, v in out.items())
        other = e2e_recipe(method, folder, seed=4, output=f"other-{method}")
        merge(other, local_sources(other), other.output, device="cpu", progress=False, overwrite=True)
        assert not torch.equal(
            out["model.layers.0.mlp.up_proj.weight"], load_all(other.output)["model.layers.0.mlp.up_proj.weight"]
        )
        assert json.loads((recipe.output / "merge_report.json").read_text())["parameters"]["seed"] == 3


def test_sweep_grids_any_declared_parameter(tmp_path):
    from lrmerge_hub.run.sweep import apply_point, grid_points, parse_grid

    r = parse_recipe(recipe("della", model_extra={"density": 0.5}), tmp_path)
    variants = [apply_point(r, p) for p in grid_points(parse_grid(["epsilon=0.1,0.2", "seed=1,2"]))]
    assert [(v.models[1].params["epsilon"], v.parameters["seed"]) for v in variants] == [
        (0.1, 1),
        (0.1, 2),
        (0.2, 1),
        (0.2, 2),
    ]
    with pytest.raises(RecipeError, match="models.0..epsilon: density - epsilon"):
        apply_point(r, {"epsilon": 0.5})  # the method's cross-parameter check runs too
    with pytest.raises(RecipeError, match="not a parameter of della"):
        apply_point(r, {"gamma": 0.1})
    t = apply_point(parse_recipe(recipe("slerp", models=1), tmp_path), {"t": 0.25})
    assert t.parameters == {"t": 0.25}


def test_cli_contract_error_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    from lrmerge_hub.cli import main

    (tmp_path / "recipe.yaml").write_text("method: slerp\nbase: org/base\nmodels: [org/a, org/b]\noutput: ./merged\n")
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "recipe.yaml")])
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1
    assert lines[0] == "Error: models: method 'slerp' takes exactly one model besides the base (got 2)"
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("n", [1000, 300_000])  # below and above the kernels' sampling size
def test_top_k_mask_is_the_stable_order_with_ties(n):
    from lrmerge_hub.merge.kernels import top_k_threshold
    from lrmerge_hub.merge.sparsify import top_k_mask

    rng = np.random.default_rng(n)
    mag = np.abs(np.round(rng.standard_normal(n) * 8) / 8).astype(np.float32)  # heavily tied
    order = np.argsort(-mag, kind="stable")
    for k in (1, n // 10, n // 2, n - 1):
        expected = np.zeros(n, bool)
        expected[order[:k]] = True
        np.testing.assert_array_equal(top_k_mask(torch.from_numpy(mag), k).numpy(), expected)  # torch's kthvalue
        t, limit = top_k_threshold(mag, k)  # the kernels' radix select
        radix = mag > t
        radix[:limit] |= mag[:limit] == t
        np.testing.assert_array_equal(radix, expected)


def test_della_blocks_of_rows_draw_the_bits_of_the_whole_tensor():
    from lrmerge_hub.merge.sparsify import magprune, magprune_probabilities

    delta = np.round(np.random.default_rng(4).standard_normal((2500, 1000)) * 16).astype(np.float32)
    assert delta.size > 2 * draws.CHUNK  # ranked and drawn in several blocks of rows
    key = draws.stream_key(9, "model.embed_tokens.weight", 0)
    whole = draws.keep_mask(key, magprune_probabilities(np.abs(delta), 0.4, 0.2), delta.size)
    out = magprune(torch.from_numpy(delta), 0.4, 0.2, key).numpy().reshape(-1)
    np.testing.assert_array_equal(out != 0, whole & (delta.reshape(-1) != 0))
    np.testing.assert_array_equal(out[whole], delta.reshape(-1)[whole])
