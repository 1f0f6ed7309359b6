"""The model card is data, not code (issue 11): hostile folder names, output names, model
ids, task names and license links reach the card only escaped for where they land, or are
refused. The rendered card is parsed back (Markdown tokens, the Python snippet's AST, the
shell lines, the YAML front matter) and checked, not searched for one bad string."""

from __future__ import annotations

import ast
import json
import re
import shlex

import pytest
import yaml
from markdown_it import MarkdownIt

from tests.card_support import TASK, lm_eval_results, make_merged_folder, write_results
from lrmerge_hub.card.build import GENERATED_END, GENERATED_START, build_card, push_card, write_card
from lrmerge_hub.metadata import check_metadata
from lrmerge_hub.errors import CardError, RecipeError
from lrmerge_hub.recipe.spec import parse_recipe

HOSTILE = [
    "x`y``z```w",
    "x](javascript:alert(1))",
    "[click](javascript:alert(1))",
    '"; __import__("os").system("id"); "',
    "q'; rm -rf ~; echo '",
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "line\nbreak\n# heading\n---\n",
    "key: [value, {x: y}] & *alias !!python/object",
    "| cell | break |",
    "_emph_ *bold* ~~strike~~",
    "www.evil.example",
    "$(id) `id` \\ end\\",
    "```\nimport os\n```",
    GENERATED_END,
    "tab\there\u2028sep",
    "<b onmouseover=alert(1)>bold",
]
FOLDER_NAMES = [name for name in HOSTILE if "/" not in name]  # a folder name cannot hold a '/'
LINK_PREFIXES = ("https://huggingface.co/", "https://arxiv.org/", "https://github.com/EleutherAI/")
OUR_HTML = {GENERATED_START, GENERATED_END, "<details><summary>lm-eval command</summary>", "</details>"}


def markdown_tokens(text: str):
    """The card body parsed as GitHub renders it (tables, strikethrough), with every link
    target allowed through, so that an injected `javascript:` link would show up."""
    md = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    md.validateLink = lambda url: True
    return md.parse(text)


def flat(tokens):
    for token in tokens:
        yield token
        yield from flat(token.children or [])


def one_line(value: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f\u2028\u2029]+", " ", value)


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def assert_card_is_data(
    text: str, metadata: dict, *, model_id: str, model_name: str, fences: tuple[str, ...] = ("python", "bash", "yaml")
) -> None:
    front, body = split_card(text)
    assert front == metadata  # the YAML front matter round-trips
    tokens = list(flat(markdown_tokens(body)))

    links = [t.attrGet("href") for t in tokens if t.type == "link_open"]
    assert links and all(str(href).startswith(LINK_PREFIXES) for href in links), links
    html = [t.content.strip() for t in tokens if t.type in ("html_block", "html_inline")]
    assert set(html) <= OUR_HTML, html

    heading = next(i for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h1")
    shown = "".join(t.content for t in tokens[heading + 1].children if t.type in ("text", "code_inline"))
    assert shown.strip() == one_line(model_name).strip()

    blocks = [t for t in tokens if t.type == "fence"]
    assert tuple(t.info for t in blocks) == fences  # no fence closed early, none added
    python, shell, _ = (t.content for t in blocks[-3:])
    tree = ast.parse(python)
    assigned = [(node.targets[0].id, node.value) for node in tree.body if isinstance(node, ast.Assign)]
    assert [name for name, _ in assigned] == ["model_id", "tokenizer", "model", "messages", "inputs", "output"]
    assert isinstance(assigned[0][1], ast.Constant) and assigned[0][1].value == model_id
    assert [type(node).__name__ for node in tree.body].count("Expr") == 1  # print(...), nothing injected

    words = shlex.split(shell.replace("\\\n", " "))  # each user string stays one shell word
    data = json.dumps({"model": model_name, "messages": [{"role": "user", "content": "..."}], "max_tokens": 256})
    assert words == [
        "lrmerge",
        "serve",
        model_id,
        "vllm",
        "serve",
        model_id,
        "--served-model-name",
        model_name,
        "--host",
        "127.0.0.1",
        "--port",
        "8000",
        "--dtype",
        "auto",
        "--generation-config",
        "vllm",
        "curl",
        "http://127.0.0.1:8000/v1/chat/completions",
        "-H",
        "Content-Type: application/json",
        "-d",
        data,
    ]


@pytest.mark.parametrize("name", FOLDER_NAMES)
def test_a_hostile_folder_name_stays_text_in_every_part_of_the_card(tmp_path, name):
    folder = make_merged_folder(tmp_path, ["bo"], name=name, license_="llama2")
    write_results(folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.35}))
    built = build_card(folder)
    assert_card_is_data(built.text, built.metadata, model_id=f"<org>/{name}", model_name=name)
    assert built.metadata["model-index"][0]["name"] == name


