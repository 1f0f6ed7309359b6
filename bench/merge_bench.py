"""Benchmark: lrmerge-hub's TIES merge against mergekit's, on synthetic Llama-shaped checkpoints.

    python bench/merge_bench.py                    # ~0.5B bf16: ours vs mergekit, 3 rounds
    python bench/merge_bench.py --layers 24 --rounds 1 --no-mergekit   # a larger size, ours only
    python bench/merge_bench.py --table bench/results.json bench/results-1.4b.json  # the table in docs/engine.md
    python bench/merge_bench.py --methods      # every method vs mergekit at a small size (~3 min)
    python bench/merge_bench.py --methods --only linear task_arithmetic   # those at ~0.5B, with the I/O floor

What it does, all on this machine, nothing downloaded but mergekit from the package index:
1. synthesizes a (base, language, task) family of the chosen size with random weights, sharded
   like Hub checkpoints, cached under bench/out/models/<shape>/;
2. creates bench/.venv-mergekit with mergekit on first run (system torch is reused);
3. measures the I/O floor: one process that reads every input byte and writes an output of
   the merged model's size;
4. runs, alternating and each as its own process, `python -m lrmerge_hub merge` (ties, and
   slack_ties) and `mergekit-yaml` (ties, computing in float32 like ours), several rounds;
   wall time, CPU time and peak RSS come from the OS for each child (wait4);
5. compares the outputs tensor by tensor (max |ours - mergekit| / max |mergekit|), on the
   benchmark's own size and on a small float32-input family where float rounding is the only
   expected difference;
6. prints a table and writes the numbers as JSON (bench/results.json by default).

Page cache: before every measured run the benchmark removes that run's previous output,
syncs (no writeback left from the run before), drops the page cache where it may (root on
Linux) and reads every input once, so every run (ours, mergekit, the I/O floor) starts with
the inputs cached and little else; the floor is measured the same way, which is what makes
the ratio to it meaningful. Without this, whichever run follows mergekit (5 GB of RSS, 1 GB
written) pays for re-reading evicted inputs, for mergekit's writeback and for reclaiming
memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"  # the CPU build pip finds locally; never a multi-GB CUDA build

sys.path.insert(0, str(REPO))


# -- synthetic checkpoints ---------------------------------------------------------------------


def family_key(a: argparse.Namespace, dtype: str, layers: int) -> str:
    return f"h{a.hidden}-i{a.intermediate}-l{layers}-v{a.vocab}-{dtype}"


def synthesize(root: Path, a: argparse.Namespace, dtype: str, layers: int) -> dict[str, Path]:
    """Write base, language and task checkpoints (random, Llama-shaped, sharded) unless cached.

    Every tensor is regenerated from a seed per (tensor, role), so no model is ever held in
    memory: the base tensor, then base + a small random task vector for the other roles.
    """
    import torch

    from lrmerge_hub.synth.tiny import DTYPE, llama_config, llama_shapes, make_tokenizer, write_checkpoint

    paths = {role: root / role for role in ("base", "language", "task")}
    if (root / "done").exists():
        return paths
    cfg = llama_config(
        hidden=a.hidden,
        intermediate=a.intermediate,
        layers=layers,
        heads=a.heads,
        kv_heads=a.heads,
        vocab=a.vocab,
        tie_embeddings=False,
        dtype=dtype,
    )
    shapes = list(llama_shapes(cfg))
    scale = {"language": 0.03, "task": 0.02}

    def tensors(role: str):
        for idx, (name, shape) in enumerate(shapes):
            g = torch.Generator().manual_seed(idx)
            if name.endswith("norm.weight"):
                t = 1.0 + 0.1 * torch.randn(shape, generator=g)
            else:
                t = torch.randn(shape, generator=g).mul_(shape[-1] ** -0.5)
            if role != "base":
                g.manual_seed(idx * 7 + (1 if role == "language" else 2) + 10**6)
                t.add_(torch.randn(shape, generator=g).mul_(scale[role] * t.abs().mean()))
            yield name, t.to(DTYPE[dtype])

    for role, path in paths.items():
        print(f"synthesizing {role} ({layers} layers, {dtype}) in {path}", flush=True)
        make_tokenizer(path, chat_template=role == "task")
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        write_checkpoint(path, tensors(role), shard_bytes=a.shard_bytes)
    (root / "done").write_text("ok\n")
    return paths


# -- the tools ---------------------------------------------------------------------------------


def ensure_mergekit() -> Path:
    """bench/.venv-mergekit with mergekit (system site-packages, so torch is not reinstalled)."""
    if os.environ.get("MERGEKIT_YAML"):  # a mergekit-yaml installed elsewhere (bench/gpu_check.sh)
        return Path(os.environ["MERGEKIT_YAML"])
    venv = BENCH / ".venv-mergekit"
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        print(f"creating {venv} with mergekit {MERGEKIT_VERSION} (first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"mergekit=={MERGEKIT_VERSION}", TORCH_PIN],
            check=True,
        )
    return exe


def write_recipes(work: Path, fam: dict[str, Path], density: float, out_dtype: str, mk_dtype: str) -> dict[str, Path]:
    """Our recipe (ties and slack_ties) and mergekit's config for the same TIES merge."""
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for method in ("ties", "slack_ties"):
        models = [
            {"model": str(fam["language"]), "role": "language", "weight": 1.0, "density": density},
            {"model": str(fam["task"]), "role": "task", "weight": 1.0, "density": density},
        ]
        if method == "slack_ties":
            models[1]["slack"] = 0.5
        recipe = {
            "method": method,
            "base": str(fam["base"]),
            "models": models,
            "parameters": {"lambda": 1.0, "normalize": True},
            "languages": ["bo"],
            "license": "apache-2.0",
            "dtype": out_dtype,
            "output": str(work / "ours"),
        }
        files[method] = work / f"{method}.yaml"
        files[method].write_text(yaml.safe_dump(recipe, sort_keys=False))
    mk = {
        "merge_method": "ties",
        "base_model": str(fam["base"]),
        "models": [
            {"model": str(fam[r]), "parameters": {"weight": 1.0, "density": density}} for r in ("language", "task")
        ],
        "parameters": {"normalize": True, "lambda": 1.0},
        "dtype": mk_dtype,
        "out_dtype": out_dtype,
    }
    files["mergekit"] = work / "mergekit.yaml"
    files["mergekit"].write_text(yaml.safe_dump(mk, sort_keys=False))
    return files


