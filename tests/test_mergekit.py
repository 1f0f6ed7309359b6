"""mergekit 0.1.5 compatibility: its last three methods, layer swapping, gradients and
filters (ours and in mergekit configs read as they are), and, in the slow tests, the same
merges run by mergekit 0.1.5 itself (its own venv, bench/.venv-mergekit) compared bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from lrmerge_hub.cli import main
from lrmerge_hub.errors import RecipeError
from lrmerge_hub.merge.methods import METHODS, layer_swap_share
from lrmerge_hub.merge.tensor_params import TensorParams, evaluate, layer_of, position
from lrmerge_hub.recipe.mergekit import from_mergekit, to_mergekit
from lrmerge_hub.recipe.spec import parse_recipe

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT_VERSION = "0.1.5"


def load_all(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from lrmerge_hub.synth.tiny import make_family

    return make_family(tmp_path_factory.mktemp("mk") / "models", layers=4, seed=3)


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


# -- gradients and filters: mergekit's evaluation, by hand ---------------------------------


def test_gradient_interpolates_like_mergekit():
    g = [0.0, 0.5, 0.3, 0.7, 1.0]
    assert evaluate(g, "x", 0.0) == 0.0 and evaluate(g, "x", 1.0) == 1.0
    assert evaluate(g, "x", 0.25) == 0.5  # exactly the second anchor
    assert evaluate(g, "x", 0.375) == pytest.approx(0.4)  # halfway between 0.5 and 0.3
    assert evaluate([True, False], "x", 0.49) is True and evaluate([True, False], "x", 1.0) is False
    # positions: layer / (L - 1) inside the layers, 0 outside, 1 for a one-layer model
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12 and layer_of("model.norm.weight") is None
    assert layer_of("transformer.h.3.attn.c_attn.weight") == 3
    assert [position(i, 5) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert position(None, 5) == 0.0 and position(0, 1) == 1.0


def test_filters_first_match_wins_and_unmatched_falls_through():
    s = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.3}]
    assert evaluate(s, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate(s, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.3
    assert evaluate(s, "model.norm.weight", 0.0) is None  # the declared default then applies
    assert evaluate(s + [{"value": 0.9}], "model.norm.weight", 0.0) == 0.9
    assert evaluate([{"filter": "*", "value": 2}], "anything", 0) == 2


def test_recipe_gradients_resolve_per_tensor_and_round_trip(tmp_path, family):
    folder = family["base"].parent
    data = {
        "method": "slack_ties",
        "base": str(family["base"]),
        "output": str(tmp_path / "out"),
        "models": [
            {"model": str(family["language"]), "role": "language", "density": [0.2, 0.8]},
            {
                "model": str(family["task"]),
                "role": "task",
                "density": 0.5,
                "slack": [{"filter": "mlp", "value": [0.0, 2.0]}, {"value": 0.5}],
            },
        ],
        "parameters": {"lambda": [1.0, 0.5]},
    }
    r = parse_recipe(data, folder)
    assert r.models[0].params["density"] == 0.2 and r.models[1].params["slack"] == 0.5
    assert r.models[1].settings["slack"][0]["filter"] == "mlp"
    resolve = TensorParams.of(r, 4)
    mp, params = resolve("model.layers.2.mlp.down_proj.weight")  # t = 2/3
    assert mp[0]["density"] == pytest.approx(0.2 + 0.6 * 2 / 3) and mp[1]["slack"] == pytest.approx(4 / 3)
    assert params["lambda"] == pytest.approx(1.0 - 0.5 * 2 / 3)
    mp, params = resolve("model.embed_tokens.weight")  # outside the layers: t = 0
    assert (mp[0]["density"], mp[1]["slack"], params["lambda"]) == (0.2, 0.5, 1.0)
    again = parse_recipe(yaml.safe_load(r.to_yaml()), folder)  # recipe.yaml keeps the settings
    assert again.models[1].settings == r.models[1].settings and again.settings == {"lambda": [1.0, 0.5]}


def test_gradient_merge_keeps_the_fused_path_and_equals_the_reference(tmp_path, family):
    """A gradient recipe through the CPU kernels equals the torch reference per tensor with
    the resolved values, and differs from the merge without the gradient."""
    from lrmerge_hub.merge.engine import local_sources, merge

    data = {
        "method": "ties",
        "base": str(family["base"]),
        "models": [
            {"model": str(family["language"]), "density": [0.1, 0.9], "weight": 0.7},
            {"model": str(family["task"]), "density": 0.5, "weight": [{"filter": "self_attn", "value": [0.2, 1.0]}]},
        ],
    }
    r = parse_recipe(data, family["base"].parent)
    merge(r, local_sources(r), tmp_path / "grad", device="cpu", engine="kernels", progress=False)
    flat = r.replace(models=[m.__class__(ref=m.ref, role=m.role, params=m.params) for m in r.models], settings={})
    merge(flat, local_sources(flat), tmp_path / "flat", device="cpu", engine="kernels", progress=False)
    out, plain = load_all(tmp_path / "grad"), load_all(tmp_path / "flat")
    src = {k: load_all(p) for k, p in family.items()}
    resolve = TensorParams.of(r, 4)
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        mp, params = resolve(name)
        expected, _ = METHODS["ties"].fn(src["base"][name], [src["language"][name], src["task"][name]], mp, params)
        assert torch.equal(out[name], expected), name
    assert not torch.equal(
        out["model.layers.3.self_attn.q_proj.weight"], plain["model.layers.3.self_attn.q_proj.weight"]
    )
    assert torch.equal(out["lm_head.weight"], plain["lm_head.weight"])  # t = 0 there: the gradients' first values


@pytest.mark.parametrize(
    "value, needle",
    [
        ([0.1, 1.5], "models[0].density: must be <= 1.0 (in the gradient, got 1.5)"),
        ([{"filter": 3, "value": 0.5}], "models[0].density: [0].filter must be text"),
        ([{"filter": "mlp", "value": 0.5, "other": 1}], "models[0].density: [0] must be {filter: TEXT, value: ...}"),
        ([], "models[0].density: must be a value, a gradient"),
    ],
)
def test_bad_settings_are_one_line_errors(tmp_path, family, value, needle):
    data = {
        "method": "ties",
        "base": str(family["base"]),
        "models": [{"model": str(family["language"]), "density": value}, {"model": str(family["task"])}],
    }
    with pytest.raises(RecipeError) as e:
        parse_recipe(data, tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)


# -- the three methods and layer swapping, by hand ------------------------------------------


def test_ram_takes_unique_changes_and_averages_shared_ones():
    base = np.zeros((1, 4), np.float32)
    a = np.array([[0.5, 0.0, 0.2, 0.0]], np.float32)
    b = np.array([[0.0, 0.3, 0.4, 1e-6]], np.float32)  # 1e-6 is below epsilon: unchanged
    out, _ = METHODS["ram"].fn(t(base), [t(a), t(b)], [{}, {}], {"epsilon": 1e-5})
    np.testing.assert_allclose(out.numpy(), [[0.5, 0.3, 0.3, 0.0]], rtol=0, atol=1e-7)
    # RAM+: each model has 1 shared and 1 unique entry, rho = 1 capped at alpha 0.2: unique x 1.04
    out, _ = METHODS["ramplus_tl"].fn(t(base), [t(a), t(b)], [{}, {}], {"epsilon": 1e-5, "r": 0.2, "alpha": 0.2})
    np.testing.assert_allclose(out.numpy(), [[0.52, 0.312, 0.3, 0.0]], rtol=1e-6)


def test_arcee_fusion_keeps_only_outlier_changes():
    # small changes everywhere, large enough that each row's KL divergence stands far above
    # float32 rounding (1e-4 changes, or a uniform shift, to which softmax is blind, leave a
    # divergence of rounding noise, which differs between CPUs' vector widths), and one large
    # change whose row's divergence makes that row's changes the outliers
    rng = np.random.default_rng(1)
    base = rng.standard_normal((8, 64)).astype(np.float32)
    model = (base + 1e-2 * rng.standard_normal((8, 64))).astype(np.float32)
    model[3, 5] += 3.0
    out, _ = METHODS["arcee_fusion"].fn(t(base), [t(model)], [{}], {})
    changed = out.numpy() != base
    # the definition in float64: importance = |delta| * KL(softmax(model) || softmax(base)) per
    # row; kept where importance >= median + 1.5 * (q3 - q1), order statistics at floor(q (n - 1))
    m, b = model.astype(np.float64), base.astype(np.float64)
    p = np.exp(m - m.max(1, keepdims=True))
    q = np.exp(b - b.max(1, keepdims=True))
    p, q = p / p.sum(1, keepdims=True) + 1e-8, q / q.sum(1, keepdims=True) + 1e-8
    importance = np.abs(m - b) * (p * np.log(p / q)).sum(1, keepdims=True)
    ranked = np.sort(importance.reshape(-1))
    q1, median, q3 = (ranked[int(f * (ranked.size - 1))] for f in (0.25, 0.5, 0.75))
    fence = median + 1.5 * (q3 - q1)
    clear = np.abs(importance - fence) > 1e-3 * fence  # decisions float32 rounding cannot flip
    assert np.array_equal(changed[clear], (importance >= fence)[clear])
    assert changed[3].all() and torch.equal(out[3], t(model)[3])
    assert (~changed & (model != base)).sum() > 350  # most small changes are dropped


def test_layer_swap_schedule():
    p = {"bottom": 2, "top": 1, "blend": 0}
    assert [layer_swap_share(i, 8, p) for i in range(8)] == [1, 1, 0, 0, 0, 0, 0, 1]
    assert layer_swap_share(None, 8, p) == 1.0  # embeddings, final norm, head: the language expert
    p = {"bottom": 2, "top": 2, "blend": 2}  # two blended layers at each seam: 2/3, 1/3
    assert [layer_swap_share(i, 10, p) for i in range(10)] == pytest.approx(
        [1, 1, 2 / 3, 1 / 3, 0, 0, 1 / 3, 2 / 3, 1, 1]
    )
    with pytest.raises(ValueError, match="exceeds the model's 4 layers"):
        layer_swap_share(0, 4, {"bottom": 3, "top": 2, "blend": 0})


def test_layer_swap_merge_takes_whole_layers(tmp_path, family):
    from lrmerge_hub.merge.engine import local_sources, merge

    data = {
        "method": "layer_swap",
        "models": [
            {"model": str(family["task"]), "role": "task"},
            {"model": str(family["language"]), "role": "language"},
        ],
        "parameters": {"bottom": 1, "top": 1, "blend": 1},
    }
    r = parse_recipe(data, tmp_path)
    merge(r, local_sources(r), tmp_path / "out", device="cpu", progress=False)
    out = load_all(tmp_path / "out")
    lang, task = load_all(family["language"]), load_all(family["task"])
    q = "self_attn.q_proj.weight"
    assert torch.equal(out[f"model.layers.0.{q}"], lang[f"model.layers.0.{q}"])
    assert torch.equal(out[f"model.layers.3.{q}"], lang[f"model.layers.3.{q}"])
    for i in (1, 2):  # blend 1: the layers next to each seam are half and half
        assert torch.equal(
            out[f"model.layers.{i}.{q}"], 0.5 * lang[f"model.layers.{i}.{q}"] + 0.5 * task[f"model.layers.{i}.{q}"]
        )
    assert torch.equal(out["model.embed_tokens.weight"], lang["model.embed_tokens.weight"])
    with pytest.raises(RecipeError, match="one model with role: language and one with role: task"):
        parse_recipe(
            {
                **data,
                "models": [
                    {"model": str(family["task"]), "role": "task"},
                    {"model": str(family["language"]), "role": "task"},
                ],
            },
            tmp_path,
        )
    with pytest.raises(RecipeError, match="takes no base model"):
        parse_recipe({**data, "base": str(family["base"])}, tmp_path)


def test_layer_swap_sweeps_over_its_parameters(tmp_path, family):
    from lrmerge_hub.run.sweep import apply_point, grid_points, parse_grid

    r = parse_recipe(
        {
            "method": "layer_swap",
            "models": [
                {"model": str(family["task"]), "role": "task"},
                {"model": str(family["language"]), "role": "language"},
            ],
        },
        tmp_path,
    )
    points = [apply_point(r, p).parameters for p in grid_points(parse_grid(["bottom=1,2", "blend=0,1"]))]
    assert points == [
        {"bottom": 1, "top": 1, "blend": 0},
        {"bottom": 1, "top": 1, "blend": 1},
        {"bottom": 2, "top": 1, "blend": 0},
        {"bottom": 2, "top": 1, "blend": 1},
    ]


# -- mergekit configs read as they are -------------------------------------------------------


def test_mergekit_config_translates_with_mergekit_precedence(tmp_path, family):
    config = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "dtype": "float32",
        "out_dtype": "bfloat16",
        "tokenizer": {"source": "base"},
        "models": [
            {"model": str(family["base"])},  # mergekit lists the base too; it stays the base
            {"model": str(family["language"]), "parameters": {"density": [{"filter": "mlp", "value": 0.3}]}},
            {"model": str(family["task"]), "parameters": {"weight": 0.4}},
        ],
        "parameters": {"density": 0.6, "weight": 1.0, "lambda": [1.0, 0.5]},
    }
    data = from_mergekit(config)
    assert [m["model"] for m in data["models"]] == [str(family["language"]), str(family["task"])]
    # an unmatched filter of a model falls back to the top-level value, then the default
    assert data["models"][0]["density"] == [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]
    assert data["models"][1] == {"model": str(family["task"]), "weight": 0.4, "density": 0.6}
    assert data["parameters"] == {"lambda": [1.0, 0.5]} and data["dtype"] == "bfloat16"
    assert data["tokenizer_source"] == "base"
    r = parse_recipe(config, tmp_path)
    mp, _ = TensorParams.of(r, 4)("model.layers.0.self_attn.q_proj.weight")
    assert mp[0]["density"] == 0.6
    back = to_mergekit(r)  # and back: the same merge in mergekit's words
    assert back["merge_method"] == "ties" and back["parameters"]["lambda"] == [1.0, 0.5]
    assert back["models"][0]["parameters"]["density"] == [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]
    assert "slack" not in back["models"][0]["parameters"]


@pytest.mark.parametrize(
    "change, needle",
    [
        (
            {"models": None, "slices": [{"sources": [{"model": "org/a", "layer_range": [0, 4]}]}] * 2},
            "slices[0].sources: method ties needs the base 'org/base' among the slice's sources",
        ),
        (
            {"models": None, "slices": [{"sources": [{"model": "org/a", "layer_range": [2, 2]}]}]},
            "slices[0].sources[0].layer_range: must be [start, end] with 0 <= start < end (got [2, 2])",
        ),
        (
            {
                "models": None,
                "slices": [
                    {
                        "sources": [
                            {"model": "org/base", "layer_range": [1, 4]},
                            {"model": "org/a", "layer_range": [0, 2]},
                        ]
                    }
                ],
            },
            "slices[0].sources: layer ranges of different lengths",
        ),
        (
            {
                "models": None,
                "slices": [
                    {
                        "sources": [
                            {"model": "org/base", "layer_range": [1, 3]},
                            {"model": "org/a", "layer_range": [0, 2], "parameters": {"lambda": 1}},
                        ]
                    }
                ],
            },
            "slices[0].sources[1].parameters.lambda: a global parameter",
        ),
        (
            {
                "models": None,
                "slices": [
                    {"sources": [{"model": "org/a", "layer_range": [0, 4]}, {"model": "org/b", "layer_range": [0, 3]}]}
                ],
            },
            "layer ranges of different lengths",
        ),
        (
            {
                "models": None,
                "slices": [{"sources": [{"model": "org/a", "layer_range": [0, 4]}], "residual_weight": 0.5}],
            },
            "slices[0].residual_weight: not supported",
        ),
        (
            {"slices": [{"sources": [{"model": "org/a", "layer_range": [0, 4]}]}]},
            "slices: give either models or slices",
        ),
        ({"modules": {"text": {}}}, "modules: modules are not supported"),
        (
            {"tokenizer": {"source": "base", "pad_to_multiple_of": 8, "tokens": {"a": {"source": "org/x"}}}},
            "tokenizer.tokens.'a'.source: 'org/x' must be base or one of the models' names",
        ),
        ({"tokenizer": {"source": "union", "tokens": ["a"]}}, "tokenizer.tokens: must map tokens"),
        ({"tokenizer": {"source": "org/c"}}, "tokenizer_source: 'org/c' must be one of the models"),
        ({"chat_template": "vicuna"}, "chat_template: must be auto, one of alpaca, chatml, exaone, llama3, mistral"),
        ({"chat_template": "{{ short }}"}, "chat_template: must be auto, one of"),
        ({"merge_method": "slack_ties"}, "merge_method: unknown method 'slack_ties'"),
        ({"lora_merge_dtype": "float32"}, "lora_merge_dtype: not a mergekit 0.1.5 config key"),
        ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon: not a parameter of ties"),
        (
            {"models": [{"model": "org/a", "parameters": {"lambda": 2}}]},
            "models[0].parameters.lambda: a global parameter",
        ),
        ({"models": [{"model": "org/a", "weight": 2}]}, "models[0].weight: not a key of a mergekit model entry"),
        ({"models": [{"model": "org/a+org/lora"}]}, "names a LoRA"),
        ({"dtype": "float8"}, "dtype: must be one of"),
    ],
)
def test_unsupported_mergekit_keys_are_one_line_errors(tmp_path, change, needle):
    config = {"merge_method": "ties", "base_model": "org/base", "models": [{"model": "org/a"}], **change}
    config = {k: v for k, v in config.items() if v is not None}
    result = CliRunner().invoke(main, ["merge", str(_write(tmp_path / "c.yml", config)), "--out", str(tmp_path / "o")])
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], lines


def test_one_whole_slice_reads_as_models_and_its_layer_count_is_checked(tmp_path, family):
    config = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "slices": [
            {
                "sources": [
                    {"model": str(family["base"]), "layer_range": [0, 4]},
                    {
                        "model": str(family["language"]),
                        "layer_range": [0, 4],
                        "parameters": {"density": [{"filter": "mlp", "value": 0.3}]},
                    },
                    {"model": str(family["task"]), "layer_range": [0, 4]},
                ],
                "parameters": {"density": 0.7},
            }
        ],
        "parameters": {"density": 0.9, "weight": 1.0},
        "dtype": "float32",
    }
    r = parse_recipe(config, tmp_path)
    assert [m.ref.spec for m in r.models] == [str(family["language"]), str(family["task"])] and r.layers == 4
    mp, _ = TensorParams.of(r, 4)("model.layers.0.self_attn.q_proj.weight")
    assert [p["density"] for p in mp] == [0.7, 0.7]  # the source's, then the slice's, then the top level's
    mp, _ = TensorParams.of(r, 4)("model.layers.0.mlp.up_proj.weight")
    assert [p["density"] for p in mp] == [0.3, 0.7]
    config["slices"][0]["sources"] = [{**src, "layer_range": [0, 3]} for src in config["slices"][0]["sources"]]
    result = CliRunner().invoke(
        main, ["merge", str(_write(tmp_path / "c.yml", config)), "--out", str(tmp_path / "o"), "--device", "cpu"]
    )
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "Error: layers: the layer ranges name 3 layers but base has 4; one slice that starts at layer 0 "
        "takes every layer (several slices may take parts of models)"
    ]
    assert not (tmp_path / "o").exists()


def _franken(family, **first):
    return {
        "merge_method": "slerp",
        "base_model": str(family["base"]),
        "slices": [
            {
                "sources": [
                    {"model": str(family["base"]), "layer_range": [1, 3]},
                    {"model": str(family["task"]), "layer_range": [0, 2], **first},
                ],
                "parameters": {"t": [0.2, 0.8]},
            },
            {
                "sources": [
                    {"model": str(family["language"]), "layer_range": [3, 4]},
                    {"model": str(family["base"]), "layer_range": [0, 1]},
                ]
            },
        ],
        "parameters": {"t": 0.5},
        "dtype": "float32",
    }


def test_slices_plan_renumbers_layers_and_takes_outside_tensors_from_the_end_slices(tmp_path, family):
    from lrmerge_hub.merge.engine import build_plan, local_sources, open_sources

    r = parse_recipe(_franken(family), tmp_path)
    readers = open_sources(r, local_sources(r))
    try:
        plan = build_plan(r, readers)
    finally:
        for reader in readers.values():
            reader.close()
    jobs = {j.name: j for j in plan.jobs}
    assert plan.layers == 3 and sorted({layer_of(n) for n in jobs} - {None}) == [0, 1, 2]
    q = "self_attn.q_proj.weight"
    lang = str(family["language"])
    assert jobs[f"model.layers.1.{q}"].inputs == (
        ("base", "base", f"model.layers.2.{q}"),
        (str(family["task"]), str(family["task"]), f"model.layers.1.{q}"),
    )
    assert jobs[f"model.layers.1.{q}"].t == 1.0 and jobs[f"model.layers.0.{q}"].t == 0.0
    # the second slice's base is listed second; it comes first for the method
    assert jobs[f"model.layers.2.{q}"].inputs == (
        ("base", "base", f"model.layers.0.{q}"),
        (lang, lang, f"model.layers.3.{q}"),
    )
    assert jobs[f"model.layers.2.{q}"].t == 1.0  # a one-layer slice: mergekit's t = 1
    assert jobs["model.embed_tokens.weight"].slice == 0 and jobs["lm_head.weight"].slice == 1
    assert jobs["lm_head.weight"].t == jobs["model.embed_tokens.weight"].t == 0.0
    assert [n for n in jobs if layer_of(n) is None][0] == "model.embed_tokens.weight"  # before the layers


def test_slices_merge_the_mapped_layers_with_the_slice_parameters(tmp_path, family):
    from lrmerge_hub.merge.engine import local_sources, merge

    r = parse_recipe(_franken(family), tmp_path)
    merge(r, local_sources(r), tmp_path / "out", device="cpu", progress=False)
    out, src = load_all(tmp_path / "out"), {k: load_all(p) for k, p in family.items()}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    n = "model.layers.{}.mlp.up_proj.weight"
    slerp = METHODS["slerp"].fn
    assert torch.equal(
        out[n.format(1)], slerp(src["base"][n.format(2)], [src["task"][n.format(1)]], [{}], {"t": 0.8})[0]
    )
    assert torch.equal(
        out[n.format(2)], slerp(src["base"][n.format(0)], [src["language"][n.format(3)]], [{}], {"t": 0.5})[0]
    )
    head = slerp(src["base"]["lm_head.weight"], [src["language"]["lm_head.weight"]], [{}], {"t": 0.5})[0]
    assert torch.equal(out["lm_head.weight"], head)
    from lrmerge_hub.run.sweep import apply_point

    with pytest.raises(RecipeError, match="a recipe with slices is not swept"):
        apply_point(r, {"t": 0.3})  # a grid value would set no slice's parameter
    again = parse_recipe(yaml.safe_load(r.to_yaml()), tmp_path)  # recipe.yaml keeps the slices
    assert [(sl.ranges, sl.part.settings) for sl in again.slices] == [(sl.ranges, sl.part.settings) for sl in r.slices]


def test_a_slice_models_filters_match_their_own_tensor_names(tmp_path, family):
    """mergekit matches the filters of a model's parameters (at any level) against that
    model's tensor (layer 2 here), those of global parameters against the output's (layer 0)."""
    config = _franken(family, parameters={"weight": [{"filter": "layers.2.", "value": 0.3}, {"value": 0.9}]})
    config["merge_method"] = "ties"
    config["slices"][0]["parameters"] = {
        "density": [{"filter": "layers.0.", "value": 0.4}, {"value": 0.6}],
        "lambda": [{"filter": "layers.0.", "value": 0.5}, {"value": 1.0}],
    }
    config["slices"][0]["sources"][1]["layer_range"] = [2, 4]
    r = parse_recipe({**config, "parameters": {}}, tmp_path)
    resolve = TensorParams.of(r.slices[0].part, None)
    mp, params = resolve("model.layers.0.mlp.up_proj.weight", 0.0, ["model.layers.2.mlp.up_proj.weight"])
    assert mp == [{"weight": 0.3, "density": 0.6, "slack": 0.0}] and params["lambda"] == 0.5


def test_sliced_ties_gives_the_same_bits_on_the_kernels_and_the_torch_engine(tmp_path, family):
    from lrmerge_hub.merge.engine import local_sources, merge

    config = _franken(family, parameters={"density": [0.3, 0.9], "weight": 1.0})
    config.update(merge_method="ties", parameters={"density": 0.5, "weight": 0.7})
    del config["slices"][0]["parameters"]
    r = parse_recipe(config, tmp_path)
    for engine in ("kernels", "torch"):
        merge(r, local_sources(r), tmp_path / engine, device="cpu", engine=engine, progress=False)
    kernels, torch_engine = load_all(tmp_path / "kernels"), load_all(tmp_path / "torch")
    assert len(kernels) == 30 and all(torch.equal(v, torch_engine[k]) for k, v in kernels.items())
    src = {k: load_all(p) for k, p in family.items()}
    n = "model.layers.{}.self_attn.q_proj.weight"
    mp = [{"weight": 1.0, "density": 0.9, "slack": 0.0}]  # the gradient's end: the slice's last layer
    expected, _ = METHODS["ties"].fn(
        src["base"][n.format(2)], [src["task"][n.format(1)]], mp, r.slices[0].part.parameters
    )
    assert torch.equal(kernels[n.format(1)], expected)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"models": [{"model": "x"}]}, "slices: give either models or slices, not both"),
        ({"slices": []}, "slices: must be a non-empty list"),
        (
            {"slices": [{"sources": [{"model": "B", "layers": [0, 2]}, {"model": "T", "layers": [0, 3]}]}]},
            "slices[0].sources: layer ranges of different lengths",
        ),
        (
            {"slices": [{"sources": [{"model": "B", "layers": [0, 2], "t": 1}, {"model": "T", "layers": [0, 2]}]}]},
            "slices[0].sources[0]: the slice's base takes no parameters",
        ),
        (
            {"slices": [{"sources": [{"model": "T", "layers": [0, 2]}]}]},
            "slices[0].sources: method slerp needs the base",
        ),
        (
            {"slices": [{"sources": [{"model": "B", "layers": [0, 2]}, {"model": "T", "layers": "all"}]}]},
            "slices[0].sources[1].layers: must be [start, end]",
        ),
        (
            {
                "slices": [
                    {"sources": [{"model": "B", "layers": [0, 2]}, {"model": "T", "layers": [0, 2]}], "lambda": 1}
                ]
            },
            "slices[0]: unknown key 'lambda'",
        ),
        (
            {
                "slices": [
                    {"sources": [{"model": "B", "layers": [0, 2]}, {"model": "T", "layers": [0, 2], "weight": 1}]}
                ]
            },
            "slices[0]: models[0]: unknown key 'weight'",
        ),
        ({"method": "layer_swap", "base": None}, "slices: method layer_swap sets each layer by its own schedule"),
        (
            {
                "method": "linear",
                "slices": [
                    {"sources": [{"model": "B", "layers": [0, 2]}]},
                    {"sources": [{"model": "B", "layers": [0, 2]}, {"model": "T", "layers": [0, 2]}]},
                ],
            },
            "slices: the last slice has 2 sources and the first 1",
        ),
    ],
)
def test_bad_recipe_slices_are_one_line_errors(tmp_path, family, change, needle):
    data = {
        "method": "slerp",
        "base": "B",
        "slices": [{"sources": [{"model": "B", "layers": [0, 2]}, {"model": "T", "layers": [1, 3]}]}],
        **change,
    }
    data = {k: v for k, v in data.items() if v is not None}
    for name, role in (("B", "base"), ("T", "task")):
        (tmp_path / name).symlink_to(family[role])
    with pytest.raises(RecipeError) as e:
        parse_recipe(data, tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_recipe_convert_round_trips_slices(tmp_path, family):
    config = _franken(family)
    config["slices"][0]["parameters"] = {"t": [{"filter": "mlp", "value": 0.1}]}
    src = _write(tmp_path / "mk.yml", config)
    result = CliRunner().invoke(
        main, ["recipe", "convert", str(src), "--to", "lrmerge", "-o", str(tmp_path / "ours.yml")]
    )
    assert result.exit_code == 0, result.output
    ours = yaml.safe_load((tmp_path / "ours.yml").read_text())
    assert [[s["layers"] for s in sl["sources"]] for sl in ours["slices"]] == [[[1, 3], [0, 2]], [[0, 1], [3, 4]]]
    result = CliRunner().invoke(main, ["recipe", "convert", str(tmp_path / "ours.yml"), "--to", "mergekit"])
    assert result.exit_code == 0, result.output
    back = yaml.safe_load(result.stdout)
    first, again = parse_recipe(yaml.safe_load(src.read_text()), tmp_path), parse_recipe(back, tmp_path)
    assert [(sl.ranges, sl.part.settings, [m.settings for m in sl.part.models]) for sl in again.slices] == [
        (sl.ranges, sl.part.settings, [m.settings for m in sl.part.models]) for sl in first.slices
    ]
    # the slice's filter falls back to the top level's t, as in mergekit
    assert back["slices"][0]["parameters"]["t"] == [{"filter": "mlp", "value": 0.1}, {"value": 0.5}]


def _write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- against mergekit 0.1.5 itself (slow: builds its venv once) -------------------------------


@pytest.fixture(scope="session")
def mergekit_venv():
    """bench/.venv-mergekit with mergekit 0.1.5 (system site-packages: the CPU torch is
    reused), built once as bench/merge_bench.py builds it."""
    venv = ROOT / "bench" / ".venv-mergekit"
    if not (venv / "bin" / "mergekit-yaml").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                f"mergekit=={MERGEKIT_VERSION}",
                "torch==2.13.0",
            ],
            check=True,
        )
    return venv


def mergekit_yaml(venv, config: Path, out: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [str(venv / "bin" / "mergekit-yaml"), str(config), str(out)],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )


def lrmerge_merge(config: Path, out: Path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lrmerge_hub",
            "merge",
            str(config),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--format",
            "quiet",
        ],
        check=True,
        cwd=ROOT,
        timeout=600,
    )


MK_METHODS = """
import sys, numpy as np, torch
from mergekit.merge_methods.api import merge_tensors
d = np.load(sys.argv[1]); out = {}
for shape in ("2d", "1d"):
    base = torch.from_numpy(d[shape + "base"]); ms = [torch.from_numpy(d[f"{shape}m{i}"]) for i in range(3)]
    out[shape + "arcee_fusion"] = merge_tensors([base, ms[0]], "arcee_fusion", base_index=0).numpy()
    out[shape + "ram"] = merge_tensors([base] + ms, "ram", base_index=0, parameters={"epsilon": 0.05}).numpy()
    out[shape + "ramplus_tl"] = merge_tensors([base] + ms, "ramplus_tl", base_index=0,
                                              parameters={"epsilon": 0.05, "r": 0.3, "alpha": 0.5}).numpy()
    out[shape + "linear"] = merge_tensors(ms, "linear", parameters={"weight": [0.3, 0.7, 0.45]}).numpy()
