"""Ctrl-C (SIGINT), SIGTERM and SIGHUP, as what Slurm, Kubernetes and ``timeout`` send, are one
thing: a request to stop, which ends ``vibench`` with the shell's code (128 + the signal's
number) and one line, at whatever moment it comes.

The policy, in one place: in training (``deferred``) a signal is recorded and the loop stops
at a safe point, saving first. Anywhere else it raises ``Signalled`` at once, unless the
process is inside an import: an exception there can leave a module half-imported for code that
goes on (numpy without its functions), so it is raised as soon as the import is over, and a
second signal meanwhile ends the process at once. Where the interpreter cannot raise it (a
finalizer or callback that ran during the signal: Python would print "Exception ignored" and
drop it), it is deferred the same way. ``finishing`` covers the process's last moments, after
the command's code is known."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import NoReturn

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RETRY_SECONDS = 0.02  # how often a signal deferred out of an import looks for the import's end

# Every stop signal this process was sent, first first, and those raised nowhere yet.
received: list[int] = []
_pending: list[int] = []
_python_unraisable = sys.unraisablehook  # the hook ``install`` replaces: the rest go there


class Signalled(KeyboardInterrupt):
    """A stop signal outside the training loop (set-up, loading): stop now, nothing to save."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def first() -> int | None:
    """The first stop signal this process was sent, if any."""
    return received[0] if received else None


def _importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside an import (below one of importlib's own frames)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _raise(signum: int, frame: FrameType | None) -> None:
    received.append(signum)
    if _pending:  # a second signal while the first waits for an import to end
        stop_now(_pending[0])
    if _importing(frame):
        _defer(signum)
        return
    raise Signalled(signum)


def _retry(signum: int, frame: FrameType | None) -> None:
    """The timer's tick: raise the deferred signal once the import is over."""
    if not _pending:
        return
    if _importing(frame):
        _retry_later()
        return
    raise Signalled(_pending.pop(0))


def _defer(signum: int) -> None:
    """Raise ``signum`` at the next safe point rather than now."""
    _pending.append(signum)
    _retry_later()


def _retry_later() -> None:
    signal.signal(signal.SIGALRM, _retry)
    signal.siginterrupt(signal.SIGALRM, False)  # a tick restarts a system call, never fails it
    signal.setitimer(signal.ITIMER_REAL, RETRY_SECONDS)


def _take_pending() -> list[int]:
    """The signals deferred out of an import and not raised yet; none is left to raise."""
    taken = list(_pending)
    _pending.clear()
    if taken:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return taken


def stop_now(signum: int) -> NoReturn:
    """End the process at once, as a stop signal asks where nothing is left to save: the
    output so far flushed, one line, the shell's code. No Python code runs after it (no
    thread, no exit handler can hang or abort the exit)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(OSError):
        os.write(2, b"interrupted\n")
    os._exit(128 + signum)


def install() -> None:
    """Make SIGINT, SIGTERM and SIGHUP stop the process (a ``Signalled``), outside the
    training loop, where there is nothing to save. Called first thing by ``vibench``."""
    global _python_unraisable
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise)
        if sys.unraisablehook is not _unraisable:
            _python_unraisable = sys.unraisablehook
            sys.unraisablehook = _unraisable


def _unraisable(unraisable: object) -> None:
    """A ``Signalled`` raised where Python can only drop it (inside a finalizer) is raised
    again at the next safe point; anything else is Python's to print."""
    exc = getattr(unraisable, "exc_value", None)
    if isinstance(exc, Signalled) and threading.current_thread() is threading.main_thread():
        _defer(exc.signum)
        return
    _python_unraisable(unraisable)


def _late(signum: int, frame: FrameType | None) -> None:
    received.append(signum)
    stop_now(signum)


def finishing() -> None:
    """The command is over (its exit code known): a stop signal from now on ends the process
    at once with its code, as nothing is left to stop or save; none is left deferred."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _late)
        _take_pending()


class StopRequest:
    """What the signals received so far ask for: the first stops after the step in progress;
    the second also skips the report (the checkpoint and summary.json are still written); a
    third stops at once."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.signals)

    @property
    def hurry(self) -> bool:
        return len(self.signals) > 1

    @property
    def signum(self) -> int:
        return self.signals[0] if self.signals else signal.SIGINT

    def _handle(self, signum: int, frame: object) -> None:
        received.append(signum)
        self.signals.append(signum)
        if len(self.signals) > 2:
            raise Signalled(signum)


@contextlib.contextmanager
def deferred() -> Iterator[StopRequest]:
    """While inside, stop signals are recorded in the StopRequest for the loop to read (with
    any still deferred out of an import)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.signal(signum, request._handle) for signum in STOP_SIGNALS}
    request.signals.extend(_take_pending())
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
