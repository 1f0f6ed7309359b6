"""Stop cleanly on SIGINT, SIGTERM and SIGHUP.

By default SIGTERM and SIGHUP end the process at once, leaving a half-written temporary
folder and the output lock behind, and a KeyboardInterrupt raised while a numba kernel
runs surfaces as a SystemError. Inside `handling_signals()` each of the three raises
`Interrupted` instead, so the code on the way out (the engine's cleanup) runs; inside
`deferred()` (around compiled kernels) the signal is acted on when the block ends.
`at_once` runs calls side by side on threads that a stop signal does not wait for.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

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


def at_once(fn: Callable[[T], R], items: list[T], *, undo: Callable[[R], object] | None = None) -> list[R]:
    """`fn` of every item, all at the same time, each on a thread of its own; the results in
    the items' order. When a call fails, `undo` is called on the others' results once all have
    ended, and the first item's error (in the items' order) is raised. Used where each item
    waits on the network one request after another (opening Hub models): side by side, their
    latencies overlap instead of adding up. The threads are daemons, so a stop signal, which
    interrupts the wait for them, ends the process without waiting for a stalled request."""
    if len(items) < 2:
        return [fn(item) for item in items]
    results: list = [None] * len(items)
    errors: list[BaseException | None] = [None] * len(items)

    def run(i: int) -> None:
        try:
            results[i] = fn(items[i])
        except BaseException as e:  # handed to the caller's thread
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,), name=f"lrmerge-{i}", daemon=True) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = next((e for e in errors if e is not None), None)
    if failed is not None:
        for result, error in zip(results, errors, strict=True):
            if error is None and undo is not None:
                undo(result)
        raise failed
    return results
