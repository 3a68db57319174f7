"""The errors vibench shows to users, each with the exit code the CLI returns for it."""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class VibenchError(Exception):
    """An error whose message is written for the user; the CLI prints it without a traceback."""

    exit_code = 1

    def lines(self) -> list[str]:
        return [str(self)]


class UsageError(VibenchError):
    """Bad input: a recipe, an option, a file or a command-line argument (exit code 2)."""

    exit_code = 2


class RecipeError(UsageError):
    """Everything wrong with one recipe, reported at once, one line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.source}: {problem}" for problem in self.problems]


class Interrupted(VibenchError):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP); what was learned so far is saved. The exit
    code is the shell's: 128 + the signal's number."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.exit_code = 128 + signum


class RunError(VibenchError):
    """A failure while training, after the recipe was accepted (exit code 1)."""

    exit_code = 1


class CannotWrite(RunError):
    """A file of the run could not be written (a full disk, a quota or file-size limit, a
    folder made read-only); the last checkpoint stands (exit code 1)."""

    def __init__(self, folder: object, exc: OSError):
        no_room = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        advice = ("no room left to write (a full disk, a quota or a file-size limit): free "
                  "space or raise the limit" if no_room else f"check that {folder} can be written")
        super().__init__(f"cannot write to {folder}: {one_line(exc)}; {advice}")


class PeerLost(RunError):
    """Under torchrun, another process of the run stopped or stopped answering (exit code 1);
    the last checkpoint stands."""


MAX_CHOICES = 20  # a hint lists at most this many choices ...
FEW_CHOICES = 10  # ... else names this many and counts the rest


def did_you_mean(word: str, choices: Iterable[str], see: str = "") -> str:
    """A hint naming the closest choices to a misspelt word, or the choices when none is close:
    a few of them when there are many (ten thousand names make no hint), and ``see``, where
    to find them all."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    if not choices:
        return "there are none"
    if len(choices) <= MAX_CHOICES:
        return "choose from " + ", ".join(choices)
    more = f"... and {len(choices) - FEW_CHOICES} more" + (f"; see {see}" if see else "")
    return "choose from " + ", ".join(choices[:FEW_CHOICES]) + ", " + more


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, without the trace tables Pyro appends; for an
    operating system's error, its reason alone (the caller names the file)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = []
    for line in str(exc).strip().splitlines():
        if line.strip().startswith("Trace Shapes"):
            break
        lines.append(line.strip())
    text = " ".join(filter(None, lines)) or type(exc).__name__
    if len(text) <= 300:
        return text
    # A long message keeps its start (what failed) and its end, where libraries put the remedy
    # (MLflow's "set `MLFLOW_ALLOW_FILE_STORE=true` to opt out"), cut at spaces.
    head, tail = text[:150].rsplit(" ", 1)[0], text[-145:].split(" ", 1)[-1]
    return f"{head} ... {tail}"