np.savez(sys.argv[2], **out)
"""


@pytest.mark.slow
def test_methods_equal_mergekit_bit_for_bit(tmp_path, mergekit_venv):
    """arcee_fusion, ram, ramplus_tl, and linear with weights whose products round (mergekit's
    addcmul_ is a fused multiply-add: one rounding per model)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for shape, dims in (("2d", (96, 64)), ("1d", (300,))):
        base = rng.standard_normal(dims).astype(np.float32)
        arrays[shape + "base"] = base
        for i in range(3):
            d = (rng.standard_normal(dims) * 0.1).astype(np.float32)
            d[rng.random(dims) < 0.4] = 0  # unchanged entries, so RAM sees unique and shared changes
            arrays[f"{shape}m{i}"] = base + d
    np.savez(tmp_path / "in.npz", **arrays)
    (tmp_path / "mk.py").write_text(MK_METHODS)
    subprocess.run(
        [
            str(mergekit_venv / "bin" / "python"),
            str(tmp_path / "mk.py"),
            str(tmp_path / "in.npz"),
            str(tmp_path / "out.npz"),
        ],
        check=True,
        timeout=300,
    )
    theirs = np.load(tmp_path / "out.npz")
    for shape in ("2d", "1d"):
        base, ms = t(arrays[shape + "base"]), [t(arrays[f"{shape}m{i}"]) for i in range(3)]
        ours = {
            "arcee_fusion": METHODS["arcee_fusion"].fn(base, ms[:1], [{}], {})[0],
            "ram": METHODS["ram"].fn(base, ms, [{}] * 3, {"epsilon": 0.05})[0],
            "ramplus_tl": METHODS["ramplus_tl"].fn(base, ms, [{}] * 3, {"epsilon": 0.05, "r": 0.3, "alpha": 0.5})[0],
            "linear": METHODS["linear"].fn(None, ms, [{"weight": w} for w in (0.3, 0.7, 0.45)], {"normalize": True})[0],
        }
        for name, out in ours.items():
            assert np.array_equal(out.numpy(), theirs[shape + name]), (shape, name)
            assert not np.array_equal(out.numpy(), arrays[shape + "base"]), (shape, name)  # it changed something