# Linux keeps a process's peak RSS across exec, and a child started by a big parent inherits
# the parent's peak; so each command starts from this small launcher, whose own child is
# measured with wait4.
LAUNCHER = r"""
import json, os, subprocess, sys, time
cmd = json.loads(sys.argv[1])
start = time.perf_counter()
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
out = proc.stdout.read()
_, status, ru = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
code = os.waitstatus_to_exitcode(status)
if code:
    sys.stderr.write(out.decode(errors="replace")[-4000:])
print(json.dumps({"code": code, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "peak_rss_bytes": ru.ru_maxrss * 1024}))
"""


def settle(fam: dict[str, Path], out: Path) -> None:
    """The same start for every run: its previous output gone, no writeback left from the
    run before (sync), the page cache holding the inputs and little else (dropped, where
    the benchmark may: root on Linux; then every input is read back)."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        pass
    buf = bytearray(64 << 20)
    for folder in fam.values():
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as src:
                while src.readinto(buf):
                    pass


def measure(cmd: list[str]) -> dict[str, float]:
    """Run one child process; its wall time, CPU time (user + system) and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(cmd)], env=env, capture_output=True, text=True)
    if done.returncode or not done.stdout.strip():
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    if res.pop("code"):
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return res


# what `lrmerge merge` pays before it reads a byte: the interpreter and our imports, and torch
# for the methods that call it (the reductions of sce, the spherical methods, arcee_fusion,
# karcher; the kernels of the others do not import it)
START_UP = "import numba, lrmerge_hub.cli, lrmerge_hub.merge.engine, lrmerge_hub.merge.kernels"
START_UP_TORCH = "import torch; " + START_UP


