"""The `lrmerge` command (also `hf-lrmerge`, so it runs as `hf lrmerge`). Thin: parse, call, print."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from . import __version__
from .errors import LrmergeError

FORMAT_OPTION = click.option(
    "--format", "fmt", type=click.Choice(["human", "json", "quiet"]), default="human",
    show_default=True, help="Output format: human text, one JSON object for machines, or nothing.",
)


def emit(fmt: str, data: dict[str, Any], human: Callable[[], None]) -> None:
    """Print `data` as JSON, run the human printer, or print nothing."""
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif fmt == "human":
        human()


def user_errors(fn: Callable) -> Callable:
    """Turn an LrmergeError into `Error: <one line>` on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LrmergeError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("Error: interrupted; nothing was written at the output path", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lrmerge")
def main() -> None:
    """Merge low-resource-language and task models with slack-TIES, card them, push them to
    the Hugging Face Hub, and serve them with vLLM."""


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


def resolve_sources(recipe, *, dry_run: bool = False):
    """Local folders for every model of the recipe (Hub ids are pulled at pinned revisions)."""
    from .merge.engine import local_sources

    return local_sources(recipe)


# --- synth ---


@main.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--hidden", default=64, show_default=True, help="Hidden size (head_dim is hidden/heads).")
@click.option("--layers", default=2, show_default=True)
@click.option("--heads", default=2, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="bfloat16", show_default=True)
@click.option("--extend-language-vocab", default=8, show_default=True,
              help="Extra vocabulary rows the language model adds, as continually pre-trained models often do.")
@click.option("--seed", default=0, show_default=True)
@FORMAT_OPTION
@user_errors
def synth_cmd(out_dir: str, hidden: int, layers: int, heads: int, dtype: str, extend_language_vocab: int,
              seed: int, fmt: str) -> None:
    """Create tiny random base/language/task checkpoints in OUT_DIR (offline demos and tests)."""
    from pathlib import Path

    from .synth import make_family

    paths = make_family(Path(out_dir), hidden=hidden, intermediate=2 * hidden, layers=layers, heads=heads,
                        dtype=dtype, extend_language_vocab=extend_language_vocab, seed=seed)
    emit(fmt, {k: str(v) for k, v in paths.items()},
         lambda: click.echo("wrote " + ", ".join(str(p) for p in paths.values())))


# --- merge ---


@main.command("merge")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), help="Output folder (default: the recipe's `output`).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Where to compute (default: the recipe's `device`, else auto: a GPU when there is one).")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder (only once the merge succeeded).")
@click.option("--dry-run", is_flag=True, help="Check every input and print the plan; write nothing.")
@FORMAT_OPTION
@user_errors
def merge_cmd(recipe_path: str, out: str | None, device: str | None, shard_size: str, overwrite: bool,
              dry_run: bool, fmt: str) -> None:
    """Merge the models a RECIPE names into one model folder."""
    from pathlib import Path

    from .errors import RecipeError
    from .merge.engine import merge
    from .recipe import load_recipe
    from .settings import default_device

    recipe = load_recipe(recipe_path)
    out_dir = Path(out) if out else recipe.output
    if out_dir is None:
        raise RecipeError("output: the recipe names no output folder; add `output:` or pass --out")
    sources = resolve_sources(recipe, dry_run=dry_run)
    report = merge(recipe, sources, out_dir, device=device or recipe.device or default_device(),
                   shard_size=parse_size(shard_size), overwrite=overwrite, dry_run=dry_run,
                   progress=fmt == "human")
    emit(fmt, report, lambda: print_merge_summary(report))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def print_merge_summary(report: dict) -> None:
    if report.get("dry_run"):
        click.echo(f"plan: {report['method']} of {report['tensors']} tensors, {report['parameters']:,} parameters, "
                   f"read {human_bytes(report['bytes_to_read'])}, write {human_bytes(report['bytes_to_write'])} "
                   f"({report['output_dtype']}), tokenizer from {report['tokenizer_source']}")
        click.echo(f"output: {report['output']} (nothing written: dry run)")
        return
    for m in report["models"]:
        r = m.get("retention")
        if r:
            frac = f"{r['fraction']:.1%}" if r["fraction"] is not None else "n/a"
            click.echo(f"{m['role']:>8} {m['model']}: trim kept {r['kept']:,} of {r['total']:,}, "
                       f"election kept {r['agreed']:,} (retention {frac})")
    s = report["stats"]
    click.echo(f"merged {s['tensors']} tensors ({s['parameters']:,} parameters) on {s['device']}: read "
               f"{human_bytes(s['bytes_read'])}, wrote {human_bytes(s['bytes_written'])} in {s['seconds']:.1f} s, "
               f"peak memory {human_bytes(s['peak_rss_bytes'])}")
