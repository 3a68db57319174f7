"""Compiled CPU steps kept as AOTInductor packages, in a folder of inductor's cache directory.

A later run of the same step on this machine and torch loads its package (a shared library)
in milliseconds. The key is a record of the step run once eagerly: every torch operation, its
arguments' layouts and where each tensor came from (an input, an earlier operation, or a
constant, whose contents are hashed), with torch's version, this CPU and the source of the
code that wraps and compiles the step. A changed model, guide, loss, optimizer setting or data
layout is a different record, so a different package. Recording needs neither ``make_fx`` nor
inductor, whose imports pull in torch._dynamo (a second a run). Only vibench writes here, as
only inductor writes the rest of that directory, whose compiled code inductor loads the same
way: so both folders must be this user's alone (``check_folders``), and a package is opened
only where the key written inside it is the key the run asked for."""

from __future__ import annotations

import atexit
import contextlib
import getpass
import hashlib
import logging
import os
import platform
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from workbench.rundir import files

FOLDER = "vibench-steps"
METADATA_KEY = "vibench_key"  # the key a package was built under, kept inside it
BUILD_LOCK = ".build.lock"  # held by the one process building a key's package
FAILED = ".failed"  # a line for each build of a key's package that failed
TRIES = 2  # failed builds of a key, each in its own process, before no run tries again
FINAL = "for good: "  # a failure's line that no retry can mend
BUILD_WAIT = 900.0  # seconds a build waits for another process's of the same key
_failed_here: set[str] = set()  # keys this process failed to build: one try a process
FIX = ("remove it, or set TORCHINDUCTOR_CACHE_DIR to a folder of your own (or train.compile: "
       "false)")


def check_folders() -> Path:
    """Make inductor's cache folder and ours in it (mode 0700) or check that they are this
    user's alone: compiled code is loaded from them. An UnsafeFile names the folder; else
    ours is returned."""
    files.private_folder(cache_dir(), FIX)
    return files.private_folder(cache_dir() / FOLDER, FIX)


@contextlib.contextmanager
def trial_stream(seed_offset: int = 0) -> Iterator[None]:
    """A trial run of a step, recorded or traced: on a forked random stream (``seed_offset``
    from the run's seed), its warnings silenced; the run's own stream is left as it was."""
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if seed_offset:
            torch.manual_seed(torch.initial_seed() + seed_offset)
        yield


def record(fn: Callable, inputs: list[torch.Tensor], seed_offset: int = 0) -> str:
    """A digest of the torch operations ``fn(*inputs)`` runs (on a ``trial_stream``): equal
    digests mean equal traced graphs."""
    with trial_stream(seed_offset):
        with _Recording(inputs) as recording:
            out = fn(*inputs)
        recording.note("return", tree_flatten(out)[0])
    return recording.digest.hexdigest()


def steady_record(fn: Callable, inputs: list[torch.Tensor]) -> str | None:
    """``record`` of ``fn`` on two random streams where both are the same (the step runs the
    same operations whatever it draws), else None. Give the tensors ``fn`` reads themselves:
    a copy of one is recorded as a constant, by its contents."""
    first = record(fn, inputs)
    return first if first == record(fn, inputs, seed_offset=1) else None


def key(recorded: str, inputs: list[torch.Tensor], *parts: object) -> str:
    """The package's key: the step's record, its inputs' layouts, what else shapes the
    compiled step (``parts``: the caller's code among them), torch's version and this CPU."""
    digest = hashlib.sha256()
    for part in (torch.__version__, platform.machine(),
                 torch.backends.cpu.get_cpu_capability(), _cpu_flags(), recorded,
                 *map(repr, parts)):
        digest.update(part.encode() + b"\0")
    for tensor in inputs:
        digest.update(_layout(tensor).encode())
    return digest.hexdigest()[:40]


def load(key: str) -> Callable | None:
    """The packaged step under ``key`` (a callable on the list of inputs, returning the list
    of outputs), or None where none is cached or it cannot be loaded."""
    path = _path(key)
    return _open(path, key) if path.is_file() else None


