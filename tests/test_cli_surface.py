"""What a newcomer meets at the command line: `hf lrmerge` through the real `hf` CLI, the merge's
retention lines, a run summary in run order, and the card's file mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lrmerge_hub.cli import main
from lrmerge_hub.run.pipeline import STEPS, summary_markdown

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def hf(args: list[str], home: Path) -> subprocess.CompletedProcess:
    """The real `hf` CLI of this environment, with its extension folder under `home`."""
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run([str(BIN / "hf"), *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.skipif(
    not (BIN / "hf").is_file() or not (BIN / "hf-lrmerge").is_file(),
    reason="needs the installed `hf` and `hf-lrmerge` scripts (pip install -e .)",
)
def test_hf_lrmerge_dispatches_after_extension_install(tmp_path):
    assert hf(["lrmerge", "--version"], tmp_path).returncode != 0  # a script on PATH alone is not dispatched
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "lrmerge_hub", "extension", "install", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert Path(json.loads(done.stdout)["runs"]) == (BIN / "hf-lrmerge").resolve()
    ran = hf(["lrmerge", "--version"], tmp_path)
    assert ran.returncode == 0 and "lrmerge, version" in ran.stdout, ran.stderr
    listed = hf(["lrmerge", "--help"], tmp_path)
    assert "merge" in listed.stdout and "serve" in listed.stdout
    assert hf(["extensions", "remove", "lrmerge"], tmp_path).returncode == 0  # the client's own remove works
    assert hf(["lrmerge", "--version"], tmp_path).returncode != 0


def test_extension_install_refuses_to_replace_another_registration(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / ".local/share/hf/extensions/hf-lrmerge"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "owner": "someone",
                "repo": "hf-lrmerge",
                "repo_id": "someone/hf-lrmerge",
                "short_name": "lrmerge",
                "executable_path": str(tmp_path / "other/hf-lrmerge"),
                "type": "python",
                "installed_at": "2026-01-01T00:00:00+00:00",
            }
        )
    )
    result = CliRunner().invoke(main, ["extension", "install"])
    assert result.exit_code == 2 and "--force" in result.output and len(result.output.strip().splitlines()) == 1
    assert "someone" in (folder / "manifest.json").read_text()


def test_retention_lines_name_a_model_once(family, tmp_path, write_recipe):
    family("models")
    recipe = write_recipe(
        "method: ties\nbase: ./models/base\nmodels:\n"
        "  - {model: ./models/language, role: language, density: 0.5}\n"
        "  - {model: ./models/task, role: task, density: 0.5}\noutput: ./merged\n"
    )
    result = CliRunner().invoke(main, ["merge", str(recipe), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines() if "trim kept" in line]
    assert [line.split(":")[0] for line in lines] == ["language", "task"], lines


def test_summary_lists_steps_in_run_order():
    steps = {name: {"status": "done", "seconds": 1} for name in STEPS}
    summary = json.loads(json.dumps({"output": "/out/m", "steps": steps}, sort_keys=True))  # as --format json
    rows = [
        line.split("|")[1].strip()
        for line in summary_markdown(summary).splitlines()
        if line.startswith("| ") and line.split("|")[1].strip() in STEPS
    ]
    assert rows == list(STEPS)


def test_the_card_is_as_readable_as_the_model_files(tmp_path):
    from lrmerge_hub.card.build import BuiltCard, save_card

    old = os.umask(0o022)
    try:
        path = save_card(
            tmp_path, BuiltCard(text="---\nlicense: mit\n---\n# m\n", metadata={}, eval_files={}, notes=[])
        )
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temp file left beside it
