"""Where ``vibench compare`` runs each ``vibench run``: a child process on this machine
(``local``) or a task on a Ray cluster (``ray``) that runs the same child on its node.

A backend starts a run and waits for its Outcome (exit code, output, why compare stopped it,
or why the run was lost); compare turns outcomes into results, the table and the files the
same way whichever backend ran them. Both stop a run the same way: asked (SIGINT) on the first
Ctrl-C, told (SIGTERM) when its ``--timeout`` is up, killed on a second Ctrl-C or when it has
stopped making progress.
"""

from __future__ import annotations

import ctypes
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from workbench.errors import UsageError, one_line
from workbench.rundir import files
from workbench.rundir.layout import LOCK
from workbench.signals import STOP_SIGNALS

BACKENDS = ("local", "ray")
RAY_INSTALL = "pip install 'vibench[ray]'"
NOT_STARTED = "not started: interrupted"
POLL_SECONDS = 0.25
STOP_IDLE = 30.0  # a run asked to stop is killed after this long without progress
STOP_LIMIT = 120.0  # or this long after it was asked, whatever it does
PR_SET_PDEATHSIG = 1
MARKER = ".vibench-compare"  # in the compare directory: a task that reads it sees its files


@dataclass
class Control:
    """What compare asks of the runs going on; its signal handling sets the flags, the
    backends read them."""

    timeout: float | None = None
    stopping: bool = False  # the live runs are asked to save and stop
    killing: bool = False  # the live runs are killed


@dataclass
class Job:
    """One ``vibench run`` to do: the recipe, its run directory, seed and ``--set`` items."""

    recipe: Path
    run_dir: Path
    seed: int
    sets: list[str] = field(default_factory=list)

    def command(self, run_dir: Path | None = None) -> list[str]:
        """The command line, with this Python, writing to ``run_dir`` (default: the job's)."""
        command = [sys.executable, "-m", "workbench", "run", str(self.recipe),
                   "--out", str(run_dir or self.run_dir), "--seed", str(self.seed)]
        for item in self.sets:
            command += ["--set", item]
        return command


@dataclass
class Outcome:
    """How a run ended, as compare's classification needs it."""

    exit_code: int | None
    stdout: str = ""
    stderr: str = ""
    reason: str = ""  # why compare stopped it: "", "interrupted" or "timed out"
    seconds: float | None = None  # how long the child ran
    lost: str = ""  # the run ended without an exit code (a lost Ray task): why, in a line
    files: bytes | None = None  # the run directory as a .tar.gz, where the driver cannot see it


class Backend(Protocol):
    """Starts runs and waits for them; a context manager around the whole comparison."""

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: Any) -> None: ...

    def prepare(self, compare_dir: Path) -> None:
        """Get ready to run into ``compare_dir``, made once the backend is up."""

    def describe(self, runs: int, jobs: int) -> str:
        """A line for stderr saying where the runs go."""

    def start(self, job: Job) -> Any:
        """Start a run (called under compare's lock, so quickly); a handle for ``wait``."""

    def wait(self, handle: Any, job: Job, control: Control) -> Outcome:
        """Wait for a started run, stopping it as ``control`` asks; the run directory holds
        its files when this returns."""


