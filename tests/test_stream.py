"""Merging straight from the Hub: tensors read by range requests (hub/stream.py), checked against
the sha256 the Hub lists, resumed after a broken connection; the client against tests/hub_server.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from lrmerge_hub.hub import sources as hub_sources
from lrmerge_hub.cli import main
from lrmerge_hub.interrupt import at_once
from lrmerge_hub.merge.engine import local_sources, merge, open_sources
from lrmerge_hub.merge.st_io import SafetensorsModel
from lrmerge_hub.recipe.spec import load_recipe
from lrmerge_hub.run.sweep import parse_grid, run_sweep
from lrmerge_hub.synth.tiny import make_family, write_checkpoint
from tests.hub_server import CORRUPT, CUT, EMPTY, OVERLONG, SHIFTED, TRICKLE
from tests.hub_support import TOKEN

RECIPE = (
    "method: slack_ties\nbase: {base}\nmodels:\n  - {{model: {language}, role: language}}\n"
    "  - {{model: {task}, role: task, slack: 0.5}}\nlanguages: [bo]\nlicense: apache-2.0\n"
)
TASK_WEIGHTS = r"org/task/resolve/[0-9a-f]{40}/model\.safetensors$"
HEADER_READS = 3  # GETs of a one-shard model before its first data block: the check's, then ours (8 bytes, JSON)
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny base/language/task checkpoints; the language model in 3 shards with an index."""
    fam = make_family(tmp_path_factory.mktemp("stream"), extend_language_vocab=8)
    sharded = fam["language"].parent / "language-sharded"
    sharded.mkdir()
    for p in fam["language"].iterdir():
        if p.suffix != ".safetensors":
            shutil.copy(p, sharded / p.name)
    write_checkpoint(sharded, iter(load_file(fam["language"] / "model.safetensors").items()), shard_bytes=200_000)
    fam["language"] = sharded
    return fam


@pytest.fixture(scope="module")
def local_merge(family, tmp_path_factory) -> Path:
    """The same merge from local folders: what every streamed merge must reproduce bit for bit."""
    folder = tmp_path_factory.mktemp("local")
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(RECIPE.format(**{k: str(family[k]) for k in ("base", "language", "task")}))
    recipe = load_recipe(recipe_path)
    merge(recipe, local_sources(recipe), folder / "out", device="cpu", progress=False)
    return folder / "out"


@pytest.fixture
def hub_family(hub_server, family, tmp_path, monkeypatch) -> Path:
    """The family on the test Hub, and a recipe naming it; small requests and a small window,
    so that blocks are coalesced, split and held back by the window even in tiny models."""
    for name in ("base", "language", "task"):
        hub_server.seed(f"org/{name}", family[name])
    monkeypatch.setattr(hub_sources, "RANGE_REQUEST_BYTES", 20_000)
    monkeypatch.setenv("LRMERGE_HUB_RETRY_WAIT", "0.01")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(base="org/base", language="org/language", task="org/task") + "output: out\n")
    return path


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def weights_in(family: dict[str, Path]) -> list[Path]:
    return [p for k in ("base", "language", "task") for p in family[k].glob("*.safetensors")]


def cached_weights() -> list[Path]:
    from huggingface_hub import constants

    return sorted(Path(constants.HF_HUB_CACHE).rglob("*.safetensors"))


def test_streamed_merge_is_bit_identical_reads_every_byte_once_and_caches_no_weights(
    hub_server, hub_family, family, local_merge, tmp_path
):
    recipe = load_recipe(hub_family)
    sources = hub_sources.stream_sources(recipe, read_ahead=150_000)  # pins, checks the headers, fetches side files
    checked = len(hub_server.log)

    report = merge(recipe, sources, tmp_path / "out", device="cpu", progress=False)

    assert shard_bytes(tmp_path / "out") == shard_bytes(local_merge)
    assert all(s.reader is not None for s in sources.values()) and cached_weights() == []
    weights = assert_every_byte_read_once(hub_server, sources, since=checked)
    assert len(weights) == len(weights_in(family)) > 3
    assert report["base"]["revision"] == sources["base"].revision
    assert report["stats"]["bytes_from_network"] == sum(weights.values())