GRADIENT_CONFIGS = {
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {language}
    parameters:
      density: [0.2, 0.5, 0.8]
      weight:
        - filter: self_attn
          value: [0.3, 0.9]
        - filter: mlp
          value: 0.6
  - model: {task}
    parameters:
      density: 0.5
parameters:
  weight: 1.0
  normalize: true
  lambda: [1.0, 0.8]
dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {task}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "slerp_slice": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {task}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "frankenmerge": """
slices:
  - sources:
      - model: {language}
        layer_range: [0, 3]
  - sources:
      - model: {task}
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
""",
    "slerp_slices": """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {task}
        layer_range: [0, 2]
  - sources:
      - model: {base}
        layer_range: [1, 4]
      - model: {language}
        layer_range: [0, 3]
    parameters:
      t: [0.2, 0.9]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "ties_tokenizer_base": """
merge_method: ties
base_model: {base}
models:
  - model: {language}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {task}
    parameters: {{weight: 0.5, density: [0.3, 0.6]}}
tokenizer:
  source: base
dtype: float32
""",
    "ramplus_tl": """
merge_method: ramplus_tl
base_model: {base}
models:
  - model: {language}
  - model: {task}
parameters:
  epsilon: [0.001, 0.03]
  r:
    - filter: mlp
      value: 0.5
  alpha: 0.3
dtype: float32
out_dtype: bfloat16
""",
}


@pytest.fixture(scope="module")
def extended_family(tmp_path_factory):
    from lrmerge_hub.synth.tiny import make_family

    return make_family(tmp_path_factory.mktemp("mkx") / "models", layers=2, seed=5, extend_language_vocab=8)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GRADIENT_CONFIGS))
def test_mergekit_config_with_gradients_and_filters_equals_mergekit(
    tmp_path, family, extended_family, mergekit_venv, name
):
    """The same mergekit config file, unchanged, through mergekit-yaml and lrmerge merge:
    identical tensors, bit for bit (float32 computation on float32 inputs). The tokenizer case
    runs on a family whose language model adds vocabulary (base's tokenizer: base's rows)."""
    family = extended_family if "tokenizer" in name else family
    config = _write_text(
        tmp_path / "config.yml", GRADIENT_CONFIGS[name].format(**{k: str(v) for k, v in family.items()})
    )
    mergekit_yaml(mergekit_venv, config, tmp_path / "mergekit")
    lrmerge_merge(config, tmp_path / "ours")
    theirs, ours = load_all(tmp_path / "mergekit"), load_all(tmp_path / "ours")
    assert set(theirs) == set(ours)
    differ = [k for k in theirs if not torch.equal(theirs[k], ours[k])]
    assert differ == []
    base = load_all(family["base"])
    changed = sum(k not in base or not torch.equal(ours[k].float(), base[k]) for k in ours)
    assert changed > len(ours) // 2  # not a copy of the base
    report = json.loads((tmp_path / "ours" / "merge_report.json").read_text())
    assert report["method"] == yaml.safe_load(config.read_text())["merge_method"]
    layers = [json.loads((tmp_path / d / "config.json").read_text())["num_hidden_layers"] for d in ("mergekit", "ours")]
    assert layers[0] == layers[1] == 1 + max(layer_of(k) or 0 for k in ours)  # a frankenmerge's own count


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def merge_both_with_template(tmp_path, family, mergekit_venv, template):
    """A linear merge of the base and the task model with `chat_template: template`, by
    mergekit-yaml into tmp_path/mergekit and by lrmerge merge into tmp_path/ours."""
    config = {
        "merge_method": "linear",
        "models": [{"model": str(family["base"])}, {"model": str(family["task"])}],
        "parameters": {"weight": 1.0},
        "chat_template": template,
        "dtype": "float32",
    }
    path = _write(tmp_path / "config.yml", config)
    mergekit_yaml(mergekit_venv, path, tmp_path / "mergekit")
    lrmerge_merge(path, tmp_path / "ours")


@pytest.mark.slow
@pytest.mark.parametrize("template", ["auto", TEMPLATE])
def test_chat_template_is_written_as_mergekit_writes_it(tmp_path, family, mergekit_venv, template):
    merge_both_with_template(tmp_path, family, mergekit_venv, template)
    theirs, ours = ((tmp_path / d / "chat_template.jinja").read_text() for d in ("mergekit", "ours"))
    assert ours == theirs
    expected = (family["task"] / "chat_template.jinja").read_text().strip() if template == "auto" else TEMPLATE
    assert ours == expected  # auto: the one model that has a template
    for d in ("mergekit", "ours"):
        assert "chat_template" not in json.loads((tmp_path / d / "tokenizer_config.json").read_text())


CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! "},
        {"role": "user", "content": "Name a colour."},
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alpaca", "chatml", "exaone", "llama3", "mistral"])
def test_named_chat_template_renders_as_mergekits(tmp_path, family, mergekit_venv, name):
    from transformers import AutoTokenizer

    merge_both_with_template(tmp_path, family, mergekit_venv, name)
    rendered = {}
    for d in ("mergekit", "ours"):
        assert (tmp_path / d / "chat_template.jinja").is_file()
        assert "chat_template" not in json.loads((tmp_path / d / "tokenizer_config.json").read_text())
        tok = AutoTokenizer.from_pretrained(tmp_path / d)
        rendered[d] = [
            tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            for chat in CHATS
            for prompt in (False, True)
        ]
    assert rendered["ours"] == rendered["mergekit"]
    task = AutoTokenizer.from_pretrained(family["task"])
    assert rendered["ours"][0] != task.apply_chat_template(CHATS[0], tokenize=False)  # not the task model's


@pytest.mark.parametrize("template", [TEMPLATE, "chatml"])
def test_chat_template_replaces_the_task_models(tmp_path, family, template):
    from lrmerge_hub.merge.engine import local_sources, merge
    from lrmerge_hub.recipe.spec import named_chat_template

    data = {"method": "linear", "models": [{"model": str(family["base"])}, {"model": str(family["task"])}]}
    r = parse_recipe({**data, "chat_template": template}, tmp_path)
    merge(r, local_sources(r), tmp_path / "own", device="cpu", progress=False)
    text = TEMPLATE if template == TEMPLATE else named_chat_template(template)
    assert (tmp_path / "own" / "chat_template.jinja").read_text() == text
    assert "chat_template" not in json.loads((tmp_path / "own" / "tokenizer_config.json").read_text())
    assert parse_recipe(yaml.safe_load(r.to_yaml()), tmp_path).chat_template == template  # a name stays a name
    assert to_mergekit(r)["chat_template"] == template


def _write_text(path, text):
    path.write_text(text)
    return path


# -- the mergekit equivalent in the report and the card; recipe convert ------------------------


def _ties_recipe(family, out):
    return {
        "method": "slack_ties",
        "base": str(family["base"]),
        "output": str(out),
        "models": [
            {"model": str(family["language"]), "role": "language", "density": [0.3, 0.7]},
            {"model": str(family["task"]), "role": "task", "density": 0.5, "weight": [{"filter": "mlp", "value": 0.8}]},
        ],
    }


def test_report_and_card_carry_the_mergekit_config_which_merges_the_same(tmp_path, family):
    from lrmerge_hub.card.build import build_card
    from lrmerge_hub.merge.engine import local_sources, merge

    r = parse_recipe(_ties_recipe(family, tmp_path / "ours"), tmp_path)
    report = merge(r, local_sources(r), r.output, device="cpu", progress=False)
    config = report["mergekit_config"]  # slack 0 everywhere: slack_ties is exactly ties
    assert config["merge_method"] == "ties" and config["models"][0]["parameters"]["density"] == [0.3, 0.7]
    assert json.loads((r.output / "merge_report.json").read_text())["mergekit_config"] == config
    card = build_card(r.output).text
    assert "The same merge as a mergekit 0.1.5 config" in card and "merge_method: ties" in card
    # the card's config (models named ./language etc.) merged again from beside the models
    again = _write(family["base"].parent / "from-card.yml", config)
    result = CliRunner().invoke(
        main, ["merge", str(again), "--out", str(tmp_path / "again"), "--device", "cpu", "--format", "quiet"]
    )
    assert result.exit_code == 0, result.output
    ours, theirs = load_all(r.output), load_all(tmp_path / "again")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with_slack = _ties_recipe(family, tmp_path / "x")
    with_slack["models"][1]["slack"] = 0.5
    assert to_mergekit(parse_recipe(with_slack, tmp_path)) is None  # no mergekit equivalent: none claimed


def test_recipe_convert_both_ways(tmp_path, family):
    src = _write(tmp_path / "ours.yml", _ties_recipe(family, tmp_path / "out"))
    result = CliRunner().invoke(
        main, ["recipe", "convert", str(src), "--to", "mergekit", "-o", str(tmp_path / "mk.yml")]
    )
    assert result.exit_code == 0, result.output
    mk = yaml.safe_load((tmp_path / "mk.yml").read_text())
    assert mk["merge_method"] == "ties" and mk["base_model"] == str(family["base"])
    result = CliRunner().invoke(main, ["recipe", "convert", str(tmp_path / "mk.yml"), "--to", "lrmerge"])
    assert result.exit_code == 0, result.output
    back = parse_recipe(yaml.safe_load(result.stdout), tmp_path)
    first = parse_recipe(_ties_recipe(family, tmp_path / "out"), tmp_path)
    for name in ("model.layers.3.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"):
        (mp, params), (mp0, params0) = TensorParams.of(back, 4)(name), TensorParams.of(first, 4)(name)
        assert mp == mp0 and {k: params[k] for k in params0} == params0  # the same values everywhere
    assert back.method == "ties" and back.parameters["rescale"] is False  # slack 0: exactly ties
    assert mk["models"][1]["parameters"]["weight"] == [{"filter": "mlp", "value": 0.8}, {"value": 1.0}]
    bad = _write(
        tmp_path / "swap.yml",
        {
            "method": "layer_swap",
            "models": [
                {"model": str(family["task"]), "role": "task"},
                {"model": str(family["language"]), "role": "language"},
            ],
        },
    )
    result = CliRunner().invoke(main, ["recipe", "convert", str(bad), "--to", "mergekit"])
    assert result.exit_code == 2 and "no mergekit 0.1.5 equivalent" in result.stderr


@pytest.mark.slow
def test_converted_recipe_runs_identically_in_mergekit(tmp_path, family, mergekit_venv):
    src = _write(tmp_path / "ours.yml", _ties_recipe(family, tmp_path / "ours"))
    result = CliRunner().invoke(
        main, ["recipe", "convert", str(src), "--to", "mergekit", "-o", str(tmp_path / "mk.yml")]
    )
    assert result.exit_code == 0, result.output
    mergekit_yaml(mergekit_venv, tmp_path / "mk.yml", tmp_path / "mergekit")
    lrmerge_merge(src, tmp_path / "ours")
    ours, theirs = load_all(tmp_path / "ours"), load_all(tmp_path / "mergekit")
    assert set(ours) == set(theirs) and [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def test_no_mergekit_config_is_claimed_for_an_extended_vocabulary_kept(tmp_path, extended_family):
    from lrmerge_hub.merge.engine import local_sources, merge

    fam = extended_family
    data = {
        "method": "ties",
        "base": str(fam["base"]),
        "models": [{"model": str(fam["language"]), "density": 0.5}, {"model": str(fam["task"]), "density": 0.5}],
    }
    r = parse_recipe(data, tmp_path)
    assert merge(r, local_sources(r), tmp_path / "kept", device="cpu", progress=False)["mergekit_config"] is None
    r = parse_recipe({**data, "tokenizer_source": "base"}, tmp_path)
    config = merge(r, local_sources(r), tmp_path / "base", device="cpu", progress=False)["mergekit_config"]
    assert config["tokenizer_source"] == "base"
    r = parse_recipe({**data, "tokenizer_source": str(fam["language"])}, tmp_path)
    assert to_mergekit(r) is None


WORD_CONFIGS = {
    "ties": """
merge_method: ties
base_model: {base}
models:
  - model: {one}
    parameters: {{weight: 0.7, density: [0.3, 0.8]}}
  - model: {two}
    parameters: {{weight: 0.5, density: 0.6}}
tokenizer_source: {two}
dtype: float32
""",
    "ties_source_one": """
merge_method: ties
base_model: {base}
models:
  - model: {one}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {two}
    parameters: {{weight: 0.3, density: 0.9}}
tokenizer:
  source: {one}
  pad_to_multiple_of: 4
dtype: float32
""",
    "tokens": """
merge_method: ties
base_model: {base}
models:
  - model: {one}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {two}
    parameters: {{weight: 0.3, density: 0.9}}
tokenizer:
  source: {two}
  tokens:
    "<new>": {{source: {{kind: model_token, model: {one}, token: y}}}}
    "<new2>": {{source: {{kind: model_token, model: {base}, token_id: 3}}, force: true}}
    a: {{source: {base}, force: true}}
    w: {{source: {{kind: zero}}}}
    x: {{source: {two}}}
dtype: float32
""",
    "base_padded": """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {one}
    parameters: {{weight: 0.6}}
  - model: {two}
    parameters: {{weight: 0.3}}
tokenizer:
  source: base
  pad_to_multiple_of: 4
dtype: float32
""",
    "union": """
merge_method: ties
base_model: {base}
models:
  - model: {one}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {two}
    parameters: {{weight: 0.3, density: 0.9}}
tokenizer_source: union
dtype: float32
""",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WORD_CONFIGS))
def test_a_tokenizer_source_aligns_the_embeddings_as_mergekit_does(tmp_path, mergekit_venv, name):
    """Models whose vocabularies differ in tokens and order, with a model's tokenizer as the
    output's, the base's padded, or their union, and tokens whose rows the config names:
    mergekit-yaml and lrmerge merge give the same tensors bit for bit and the same
    vocabulary (rows a model lacks filled from the one model that has the token, the base,
    or the mean of two models). A union's new tokens are compared token by
    token: mergekit numbers them in hash order, which changes from run to run."""
    from transformers import AutoTokenizer

    from lrmerge_hub.synth.tiny import make_word_model

    from tests.test_vocabulary import WORDS

    models = {k: make_word_model(tmp_path / k, w, seed=i + 1) for i, (k, w) in enumerate(WORDS.items())}
    config = _write_text(tmp_path / "config.yml", WORD_CONFIGS[name].format(**{k: str(v) for k, v in models.items()}))
    mergekit_yaml(mergekit_venv, config, tmp_path / "mergekit")
    lrmerge_merge(config, tmp_path / "ours")
    theirs, ours = load_all(tmp_path / "mergekit"), load_all(tmp_path / "ours")
    vocabs = [AutoTokenizer.from_pretrained(str(tmp_path / d)).get_vocab() for d in ("mergekit", "ours")]
    if name == "union":  # every model's words; mergekit numbers the new ones in an order of its run
        words = list(dict.fromkeys(WORDS["base"] + WORDS["one"] + WORDS["two"]))
        assert vocabs[1] == {w: i for i, w in enumerate(words)} and set(vocabs[0]) == set(words)
        assert all(vocabs[0][w] == i for i, w in enumerate(WORDS["base"]))
        order = torch.tensor([vocabs[1][w] for w in sorted(vocabs[0], key=vocabs[0].get)])
        ours = {k: v[order] if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in ours.items()}
    else:
        words = {"ties": WORDS["two"], "tokens": WORDS["two"] + ["<new>", "<new2>"]}.get(name)
        words = words or WORDS["one" if name.endswith("one") else "base"]
        assert vocabs[0] == vocabs[1] == {w: i for i, w in enumerate(words)}
    assert set(theirs) == set(ours)
    assert [k for k in theirs if not torch.equal(theirs[k], ours[k])] == []
    rows = ours["model.embed_tokens.weight"].shape[0]
    # seven and six words padded to a multiple of 4
    assert rows == {"ties_source_one": 8, "base_padded": 8}.get(name, len(vocabs[1]))
    sizes = [json.loads((tmp_path / d / "config.json").read_text())["vocab_size"] for d in ("mergekit", "ours")]
    assert sizes == [rows, rows]


MERGEKIT_CARD = """---
library_name: transformers
tags:
- mergekit
- merge
---
# merged

This is a merge of pre-trained language models created using mergekit.

```yaml
not: [a, config
```

### Configuration

```yaml
{config}
```
"""


def test_a_mergekit_card_merges_again_from_a_file_and_from_the_hub(tmp_path, family, hub_server):
    config = GRADIENT_CONFIGS["ties"].format(**{k: str(v) for k, v in family.items()}).strip()
    direct = _write_text(tmp_path / "config.yml", config)
    (tmp_path / "card").mkdir()
    card = _write_text(tmp_path / "card" / "README.md", MERGEKIT_CARD.format(config=config))
    hub_server.seed("alice/merged", tmp_path / "card")
    for source, out in ((direct, "direct"), (card, "from-card"), ("alice/merged", "from-hub")):
        result = CliRunner().invoke(
            main, ["merge", str(source), "--out", str(tmp_path / out), "--device", "cpu", "--format", "quiet"]
        )
        assert result.exit_code == 0, result.output
    first = load_all(tmp_path / "direct")
    for out in ("from-card", "from-hub"):
        assert all(torch.equal(v, load_all(tmp_path / out)[k]) for k, v in first.items())
    _write_text(tmp_path / "card" / "README.md", "# a card\n\n```yaml\nmethod: ties\n```\n")
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "card" / "README.md"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "holds no mergekit config" in result.stderr
    result = CliRunner().invoke(main, ["merge", "alice/missing", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
