"""Ctrl-C (SIGINT) and SIGTERM, as what Slurm, Kubernetes and ``timeout`` send, are one thing:
a request to stop that a run honours at a safe point and never loses work over."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Signalled(KeyboardInterrupt):
    """A stop signal outside the training loop (set-up, loading): stop now, nothing to save."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, frame: object) -> None:
    raise Signalled(signum)


def install() -> None:
    """Make SIGTERM and SIGHUP stop the process as Ctrl-C does (a ``Signalled``), outside the
    training loop, where there is nothing to save."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise)


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
        self.signals.append(signum)
        if len(self.signals) > 2:
            raise Signalled(signum)


@contextlib.contextmanager
def deferred() -> Iterator[StopRequest]:
    """While inside, stop signals are recorded in the StopRequest for the loop to read."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.signal(signum, request._handle) for signum in STOP_SIGNALS}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