def assert_every_byte_read_once(hub_server, sources, *, since: int) -> dict[str, int]:
    """The reads logged since `since` cover every byte of every input shard exactly once,
    header included; returns the shards' sizes by path."""
    weights = {
        f"/{s.repo_id}/resolve/{s.revision}/{name}": len(data)
        for s in sources.values()
        for name, data in hub_server.files(s.repo_id).items()
        if name.endswith(".safetensors")
    }
    for path, size in weights.items():
        ranges = sorted(r.byte_range for r in hub_server.log[since:] if r.method == "GET" and r.path == path)
        covered = 0
        for first, last in ranges:
            assert first == covered, f"{path}: bytes {covered}-{first - 1} read twice or never"
            covered = last + 1
        assert covered == size
    return weights


def test_a_sweep_reads_each_input_byte_once_for_all_its_points(hub_server, hub_family, local_merge):
    recipe = load_recipe(hub_family)
    sources = hub_sources.stream_sources(recipe)
    checked = len(hub_server.log)

    def task_retention(folder):  # a stand-in score: higher slack keeps more of the task model
        report = json.loads((folder / "merge_report.json").read_text())
        return [{"task": "retention", "metric": "acc", "value": report["models"][1]["retention"]["fraction"]}]

    table = run_sweep(
        recipe,
        parse_grid(["slack=0,0.5,1"]),
        sources=sources,
        output=recipe.output,
        evaluate=task_retention,
        device="cpu",
        progress=False,
    )

    assert [p["point"]["slack"] for p in table["points"]] == [1, 0.5, 0]
    assert_every_byte_read_once(hub_server, sources, since=checked)
    points = recipe.output.parent / f"{recipe.output.name}.sweep"
    assert shard_bytes(points / "slack0.5") == shard_bytes(local_merge)  # the local merge's recipe has slack 0.5
    assert shard_bytes(points / "slack0") != shard_bytes(points / "slack1")


def test_weights_already_in_the_cache_are_read_from_disk(hub_server, hub_family):
    recipe = load_recipe(hub_family)
    hub_sources.pull(recipe)  # downloads everything into the cache, as --download does
    downloads = len(hub_server.downloads())

    sources = hub_sources.stream_sources(recipe)

    assert all(s.reader is None and (s.path / "config.json").is_file() for s in sources.values())
    assert len(hub_server.downloads()) == downloads


def test_the_models_are_planned_fetched_and_opened_side_by_side(hub_server, hub_family):
    """Pinning and checking a Hub model, fetching its side files and opening it are each a few
    requests one after another; the models do them at the same time, so that a far Hub's
    latency is paid once per step, not once per model (each model's first request of each
    step is in flight while the others' are)."""
    hub_server.limit_bandwidth(None, latency=0.3)
    recipe = load_recipe(hub_family)
    sources = hub_sources.stream_sources(recipe)
    readers = open_sources(recipe, sources)
    for reader in readers.values():
        reader.close()

    steps = {
        "plan (model info)": lambda r: re.fullmatch(r"/api/models/org/\w+(/revision/.+)?", r.path),
        "side files (the file list)": lambda r: "/tree/" in r.path,
        "open (a shard's first 8 bytes)": lambda r: r.range == "bytes=0-7",
    }
    for step, matches in steps.items():
        firsts = {}
        for r in hub_server.log:
            repo = "/".join(r.path.split("/")[3:5] if r.path.startswith("/api/") else r.path.split("/")[1:3])
            if matches(r) and repo not in firsts:
                firsts[repo] = r
        assert sorted(firsts) == ["org/base", "org/language", "org/task"], step
        assert max(r.began for r in firsts.values()) < min(r.ended for r in firsts.values()), step


def test_streamed_tensors_are_read_only_arrays_of_the_same_type_as_mapped_ones(hub_server, hub_family, family):
    """The merge kernels are compiled (and cached) per array type: a streamed tensor must be
    the same type as a mapped local one, read-only, or the first streamed merge compiles them
    all again."""
    import numba

    recipe = load_recipe(hub_family)
    streamed = open_sources(recipe, hub_sources.stream_sources(recipe))
    mapped = SafetensorsModel(family["base"], "base")
    try:
        base = streamed["base"]
        names = [n for n in base.tensors if base.tensors[n].spec.numel]
        base.read_order(names)
        for name in names:
            array = base.array(name)
            assert not array.flags.writeable
            assert numba.typeof(array) == numba.typeof(mapped.array(name)), name
            base.release(name)
    finally:
        for reader in [*streamed.values(), mapped]:
            reader.close()