class LocalBackend:
    """Each run a child process of compare, ``jobs`` at a time, on this machine's cores."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.env = child_env(jobs)
        self.preexec = die_with_parent()

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def prepare(self, compare_dir: Path) -> None:
        pass

    def describe(self, runs: int, jobs: int) -> str:
        return f"{runs} runs, {jobs} at a time"

    def start(self, job: Job) -> tuple[subprocess.Popen, float]:
        return spawn(job.command(), self.env, self.preexec), time.perf_counter()

    def wait(self, handle: tuple[subprocess.Popen, float], job: Job,
             control: Control) -> Outcome:
        process, start = handle
        stdout, stderr, reason = watch(process, job.run_dir, control)
        return Outcome(process.returncode, stdout, stderr, reason, time.perf_counter() - start)


def spawn(command: list[str], env: dict[str, str],
          preexec: Callable[[], None] | None) -> subprocess.Popen:
    """A run's child process, in its own session (out of the terminal's reach: compare alone
    decides when to stop it), with the stop signals unblocked: a Ray worker blocks SIGINT,
    and a child inherits that."""

    def prepare() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if preexec is not None:
            preexec()

    posix = hasattr(signal, "pthread_sigmask")
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=prepare if posix else preexec)


def watch(process: subprocess.Popen, run_dir: Path, control: Control) -> tuple[str, str, str]:
    """A child's stdout and stderr once it ends, and why it was stopped ("" if it was not):
    asked to stop (SIGINT) when ``control.stopping``, told to (SIGTERM) when its time is up;
    then killed when ``control.killing``, or when it has made no progress for STOP_IDLE
    seconds, or STOP_LIMIT seconds after it was asked. A KeyboardInterrupt (how Ray cancels a
    running task) counts as being asked to stop."""
    started = time.monotonic()
    reason, asked, seen, activity = "", 0.0, 0.0, None
    while True:
        try:
            try:
                return (*process.communicate(timeout=POLL_SECONDS), reason)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if not reason:
                if control.stopping:
                    reason, signum = "interrupted", signal.SIGINT
                elif control.timeout is not None and now - started >= control.timeout:
                    reason, signum = "timed out", signal.SIGTERM
                else:
                    continue
                asked = seen = now
                process.send_signal(signum)
                activity = _activity(process.pid, run_dir)
                continue
            latest = _activity(process.pid, run_dir)
            if latest != activity:
                activity, seen = latest, now
            if control.killing or now - seen > STOP_IDLE or now - asked > STOP_LIMIT:
                _kill(process)
        except KeyboardInterrupt:
            control.stopping = True


def child_env(jobs: int) -> dict[str, str]:
    """This environment, with each child's torch on its share of the cores unless the user
    set OMP_NUM_THREADS: parallel runs that each use every core slow one another down."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        threads = str(max(1, cpu_count() // jobs))
        env["OMP_NUM_THREADS"] = threads
        env.setdefault("MKL_NUM_THREADS", threads)
    return env


def cpu_count() -> int:
    """The cores this process may use: in a container or under taskset, fewer than the
    machine has."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:
        return os.cpu_count() or 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send the child SIGTERM when its parent dies, even by
    SIGKILL, so no run is orphaned; None elsewhere. Linux sends it when the thread that
    started the child ends: that thread waits for the child, so not before the parent ends."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl took hold
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _activity(pid: int, run_dir: Path) -> tuple:
    """Something that changes while a child works: its CPU time (where /proc has it) and its
    run directory's files, their sizes and times."""
    try:
        cpu = tuple(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[11:13])
    except OSError:
        cpu = ()
    files = []
    for path in run_dir.rglob("*") if run_dir.is_dir() else []:
        try:
            info = path.stat()
        except OSError:  # replaced as we looked
            continue
        files.append((str(path), info.st_size, info.st_mtime_ns))
    return cpu, sorted(files)


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL a child and whatever it started (its process group: it leads its session),
    which could otherwise hold its output open."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        process.kill()


