"""Pull from and push to the Hub: the official huggingface_hub client against tests/hub_server.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lrmerge_hub.merge.st_io import Source
from lrmerge_hub.hub import publish, sources as hub_sources
from lrmerge_hub.cli import main
from lrmerge_hub.errors import (
    HubAuthError,
    HubError,
    HubNotFoundError,
    HubPushError,
    HubRevisionError,
    IncompatibleModelsError,
)
from lrmerge_hub.recipe.spec import load_recipe, parse_model_ref
from lrmerge_hub.synth.tiny import llama_shapes, make_family, write_checkpoint
from safetensors.torch import load_file
from tests.hub_server import CUT, DROP
from tests.hub_support import TOKEN

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny base/language/task checkpoints; the language model adds 8 vocabulary rows."""
    return make_family(tmp_path_factory.mktemp("tiny"), extend_language_vocab=8)


@pytest.fixture(scope="session")
def wide(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Path]) -> Path:
    """A model with the base's config but a wider MLP: cannot be merged with the base."""
    out = tmp_path_factory.mktemp("wide")
    cfg = json.loads((tiny["base"] / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (out / "config.json").write_text(json.dumps(cfg))
    write_checkpoint(out, ((n, torch.zeros(s)) for n, s in llama_shapes(cfg)))
    return out


@pytest.fixture(scope="session")
def sharded(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Path]) -> Path:
    """The base model written as 3 shards plus an index."""
    out = tmp_path_factory.mktemp("sharded")
    for p in tiny["base"].iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, out / p.name)
    write_checkpoint(out, iter(load_file(tiny["base"] / "model.safetensors").items()), shard_bytes=200_000)
    return out


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish, "RETRY_WAIT", 0.01)


def ref(spec: str):
    return parse_model_ref(spec, Path.cwd(), "model")


def models(*specs: str):
    """A recipe checking the models against the first one, as `lrmerge pull MODEL...` builds."""
    return hub_sources.recipe_for_models([ref(s) for s in specs])


def cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def seed_family(server, tiny) -> dict[str, str]:
    """base on main, language on branch `v2`, task tagged `v1`; returns the shas."""
    shas = {"base": server.seed("org/base", tiny["base"])}
    server.create_repo("org/language")
    shas["language"] = server.seed("org/language", tiny["language"], branch="v2")
    shas["task"] = server.seed("org/task", tiny["task"])
    server.tag("org/task", "v1")
    return shas


