"""The chat templates `chat_template` names (mergekit 0.1.5's names), rendered as transformers
renders a tokenizer's template, against each format written out by hand. The slow test in
test_mergekit.py compares them with mergekit's own."""

import pytest
import yaml
from click.testing import CliRunner
from transformers.utils.chat_template_utils import render_jinja_template

from lrmerge_hub.cli import main
from lrmerge_hub.errors import RecipeError
from lrmerge_hub.recipe.mergekit import to_mergekit
from lrmerge_hub.recipe.spec import CHAT_TEMPLATE_NAMES, named_chat_template, parse_recipe

SYSTEM_USER = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": " Hello! "},  # the spaces show which formats trim a turn
    {"role": "user", "content": "Bye"},
]

# each format's text for SYSTEM_USER and TURNS, then what add_generation_prompt appends
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n Hello! <|im_end|>\n<|im_start|>user\nBye<|im_end|>\n",
        "<|im_start|>assistant\n",
    ),
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\n"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\n",
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\n"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\n"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\n",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "alpaca": (  # the system text, a blank line, then the turns; no separator before the prompt
        "You are terse.\n\n### Instruction:\nHi there",
        "\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\nBye",
        "### Response:\n",
    ),
    "mistral": (  # the system text opens the first user turn; no generation prompt
        "<s> [INST] You are terse.\n\nHi there [/INST]",
        "<s> [INST] Hi [/INST]  Hello! </s> [INST] Bye [/INST]",
        "",
    ),
    "exaone": (  # the indentation and blank lines mergekit's template leaves in
        "    [|system|]You are terse.\n        [|endofturn|]\n\n    [|user|]Hi there\n        \n\n",
        "        [|system|][|endofturn|]\n\n    [|user|]Hi\n        \n\n"
        "    [|assistant|] Hello! \n        [|endofturn|]\n\n    [|user|]Bye\n        \n\n",
        "    [|assistant|]\n",
    ),
}


def render(name, messages, add_generation_prompt):
    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=named_chat_template(name),
        add_generation_prompt=add_generation_prompt,
        bos_token="<s>",
        eos_token="</s>",
    )
    return rendered[0]


@pytest.mark.parametrize("name", CHAT_TEMPLATE_NAMES)
def test_each_named_template_renders_its_format(name):
    system_user, turns, prompt = EXPECTED[name]
    assert render(name, SYSTEM_USER, False) == system_user
    assert render(name, TURNS, False) == turns
    assert render(name, SYSTEM_USER, True) == system_user + prompt
    assert render(name, TURNS, True) == turns + prompt


def test_alpaca_prompts_only_after_a_question_and_mistral_rejects_turns_out_of_order():
    answered = [*SYSTEM_USER, {"role": "assistant", "content": "Hello."}]
    expected = "You are terse.\n\n### Instruction:\nHi there\n\n### Response:\nHello."
    assert render("alpaca", answered, True) == render("alpaca", answered, False) == expected
    with pytest.raises(Exception, match="turns must be user, assistant"):
        render("mistral", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], False)


def test_a_name_is_kept_in_our_recipe_and_mergekits(tmp_path):
    data = {"method": "linear", "models": ["org/a", "org/b"], "chat_template": "llama3"}
    r = parse_recipe(data, tmp_path)
    assert r.chat_template == "llama3" and to_mergekit(r)["chat_template"] == "llama3"
    (tmp_path / "ours.yml").write_text(yaml.safe_dump(data))
    for src, to in (("ours.yml", "mergekit"), ("mk.yml", "lrmerge")):
        result = CliRunner().invoke(main, ["recipe", "convert", str(tmp_path / src), "--to", to])
        assert result.exit_code == 0, result.output
        (tmp_path / "mk.yml").write_text(result.stdout)
        assert yaml.safe_load(result.stdout)["chat_template"] == "llama3"
    with pytest.raises(RecipeError, match="must be auto, one of alpaca, chatml"):
        parse_recipe({**data, "chat_template": "vicuna"}, tmp_path)
