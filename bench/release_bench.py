"""Benchmark: a release (merge and push) from Hub models over a limited link, three ways.

    python bench/release_bench.py                       # ~0.5B bf16 family, 100 MB/s each way
    python bench/release_bench.py --layers 2 --no-mergekit   # a quick small run
    python bench/release_bench.py --small --ways merge --trace   # 0.1B family, 60 MB/s; where the time goes

Everything runs on this machine: the Hub is tests/hub_server.py on 127.0.0.1 (in this
process), serving a synthetic (base, language, task) family (bench/merge_bench.py's, 1 GiB
input shards) through one link each way that all connections share, paced to `--bandwidth`
(a token bucket `--burst` deep), with `--latency` before each answer. A local merge of the
same family runs first (it compiles the kernels). Each way runs as its own process, one after
the other, from an empty HF cache:

- download: the time to download the inputs alone (`snapshot_download` of the three repos);
- mergekit: mergekit's way: download the repos, `mergekit-yaml` (TIES), upload the folder
  (`upload_folder`, one commit); mergekit 0.1.5 in bench/.venv-mergekit (made by merge_bench.py);
- download+merge: `lrmerge run --download` (download to the cache, merge, push);
- streamed: `lrmerge run --no-keep` (inputs by range requests, each output shard uploaded
  as it finishes and removed, one commit);
- merge and sweep: the merge phase alone, streamed: `lrmerge merge` (no push), and a 4-point
  sweep (`run_sweep` over four densities, its evaluation a stand-in that scores nothing), which
  reads the inputs once for the four points.

Printed per way: wall time (and as a multiple of the download alone), peak disk (the way's
HF cache and output, sampled every 50 ms), peak RSS (wait4; mergekit's way: its largest
step), bytes downloaded and uploaded (from the server's request log), CPU time (the way's
processes, and the test Hub's in this process). `--trace` adds, for the download alone and the
streamed merge, what the server's request log and the merge loop's waits say: how busy the
link was, the requests in flight, their sizes and times, and how long the loop waited.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

TOKEN = "hf_bench-token-local-only"

DOWNLOAD = """
import sys
from huggingface_hub import snapshot_download
for repo in sys.argv[2:]:
    print(snapshot_download(repo, allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt"]))
"""
SWEEP = """
import sys
from lrmerge_hub.hub import sources as hub_sources
from lrmerge_hub.recipe import load_recipe
from lrmerge_hub.sweep import parse_grid, run_sweep
recipe = load_recipe(sys.argv[1])
run_sweep(recipe, parse_grid(["density=0.1,0.2,0.3,0.4"]), sources=hub_sources.stream_sources(recipe),
          output=recipe.output, evaluate=lambda folder: [{"task": "none", "metric": "acc", "value": 0.0}],
          device="cpu", progress=False)
"""
# `lrmerge merge` with each streamed model's waits recorded: every populate() (the merge loop
# asking for a tensor's bytes) as (model, tensor, start, end) on time.monotonic(), the clock
# the test Hub stamps its requests with.
TRACED = """
import json, sys, time
began = time.monotonic()
from lrmerge_hub.hub import stream
waits = []
populate = stream.HubModel.populate
def traced(self, name):
    start = time.monotonic()
    populate(self, name)
    waits.append((self.label, name, start, time.monotonic()))
stream.HubModel.populate = traced
from lrmerge_hub.cli import main
try:
    main(sys.argv[2:], prog_name="lrmerge", standalone_mode=False)
finally:
    with open(sys.argv[1], "w") as f:
        json.dump({"began": began, "ended": time.monotonic(), "waits": waits}, f)
"""
UPLOAD = """
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo(sys.argv[2], exist_ok=True)
api.upload_folder(repo_id=sys.argv[2], folder_path=sys.argv[1], commit_message="mergekit output")
"""


def disk_usage(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class PeakDisk:
    """Samples the bytes under a folder every 50 ms in a thread; `peak` is the largest seen."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_usage(self.folder))
            self._stop.wait(0.05)

    def __enter__(self) -> "PeakDisk":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_usage(self.folder))


# --small: a 0.1B-parameter family (3 x 200 MB in 100 MB shards) over a 60 MB/s link
SMALL = dict(layers=6, hidden=1024, intermediate=2304, heads=16, vocab=16000, shard_bytes=100_000_000, bandwidth=60)


def main() -> None:
    import merge_bench as mb

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help=f"defaults for a small family: {SMALL}")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-bytes", type=int, default=1 << 30, help="input shard size (Hub-like)")
    ap.add_argument("--out-shard", default="500MB", help="output shard size")
    ap.add_argument("--bandwidth", type=float, default=100, help="MB/s each way")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds before each answer")
    ap.add_argument(
        "--burst",
        type=float,
        default=0,
        help="MB the link may send at once after a pause (its token bucket's depth; 0: never faster than its rate)",
    )
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument(
        "--ways",
        nargs="+",
        metavar="WORD",
        help="only the ways whose name starts with one of these "
        "(download alone always runs): mergekit download+merge streamed merge sweep",
    )
    ap.add_argument(
        "--trace",
        action="store_true",
        help="record the streamed merge's requests and waits and print where its time went",
    )
    ap.add_argument("--json", type=Path, default=BENCH / "release-results.json")
    if "--small" in sys.argv[1:]:
        ap.set_defaults(**SMALL)
    a = ap.parse_args()
    a.json = a.json.absolute()  # each way runs in its own folder

    work = Path(tempfile.mkdtemp(prefix="release-bench-", dir=BENCH / "out" if (BENCH / "out").is_dir() else None))
    os.environ.update(
        HF_ENDPOINT=f"http://127.0.0.1:{mb_free_port()}",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1",
        HF_TOKEN=TOKEN,
    )
    from tests.hub_server import HubServer

    key = mb.family_key(a, "bfloat16", a.layers) + ("" if a.shard_bytes == 1 << 30 else f"-s{a.shard_bytes}")
    fam = mb.synthesize(BENCH / "out" / "models" / key, a, "bfloat16", a.layers)
    server = HubServer(port=int(os.environ["HF_ENDPOINT"].rsplit(":", 1)[1])).start()
    server.add_token(TOKEN, "bench")
    for role, folder in fam.items():
        server.seed(f"org/{role}", folder)
    input_bytes = sum(p.stat().st_size for f in fam.values() for p in f.glob("*.safetensors"))
    server.limit_bandwidth(a.bandwidth * 1e6, a.latency, a.burst * 1e6)
    mk_exe = None if a.no_mergekit or (a.ways and "mergekit" not in a.ways) else mb.ensure_mergekit()

    recipe = work / "recipe.yaml"
    ties = (
        "method: ties\nbase: {base}\nmodels:\n"
        "  - {{model: {language}, role: language, weight: 1.0, density: 0.2}}\n"
        "  - {{model: {task}, role: task, weight: 1.0, density: 0.2}}\n"
        "parameters: {{lambda: 1.0, normalize: true}}\nlanguages: [bo]\nlicense: apache-2.0\n"
        "dtype: bfloat16\noutput: out\n"
    )
    recipe.write_text(ties.format(base="org/base", language="org/language", task="org/task"))
    # The same merge from the local folders first: it compiles the kernels (numba caches them
    # beside the code), which would otherwise count against the first way that merges.
    local = work / "local"
    local.mkdir()
    (local / "recipe.yaml").write_text(ties.format(**{k: str(v) for k, v in fam.items()}))
    os.chdir(local)
    quiet = ["--device", "cpu", "--format", "quiet"]
    res = mb.measure([sys.executable, "-m", "lrmerge_hub", "merge", "recipe.yaml", *quiet])
    print(f"local merge (inputs on disk, kernels compiled if needed): {res['wall_s']:.1f} s", flush=True)
    shutil.rmtree(local)
    lrmerge = [
        sys.executable,
        "-m",
        "lrmerge_hub",
        "run",
        str(recipe),
        "--skip-eval",
        "--device",
        "cpu",
        "--shard-size",
        a.out_shard,
        "--format",
        "quiet",
    ]
    repos = ["org/base", "org/language", "org/task"]
    ways = {
        "download": [[sys.executable, "-c", DOWNLOAD, "x", *repos]],
        "download+merge (lrmerge --download)": [lrmerge + ["--download", "--push", "bench/b"]],
        "streamed (lrmerge --no-keep)": [lrmerge + ["--no-keep", "--push", "bench/c"]],
        "merge (streamed, no push)": [
            [
                sys.executable,
                *(["-c", TRACED, str(work / "waits.json")] if a.trace else ["-m", "lrmerge_hub"]),
                "merge",
                str(recipe),
                "--device",
                "cpu",
                "--shard-size",
                a.out_shard,
                "--format",
                "quiet",
            ]
        ],
        "sweep (streamed, 4 points, no push)": [[sys.executable, "-c", SWEEP, str(recipe)]],
    }
    if mk_exe:
        config = work / "mergekit.yaml"
        ways["mergekit (download, merge, upload)"] = [
            [sys.executable, "-c", DOWNLOAD, "x", *repos],
            [str(mk_exe), str(config), "OUT"],
            [sys.executable, "-c", UPLOAD, "OUT", "bench/a"],
        ]
    rows = []
    for name, steps in ways.items():
        if a.ways and name != "download" and not name.startswith(tuple(a.ways)):
            continue
        folder = work / name.split()[0]
        folder.mkdir()
        os.environ["HF_HOME"] = str(folder / "hf-home")
        os.environ.pop("HF_HUB_CACHE", None)
        shutil.copy(recipe, folder / "recipe.yaml")
        mark = len(server.log)
        wall, rss, cpu = 0.0, 0, 0.0
        server_cpu = resource.getrusage(resource.RUSAGE_SELF)
        with PeakDisk(folder) as disk:
            for cmd in steps:
                cmd = [
                    c.replace("OUT", str(folder / "out")).replace(str(recipe), str(folder / "recipe.yaml")) for c in cmd
                ]
                if cmd[0] == str(mk_exe):
                    write_mergekit_config(config, folder / "hf-home")
                os.chdir(folder)
                res = mb.measure(cmd)
                wall += res["wall_s"]
                cpu += res["cpu_s"]
                rss = max(rss, int(res["peak_rss_bytes"]))
        log = server.log[mark:]
        ru = resource.getrusage(resource.RUSAGE_SELF)
        server_cpu_s = ru.ru_utime + ru.ru_stime - server_cpu.ru_utime - server_cpu.ru_stime
        rows.append(
            {
                "way": name,
                "wall_s": round(wall, 2),
                "cpu_s": round(cpu, 2),  # the way's processes
                "server_cpu_s": round(server_cpu_s, 2),  # this process: the test Hub (and the disk sampler)
                "peak_disk_bytes": disk.peak,
                "peak_rss_bytes": rss,
                "downloaded_bytes": sum(r.sent for r in log if r.method == "GET"),
                "uploaded_bytes": sum(r.received for r in log if r.method in ("PUT", "POST")),
            }
        )
        print(f"{name}: {wall:.1f} s, CPU {cpu:.1f} s (test Hub {server_cpu_s:.1f} s)", flush=True)
        if a.trace and name.startswith(("download", "merge")):
            trace = json.loads((work / "waits.json").read_text()) if name.startswith("merge") else None
            print(where_time_went(log, trace, a.bandwidth * 1e6), flush=True)
        server.lfs_objects.clear()  # each way uploads its output afresh
        shutil.rmtree(folder, ignore_errors=True)
    server.stop()
    base = rows[0]["wall_s"]
    print(
        f"\n{input_bytes / 1e9:.2f} GB of inputs ({a.layers} layers, bf16), link {a.bandwidth:.0f} MB/s each way, "
        f"{a.latency * 1000:.0f} ms latency, output shards {a.out_shard}\n"
    )
    print("| way | wall s | x download | peak disk GB | peak RSS GB | downloaded GB | uploaded GB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['way']} | {r['wall_s']:.1f} | {r['wall_s'] / base:.2f} | {r['peak_disk_bytes'] / 1e9:.2f} | "
            f"{r['peak_rss_bytes'] / 1e9:.2f} | {r['downloaded_bytes'] / 1e9:.2f} | {r['uploaded_bytes'] / 1e9:.2f} |"
        )
    a.json.write_text(
        json.dumps(
            {
                "machine": mb.machine(),
                "args": {k: str(v) for k, v in vars(a).items()},
                "input_bytes": input_bytes,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(work, ignore_errors=True)


def where_time_went(log: list, trace: dict | None, rate: float) -> str:
    """What the server's log (requests with their times) and the merge loop's waits say about
    a streamed merge: how busy the link was, how many requests were in flight, their sizes and
    times, in which order each model's bytes arrived, and how long the loop waited for them."""
    import statistics

    ranges = [r for r in log if r.method == "GET" and "/resolve/" in r.path and r.sent > 1 << 20 and r.ended]
    if not ranges:
        return "  (no downloads over 1 MiB)"
    t0 = min(r.began for r in log)
    span = max(r.ended for r in ranges) - t0
    busy = sum(r.ended - r.began for r in ranges)
    # time with no weight request in flight: the link idle for want of a request
    idle, until = 0.0, t0
    for r in sorted(ranges, key=lambda r: r.began):
        idle += max(0.0, r.began - until)
        until = max(until, r.ended)
    sizes = [r.sent / 2**20 for r in ranges]
    secs = [r.ended - r.began for r in ranges]
    lines = [
        f"  {len(ranges)} downloads over 1 MiB, {sum(r.sent for r in ranges) / 1e6:.0f} MB in {span:.1f} s from the "
        f"first request: {sum(r.sent for r in ranges) / span / rate:.0%} of the link; {busy / span:.1f} in flight "
        f"on average; no request in flight for {idle:.1f} s",
        f"  request MiB: median {statistics.median(sizes):.1f}, min {min(sizes):.1f}, max {max(sizes):.1f}; "
        f"seconds each: median {statistics.median(secs):.2f}, max {max(secs):.2f}",
    ]
    # MB/s in each second from the first request, each request's bytes spread over its time
    per_second = [0.0] * (int(span) + 1)
    for r in ranges:
        a, b = r.began - t0, r.ended - t0
        for sec in range(int(a), int(b) + 1):
            per_second[sec] += r.sent * (min(b, sec + 1) - max(a, sec)) / max(b - a, 1e-9) / 1e6
    lines.append("  MB/s each second: " + " ".join(f"{x:.0f}" for x in per_second))
    for repo in sorted({r.path.split("/resolve/")[0] for r in ranges}):
        mine = [r for r in ranges if r.path.startswith(repo + "/")]
        lines.append(
            f"  {repo}: {len(mine)} requests, first began {min(r.began for r in mine) - t0:.1f} s, "
            f"last ended {max(r.ended for r in mine) - t0:.1f} s"
        )
    if trace:
        waits = trace["waits"]
        lines.append(
            f"  merge process: started {trace['began'] - t0:.1f} s, first weight request "
            f"{min(r.began for r in ranges) - t0:.1f} s, last byte {max(r.ended for r in ranges) - t0:.1f} s, "
            f"process done {trace['ended'] - t0:.1f} s"
        )
        first = min(w[2] for w in waits)
        waited = sum(w[3] - w[2] for w in waits)
        by_model: dict[str, float] = {}
        for label, _, start, end in waits:
            by_model[label] = by_model.get(label, 0.0) + end - start
        lines.append(
            f"  merge loop: first tensor asked for at {first - t0:.1f} s, last one served at "
            f"{max(w[3] for w in waits) - t0:.1f} s; waited {waited:.1f} s for bytes ("
            + ", ".join(f"{k} {v:.1f}" for k, v in by_model.items())
            + ")"
        )
    return "\n".join(lines)


def mb_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_mergekit_config(config: Path, hf_home: Path) -> None:
    """mergekit's TIES config on the snapshots the download step put in this way's cache."""
    import yaml

    snap = {
        r: next((hf_home / "hub" / f"models--org--{r}" / "snapshots").iterdir()) for r in ("base", "language", "task")
    }
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(snap["base"]),
                "models": [
                    {"model": str(snap[r]), "parameters": {"weight": 1.0, "density": 0.2}} for r in ("language", "task")
                ],
                "parameters": {"normalize": True, "lambda": 1.0},
                "dtype": "float32",
                "out_dtype": "bfloat16",
            }
        )
    )


if __name__ == "__main__":
    main()
