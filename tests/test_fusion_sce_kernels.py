"""arcee_fusion's and sce's kernels (kernels.fused_arcee_fusion, kernels.fused_sce) and their
torch-engine twins (torch_engine.fusion_merge, sce_merge) write the bits of the references
in methods.py (themselves compared with mergekit's in the slow tests): on bfloat16 and
float32 inputs; 0-, 1-, 2- and 3-D shapes, rows longer than torch splits across threads,
tensors past a kernel block, a divergence block (one row left over included) and a torch
engine chunk; importance scores and variances tied at the cut; sce's selection on and off,
slacks, 1-4 models; NaN/Inf inputs are refused; and the engine takes both paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.kernel_support import assert_same_outputs, merge_both_ways
from lrmerge_hub.merge import kernels, torch_engine
from lrmerge_hub.merge.engine import SHAPED, SUMMED_MODELS_MAX, covered
from lrmerge_hub.merge.kernels import FAST_PATHS, NonFiniteInput
from lrmerge_hub.merge.methods import METHODS, row_mean, softmax_divergence, two_rows
from lrmerge_hub.merge.torch_engine import CHUNK, FUSION_BLOCK, TORCH_METHODS, fusion_importance, host_tensor
from tests.test_della_kernels import tied_inputs
from tests.test_elementwise_kernels import bits, make_inputs

# a scalar; 1-D (one entry, 7, a kernel block and one, a row torch sums across threads);
# rows of one column; one row; many odd rows; a 3-D tensor
SHAPES = [(), (1,), (7,), (kernels.BLOCK + 1,), (70001,), (5, 1), (1, 2049), (203, 67), (4, 6, 5)]

SCE_CASES = [  # (slacks, select_topk)
    ([0.0, 0.0], 1.0),
    ([0.0, 0.5], 0.3),
    ([0.0, 0.0, 1e200], 0.1),
    ([0.2, 0.0, 0.7, 0.1], 0.7),
    ([0.0], 0.5),
]


def identical_rows(n: int, cols: int, bf16: bool, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rows that all repeat the first, whose deltas are mostly +-1/8 (some 0, some +-3/8):
    every row has the same divergence, so most importance scores are equal, the quartiles
    and the median among them, and the fence (the median: no spread) is one of them."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-60, 61, (cols,), generator=g) / 64.0
    steps = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0])[torch.randint(0, 10, (cols,), generator=g)]
    signs = torch.randint(0, 2, (cols,), generator=g) * 2 - 1
    model = base + signs * steps / 8.0
    dtype = torch.bfloat16 if bf16 else torch.float32
    return base.repeat(n // cols).to(dtype), [model.repeat(n // cols).to(dtype)]


def check(method: str, model_params: list[dict], params: dict, shape: tuple, base, xs, bf16: bool) -> None:
    """Kernels == reference == torch engine, bit for bit, and the same retention counts.
    Entries 5-9 (where there are) get a base of -0.0 and equal small negative deltas (no
    variance: sce drops them; too small for arcee_fusion's fence): the output's signed zeros
    there show that nothing is added from +0.0 where the reference adds -0.0."""
    base, xs = base.clone(), [x.clone() for x in xs]
    base[5:10] = -0.0
    for x in xs:
        x[5:10] = -(2.0**-12)
    want, stats = METHODS[method].fn(
        base.float().reshape(shape), [x.float().reshape(shape) for x in xs], model_params, params
    )
    want_bits = bits(want.to(torch.bfloat16) if bf16 else want)
    shaped = {"shape": shape} if method in SHAPED else {}
    got, kept, agreed = FAST_PATHS[method](
        bits(base), [bits(x) for x in xs], model_params, params, out_bf16=bf16, check_finite=True, **shaped
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
        **shaped,
    )
    assert bad_inputs == [0] * (len(xs) + 1) and bad_32 == bad_out == 0
    assert (t_kept, t_agreed) == want_counts
    assert np.array_equal(bits(merged).view(np.uint8), want_bits.view(np.uint8))


def check_fusion(shape: tuple, bf16: bool, seed: int, tied: bool = False) -> None:
    n = math.prod(shape)
    base, xs = identical_rows(n, shape[-1], bf16, seed) if tied else make_inputs(n, 1, bf16, seed)
    check("arcee_fusion", [{}], {}, shape, base, xs, bf16)


def check_sce(case: int, shape: tuple, bf16: bool, seed: int, tied: bool = False) -> None:
    slacks, select = SCE_CASES[case]
    n = math.prod(shape)
    base, xs = (tied_inputs if tied else make_inputs)(n, len(slacks), bf16, seed)
    check("sce", [{"slack": s} for s in slacks], {"select_topk": select, "int8_mask": False}, shape, base, xs, bf16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bf16", [False, True])
def test_fusion_kernels_and_torch_engine_equal_the_reference(shape, bf16):
    check_fusion(shape, bf16, seed=math.prod(shape))


@pytest.mark.parametrize(
    ("block", "shape"),
    [(FUSION_BLOCK, (FUSION_BLOCK // 1000 + 1, 1000))] + [(4096, (9, 1000)), (4096, (3001, 5)), (4096, (2, 5000))],
)
def test_fusion_past_a_divergence_block(monkeypatch, block, shape):
    """Blocks of rows, the one row left over joined to the last block (a block of one row
    would be summed across threads, not as the whole tensor's rows are); rows longer than a
    block, two to a block."""
    monkeypatch.setattr(torch_engine, "FUSION_BLOCK", block)
    check_fusion(shape, True, seed=2)


@pytest.mark.parametrize("shape", [(64, 200), (5, 3001)])
@pytest.mark.parametrize("bf16", [False, True])
def test_fusion_ties_at_the_fence(shape, bf16):
    """Equal rows: hundreds of entries share each importance score, the fence among them."""
    check_fusion(shape, bf16, seed=3, tied=True)
    n = math.prod(shape)
    base, xs = identical_rows(n, shape[-1], bf16, 3)
    out, _ = METHODS["arcee_fusion"].fn(base.float().reshape(shape), [xs[0].float().reshape(shape)], [{}], {})
    importance, _, _ = fusion_importance(base.float(), xs[0].float(), shape)
    taken = out.reshape(-1) != base.float()
    fence = importance[taken].min()
    assert int((importance == fence).sum()) > n // 2 and not taken.all()  # the fence is the tied median


def test_fusion_divergence_is_per_row():
    """The reference's divergence of a block of rows is that of the same rows of the whole
    tensor, bit for bit (the premise of the blocked divergence)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 3000, generator=g)
    model = base + 0.05 * torch.randn(40, 3000, generator=g)
    whole = softmax_divergence(model, base)
    for r, e in [(0, 2), (3, 17), (17, 40)]:
        part = softmax_divergence(model[r:e], base[r:e])
        assert torch.equal(part.view(torch.int32), whole[r:e].view(torch.int32))


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_fusion_order_statistics_are_kthvalues(rows):
    """The radix select gives kthvalue's values of the importance at every position asked,
    whatever the signs: rows of negative, +0.0, -0.0, NaN and Inf divergence (a numerically
    negative divergence makes negative scores; NaN sorts above +Inf), among tied scores."""
    g = torch.Generator().manual_seed(rows)
    cols = 1000
    base = torch.randn(rows * cols, generator=g)
    model = base + torch.randint(-3, 4, (rows * cols,), generator=g) / 8.0
    model[::7] = base[::7]  # |delta| = 0: zero scores of both signs
    special = [-1e-9, 0.0, -0.0, float("nan"), float("inf"), 2.5]
    divergence = torch.rand(rows, generator=g)
    for r in range(rows):
        divergence[r] = special[(r // 2) % len(special)] if r % 2 else divergence[r]
    importance = ((model - base).view(rows, cols).abs() * divergence.view(-1, 1)).view(-1)
    n = importance.numel()
    positions = [0, 1, n // 4, n // 2, (3 * n) // 4, n - 2, n - 1]
    got, bad = kernels.importance_order_statistics(base.numpy(), model.numpy(), divergence.numpy(), cols, positions)
    want = [torch.kthvalue(importance, p + 1).values for p in positions]
    for value, expected in zip(got, want, strict=True):
        assert (math.isnan(value) and bool(expected.isnan())) or value == float(expected), (got, want)
    assert not bad.any()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("case", range(len(SCE_CASES)))
def test_sce_kernels_and_torch_engine_equal_the_reference(shape, bf16, case):
    check_sce(case, shape, bf16, seed=math.prod(shape) + case)


@pytest.mark.parametrize("shape", [(2049,), (37, 301), (3, 257, 2)])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("case", [1, 2, 3])
def test_sce_ties_in_variance_at_the_cut(shape, bf16, case):
    """Deltas of 7 values: the variances take few values, and the cut falls among hundreds
    of equal ones (kept in index order)."""
    check_sce(case, shape, bf16, seed=case, tied=True)


def test_sce_past_a_torch_engine_chunk():
    check_sce(1, (CHUNK + 9,), True, seed=1)


@pytest.mark.parametrize("n", [7, 70001, 3_000_001])
def test_two_rows_reduce_to_the_rows_of_the_whole_array(n):
    """torch's mean, sum and vector_norm over the last dim of methods.two_rows (sce's
    row_mean; multislerp's norms and dot products) have, for each row alone, the bits of
    that row's in the whole (models, entries) float32 array, for 2-4 models, on sizes that
    torch splits across threads when it reduces a single row."""
    g = torch.Generator().manual_seed(n)
    reductions = [
        lambda a: a.mean(dim=-1),
        lambda a: a.sum(-1),
        lambda a: torch.linalg.vector_norm(a, dim=-1),
    ]
    for m in (2, 3, 4):
        values = torch.randn(m, n, generator=g) * 0.01
        for reduce in reductions:
            whole = reduce(values)
            rows = torch.stack([reduce(two_rows(values[i]))[0] for i in range(m)])
            assert torch.equal(rows.view(torch.int32), whole.view(torch.int32))
        assert torch.equal(row_mean(values[1]).view(torch.int32), values.mean(dim=1)[1].view(torch.int32))


def test_sce_variance_is_torchs():
    """kernels' variance is torch.var's (Welford in float64) bit for bit, on values where a
    float32 two-pass variance would differ."""
    g = torch.Generator().manual_seed(9)
    for m in (2, 3, 4):
        tv = torch.randn(m, 200_000, generator=g) * 0.01 + torch.randn(200_000, generator=g)
        n = 200_000
        var, mean, m2 = np.empty(n, dtype=np.float32), np.empty(n), np.empty(n)
        kernels._variance_block(tuple(t.numpy() for t in tv), np.zeros(n, dtype=np.float32), 0, n, mean, m2, var)
        assert np.array_equal(var.view(np.int32), torch.var(tv, dim=0, unbiased=False).numpy().view(np.int32))


@pytest.mark.parametrize(
    ("method", "which"), [("arcee_fusion", -1), ("arcee_fusion", 0), ("sce", -1), ("sce", 0), ("sce", 1)]
)
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_nan_and_inf_inputs_are_refused(method, value, which):
    shape = (300, 70)
    models = 1 if method == "arcee_fusion" else 2
    base, xs = make_inputs(math.prod(shape), models, False, seed=6)
    (base if which == -1 else xs[which])[12345] = value
    model_params = [{"slack": 0.0}] * models if method == "sce" else [{}]
    params = {"select_topk": 0.2, "int8_mask": False} if method == "sce" else {}
    shaped = {"shape": shape} if method in SHAPED else {}
    with pytest.raises(NonFiniteInput) as e:
        FAST_PATHS[method](bits(base), [bits(x) for x in xs], model_params, params, check_finite=True, **shaped)
    assert e.value.which == which
    *_, bad_inputs, _, _ = TORCH_METHODS[method](
        host_tensor(bits(base)), [host_tensor(bits(x)) for x in xs], model_params, params, None, **shaped
    )
    assert bad_inputs == [int(which == i) for i in range(-1, models)]


def test_covered_takes_sce_up_to_the_summed_models():
    """sce's disjoint mean is the reference's stacked sum: in model order up to SUMMED_MODELS_MAX."""
    for name in ("arcee_fusion", "sce"):
        assert name in FAST_PATHS and name in TORCH_METHODS
        assert not covered(METHODS[name], False, {}, 1)  # no base
    assert "arcee_fusion" in SHAPED and covered(METHODS["arcee_fusion"], True, {}, 1)
    assert covered(METHODS["sce"], True, {}, SUMMED_MODELS_MAX)
    assert not covered(METHODS["sce"], True, {}, SUMMED_MODELS_MAX + 1)


@pytest.mark.parametrize(
    ("method", "engine_name", "extend"),
    [("arcee_fusion", "kernels", 0), ("arcee_fusion", "torch", 0), ("arcee_fusion", "kernels", 8)]
    + [("sce", "kernels", 0), ("sce", "torch", 0)],
)
def test_engine_takes_the_fast_paths_and_writes_the_reference_bytes(tmp_path, monkeypatch, method, engine_name, extend):
    """A merge through the engine gives the same bytes with the kernels, or the torch engine
    on the CPU, as with the reference path; the fast path is called for every tensor (for
    arcee_fusion with the shape of its merged part: the shared rows where the language model
    extends the vocabulary by `extend` rows)."""
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
    models = [{"model": str(fam["language"]), "role": "language"}]
    parameters: dict = {}
    if method == "sce":
        models += [{"model": str(fam["task"]), "role": "task", "slack": 0.5}]
        parameters = {"select_topk": 0.3}
    recipe = parse_recipe(
        {
            "method": method,
            "base": str(fam["base"]),
            "models": models,
            "parameters": parameters,
            "languages": ["bo"],
            "license": "apache-2.0",
            "output": str(tmp_path / "out"),
        },
        tmp_path,
    )
    a, b, calls = merge_both_ways(monkeypatch, tmp_path, recipe, method, engine_name)
    assert len(calls) == len(a.tensors)
    if method == "arcee_fusion":  # the shapes merged: the tensors', but the extended ones' shared rows
        shapes = {tuple(a.tensors[name].spec.shape) for name in a.tensors}
        merged = {kw["shape"] for _, kw in calls}
        assert {len(shape) for shape in merged} == {1, 2}
        assert (merged <= shapes) == (extend == 0)
    assert_same_outputs(a, b)
