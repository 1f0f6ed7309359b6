"""Every method against an independent reference computation (numpy, sort-based trim)."""

import numpy as np
import pytest
import torch

from lrmerge_hub.merge.methods import METHODS, elect_signs, trim_to_density
from lrmerge_hub.merge.trim import trim_count


def ref_trim(tau: np.ndarray, density: float) -> np.ndarray:
    """Keep the k largest magnitudes; equal magnitudes at the cut go in index order."""
    flat = tau.ravel()
    n = flat.size
    k = n if density >= 1 else max(1, int(np.floor(density * n)))
    order = np.argsort(-np.abs(flat), kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[order[:k]] = True
    return np.where(mask, flat, 0).reshape(tau.shape).astype(np.float32)


def ref_ties(base, models, weights, densities, slacks, lam, normalize):
    trimmed = [ref_trim(m - base, d) for m, d in zip(models, densities, strict=True)]
    wd = [np.float32(w) * t for w, t in zip(weights, trimmed, strict=True)]
    vote = sum(
        (1.0 + s) * x.astype(np.float64) for s, x in zip(slacks, wd, strict=True)
    )  # float64, as the methods vote
    gamma = np.where(vote >= 0, 1.0, -1.0).astype(np.float32)
    agree = [np.sign(x) == gamma for x in wd]
    merged = sum(np.where(a, x, 0) for a, x in zip(agree, wd, strict=True)).astype(np.float32)
    if normalize:
        div = sum(np.where(a, np.float32(w), 0) for a, w in zip(agree, weights, strict=True))
        merged = merged / np.where(div == 0, 1, div)
    kept = [int((x != 0).sum()) for x in wd]
    agreed = [int(a.sum()) for a in agree]
    return base + np.float32(lam) * merged, kept, agreed


def run(method, base, models, model_params, params):
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    out, stats = METHODS[method].fn(t(base) if base is not None else None, [t(m) for m in models], model_params, params)
    return out.numpy(), stats


def random_models(shape, n=2, seed=0, quantize=False):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    models = []
    for _ in range(n):
        delta = rng.standard_normal(shape).astype(np.float32) * 0.1
        if quantize:  # many equal magnitudes, so ties at the trim threshold are certain
            delta = np.round(delta * 20) / 20
        models.append((base + delta).astype(np.float32))
    return base, models


@pytest.mark.parametrize("shape", [(257,), (33, 65), (4, 8, 16)])
@pytest.mark.parametrize("method", ["ties", "slack_ties"])
@pytest.mark.parametrize("quantize", [False, True])
def test_ties_family_matches_reference(method, shape, quantize):
    base, models = random_models(shape, n=3, seed=len(shape), quantize=quantize)
    weights, densities = [1.0, 0.7, 1.3], [0.2, 0.5, 1.0]
    slacks = [0.0, 0.5, 2.0] if method == "slack_ties" else [0.0, 0.0, 0.0]
    mp = [
        {"weight": w, "density": d, **({"slack": s} if method == "slack_ties" else {})}
        for w, d, s in zip(weights, densities, slacks, strict=True)
    ]
    for normalize, lam in [(True, 1.0), (False, 0.8)]:
        out, stats = run(method, base, models, mp, {"lambda": lam, "normalize": normalize})
        expected, kept, agreed = ref_ties(base, models, weights, densities, slacks, lam, normalize)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
        assert stats.kept.tolist() == kept
        assert stats.agreed.tolist() == agreed


def test_trim_keeps_exactly_k_with_ties():
    tau = torch.tensor([0.5, -0.5, 0.5, 0.1, -0.5, 0.2, 0.0, 0.5])
    out = trim_to_density(tau, 0.25)  # k = 2 of four entries tied at 0.5
    assert trim_count(8, 0.25) == 2
    assert out.tolist() == [0.5, -0.5, 0, 0, 0, 0, 0, 0]
    assert trim_to_density(tau, 0.01).count_nonzero() == 1  # k = max(1, floor(0.08)) = 1
    assert torch.equal(trim_to_density(tau, 1.0), tau)


def test_slack_zero_is_exactly_ties():
    base, models = random_models((64, 48), n=2, seed=7)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    params = {"lambda": 1.0, "normalize": True}
    a, sa = METHODS["ties"].fn(t(base), [t(m) for m in models], [{"weight": 1.0, "density": 0.3}] * 2, params)
    b, sb = METHODS["slack_ties"].fn(
        t(base), [t(m) for m in models], [{"weight": 1.0, "density": 0.3, "slack": 0.0}] * 2, params
    )
    assert torch.equal(a, b)
    assert torch.equal(sa.kept, sb.kept) and torch.equal(sa.agreed, sb.agreed)


def test_slack_changes_winner_of_a_sign_conflict():
    # entry 0: language +0.3, task -0.2 (conflict); entry 1: both positive
    base = np.zeros(2, np.float32)
    language = np.array([0.3, 0.1], np.float32)
    task = np.array([-0.2, 0.1], np.float32)

    def mp(s):
        return [{"weight": 1.0, "density": 1.0, "slack": 0.0}, {"weight": 1.0, "density": 1.0, "slack": s}]

    params = {"lambda": 1.0, "normalize": True}
    plain, stats0 = run("slack_ties", base, [language, task], mp(0.0), params)
    assert plain[0] == pytest.approx(0.3)  # larger magnitude wins without slack
    assert stats0.agreed.tolist() == [2, 1]
    slack, stats1 = run("slack_ties", base, [language, task], mp(0.6), params)
    assert slack[0] == pytest.approx(-0.2)  # (1 + 0.6) * 0.2 = 0.32 > 0.3: task keeps it
    assert stats1.agreed.tolist() == [1, 2]
    # just below the tipping point the language model still wins
    below, _ = run("slack_ties", base, [language, task], mp(0.4), params)
    assert below[0] == pytest.approx(0.3)


def test_election_zero_sum_is_positive():
    weighted = torch.tensor([[0.5, -0.5], [-0.5, 0.0]])
    assert elect_signs(weighted, [0.0, 0.0]).tolist() == [1.0, -1.0]


def test_retention_counts_by_hand():
    base = np.zeros(4, np.float32)
    lang = np.array([1.0, -2.0, 3.0, -4.0], np.float32)
    task = np.array([-0.5, 0.5, 0.5, 0.5], np.float32)
    _, stats = run(
        "ties", base, [lang, task], [{"weight": 1.0, "density": 0.5}] * 2, {"lambda": 1.0, "normalize": True}
    )
    # trim keeps lang [3, -4] and task's first two 0.5s: [-0.5, 0.5]; sums: -0.5, 0.5, 3, -4
    assert stats.kept.tolist() == [2, 2]
    assert stats.agreed.tolist() == [2, 2]


def test_linear_and_task_arithmetic_match_reference():
    base, models = random_models((16, 8), n=2, seed=3)
    out, stats = run("linear", None, models, [{"weight": 1.0}, {"weight": 3.0}], {"normalize": True})
    np.testing.assert_allclose(out, (models[0] + 3 * models[1]) / 4, rtol=1e-6)
    assert stats is None
    out, _ = run("task_arithmetic", base, models, [{"weight": 0.5}, {"weight": 1.0}], {"lambda": 0.9})
    np.testing.assert_allclose(out, base + 0.9 * (0.5 * (models[0] - base) + (models[1] - base)), rtol=1e-5, atol=1e-6)
