"""`lrmerge run`: recipe -> pull -> check -> merge -> evaluate -> card -> push, resumable.

Each step's result is recorded in a run folder (`runs/<output>-<recipe hash>/state.json`
beside the recipe), with the sha256 of every file it wrote into the output folder. A re-run
skips the steps that finished and whose files are still there unchanged, so after a failure
it resumes at the failed step, a finished recipe does nothing unless `force`, and a step
whose files were removed or rewritten since runs again. An existing output folder that this
run did not make is replaced only with `overwrite`. Data flows one way: each step reads what
the previous ones wrote (the output folder, the recorded sources).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import re
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..errors import (
    ClusterError,
    ClusterLostError,
    EvalError,
    LrmergeError,
    OutputError,
    RecipeError,
    ReproducibilityError,
)
from ..merge.st_io import Source
from ..recipe.spec import EvalSpec, PushTarget, Recipe
from ..settings import DEFAULT_READ_AHEAD, DEFAULT_SHARD_SIZE

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
    built: Any = None  # cluster.Outcome of this release's unit when a Ray worker merged and evaluated it
    replace_output: bool = False  # the merge may replace an existing output (--overwrite, or this run's own)


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


# -- what a step leaves in the output folder, and whether it is still there -----------------

VARYING = ("merge_report.json",)  # its timings change with every merge: checked for presence only


def step_files(name: str, output: Path, result: dict[str, Any]) -> list[str]:
    """The files (relative to the output) that step `name` wrote: the merge everything but the
    evaluation and the card; the evaluation its result files; the card README.md and
    .eval_results/."""
    if not output.is_dir() or "skipped" in result:
        return []
    files = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    if name == "merge":
        return [f for f in files if f != "README.md" and not f.startswith(("eval/", ".eval_results/"))]
    if name == "card":
        return [f for f in files if f == "README.md" or f.startswith(".eval_results/")]
    if name == "eval":
        inside = [Path(f).absolute() for f in (result.get("files") or {}).values()]
        return sorted(str(f.relative_to(output)) for f in inside if f.is_file() and output in f.parents)
    return []


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(output: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    """Per file: its sha256 (None for a file whose content varies), size and mtime."""
    made = {}
    for rel in files:
        st = (output / rel).stat()
        made[rel] = {
            "sha256": None if rel in VARYING else file_sha256(output / rel),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
    return made


def changed_file(output: Path, made: dict[str, dict[str, Any]]) -> str | None:
    """The first recorded file that is missing or holds other bytes now, else None. A file with
    the recorded size and mtime is taken as unchanged; any other is hashed again."""
    for rel, entry in made.items():
        path = output / rel
        try:
            st = path.stat()
        except OSError:
            return rel
        if entry.get("sha256") is None or (st.st_size, st.st_mtime_ns) == (entry.get("size"), entry.get("mtime_ns")):
            continue
        if st.st_size != entry.get("size") or file_sha256(path) != entry["sha256"]:
            return rel
    return None


def is_own_output(state: "RunState", output: Path) -> bool:
    """Whether the output folder holds this run's merge, as it wrote it."""
    made = state.step("merge").get("made")
    return made is not None and output.is_dir() and changed_file(output, made) is None


def may_replace_output(state: "RunState", plan: list[tuple[str, str]], output: Path, overwrite: bool) -> bool:
    """Whether the merge may replace the output folder; raises OutputError, before any work,
    when the merge must run and an output it may not replace is there."""
    allowed = overwrite or is_own_output(state, output)
    if ("merge", "run") in plan and os.path.lexists(output) and not allowed:
        raise OutputError(
            f"output {output} already exists and is not this run's merge (or changed since it was "
            "made); pass --overwrite to replace it once the new merge is complete"
        )
    return allowed


# -- steps: each returns a JSON-able result, or {"skipped": reason} ------------------------


