"""Progress while something slow runs in a child process (vLLM starting, lm-eval evaluating).

What users of vLLM, lm-eval and huggingface_hub expect: on a terminal one status line,
rewritten in place, with the elapsed time and the last line of the child's log (so lm-eval's
own progress bar shows through); elsewhere (CI logs, a pipe) a line every
`settings.progress_interval()` seconds. Nothing is printed unless the CLI's human format
turned it on (`show`), the way huggingface_hub's progress bars are switched off globally:
`--format json|quiet` stay silent, and so does the library when called from Python.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from . import settings

_state = {"on": False}
TAIL_BYTES = 16 * 1024  # enough for the last line of any log
TTY_EVERY = 0.5  # seconds between rewrites of the line on a terminal


def show(on: bool) -> None:
    """Turn progress on (the human format) or off (json, quiet, library use: the default)."""
    _state["on"] = on


def enabled() -> bool:
    return _state["on"]


def note(text: str) -> None:
    """One line of progress, when progress is on."""
    if _state["on"]:
        print(printable(text), file=sys.stderr, flush=True)


def printable(text: str) -> str:
    """`text` with control characters written as escapes: a log line cannot move the cursor."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def last_line(path: Path | None, limit: int = 120) -> str:
    """The last non-empty line of a log (a progress bar's latest state: `\\r` ends a line
    too), shortened to `limit` characters; empty when there is none."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    if not lines:
        return ""
    line = printable(lines[-1])
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Ticker:
    """Progress of one wait: `what` (e.g. "vLLM for merged-bo: starting"), the seconds since
    it began and the last line of `log`. Call `tick()` often; it prints only when due."""

    def __init__(self, what: str, log: Path | None = None, *, stream=None, every: float | None = None):
        self.what, self.log = what, log
        self.stream = stream
        self.every = settings.progress_interval() if every is None else every
        self.started = time.monotonic()
        self.last_print = self.started  # the first line comes after `every` (after the note before it)
        self.on_tty = bool(getattr(self._out(), "isatty", lambda: False)())
        self.dirty = False  # a line on the terminal waits to be finished

    def _out(self):
        return self.stream or sys.stderr

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def line(self) -> str:
        last = last_line(self.log)
        return f"{self.what}, {self.elapsed():.0f} s" + (f": {last}" if last else "")

    def tick(self) -> None:
        if not _state["on"] and self.stream is None:
            return
        now = time.monotonic()
        if now - self.last_print < (TTY_EVERY if self.on_tty else self.every):
            return
        self.last_print = now
        out = self._out()
        if self.on_tty:
            width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
            out.write("\r\x1b[K" + self.line()[:width])
            self.dirty = True
        else:
            out.write(self.line() + "\n")
        out.flush()

    def close(self, text: str | None = None) -> None:
        """End the wait: finish the terminal's line, then print `text` (if any) as a line."""
        if not _state["on"] and self.stream is None:
            return
        out = self._out()
        if self.dirty:
            out.write("\r\x1b[K")
            self.dirty = False
        if text:
            out.write(printable(text) + "\n")
        out.flush()
