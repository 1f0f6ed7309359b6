"""Recipe parsing details not covered by the CLI error tests."""

from pathlib import Path

import pytest

from lrmerge_hub.errors import RecipeError
from lrmerge_hub.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*/*.yaml")), ids=lambda p: p.name)
def test_examples_validate(path):
    recipe = load_recipe(path)
    assert recipe.languages and recipe.method == "slack_ties"
    assert {m.role for m in recipe.models} == {"language", "task"}


def test_hub_ids_and_revisions(tmp_path):
    r = parse_recipe({"base": "org/base@v1.0", "models": [
        {"model": "org/lang@" + "a" * 40, "role": "language"}, {"model": "org/task", "role": "task"}],
        "push": {"repo": "me/out", "tag": "v1"}, "eval": {"tasks": "a,b", "limit": 5}}, tmp_path)
    assert (r.base.repo_id, r.base.revision) == ("org/base", "v1.0")
    assert r.models[0].ref.revision == "a" * 40 and r.models[1].ref.revision is None
    assert r.push.repo == "me/out" and r.eval.tasks == ("a", "b") and r.eval.limit == 5
    assert r.models[1].params == {"weight": 1.0, "density": 1.0, "slack": 0.0}  # declared defaults
    again = parse_recipe(r.to_dict(), tmp_path)
    assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize("data,needle", [
    ({"models": [{"model": "org/a"}, {"model": "org/a"}], "base": "org/b"}, "named twice"),
    ({"models": [{"model": "not a repo"}], "base": "org/b"}, "neither an existing folder"),
    ({"models": [{"model": "org/a"}], "base": "org/b", "push": {"repo": "x"}}, "push.repo"),
    ({"models": [{"model": "org/a"}], "base": "org/b", "eval": {"limit": 0}}, "eval.limit"),
    ({"models": [{"model": "org/a"}], "base": "org/b", "languages": ["Tibetan"]}, "languages"),
    ({"models": [], "base": "org/b"}, "models"),
    ([1, 2], "mapping"),
])
def test_invalid(tmp_path, data, needle):
    with pytest.raises(RecipeError, match=needle):
        parse_recipe(data, tmp_path)