def resolve_sources(
    recipe: Recipe, *, token: str | None = None, download: bool = False, read_ahead: int = DEFAULT_READ_AHEAD
) -> dict[str, Source]:
    """Every model of the recipe, ready to read; Hub ids are pinned to their sha and checked
    from their headers first. Hub weights not in the HF cache are read from the Hub during
    the merge (range requests), or with `download` downloaded into the cache first."""
    if all(ref.is_local for ref in recipe.all_refs()):
        from ..merge.engine import local_sources

        return local_sources(recipe)
    from ..hub.sources import materialize_sources, stream_sources

    if download:
        return materialize_sources(recipe, token=token)
    return stream_sources(recipe, token=token, read_ahead=read_ahead)


# -- the unit a Ray worker runs for a release or a sweep point, and the driver's check -------


def tensor_sha256(folder: Path) -> dict[str, str]:
    """sha256 of every tensor's bytes in a model folder, by tensor name."""
    from ..merge.st_io import SafetensorsModel

    model = SafetensorsModel(folder, folder.name)
    try:
        return {name: hashlib.sha256(model.array(name).data).hexdigest() for name in sorted(model.tensors)}
    finally:
        model.close()


def build_unit(folder: Path, recipe: Recipe, spec: EvalSpec | None, *, device: str) -> dict[str, Any]:
    """Merge the recipe into `folder` and evaluate it with `spec` (None: no evaluation), on
    whichever machine runs this: Hub models are pulled there (with that machine's HF_TOKEN),
    local paths must exist there. Returns the merge report, the evaluation (or its error:
    the unit still succeeds), the evaluation's result files and the sha256 of every tensor."""
    from ..merge.engine import merge

    sources = resolve_sources(recipe)
    report = merge(recipe, sources, folder, device=device, overwrite=True, progress=False)
    evaluation, eval_error = None, None
    if spec is not None:
        from ..evaluate.lm_eval import evaluate_for_run

        try:
            evaluation = evaluate_for_run(folder, recipe, spec, sources=sources)
            evaluation["files"] = {
                role: str(Path(path).relative_to(folder)) for role, path in evaluation["files"].items()
            }
        except EvalError as e:
            eval_error = str(e)
    eval_files = {
        str(p.relative_to(folder)): p.read_text(encoding="utf-8") for p in sorted((folder / "eval").rglob("*.json"))
    }
    return {
        "report": report,
        "eval": evaluation,
        "eval_error": eval_error,
        "eval_files": eval_files,
        "sha256": tensor_sha256(folder),
    }


def built_result(outcome: Any) -> dict[str, Any]:
    """The unit's result, or the worker's failure as an error."""
    if outcome.error is not None:
        where = f" on node {outcome.node['ip']}" if outcome.node else ""
        raise ClusterError(f"the Ray task failed{where}: {outcome.error}")
    return outcome.result


