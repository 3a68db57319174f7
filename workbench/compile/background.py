"""A step compiled for later runs, in a child process, while this run trains eagerly.

Where ``train.compile: auto`` finds no package of a CPU step and its eager steps cost less than
a first compile, the run trains eagerly at once; where a package would pay in later runs, a
child process (``python -m workbench.train.background``: its own session, nice 10, one thread)
rebuilds the run from the resolved recipe written beside the package, traces, checks and
packages the step into the cache, and exits. The child reads only that recipe, as
``vibench run`` would read it, never a pickle. The hmc stage's gradients are packaged the same
way by their own child (plugins/hmc_package.py), which rebuilds the fit from its run directory
as the pipeline does.

One child at a time on the machine (per cache folder): the child holds an exclusive ``flock``
on the key's lock file and on the folder's (each names its pid) for as long as it lives,
taken by this process before starting it and handed over, so a second run of the same step
starts none; a child that died leaves locks the next run takes over. A run of another step
meanwhile (an automatic pipeline's refit, its hmc stage's gradients, a ``compare`` grid)
starts a child that waits for its turn: it holds one of the folder's waiting slots (a lock
each, ``WAITING`` of them) until it takes the folder's lock (``take_turn``), so a few wait
at most and the rest leave their steps for a later run. A child that fails adds a line to a
note; after two (``package_cache.TRIES``: the first may be the machine's passing state) no
later run starts another for that key. Nothing here makes a run fail: a child that cannot be
started is a note.
``VIBENCH_BACKGROUND_COMPILE=false`` switches it off.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from workbench import environment
from workbench.compile import package_cache
from workbench.config import recipe as recipes
from workbench.errors import one_line
from workbench.rundir import files

ENV = "VIBENCH_BACKGROUND_COMPILE"
CHILD = "workbench.train.background"  # the child's module: a run is set up in train/
RECIPE, LOCK, LOG, FAILED = ".later.yaml", ".later.lock", ".later.log", ".later.failed"
ANY = "any"  # the key of the folder's lock, held by whichever child is at work
# the keys of the folder's waiting slots, each held by a child waiting for its turn: a
# pipeline's first run leaves its first fit's step compiling, its refit's step and its hmc
# stage's gradients waiting
WAITING = ("next-1", "next-2", "next-3")
TURN = "VIBENCH_BACKGROUND_TURN"  # in a waiting child: the descriptor of its slot's lock
TURN_WAIT = 900.0  # seconds a waiting child waits for its turn before it gives up
_turn: list[int] = []  # the folder's lock, held by this child once its turn came
# the run's own environment, less what would make the child one of a torchrun group
NOT_INHERITED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")

_started: dict[Path, str] = {}  # by lock file: one child a process (lr: auto asks twice)
_children: list[subprocess.Popen] = []  # polled as others start: a finished one is reaped


def start(recipe: dict, key: str) -> str | None:
    """Start compiling ``key``'s step for later runs from ``recipe`` (resolved), unless
    switched off, an earlier child failed, or one is at it; the line to say (None: none)."""
    def arguments() -> list[str]:  # the recipe written for the child, as it is started
        text = package_cache.file(key, RECIPE)
        files.write_atomic(text, recipes.dump(recipe).encode(), mode=0o600)
        return [CHILD, str(text), key]

    return start_child(key, arguments, "this step")


def start_child(key: str, arguments: Callable[[], list[str]], what: str) -> str | None:
    """Start ``python -m`` with ``arguments()`` (a module of vibench's and what it reads) to
    package ``key`` for later runs, as ``start``; ``what`` names it in the line said."""
    try:
        if not environment.switch(ENV, True) or files.fcntl is None:  # no flock, no children
            return None
        lock = package_cache.file(key, LOCK)
        return _started.get(lock) or _start(key, lock, arguments, what)
    except Exception as exc:  # the run goes on whatever happens here
        return f"could not start compiling {what} in the background: {one_line(exc)}"


def _start(key: str, path: Path, arguments: Callable[[], list[str]], what: str) -> str | None:
    """The child started, holding ``key``'s lock at ``path`` and the folder's; or None where
    it is packaged or failed before, or a line naming the child at work already."""
    if package_cache.state(key) != "absent" or package_cache.gave_up(key, FAILED):
        return None
    lock = any_lock = next_lock = None
    try:
        lock, holder = files.try_lock(path)
        if holder is not None:
            return (f"a child is compiling {what} for later runs in the background already "
                    f"(pid {holder})")
        any_lock, holder = files.try_lock(package_cache.file(ANY, LOCK))
        if holder is None:
            _started[path] = _spawn(arguments(), key, (lock, any_lock), what)
            return _started[path]
        waiting = []
        for slot in WAITING:
            next_lock, other = files.try_lock(package_cache.file(slot, LOCK))
            if other is None:
                _started[path] = _spawn(arguments(), key, (lock, next_lock), what, after=holder)
                return _started[path]
            os.close(next_lock)
            next_lock = None
            waiting.append(other)
        return (f"another step is being compiled in the background (pid {holder}) and "
                f"{len(waiting)} more wait for their turn (pids {', '.join(waiting)}); {what} "
                "will be compiled by a later run")
    finally:  # the child holds the locks (the same open files) as long as it lives
        for fd in (lock, any_lock, next_lock):
            if fd is not None:
                os.close(fd)


def _spawn(arguments: list[str], key: str, locks: tuple[int, ...], what: str,
           after: str | None = None) -> str:
    """The child, given ``arguments`` and the locked files ``locks``; its pid written in
    each. ``after``: the pid of the child at work, whose turn this one waits for (its second
    lock a waiting slot's)."""
    log = package_cache.file(key, LOG)
    env = {name: value for name, value in os.environ.items() if name not in NOT_INHERITED}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if after is not None:
        env[TURN] = str(locks[1])
    with files.open_for_writing(log) as out:
        child = subprocess.Popen(
            [sys.executable, "-m", *arguments], stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, pass_fds=locks, start_new_session=True,
            env=env)
    for lock in locks:
        files.note_holder(lock, child.pid)
    _children[:] = [c for c in _children if c.poll() is None] + [child]
    once = f" once pid {after} is done" if after is not None else ""
    return (f"compiling {what} for later runs in the background{once} (pid {child.pid}, "
            f"log {log})")


def child_failed(key: str, exc: Exception, final: bool = False) -> int:
    """In a child: say why in its log and note it (``failed``; not so if interrupted), so
    that later runs stop starting children for ``key``; the child's exit code."""
    why = one_line(exc)
    print(f"failed: {why}", flush=True)
    with contextlib.suppress(Exception):
        failed(key, why, final)
    return 1


def take_turn() -> bool:
    """In a child: where it was started to wait for its turn (another child at work), wait
    (up to TURN_WAIT seconds) for the folder's lock, take it for as long as this process
    lives, and let go of its waiting slot for the next run's child. False (and a line in the
    child's log) where the turn did not come; True at once in a child that was started with
    it."""
    slot = os.environ.pop(TURN, None)
    if slot is None:
        return True
    lock, holder = files.try_lock(package_cache.file(ANY, LOCK), wait=TURN_WAIT)
    if holder is not None:
        os.close(lock)
        print(f"the child compiling before this one (pid {holder}) took too long: no turn "
              "came", flush=True)
        return False
    files.note_holder(lock, os.getpid())
    _turn.append(lock)
    os.close(int(slot))
    return True


def failed(key: str, why: str, final: bool = False) -> None:
    """Note that the child of ``key`` failed (one line); after ``package_cache.TRIES`` such
    notes, or one ``final`` (the recipe cannot be set up in another process), no later run
    starts another."""
    package_cache.note_failure(key, FAILED, why, final)