def ours_cmd(recipe: Path, out: Path, device: str = "cpu", engine: str = "kernels") -> list[str]:
    return [
        sys.executable,
        "-m",
        "lrmerge_hub",
        "merge",
        str(recipe),
        "--out",
        str(out),
        "--device",
        device,
        "--engine",
        engine,
        "--overwrite",
        "--format",
        "quiet",
    ]


def mergekit_cmd(exe: Path, config: Path, out: Path, cuda: bool = False) -> list[str]:
    return [str(exe), str(config), str(out), *(["--cuda"] if cuda else [])]


def identical(a: Path, b: Path) -> bool:
    """Whether two merged folders hold the same tensors, bit for bit."""
    from lrmerge_hub.merge.st_io import SafetensorsModel

    ma, mb = SafetensorsModel(a, "a"), SafetensorsModel(b, "b")
    return set(ma.tensors) == set(mb.tensors) and all(
        ma.tensors[n].spec == mb.tensors[n].spec and ma.array(n).tobytes() == mb.array(n).tobytes() for n in ma.tensors
    )


def io_floor_cmd(fam: dict[str, Path], out: Path) -> list[str]:
    """A child that reads every input shard once and writes an output of the merged size the
    way the merge writes it (st_io.ShardedWriter): O_DIRECT from an aligned buffer where the
    file system takes it, the last block padded and the file cut back, then fsync."""
    code = r"""
import mmap, os, sys
from pathlib import Path
ins, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
buf = mmap.mmap(-1, 64 << 20)  # page-aligned, as O_DIRECT asks
view = memoryview(buf)
out.mkdir(parents=True, exist_ok=True)
for folder in ins:
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as src:
            while src.readinto(buf):
                pass
base = ins[0]
for f in sorted(base.glob("*.safetensors")):  # the output has the base's size
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        dst = os.open(out / f.name, flags | os.O_DIRECT, 0o644)
    except OSError:
        dst = os.open(out / f.name, flags, 0o644)
    with open(f, "rb", buffering=0) as src:
        while (n := src.readinto(buf)):
            os.write(dst, view[: -(-n // 4096) * 4096])
    os.ftruncate(dst, f.stat().st_size)
    os.fsync(dst)
    os.close(dst)
"""
    return [sys.executable, "-c", code, str(fam["base"]), str(fam["language"]), str(fam["task"]), str(out)]


# -- agreement ---------------------------------------------------------------------------------


def agreement(ours: Path, theirs: Path, fam: dict[str, Path] | None = None, density: float | None = None) -> dict:
    """Per tensor max |a - b| / max |b|, worst over tensors, and the fraction of entries that
    differ at all. With the inputs (fam, density): also which differing entries sit where a
    model's |delta| equals its trim threshold (the k-th largest magnitude). Which of several
    equal magnitudes at the cut survive is implementation-defined (the spec; mergekit's
    argsort leaves it unspecified), and a different choice changes only those entries; every
    other entry must agree to float rounding."""
    import torch

    from lrmerge_hub.merge.trim import trim_count
    from lrmerge_hub.merge.st_io import SafetensorsModel

    a, b = SafetensorsModel(ours, "ours"), SafetensorsModel(theirs, "mergekit")
    inputs = {r: SafetensorsModel(p, r) for r, p in fam.items()} if fam else None
    worst, worst_name, worst_other, differing, at_cut, total = 0.0, "", 0.0, 0, 0, 0
    for name in a.tensors:
        x, y = a.get(name).float().reshape(-1), b.get(name).float().reshape(-1)
        scale = y.abs().max().clamp_min(1e-30)
        err = float((x - y).abs().max() / scale)
        diff = x != y
        differing += int(diff.sum())
        total += x.numel()
        if err > worst:
            worst, worst_name = err, name
        if inputs is not None and diff.any():
            base = inputs["base"].get(name).float().reshape(-1)
            tied = torch.zeros_like(diff)
            for role in ("language", "task"):
                mag = (inputs[role].get(name).float().reshape(-1) - base).abs()
                k = trim_count(mag.numel(), density)
                if k < mag.numel():
                    tied |= mag == torch.kthvalue(mag, mag.numel() - k + 1).values
            at_cut += int((diff & tied).sum())
            other = diff & ~tied
            if other.any():
                worst_other = max(worst_other, float((x - y)[other].abs().max() / scale))
    out = {
        "max_rel_error": worst,
        "worst_tensor": worst_name,
        "differing_fraction": differing / total,
        "differing_entries": differing,
        "tensors": len(a.tensors),
    }
    if inputs is not None:
        out.update({"differing_at_tied_cut": at_cut, "max_rel_error_elsewhere": worst_other})
    return out


