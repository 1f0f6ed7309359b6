"""Model cards: metadata, languages, licenses, results, update in place, no leaks, golden file."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard, parse_eval_result_entries

from tests.card_support import (
    BASE,
    LANGUAGE_MODELS,
    TASK,
    lm_eval_results,
    make_merged_folder,
    write_results,
)
from lrmerge_hub.card.build import (
    GENERATED_END,
    CardInputs,
    build_card,
    card_metadata,
    check_card_text,
    read_inputs,
    write_card,
)
from lrmerge_hub.metadata import check_metadata
from lrmerge_hub.cli import main
from lrmerge_hub.errors import CardError

GOLDEN = Path(__file__).parent / "golden" / "card_full.md"
ALL_LLAMA2 = {BASE: "llama2", TASK: "llama2", **{m: "llama2" for m in LANGUAGE_MODELS.values()}}


def load_meta(path: Path) -> dict:
    return ModelCard.load(path).data.to_dict()


def metadata_of(inputs: CardInputs, model_name: str) -> dict:
    return card_metadata(
        recipe=inputs.recipe, report=inputs.report, sources=inputs.sources, scores=inputs.scores, model_name=model_name
    )


# -- metadata ----------------------------------------------------------------------------------


def test_one_language_card_round_trips_and_passes_the_hub_rules(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    path = write_card(folder)
    meta = load_meta(path)

    assert meta == metadata_of(read_inputs(folder), folder.name)  # ModelCard.load reads back the same
    assert check_metadata(meta) == []
    assert meta["language"] == ["bo"]
    assert meta["license"] == "llama2"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == [BASE, LANGUAGE_MODELS["bo"], TASK]  # the base first
    assert meta["base_model_relation"] == "merge"
    assert meta["tags"] == ["merge", "lrmerge", "slack-ties", "low-resource", "tibetan"]
    assert "model-index" not in meta
    assert "No evaluation results yet" in path.read_text()
    assert not (folder / ".eval_results").exists()


def test_several_languages_are_all_listed_and_tagged(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo", "ug", "mn"], license_="llama2")
    meta = load_meta(write_card(folder))

    assert meta == metadata_of(read_inputs(folder), folder.name) and check_metadata(meta) == []
    assert meta["language"] == ["bo", "ug", "mn"]
    assert {"tibetan", "uighur", "mongolian"} <= set(meta["tags"])
    assert meta["base_model"] == [BASE, *LANGUAGE_MODELS.values(), TASK]
    body = (folder / "README.md").read_text()
    assert "Tibetan (`bo`), Uighur (`ug`) and Mongolian (`mn`)" in body
    assert "no instruction data in Tibetan, Uighur or Mongolian" in body


@pytest.mark.parametrize("code", ["xx", "qqq", "EN"])
def test_an_unknown_language_code_is_an_error_naming_it(tmp_path, code):
    folder = make_merged_folder(tmp_path, ["bo", code], license_="llama2")
    with pytest.raises(CardError, match=re.escape(repr(code))):
        write_card(folder)
    assert not (folder / "README.md").exists()


def test_cli_reports_an_unknown_code_in_one_line_and_writes_nothing(tmp_path):
    folder = make_merged_folder(tmp_path, ["xx"], license_="llama2")
    result = CliRunner().invoke(main, ["card", str(folder)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "Error: languages: unknown ISO 639 code 'xx'; use ISO 639-1 or 639-3 codes like bo, ug, khk"
    )
    assert not (folder / "README.md").exists()


def test_cli_writes_the_card_and_lists_the_files(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    write_results(folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.4}))
    result = CliRunner().invoke(main, ["card", str(folder), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["files"] == ["README.md", ".eval_results/belebele_bod_Tibt.yaml"]
    assert Path(data["card"]) == folder / "README.md"


# -- licenses ----------------------------------------------------------------------------------


def test_license_is_inherited_when_every_source_agrees(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], licenses=ALL_LLAMA2)
    built = build_card(folder)
    assert built.metadata["license"] == "llama2"
    assert built.notes == []


def test_disagreeing_licenses_are_an_error_naming_them(tmp_path):
    licenses = dict(ALL_LLAMA2, **{TASK: "apache-2.0"})
    folder = make_merged_folder(tmp_path, ["bo"], licenses=licenses)
    with pytest.raises(CardError, match=r"disagree .*llama2.*apache-2\.0.*set `license:` in the recipe"):
        write_card(folder)
    assert not (folder / "README.md").exists()


def test_the_recipe_license_settles_a_disagreement(tmp_path):
    licenses = dict(ALL_LLAMA2, **{TASK: "apache-2.0"})
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2", licenses=licenses)
    assert load_meta(write_card(folder))["license"] == "llama2"


def test_an_unknown_source_license_leaves_license_out_with_a_note(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], licenses={BASE: "llama2"})
    built = build_card(folder)
    assert "license" not in built.metadata
    assert any("license: not stated" in n and TASK in n for n in built.notes)


def test_license_other_carries_name_and_link(tmp_path):
    other = {
        "license": "other",
        "license_name": "tibetan-community-license",
        "license_link": "https://example.org/license",
    }
    folder = make_merged_folder(tmp_path, ["bo"], license_=other)
    meta = load_meta(write_card(folder))
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other",
        "tibetan-community-license",
        "https://example.org/license",
    )
    assert check_metadata(meta) == []


def test_a_source_folder_readme_supplies_its_license(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"])
    dirs = {}
    for name, lic in ALL_LLAMA2.items():
        d = tmp_path / "src" / name.replace("/", "__")
        d.mkdir(parents=True)
        (d / "README.md").write_text(f"---\nlicense: {lic}\n---\n# {name}\n")
        dirs[name] = d
    assert load_meta(write_card(folder, source_dirs=dirs))["license"] == "llama2"


# -- local sources and leaks -----------------------------------------------------------------------


def test_a_local_source_is_listed_by_its_hub_id_or_left_out(tmp_path):
    plain = make_merged_folder(tmp_path, ["bo"], name="plain", license_="llama2", local_task="flan-local")
    meta = load_meta(write_card(plain))
    assert meta["base_model"] == [BASE, LANGUAGE_MODELS["bo"]]
    assert "`flan-local` (a local model, not on the Hub)" in (plain / "README.md").read_text()

    listed = make_merged_folder(
        tmp_path, ["bo"], name="listed", license_="llama2", local_task="flan-local", hub_id="myorg/flan-7b"
    )
    assert load_meta(write_card(listed))["base_model"] == [BASE, LANGUAGE_MODELS["bo"], "myorg/flan-7b"]


def test_a_card_never_holds_a_path_a_token_or_the_user_name(tmp_path, monkeypatch):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    local = f"data_files={tmp_path}/tasks/bo.jsonl"
    write_results(
        folder,
        lm_eval_results(
            "my_bo_task",
            {"acc": 0.5},
            dataset_path="json",
            dataset_name=None,
            model_args=f"model={folder},tokenizer={folder},api_key=hf_{'x' * 34}",
        ),
    )
    data = json.loads(next((folder / "eval").rglob("*.json")).read_text())
    data["configs"]["my_bo_task"]["dataset_kwargs"] = {"data_files": {"test": local}}
    next((folder / "eval").rglob("*.json")).write_text(json.dumps(data))
    text = write_card(folder).read_text()

    assert str(tmp_path) not in text and "hf_xxxx" not in text and "api_key" not in text
    assert not (folder / ".eval_results").exists()  # a local json task names no Hub dataset
    assert "my_bo_task" in text  # but its score is in the card and the model-index
    with pytest.raises(CardError, match="token"):
        check_card_text("token hf_" + "a" * 34, [])
    with pytest.raises(CardError, match="local path"):
        check_card_text("weights at /home/alice/models/x", [])
    with pytest.raises(CardError, match="user name"):
        check_card_text("made by alice", ["alice"])
    check_card_text("see https://huggingface.co/data/home/x and /v1/completions", [])


def test_a_recipe_holding_an_absolute_path_is_refused(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["output"] = "/home/alice/out"
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(CardError, match="local path '/home/alice/out'"):
        write_card(folder)
    assert not (folder / "README.md").exists()


# -- evaluation results ------------------------------------------------------------------------------


def test_results_go_to_model_index_and_eval_results_files(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    write_results(folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.35123, "acc_norm": 0.36}))
    meta = load_meta(write_card(folder, repo_id="org/bo-merge"))
    assert meta == metadata_of(read_inputs(folder), "bo-merge")  # the results round-trip too

    (entry,) = meta["model-index"]
    assert entry["name"] == "bo-merge"
    (result,) = entry["results"]
    assert result["dataset"] == {
        "name": "belebele_bod_Tibt",
        "type": "facebook/belebele",
        "config": "bod_Tibt",
        "split": "test",
    }
    assert [(m["type"], m["value"]) for m in result["metrics"]] == [("acc", 0.3512), ("acc_norm", 0.36)]
    assert result["source"]["url"].startswith("https://github.com/EleutherAI/")
    assert check_metadata(meta) == []

    (entry_yaml,) = yaml.safe_load((folder / ".eval_results" / "belebele_bod_Tibt.yaml").read_text())
    (parsed,) = parse_eval_result_entries([entry_yaml])
    assert (parsed.dataset_id, parsed.task_id, parsed.value) == ("facebook/belebele", "belebele_bod_Tibt", 0.3512)
    assert parsed.date == "2026-11-25T03:30:00Z"


def test_the_newest_results_file_wins_per_task(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    write_results(
        folder,
        lm_eval_results("belebele_bod_Tibt", {"acc": 0.30}, date=1795577400.0),
        stamp="2026-11-25T03-30-00.000000",
    )
    write_results(
        folder,
        lm_eval_results("belebele_bod_Tibt", {"acc": 0.40}, date=1795581000.0),
        under="merged-again",
        stamp="2026-11-25T04-30-00.000000",
    )
    (folder / "eval" / "results_broken.json").write_text("{not json")
    built = build_card(folder)
    metrics = built.metadata["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in metrics] == [0.4]
    assert any("results_broken.json: skipped" in n for n in built.notes)


def test_evaluated_sources_stand_beside_the_merged_model(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    write_results(folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.35}))
    write_results(folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.28}), under="sources/task/run")
    write_results(
        folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.26}), under="sources/pkupie__Llama-2-7b-bod/run"
    )
    text = write_card(folder).read_text()
    assert (f"| Task | Metric | Shots | This model | language: {LANGUAGE_MODELS['bo']} | task: {TASK} |") in text
    assert "| `belebele_bod_Tibt` | acc | 0 | **0.3500 ± 0.0123** | 0.2600 ± 0.0123 | 0.2800 ± 0.0123 |" in text
    # baselines are other models: only the merged model's numbers go to the metadata
    assert [m["value"] for m in load_meta(folder / "README.md")["model-index"][0]["results"][0]["metrics"]] == [0.35]


# -- update in place ---------------------------------------------------------------------------------


def test_regenerating_updates_results_and_keeps_everything_else(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    write_results(folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.30}, date=1795577400.0))
    first = write_card(folder).read_text()

    # a person edits the card: a key of their own, a tag, a note below the block, a leaderboard result
    card = ModelCard(first)
    card.data["datasets"] = ["facebook/belebele"]
    card.data["tags"] = card.data["tags"] + ["tibetan-nlp"]
    card.data.eval_results.append(
        card.data.eval_results[0].__class__(
            task_type="text-generation",
            dataset_type="facebook/belebele",
            dataset_name="Belebele (leaderboard)",
            dataset_config="bod_Tibt",
            dataset_split="dev",
            metric_type="acc",
            metric_value=0.33,
            source_name="Some Leaderboard",
            source_url="https://example.org/board",
        )
    )
    card.text = card.text + "\n## Notes from the team\n\nTried on our own prompts too.\n"
    card.save(folder / "README.md")
    assert (folder / "README.md").read_text().count(GENERATED_END) == 1

    write_results(
        folder,
        lm_eval_results("belebele_bod_Tibt", {"acc": 0.42}, date=1795581000.0),
        under="later",
        stamp="2026-11-25T04-30-00.000000",
    )
    write_results(
        folder,
        lm_eval_results("xcopa_ta", {"acc": 0.55}, dataset_path="cambridgeltl/xcopa", dataset_name="ta"),
        under="later",
    )
    updated = write_card(folder).read_text()
    meta = load_meta(folder / "README.md")

    assert meta["datasets"] == ["facebook/belebele"]
    assert meta["tags"][-1] == "tibetan-nlp"
    assert "Tried on our own prompts too." in updated
    results = meta["model-index"][0]["results"]
    assert [(r["dataset"]["name"], r["metrics"][0]["value"]) for r in results] == [
        ("belebele_bod_Tibt", 0.42),
        ("xcopa_ta", 0.55),
        ("Belebele (leaderboard)", 0.33),
    ]
    assert sorted(p.name for p in (folder / ".eval_results").iterdir()) == ["belebele_bod_Tibt.yaml", "xcopa_ta.yaml"]
    assert check_metadata(meta) == []

    def strip(text: str) -> str:
        return re.sub(r"## Evaluation.*?## How to use", "", text.split("---\n", 2)[2], flags=re.S)

    # outside the evaluation, the generated text is unchanged
    assert strip(updated).startswith(strip(first).rstrip("\n"))
    # and regenerating again without new results changes nothing
    assert write_card(folder).read_text() == updated


# -- golden file ---------------------------------------------------------------------------------------


def full_card_folder(root: Path) -> Path:
    folder = make_merged_folder(root, ["bo"], name="llama2-7b-bo-slack-ties", license_="llama2")
    write_results(folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.3512, "acc_norm": 0.3601}))
    write_results(
        folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.2811, "acc_norm": 0.2901}), under="sources/task/run"
    )
    write_results(
        folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.2611, "acc_norm": 0.2700}), under="sources/language/run"
    )
    return folder


def test_full_card_matches_the_golden_file(tmp_path):
    """Reviewed by eye once; set LRMERGE_UPDATE_GOLDEN=1 to rewrite it after an intended change."""
    text = write_card(full_card_folder(tmp_path), repo_id="lrmerge/llama2-7b-bo-slack-ties").read_text()
    if os.environ.get("LRMERGE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


# -- the recipe side ---------------------------------------------------------------------------------


def test_the_recipe_checks_language_codes_and_licenses_before_any_merge(tmp_path):
    from lrmerge_hub.errors import RecipeError
    from lrmerge_hub.recipe.spec import parse_recipe

    base = {"base": BASE, "models": [{"model": TASK}]}
    with pytest.raises(RecipeError, match="unknown ISO 639 code 'xx'"):
        parse_recipe({**base, "languages": ["bo", "xx"]}, tmp_path)
    with pytest.raises(RecipeError, match="license: must be a Hub license id"):
        parse_recipe({**base, "license": "llama-2"}, tmp_path)
    with pytest.raises(RecipeError, match="license_name: required"):
        parse_recipe({**base, "license": "other"}, tmp_path)
    with pytest.raises(RecipeError, match="only used with license: other"):
        parse_recipe({**base, "license": "mit", "license_link": "https://example.org"}, tmp_path)
    with pytest.raises(RecipeError, match="license_link: .*plain https:// URL"):  # issue 11: https URLs only
        parse_recipe({**base, "license": "other", "license_name": "x-license", "license_link": "LICENSE"}, tmp_path)
    link = "https://example.org/x-license.txt"
    recipe = parse_recipe(
        {**base, "languages": ["khk"], "license": "other", "license_name": "x-license", "license_link": link}, tmp_path
    )
    assert {k: recipe.to_dict()[k] for k in ("license", "license_name", "license_link")} == {
        "license": "other",
        "license_name": "x-license",
        "license_link": link,
    }


def test_a_sweep_table_becomes_a_section(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    points = [
        {
            "point": {"slack": s},
            "name": f"slack-{s}",
            "score": score,
            "metric": "acc",
            "scores": [],
            "retention": {LANGUAGE_MODELS["bo"]: 0.7, TASK: r},
        }
        for s, score, r in ((0.5, 0.41, 0.66), (0.0, 0.38, 0.52))
    ]
    (folder / "sweep.json").write_text(json.dumps({"metric": "acc", "best": "slack-0.5", "points": points}))
    text = write_card(folder).read_text()
    assert "## Parameter sweep" in text and "this model is the best point, `slack-0.5`" in text
    assert f"| Point | acc | Retention of {LANGUAGE_MODELS['bo']} | Retention of {TASK} |" in text
    assert "| `slack-0.5` | 0.4100 | 70.0% | 66.0% |" in text


def test_the_recipe_push_target_names_the_model_in_the_card(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["push"] = {"repo": "lowres/bo-merge", "private": True}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    write_results(folder, lm_eval_results("belebele_bod_Tibt", {"acc": 0.4}))
    text = write_card(folder).read_text()
    assert 'model_id = "lowres/bo-merge"' in text and "lrmerge serve lowres/bo-merge" in text
    assert load_meta(folder / "README.md")["model-index"][0]["name"] == "bo-merge"


def test_filtered_metrics_keep_their_filter_in_the_table_and_their_id_in_the_metadata(tmp_path):
    folder = make_merged_folder(tmp_path, ["sw"], license_="llama2")
    data = lm_eval_results("mgsm_native_cot_sw", {"acc": 0.0}, dataset_path="juletxara/mgsm", dataset_name="sw")
    data["results"]["mgsm_native_cot_sw"] = {
        "alias": "mgsm_native_cot_sw",
        "exact_match,strict-match": 0.124,
        "exact_match_stderr,strict-match": "N/A",
        "exact_match,flexible-extract": 0.2,
    }
    write_results(folder, data)
    text = write_card(folder).read_text()
    assert "| `mgsm_native_cot_sw` | exact_match (strict-match) | 0 | **0.1240** |" in text
    metrics = load_meta(folder / "README.md")["model-index"][0]["results"][0]["metrics"]
    assert [(m["type"], m["name"]) for m in metrics] == [
        ("exact_match", "exact_match (strict-match, 0-shot)"),
        ("exact_match", "exact_match (flexible-extract, 0-shot)"),
    ]


def test_a_broken_existing_card_is_an_error_not_a_silent_overwrite(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n# my notes\n")
    with pytest.raises(CardError, match="README.md: its YAML metadata block does not parse"):
        write_card(folder)
    assert (folder / "README.md").read_text().endswith("# my notes\n")


def test_a_recipe_without_languages_gets_a_card_and_a_note(tmp_path):
    folder = make_merged_folder(tmp_path, [], license_="llama2")
    built = build_card(folder)
    assert "language" not in built.metadata and check_metadata(built.metadata) == []
    assert any(n.startswith("languages: the recipe names none") for n in built.notes)


def test_what_lrmerge_eval_records_is_shown_limit_command_and_role(tmp_path):
    folder = make_merged_folder(tmp_path, ["bo"], license_="llama2")
    command = (
        "-m lm_eval run --model local-completions --model_args model=llama2-merged,"
        "base_url=http://127.0.0.1:8000/v1/completions --tasks belebele_bod_Tibt --limit 200"
    )
    merged = lm_eval_results("belebele_bod_Tibt", {"acc": 0.35})
    merged["config"]["limit"] = 200
    merged["lrmerge"] = {"role": "merged", "limit": 200, "command": command}
    write_results(folder, merged, under="llama2-merged")
    baseline = lm_eval_results("belebele_bod_Tibt", {"acc": 0.28})
    baseline["lrmerge"] = {"role": "task", "command": f"-m lm_eval run --model hf --model_args pretrained={tmp_path}/t"}
    write_results(folder, baseline, under="elsewhere")  # the recorded role wins over the folder
    built = build_card(folder)

    assert f"| This model | task: {TASK} |" in built.text
    assert "Only the first 200 examples of each task were used (lm-eval's `--limit`)" in built.text
    assert f"```bash\npython {command}\n```" in built.text
    assert "--limit 200" in built.eval_files["belebele_bod_Tibt.yaml"]
    assert str(tmp_path) not in built.text  # the baseline's command held a path: left out, with a note
    assert any("left out of the card" in n for n in built.notes)


def test_a_pipeline_maps_its_sources_to_the_report_names_for_licenses(tmp_path):
    from lrmerge_hub.card.inputs import source_dirs_for
    from lrmerge_hub.merge.st_io import Source
    from lrmerge_hub.recipe.spec import parse_recipe

    folders = {}
    for name in ("base-7b", "tibetan-7b"):
        folders[name] = tmp_path / "models" / name
        folders[name].mkdir(parents=True)
        (folders[name] / "README.md").write_text("---\nlicense: llama2\n---\n")
    recipe = parse_recipe(
        {
            "base": "./models/base-7b",
            "languages": ["bo"],
            "models": [{"model": "./models/tibetan-7b", "role": "language"}, {"model": f"{TASK}@main", "role": "task"}],
        },
        tmp_path,
    )
    sources = {
        "base": Source(folders["base-7b"]),
        "./models/tibetan-7b": Source(folders["tibetan-7b"]),
        f"{TASK}@main": Source(tmp_path / "cache" / "flan", repo_id=TASK, revision="a" * 40),
    }
    assert source_dirs_for(recipe, sources) == {
        "base-7b": folders["base-7b"],
        "tibetan-7b": folders["tibetan-7b"],
        f"{TASK}@main": tmp_path / "cache" / "flan",
    }


def test_the_template_comes_from_this_checkout():
    """A worktree or a plain PYTHONPATH run must render its own model_cards/, not an installed copy."""
    from lrmerge_hub.card.build import TEMPLATE

    assert TEMPLATE == Path(__file__).resolve().parents[1] / "model_cards" / "merged_model.md"