# --- pull -----------------------------------------------------------------------------------
def test_pull_pins_branch_tag_and_sha_and_downloads_only_what_a_merge_needs(hub_server, tiny):
    shas = seed_family(hub_server, tiny)
    shas["base"] = hub_server.commit_files(
        "org/base", {"training_args.bin": b"pickle", "extra/other.safetensors": b"x"}
    )
    plan = hub_sources.pull(models("org/base@" + shas["base"], "org/language@v2", "org/task@v1"))

    pinned = list(plan.models.values())
    assert [m.sha for m in pinned] == [shas["base"], shas["language"], shas["task"]]
    base_dir = pinned[0].path
    assert base_dir.name == shas["base"]
    assert sorted(p.name for p in base_dir.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (base_dir / "model.safetensors").read_bytes() == (tiny["base"] / "model.safetensors").read_bytes()
    assert (pinned[2].path / "chat_template.jinja").is_file()  # the task model's chat template
    assert not any(p.endswith((".bin", "other.safetensors", ".gitattributes")) for p in hub_server.downloads(""))
    # the pinned sha stays what was merged even after main moves on
    hub_server.commit_files("org/base", {"config.json": b"{}"})
    assert hub_sources.plan_recipe(models("org/base@" + shas["base"])).models["base"].sha == shas["base"]
    assert hub_sources.plan_recipe(models("org/base")).models["base"].sha != shas["base"]


def test_materialize_sources_mixes_local_folders_and_hub_ids(hub_server, tiny, tmp_path):
    shas = seed_family(hub_server, tiny)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        f"method: slack_ties\nbase: {tiny['base']}\n"
        f"models:\n  - {{model: org/language@v2, role: language}}\n"
        f"  - {{model: 'org/task@{shas['task']}', role: task}}\n"
    )
    recipe = load_recipe(recipe_path)

    result = cli("pull", str(recipe_path), "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.output
    assert [m["model"] for m in json.loads(result.output)["models"]] == [
        "base",
        "org/language@v2",
        f"org/task@{shas['task']}",
    ]  # a local model by its folder name only
    assert str(tmp_path) not in result.output and hub_server.downloads() == []

    sources = hub_sources.materialize_sources(recipe)

    assert sources["base"] == Source(path=tiny["base"], repo_id=None, revision=None)
    assert sources["org/language@v2"].revision == shas["language"]
    assert sources["org/language@v2"].repo_id == "org/language"
    assert (sources[f"org/task@{shas['task']}"].path / "model.safetensors").is_file()


def test_sharded_model_is_checked_from_its_shard_headers_and_downloaded_whole(hub_server, tiny, sharded):
    hub_server.seed("org/base", tiny["base"])
    hub_server.seed("org/sharded", sharded)

    plan = hub_sources.pull(models("org/base", "org/sharded"), dry_run=True)
    assert hub_server.downloads() == [] and plan.models["org/sharded"].files.keys() >= {
        "model.safetensors.index.json",
        "model-00001-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    }
    path = hub_sources.download(plan.models["org/sharded"])

    assert sorted(p.name for p in path.glob("*.safetensors*")) == sorted(p.name for p in sharded.glob("*.safetensors*"))
    assert len(hub_server.downloads()) == 3


def test_a_download_cut_by_the_network_resumes_where_it_stopped(hub_server, tiny, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)  # the client keeps whole chunks (10 MB)
    hub_server.seed("org/base", tiny["base"])
    meta = hub_sources.plan_recipe(models("org/base")).models["base"]
    hub_server.fail("GET", r"/model.safetensors$", status=CUT)  # half the bytes, then the connection closes

    path = hub_sources.download(meta)

    weights = tiny["base"] / "model.safetensors"
    assert (path / "model.safetensors").read_bytes() == weights.read_bytes()
    gets = [r.range for r in hub_server.log if r.method == "GET" and r.path.endswith("/model.safetensors")]
    resumed_at = (weights.stat().st_size // 2) // (1 << 16) * (1 << 16)
    assert resumed_at > 0 and gets[-2:] == [None, f"bytes={resumed_at}-"]  # the second GET resumed


def test_check_rejects_incompatible_models_before_downloading_weights(hub_server, tiny, wide):
    hub_server.seed("org/base", tiny["base"])
    hub_server.seed("org/wide", wide)

    with pytest.raises(
        IncompatibleModelsError, match=r"mlp.\w+_proj.weight has different shapes: base \[\d+, \d+\], org/wide"
    ):
        hub_sources.pull(models("org/base", "org/wide"))
    result = cli("pull", "org/base", "org/wide", "--dry-run")

    assert result.exit_code == 2 and result.output.startswith("Error: ") and "96" in result.output
    assert hub_server.downloads() == []  # only the headers were read (Range requests)
    assert any(r.range for r in hub_server.log if r.path.endswith("model.safetensors"))


def test_dry_run_plan_has_the_numbers_and_downloads_nothing(hub_server, tiny):
    shas = seed_family(hub_server, tiny)

    result = cli("pull", "org/base", "org/language@v2", "org/task@v1", "--dry-run", "--format", "json")

    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    base, language, _ = plan["models"]
    assert base["sha"] == shas["base"] and language["revision"] == "v2" and language["sha"] == shas["language"]
    assert plan["tensors"] == 21 and base["tensors"] == 21
    assert language["parameters"] == base["parameters"] + 8 * 2 * 64  # extra vocabulary rows, embed + lm_head
    assert plan["parameters"] == language["parameters"]  # the output keeps the extended vocabulary
    sizes = {p.name: p.stat().st_size for p in tiny["base"].iterdir()}
    assert base["download_bytes"] == sum(sizes.values())
    assert plan["download_bytes"] == sum(m["download_bytes"] for m in plan["models"])
    assert plan["downloaded"] is False and hub_server.downloads() == []


def test_offline_mode_pulls_from_the_cache_without_network(hub_server, tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    shas = seed_family(hub_server, tiny)
    hub_sources.pull(models("org/task@v1"))  # online: fills this test's HF cache
    hub_server.log.clear()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}

    ok = subprocess.run(
        [sys.executable, "-m", "lrmerge_hub", "pull", "org/task@v1", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    missing = cli("pull", "org/base")

    assert ok.returncode == 0, ok.stderr
    pulled = json.loads(ok.stdout)["models"][0]
    assert pulled["sha"] == shas["task"] and Path(pulled["path"]).name == shas["task"]
    assert missing.exit_code == 2 and "org/base: HF_HUB_OFFLINE is set and it is not in the HF cache" in missing.output
    assert hub_server.log == []


def test_private_and_gated_repos_need_a_token(hub_server, tiny, monkeypatch):
    hub_server.seed("org/private", tiny["base"], private=True)
    hub_server.seed("org/gated", tiny["base"], gated=True)

    with pytest.raises(HubAuthError, match="org/private: not found, or private/gated: set HF_TOKEN"):
        hub_sources.pull(models("org/private"), dry_run=True)
    with pytest.raises(HubAuthError, match="org/gated is gated: accept its conditions"):
        hub_sources.pull(models("org/gated"), dry_run=True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert hub_sources.pull(models("org/private", "org/gated")).downloaded


def test_missing_repo_and_revision_say_what_to_fix(hub_server, tiny, monkeypatch):
    hub_server.seed("org/base", tiny["base"])

    with pytest.raises(HubRevisionError, match="org/base@nope: no such branch, tag or commit"):
        hub_sources.plan_recipe(models("org/base@nope"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(HubNotFoundError, match="org/absent: repository not found"):
        hub_sources.plan_recipe(models("org/absent"))


def test_repo_with_only_pickle_weights_is_refused(hub_server, tiny):
    hub_server.commit_files(
        "org/pickled",
        {"config.json": (tiny["base"] / "config.json").read_bytes(), "pytorch_model.bin": b"\x80\x04 not loaded"},
    )

    result = cli("pull", "org/pickled")

    assert result.exit_code == 2
    assert "org/pickled ships only pickle weights (pytorch_model.bin)" in result.output
    assert "arbitrary code" in result.output
    assert hub_server.downloads(".bin") == []


def test_a_merge_of_hub_models_records_the_shas_and_its_push_names_them(hub_server, tiny, tmp_path, monkeypatch):
    from lrmerge_hub.merge.engine import merge

    shas = seed_family(hub_server, tiny)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        "method: slack_ties\nbase: org/base\nmodels:\n  - {model: org/language@v2, role: language}\n"
        "  - {model: org/task@v1, role: task, slack: 0.5}\nlanguages: [bo]\nlicense: apache-2.0\n"
    )
    recipe = load_recipe(recipe_path)

    report = merge(recipe, hub_sources.materialize_sources(recipe), tmp_path / "out", device="cpu", progress=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pushed = publish.push(tmp_path / "out", "alice/merged")

    assert report["base"]["revision"] == shas["base"]
    assert [m["revision"] for m in report["models"]] == [shas["language"], shas["task"]]
    title = hub_server.repos["alice/merged"].commits[pushed.commit].title
    assert all(f"@{sha[:12]}" in title for sha in shas.values()) and recipe.sha256()[:12] in title
    assert json.loads(hub_server.files("alice/merged")["merge_report.json"]) == report


# --- push -----------------------------------------------------------------------------------
@pytest.fixture
def merged(tmp_path, tiny) -> Path:
    """A folder shaped like `lrmerge merge` output, with a card, a report and hidden run state."""
    out = tmp_path / "merged"
    shutil.copytree(tiny["task"], out)
    report = {
        "method": "slack_ties",
        "recipe_sha256": "ab" * 32,
        "base": {"model": "org/base", "repo_id": "org/base", "revision": "1" * 40},
        "models": [
            {"model": "org/language@v2", "repo_id": "org/language", "revision": "2" * 40},
            {"model": "task", "repo_id": None, "revision": None},
        ],
    }
    (out / "merge_report.json").write_text(json.dumps(report))
    (out / "recipe.yaml").write_text("method: slack_ties\nbase: org/base\n")
    (out / "README.md").write_text("---\nlanguage: [bo]\nlicense: apache-2.0\n---\n# merged\n")
    (out / ".lrmerge").mkdir()
    (out / ".lrmerge" / "state.json").write_text("{}")
    (out / ".eval_results").mkdir()
    (out / ".eval_results" / "belebele_bod_Tibt.yaml").write_text("- dataset: {id: facebook/belebele}\n  value: 0.5\n")
    return out


def test_push_uploads_the_folder_as_one_commit_naming_recipe_and_revisions(hub_server, merged):
    result = cli("push", str(merged), "alice/merged", "--private", "--format", "json", env={"HF_TOKEN": TOKEN})

    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    repo = hub_server.repos["alice/merged"]
    assert repo.private and repo.branches["main"] == out["commit"]
    commit = repo.commits[out["commit"]]
    assert repo.commits[commit.parent].parent is None  # one commit on top of the repo's initial commit
    expected = {p.relative_to(merged).as_posix() for p in merged.rglob("*") if p.is_file()} - {".lrmerge/state.json"}
    assert set(commit.files) - {".gitattributes"} == expected
    assert commit.files["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    assert commit.title == (
        "lrmerge slack_ties (recipe abababababab): org/base@111111111111, org/language@222222222222, task (local)"
    )
    assert "2" * 40 in commit.description and "method: slack_ties" in commit.description


def test_push_as_pull_request_leaves_main_alone(hub_server, merged):
    hub_server.create_repo("alice/merged")
    main_before = hub_server.repos["alice/merged"].branches["main"]

    result = cli("push", str(merged), "alice/merged", "--create-pr", "--token", TOKEN)

    assert result.exit_code == 0, result.output
    repo = hub_server.repos["alice/merged"]
    assert repo.branches["main"] == main_before and len(repo.prs) == 1
    assert "model.safetensors" in hub_server.files("alice/merged", "refs/pr/1")
    assert f"{hub_server.url}/alice/merged/discussions/1" in result.output


def test_push_to_a_branch_with_a_tag_and_rerun(hub_server, merged, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    first = publish.push(merged, "alice/merged", revision="release", tag="v1")
    again = publish.push(merged, "alice/merged", revision="release", tag="v1")  # nothing changed: same commit

    repo = hub_server.repos["alice/merged"]
    assert repo.branches["release"] == repo.tags["v1"] == first.commit == again.commit
    assert first.changed and not again.changed
    assert "model.safetensors" not in hub_server.files("alice/merged", "main")
    (merged / "README.md").write_text("---\nlicense: mit\n---\nchanged\n")
    with pytest.raises(HubPushError, match="tag 'v1' already exists"):
        publish.push(merged, "alice/merged", revision="release", tag="v1")


def test_failed_push_leaves_the_remote_unchanged_and_a_rerun_completes_it(hub_server, merged):
    hub_server.create_repo("alice/merged")
    before = hub_server.repos["alice/merged"].branches["main"]
    hub_server.fail("POST", r"/commit/", status=500, times=3)  # every attempt fails

    failed = cli("push", str(merged), "alice/merged", "--tag", "v1", env={"HF_TOKEN": TOKEN})

    assert failed.exit_code == 2
    assert "Error: push to alice/merged@main failed" in failed.output
    assert "nothing was committed: run the same command again" in failed.output
    repo = hub_server.repos["alice/merged"]
    assert repo.branches == {"main": before} and repo.tags == {} and repo.prs == []
    assert sum("/commit/" in r.path for r in hub_server.log) == 3  # retried, then stopped

    hub_server.fail("POST", r"/tag/", status=500, times=3)  # now the commit lands but tagging fails
    untagged = cli("push", str(merged), "alice/merged", "--tag", "v1", env={"HF_TOKEN": TOKEN})
    assert untagged.exit_code == 2 and "could not tag it 'v1'" in untagged.output
    assert repo.branches["main"] != before and repo.tags == {}

    rerun = cli("push", str(merged), "alice/merged", "--tag", "v1", env={"HF_TOKEN": TOKEN})

    assert rerun.exit_code == 0, rerun.output
    assert repo.tags["v1"] == repo.branches["main"] != before
    assert "Nothing to push" in rerun.output and "Tagged v1" in rerun.output


def test_commit_whose_answer_was_lost_is_recognised_not_duplicated(hub_server, merged, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub_server.create_repo("alice/merged")
    hub_server.fail("POST", r"/commit/", status=502, after=True)  # applied, then the answer is lost

    result = publish.push(merged, "alice/merged")

    repo = hub_server.repos["alice/merged"]
    assert result.commit == repo.branches["main"]
    assert repo.commits[repo.commits[result.commit].parent].parent is None  # exactly one new commit
    assert sum("/commit/" in r.path for r in hub_server.log) == 1  # the retry saw the files there


def test_network_errors_during_the_commit_are_retried_without_duplicating_it(hub_server, merged, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub_server.create_repo("alice/merged")
    hub_server.fail("POST", r"/commit/", status=DROP)  # connection closed before the commit
    hub_server.fail("POST", r"/commit/", status=DROP, after=True)  # ... and after it, on the retry

    result = publish.push(merged, "alice/merged")

    repo = hub_server.repos["alice/merged"]
    assert result.commit == repo.branches["main"]
    assert repo.commits[repo.commits[result.commit].parent].parent is None
    assert sum("/commit/" in r.path for r in hub_server.log) == 2


def test_push_never_overwrites_a_commit_made_meanwhile(hub_server, merged, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub_server.create_repo("alice/merged")
    other = {}
    hub_server.before(
        "POST",
        r"/commit/",
        lambda: other.update(sha=hub_server.commit_files("alice/merged", {"other.txt": b"someone else"})),
    )

    with pytest.raises(HubPushError, match="the branch moved while pushing"):
        publish.push(merged, "alice/merged")

    assert hub_server.repos["alice/merged"].branches["main"] == other["sha"]
    assert "config.json" not in hub_server.files("alice/merged")


def test_card_metadata_the_hub_rejects_stops_the_push_before_anything_changes(hub_server, merged, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub_server.create_repo("alice/merged")
    before = hub_server.repos["alice/merged"].branches["main"]
    (merged / "README.md").write_text("---\nlanguage: [bo]\nlicense: [mit, apache-2.0]\n---\n# merged\n")

    with pytest.raises(HubPushError, match=r'Invalid metadata in README.md. - "license" must be a string'):
        publish.push(merged, "alice/merged")

    assert hub_server.repos["alice/merged"].branches == {"main": before}


def test_push_without_a_usable_token_fails_clearly(hub_server, merged):
    no_token = cli("push", str(merged), "alice/merged")
    bad_token = cli("push", str(merged), "alice/merged", env={"HF_TOKEN": "hf_wrong"})

    assert no_token.exit_code == 2 and "pushing needs a Hub token with write access" in no_token.output
    assert bad_token.exit_code == 2 and "refused the token (HTTP 401)" in bad_token.output
    assert "hf_wrong" not in bad_token.output and "alice/merged" not in hub_server.repos


def test_token_never_appears_in_output_or_written_files(hub_server, tiny, merged, tmp_path):
    hub_server.seed("org/private", tiny["base"], private=True)
    env = {"HF_TOKEN": TOKEN}
    outputs = [
        cli("pull", "org/private", "--format", "json", env=env),
        cli("pull", "org/private", "--dry-run", env=env),
        cli("pull", "org/absent", env=env),
        cli("push", str(merged), "alice/merged", "--token", TOKEN, "--tag", "v1"),
        cli("push", str(merged), "alice/merged", "--format", "json", env=env),
    ]

    assert [r.exit_code for r in outputs] == [0, 0, 2, 0, 0]
    for r in outputs:
        assert TOKEN not in r.output
    assert any(r.authenticated for r in hub_server.log)  # the token was used
    written = [p for root in (tmp_path, Path(os.environ["HF_HOME"])) for p in root.rglob("*") if p.is_file()]
    assert any("models--org--private" in str(p) for p in written)
    for p in written:
        assert TOKEN.encode() not in p.read_bytes(), p
    for files in (hub_server.files("alice/merged"),):
        assert all(TOKEN.encode() not in data for data in files.values())


def test_a_hub_answer_without_a_commit_sha_is_refused_not_read_unpinned(monkeypatch):
    class Info:  # what HfApi.model_info may return: its sha is optional
        sha = None
        siblings: list = []

    monkeypatch.setattr(hub_sources.HfApi, "model_info", lambda self, *a, **kw: Info())
    with pytest.raises(HubError, match="did not name the commit of main"):
        hub_sources.remote_meta(ref("org/base"))