def test_at_once_keeps_the_order_and_raises_the_first_error_after_undoing_the_rest():
    assert at_once(lambda x: x * 2, [3, 1, 2]) == [6, 2, 4]
    undone = []

    def fail_odd(x: int) -> int:
        if x % 2:
            raise ValueError(f"odd {x}")
        return x

    with pytest.raises(ValueError, match="odd 1"):
        at_once(fail_odd, [2, 1, 4, 3], undo=undone.append)
    assert sorted(undone) == [2, 4]


@pytest.mark.parametrize("fault", [CUT, 503], ids=["connection-cut", "server-error"])
def test_a_range_broken_in_the_middle_is_resumed_where_it_stopped(hub_server, hub_family, local_merge, tmp_path, fault):
    recipe = load_recipe(hub_family)
    hub_server.fail("GET", TASK_WEIGHTS, status=fault, skip=HEADER_READS)

    merge(recipe, hub_sources.stream_sources(recipe), tmp_path / "out", device="cpu", progress=False)

    assert shard_bytes(tmp_path / "out") == shard_bytes(local_merge)
    gets = [
        r
        for r in hub_server.log
        if r.method == "GET"
        and r.path.startswith("/org/task/resolve/")
        and r.path.endswith("/model.safetensors")
        and r.byte_range
    ]
    broken = next(r for r in gets if r.status == 503 or r.sent < r.byte_range[1] - r.byte_range[0] + 1)
    first, last = broken.byte_range
    resumed = [r.byte_range for r in gets[gets.index(broken) + 1 :] if r.byte_range[1] == last]
    assert (fault == CUT and 0 < broken.sent) or broken.status == 503
    assert resumed == [(first + broken.sent if fault == CUT else first, last)]  # once, from where it stopped


def run(recipe: Path, *args: str, env: dict | None = None):
    return CliRunner().invoke(
        main,
        ["run", str(recipe), "--skip-eval", "--format", "quiet", *args],
        env={"HF_TOKEN": "hf_test-token-never-printed", **(env or {})},
    )


def test_corrupted_bytes_fail_the_run_before_anything_is_pushed(hub_server, hub_family):
    hub_family.write_text(hub_family.read_text() + "push: {repo: alice/merged}\n")
    hub_server.fail("GET", TASK_WEIGHTS, status=CORRUPT, skip=HEADER_READS)

    result = run(hub_family)

    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message, message
    assert message.startswith("Error: org/task: model.safetensors does not match the sha256 the Hub lists")
    assert "alice/merged" not in hub_server.repos and hub_server.lfs_objects == {}
    assert not (hub_family.parent / "out").exists()
    assert not [p for p in hub_family.parent.iterdir() if "lrmerge-tmp" in p.name]


@pytest.mark.parametrize("fault", ["token-refused", "repo-deleted"])
def test_a_hub_that_says_no_mid_run_stops_with_one_line(hub_server, hub_family, local_merge, fault):
    weights = r"/resolve/.*\.safetensors$"
    if fault == "token-refused":
        hub_server.fail("GET", weights, status=401, skip=12, times=1000)
    else:
        hub_server.before("GET", weights, lambda: hub_server.repos.pop("org/task"), skip=12)

    result = run(hub_family)

    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0
    assert ("HTTP 401" if fault == "token-refused" else "org/task: repository not found") in result.output
    assert not (hub_family.parent / "out").exists() and cached_weights() == []
    if fault == "token-refused":
        hub_server.faults.clear()
        assert run(hub_family).exit_code == 0  # resumes at the merge; the pull's streamed sources reopen
        assert shard_bytes(hub_family.parent / "out") == shard_bytes(local_merge)


def test_download_flag_keeps_downloading_into_the_cache(hub_server, hub_family, family, local_merge, tmp_path):
    result = CliRunner().invoke(
        main,
        ["merge", str(hub_family), "--download", "--out", str(tmp_path / "o"), "--device", "cpu", "--format", "quiet"],
    )

    assert result.exit_code == 0, result.output
    assert len(cached_weights()) == len(weights_in(family)) and shard_bytes(tmp_path / "o") == shard_bytes(local_merge)


