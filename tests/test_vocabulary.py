"""A model's tokenizer, or the union of all, as the output's (mergekit's `tokenizer_source:
MODEL` and `union`): every input's vocabulary tensors aligned to that tokenizer's vocabulary
before the merge, on tiny models whose word-level vocabularies differ in tokens and order.
The same merges against mergekit 0.1.5 itself are in tests/test_mergekit.py."""

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from safetensors.numpy import load_file
from transformers import AutoTokenizer

from lrmerge_hub.cli import main
from lrmerge_hub.errors import InputModelError, RecipeError
from lrmerge_hub.merge.engine import local_sources, merge
from lrmerge_hub.merge.vocabulary import MISSING, align, permute
from lrmerge_hub.recipe.mergekit import from_mergekit, to_mergekit
from lrmerge_hub.recipe.spec import parse_recipe
from lrmerge_hub.synth.tiny import make_word_model

WORDS = {
    "base": ["<unk>", "a", "b", "c", "d", "e"],
    "one": ["<unk>", "c", "a", "x", "b", "e", "y"],
    "two": ["<unk>", "b", "z", "a", "x", "w", "c", "d"],
}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    return {name: make_word_model(root / name, w, seed=i + 1) for i, (name, w) in enumerate(WORDS.items())}


def config(words, method="task_arithmetic", source="two"):
    return {
        "merge_method": method,
        "base_model": str(words["base"]),
        "models": [
            {"model": str(words["one"]), "parameters": {"weight": 0.7}},
            {"model": str(words["two"]), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
        "tokenizer_source": str(words[source]),
    }


def test_align_takes_mergekits_row_for_a_token_a_model_lacks():
    vocabs = {
        "base": {"a": 0, "b": 1, "c": 2},
        "m1": {"b": 0, "a": 1, "d": 2, "e": 3},
        "m2": {"a": 0, "d": 1, "e": 2, "c": 3},
    }
    out = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4, "f": 5}
    vmap = align(out, vocabs, {k: len(v) for k, v in vocabs.items()}, "base")
    assert dict(vmap.rows)["m1"] == (1, 0, MISSING, 2, 3, MISSING)
    assert dict(vmap.fill) == {
        1: ("base",),  # b: base and m1 have it: the base's row
        2: ("base",),  # c: base and m2: the base's
        3: ("m1", "m2"),  # d: the base lacks it: the mean of the two that have it
        4: ("m1", "m2"),
        5: (),  # f: no model has it: zeros
    }
    # without a base, a token two models have is their mean
    assert dict(align(out, vocabs, {k: len(v) for k, v in vocabs.items()}, None).fill)[1] == ("base", "m1")

    rng = np.random.default_rng(0)
    arrays = {k: rng.standard_normal((len(v), 3)).astype(np.float32) for k, v in vocabs.items()}
    got = permute(arrays, vmap)
    # by hand: m1's own rows where it has the token, the filled rows elsewhere
    assert np.array_equal(got["m1"][0], arrays["m1"][1]) and np.array_equal(got["m1"][2], arrays["base"][2])
    assert np.array_equal(got["base"][1], arrays["base"][1])  # its own row, never the fill
    assert np.array_equal(got["base"][3], (arrays["m1"][2] + arrays["m2"][1]) / 2)
    assert np.array_equal(got["m2"][3], arrays["m2"][1])
    assert not got["m1"][5].any() and got["m1"].shape == (6, 3)


def test_padding_rows_are_each_inputs_mean_row():
    vocabs = {"base": {"a": 0, "b": 1, "c": 2}, "m": {"c": 0, "a": 1}}
    vmap = align({"a": 0, "b": 1, "c": 2}, vocabs, {"base": 3, "m": 2}, "base", pad_to_multiple_of=4)
    assert vmap.size == 4 and align({"a": 0}, {"m": {"a": 0}}, {"m": 1}, None, 1).size == 1
    arrays = {"base": np.arange(6, dtype=np.float32).reshape(3, 2), "m": np.array([[7, 8], [9, 10]], np.float32)}
    got = permute(arrays, vmap)
    assert got["m"][:3].tolist() == [[9, 10], [2, 3], [7, 8]]  # b: only the base has it
    assert got["m"][3].tolist() == [6, 7] and got["base"][3].tolist() == [2, 3]


def test_a_token_past_a_models_rows_is_an_error():
    with pytest.raises(InputModelError, match="token 'b' of the output tokenizer has id 1 .* past its 1"):
        align({"a": 0, "b": 1}, {"m": {"a": 0, "b": 1}}, {"m": 1}, None)


@pytest.mark.parametrize("source", ["two", "union"])
def test_a_tokenizer_source_aligns_every_input_before_the_merge(tmp_path, words, source):
    data = config(words)
    if source == "union":
        data["tokenizer_source"] = "union"
    recipe = parse_recipe(data, tmp_path)
    assert recipe.tokenizer == data["tokenizer_source"] and recipe.tokenizer_source is None
    report = merge(recipe, local_sources(recipe), tmp_path / "out", device="cpu", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    inputs = {k: load_file(p / "model.safetensors") for k, p in words.items()}

    # the output speaks model two's vocabulary (its tokenizer, its size), or every model's
    # words: the base's at their ids, then the others' model by model
    out_words = WORDS["two"] if source == "two" else list(dict.fromkeys(WORDS["base"] + WORDS["one"] + WORDS["two"]))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab() == {w: i for i, w in enumerate(out_words)}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(out_words)
    assert report["vocab"]["output_rows"] == len(out_words)

    def row(model, name, word):
        """A model's row for `word`, filled as mergekit fills a token the model lacks."""
        has = [k for k in WORDS if word in WORDS[k]]
        if word not in WORDS[model]:
            model = has[0] if len(has) == 1 else "base" if "base" in has else None
        if model is None:
            return np.mean([inputs[k][name][WORDS[k].index(word)].astype(np.float64) for k in has], axis=0)
        return inputs[model][name][WORDS[model].index(word)].astype(np.float64)

    for name in VOCAB_TENSORS:
        assert out[name].shape == (len(out_words), 8)
        for i, word in enumerate(out_words):
            base = row("base", name, word)
            expected = base + 0.7 * (row("one", name, word) - base) + 0.5 * (row("two", name, word) - base)
            np.testing.assert_allclose(out[name][i], expected, rtol=1e-5, atol=1e-6, err_msg=f"{name} {word}")
    # the other tensors are merged as they are
    layer = "model.layers.0.mlp.up_proj.weight"
    expected = inputs["base"][layer] + 0.7 * (inputs["one"][layer] - inputs["base"][layer])
    expected += 0.5 * (inputs["two"][layer] - inputs["base"][layer])
    np.testing.assert_allclose(out[layer], expected, rtol=1e-5, atol=1e-6)
    assert report["mergekit_config"]["tokenizer_source"] == ("./two" if source == "two" else "union")


def test_the_torch_engine_aligns_to_the_same_bits(tmp_path, words):
    recipe = parse_recipe(config(words, method="ties"), tmp_path)
    for engine in ("kernels", "torch"):
        merge(recipe, local_sources(recipe), tmp_path / engine, device="cpu", engine=engine, progress=False)
    kernels, torch_out = (load_file(tmp_path / e / "model.safetensors") for e in ("kernels", "torch"))
    assert all(np.array_equal(kernels[k], torch_out[k]) for k in kernels)
    assert kernels["lm_head.weight"].shape[0] == len(WORDS["two"])


def test_a_models_tokenizer_round_trips_through_both_formats(tmp_path, words):
    data = config(words)
    recipe = parse_recipe(data, tmp_path)
    assert to_mergekit(recipe, as_written=True)["tokenizer_source"] == str(words["two"])
    back = parse_recipe(recipe.to_dict(as_written=True), tmp_path)
    assert back.tokenizer == recipe.tokenizer and back.sha256() == recipe.sha256()
    assert recipe.to_dict()["tokenizer"] == {"source": "./two"}  # named as the models are
    same = from_mergekit(
        {**{k: v for k, v in data.items() if k != "tokenizer_source"}, "tokenizer": {"source": str(words["two"])}}
    )
    assert same["tokenizer"] == {"source": str(words["two"])}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["recipe", "convert", str(tmp_path / "mk.yml"), "--to", "lrmerge"])
    assert result.exit_code == 0, result.output
    ours = yaml.safe_load(result.output)
    assert ours["tokenizer"] == {"source": str(words["two"])}
    (tmp_path / "ours.yml").write_text(result.output)
    result = CliRunner().invoke(main, ["recipe", "convert", str(tmp_path / "ours.yml"), "--to", "mergekit"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["tokenizer_source"] == str(words["two"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokenizer_source": "./elsewhere"}, "tokenizer_source: './elsewhere' must be one of the models"),
        ({"merge_method": "linear"}, "with linear and a base_model is not supported yet"),
        (
            {"merge_method": "linear", "base_model": None, "tokenizer_source": "union"},
            "tokenizer_source: union without a base_model is not supported",
        ),
        ({"tokenizer": {"source": "union", "tokens": {"a": {}}}}, "tokenizer.tokens: not supported yet"),
        ({"tokenizer": {"source": "base", "pad_to_multiple_of": 8}}, "pad_to_multiple_of: with source base"),
    ],
)
def test_unsupported_model_tokenizers_are_one_line_errors(tmp_path, words, change, message):
    data = {k: v for k, v in {**config(words), **change}.items() if v is not None}
    if "tokenizer" in change:
        del data["tokenizer_source"]
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data, tmp_path)
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "mk.yml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


def test_our_recipe_takes_a_tokenizer_of_one_of_its_models(tmp_path, words):
    data = {
        "method": "task_arithmetic",
        "base": str(words["base"]),
        "models": [{"model": str(words["one"]), "weight": 0.7}],
        "tokenizer": {"source": str(words["two"])},
    }
    with pytest.raises(RecipeError, match="tokenizer.source: must be union or one of the models' names"):
        parse_recipe(data, tmp_path)
    with pytest.raises(RecipeError, match="tokenizer.source: union needs a base"):
        parse_recipe({**data, "method": "linear", "base": None, "tokenizer": {"source": "union"}}, tmp_path)
    assert parse_recipe({**data, "tokenizer": {"source": "union"}}, tmp_path).to_dict()["tokenizer"] == {
        "source": "union"
    }
    with pytest.raises(RecipeError, match="give either tokenizer or tokenizer_source"):
        parse_recipe({**data, "tokenizer": {"source": str(words["one"])}, "tokenizer_source": "base"}, tmp_path)
    with pytest.raises(RecipeError, match="tokenizer: must be a mapping like"):
        parse_recipe({**data, "tokenizer": str(words["one"])}, tmp_path)
    with pytest.raises(RecipeError, match="tokenizer.pad_to_multiple_of: must be a positive whole number"):
        parse_recipe({**data, "tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, tmp_path)
    padded = parse_recipe({**data, "tokenizer": {"source": "union", "pad_to_multiple_of": 64}}, tmp_path)
    assert padded.to_dict()["tokenizer"] == {"source": "union", "pad_to_multiple_of": 64}
    assert to_mergekit(padded)["tokenizer"] == {"source": "union", "pad_to_multiple_of": 64}
    with pytest.raises(RecipeError, match="tokenizer.pad_to_multiple_of: with source base not supported yet"):
        parse_recipe(
            {**config(words), "tokenizer_source": None, "tokenizer": {"source": "base", "pad_to_multiple_of": 8}},
            tmp_path,
        )
