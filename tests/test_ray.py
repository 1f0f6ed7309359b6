"""`--executor ray` against a real Ray cluster of two nodes: `ray start --head` on 127.0.0.1
and a second node joining it with `ray start --address` on 127.0.0.2, one CPU each (two
single-CPU task slots), started once for this module (tests/ray_support.py); tiny models,
lm-eval's hf backend."""

from tests.ray_support import kill_head, live_node_ids, ray_cluster as start_ray_cluster  # first: how Ray binds

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from lrmerge_hub.cli import main
from lrmerge_hub.run.cluster import RayExecutor
from lrmerge_hub.merge.engine import local_sources
from lrmerge_hub.run.pipeline import merge_verified, run_releases, tensor_sha256
from lrmerge_hub.recipe.spec import load_recipe
from lrmerge_hub.synth.tiny import make_family, make_tiny_task
from tests.hub_support import TOKEN
from tests.test_end_to_end import SWEEP_RECIPE  # output: ./best
from tests.test_pipeline import HUB_RECIPE, seeded, tiny  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent


LOCAL_RECIPE = """
method: slack_ties
base: ./models/base
models:
  - {model: ./models/language, role: language, density: 0.2}
  - {model: ./models/task, role: task, density: 0.2, slack: SLACK}
languages: [LANG]
license: apache-2.0
output: ./out/LANG
"""


NODE_IPS = {"127.0.0.1", "127.0.0.2"}


@pytest.fixture(scope="module")
def ray_cluster():
    with start_ray_cluster((1, 1)) as address:
        yield address


def lrmerge(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def tensor_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))


def sweep_recipe(folder: Path, executor: str = "ray") -> Path:
    """The end-to-end sweep recipe (tiny models, tiny_mc with hf, output best-EXECUTOR) in `folder`."""
    if not (folder / "models").exists():
        make_family(folder / "models")
        make_tiny_task(folder / "tasks")
    recipe = folder / f"{executor}.yaml"
    recipe.write_text(SWEEP_RECIPE.replace("./best", f"./best-{executor}"))
    return recipe


