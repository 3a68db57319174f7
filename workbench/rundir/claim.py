"""Run directories: a new one for every run, never one that holds anything already, and
locked while a process writes it, so two runs never write into one directory."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from workbench.errors import UsageError, one_line
from workbench.rundir import files
from workbench.rundir.layout import LOCK


@dataclass
class RunDir:
    """A run directory this process holds the lock of."""

    path: Path
    fd: int
    created: tuple[Path, ...] = ()  # the directories claiming it made, outermost first
    claimed: bool = False  # this process found it empty and locked it: all it holds is ours

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abandon(self) -> None:
        """Let the directory go and remove what this process put there (a run that failed to
        set up writes nothing): the directory, if claiming made it, with the folders made on
        the way to it that are left empty; else everything in it."""
        self.release()
        if not self.claimed:
            return
        try:
            if self.path in self.created:
                shutil.rmtree(self.path)
            else:
                for child in self.path.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            for folder in reversed(self.created):
                if folder != self.path:
                    folder.rmdir()
        except OSError:  # a folder someone else has written into since stays, as it is
            pass

    def __fspath__(self) -> str:
        return str(self.path)


def make_run_dir(name: str, out: Path | None = None) -> Path:
    """A new, empty run directory: ``out`` if given, else ``runs/<name>-<timestamp>``.

    Never an existing non-empty one, so no run writes over another."""
    return claim(name, out, lock=False).path


def claim(name: str, out: Path | None = None, lock: bool = True) -> RunDir:
    """``make_run_dir``'s directory, locked (``lock``) before it is checked to be empty, so of
    two runs given the same ``--out`` only one gets it."""
    where = f"--out {out}" if out is not None else "runs/"
    try:
        if out is not None:
            if out.exists() and not out.is_dir():
                raise UsageError(f"{where}: already exists and is not a directory")
            made = _missing(out)
            out.mkdir(parents=True, exist_ok=True)
            if any(p.name != LOCK for p in out.iterdir()):
                raise UsageError(f"{where}: already exists and is not an empty directory")
            held = _lock(out, where, made) if lock else RunDir(out, -1, made)
            if any(p.name != LOCK for p in out.iterdir()):
                held.release()
                raise UsageError(f"{where}: already exists and is not an empty directory")
            held.claimed = lock
            return held
        base = Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
        made = _missing(base.parent)
        base.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1000):
            path = base if attempt == 0 else base.with_name(f"{base.name}-{attempt}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            made = (*made, path)
            return _lock(path, where, made, claimed=True) if lock else RunDir(path, -1, made)
    except OSError as exc:
        raise UsageError(f"{where}: cannot make the run directory: {one_line(exc)}") from None
    raise UsageError(f"cannot find a free run directory next to {base}")


def reopen(path: Path, where: str) -> RunDir:
    """An existing run directory, locked for this process (to go on with it)."""
    if not path.is_dir():
        raise UsageError(f"{where}: no such run directory")
    try:
        return _lock(path, where)
    except OSError as exc:
        raise UsageError(f"{where}: cannot lock the run directory: {one_line(exc)}") from None


def _missing(path: Path) -> tuple[Path, ...]:
    """The directories on the way to ``path`` (itself included) that do not exist yet."""
    absent = [p for p in (path, *path.parents) if not p.exists()]
    return tuple(reversed(absent))


def _lock(path: Path, where: str, made: tuple[Path, ...] = (), claimed: bool = False) -> RunDir:
    try:  # never through a link: a planted .lock would have us write over its target
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise files.UnsafeFile(f"{where}: {path / LOCK} is a symbolic link; vibench writes "
                                   "no file through a link (remove it)") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = (path / LOCK).read_text().strip() or "?"
        raise UsageError(f"{where}: another vibench process (pid {pid}) is writing this run "
                         "directory; wait for it to finish") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return RunDir(path, fd, made, claimed)