# -- every method against mergekit (--methods) ------------------------------------------------

# method -> (our per-model params, our global params, roles merged, base given); mergekit gets
# the same names and values (ours are mergekit's), and our defaults equal its defaults
METHOD_CASES = {
    "linear": ({"weight": 1.0}, {}, ("language", "task"), False),
    "task_arithmetic": ({"weight": 0.7}, {}, ("language", "task"), True),
    "ties": ({"weight": 1.0, "density": 0.2}, {}, ("language", "task"), True),
    "dare_linear": ({"weight": 1.0, "density": 0.3}, {}, ("language", "task"), True),
    "dare_ties": ({"weight": 1.0, "density": 0.3}, {}, ("language", "task"), True),
    "della": ({"weight": 1.0, "density": 0.3, "epsilon": 0.1}, {}, ("language", "task"), True),
    "della_linear": ({"weight": 1.0, "density": 0.3, "epsilon": 0.1}, {}, ("language", "task"), True),
    "breadcrumbs": ({"weight": 1.0, "density": 0.3, "gamma": 0.01}, {}, ("language", "task"), True),
    "breadcrumbs_ties": ({"weight": 1.0, "density": 0.3, "gamma": 0.01}, {}, ("language", "task"), True),
    "sce": ({}, {"select_topk": 0.3}, ("language", "task"), True),
    "slerp": ({}, {"t": 0.3}, ("language",), True),
    "nuslerp": ({"weight": 1.0}, {}, ("language", "task"), True),
    "multislerp": ({"weight": 1.0}, {}, ("language", "task"), True),
    "karcher": ({}, {}, ("language", "task"), False),
    "model_stock": ({}, {}, ("language", "task"), True),
    "nearswap": ({}, {"t": 0.001}, ("language",), True),
    "passthrough": ({}, {}, ("language",), False),
    "arcee_fusion": ({}, {}, ("task",), True),
    "ram": ({}, {}, ("language", "task"), True),
    "ramplus_tl": ({}, {}, ("language", "task"), True),
    "layer_swap": ({}, {"bottom": 2, "top": 2, "blend": 1}, ("language", "task"), False),  # ours only
}


def method_configs(work: Path, fam: dict[str, Path], method: str, out_dtype: str, mk_dtype: str) -> tuple[Path, Path]:
    """Our recipe and mergekit's config for one method of METHOD_CASES."""
    import yaml

    per_model, params, roles, with_base = METHOD_CASES[method]
    work.mkdir(parents=True, exist_ok=True)
    ours = {
        "method": method,
        "models": [{"model": str(fam[r]), "role": r, **per_model} for r in roles],
        "dtype": out_dtype,
        "output": str(work / f"ours-{method}"),
    }
    mk = {
        "merge_method": method,
        "models": [{"model": str(fam[r]), **({"parameters": per_model} if per_model else {})} for r in roles],
        "dtype": mk_dtype,
        "out_dtype": out_dtype,
    }
    if with_base:
        ours["base"] = mk["base_model"] = str(fam["base"])
    if params:
        ours["parameters"] = mk["parameters"] = dict(params)
    paths = work / f"{method}.yaml", work / f"{method}-mergekit.yaml"
    paths[0].write_text(yaml.safe_dump(ours, sort_keys=False))
    paths[1].write_text(yaml.safe_dump(mk, sort_keys=False))
    return paths


