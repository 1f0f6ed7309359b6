"""Retries against the Hub, reported as one short line each (or not at all).

huggingface_hub logs every retry of its backoff as two warnings on its own logger
("HTTP Error 503 thrown while requesting GET <url>", then "Retrying in 1s [Retry 1/5].") and
its handler prints them to stderr whatever `--format` says: ten lines before a persistent
503 ends in our one `Error:` line. Inside `reported_retries(human)` (the CLI's
`user_errors`) those warnings are taken off the client's logger; with `human` each retry
becomes one line ("Hub: HTTP 503; retrying (1/5) in 1s"), written above the progress bar,
and `--format json|quiet` print nothing. The range reader (hub/stream.py) reports its own
retries with `note_retry`, which goes the same way. Other warnings of the client pass as
they are.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

CLIENT_LOGGER = "huggingface_hub.utils._http"  # where the client's backoff logs its retries
LOGGER = logging.getLogger("lrmerge_hub.hub")  # our own retry lines

_CAUSE = re.compile(r"(?:HTTP Error (?P<status>\d+)|'(?P<error>.*)') thrown while requesting ", re.S)


def note_retry(cause: str, attempt: int, attempts: int, wait: float) -> None:
    """Report one retry: `cause` (e.g. "org/m: HTTP 503 reading model.safetensors")."""
    LOGGER.warning("Hub: %s; retrying (%d/%d) in %gs", cause, attempt, attempts, round(wait, 2))


def _write(line: str) -> None:
    from tqdm import tqdm  # above a progress bar on stderr, if one is showing

    tqdm.write(line, file=sys.stderr)


class _ClientRetries(logging.Filter):
    """Takes the client's retry warnings off its logger; one line per retry when `human`."""

    def __init__(self, human: bool):
        super().__init__()
        self.human = human
        self.cause = threading.local()  # the warning before "Retrying in" names the cause

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if m := _CAUSE.match(message):
            self.cause.text = f"HTTP {m['status']}" if m["status"] else f"network error ({m['error'][:80]})"
            return False
        if message.startswith(("Retrying in ", "Rate limited. Waiting ")):
            if self.human:
                wait = re.search(r"([\d.]+)s", message)
                counts = re.search(r"\[Retry (\d+)/(\d+)\]", message)
                cause = getattr(self.cause, "text", "no answer")
                if wait and counts:
                    note_retry(cause, int(counts[1]), int(counts[2]), float(wait[1]))
            return False
        return True


class _Echo(logging.Handler):
    def __init__(self, human: bool):
        super().__init__(logging.WARNING)
        self.human = human

    def emit(self, record: logging.LogRecord) -> None:
        if self.human:
            _write(record.getMessage())


@contextmanager
def reported_retries(human: bool) -> Iterator[None]:
    """For the duration: retries (the client's and ours) as one line each on stderr when
    `human`, silent otherwise."""
    client, ours, handler = logging.getLogger(CLIENT_LOGGER), _ClientRetries(human), _Echo(human)
    client.addFilter(ours)
    LOGGER.addHandler(handler)
    propagate, LOGGER.propagate = LOGGER.propagate, False
    try:
        yield
    finally:
        client.removeFilter(ours)
        LOGGER.removeHandler(handler)
        LOGGER.propagate = propagate
