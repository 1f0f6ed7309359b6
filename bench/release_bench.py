"""Benchmark: a release (merge and push) from Hub models over a limited link, three ways.

    python bench/release_bench.py                       # ~0.5B bf16 family, 100 MB/s each way
    python bench/release_bench.py --layers 2 --no-mergekit   # a quick small run

Everything runs on this machine: the Hub is tests/hub_server.py on 127.0.0.1 (in this
process), serving a synthetic (base, language, task) family (bench/merge_bench.py's, 1 GiB
input shards) through a shared link paced to `--bandwidth` each way, with `--latency` before
each answer. Each way runs as its own process, one after the other, from an empty HF cache:

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
step), bytes downloaded and uploaded (from the server's request log).
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    import merge_bench as mb

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-bytes", type=int, default=1 << 30, help="input shard size (Hub-like)")
    ap.add_argument("--out-shard", default="500MB", help="output shard size")
    ap.add_argument("--bandwidth", type=float, default=100, help="MB/s each way")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds before each answer")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument(
        "--ways",
        nargs="+",
        metavar="WORD",
        help="only the ways whose name starts with one of these "
        "(download alone always runs): mergekit download+merge streamed merge sweep",
    )
    ap.add_argument("--json", type=Path, default=BENCH / "release-results.json")
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

    fam = mb.synthesize(BENCH / "out" / "models" / mb.family_key(a, "bfloat16", a.layers), a, "bfloat16", a.layers)
    server = HubServer(port=int(os.environ["HF_ENDPOINT"].rsplit(":", 1)[1])).start()
    server.add_token(TOKEN, "bench")
    for role, folder in fam.items():
        server.seed(f"org/{role}", folder)
    input_bytes = sum(p.stat().st_size for f in fam.values() for p in f.glob("*.safetensors"))
    server.limit_bandwidth(a.bandwidth * 1e6, a.latency)
    mk_exe = None if a.no_mergekit or (a.ways and "mergekit" not in a.ways) else mb.ensure_mergekit()

    recipe = work / "recipe.yaml"
    recipe.write_text(
        "method: ties\nbase: org/base\nmodels:\n"
        "  - {model: org/language, role: language, weight: 1.0, density: 0.2}\n"
        "  - {model: org/task, role: task, weight: 1.0, density: 0.2}\n"
        "parameters: {lambda: 1.0, normalize: true}\nlanguages: [bo]\nlicense: apache-2.0\n"
        "dtype: bfloat16\noutput: out\n"
    )
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
                "-m",
                "lrmerge_hub",
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
        wall, rss = 0.0, 0
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
                rss = max(rss, int(res["peak_rss_bytes"]))
        log = server.log[mark:]
        rows.append(
            {
                "way": name,
                "wall_s": round(wall, 2),
                "peak_disk_bytes": disk.peak,
                "peak_rss_bytes": rss,
                "downloaded_bytes": sum(r.sent for r in log if r.method == "GET"),
                "uploaded_bytes": sum(r.received for r in log if r.method in ("PUT", "POST")),
            }
        )
        print(f"{name}: {wall:.1f} s", flush=True)
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
