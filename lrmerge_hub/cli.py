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
