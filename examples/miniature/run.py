"""The paper's experiment in miniature: train (or reuse) tiny models on a synthetic world,
merge them with `lrmerge merge`, evaluate every model with `lrmerge eval` (lm-eval, hf
backend, local tasks) and write results.md, results.json and results.png.

    python examples/miniature/run.py            # 3 seeds, CT at 1x 2x 4x 8x (about 12 min, 2 cores)
    python examples/miniature/run.py --quick    # 1 seed, CT at 1x and 4x
    python examples/miniature/run.py --design v2          # worlds a, b, c (results/v2/)
    python examples/miniature/run.py --design v2 --quick  # world a, CT at 1x and 4x

The designs (worlds, model sizes, steps, seeds, merge parameters) are fixed in `PRESETS` and
`train.Design`, each before any of its merge results was looked at (docs/miniature.md).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(HERE), str(REPO)]

import train as T  # noqa: E402
import world as W  # noqa: E402

from lrmerge_hub.merge.methods import get_method  # noqa: E402

TASKS = ("miniature_lr_qa", "miniature_en_qa", "miniature_lr_ppl")
# (label, method, task-model slack): one merge per CT length and seed. Density 0.2 (the
# TIES paper's) where a method takes one, weights 1, lambda 1; every other parameter is the
# method's default (mergekit's), not tuned here. The last four are the other sign-electing
# methods, added (at their defaults, without slack) after the first four had been run.
METHODS = (
    ("task_arithmetic", "task_arithmetic", None),
    ("ties", "ties", None),
    ("slack_ties s=0.5", "slack_ties", 0.5),
    ("slack_ties s=1", "slack_ties", 1.0),
    ("dare_ties", "dare_ties", None),
    ("della", "della", None),
    ("breadcrumbs_ties", "breadcrumbs_ties", None),
    ("sce", "sce", None),
)
# The second design's arms: the first four, DARE-TIES and DELLA as above, and layer swapping
# (its defaults; it takes no base).
METHODS_V2 = (*METHODS[:6], ("layer_swap", "layer_swap", None))
DENSITY = 0.2
ROWS = ("base", "task model", "language model", "CT-then-SFT", *(m[0] for m in METHODS), "layer_swap")


@dataclass(frozen=True)
class Preset:
    seeds: tuple[int, ...]
    design: T.Design  # the first design: one world; the second: see `worlds`
    methods: tuple[tuple[str, str, float | None], ...] = METHODS
    worlds: tuple[tuple[str, T.Design], ...] = ()  # (name, design): the second design's worlds

    def designs(self) -> list[tuple[str, T.Design]]:
        """(world, design) pairs; the first design's one world is named ""."""
        return list(self.worlds) or [("", self.design)]


# The second design (docs/miniature.md, fixed 2026-12-03): worlds a, b, c.
V2 = T.Design(hidden=128, intermediate=384, layers=4, heads=4, lr=1e-3, sft_steps=100, streams=True)
V2_WORLDS = {
    "a": replace(V2, order="svo"),  # English word order, disjoint lexicon
    "b": replace(V2, order="svo", parallel_docs=0.1),  # (a) and 10% parallel documents
    "c": V2,  # the first design's LR (SOV): the negative control
}

PRESETS = {
    "v1": {
        "full": Preset(seeds=(0, 1, 2), design=T.Design()),
        "quick": Preset(seeds=(0,), design=T.Design(ct_lengths=(1, 4))),
        # the reduced version: small enough for ~2 minutes
        "test": Preset(
            seeds=(0,),
            design=T.Design(base_steps=300, sft_steps=100, ct_lengths=(2,), eval_items=60),
            methods=(METHODS[0], METHODS[1], METHODS[3]),
        ),
    },
    "v2": {
        "full": Preset(seeds=(0,), design=V2, methods=METHODS_V2, worlds=tuple(V2_WORLDS.items())),
        "quick": Preset(
            seeds=(0,), design=V2, methods=METHODS_V2, worlds=(("a", replace(V2_WORLDS["a"], ct_lengths=(1, 4))),)
        ),
        # what the test suite runs: world b (both of its factors), a smaller model, few steps
        "test": Preset(
            seeds=(0,),
            design=V2,
            methods=(METHODS_V2[1], METHODS_V2[3], METHODS_V2[6]),
            worlds=(
                (
                    "b",
                    replace(
                        V2_WORLDS["b"],
                        hidden=64,
                        intermediate=256,
                        layers=3,  # layer_swap: one middle layer from the task model
                        heads=2,
                        base_steps=300,
                        ct_lengths=(2,),
                        eval_items=60,
                    ),
                ),
            ),
        ),
    },
}


