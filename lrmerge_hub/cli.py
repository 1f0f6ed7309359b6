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


# --- hub ---
from pathlib import Path  # noqa: E402

TOKEN_OPTION = click.option(
    "--token", default=None, metavar="TOKEN",
    help="Hub token (default: HF_OIDC_RESOURCE in CI, HF_TOKEN, or the token file). Never printed.",
)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


@main.command("pull")
@click.argument("targets", nargs=-1, required=True, metavar="RECIPE|MODEL...")
@click.option("--dry-run", is_flag=True,
              help="Pin and check the models from the Hub (headers and config only); download nothing.")
@TOKEN_OPTION
@FORMAT_OPTION
@user_errors
def pull_cmd(targets: tuple[str, ...], dry_run: bool, token: str | None, fmt: str) -> None:
    """Pin Hub models (org/name[@branch|tag|sha]) to commit shas, check that they can be merged,
    and download what a merge needs into the HF cache. Accepts recipe files and model ids."""
    from . import hub

    if fmt == "quiet":
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    refs, base = hub.refs_from_targets(list(targets))
    plan = hub.pull(refs, base=base, token=token, dry_run=dry_run)

    def human() -> None:
        for m in plan.models:
            pinned = f"{m.spec} -> {m.sha}" if m.repo_id else f"{m.name} (local)"
            click.echo(f"{pinned}: {len(m.tensors)} tensors, {m.parameters:,} parameters, "
                       f"{len(m.files)} files, {_size(m.download_bytes)}")
        verb = "to download" if dry_run else "downloaded into the HF cache"
        click.echo(f"Compatible: {len(plan.models)} models, {plan.tensors} tensors and {plan.parameters:,} "
                   f"parameters each; {_size(plan.download_bytes)} {verb}.")

    emit(fmt, plan.to_dict(), human)


@main.command("push")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private (when it does not exist).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--revision", default=None, help="Branch to push to (created from main if missing).")
@click.option("--tag", default=None, help="Tag the new commit, e.g. v1.")
@click.option("--commit-message", default=None,
              help="Commit summary (default: names the method, the recipe and the source revisions).")
@TOKEN_OPTION
@FORMAT_OPTION
@user_errors
def push_cmd(folder: Path, repo_id: str, private: bool, create_pr: bool, revision: str | None,
             tag: str | None, commit_message: str | None, token: str | None, fmt: str) -> None:
    """Upload a merged model folder (weights, card, recipe, merge report) to REPO_ID as one commit."""
    from . import hub

    result = hub.push(folder, repo_id, private=private, create_pr=create_pr, revision=revision, tag=tag,
                      message=commit_message, token=token)

    def human() -> None:
        click.echo(f"Pushed {result.files} files to {result.repo_id}@{result.revision}: {result.commit}")
        if result.pr_url:
            click.echo(f"Pull request: {result.pr_url}")
        if result.tag:
            click.echo(f"Tagged {result.tag}")

    emit(fmt, result.to_dict(), human)
