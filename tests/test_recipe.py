"""Recipe parsing details not covered by the CLI error tests."""

from pathlib import Path

import pytest
import yaml

from lrmerge_hub.errors import RecipeError
from lrmerge_hub.recipe.spec import load_recipe, parse_recipe
from lrmerge_hub.synth.tiny import make_family
from tests.test_bad_input import GOOD

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*/*.yaml")), ids=lambda p: p.name)
def test_examples_validate(path):
    recipe = load_recipe(path)
    assert recipe.languages and recipe.method == "slack_ties"
    assert {m.role for m in recipe.models} == {"language", "task"}


def test_hub_ids_and_revisions(tmp_path):
    r = parse_recipe(
        {
            "base": "org/base@v1.0",
            "models": [{"model": "org/lang@" + "a" * 40, "role": "language"}, {"model": "org/task", "role": "task"}],
            "push": {"repo": "me/out", "tag": "v1"},
            "eval": {"tasks": "a,b", "limit": 5},
        },
        tmp_path,
    )
    assert (r.base.repo_id, r.base.revision) == ("org/base", "v1.0")
    assert r.models[0].ref.revision == "a" * 40 and r.models[1].ref.revision is None
    assert r.push.repo == "me/out" and r.eval.tasks == ("a", "b") and r.eval.limit == 5
    assert r.models[1].params == {"weight": 1.0, "density": 1.0, "slack": 0.0}  # declared defaults
    again = parse_recipe(r.to_dict(), tmp_path)
    assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"models": [{"model": "org/a"}, {"model": "org/a"}], "base": "org/b"}, "named twice"),
        ({"models": [{"model": "not a repo"}], "base": "org/b"}, "neither an existing folder"),
        ({"models": [{"model": "org/a"}], "base": "org/b", "push": {"repo": "x"}}, "push.repo"),
        ({"models": [{"model": "org/a"}], "base": "org/b", "eval": {"limit": 0}}, "eval.limit"),
        ({"models": [{"model": "org/a"}], "base": "org/b", "languages": ["Tibetan"]}, "languages"),
        ({"models": [], "base": "org/b"}, "models"),
        ([1, 2], "mapping"),
    ],
)
def test_invalid(tmp_path, data, needle):
    with pytest.raises(RecipeError, match=needle):
        parse_recipe(data, tmp_path)


# -- the recipe's mistakes said so that the fix is plain -------------------------------------

RECIPE = GOOD  # the well-formed recipe the bad-input tests start from


def cli(*args):
    from click.testing import CliRunner

    from lrmerge_hub.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    "typo,error",
    [
        (
            RECIPE.replace("density: 0.2}", "densty: 0.2}", 1),
            "models[0]: unknown key 'densty' (did you mean 'density'?)",
        ),
        (RECIPE + "parameters: {lamda: 0.9}\n", "unknown key 'lamda' (did you mean 'lambda'?)"),
        (RECIPE + "licence: mit\n", "recipe: unknown key 'licence' (did you mean 'license'?)"),
        (RECIPE + "push: {repo: a/b, privat: true}\n", "push: unknown key 'privat' (did you mean 'private'?)"),
        (RECIPE + "zzz: 1\n", "recipe: unknown key 'zzz' (allowed: method, base, models"),  # nothing close: the list
    ],
    ids=["densty", "lamda", "licence", "privat", "nothing-close"],
)
def test_a_misspelled_key_gets_the_likely_one(tmp_path, typo, error):
    make_family(tmp_path / "models")
    (tmp_path / "r.yaml").write_text(typo)
    code, out, err = cli("merge", tmp_path / "r.yaml")
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("Error: ") and error in err, err


@pytest.mark.parametrize(
    "output,said",
    [
        ("/", "'/' is the file system's root"),
        (".", "'.' is the recipe's own folder"),
        ("..", "'..' holds the recipe's own folder"),
        ("./", "'./' is the recipe's own folder"),
    ],
)
def test_an_output_that_would_replace_the_root_or_the_recipe_is_refused(tmp_path, output, said):
    make_family(tmp_path / "models")
    (tmp_path / "r.yaml").write_text(RECIPE.replace("output: ./merged", f"output: {output}"))
    before = sorted(p.name for p in tmp_path.iterdir())
    for command in ("merge", "run", "sweep"):
        extra = ["--grid", "slack=0,1"] if command == "sweep" else []
        code, out, err = cli(command, tmp_path / "r.yaml", *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"Error: output: {said}") and "e.g. ./merged" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_out_naming_the_current_folder_is_refused(tmp_path, monkeypatch):
    make_family(tmp_path / "models")
    (tmp_path / "r.yaml").write_text(RECIPE)
    monkeypatch.chdir(tmp_path / "models")
    for out in (".", ".."):
        code, _, err = cli("merge", tmp_path / "r.yaml", "--out", out, "--overwrite")
        assert code == 2 and "the current folder" in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "models" / "base" / "config.json").is_file()


def test_a_model_without_role_is_said_to_be_a_task_model(tmp_path):
    make_family(tmp_path / "models")
    (tmp_path / "r.yaml").write_text(RECIPE.replace(", role: task", ""))
    code, out, err = cli("merge", tmp_path / "r.yaml", "--dry-run")
    assert code == 0, err
    assert "note: no role given for ./models/task: taken as task" in err
    assert load_recipe(tmp_path / "r.yaml").models[1].role == "task"
    (tmp_path / "r.yaml").write_text(RECIPE)
    code, out, err = cli("merge", tmp_path / "r.yaml", "--dry-run")
    assert code == 0 and "note:" not in err


def test_exponent_numbers_without_a_dot_are_numbers():
    """PyYAML (YAML 1.1) reads `1e-5` as a string; mergekit configs write it that way."""
    from lrmerge_hub.recipe.yaml_file import read_recipe_yaml

    data = read_recipe_yaml(b"a: 1e-5\nb: -2E3\nc: 1.0e+9\nd: '1e9'\ne: 10\nf: 1e\n")
    assert data == {"a": 1e-5, "b": -2000.0, "c": 1e9, "d": "1e9", "e": 10, "f": "1e"}
    assert yaml.safe_load("a: 1e-5") == {"a": "1e-5"}  # the plain SafeLoader is left as it is
