"""Benchmark: a 6-point sweep on tiny models, `--executor local` against `--executor ray` on a
Ray cluster of two single-CPU nodes on this machine, side by side in one run.

    python bench/ray_sweep_bench.py [--repeat 3]   # prints the table, writes bench/results-ray-sweep.json

Each point merges a tiny synthetic family (lrmerge_hub.synth) and evaluates it with lm-eval's
hf backend on the tiny local task (limit 6): like a real sweep, evaluation dominates. Both
runs are the same `lrmerge sweep` command line as a subprocess, timed from start to exit,
alternating local and Ray `--repeat` times; the table gives each executor's median. The
cluster (`ray start --head --num-cpus 1` on 127.0.0.1 and a node joining it with
`ray start --address ... --num-cpus 1` on 127.0.0.2: tests/ray_support.py) is started once,
before the first run, and its start-up is reported apart. Every run must agree on every
score and on the best point, or the benchmark fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.ray_support import ray_cluster  # noqa: E402  (first: how Ray binds, before ray is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from lrmerge_hub.synth.tiny import make_family, make_tiny_task  # noqa: E402
from tests.test_end_to_end import SWEEP_RECIPE  # noqa: E402  (tiny_mc, hf, limit 6)

OUT = ROOT / "bench" / "out" / "ray-sweep"
GRID = "slack=0,0.25,0.5,1,2,4"


def sweep(executor: str, *extra: str) -> tuple[float, dict]:
    recipe = OUT / f"{executor}.yaml"
    recipe.write_text(SWEEP_RECIPE.replace("./best", f"./best-{executor}"))
    shutil.rmtree(OUT / f"best-{executor}", ignore_errors=True)
    shutil.rmtree(OUT / f"best-{executor}.sweep", ignore_errors=True)  # no point "merged earlier"
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lrmerge_hub",
            "sweep",
            str(recipe),
            "--grid",
            GRID,
            "--backend",
            "hf",
            "--executor",
            executor,
            *extra,
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{executor} sweep failed:\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of each executor, alternating (default 3)")
    repeat = ap.parse_args().repeat
    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "models").exists():
        make_family(OUT / "models")
        make_tiny_task(OUT / "tasks")
    scores = lambda t: [(p["name"], p["score"]) for p in t["points"]]  # noqa: E731
    times: dict[str, list[float]] = {"local": [], "ray": []}
    started = time.perf_counter()
    with ray_cluster((1, 1)) as address:
        head_s = time.perf_counter() - started
        for _ in range(repeat):
            local_s, local = sweep("local")
            ray_s, ray = sweep("ray", "--ray-address", address, "--cpus-per-task", "1")
            assert scores(local) == scores(ray) and local["best"] == ray["best"], "local and Ray disagree"
            times["local"].append(local_s)
            times["ray"].append(ray_s)
    local_s, ray_s = statistics.median(times["local"]), statistics.median(times["ray"])
    results = {
        "points": len(local["points"]),
        "cores": os.cpu_count(),
        "repeat": repeat,
        "local_s": [round(t, 1) for t in times["local"]],
        "ray_s": [round(t, 1) for t in times["ray"]],
        "local_median_s": round(local_s, 1),
        "ray_median_s": round(ray_s, 1),
        "cluster_start_s": round(head_s, 1),
        "speedup": round(local_s / ray_s, 2),
        "load_average_1m": round(os.getloadavg()[0], 1),
    }
    (ROOT / "bench" / "results-ray-sweep.json").write_text(json.dumps(results, indent=2) + "\n")
    runs = lambda ts: ", ".join(f"{t:.1f}" for t in ts)  # noqa: E731
    print(f"| executor | median wall time, {results['points']} points | runs (s) | speed-up |\n|---|---|---|---|")
    print(f"| local | {local_s:.1f} s | {runs(times['local'])} | 1.00x |")
    print(f"| ray (2 nodes x 1 CPU) | {ray_s:.1f} s | {runs(times['ray'])} | {results['speedup']:.2f}x |")
    print(
        f"Ray cluster start-up (not counted): {head_s:.1f} s; load average at the end: "
        f"{results['load_average_1m']} on {results['cores']} cores"
    )


if __name__ == "__main__":
    main()