# --- evaluation data: lm-eval tasks (YAML + JSONL) ------------------------------------------


def write_tasks(seed: int, n: int, folder: Path, order: str = "sov") -> Path:
    """The same questions in LR and English (exact answer), and held-out LR text for
    perplexity, as local lm-eval tasks."""
    world = W.make_world(seed, order=order)
    rng = random.Random(10_000 + seed)
    eval_items = W.items(world, rng, n)
    folder.mkdir(parents=True, exist_ok=True)
    for lang in ("lr", "en"):
        rows = [
            {"prompt": W.prompt(world, it, lang), "answer": W.answer(world, it), "chance": W.chance(world, it)}
            for it in eval_items
        ]
        write_task(
            folder,
            f"miniature_{lang}_qa",
            rows,
            (
                "output_type: generate_until\n"
                'doc_to_text: "{{prompt}}"\n'
                'doc_to_target: "{{answer}}"\n'
                'generation_kwargs: {until: ["</s>", "."], max_gen_toks: 4, do_sample: false}\n'
                "metric_list:\n"
                "  - {metric: exact_match, aggregation: mean, higher_is_better: true,"
                ' regexes_to_ignore: [" "]}\n'
            ),
        )
    texts = [{"text": t} for t in W.corpus(world, rng, "lr", n // 2)]
    write_task(
        folder,
        "miniature_lr_ppl",
        texts,
        (
            "output_type: loglikelihood_rolling\n"
            'doc_to_text: ""\n'
            'doc_to_target: "{{text}}"\n'
            "metric_list:\n  - metric: word_perplexity\n"
        ),
    )
    return folder


def write_task(folder: Path, name: str, rows: list[dict], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"  # absolute: read from any cwd
        f"test_split: test\n{body}"
    )


def mean_chance(folder: Path) -> float:
    rows = [json.loads(line) for line in (folder / "miniature_en_qa.jsonl").read_text().splitlines()]
    return statistics.fmean(r["chance"] for r in rows)


# --- the project's CLI, as a user runs it ---------------------------------------------------


def cli(args: list[str], cwd: Path) -> dict:
    """`python -m lrmerge_hub ARGS --format json` from this checkout; its JSON answer."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lrmerge_hub", *args, "--format", "json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"lrmerge {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def merge(base: Path, lm: Path, task: Path, method: str, slack: float | None, out: Path) -> dict:
    """Write a recipe beside `out` and merge it; returns merge_report.json."""
    declared = get_method(method)
    per_model = {k: v for k, v in (("weight", 1.0), ("density", DENSITY)) if k in declared.model_params}
    task_entry = {"model": str(task), "role": "task", **per_model}
    if slack is not None:
        task_entry["slack"] = slack
    params = {"lambda": 1.0} if "lambda" in declared.global_params else {}
    recipe = {
        "method": method,
        **({"base": str(base)} if declared.takes_base else {}),  # layer_swap takes none
        "models": [{"model": str(lm), "role": "language", **per_model}, task_entry],
        "parameters": params,
        "dtype": "float32",
        "output": str(out),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"  # not with_suffix: "s0.5-1x" has a dot
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cli(["merge", str(path), "--overwrite"], cwd=out.parent)
    return json.loads((out / "merge_report.json").read_text())


def evaluate(models: list[Path], tasks_dir: Path) -> list[dict[str, float]]:
    """LR accuracy, English accuracy and LR word perplexity of model folders (distinct
    names), all in one `lrmerge eval`: one lm-eval process, its imports paid once."""
    res = cli(
        [
            "eval",
            *map(str, models),
            "--backend",
            "hf",
            "--tasks",
            ",".join(TASKS),
            "--include-path",
            str(tasks_dir),
            "--batch-size",
            "16",
            "--dtype",
            "float32",
        ],
        cwd=models[0].parent,
    )
    summaries = [res["summary"][m.name] for m in models]
    return [
        {
            "lr_acc": s["miniature_lr_qa"]["exact_match"],
            "en_acc": s["miniature_en_qa"]["exact_match"],
            "lr_ppl": s["miniature_lr_ppl"]["word_perplexity"],
        }
        for s in summaries
    ]


# --- the experiment -------------------------------------------------------------------------


def family_root(models_root: Path, world: str, seed: int) -> Path:
    """Where one world's seed is trained (the first design: models_root/seedS)."""
    return models_root / (f"world-{world}" if world else "") / f"seed{seed}"


def run(preset: Preset, models_root: Path, jobs: int, log=print, all_arms: bool = False) -> list[dict]:
    """Every (world, seed, model) evaluated: a list of records. In the second design the
    trained models are evaluated first; the merges follow only when the precondition holds
    (fixed in advance: otherwise the run stops there), or with all_arms."""
    t0 = time.time()
    designs = preset.designs()
    fams = [(w, d, seed) for w, d in designs for seed in preset.seeds]
    roots = {(w, seed): family_root(models_root, w, seed) for w, _, seed in fams}
    # every family at once: training is CPU-bound, one thread each
    with ProcessPoolExecutor(max(jobs, len(fams))) as pool:
        trained = pool.map(T.train_family, [d for _, d, _ in fams], [s for *_, s in fams], list(roots.values()))
        families = dict(zip(roots, trained, strict=True))
    log(f"trained or reused {len(fams)} famil{'ies' if len(fams) > 1 else 'y'} in {time.time() - t0:.0f}s")

    # resume: a model already evaluated with these very checkpoints is not evaluated again
    stamps = {key: family_stamp(root) for key, root in roots.items()}
    progress = models_root / "records.jsonl"
    done = {}
    for line in progress.read_text().splitlines() if progress.is_file() else []:
        r = json.loads(line)
        if stamps.get((r.get("world", ""), r["seed"])) == r.get("stamp"):
            done[record_key(r)] = r

    jobs_list = []  # (record, model folder, merge arguments or None, tasks folder)
    for world, d in designs:
        # the shortest and longest CT first, so that a run cut short still spans the axis
        cts = list(dict.fromkeys([d.ct_lengths[0], d.ct_lengths[-1], *d.ct_lengths[1:-1]]))
        tasks = {seed: write_tasks(seed, d.eval_items, roots[world, seed] / "tasks", d.order) for seed in preset.seeds}
        for ct in [None, *cts]:
            for seed in preset.seeds:
                paths, tasks_dir = families[world, seed], tasks[seed]

                def rec(model, world=world, seed=seed, ct=ct, tasks_dir=tasks_dir, **kw):  # called in this iteration
                    return dict(
                        **({"world": world} if world else {}),
                        seed=seed,
                        model=model,
                        ct=ct,
                        chance=mean_chance(tasks_dir),
                        stamp=stamps[world, seed],
                        **kw,
                    )

                if ct is None:
                    jobs_list += [
                        (rec("base"), paths["base"], None, tasks_dir),
                        (rec("task model"), paths["task"], None, tasks_dir),
                    ]
                    continue
                jobs_list += [
                    (rec("language model"), paths[f"lm-{ct}x"], None, tasks_dir),
                    (rec("CT-then-SFT"), paths[f"ctsft-{ct}x"], None, tasks_dir),
                ]
                for label, method, slack in preset.methods:
                    out = roots[world, seed] / "merges" / f"{label.replace(' ', '_').replace('=', '')}-{ct}x"
                    spec = (paths["base"], paths[f"lm-{ct}x"], paths["task"], method, slack, out)
                    jobs_list.append(
                        (
                            rec(label, method=method, slack=slack, folder=str(out.relative_to(models_root))),
                            out,
                            spec,
                            tasks_dir,
                        )
                    )

    def one(chunk: list) -> list[dict]:
        """One seed of one world at one CT length: its merges, then one evaluation of all its models."""
        todo = [job for job in chunk if record_key(job[0]) not in done]
        for record, _, merge_spec, _ in todo:
            if merge_spec is not None:
                for m in merge(*merge_spec)["models"]:
                    record[f"{m['role']}_retention"] = (m.get("retention") or {}).get("fraction")
        for (record, *_), scores in zip(todo, evaluate([j[1] for j in todo], chunk[0][3]) if todo else [], strict=True):
            record.update(scores)
            with open(progress, "a") as f:  # progress, in case the run is cut short
                f.write(json.dumps(record) + "\n")
            log(
                f"{'world ' + record['world'] + ' ' if 'world' in record else ''}"
                f"seed {record['seed']} {record['model']:<18} CT {record['ct'] or '-':>2}x  "
                f"LR acc {record['lr_acc']:.3f}  EN acc {record['en_acc']:.3f}  LR ppl {record['lr_ppl']:.2f}"
            )
        return [done.get(record_key(r), r) for r, *_ in chunk]

    rank = {ct: i for i, ct in enumerate([None, *cts])}  # the same CT lengths in every world
    worlds = [w for w, _ in designs]

    def run_chunks(selected: list) -> list[dict]:
        chunks = [
            list(g)
            for _, g in itertools.groupby(selected, key=lambda j: (j[0].get("world", ""), j[0]["ct"], j[0]["seed"]))
        ]
        # the worlds interleaved, CT length by CT length, so that a run cut short spans them all
        chunks.sort(key=lambda c: (rank[c[0][0]["ct"]], worlds.index(c[0][0].get("world", ""))))
        with ThreadPoolExecutor(jobs) as pool:
            return [r for rs in pool.map(one, chunks) for r in rs]

    t1 = time.time()
    if not preset.worlds or all_arms:
        # each CT length's merges and models in one evaluation (the first design, or every arm
        # asked for: nothing waits for the precondition)
        records = run_chunks(jobs_list)
    else:
        records = run_chunks([j for j in jobs_list if j[2] is None])
        chance = statistics.fmean({r["seed"]: r["chance"] for r in records}.values())
        if all_arms or precondition_holds(records, chance):
            records += run_chunks([j for j in jobs_list if j[2] is not None])
        else:
            log("the precondition does not hold: the run stops before the merges (--all-arms runs them)")
    log(f"merged and evaluated {len(records)} models in {time.time() - t1:.0f}s")
    return records


def record_key(record: dict) -> tuple:
    """What a record is of: one model of one seed (of one world) at one CT length."""
    return record.get("world", ""), record["seed"], record["model"], record["ct"]


def family_stamp(root: Path) -> str:
    """Identifies one seed's trained checkpoints (design, seed and code)."""
    return hashlib.sha256((root / "design.json").read_bytes()).hexdigest()[:16]


# --- results --------------------------------------------------------------------------------


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(records: list[dict], key: str) -> dict[str, dict]:
    """{model: {ct or "-": (mean, sd, n)}} over seeds."""
    out: dict[str, dict] = {}
    for r in records:
        if r.get(key) is None:
            continue
        out.setdefault(r["model"], {}).setdefault(r["ct"] or "-", []).append(r[key])
    ranked = sorted(out, key=lambda m: ROWS.index(m) if m in ROWS else len(ROWS))
    return {m: {ct: (*spread(v), len(v)) for ct, v in out[m].items()} for m in ranked}


def table(records: list[dict], key: str, cts: tuple[int, ...], fmt: str, seeds: int) -> str:
    """Mean ± sd over seeds; "(n=...)" where fewer seeds than the run's were evaluated."""
    agg = aggregate(records, key)
    cols = ["-", *cts]
    lines = [
        "| model | " + " | ".join("no CT" if c == "-" else f"CT {c}x" for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for model, row in agg.items():
        cells = [
            f"{row[c][0]:{fmt}} ± {row[c][1]:{fmt}}" + (f" (n={row[c][2]})" if row[c][2] < seeds else "")
            if c in row
            else ""
            for c in cols
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


WORLD_TITLES = {
    "a": "world a: LR in English word order, disjoint lexicon",
    "b": "world b: world a and 10% parallel documents in pretraining",
    "c": "world c: the first design's LR (SOV), the negative control",
}


def precondition_verdicts(records: list[dict], chance: float) -> list[tuple[str, bool]]:
    """The second design's precondition, stated in advance, per world a and b evaluated:
    (what CT-then-SFT's best LR accuracy is, whether it is at least 3x chance)."""
    verdicts = []
    for world in ("a", "b"):
        rows = aggregate([r for r in records if r.get("world") == world], "lr_acc").get("CT-then-SFT", {})
        if rows:
            ct, (best, *_) = max(rows.items(), key=lambda kv: kv[1][0])
            measured = ", ".join(f"{c}x" for c in sorted(rows))
            held = best >= 3 * chance
            line = f"world {world}: best CT-then-SFT LR accuracy {best:.3f} (CT {ct}x of {measured})"
            verdicts.append((f"{line}: {'holds' if held else 'does not hold'}", held))
    return verdicts


def precondition_holds(records: list[dict], chance: float) -> bool:
    """In world a or b, CT-then-SFT's LR accuracy is at least 3x chance at some CT length."""
    return any(held for _, held in precondition_verdicts(records, chance))


def precondition(records: list[dict], chance: float) -> str:
    """The precondition and its verdict, as results.md states it."""
    verdicts = precondition_verdicts(records, chance)
    if not verdicts:
        return "Precondition (stated in advance): not evaluated yet (no CT-then-SFT record in world a or b)."
    held = any(h for _, h in verdicts)
    merged = any(r.get("method") for r in records)
    verdict = (
        ". It holds."
        if held
        else ". It does not hold: the merges are not evidence for or against the paper."
        if merged
        else ". It does not hold: as fixed in advance, the run stops there (no merges; run.py --all-arms runs them)."
    )
    return (
        f"Precondition (stated in advance): in world a or b, CT-then-SFT's LR accuracy is at least "
        f"3x chance ({3 * chance:.3f}) at some CT length. " + "; ".join(line for line, _ in verdicts) + verdict
    )


def write_results(
    records: list[dict], preset: Preset, out: Path, seconds: float | None, cpu: float | None, log=print
) -> list[str]:
    """results.json, results.md and results.png; seconds None: a run cut short. Returns the
    names of the files written."""
    out.mkdir(parents=True, exist_ok=True)
    designs = preset.designs()
    chance = statistics.fmean({r["seed"]: r["chance"] for r in records}.values())
    meta = {
        "seeds": list(preset.seeds),
        "design": asdict(preset.design),
        **({"worlds": {w: asdict(d) for w, d in preset.worlds}} if preset.worlds else {}),
        "density": DENSITY,
        "methods": [list(m) for m in preset.methods],
        "seconds": seconds and round(seconds),
        "cpu_seconds": cpu and round(cpu),
        "chance": chance,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    n = len(preset.seeds)
    timing = (
        f"Run time {seconds / 60:.1f} min wall, {cpu / 60:.1f} min CPU."
        if seconds
        else f"The run was cut short: these are the {len(records)} models it had evaluated."
    )
    md = [
        f"# Miniature results ({n} seed{'s' * (n > 1)}: {', '.join(map(str, preset.seeds))}; mean ± sd over seeds)",
        "",
        f"CT length: continual pre-training steps in units of {preset.design.ct_unit_steps}. "
        f"Chance (a random name from the passage): {chance:.3f}. " + timing,
        "",
    ]
    if preset.worlds:
        md += [precondition(records, chance), ""]
        if n == 1:
            items = designs[0][1].eval_items
            md += [
                f"One seed: an accuracy's 95% sampling interval on {items} questions is "
                f"about ±{1.96 * (0.25 / items) ** 0.5:.3f} at 0.5.",
                "",
            ]
    level = "###" if preset.worlds else "##"
    for world, d in designs:
        rs = [r for r in records if r.get("world", "") == world]
        if world:
            md += [f"## {WORLD_TITLES.get(world, 'world ' + world)}", ""]
        for title, key, fmt in (
            ("LR task accuracy (exact answer, questions in the low-resource language)", "lr_acc", ".3f"),
            ("English task accuracy (the same questions in English)", "en_acc", ".3f"),
            (
                "Task model retention (merge_report.json: share of its trimmed entries the election kept)",
                "task_retention",
                ".3f",
            ),
            ("LR word perplexity (held-out LR text)", "lr_ppl", ".2f"),
        ):
            md += [f"{level} {title}", "", table(rs, key, d.ct_lengths, fmt, n), ""]
    (out / "results.md").write_text("\n".join(md))
    try:
        plot(records, designs, out / "results.png")
    except ImportError:
        log("results.png not written: matplotlib is missing (pip install -e '.[miniature]')")
        return ["results.md", "results.json"]
    return ["results.md", "results.json", "results.png"]


def plot(records: list[dict], designs: list[tuple[str, T.Design]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged = any(r.get("task_retention") is not None for r in records)  # no merges: no retention panel
    fig, axes = plt.subplots(len(designs), 1 + merged, figsize=(5.5 * (1 + merged), 4.2 * len(designs)), squeeze=False)
    for (world, d), (ax_acc, *ax_rets) in zip(designs, axes, strict=True):
        rs = [r for r in records if r.get("world", "") == world]
        cts = d.ct_lengths
        for key, ax in (("lr_acc", ax_acc), *(("task_retention", a) for a in ax_rets)):
            for model, row in aggregate(rs, key).items():
                if "-" in row:  # no CT axis: a horizontal reference line
                    ax.axhline(row["-"][0], ls=":", color="grey" if model == "base" else "black", label=model)
                    continue
                xs = [c for c in cts if c in row]
                ax.errorbar(
                    xs,
                    [row[c][0] for c in xs],
                    yerr=[row[c][1] for c in xs],
                    marker="o",
                    capsize=3,
                    label=model,
                    color=f"C{ROWS.index(model) % 10}" if model in ROWS else None,
                    ls="--" if model in ("language model", "CT-then-SFT") else "-",
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(cts), [f"{c}x" for c in cts])
            ax.set_xlabel("continual pre-training length")
        chance = statistics.fmean({r["seed"]: r["chance"] for r in rs}.values()) if rs else 0
        ax_acc.axhline(chance, ls="-.", lw=0.8, color="silver", label="chance")
        ax_acc.set_ylabel("LR task accuracy (exact answer)")
        if world:
            ax_acc.set_title(WORLD_TITLES.get(world, world), fontsize=9)
        ax_acc.legend(fontsize=7)
        for ax_ret in ax_rets:
            ax_ret.set_ylabel("task model retention")
            ax_ret.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--design",
        choices=sorted(PRESETS),
        default="v1",
        help="v1: the first design (one world, 3 seeds); v2: worlds a, b, c (docs/miniature.md)",
    )
    ap.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="preset",
        default="full",
        help="v1: 1 seed, CT at 1x and 4x; v2: world a, CT at 1x and 4x (same as --preset quick)",
    )
    ap.add_argument("--preset", choices=("full", "quick", "test"), default="full")
    ap.add_argument(
        "--models",
        type=Path,
        help="where checkpoints are trained or reused (default: examples/miniature/models/PRESET, "
        "models/v2-PRESET for v2)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        help="results folder (default: examples/miniature/results, results/PRESET for other presets; "
        "v2: results/v2, results/v2/PRESET)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="processes at once (default 2)")
    ap.add_argument(
        "--all-arms",
        action="store_true",
        help="v2: merge even when the precondition does not hold (by default the run stops there)",
    )
    ap.add_argument(
        "--render",
        action="store_true",
        help="only rewrite the results from results.json, or, for a run cut short, "
        "from the records it saved beside the models",
    )
    a = ap.parse_args()
    preset = PRESETS[a.design][a.preset]
    v2 = a.design != "v1"
    models = (a.models or HERE / "models" / (f"{a.design}-{a.preset}" if v2 else a.preset)).resolve()
    results = HERE / "results" / a.design if v2 else HERE / "results"
    out = a.out or (results if a.preset == "full" else results / a.preset)
    if a.render and not (out / "results.json").is_file():
        stamps = {
            (w, seed): family_stamp(family_root(models, w, seed)) for w, _ in preset.designs() for seed in preset.seeds
        }
        records = [
            r
            for r in map(json.loads, (models / "records.jsonl").read_text().splitlines())
            if stamps.get((r.get("world", ""), r["seed"])) == r["stamp"]
        ]
        write_results(records, preset, out, None, None)
        return
    if a.render:
        data = json.loads((out / "results.json").read_text())
        meta = data["meta"]
        design = lambda m: T.Design(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()})  # noqa: E731
        preset = Preset(
            seeds=tuple(meta["seeds"]),
            design=design(meta["design"]),
            methods=tuple(map(tuple, meta["methods"])),
            worlds=tuple((w, design(m)) for w, m in meta.get("worlds", {}).items()),
        )
        write_results(data["records"], preset, out, meta["seconds"], meta.get("cpu_seconds", 0))
        return
    t0 = time.time()
    records = run(preset, models, a.jobs, all_arms=a.all_arms)
    written = write_results(records, preset, out, time.time() - t0, cpu_seconds())
    print(f"wrote {', '.join(str(out / name) for name in written)} in {(time.time() - t0) / 60:.1f} min")


def cpu_seconds() -> float:
    """CPU time of this process and every process it waited for (training, merges, lm-eval)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