@pytest.mark.parametrize("name", HOSTILE[:6])
def test_hostile_names_from_the_merge_report_and_eval_files_stay_text(tmp_path, name):
    folder = make_merged_folder(tmp_path, ["bo"], name="merged", license_="llama2", local_task=name)
    results = lm_eval_results(f"task{name}", {"acc": 0.35}, dataset_path=f"evil{name}")
    results["lrmerge"] = {"command": f"-m lm_eval --tasks {name}"}
    write_results(folder, results)
    report = json.loads((folder / "merge_report.json").read_text())
    report["models"][-1].update(model=name, repo_id=None, revision=None)  # a local task model named `name`
    report["dtype"] = report["tokenizer_source"] = report["method"] = name
    report["parameters"] = {name: name}
    (folder / "merge_report.json").write_text(json.dumps(report))
    built = build_card(folder, repo_id="org/merged")
    assert_card_is_data(
        built.text,
        built.metadata,
        model_id="org/merged",
        model_name="merged",
        fences=("bash", "python", "bash", "yaml"),
    )
    commands = next(t.content for t in flat(markdown_tokens(split_card(built.text)[1])) if t.type == "fence")
    assert commands == f"python -m lm_eval --tasks {name}\n"


@pytest.mark.parametrize(
    "repo_id",
    [
        "org/name\n",
        "org/na me",
        "org/x](javascript:alert(1))",
        'org/x"; import os',
        "org/<b>",
        "org--x/y",
        "org/x..y",
        "org/name.git",
        "../org/x",
        "org/x/y",
        "ｏrg/x",
    ],
)
def test_a_repo_id_that_is_not_a_hub_id_is_refused(tmp_path, repo_id):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    with pytest.raises(CardError, match="not a Hub model id") as raised:
        build_card(folder, repo_id=repo_id)
    assert "\n" not in str(raised.value)
    with pytest.raises(CardError, match="not a Hub model id"):
        push_card(folder, repo_id)  # before any request
    base = {"base": "org/base", "models": [{"model": TASK}]}
    with pytest.raises(RecipeError) as raised:
        parse_recipe({**base, "push": {"repo": repo_id}}, tmp_path)
    assert "\n" not in str(raised.value)
    with pytest.raises(RecipeError):
        parse_recipe({**base, "models": [{"model": TASK, "hub_id": repo_id}]}, tmp_path)


def test_a_source_id_that_is_not_a_hub_id_is_refused_not_linked(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    report = json.loads((folder / "merge_report.json").read_text())
    report["base"]["repo_id"] = "org/x)[evil](javascript:alert(1)"
    (folder / "merge_report.json").write_text(json.dumps(report))
    with pytest.raises(CardError, match="base_model"):
        build_card(folder)


@pytest.mark.parametrize(
    "link",
    [
        "LICENSE",
        "http://example.org/license",
        "javascript:alert(1)",
        "https://example.org/a b",
        "https://x.org/](javascript:alert(1))",
        'https://x.org/"><script>',
        "https://x.org/`code`",
        "https://x.org/l\n",
        "",
    ],
)
def test_license_link_must_be_a_plain_https_url(tmp_path, link):
    meta = {"license": "other", "license_name": "x-license", "license_link": link}
    assert any(p.startswith("license_link") for p in check_metadata(meta))
    with pytest.raises(RecipeError, match="license_link"):
        parse_recipe({"base": "org/base", "models": [{"model": TASK}], **meta}, tmp_path)


def test_a_plain_https_license_link_is_kept(tmp_path):
    link = "https://example.org/licenses/x-license-1.0.txt?v=2#terms"
    assert check_metadata({"license": "other", "license_name": "x-license", "license_link": link}) == []


def test_an_existing_readme_that_is_not_utf8_is_a_one_line_error(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    (folder / "README.md").write_bytes("---\nlicense: mit\n---\ncaf\xe9".encode("latin-1"))
    with pytest.raises(CardError, match="README.md is not UTF-8"):
        write_card(folder)
