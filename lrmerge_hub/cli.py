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


# --- card ---


@main.command("card")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--push", "repo_id", metavar="REPO_ID",
              help="Also commit README.md and .eval_results/ (only those) to this Hub repo, as one commit.")
@click.option("--token", default=None, help="Hub token for --push (default: HF_TOKEN or the saved login). Never printed.")
@FORMAT_OPTION
@user_errors
def card_cmd(model_dir: str, repo_id: str | None, token: str | None, fmt: str) -> None:
    """Write the model card (README.md) of a merged MODEL_DIR from its recipe, merge report and eval/ results.

    Regenerating keeps text outside the generated block and metadata keys lrmerge does not manage.
    """
    from pathlib import Path

    from .card import build_card, existing_card, push_card, save_card

    folder = Path(model_dir)

    if repo_id:
        pushed = push_card(folder, repo_id, token=token)
        data = {"card": str(pushed.path), "repo_id": repo_id, "commit_url": pushed.commit_url,
                "commit": pushed.commit_oid, "files": pushed.files, "notes": pushed.notes}
    else:
        built = build_card(folder, existing=existing_card(folder))
        path = save_card(folder, built)
        data = {"card": str(path), "files": ["README.md"] + [f".eval_results/{n}" for n in built.eval_files],
                "notes": built.notes}

    def human() -> None:
        for note in data["notes"]:
            click.echo(f"note: {note}", err=True)
        click.echo(f"wrote {data['card']}" + (f" and pushed {len(data['files'])} file(s) to {repo_id}: "
                                              f"{data['commit_url']}" if repo_id else ""))

    emit(fmt, data, human)