def run_methods(a: argparse.Namespace, mk_exe: Path | None) -> dict:
    """Every method of METHOD_CASES, ours and mergekit's, once each at the benchmark's first
    size; and, for the deterministic ones, agreement on a float32-input family."""
    from lrmerge_hub.merge.methods import METHODS
    from lrmerge_hub.recipe.mergekit import MERGEKIT_ONLY_IN_OURS

    layers = a.layers[0]
    key = family_key(a, a.dtype, layers)
    fam = synthesize(BENCH / "out" / "models" / key, a, a.dtype, layers)
    work = BENCH / "out" / "methods" / key
    small = argparse.Namespace(**{**vars(a), "shard_bytes": 1 << 30})
    exact_key = family_key(small, "float32", a.exact_layers)
    exact_fam = synthesize(BENCH / "out" / "models" / exact_key, small, "float32", a.exact_layers)
    rows = {}
    warm_up = method_configs(work, fam, "ties", a.dtype, a.mergekit_dtype)[0]
    measure(ours_cmd(warm_up, work / "warm-up"))  # numba's on-disk cache, the page cache
    from lrmerge_hub.merge.kernels import FAST_PATHS

    for method in [m for m in a.only or METHOD_CASES if m in FAST_PATHS]:  # and their kernels (compiled once)
        measure(ours_cmd(method_configs(work, fam, method, a.dtype, a.mergekit_dtype)[0], work / "warm-up"))
    settle(fam, work / "io-floor")
    floor = measure(io_floor_cmd(fam, work / "io-floor"))
    print(f"  {'I/O floor':18s} wall {floor['wall_s']:6.2f} s  cpu {floor['cpu_s']:6.2f} s", flush=True)
    start_up, start_up_torch = (measure([sys.executable, "-c", code]) for code in (START_UP, START_UP_TORCH))
    for name, m in (("start-up", start_up), ("with torch", start_up_torch)):
        print(f"  {name:18s} wall {m['wall_s']:6.2f} s  cpu {m['cpu_s']:6.2f} s", flush=True)
    earlier = json.loads(a.mergekit_from.read_text())["methods"] if a.mergekit_from else None
    for method in a.only or METHOD_CASES:
        ours_yaml, mk_yaml = method_configs(work, fam, method, a.dtype, a.mergekit_dtype)
        row = {}
        in_mergekit = method not in MERGEKIT_ONLY_IN_OURS and (mk_exe is not None or earlier is not None)
        for who, cmd, out in (("ours", ours_cmd, work / f"ours-{method}"), ("mergekit", None, work / f"mk-{method}")):
            if cmd is None and not in_mergekit:
                continue
            if cmd is None and earlier is not None:  # mergekit's row of an earlier run (--mergekit-from)
                if "mergekit" in earlier.get(method, {}):
                    row[who] = earlier[method]["mergekit"]
                continue
            settle(fam, out)
            row[who] = measure(ours_cmd(ours_yaml, out) if cmd else mergekit_cmd(mk_exe, mk_yaml, out))
        if not METHODS[method].random and a.exact_layers and in_mergekit and mk_exe is not None:
            ours_f32, mk_f32 = method_configs(work / "float32", exact_fam, method, "float32", "float32")
            measure(ours_cmd(ours_f32, work / "float32" / f"ours-{method}"))
            measure(mergekit_cmd(mk_exe, mk_f32, work / "float32" / f"mk-{method}"))
            row["agreement_float32"] = agreement(work / "float32" / f"ours-{method}", work / "float32" / f"mk-{method}")
        rows[method] = row
        agree = row.get("agreement_float32", {}).get("max_rel_error")
        mk = row.get("mergekit")
        print(
            f"  {method:18s} ours {row['ours']['wall_s']:6.2f} s {row['ours']['peak_rss_bytes'] / 1e9:5.2f} GB   "
            + (f"mergekit {mk['wall_s']:6.2f} s {mk['peak_rss_bytes'] / 1e9:5.2f} GB   " if mk else "not in mergekit ")
            + f"float32 agreement {'-' if agree is None else f'{agree:.1e}'}",
            flush=True,
        )
    report = json.loads((work / f"ours-{next(iter(rows))}" / "merge_report.json").read_text())
    return {
        "layers": layers,
        "parameters": report["stats"]["parameters"],
        "dtype": a.dtype,
        "exact_layers": a.exact_layers,
        "io_floor": floor,
        "start_up": start_up,
        "start_up_torch": start_up_torch,
        **({"mergekit_from": str(a.mergekit_from)} if a.mergekit_from else {}),
        "methods": rows,
    }