class RayBackend:
    """Each run a Ray task (``cpus`` CPUs and ``gpus`` GPUs each) on the cluster at
    ``address`` (or RAY_ADDRESS), else on a Ray started here for the comparison with this
    machine's cores and shut down after it. A task runs ``vibench run`` as a child on its
    node, into the compare directory when the node shares the driver's files, else into a
    scratch directory that it sends back whole for compare to write under the compare
    directory."""

    def __init__(self, address: str | None, cpus: float, gpus: float,
                 timeout: float | None = None):
        self.marker: Path | None = None
        self.timeout = timeout  # each task limits its own run: time queued does not count
        self.address = address
        self.cpus, self.gpus = cpus, gpus
        self.token = secrets.token_hex(16)
        # the token the tasks look for: one no marker holds has them copy every run back, as
        # on a cluster without a shared file system (VIBENCH_RAY_COPY_BACK=1, to try that path)
        self.sought = "-" if os.environ.get("VIBENCH_RAY_COPY_BACK") == "1" else self.token
        self.ray: Any = None
        self.task: Any = None
        self.where = ""

    def __enter__(self) -> RayBackend:
        import logging

        self.ray = ray = import_ray()
        connect = self.address or os.environ.get("RAY_ADDRESS")
        if connect:
            _check_reachable(connect)
        try:
            if connect:
                ray.init(address=self.address, logging_level=logging.ERROR,
                         log_to_driver=False)
            else:
                ray.init(num_cpus=cpu_count(), include_dashboard=False,
                         logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UsageError(f"--address {connect}: no Ray cluster there ({one_line(exc)})"
                             if connect else f"could not start Ray here: {one_line(exc)}"
                             ) from None
        self.where = f"the Ray cluster at {connect}" if connect else "a Ray started here"
        try:
            self._check_resources(bool(connect))
        except BaseException:
            ray.shutdown()
            raise
        self.task = ray.remote(run_task).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0, retry_exceptions=False)
        return self

    def _check_resources(self, connected: bool) -> None:
        """A run that asks for more than the cluster has would wait for ever: refused on a
        Ray started here, a warning on a cluster that may grow."""
        have = self.ray.cluster_resources()
        short = [f"--{name}-per-run {want:g} but the cluster has {have.get(key, 0):g} {key}s"
                 for name, key, want in (("cpus", "CPU", self.cpus), ("gpus", "GPU", self.gpus))
                 if want > have.get(key, 0)]
        if short and not connected:
            raise UsageError(f"{short[0]}; start Ray with more, or connect to a cluster "
                             "with --address")
        for line in short:
            print(f"warning: {line}: the runs wait until it has them", file=sys.stderr)

    def prepare(self, compare_dir: Path) -> None:
        """Leave the token in the compare directory, for tasks to tell whether they see it."""
        self.marker = compare_dir.resolve() / MARKER
        files.write_atomic(self.marker, self.token.encode())

    def __exit__(self, *exc: Any) -> None:
        if self.marker is not None:
            self.marker.unlink(missing_ok=True)
        self.ray.shutdown()

    def describe(self, runs: int, jobs: int) -> str:
        gpus = f" and {self.gpus:g} GPU" if self.gpus else ""
        at_once = f", at most {jobs} at a time" if jobs < runs else ""
        return f"{runs} runs as Ray tasks on {self.where}, each with {self.cpus:g} CPU{gpus}" \
               f"{at_once}"

    def start(self, job: Job) -> Any:
        job = Job(job.recipe.resolve(), job.run_dir.resolve(), job.seed, list(job.sets))
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, int(self.cpus)))
        return self.task.remote(job, self.sought, self.timeout, threads)

    def wait(self, handle: Any, job: Job, control: Control) -> Outcome:
        ray = self.ray
        asked = forced = False
        while not ray.wait([handle], timeout=POLL_SECONDS)[0]:
            if control.killing and not forced:
                ray.cancel(handle, force=True)
                forced = True
            elif control.stopping and not asked:
                ray.cancel(handle, force=False)  # the task asks its run to save and stop
                asked = True
        try:
            outcome = ray.get(handle)
        except ray.exceptions.TaskCancelledError:  # still queued, unless its run began
            began = forced or job.run_dir.resolve().exists()
            outcome = Outcome(None, reason="interrupted", lost="killed: its Ray task was "
                              "cancelled" if began else NOT_STARTED)
        except ray.exceptions.RayError as exc:
            outcome = Outcome(None, reason="interrupted" if asked else "", lost=lost(exc))
        if outcome.files is not None:
            try:
                unpack(outcome.files, job.run_dir)
            except files.UnsafeFile as exc:  # the task's files, not the comparison, are bad
                outcome = Outcome(None, outcome.stdout, outcome.stderr, outcome.reason,
                                  outcome.seconds, lost=str(exc))
            outcome.files = None
        return outcome


def _check_reachable(address: str, seconds: float = 5.0) -> None:
    """Refuse a cluster address where nothing answers, at once: Ray itself would retry for
    minutes. Addresses without a port ("auto") are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as exc:
        raise UsageError(f"--address {address}: no Ray cluster answers there "
                         f"({exc.strerror or exc}); start one with `ray start --head`") from None


def import_ray() -> Any:
    """Ray, or a UsageError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--backend ray needs Ray, an optional extra: {RAY_INSTALL}") from None
    return ray


