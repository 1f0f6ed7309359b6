"""`lrmerge run`: recipe -> pull -> check -> merge -> evaluate -> card -> push, resumable.

Each step's result is recorded in a run folder (`runs/<output>-<recipe hash>/state.json`
beside the recipe). A re-run skips the steps that finished, so after a failure it resumes at
the failed step, and a finished recipe does nothing unless `force`. Data flows one way: each
step reads what the previous ones wrote (the output folder, the recorded sources).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .errors import LrmergeError, RecipeError
from .merge.plan import Source
from .recipe import PushTarget, Recipe
from .settings import DEFAULT_READ_AHEAD, DEFAULT_SHARD_SIZE

STEPS = ("pull", "merge", "eval", "card", "push")


@dataclass
class RunContext:
    recipe: Recipe
    output: Path
    device: str
    token: str | None = None
    push_repo: str | None = None  # overrides the recipe's push target
    skip_eval: bool = False
    progress: bool = True
    download: bool = False  # download Hub weights into the cache instead of streaming them
    read_ahead: int = DEFAULT_READ_AHEAD
    shard_size: int = DEFAULT_SHARD_SIZE
    keep: bool = True  # False: output shards leave the disk once uploaded (needs a push target)
    sources: dict[str, Source] = field(default_factory=dict)
    uploaded: list[Any] = field(default_factory=list)  # shards the merge pre-uploaded, for the push


def run_dir_for(recipe: Recipe, output: Path) -> Path:
    base = recipe.source_file.parent if recipe.source_file else Path.cwd()
    return base / "runs" / f"{output.name}-{recipe.sha256()[:12]}"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunState:
    """state.json of one run: per step, status done/failed/skipped, its result or error."""

    def __init__(self, run_dir: Path, recipe_sha: str):
        self.path = run_dir / "state.json"
        self.data: dict[str, Any] = {"recipe_sha256": recipe_sha, "steps": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())

    def step(self, name: str) -> dict[str, Any]:
        return self.data["steps"].get(name, {})

    def record(self, name: str, **entry: Any) -> None:
        self.data["steps"][name] = {**entry, "at": now()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


# -- steps: each returns a JSON-able result, or {"skipped": reason} ------------------------


def resolve_sources(recipe: Recipe, *, token: str | None = None, download: bool = False,
                    read_ahead: int = DEFAULT_READ_AHEAD) -> dict[str, Source]:
    """Every model of the recipe, ready to read; Hub ids are pinned to their sha and checked
    from their headers first. Hub weights not in the HF cache are read from the Hub during
    the merge (range requests), or with `download` downloaded into the cache first."""
    if all(ref.is_local for ref in recipe.all_refs()):
        from .merge.engine import local_sources

        return local_sources(recipe)
    from .hub import materialize_sources, stream_sources

    if download:
        return materialize_sources(recipe, token=token)
    return stream_sources(recipe, token=token, read_ahead=read_ahead)


def step_pull(ctx: RunContext) -> dict[str, Any]:
    """Pin every Hub id to a sha, check compatibility from headers, download what is needed."""
    spec = ctx.recipe.eval
    compare = spec is not None and spec.compare and not ctx.skip_eval  # serves the sources: needs their weights
    ctx.sources = resolve_sources(ctx.recipe, token=ctx.token, download=ctx.download or compare,
                                  read_ahead=ctx.read_ahead)
    return {"sources": {k: {"repo_id": s.repo_id, "revision": s.revision, "path": str(s.path),
                            "streamed": s.reader is not None} for k, s in ctx.sources.items()}}


def recorded_sources(ctx: RunContext, recorded: dict[str, dict[str, Any]]) -> dict[str, Source]:
    """The sources a finished pull step recorded (a streamed one is read from the Hub again)."""
    from .hub import streamed_source

    share = ctx.read_ahead // max(1, sum(bool(v.get("streamed")) for v in recorded.values()))
    return {k: streamed_source(v["repo_id"], v["revision"], Path(v["path"]), token=ctx.token, read_ahead=share)
            if v.get("streamed") else Source(Path(v["path"]), v["repo_id"], v["revision"])
            for k, v in recorded.items()}


def step_merge(ctx: RunContext) -> dict[str, Any]:
    """Merge; with a push target each finished shard is uploaded as the merge goes (the push
    step's commit then makes them visible, all at once)."""
    from .merge.engine import merge

    target = push_target(ctx)
    uploader = None
    if target is not None:
        from .hub import ShardUploader

        uploader = ShardUploader(target.repo, revision=target.revision, create_pr=target.create_pr,
                                 private=target.private, keep=ctx.keep, token=ctx.token)
    report = merge(ctx.recipe, ctx.sources, ctx.output, device=ctx.device, overwrite=True, progress=ctx.progress,
                   shard_size=ctx.shard_size, on_shard=uploader)
    ctx.uploaded = uploader.operations if uploader else []
    stats = {**report["stats"], "bytes_uploaded": uploader.bytes_uploaded if uploader else 0}
    return {"output": str(ctx.output), "stats": stats, "weights_kept": ctx.keep,
            "retention": {m["model"]: m["retention"] for m in report["models"]}}


def step_eval(ctx: RunContext) -> dict[str, Any]:
    spec = ctx.recipe.eval
    if spec is None or ctx.skip_eval:
        return {"skipped": "the recipe has no eval section" if spec is None else "--skip-eval"}
    from .evaluate import evaluate_for_run

    return evaluate_for_run(ctx.output, ctx.recipe, spec, sources=ctx.sources)


def step_card(ctx: RunContext) -> dict[str, Any]:
    from .card import write_card
    from .card_inputs import source_dirs_for

    target = push_target(ctx)
    path = write_card(ctx.output, repo_id=target.repo if target else None,
                      source_dirs=source_dirs_for(ctx.recipe, ctx.sources))
    return {"card": str(path)}


def push_target(ctx: RunContext) -> PushTarget | None:
    """The recipe's push section, with its repo replaced by --push when given."""
    if ctx.push_repo:
        return replace(ctx.recipe.push, repo=ctx.push_repo) if ctx.recipe.push else PushTarget(repo=ctx.push_repo)
    return ctx.recipe.push


def step_push(ctx: RunContext) -> dict[str, Any]:
    target = push_target(ctx)
    if target is None:
        return {"skipped": "the recipe names no push target"}
    from .hub import push

    result = push(ctx.output, target.repo, private=target.private, create_pr=target.create_pr,
                  revision=target.revision, tag=target.tag, token=ctx.token, uploaded=tuple(ctx.uploaded))
    return result.to_dict()


STEP_FUNCTIONS: dict[str, Callable[[RunContext], dict[str, Any]]] = {
    "pull": step_pull, "merge": step_merge, "eval": step_eval, "card": step_card, "push": step_push,
}


def plan_steps(state: RunState, force: bool, output: Path) -> list[tuple[str, str]]:
    """(step, 'run' | 'done') for every step, in order: everything after a step that must run, runs."""
    plan, rerun = [], force
    for name in STEPS:
        done = state.step(name).get("status") == "done"
        if name in ("merge", "card") and not output.exists():
            done = False  # the output was removed since: make it again
        if name == "merge" and state.step("push").get("status") != "done" and output.exists() \
                and not any(output.glob("*.safetensors")):
            done = False  # its shards were uploaded and removed (--no-keep) but never committed: again
        rerun = rerun or not done
        plan.append((name, "run" if rerun else "done"))
    return plan


def run_recipe(recipe: Recipe, *, output: Path | None = None, device: str = "auto", force: bool = False,
               dry_run: bool = False, token: str | None = None, push_repo: str | None = None,
               skip_eval: bool = False, progress: bool = True, download: bool = False,
               read_ahead: int = DEFAULT_READ_AHEAD, shard_size: int = DEFAULT_SHARD_SIZE, keep: bool = True,
               echo: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run every step of the recipe that has not finished yet; return the run summary."""
    target = output or recipe.output
    if target is None:
        raise RecipeError("output: the recipe names no output folder; add `output:` or pass --out")
    if not keep and not (push_repo or recipe.push):
        raise RecipeError("--no-keep removes the merged weights once pushed: give a push target (--push or push:)")
    if not keep and recipe.eval is not None and not skip_eval:
        raise RecipeError("--no-keep removes the merged weights the evaluation needs: add --skip-eval, or keep them")
    output = Path(target).absolute()
    run_dir = run_dir_for(recipe, output)
    state = RunState(run_dir, recipe.sha256())
    plan = plan_steps(state, force, output)
    summary: dict[str, Any] = {"recipe_sha256": recipe.sha256(), "run_dir": str(run_dir),
                               "output": str(output), "steps": {}}
    if dry_run:
        summary["dry_run"] = True
        summary["plan"] = [{"step": s, "action": a} for s, a in plan]
        if push_repo or recipe.push:
            summary["push"] = push_repo or recipe.push.repo
        return summary

    ctx = RunContext(recipe=recipe, output=output, device=device, token=token,
                     push_repo=push_repo, skip_eval=skip_eval, progress=progress, download=download,
                     read_ahead=read_ahead, shard_size=shard_size, keep=keep)
    for name, action in plan:
        if action == "done":
            summary["steps"][name] = {"status": "done", "reused": True, **state.step(name).get("result", {})}
            if name == "pull":
                ctx.sources = recorded_sources(ctx, state.step(name)["result"]["sources"])
            echo(f"{name}: done earlier, skipped")
            continue
        started = time.perf_counter()
        try:
            result = STEP_FUNCTIONS[name](ctx)
        except LrmergeError as e:
            state.record(name, status="failed", error=str(e))
            summary["steps"][name] = {"status": "failed", "error": str(e)}
            e.run_summary = summary  # type: ignore[attr-defined]
            raise
        except BaseException as e:  # interrupted or a bug: record it, keep the traceback
            state.record(name, status="failed", error=f"{type(e).__name__}: {e}")
            raise
        seconds = round(time.perf_counter() - started, 3)
        status = "skipped" if "skipped" in result else "done"
        state.record(name, status="done", result=result, seconds=seconds)
        summary["steps"][name] = {"status": status, "seconds": seconds, **result}
        echo(f"{name}: {status}" + (f" ({result['skipped']})" if status == "skipped" else f" in {seconds:.1f} s"))
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    """A run summary as Markdown: the steps, the retention numbers and the evaluation table."""
    if not summary:
        return "### lrmerge run\n\nNo summary was written (the run failed before it started).\n"
    name = Path(summary.get("output", "model")).name
    lines = [f"### lrmerge run: {name}", ""]
    if summary.get("error"):
        lines += [f"**Failed:** {summary['error']}", ""]
    if summary.get("dry_run"):
        lines += ["Dry run: " + ", ".join(f"{p['step']} ({p['action']})" for p in summary["plan"]), ""]
        return "\n".join(lines) + "\n"
    lines += ["| step | status | seconds |", "|---|---|---|"]
    for step, info in summary.get("steps", {}).items():
        status = info.get("status", "?") + (" (earlier run)" if info.get("reused") else "")
        if info.get("skipped"):
            status += f": {info['skipped']}"
        lines.append(f"| {step} | {status} | {info.get('seconds', '')} |")
    retention = summary.get("steps", {}).get("merge", {}).get("retention") or {}
    rows = [(m, r) for m, r in retention.items() if r]
    if rows:
        lines += ["", "| model | kept by trim | retention |", "|---|---|---|"]
        lines += [f"| {m} | {r['kept']:,} | {r['fraction']:.1%} |" for m, r in rows if r.get("fraction") is not None]
    scores = summary.get("steps", {}).get("eval", {}).get("scores") or []
    if scores:
        lines += ["", "| model | task | metric | value |", "|---|---|---|---|"]
        lines += [f"| {s.get('model', name)} | {s['task']} | {s['metric']} | {s['value']:.4f} |" for s in scores]
    sample = summary.get("steps", {}).get("eval", {}).get("sample")
    if sample:
        lines += ["", f"Served answer to {sample['prompt']!r}: {sample['answer']!r}"]
    push = summary.get("steps", {}).get("push", {})
    if push.get("status") == "done" and not push.get("skipped"):
        lines += ["", f"Pushed: {push.get('pr_url') or push.get('commit_url') or push.get('repo_id', '')}"]
    return "\n".join(lines) + "\n"


def sweep_release(recipe: Recipe, grid_items: list[str] | tuple[str, ...], spec, *, metric: str | None,
                  device: str, push_repo: str | None = None, token: str | None = None, progress: bool = True,
                  echo: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """`lrmerge sweep`: pull once, merge and evaluate every grid point, promote the best, card it
    (with every point's scores) and push it when a target is given."""
    from .evaluate import evaluate_for_run
    from .sweep import parse_grid, run_sweep

    grid = parse_grid(list(grid_items))
    output = Path(recipe.output).absolute()
    ctx = RunContext(recipe=recipe, output=output, device=device, token=token, push_repo=push_repo,
                     progress=progress)
    step_pull(ctx)

    def evaluate(folder: Path) -> list[dict[str, Any]]:
        result = evaluate_for_run(folder, recipe, spec, sources=ctx.sources, echo=echo)
        return [s for s in result["scores"] if s.get("role", "merged") == "merged"]

    table = run_sweep(recipe, grid, sources=ctx.sources, output=output, evaluate=evaluate, metric=metric,
                      device=device, progress=progress, echo=echo)
    result: dict[str, Any] = {"output": str(output), **table, "card": step_card(ctx)["card"]}
    if push_target(ctx) is not None:
        result["push"] = step_push(ctx)
    lines = [f"{'point':<32} {table['metric']:>10}"]
    for p in table["points"]:
        value = "n/a" if p["score"] is None else f"{p['score']:.4f}"
        lines.append(f"{p['name']:<32} {value:>10}" + ("  <- best, promoted" if p["name"] == table["best"] else ""))
    result["table_text"] = "\n".join(lines) + f"\noutput: {output}"
    return result
