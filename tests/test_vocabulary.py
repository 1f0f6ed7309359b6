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
from lrmerge_hub.recipe.spec import TokenRow, parse_recipe
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
    assert {i: donors for i, donors, _ in vmap.fill} == {
        1: (("base", 1),),  # b: base and m1 have it: the base's row
        2: (("base", 2),),  # c: base and m2: the base's
        3: (("m1", 2), ("m2", 1)),  # d: the base lacks it: the mean of the two that have it
        4: (("m1", 3), ("m2", 2)),
        5: (),  # f: no model has it: zeros
    }
    # without a base, a token two models have is their mean
    no_base = align(out, vocabs, {k: len(v) for k, v in vocabs.items()}, None)
    assert no_base.fill[0] == (1, (("base", 1), ("m1", 0)), False)

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


def test_align_takes_the_rows_that_tokens_name():
    """mergekit's `tokenizer.tokens`: a model's row of the token, of another token (by name or
    id), zeros; `force` puts the row in every input, also one that has the token."""
    vocabs = {"base": {"a": 0, "b": 1, "c": 2}, "m1": {"b": 0, "a": 1, "d": 2}}
    sizes = {"base": 3, "m1": 3}
    out = {"a": 0, "b": 1, "c": 2, "d": 3, "new": 4}
    tokens = {
        "a": TokenRow(model="m1", force=True),
        "b": TokenRow(model="m1"),  # every input has it and no force: their own rows
        "c": TokenRow(zero=True),
        "d": TokenRow(model="base", token="b"),
        "new": TokenRow(model="m1", token_id=2),
    }
    vmap = align(out, vocabs, sizes, "base", tokens=tokens)
    assert vmap.fill == (
        (0, (("m1", 1),), True),
        (2, (), False),
        (3, (("base", 1),), False),
        (4, (("m1", 2),), False),
    )
    arrays = {
        "base": np.arange(6, dtype=np.float32).reshape(3, 2),
        "m1": -np.arange(1, 7, dtype=np.float32).reshape(3, 2),
    }
    got = permute(arrays, vmap)
    assert got["base"].tolist() == [[-3, -4], [2, 3], [4, 5], [2, 3], [-5, -6]]
    assert got["m1"].tolist() == [[-3, -4], [-1, -2], [0, 0], [-5, -6], [-5, -6]]

    for token, row, message in [
        ("d", TokenRow(model="base"), "'d': its source base does not have this token"),
        ("new", TokenRow(), "'new' needs a source"),
        ("new", TokenRow(model="m1", token_id=3), "row 3 is past m1's 3 embedding rows"),
        ("new", TokenRow(model="base", token="zz"), "its source base has no token 'zz'"),
    ]:
        with pytest.raises(InputModelError, match=message):
            align(out, vocabs, sizes, "base", tokens={**tokens, token: row})


def test_a_single_donor_row_is_taken_as_it_is():
    """mergekit copies the one row (a -0.0 stays -0.0); only a mean adds to zeros."""
    vocabs = {"base": {"a": 0}, "m": {"a": 0, "b": 1}}
    arrays = {"base": np.array([[1.0]], np.float32), "m": np.array([[1.0], [-0.0]], np.float32)}
    got = permute(arrays, align({"a": 0, "b": 1}, vocabs, {"base": 1, "m": 2}, "base"))
    assert np.signbit(got["base"][1, 0])


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
        ({"tokenizer": {"source": "union", "tokens": {"a": 3}}}, "tokenizer.tokens.'a': must be a mapping"),
        ({"tokenizer": {"source": "union", "tokens": {"a": {"source": "./c"}}}}, "'./c' must be base or one of"),
        (
            {"tokenizer": {"source": "union", "tokens": {"a": {"source": {"kind": "model_token", "token": "a"}}}}},
            "tokenizer.tokens.'a'.source: None must be base or one of the models",
        ),
        (
            {"tokenizer": {"source": "base", "tokens": {"a": {"source": {"kind": "model_token", "model": "x"}}}}},
            "kind model_token takes model and one of token or token_id",
        ),
        ({"tokenizer": {"source": "base", "tokens": {"a": {"force": "yes"}}}}, "force: must be true or false"),
        ({"tokenizer": {"source": "base", "tokens": {"a": {"source": 1}}}}, "source: must be a model, {kind"),
        ({"tokenizer": {"source": "base", "special": True}}, "tokenizer.special: not a key of mergekit's tokenizer"),
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
    with pytest.raises(RecipeError, match="tokenizer.source: must be union, base or one of the models' names"):
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
    base_padded = parse_recipe({**data, "tokenizer": {"source": "base", "pad_to_multiple_of": 8}}, tmp_path)
    assert base_padded.tokenizer == "base" and base_padded.pad_to_multiple_of == 8
    assert to_mergekit(base_padded)["tokenizer"] == {"source": "base", "pad_to_multiple_of": 8}
    with pytest.raises(RecipeError, match=r"tokenizer: \{source: base\} alone is written tokenizer_source: base"):
        parse_recipe({**data, "tokenizer": {"source": "base"}}, tmp_path)


