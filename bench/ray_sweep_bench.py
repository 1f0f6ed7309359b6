"""Benchmark: a 6-point sweep on tiny models, `--executor local` against `--executor ray` on a
Ray cluster of two single-CPU task slots on this machine, side by side in one run.

    python bench/ray_sweep_bench.py            # prints the table, writes bench/results-ray-sweep.json

Each point merges a tiny synthetic family (lrmerge_hub.synth) and evaluates it with lm-eval's
hf backend on the tiny local task (limit 6): like a real sweep, evaluation dominates. Both
runs are the same `lrmerge sweep` command line as a subprocess, timed from start to exit; the
Ray head (`ray start --head --num-cpus 2` on 127.0.0.1, tests/ray_support.py) is started
before its run and its start-up is reported apart. Both runs must agree on every score and
on the best point, or the benchmark fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.ray_support import ray_head  # noqa: E402  (first: how Ray binds, before ray is imported)

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from lrmerge_hub.synth import make_family, make_tiny_task  # noqa: E402
from tests.test_end_to_end import SWEEP_RECIPE  # noqa: E402  (tiny_mc, hf, limit 6)

OUT = ROOT / "bench" / "out" / "ray-sweep"
GRID = "slack=0,0.25,0.5,1,2,4"


def sweep(executor: str, *extra: str) -> tuple[float, dict]:
    recipe = OUT / f"{executor}.yaml"
    recipe.write_text(SWEEP_RECIPE.replace("./best", f"./best-{executor}"))
    shutil.rmtree(OUT / f"best-{executor}", ignore_errors=True)
    shutil.rmtree(OUT / f"best-{executor}.sweep", ignore_errors=True)  # no point "merged earlier"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lrmerge_hub", "sweep", str(recipe), "--grid", GRID,
                           "--backend", "hf", "--executor", executor, *extra, "--format", "json"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{executor} sweep failed:\n{done.stderr[-3000:]}")
    return seconds, json.loads(done.stdout)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "models").exists():
        make_family(OUT / "models")
        make_tiny_task(OUT / "tasks")
    local_s, local = sweep("local")
    started = time.perf_counter()
    with ray_head(num_cpus=2) as address:
        head_s = time.perf_counter() - started
        ray_s, ray = sweep("ray", "--ray-address", address, "--cpus-per-task", "1")
    scores = lambda t: [(p["name"], p["score"]) for p in t["points"]]  # noqa: E731
    assert scores(local) == scores(ray) and local["best"] == ray["best"], "local and Ray disagree"
    results = {"points": len(local["points"]), "cores": os.cpu_count(), "local_s": round(local_s, 1),
               "ray_s": round(ray_s, 1), "ray_head_start_s": round(head_s, 1),
               "speedup": round(local_s / ray_s, 2), "load_average_1m": round(os.getloadavg()[0], 1)}
    (ROOT / "bench" / "results-ray-sweep.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"| executor | wall time, {results['points']} points | speed-up |\n|---|---|---|")
    print(f"| local | {local_s:.1f} s | 1.00x |")
    print(f"| ray (2 x 1 CPU) | {ray_s:.1f} s | {results['speedup']:.2f}x |")
    print(f"Ray head start-up (not counted): {head_s:.1f} s; load average at the end: "
          f"{results['load_average_1m']} on {results['cores']} cores")


if __name__ == "__main__":
    main()