def merge_verified(
    recipe: Recipe,
    sources: dict[str, Source],
    output: Path,
    expected: dict[str, str],
    *,
    device: str,
    files: dict[str, str],
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge again here and install at `output` (with `files` added, e.g. the worker's
    evaluation results) only if every tensor hashes to what the worker reported. An existing
    output is replaced only with `overwrite`."""
    from ..merge.engine import beside, clean_stale, install_atomically, merge, output_lock

    staging = beside(output, "verify", os.getpid())
    output.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(output):  # one publisher at a time; what a killed one left goes first
        clean_stale(output)
        try:
            report = merge(recipe, sources, staging, device=device, overwrite=True, progress=progress)
            here = tensor_sha256(staging)
            differ = sorted(n for n in set(here) | set(expected) if here.get(n) != expected.get(n))
            if differ:
                raise ReproducibilityError(
                    f"{output.name}: {len(differ)} of {len(here)} tensors of the merge made here differ from the "
                    f"worker's (first: {differ[0]}); nothing was written at {output}. Run the same lrmerge-hub, "
                    "numpy and torch versions on every node"
                )
            for rel, text in files.items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                (staging / rel).write_text(text, encoding="utf-8")
            install_atomically(staging, output, overwrite=overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return report


def step_pull(ctx: RunContext) -> dict[str, Any]:
    """Pin every Hub id to a sha, check compatibility from headers, download what is needed."""
    spec = ctx.recipe.eval
    compare = spec is not None and spec.compare and not ctx.skip_eval  # serves the sources: needs their weights
    ctx.sources = resolve_sources(
        ctx.recipe, token=ctx.token, download=ctx.download or compare, read_ahead=ctx.read_ahead
    )
    return {
        "sources": {
            k: {"repo_id": s.repo_id, "revision": s.revision, "path": str(s.path), "streamed": s.reader is not None}
            for k, s in ctx.sources.items()
        }
    }


def recorded_sources(ctx: RunContext, recorded: dict[str, dict[str, Any]]) -> dict[str, Source]:
    """The sources a finished pull step recorded (a streamed one is read from the Hub again)."""
    from ..hub.sources import streamed_source

    share = ctx.read_ahead // max(1, sum(bool(v.get("streamed")) for v in recorded.values()))
    return {
        k: streamed_source(v["repo_id"], v["revision"], Path(v["path"]), token=ctx.token, read_ahead=share)
        if v.get("streamed")
        else Source(Path(v["path"]), v["repo_id"], v["revision"])
        for k, v in recorded.items()
    }


def step_merge(ctx: RunContext) -> dict[str, Any]:
    """Merge; with a push target each finished shard is uploaded as the merge goes (the push
    step's commit then makes them visible, all at once)."""
    from ..merge.engine import merge

    if ctx.built is not None:  # a worker merged and evaluated it: merge again here and compare
        unit = built_result(ctx.built)
        report = merge_verified(
            ctx.recipe,
            ctx.sources,
            ctx.output,
            unit["sha256"],
            device=ctx.device,
            files=unit["eval_files"],
            progress=ctx.progress,
            overwrite=ctx.replace_output,
        )
        return {
            "output": str(ctx.output),
            "stats": report["stats"],
            "weights_kept": True,
            "retention": {m["model"]: m["retention"] for m in report["models"]},
            "verified": {"tensors": len(unit["sha256"]), "worker_node": ctx.built.node},
        }
    target = push_target(ctx)
    uploader = None
    if target is not None:
        from ..hub.publish import ShardUploader

        uploader = ShardUploader(
            target.repo,
            revision=target.revision,
            create_pr=target.create_pr,
            private=target.private,
            keep=ctx.keep,
            token=ctx.token,
        )
    report = merge(
        ctx.recipe,
        ctx.sources,
        ctx.output,
        device=ctx.device,
        overwrite=ctx.replace_output,
        progress=ctx.progress,
        shard_size=ctx.shard_size,
        on_shard=uploader,
    )
    ctx.uploaded = uploader.operations if uploader else []
    stats = {**report["stats"], "bytes_uploaded": uploader.bytes_uploaded if uploader else 0}
    return {
        "output": str(ctx.output),
        "stats": stats,
        "weights_kept": ctx.keep,
        "retention": {m["model"]: m["retention"] for m in report["models"]},
    }


def step_eval(ctx: RunContext) -> dict[str, Any]:
    spec = ctx.recipe.eval
    if spec is None or ctx.skip_eval:
        return {"skipped": "the recipe has no eval section" if spec is None else "--skip-eval"}
    if ctx.built is not None:  # evaluated by the worker; its result files are in the output now
        unit = built_result(ctx.built)
        if unit["eval_error"]:
            raise EvalError(f"{unit['eval_error']} (on node {ctx.built.node.get('ip')})")
        evaluation = dict(unit["eval"])
        evaluation["files"] = {role: str(ctx.output / rel) for role, rel in evaluation["files"].items()}
        return {**evaluation, "node": ctx.built.node}
    from ..evaluate.lm_eval import evaluate_for_run

    return evaluate_for_run(ctx.output, ctx.recipe, spec, sources=ctx.sources)


def step_card(ctx: RunContext) -> dict[str, Any]:
    from ..card.build import write_card
    from ..card.inputs import source_dirs_for

    target = push_target(ctx)
    path = write_card(
        ctx.output, repo_id=target.repo if target else None, source_dirs=source_dirs_for(ctx.recipe, ctx.sources)
    )
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
    from ..hub.publish import push

    result = push(
        ctx.output,
        target.repo,
        private=target.private,
        create_pr=target.create_pr,
        revision=target.revision,
        tag=target.tag,
        token=ctx.token,
        uploaded=tuple(ctx.uploaded),
    )
    if not ctx.keep:  # shards the Hub took inside the commit (regular upload mode) leave the disk now
        for shard in ctx.output.glob("*.safetensors"):
            shard.unlink()
    return result.to_dict()


STEP_FUNCTIONS: dict[str, Callable[[RunContext], dict[str, Any]]] = {
    "pull": step_pull,
    "merge": step_merge,
    "eval": step_eval,
    "card": step_card,
    "push": step_push,
}


def plan_steps(state: RunState, force: bool, output: Path) -> list[tuple[str, str]]:
    """(step, 'run' | 'done') for every step, in order: everything after a step that must run, runs.
    A step is done only while the files it wrote are still in the output, unchanged."""
    plan, rerun = [], force
    for name in STEPS:
        entry = state.step(name)
        done = entry.get("status") == "done"
        if done and entry.get("made") and changed_file(output, entry["made"]) is not None:
            done = False  # removed or rewritten since (e.g. by `lrmerge merge --overwrite`): make it again
        if name in ("merge", "card") and not output.exists():
            done = False  # the output was removed since: make it again
        if (
            name == "merge"
            and state.step("push").get("status") != "done"
            and output.exists()
            and not any(output.glob("*.safetensors"))
        ):
            done = False  # its shards were uploaded and removed (--no-keep) but never committed: again
        rerun = rerun or not done
        plan.append((name, "run" if rerun else "done"))
    return plan


def run_recipe(
    recipe: Recipe,
    *,
    output: Path | None = None,
    device: str = "auto",
    force: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    push_repo: str | None = None,
    skip_eval: bool = False,
    progress: bool = True,
    download: bool = False,
    read_ahead: int = DEFAULT_READ_AHEAD,
    shard_size: int = DEFAULT_SHARD_SIZE,
    keep: bool = True,
    built: Any = None,
    overwrite: bool = False,
    echo: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Run every step of the recipe that has not finished yet; return the run summary.

    The merge step replaces an existing output folder only when it is this run's own merge,
    unchanged, or with `overwrite` (and then only once the new merge is complete).

    `built`: the Outcome of this recipe's unit (build_unit) from a Ray worker: the merge step
    then merges again here and checks the worker's tensor hashes, and the eval step takes the
    worker's evaluation."""
    output = output_for(recipe, output)
    if not keep and not (push_repo or recipe.push):
        raise RecipeError("--no-keep removes the merged weights once pushed: give a push target (--push or push:)")
    if not keep and recipe.eval is not None and not skip_eval:
        raise RecipeError("--no-keep removes the merged weights the evaluation needs: add --skip-eval, or keep them")
    run_dir = run_dir_for(recipe, output)
    state = RunState(run_dir, recipe.sha256())
    plan = plan_steps(state, force, output)
    if built is not None:  # the worker's merge and evaluation go together
        plan = [(n, "run" if STEPS.index(n) >= STEPS.index("merge") else a) for n, a in plan]
    summary: dict[str, Any] = {
        "recipe_sha256": recipe.sha256(),
        "run_dir": str(run_dir),
        "output": str(output),
        "steps": {},
    }
    if dry_run:
        summary["dry_run"] = True
        summary["plan"] = [{"step": s, "action": a} for s, a in plan]
        summary["output_exists"] = output.exists() or output.is_symlink()
        if push_repo or recipe.push:
            summary["push"] = push_repo or (recipe.push.repo if recipe.push else None)
        return summary

    replace_output = may_replace_output(state, plan, output, overwrite)
    ctx = RunContext(
        recipe=recipe,
        output=output,
        device=device,
        token=token,
        push_repo=push_repo,
        skip_eval=skip_eval,
        progress=progress,
        download=download,
        read_ahead=read_ahead,
        shard_size=shard_size,
        keep=keep,
        built=built,
        replace_output=replace_output,
    )
    for name, action in plan:
        if action == "done":
            summary["steps"][name] = {"status": "done", "reused": True, **state.step(name).get("result", {})}
            if name == "pull":
                ctx.sources = recorded_sources(ctx, state.step(name)["result"]["sources"])
            echo(f"{name}: done earlier, skipped")
            continue
        changed = state.step(name).get("status") == "done" and changed_file(output, state.step(name).get("made") or {})
        if changed and not force:
            echo(f"{name}: {changed} is missing or changed since this step made it; running it again")
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
        state.record(
            name,
            status="done",
            result=result,
            seconds=seconds,
            made=fingerprint(output, step_files(name, output, result)),
        )
        summary["steps"][name] = {"status": status, "seconds": seconds, **result}
        echo(f"{name}: {status}" + (f" ({result['skipped']})" if status == "skipped" else f" in {seconds:.1f} s"))
    return summary


def output_for(recipe: Recipe, output: Path | str | None = None) -> Path:
    target = output or recipe.output
    if target is None:
        raise RecipeError("output: the recipe names no output folder; add `output:` or pass --out")
    return Path(target).absolute()


def needs_build(recipe: Recipe, output: Path, *, force: bool, overwrite: bool = False) -> bool:
    """Whether the merge or the evaluation of this release must run (else card/push at most).
    Raises OutputError when the merge would replace an output it may not."""
    state = RunState(run_dir_for(recipe, output), recipe.sha256())
    plan = plan_steps(state, force, output)
    if any(action == "run" for name, action in plan if name in ("merge", "eval")):
        may_replace_output(state, [(n, "run" if n == "merge" else a) for n, a in plan], output, overwrite)
        return True
    return False


def run_releases(
    recipes: list[Recipe],
    *,
    executor: Any = None,
    push_repos: list[str | None] | None = None,
    device: str | None = None,
    skip_eval: bool = False,
    force: bool = False,
    echo: Callable[[str], None] = lambda s: None,
    **options: Any,
) -> list[dict[str, Any]]:
    """`lrmerge run A.yaml B.yaml`: every release, one summary each (a failed one carries its
    `error`; the others still run). Locally one after another; with a Ray executor each
    release's merge and evaluation is a task (build_unit), and each is published here (merged
    again, hashes checked, carded, pushed) as its task finishes."""
    from ..settings import default_device

    push_repos = push_repos or [None] * len(recipes)
    outputs = [output_for(r) for r in recipes]
    devices = [device or r.device or default_device() for r in recipes]
    if len(set(outputs)) < len(outputs):
        twice = next(o for o in outputs if outputs.count(o) > 1)
        raise RecipeError(f"two recipes write to {twice}: give each its own `output:`")
    summaries: dict[int, dict[str, Any]] = {}

    def release(i: int, built: Any = None) -> None:
        try:
            summaries[i] = run_recipe(
                recipes[i],
                output=outputs[i],
                device=devices[i],
                force=force,
                push_repo=push_repos[i],
                skip_eval=skip_eval,
                built=built,
                echo=echo,
                **options,
            )
        except LrmergeError as e:
            summaries[i] = {**getattr(e, "run_summary", {"output": str(outputs[i])}), "error": str(e)}
            echo(f"{outputs[i].name}: failed: {e}")

    remote = []
    for i, r in enumerate([] if executor is None or options.get("dry_run") else recipes):
        try:
            if needs_build(r, outputs[i], force=force, overwrite=options.get("overwrite", False)):
                remote.append(i)
        except LrmergeError as e:  # refused before its task runs; the others go on
            summaries[i] = {"output": str(outputs[i]), "steps": {}, "error": str(e)}
            echo(f"{outputs[i].name}: failed: {e}")
    for i in range(len(recipes)):
        if i not in remote and i not in summaries:
            release(i)
    if remote:
        from .cluster import Unit

        units = {
            str(i): Unit(
                outputs[i].name,
                build_unit,
                (recipes[i], None if skip_eval else recipes[i].eval),
                {"device": devices[i]},
            )
            for i in remote
        }
        try:
            for outcome in executor.run(units):
                i = int(outcome.key)
                echo(f"{outputs[i].name}: built on node {outcome.node.get('ip', '?')}; publishing here")
                release(i, built=outcome)
        except ClusterLostError as e:  # the cluster is gone: every release not published yet failed with it
            for i in remote:
                if i not in summaries:
                    summaries[i] = {"output": str(outputs[i]), "error": str(e)}
                    echo(f"{outputs[i].name}: failed: {e}")
    return [summaries[i] for i in range(len(recipes))]


PLAIN_URL = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]+)?(/[A-Za-z0-9._~%/@+=-]*)?")


def summary_markdown(summary: dict[str, Any]) -> str:
    """A run summary as Markdown: the steps, the retention numbers and the evaluation table.
    Every value from the summary is escaped for where it lands (text, table cell, code span):
    the file may come from anywhere, and the Markdown lands in a CI job summary."""
    from ..card.body import code_span, md_text

    if not summary:
        return "### lrmerge run\n\nNo summary was written (the run failed before it started).\n"
    if isinstance(summary.get("runs"), list):  # several releases run as one batch
        return "\n".join(summary_markdown(s) for s in summary["runs"])

    def cell(value: Any) -> str:
        return md_text(value, in_table=True)

    name = Path(str(summary.get("output", "model"))).name
    lines = [f"### lrmerge run: {md_text(name)}", ""]
    if summary.get("error"):
        lines += [f"**Failed:** {md_text(summary['error'])}", ""]
    if summary.get("dry_run"):
        lines += [
            "Dry run: " + ", ".join(f"{md_text(p['step'])} ({md_text(p['action'])})" for p in summary["plan"]),
            "",
        ]
        return "\n".join(lines) + "\n"
    lines += ["| step | status | seconds |", "|---|---|---|"]
    steps = summary.get("steps", {})
    # JSON output sorts keys; show the steps in the order they ran (unknown names last, as given)
    for step in sorted(steps, key=lambda s: STEPS.index(s) if s in STEPS else len(STEPS)):
        info = steps[step]
        status = str(info.get("status", "?")) + (" (earlier run)" if info.get("reused") else "")
        if info.get("skipped"):
            status += f": {info['skipped']}"
        lines.append(f"| {cell(step)} | {cell(status)} | {cell(info.get('seconds', ''))} |")
    retention = summary.get("steps", {}).get("merge", {}).get("retention") or {}
    rows = [(m, r) for m, r in retention.items() if r]
    if rows:
        lines += ["", "| model | kept by trim | retention |", "|---|---|---|"]
        lines += [
            f"| {cell(m)} | {int(r['kept']):,} | {float(r['fraction']):.1%} |"
            for m, r in rows
            if r.get("fraction") is not None
        ]
    scores = summary.get("steps", {}).get("eval", {}).get("scores") or []
    if scores:
        lines += ["", "| model | task | metric | value |", "|---|---|---|---|"]
        lines += [
            f"| {cell(s.get('model', name))} | {cell(s['task'])} | {cell(s['metric'])} | {float(s['value']):.4f} |"
            for s in scores
        ]
    sample = summary.get("steps", {}).get("eval", {}).get("sample")
    if sample:
        lines += ["", f"Served answer to {code_span(sample['prompt'])}: {code_span(sample['answer'])}"]
    push = summary.get("steps", {}).get("push", {})
    if push.get("status") == "done" and not push.get("skipped"):
        where = str(push.get("pr_url") or push.get("commit_url") or push.get("repo_id", ""))
        # a plain http(s) URL stays one that GitHub links; anything else is shown as code
        lines += ["", f"Pushed: {where if PLAIN_URL.fullmatch(where) else code_span(where)}"]
    return "\n".join(lines) + "\n"