TOKENS = {
    "<new>": {"source": {"kind": "model_token", "model": "ONE", "token": "y"}},
    "a": {"source": "BASE", "force": True},
    "w": {"source": {"kind": "zero"}},
}


def tokens_config(words):
    data = config(words)
    del data["tokenizer_source"]
    named = {"ONE": str(words["one"]), "BASE": str(words["base"])}
    tokens = yaml.safe_load(yaml.safe_dump(TOKENS))
    tokens["<new>"]["source"]["model"] = named["ONE"]
    tokens["a"]["source"] = named["BASE"]
    data["tokenizer"] = {"source": str(words["two"]), "tokens": tokens}
    return data


def test_tokens_take_the_rows_they_name_and_new_ones_join_the_tokenizer(tmp_path, words):
    data = tokens_config(words)
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "mk.yml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = load_file(tmp_path / "out" / "model.safetensors")
    inputs = {k: load_file(p / "model.safetensors") for k, p in words.items()}

    out_words = WORDS["two"] + ["<new>"]  # a token the tokenizer lacks is added after its own
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab() == {w: i for i, w in enumerate(out_words)}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == len(out_words)
    for name in VOCAB_TENSORS:
        rows = {k: inputs[k][name].astype(np.float64) for k in inputs}

        def own(model, word, rows=rows):
            return rows[model][WORDS[model].index(word)]

        def merged(base, one, two):  # task_arithmetic, weights 0.7 and 0.5
            return base + 0.7 * (one - base) + 0.5 * (two - base)

        a = own("base", "a")  # forced: every input's row is the base's
        zero = np.zeros_like(a)  # w: only two has it; the others take zeros
        new = own("one", "y")  # no input has it: every input takes one's row of y
        for word, expected in [
            ("a", merged(a, a, a)),
            ("w", merged(zero, zero, own("two", "w"))),
            ("<new>", merged(new, new, new)),
            ("b", merged(own("base", "b"), own("one", "b"), own("two", "b"))),
        ]:
            got = out[name][out_words.index(word)]
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"{name} {word}")

    # both formats carry the tokens; the card's mergekit config too
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["mergekit_config"]["tokenizer"]["tokens"]["<new>"]["source"]["token"] == "y"
    assert report["mergekit_config"]["tokenizer"]["tokens"]["a"] == {"source": "./base", "force": True}
    result = CliRunner().invoke(main, ["recipe", "convert", str(tmp_path / "mk.yml"), "--to", "lrmerge"])
    assert result.exit_code == 0, result.output
    ours = yaml.safe_load(result.output)
    assert ours["tokenizer"]["tokens"]["a"] == {"source": "base", "force": True}
    assert ours["tokenizer"]["tokens"]["w"] == {"source": {"kind": "zero"}}
    (tmp_path / "ours.yml").write_text(result.output)
    result = CliRunner().invoke(main, ["recipe", "convert", str(tmp_path / "ours.yml"), "--to", "mergekit"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["tokenizer"] == data["tokenizer"]


def test_a_token_whose_source_lacks_it_stops_before_any_output(tmp_path, words):
    data = tokens_config(words)
    data["tokenizer"]["tokens"] = {"w": {"source": str(words["one"])}}  # one has no w
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "mk.yml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "'w': its source" in result.output
    assert not (tmp_path / "out").exists()