def methods_table(result: dict) -> str:
    """The per-method table of docs/engine.md: wall time and peak RSS, ours and mergekit's, and
    agreement; with an I/O floor measured (results since --only), CPU time and wall / floor too."""
    floor = result.get("io_floor")
    if floor:
        return methods_floor_table(result, floor)
    rows = [
        (
            "| method | ours wall s | mergekit wall s | wall ratio | ours RSS GB | mergekit RSS GB | RSS ratio "
            "| float32 inputs: max rel. difference |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, row in result["methods"].items():
        o, m = row["ours"], row["mergekit"]
        agree = row.get("agreement_float32")
        agreed = (
            "random: not comparable"
            if agree is None
            else f"{agree['max_rel_error']:.1e} ({agree['differing_entries']} entries differ)"
        )
        rows.append(
            f"| `{method}` | {o['wall_s']:.2f} | {m['wall_s']:.2f} | {o['wall_s'] / m['wall_s']:.2f} | "
            f"{o['peak_rss_bytes'] / 1e9:.2f} | {m['peak_rss_bytes'] / 1e9:.2f} | "
            f"{o['peak_rss_bytes'] / m['peak_rss_bytes']:.2f} | "
            f"{agreed} |"
        )
    return "\n".join(rows)


def methods_floor_table(result: dict, floor: dict) -> str:
    """methods_table with CPU time and the ratio of wall time to the I/O floor's."""
    from lrmerge_hub.merge.methods import METHODS

    rows = [
        (
            "| method | run | wall s | CPU s | peak RSS GB | wall / mergekit | CPU / mergekit | RSS / mergekit "
            "| wall / I/O floor | float32 inputs: max rel. difference |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, row in result["methods"].items():
        agree = row.get("agreement_float32")
        unmeasured = "random" if METHODS[method].random else "not compared in this run"
        agreed = unmeasured if agree is None else f"{agree['max_rel_error']:.1e} ({agree['differing_entries']} differ)"
        mk = row.get("mergekit")
        if mk is None:
            agreed = "not in mergekit"
        for who in ("ours", "mergekit") if mk else ("ours",):
            m = row[who]
            ratios = " | ".join(f"{m[k] / mk[k]:.3f}" if mk else "-" for k in ("wall_s", "cpu_s", "peak_rss_bytes"))
            rows.append(
                f"| `{method}` | {who} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['peak_rss_bytes'] / 1e9:.2f} | "
                f"{ratios} | {m['wall_s'] / floor['wall_s']:.2f} | {agreed if who == 'ours' else ''} |"
            )
    rows.append(
        f"| I/O floor | | {floor['wall_s']:.2f} | {floor['cpu_s']:.2f} | {floor['peak_rss_bytes'] / 1e9:.2f} "
        "| | | | 1.00 | |"
    )
    for key, name in (("start_up", "start-up"), ("start_up_torch", "start-up with torch")):
        if key in result:  # the interpreter and our imports, part of every run of ours
            up = result[key]
            rows.append(
                f"| {name} | | {up['wall_s']:.2f} | {up['cpu_s']:.2f} | {up['peak_rss_bytes'] / 1e9:.2f} "
                f"| | | | {up['wall_s'] / floor['wall_s']:.2f} | |"
            )
    return "\n".join(rows)


# -- the benchmark -----------------------------------------------------------------------------


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run_size(a: argparse.Namespace, layers: int, mk_exe: Path | None) -> dict:
    key = family_key(a, a.dtype, layers)
    fam = synthesize(BENCH / "out" / "models" / key, a, a.dtype, layers)
    work = BENCH / "out" / "runs" / key
    recipes = write_recipes(work, fam, a.density, a.dtype, a.mergekit_dtype)
    nbytes_in = sum(f.stat().st_size for p in fam.values() for f in p.glob("*.safetensors"))
    runs: dict[str, list[dict[str, float]]] = {
        "io_floor": [],
        "ours_ties": [],
        "ours_torch_ties": [],
        "ours_slack_ties": [],
    }
    if mk_exe:
        runs["mergekit_ties"] = []
    # warm-up: fills the page cache and numba's on-disk cache of compiled kernels
    measure(ours_cmd(recipes["ties"], work / "ours-ties"))
    for r in range(a.rounds):
        order = ["io_floor", "ours_ties", "ours_torch_ties", "mergekit_ties", "ours_slack_ties"]
        if r % 2:
            order.reverse()
        for what in order:
            if what not in runs:
                continue
            out = work / {"io_floor": "io-floor", "mergekit_ties": "mergekit", "ours_torch_ties": "ours-torch"}.get(
                what, what.replace("_", "-", 1)
            )
            settle(fam, out)
            if what == "io_floor":
                res = measure(io_floor_cmd(fam, out))
            elif what == "mergekit_ties":
                res = measure(mergekit_cmd(mk_exe, recipes["mergekit"], out, cuda=a.device == "cuda"))
            elif what == "ours_torch_ties":
                res = measure(ours_cmd(recipes["ties"], out, device=a.device, engine="torch"))
            else:
                res = measure(ours_cmd(recipes[what.removeprefix("ours_")], out))
            runs[what].append(res)
            print(
                f"  round {r + 1} {what:16s} wall {res['wall_s']:7.2f} s  cpu {res['cpu_s']:7.2f} s  "
                f"rss {res['peak_rss_bytes'] / 1e9:6.2f} GB",
                flush=True,
            )
    report = json.loads((work / "ours-ties" / "merge_report.json").read_text())
    params = report["stats"]["parameters"]
    result = {
        "layers": layers,
        "parameters": params,
        "dtype": a.dtype,
        "input_bytes": nbytes_in,
        "largest_tensor_bytes": largest_tensor_bytes(fam["base"]),
        "runs": runs,
        "median": {k: median_of(v) for k, v in runs.items()},
    }
    # the torch engine (on --device) against the CPU kernels: the same bits, or a failure
    result["torch_identical_to_kernels"] = identical(work / "ours-ties", work / "ours-torch")
    torch_report = json.loads((work / "ours-torch" / "merge_report.json").read_text())
    result["torch_device"] = torch_report["stats"]["device"]
    result["peak_device_bytes"] = torch_report["stats"].get("peak_device_bytes")
    if mk_exe:
        result["agreement"] = agreement(work / "ours-ties", work / "mergekit", fam, a.density)
    return result


def largest_tensor_bytes(folder: Path) -> int:
    from lrmerge_hub.merge.st_io import SafetensorsModel

    return max(st.spec.nbytes for st in SafetensorsModel(folder, "base").tensors.values())


def float32_agreement(a: argparse.Namespace, mk_exe: Path) -> dict:
    """Ours vs mergekit on a small float32-input family: only float rounding may differ."""
    small = argparse.Namespace(**{**vars(a), "shard_bytes": 1 << 30})
    key = family_key(small, "float32", a.exact_layers)
    fam = synthesize(BENCH / "out" / "models" / key, small, "float32", a.exact_layers)
    work = BENCH / "out" / "runs" / key
    recipes = write_recipes(work, fam, a.density, "float32", "float32")
    measure(ours_cmd(recipes["ties"], work / "ours-ties"))
    measure(mergekit_cmd(mk_exe, recipes["mergekit"], work / "mergekit"))
    return {"layers": a.exact_layers, **agreement(work / "ours-ties", work / "mergekit", fam, a.density)}


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem / 1e9, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_at_start": os.getloadavg(),
    }


def table(results: list[dict]) -> str:
    """The Markdown table docs/engine.md shows: one block of rows per size."""
    rows = [
        "| size | run | wall s | CPU s | peak RSS GB | wall / mergekit | CPU / mergekit | RSS / mergekit "
        "| wall / I/O floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        med = result["median"]
        floor = med["io_floor"]["wall_s"]
        mk = med.get("mergekit_ties")
        rounds = len(result["runs"]["io_floor"])
        size = f"{result['parameters'] / 1e9:.2f}B ({result['layers']} layers, {rounds} round{'s' * (rounds > 1)})"
        for name in ("mergekit_ties", "ours_ties", "ours_torch_ties", "ours_slack_ties", "io_floor"):
            if name not in med:
                continue
            m = med[name]
            ratios = [f"{m[k] / mk[k]:.3f}" if mk else "-" for k in ("wall_s", "cpu_s", "peak_rss_bytes")]
            label = f"{name} ({result.get('torch_device', 'cpu')})" if name == "ours_torch_ties" else name
            rows.append(
                f"| {size} | {label} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['peak_rss_bytes'] / 1e9:.2f} | "
                f"{' | '.join(ratios)} | {m['wall_s'] / floor:.2f} |"
            )
            size = ""
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[8],
        help="one or more sizes by layer count (8: ~0.54B, 24: ~1.4B; "
        "--hidden 4096 --intermediate 11008 --heads 32 --layers 32: Llama-2-7B shapes)",
    )
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the torch engine (and mergekit, with --cuda) runs; the kernels always run on the CPU",
    )
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shard-bytes", type=int, default=1 << 30, help="input shard size (Hub-like)")
    p.add_argument("--mergekit-dtype", default="float32", help="mergekit's compute dtype (ours: float32)")
    p.add_argument("--no-mergekit", action="store_true", help="measure ours and the I/O floor only")
    p.add_argument(
        "--mergekit-layers", type=int, nargs="*", default=None, help="sizes at which mergekit runs too (default: all)"
    )
    p.add_argument(
        "--exact-layers",
        type=int,
        default=2,
        help="layers of the float32-input family for the exactness comparison (0: skip)",
    )
    p.add_argument("--json", type=Path, default=BENCH / "results.json")
    p.add_argument(
        "--table",
        type=Path,
        nargs="+",
        metavar="RESULTS_JSON",
        help="print docs/engine.md's table from earlier results files and exit",
    )
    p.add_argument(
        "--methods",
        action="store_true",
        help="every method, ours and mergekit's, once each at the first --layers size "
        "(give a small one: docs/engine.md's table used --hidden 256 --intermediate 704 "
        "--layers 2 --vocab 4000 --heads 4 --exact-layers 1), and float32 agreement",
    )
    p.add_argument(
        "--mergekit-from",
        type=Path,
        metavar="RESULTS_JSON",
        help="with --methods: take mergekit's rows from an earlier run of the same family instead of running it",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=sorted(METHOD_CASES),
        metavar="METHOD",
        help="with --methods: these methods only (e.g. --only linear task_arithmetic at the default size)",
    )
    a = p.parse_args()
    if a.table:
        data = [json.loads(f.read_text()) for f in a.table]
        print("\n\n".join(methods_table(d) if "methods" in d else table(d["sizes"]) for d in data))
        return

    mk_exe = None if a.no_mergekit or a.mergekit_from else ensure_mergekit()
    if a.methods:
        result = {"machine": machine(), "mergekit": MERGEKIT_VERSION, **run_methods(a, mk_exe)}
        result["machine"]["load_avg_at_end"] = os.getloadavg()
        print(methods_table(result))
        a.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.json}")
        return
    results = {
        "machine": machine(),
        "device": a.device,
        "merge": {
            "method": "ties",
            "density": a.density,
            "weights": 1.0,
            "normalize": True,
            "lambda": 1.0,
            "mergekit": MERGEKIT_VERSION,
            "mergekit_dtype": a.mergekit_dtype,
        },
        "sizes": [],
    }
    for layers in a.layers:
        with_mk = mk_exe if (a.mergekit_layers is None or layers in a.mergekit_layers) else None
        print(f"== {layers} layers ==", flush=True)
        res = run_size(a, layers, with_mk)
        results["sizes"].append(res)
        print(
            f"\n{res['parameters'] / 1e9:.2f}B parameters, {a.dtype}, "
            f"largest tensor {res['largest_tensor_bytes'] / 1e6:.0f} MB (medians of {a.rounds} rounds)"
        )
        print(table([res]))
        print(
            f"torch engine on {res['torch_device']} bit-identical to the CPU kernels: "
            f"{res['torch_identical_to_kernels']}"
        )
        if "agreement" in res:
            print(f"agreement with mergekit ({a.dtype} inputs): {res['agreement']}")
    if mk_exe and a.exact_layers:
        results["agreement_float32"] = float32_agreement(a, mk_exe)
        print(f"agreement with mergekit (float32 inputs): {results['agreement_float32']}")
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    a.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