def lost(exc: BaseException) -> str:
    """Why a Ray task gave no outcome, in a line."""
    from ray import exceptions as rx

    cause = one_line(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, rx.WorkerCrashedError):
        return "lost: the Ray worker running it died (killed, or out of memory)"
    if isinstance(exc, getattr(rx, "NodeDiedError", ())) or isinstance(
            exc, getattr(rx, "LocalRayletDiedError", ())):
        return "lost: its Ray node died"
    if isinstance(exc, getattr(rx, "OutOfMemoryError", ())):
        return "lost: Ray killed its worker, short of memory"
    if isinstance(exc, rx.RayTaskError):
        inner = getattr(exc, "cause", None)
        what = f"{type(inner).__name__}: {one_line(inner)}" if inner is not None else cause
        return f"lost: its Ray task failed: {what}"
    return f"lost: {type(exc).__name__}: {cause}"


def run_task(job: Job, token: str, timeout: float | None, threads: str) -> Outcome:
    """A Ray task: the job's ``vibench run`` as a child on this node. It writes into the
    job's run directory when this node sees the driver's compare directory (its MARKER
    holds ``token``), else into a scratch directory returned as a .tar.gz. Cancelled without
    force (a KeyboardInterrupt here), it asks the run to save and stop, as compare does."""
    shared = _holds(job.run_dir.parent / MARKER, token)
    scratch = None if shared else Path(tempfile.mkdtemp(prefix="vibench-run-"))
    run_dir = job.run_dir if scratch is None else scratch / job.run_dir.name
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    control = Control(timeout)
    start = time.perf_counter()
    try:
        process = spawn(job.command(run_dir), env, die_with_parent())
        stdout, stderr, reason = watch(process, run_dir, control)
        outcome = Outcome(process.returncode, stdout, stderr, reason,
                          time.perf_counter() - start)
        if scratch is not None:  # its lines name the folder its files are copied back to
            outcome.files = pack(run_dir)
            outcome.stdout = outcome.stdout.replace(str(run_dir), str(job.run_dir))
            outcome.stderr = outcome.stderr.replace(str(run_dir), str(job.run_dir))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return outcome


def _holds(path: Path, token: str) -> bool:
    try:
        return path.read_text() == token
    except OSError:
        return False


def pack(run_dir: Path) -> bytes:
    """A run directory as .tar.gz bytes (empty if the run made none)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        if run_dir.is_dir():
            for path in sorted(run_dir.rglob("*")):
                if path.is_file() and path.name != LOCK:
                    tar.add(path, arcname=str(path.relative_to(run_dir)), recursive=False)
    return buffer.getvalue()


def unpack(data: bytes, run_dir: Path) -> None:
    """Write a packed run directory under ``run_dir``: plain files only, none outside it.
    Every member is checked here, whatever the tarfile filters of this Python catch (3.11.7's
    ``data`` filter follows a long chain of links out of the folder: CVE-2025-4517); a
    member that is a link, a device, an absolute path or climbs with ``..`` refuses the
    whole archive before anything is written."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            problem = _member_problem(member)
            if problem:
                raise files.UnsafeFile(f"{run_dir}: the run's files from its Ray task hold "
                                       f"{member.name[:200]!r}, {problem}; none were unpacked")
        files.make_folder(run_dir)
        for member in members:
            if member.isfile():
                target = run_dir / member.name
                for folder in reversed(target.relative_to(run_dir).parents[:-1]):
                    files.make_folder(run_dir / folder)
                files.write_atomic(target, tar.extractfile(member).read())


def _member_problem(member: tarfile.TarInfo) -> str:
    """Why an archive member may not be unpacked into a run folder ('' if it may)."""
    if not (member.isfile() or member.isdir()):
        return "which is a link or a special file, not a plain file"
    parts = Path(member.name).parts
    if not parts or member.name.startswith(("/", "\\")) or ".." in parts:
        return "a path that leads outside the run folder"
    return ""