def build(graph: torch.fx.GraphModule, inputs: list[torch.Tensor], key: str) -> Callable | None:
    """Compile ``graph`` with AOTInductor (under the caller's inductor settings) into the
    cache under ``key`` and load it; None where it cannot be packaged (the caller compiles
    otherwise). One process at a time builds a key: inductor writes every build of the same
    graph to the same files, so a second build beside the first could package the other's
    half-written library. A process that waited loads the package the first one built."""
    from torch._inductor import aoti_compile_and_package

    path = _path(key)
    with _building(key) as alone:
        if not alone:
            return None
        if path.is_file():  # built while this process waited (or by an earlier run)
            return _open(path, key)
        if gave_up(key) or key in _failed_here:  # not tried again in every run
            return None
        partial = path.with_name(f".{path.stem}-{os.getpid()}.pt2")  # renamed when whole
        try:
            program = torch.export.export(graph, tuple(inputs), strict=False)
            with _quiet("torch._inductor"):  # its notes on ops it runs through its fallback
                # constants folded when the package loads, not inlined: inlined, a number
                # constant expanded and raised to a power fails to lower (the prior scale
                # of a logistic regression)
                aoti_compile_and_package(program, package_path=str(partial),
                                         inductor_configs={
                                             "aot_inductor.use_runtime_constant_folding": True,
                                             "aot_inductor.metadata": {METADATA_KEY: key}})
            os.chmod(partial, 0o600)
            os.replace(partial, path)
        except OSError:  # a full disk, say: tried again next time
            return None
        except Exception as exc:  # it cannot be lowered, or the compiler broke: noted
            _failed_here.add(key)
            with contextlib.suppress(OSError):
                first = (str(exc).strip().splitlines() or [""])[0][:300]  # not a compiler's log
                note_failure(key, FAILED, f"{type(exc).__name__}: {first}")
            return None
        finally:  # an interrupted or failed build leaves nothing half-written
            partial.unlink(missing_ok=True)
        return _open(path, key)


def note_failure(key: str, suffix: str, why: str, final: bool = False) -> None:
    """Add ``why`` (one line) to ``key``'s note of failures (``suffix``: the package's build,
    or the background child's); after ``TRIES`` lines, or one ``final``, no run tries that
    again (``gave_up``)."""
    lines = [*failures(key, suffix), f"{FINAL}{why}" if final else why]
    files.write_atomic(file(key, suffix), "".join(f"{line}\n" for line in lines).encode(),
                       mode=0o600)


def failures(key: str, suffix: str = FAILED) -> list[str]:
    """The lines of ``key``'s note of failures (``suffix`` as in ``note_failure``)."""
    try:
        text = files.read_bounded(file(key, suffix), limit=64 * 1024)
    except (OSError, files.UnsafeFile):  # none (or not ours: a new one replaces it)
        return []
    return [line for line in text.decode(errors="replace").splitlines() if line.strip()]


def gave_up(key: str, suffix: str = FAILED) -> bool:
    """Whether ``key``'s build (or background child) failed for good: ``TRIES`` times, or once
    ``final``. A failure may be the machine's passing state (a compiler or torch being
    reinstalled), so it is tried again, but a step that cannot be packaged is not tried in
    every run."""
    noted = failures(key, suffix)
    return len(noted) >= TRIES or any(line.startswith(FINAL) for line in noted)


@contextlib.contextmanager
def _building(key: str) -> Iterator[bool]:
    """Hold ``key``'s build lock, waiting up to ``BUILD_WAIT`` seconds for a process building
    it; yields False where that one is still at it (without ``flock``, True at once)."""
    if files.fcntl is None:
        yield True
        return
    fd, holder = files.try_lock(file(key, BUILD_LOCK), wait=BUILD_WAIT)
    try:
        if holder is None:
            files.note_holder(fd, os.getpid())
        yield holder is None
    finally:
        os.close(fd)


def _open(path: Path, key: str) -> Callable | None:
    """The package's step, where the key written inside it is ``key``: a package copied or
    renamed from another key is refused before its code is loaded."""
    loader = torch._C._aoti.AOTIModelPackageLoader
    try:
        metadata = loader.load_metadata_from_package(str(path), "model")
        if metadata.get(METADATA_KEY) != key:
            return None
        with _unpacked(on_cpu=metadata.get("AOTI_DEVICE_KEY") == "cpu"):
            # torch's own loader, as torch._inductor.package.load_package calls it (which
            # spends a second in Python around these 2 ms)
            return loader(str(path), "model", False, 1, -1).run
    except Exception:  # damaged, say: the caller compiles as before, leaving it be
        return None