def cmdline(pid: str | int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def lm_eval_processes(*parts: str) -> list[int]:
    """lm-eval processes whose command line holds every one of `parts`."""
    return [
        int(pid)
        for pid in filter(str.isdigit, os.listdir("/proc"))
        if "lm_eval" in (line := cmdline(pid)) and all(p in line for p in parts)
    ]


class Killer(threading.Thread):
    """Kills, once, the lm-eval process evaluating the point `name` on a Ray worker (SIGKILL),
    or with `worker=True` that worker's whole process group, as a node losing a worker
    mid-task would."""

    def __init__(self, name: str, *, worker: bool):
        super().__init__(daemon=True)
        self.point, self.worker, self.killed, self.stop = name, worker, None, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            for pid in lm_eval_processes(f"/{self.point},"):
                try:
                    parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
                except (OSError, IndexError):
                    continue
                if cmdline(parent).startswith("ray::"):
                    if self.worker:
                        os.killpg(os.getpgid(int(parent)), signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                    self.killed = int(parent)
                    return
            time.sleep(0.2)


@pytest.mark.slow
def test_ray_sweep_matches_local_and_survives_a_killed_worker(ray_cluster, tmp_path):
    tables = {}
    for executor in ("local", "ray"):
        recipe = sweep_recipe(tmp_path, executor)
        extra = ["--ray-address", ray_cluster] if executor == "ray" else []
        killer = Killer("slack0.5", worker=True)
        if executor == "ray":
            killer.start()
        code, out, err = lrmerge(
            "sweep",
            recipe,
            "--grid",
            "slack=0,0.5,4",
            "--backend",
            "hf",
            "--executor",
            executor,
            *extra,
            "--format",
            "json",
        )
        killer.stop.set()
        assert code == 0, err
        tables[executor] = json.loads(out)
    local, ray = tables["local"], tables["ray"]
    assert killer.killed, "the worker evaluating slack0.5 was never seen, so never killed"
    nodes = {p["name"]: p.pop("node") for p in ray["points"]}
    assert nodes["slack0.5"]["pid"] != killer.killed  # the retry ran in another worker
    assert all(n["ip"] in NODE_IPS and n["node_id"] for n in nodes.values())
    assert len({n["node_id"] for n in nodes.values()}) == 2  # both nodes of the cluster ran points
    assert (local["metric"], local["best"], local["points"]) == (ray["metric"], ray["best"], ray["points"])
    assert [p["score"] is not None for p in ray["points"]] == [True] * 3
    best_local, best_ray = tmp_path / "best-local", tmp_path / "best-ray"
    assert tensor_bytes(best_ray) and tensor_bytes(best_ray) == tensor_bytes(best_local)
    # the best point's evaluation and the table (with the nodes) came along; nothing half-written
    assert json.loads((best_ray / "sweep.json").read_text())["points"][0]["node"]["ip"] in NODE_IPS
    assert list((best_ray / "eval").rglob("results_*.json"))
    assert "slack" in (best_ray / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if ".lrmerge-" in p.name]


@pytest.mark.slow
def test_a_point_whose_evaluation_fails_is_a_row_with_its_error(ray_cluster, tmp_path):
    recipe = sweep_recipe(tmp_path)
    killer = Killer("slack0.8", worker=False)  # lm-eval dies (e.g. out of memory); its worker lives
    killer.start()
    code, out, err = lrmerge(
        "sweep",
        recipe,
        "--grid",
        "slack=0.2,0.8",
        "--backend",
        "hf",
        "--executor",
        "ray",
        "--ray-address",
        ray_cluster,
        "--format",
        "json",
    )
    killer.stop.set()
    assert killer.killed and code == 0, err
    rows = {p["name"]: p for p in json.loads(out)["points"]}
    assert "lm-eval exited with status -9" in rows["slack0.8"]["error"] and rows["slack0.8"]["score"] is None
    assert rows["slack0.2"]["score"] is not None and "error" not in rows["slack0.2"]
    best = tmp_path / "best-ray"
    assert json.loads((best / "merge_report.json").read_text())["models"][1]["params"]["slack"] == 0.2


@pytest.mark.slow
def test_ctrl_c_cancels_every_task_and_writes_nothing(ray_cluster, tmp_path):
    recipe = sweep_recipe(tmp_path)
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrmerge_hub",
            "sweep",
            str(recipe),
            "--grid",
            "slack=0.3,0.7",
            "--backend",
            "hf",
            "--executor",
            "ray",
            "--ray-address",
            ray_cluster,
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not lm_eval_processes(str(tmp_path / "tasks")):  # a point is being evaluated on a worker
            assert driver.poll() is None and time.monotonic() < deadline, driver.stderr.read()
            time.sleep(0.2)
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 130 and "interrupted by SIGINT" in err
    assert not (tmp_path / "best-ray").exists()
    assert not [p for p in tmp_path.iterdir() if ".lrmerge-" in p.name]
    assert not lm_eval_processes(str(tmp_path / "tasks"))  # every evaluation stopped
    scratch = Path(tempfile.gettempdir()).glob("lrmerge-task-*/slack0.[37]")
    assert not list(scratch)  # every task removed its scratch folder before the driver left


@pytest.mark.slow
def test_two_recipes_released_together_land_on_the_hub(ray_cluster, seeded, hub_server, tmp_path):  # noqa: F811
    for lang in ("bo", "ug"):
        text = HUB_RECIPE.replace("[bo]", f"[{lang}]").replace("./merged", f"./out/{lang}")
        (tmp_path / f"{lang}.yaml").write_text(text.replace("alice/tiny-bo", f"alice/tiny-{lang}"))
    code, out, err = lrmerge(
        "run",
        tmp_path / "{language}.yaml",
        "--languages",
        "bo,ug",
        "--executor",
        "ray",
        "--ray-address",
        ray_cluster,
        "--format",
        "json",
    )
    assert code == 0, err
    runs = json.loads(out)["runs"]
    for lang, summary in zip(("bo", "ug"), runs, strict=True):
        files = hub_server.files(f"alice/tiny-{lang}")
        assert {"README.md", "model.safetensors", "merge_report.json"} <= set(files)
        assert summary["steps"]["push"]["repo_id"] == f"alice/tiny-{lang}"
        verified = summary["steps"]["merge"]["verified"]
        assert verified["tensors"] > 0 and verified["worker_node"]["ip"] in NODE_IPS
        state = json.loads((Path(summary["run_dir"]) / "state.json").read_text())
        assert state["steps"]["merge"]["result"]["verified"]["worker_node"] == verified["worker_node"]
    assert TOKEN not in out + err


class TamperingExecutor(RayExecutor):
    """A worker that reports one tensor hash wrong (as a node with other numerics would)."""

    def run(self, units):
        for outcome in super().run(units):
            name = sorted(outcome.result["sha256"])[0]
            outcome.result["sha256"][name] = "0" * 64
            yield outcome


@pytest.mark.slow
def test_a_worker_hash_mismatch_fails_loudly(ray_cluster, tmp_path):
    make_family(tmp_path / "models")
    path = tmp_path / "bo.yaml"
    path.write_text(LOCAL_RECIPE.replace("SLACK", "0.5").replace("LANG", "bo"))
    with TamperingExecutor(ray_cluster) as executor:
        [summary] = run_releases([load_recipe(path)], executor=executor, progress=False)
    assert "tensors of the merge made here differ from the worker's" in summary["error"]
    assert summary["steps"]["merge"]["status"] == "failed"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing published


@pytest.mark.slow
def test_a_task_no_node_can_hold_is_refused(ray_cluster, tmp_path):
    make_family(tmp_path / "models")
    (tmp_path / "bo.yaml").write_text(LOCAL_RECIPE.replace("SLACK", "0.5").replace("LANG", "bo"))
    code, _, err = lrmerge(
        "run", tmp_path / "bo.yaml", "--executor", "ray", "--ray-address", ray_cluster, "--gpus-per-task", "1"
    )
    assert code == 2 and "no node of the cluster has 1 CPU(s) and 1 GPU(s)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_cluster_is_found_through_ray_address(ray_cluster, tmp_path, monkeypatch):
    make_family(tmp_path / "models")
    (tmp_path / "bo.yaml").write_text(LOCAL_RECIPE.replace("SLACK", "0.5").replace("LANG", "bo"))
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    code, out, err = lrmerge("run", tmp_path / "bo.yaml", "--executor", "ray", "--format", "json")
    assert code == 0, err
    summary = json.loads(out)  # one recipe: its summary
    assert summary["steps"]["merge"]["verified"]["worker_node"]["node_id"] in live_node_ids(ray_cluster)
    assert (tmp_path / "out/bo/model.safetensors").exists()


@pytest.mark.slow
def test_a_head_that_dies_mid_run_is_one_line_after_what_finished(tmp_path):
    make_family(tmp_path / "models")
    make_tiny_task(tmp_path / "tasks")
    langs = ("bo", "ug", "mn")
    for lang in langs:
        (tmp_path / f"{lang}.yaml").write_text(LOCAL_RECIPE.replace("SLACK", "0.5").replace("LANG", lang))
    # bo is built in a moment; ug and mn are evaluated on the worker too (lm-eval takes seconds), so that
    # they are still running when the head dies, however fast the machine
    for lang in langs[1:]:
        with (tmp_path / f"{lang}.yaml").open("a") as recipe:
            recipe.write("eval: {tasks: [tiny_mc], include_path: ./tasks, limit: 2, backend: hf}\n")
    # Ray ends a driver that cannot reach the head after this many seconds (60 by default):
    # shorter here, so that the test waits less; lrmerge must have reported before
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_gcs_rpc_server_reconnect_timeout_s": "40"}
    with start_ray_cluster((1,)) as address:  # one task slot: the releases are built one after another
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lrmerge_hub",
                "run",
                *(tmp_path / f"{x}.yaml" for x in langs),
                "--executor",
                "ray",
                "--ray-address",
                address,
            ],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        watchdog = threading.Timer(300, driver.kill)
        watchdog.start()
        try:
            err, killed_at = [], None
            for line in driver.stderr:  # the first release is published here: the head dies
                err.append(line)
                if killed_at is None and "publishing here" in line:
                    kill_head(address)
                    killed_at = time.monotonic()
            out = driver.stdout.read()
            driver.wait()
        finally:
            watchdog.cancel()
            driver.kill()
    err_text = "".join(err)
    assert killed_at is not None, err_text
    errors = [line for line in err if line.startswith("Error: ")]
    # exit 2 with our line: lrmerge reported and left before Ray's own timeout ended it (exit 1)
    assert driver.returncode == 2 and len(errors) == 1 and errors[0] == err[-1], err_text
    assert time.monotonic() - killed_at < 40
    assert f"lost the Ray cluster at {address}" in errors[0] and "Traceback" not in err_text
    assert "Failed to connect to GCS" not in err_text
    finished = [x for x in langs if (tmp_path / "out" / x / "model.safetensors").exists()]
    lost = [x for x in langs if x not in finished]
    assert finished and lost, err_text
    assert all(f"output: {tmp_path / 'out' / x}" in out for x in finished)  # the summary of what finished
    assert all(f"{x}: lost the Ray cluster" in errors[0] for x in lost)  # and every release not built
    assert not [p for p in (tmp_path / "out").iterdir() if ".lrmerge-" in p.name]


def ray_processes() -> set[int]:
    return {
        int(pid)
        for pid in filter(str.isdigit, os.listdir("/proc"))
        if any(part in cmdline(pid) for part in ("/raylet", "gcs_server"))
    }


@pytest.mark.slow
def test_without_an_address_a_local_ray_instance_runs_the_release_and_stops(tmp_path, monkeypatch):
    make_family(tmp_path / "models")
    (tmp_path / "bo.yaml").write_text(LOCAL_RECIPE.replace("SLACK", "0.5").replace("LANG", "bo"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = ray_processes()
    code, out, err = lrmerge("run", tmp_path / "bo.yaml", "--executor", "ray")
    assert code == 0, err
    assert "Ray: a local Ray instance, 1 node(s)" in err
    report = json.loads((tmp_path / "out/bo/merge_report.json").read_text())
    assert report["models"][1]["params"]["slack"] == 0.5
    deadline = time.monotonic() + 30
    while ray_processes() - before:  # the instance it started is gone with it
        assert time.monotonic() < deadline, [cmdline(p) for p in ray_processes() - before]
        time.sleep(0.5)


# -- without a cluster ---------------------------------------------------------------------


def test_what_a_killed_publisher_left_beside_the_output_is_cleaned(tmp_path):
    make_family(tmp_path / "models")
    (tmp_path / "bo.yaml").write_text(LOCAL_RECIPE.replace("SLACK", "0.5").replace("LANG", "bo"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names a process that no longer runs, as a driver that Ray ended

    def leave(out: Path, pid: int) -> list[Path]:
        """What a driver killed while re-merging a cluster's result at out/bo leaves there."""
        out.mkdir(parents=True, exist_ok=True)
        staging = out / f".bo.lrmerge-verify-{pid}"
        paths = [staging, out / f".{staging.name}.lrmerge-lock", out / f".{staging.name}.lrmerge-tmp-{pid}"]
        for path in (paths[0], paths[2]):
            path.mkdir()
            (path / "model.safetensors").write_bytes(b"half")
        paths[1].write_text(f"{pid}\n")
        return paths

    out = tmp_path / "out"
    running = subprocess.Popen(["sleep", "300"])
    try:
        stale, live = leave(out, gone.pid), out / f".bo.lrmerge-verify-{running.pid}"
        live.mkdir()  # a publisher still running: left alone
        code, _, err = lrmerge("run", tmp_path / "bo.yaml")
        assert code == 0, err
        assert not [p for p in stale if p.exists() or p.is_symlink()] and live.is_dir()
        stale = leave(out, gone.pid)  # and the driver's own re-merge cleans them too
        recipe = load_recipe(tmp_path / "bo.yaml")
        merge_verified(
            recipe,
            local_sources(recipe),
            out / "bo",
            tensor_sha256(out / "bo"),
            device="cpu",
            files={},
            progress=False,
            overwrite=True,
        )  # the run's own output, published again
        assert not [p for p in stale if p.exists() or p.is_symlink()]
        assert sorted(p.name for p in out.iterdir()) == sorted(["bo", live.name])
    finally:
        running.kill()
        running.wait()


def test_several_recipes_run_here_one_after_another(tmp_path):
    make_family(tmp_path / "models")
    for lang, slack in (("bo", "0.5"), ("ug", "1")):
        (tmp_path / f"{lang}.yaml").write_text(LOCAL_RECIPE.replace("SLACK", slack).replace("LANG", lang))
    code, out, err = lrmerge("run", tmp_path / "bo.yaml", tmp_path / "ug.yaml", "--format", "json")
    assert code == 0, err
    runs = json.loads(out)["runs"]
    assert [Path(r["output"]).name for r in runs] == ["bo", "ug"]
    reports = [json.loads((tmp_path / f"out/{lang}/merge_report.json").read_text()) for lang in ("bo", "ug")]
    assert [r["models"][1]["params"]["slack"] for r in reports] == [0.5, 1]
    assert all("verified" not in r["steps"]["merge"] for r in runs)  # merged here: nothing to check


def test_one_failing_recipe_of_a_batch_does_not_stop_the_others(tmp_path):
    make_family(tmp_path / "models")
    (tmp_path / "bo.yaml").write_text(LOCAL_RECIPE.replace("SLACK", "0.5").replace("LANG", "bo"))
    (tmp_path / "ug.yaml").write_text(
        LOCAL_RECIPE.replace("SLACK", "0.5").replace("LANG", "ug").replace("./models/task", "./models/missing")
    )
    code, out, err = lrmerge("run", tmp_path / "ug.yaml", tmp_path / "bo.yaml", "--format", "json")
    assert code == 2 and "1 of 2 releases failed: ug:" in err and "Traceback" not in err
    assert (tmp_path / "out/bo/model.safetensors").exists() and not (tmp_path / "out/ug").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["{language}.yaml"], "pass --languages"),
        (["bo.yaml", "--languages", "bo,ug"], "--languages needs a RECIPE path with {language}"),
        (["{language}.yaml", "--languages", "bo,ug", "--push", "alice/one"], "put {language} in it"),
        (["{language}.yaml", "--languages", "bo,ug", "--out", "x"], "--out names one folder"),
        (["bo.yaml", "--push", "alice/m-{language}"], "every RECIPE path needs {language}"),
        (["bo.yaml", "--ray-address", "127.0.0.1:1"], "--ray-address needs --executor ray"),
        (["bo.yaml", "--executor", "ray", "--gpus-per-task", "-1"], "x>=0"),
    ],
)
def test_bad_batch_options_are_one_line_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = lrmerge("run", *args)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "address, why",
    [
        ("127.0.0.1:1", "127.0.0.1:1: nothing listens there (connection refused)"),
        ("127.0.0.1:99999", "the port must be a number from 1 to 65535"),
    ],
)
def test_an_address_where_no_cluster_answers_is_one_line_at_once(tmp_path, address, why):
    make_family(tmp_path / "models")
    (tmp_path / "bo.yaml").write_text(LOCAL_RECIPE.replace("SLACK", "0.5").replace("LANG", "bo"))
    started = time.monotonic()
    try:  # ray.init alone retries for minutes, deaf to signals
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "lrmerge_hub",
                "run",
                str(tmp_path / "bo.yaml"),
                "--executor",
                "ray",
                "--ray-address",
                address,
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=90,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"lrmerge run --ray-address {address} was still waiting after 90 s")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines == [lines[-1]] and lines[-1].startswith("Error: "), done.stderr
    assert why in lines[-1] and "--ray-address" in lines[-1]
    assert time.monotonic() - started < 60 and not (tmp_path / "out").exists()


# -- serving across GPUs and nodes: vLLM's own flags, parsed by vLLM's own parser ----------


@pytest.mark.slow
def test_serve_passes_vllm_parallelism_through_under_vllms_names():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from lrmerge_hub.serve import vllm as serve

    opts = serve.ServeOptions(
        tensor_parallel_size=8,
        extra_args=[
            "--pipeline-parallel-size",
            "2",
            "--data-parallel-size",
            "2",
            "--distributed-executor-backend",
            "ray",
        ],
    )
    target = serve.ModelTarget("org/merged-70b", "org/merged-70b", None, "org/merged-70b")
    cmd = serve.vllm_command(target, opts, host="127.0.0.1", port=8000, backend="gpu", memory_fraction=None)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:])
    assert (
        args.tensor_parallel_size,
        args.pipeline_parallel_size,
        args.data_parallel_size,
        args.distributed_executor_backend,
    ) == (8, 2, 2, "ray")