# --- streamed outputs: shards uploaded as they finish, one commit at the end ----------------------
def tensors_of(files: dict[str, bytes]) -> dict[str, bytes]:
    """Every tensor's bytes, whatever the sharding."""
    import torch
    from safetensors.torch import load

    out = {}
    for name, data in sorted(files.items()):
        if name.endswith(".safetensors"):
            out.update({k: v.reshape(-1).view(torch.uint8).numpy().tobytes() for k, v in load(data).items()})
    return out


def test_merge_and_push_holds_one_output_shard_on_disk_and_commits_once(hub_server, hub_family, local_merge):
    hub_family.write_text(hub_family.read_text() + "push: {repo: alice/merged}\n")
    folder = hub_family.parent
    seen = []  # at each shard's upload: weights on our disk, and what the Hub shows

    def at_upload() -> None:
        on_disk = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        seen.append((on_disk, [f for f in hub_server.files("alice/merged") if f.endswith(".safetensors")]))

    hub_server.before("PUT", r"^/lfs-storage/", at_upload, times=100)

    result = run(hub_family, "--no-keep", "--shard-size", "200KB", "--format", "human")

    assert result.exit_code == 0, result.output
    summary = next(line for line in result.output.splitlines() if line.startswith("merge read "))
    assert "MB from the Hub" in summary and "uploaded" in summary and "peak disk" in summary
    pushed = hub_server.files("alice/merged")
    shards = [f for f in pushed if f.endswith(".safetensors")]
    largest = max(len(pushed[f]) for f in shards)
    assert len(shards) == len(seen) >= 3  # each shard uploaded once, as it finished
    assert all(on_disk <= 1.1 * largest and visible == [] for on_disk, visible in seen)
    assert tensors_of(pushed) == tensors_of(shard_bytes(local_merge))
    assert len(hub_server.repos["alice/merged"].commits) == 2  # the repo's first commit, then ours
    assert not list(folder.rglob("*.safetensors")) and (folder / "out" / "merge_report.json").is_file()


def test_an_interrupted_merge_and_push_uploads_only_the_missing_shards(hub_server, hub_family, local_merge):
    hub_family.write_text(hub_family.read_text() + "push: {repo: alice/merged}\n")
    hub_server.fail("PUT", r"^/lfs-storage/", status=403, skip=2)  # the third upload is refused

    first = run(hub_family, "--no-keep", "--shard-size", "200KB")

    assert first.exit_code == 2 and "HTTP 403" in first.output
    assert [f for f in hub_server.files("alice/merged") if f.endswith(".safetensors")] == []
    stored = set(hub_server.lfs_objects)
    assert len(stored) == 2
    mark = len(hub_server.log)

    again = run(hub_family, "--no-keep", "--shard-size", "200KB")

    assert again.exit_code == 0, again.output
    pushed = hub_server.files("alice/merged")
    shards = [f for f in pushed if f.endswith(".safetensors")]
    puts = [r.path for r in hub_server.log[mark:] if r.method == "PUT"]
    assert len(puts) == len(shards) - 2 and not {p.rsplit("/", 1)[1] for p in puts} & stored
    assert tensors_of(pushed) == tensors_of(shard_bytes(local_merge))