@contextlib.contextmanager
def _unpacked(on_cpu: bool) -> Iterator[None]:
    """Torch's loader unpacks a package into a new folder of TMPDIR that only the loader's
    collection removes, which a process's exit skips (2 MB left in /tmp a package a run).
    Here it unpacks into a folder of ours, removed once the package is loaded on the CPU (its
    library is mapped by then); a CUDA package loads its kernels at their first call, so its
    folder goes at exit."""
    folder = tempfile.mkdtemp(prefix="vibench-package-")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = folder
    try:
        yield
    finally:
        if before is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = before
        if on_cpu:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            atexit.register(shutil.rmtree, folder, True)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _path(key: str) -> Path:
    return file(key, ".pt2")


def file(key: str, suffix: str) -> Path:
    """One of ``key``'s files in our folder: its package (``.pt2``), the note why it could not
    be built (``.failed``), its build's lock, and the background compile's
    (``workbench.compile.background``)."""
    return check_folders() / f"{key}{suffix}"


def state(key: str) -> str:
    """Whether ``key``'s step is ``packaged``, ``failed`` (``TRIES`` builds failed: it is not
    tried again) or ``absent`` (perhaps after a failure, tried again)."""
    if _path(key).is_file():
        return "packaged"
    return "failed" if gave_up(key) else "absent"


def cache_dir() -> Path:
    """Inductor's cache directory, as its ``cache_dir_utils.cache_dir`` names it, found
    without importing inductor (whose package imports torch._dynamo)."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given is None:
        try:
            user = getpass.getuser()
        except (KeyError, ModuleNotFoundError, OSError):
            getuid = getattr(os, "getuid", None)
            user = f"uid_{getuid()}" if callable(getuid) else "unknown_user"
        given = os.path.join(tempfile.gettempdir(),
                             "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    return Path(os.path.abspath(given))


class _Recording(TorchDispatchMode):
    """Hashes each torch operation run inside it as ``make_fx`` would trace it: the
    operation, its other arguments, and each tensor argument's layout and origin (an input,
    an earlier operation's output, or a constant, hashed by its contents), and each value
    read into Python."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # no dynamo runs here; guarding the mode would import it (a second)

    def __init__(self, inputs: list[torch.Tensor]):
        super().__init__()
        self.digest = hashlib.sha256()
        self.names = WeakTensorKeyDictionary()  # by identity, as make_fx tracks tensors
        for i, tensor in enumerate(inputs):
            self.names[tensor] = f"input {i}"
        self.made = 0

    def note(self, what: str, leaves: list[Any]) -> None:
        self.digest.update((what + "|" + "|".join(map(self._token, leaves)) + "\n").encode())

    def _token(self, value: Any) -> str:
        if not isinstance(value, torch.Tensor):
            return repr(value)
        name = self.names.get(value)
        if name is None:
            name = self.names[value] = "constant " + hashlib.sha256(_contents(value)).hexdigest()
        return f"{name} {_layout(value)}"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves, spec = tree_flatten((args, kwargs or {}))
        self.note(f"{func} {spec}", leaves)  # before it runs: an in-place op changes them
        out = func(*args, **(kwargs or {}))
        if not isinstance(out, torch.Tensor) and torch.Tag.data_dependent_output in func.tags:
            self.note("value", [out])  # read in Python: the trace keeps it as a constant
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value not in self.names:
                self.names[value] = f"made {self.made}"
                self.made += 1
        return out


def _layout(tensor: torch.Tensor) -> str:
    strides = tensor.stride() if tensor.layout == torch.strided else None
    return repr((tuple(tensor.shape), strides, tensor.dtype, tensor.device.type))


def _contents(value: torch.Tensor) -> bytes:
    """A constant tensor as bytes: its dtype, shape and contents."""
    flat = value.detach().to("cpu").contiguous().reshape(-1)
    return repr((value.dtype, tuple(value.shape))).encode() + \
        flat.view(torch.uint8).numpy().tobytes()


def _cpu_flags() -> str:
    """The instruction sets the CPU reports (Linux), which the compiled kernels may use."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()
