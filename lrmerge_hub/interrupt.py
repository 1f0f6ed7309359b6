"""Stop cleanly on SIGINT, SIGTERM and SIGHUP.

By default SIGTERM and SIGHUP end the process at once, leaving a half-written temporary
folder and the output lock behind, and a KeyboardInterrupt raised while a numba kernel
runs surfaces as a SystemError. Inside `handling_signals()` each of the three raises
`Interrupted` instead, so the code on the way out (the engine's cleanup) runs; inside
`deferred()` (around compiled kernels) the signal is acted on when the block ends.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived. A KeyboardInterrupt, so that nothing catching Exception swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT


_state = {"active": False, "deferring": 0, "pending": 0, "raised": False}


def _handle(signum: int, frame: object) -> None:
    if _state["raised"]:
        return  # the cleanup after the first signal is running: let it finish
    if _state["deferring"]:
        _state["pending"] = _state["pending"] or signum
        return
    _state["raised"] = True
    raise Interrupted(signum)


@contextmanager
def handling_signals() -> Iterator[None]:
    """Turn the stop signals into `Interrupted` for the duration (main thread only);
    the previous handlers come back afterwards."""
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    _state.update(active=True, deferring=0, pending=0, raised=False)
    try:
        yield
    finally:
        _state["active"] = False
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop signal until the block ends (an exception raised inside a compiled
    kernel would surface as a SystemError), then raise it."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    if _state["pending"] and not _state["deferring"] and _state["active"] and not _state["raised"]:
        signum, _state["pending"], _state["raised"] = _state["pending"], 0, True
        raise Interrupted(signum)
