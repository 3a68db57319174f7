"""Every file vibench writes or reads back, handled one way, so that a folder someone else can
write, a planted symbolic link or a hostile file can neither run code nor change a result.

- Files are written whole or not at all (``write_atomic``: a fresh temporary name, created
  with ``O_EXCL`` and ``O_NOFOLLOW``, then renamed over the target, which replaces a link
  rather than writing through it); files that grow while a run lives are opened with
  ``O_NOFOLLOW`` (``open_for_writing``).
- Cache folders are this user's alone (``private_folder``), as pip and ssh check theirs.
- A file read back is bounded in size before it is parsed (``read_bounded``), and a value
  parsed from one in depth and breadth (``check_shape``).
- A lock between processes is an exclusive ``flock`` on a file opened with ``O_NOFOLLOW``
  that names its holder's pid (``try_lock``).

Torch-free, so the commands that only read run directories stay fast.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from workbench.errors import UsageError

try:
    import fcntl
except ImportError:  # no flock (Windows): try_lock is not available
    fcntl = None

MAX_TEXT_BYTES = 64 * 2**20  # a recipe or summary.json read back: far above any real one
MAX_DEPTH = 32  # nesting of a value read back (a recipe's data, a checkpoint's recipe)
MAX_ITEMS = 10**7  # containers and numbers in a value read back


class UnsafeFile(UsageError):
    """A file or folder vibench will not use as it is (a link, someone else's, too big)."""


def write_atomic(path: Path, content: bytes | Callable[[IO[bytes]], Any], *,
                 durable: bool = False, mode: int = 0o644) -> None:
    """Write ``path`` whole or not at all: ``content`` (bytes, or a function writing to the
    open file) goes to a fresh temporary name beside it, which is then renamed over it.
    ``durable``: synced to disk before the rename, so a power cut leaves the old file or the
    new one."""
    with atomic_path(path, mode=mode) as tmp:
        with open(tmp, "r+b") as handle:  # mkstemp made it: no link, no one else's file
            if callable(content):
                content(handle)
            else:
                handle.write(content)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: Path, *, mode: int = 0o644) -> Iterator[Path]:
    """A fresh, empty temporary file beside ``path`` for a writer that wants a file name
    (``torch.save``, h5netcdf): renamed over ``path`` when the block ends, removed if it
    fails."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_for_writing(path: Path, *, append: bool = False) -> IO[bytes]:
    """``path`` opened to write in binary (truncated unless ``append``), refusing to write
    through a symbolic link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if _is_link(path):
            raise UnsafeFile(f"{path}: is a symbolic link; vibench writes no file through a "
                             "link (remove it)") from None
        raise exc
    return os.fdopen(fd, "ab" if append else "wb")


def try_lock(path: Path, wait: float = 0.0) -> tuple[int, str | None]:
    """``path`` opened (never through a link) and locked, exclusive, and None; or, where
    another process still holds it after ``wait`` seconds, the open file and the pid its
    holder wrote in it. The caller closes the file (which releases the lock) or hands it to
    a child. Waiting polls, so a stop signal is handled at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd, None
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return fd, os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            time.sleep(0.05)
    except BaseException:
        os.close(fd)
        raise


def note_holder(fd: int, pid: int) -> None:
    """Write ``pid`` as the holder of the lock open at ``fd``."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{pid}\n".encode(), 0)


def make_folder(path: Path) -> Path:
    """``path`` as a folder of its own: made if missing; a link in its place is refused."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        pass
    if _is_link(path) or not path.is_dir():
        raise UnsafeFile(f"{path}: is not a folder (a link or a file is in its place)")
    return path


def private_folder(path: Path, fix: str) -> Path:
    """``path`` as a folder only this user can write: made with mode 0700 where missing;
    where it exists it must be a real folder, owned by this user and writable by no one
    else, or an UnsafeFile names it and ``fix`` (what the user can do instead)."""
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        raise UnsafeFile(f"{path}: cannot make this cache folder ({exc.strerror}); {fix}"
                         ) from None
    problem = folder_problem(info)
    if problem:
        raise UnsafeFile(f"{path}: {problem}, so what is in it could run code in your runs; "
                         f"{fix}")
    return path


def folder_problem(info: os.stat_result) -> str:
    """Why a folder with this ``lstat`` is not safe to load code from, or ''."""
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_uid != os.geteuid():
        return f"belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"can be written by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return ""


def read_bounded(path: Path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of ``path``, refused (UnsafeFile) where it holds more than ``limit``."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise UnsafeFile(f"{path}: {size:,} bytes, more than vibench reads back "
                             f"({limit:,}); not a file vibench wrote")
        content = handle.read(limit + 1)
    if len(content) > limit:
        raise UnsafeFile(f"{path}: more than {limit:,} bytes; not a file vibench wrote")
    return content


def check_shape(value: Any, where: str, depth: int = MAX_DEPTH, items: int = MAX_ITEMS) -> None:
    """Refuse a value nested deeper than ``depth`` or holding more than ``items`` containers
    and leaves, counting a container met twice (a pickle may share one) each time: whatever
    walks the value later then walks at most that much. Each shared container is measured
    once (its count and height remembered), so the check costs the value's size in memory,
    not the size it unfolds to."""
    measured: dict[int, tuple[int, int]] = {}  # id -> (values it unfolds to, its height)
    too_deep = f"{where}: nested more than {depth} deep"
    too_many = f"{where}: holds more than {items:,} values"

    def measure(node: Any, level: int) -> tuple[int, int]:
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            return 1, -1
        if level >= depth:
            raise UsageError(too_deep)
        known = measured.get(id(node))
        if known is None:
            count, height = 1, 0
            for child in children:
                inner, below = measure(child, level + 1)
                count, height = count + inner, max(height, below + 1)
                if count > items:
                    raise UsageError(too_many)
            known = measured[id(node)] = (count, height)
        if level + known[1] >= depth:
            raise UsageError(too_deep)
        return known

    if measure(value, 0)[0] > items:
        raise UsageError(too_many)


def _is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False