# --- a hostile or stalled Hub: every wait is bounded, every failure one line ----------------------
def merge_process(recipe: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`lrmerge merge RECIPE` as its own process (a hang ends in the caller's timeout, and
    stderr holds what a terminal would show, the client's logging included)."""
    return subprocess.Popen(
        [sys.executable, "-m", "lrmerge_hub", "merge", str(recipe), "--device", "cpu", *args],
        cwd=recipe.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "HF_TOKEN": TOKEN,
            "LRMERGE_HUB_RETRY_WAIT": "0.01",
            **(env or {}),
        },
    )


def finished(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    """(exit code, stderr, seconds) of a process that must end within `timeout` seconds."""
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"lrmerge still running after {timeout} s")
    assert TOKEN not in out + err
    return proc.returncode, err, time.monotonic() - started


def leftovers(folder: Path) -> list[str]:
    """The output, temporary folders and locks a merge to `out` could leave."""
    return sorted(p.name for p in folder.iterdir() if p.name == "out" or "lrmerge-" in p.name)


@pytest.mark.parametrize(
    "fault, env, message",
    [
        ({"status": EMPTY}, {}, "the Hub answered 3 range requests for model.safetensors without a byte"),
        ({"status": OVERLONG}, {}, "is longer than the range (1000000000000000 bytes for "),
        ({"status": SHIFTED}, {}, "the Hub answered a request for bytes "),
        (
            {"status": 429, "headers": {"Retry-After": "100000"}},
            {},
            "the Hub asks to wait 100000 s before reading model.safetensors again (HTTP 429), "
            "longer than lrmerge waits (300 s, LRMERGE_HUB_MAX_WAIT)",
        ),
        ({"status": TRICKLE, "interval": 0.5}, {"LRMERGE_HUB_RANGE_DEADLINE": "3"}, "took longer than 3 s"),
    ],
    ids=["empty-206", "overlong-206", "other-range-206", "retry-after-100000s", "trickle"],
)
def test_a_range_the_hub_never_completes_fails_with_one_line_within_its_bounds(
    hub_server, hub_family, fault, env, message
):
    hub_server.fail("GET", TASK_WEIGHTS, skip=HEADER_READS, times=1000, **fault)

    code, err, seconds = finished(merge_process(hub_family, "--format", "quiet", env=env), timeout=60)

    assert code == 2 and err.count("\n") == 1 and err.startswith("Error: org/task: "), err
    assert message in err
    reads = [r for r in hub_server.log if r.method == "GET" and re.search(TASK_WEIGHTS, r.path)][HEADER_READS:]
    assert seconds < 30 and 1 <= len(reads) <= 3  # no loop of requests
    assert sum(r.sent for r in reads) < 64 * 2**20  # nor of bytes (what the sockets' buffers took, at most)
    assert leftovers(hub_family.parent) == []


@pytest.mark.parametrize("fmt", ["human", "quiet"])
def test_retries_of_a_persistent_503_are_one_line_each_then_one_error(hub_server, hub_family, fmt):
    hub_server.fail("GET", TASK_WEIGHTS, status=503, skip=HEADER_READS, times=1000)

    code, err, _ = finished(merge_process(hub_family, "--format", fmt), timeout=60)

    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 2 and lines[-1] == "Error: org/task: the Hub answered HTTP 503; try again later", err
    assert not any("thrown while requesting" in line or "Retrying in" in line for line in lines)  # the client's
    retries = [line for line in lines if "retrying" in line]
    if fmt == "quiet":
        assert lines == lines[-1:]
    else:
        assert retries == [
            f"Hub: org/task: HTTP 503 reading model.safetensors; retrying ({n}/5) in {w:g}s"
            for n, w in enumerate([0.01, 0.02, 0.04, 0.08, 0.16], 1)
        ]


def test_the_clients_own_retries_are_reported_as_our_lines(hub_server, hub_family, capfd):
    hub_server.fail("GET", r"^/org/task/resolve/[0-9a-f]{40}/config\.json$", status=429)  # retried after 1 s

    result = CliRunner().invoke(main, ["merge", str(hub_family), "--device", "cpu", "--format", "human"])

    assert result.exit_code == 0, result.output
    assert "Hub: HTTP 429; retrying (1/5) in 1s" in result.output
    assert "Retrying in" not in capfd.readouterr().err  # the client's handler prints to the real stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_a_stalled_range_ends_the_process_at_once(hub_server, hub_family, sig):
    hub_server.fail("GET", TASK_WEIGHTS, status=TRICKLE, interval=1, skip=HEADER_READS)
    proc = merge_process(hub_family, "--format", "quiet")
    deadline = time.monotonic() + 60
    while not any(
        r.status == 206 and r.path.startswith("/org/task/")
        for r in hub_server.log[HEADER_READS:]
        if r.range and not r.range.startswith("bytes=0-")
    ):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # the merge now waits for the trickled range

    proc.send_signal(sig)
    code, err, seconds = finished(proc, timeout=20)

    assert code == 128 + sig and seconds < 5, (code, seconds, err)
    assert err.strip() == f"Error: interrupted by {sig.name}; nothing half-written was left at the output path"
    assert leftovers(hub_family.parent) == []


def test_a_bound_that_is_not_a_number_of_seconds_is_one_line(hub_server, hub_family):
    result = run(hub_family, env={"LRMERGE_HUB_MAX_WAIT": "soon"})

    assert result.exit_code == 2 and result.output.strip() == (
        "Error: LRMERGE_HUB_MAX_WAIT='soon' is not a positive number of seconds; unset it or set e.g. "
        "LRMERGE_HUB_MAX_WAIT=300"
    )
