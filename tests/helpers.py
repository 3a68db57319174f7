"""What the tests share, and the only module a test module imports from ``tests``: the real
``vibench`` command in a child process, a recipe set up and trained through the service layer
as ``vibench run`` does, and waits on a run's own files in place of sleeps."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

from workbench import hookimpl

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
COIN = RECIPES / "coin.yaml"
LONG = "1000000"  # steps: a run that goes on until it is stopped

# The coin's posterior, Beta(16, 14): its mean, mode and sd.
EXACT_MEAN, MODE = 16 / 30, 15 / 28
EXACT_STD = math.sqrt(16 * 14 / (30**2 * 31))
# A quarter of the posterior's sd: a fit's error, whatever the random stream (CPU or CUDA).
TOLERANCE = 0.25 * EXACT_STD
# Nothing but the fit: no evaluation, plots or diagnostic (none of them changes the fit).
QUICK = ["train.eval_every=0", "train.plots=false", "train.diagnostics=false"]
# The seed's settings take 4000 steps; a larger learning rate decaying to 1/50 of itself gets
# there in 500 (on seeds 0-3, every quick guide and loss within 0.62 of TOLERANCE).
FAST = ["optimizer.lr=0.1", "optimizer.schedule=exponential", "optimizer.schedule.gamma=0.992",
        "train.steps=500", *QUICK]
# The machine's own CUDA_VISIBLE_DEVICES, kept by conftest.py before it hides the GPUs.
GPU_DEVICES = None if os.environ.get("VIBENCH_TEST_GPUS", "<unset>") == "<unset>" else \
    os.environ["VIBENCH_TEST_GPUS"]


def vibench(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 300,
            gpu: bool = False, child: bool | None = None) -> subprocess.CompletedProcess:
    """Run ``vibench ARGS`` as a user would, capturing its output and exit code: in this
    process through the command line's own entry (``cli.invoke``), or in a child process
    where the process is what is tested (``child``: its exit, signals or imports), where an
    environment is given (unless ``child=False``: variables read when the command runs,
    not at import) or where it must see the machine's GPUs."""
    if not (child or gpu or (env and child is None)):
        return _in_process(args, cwd, env or {})
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("VIBENCH_DEBUG", None)
    if gpu:
        full_env.pop("CUDA_VISIBLE_DEVICES")
        if GPU_DEVICES is not None:
            full_env["CUDA_VISIBLE_DEVICES"] = GPU_DEVICES
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def _in_process(args: tuple[str, ...], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """``vibench ARGS`` run by ``cli.invoke`` in this process, from ``cwd`` with ``env`` added
    to the environment, with what it printed: the same command line and errors as the
    child's, without importing torch again."""
    import torch

    from workbench import cli
    from workbench.plugins import registry

    stdout, stderr, here = io.StringIO(), io.StringIO(), Path.cwd()
    threads = torch.get_num_threads()
    os.chdir(cwd)
    try:
        with mock.patch.dict(os.environ, env), contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            code = cli.invoke(list(args))
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)  # as --threads leaves it, for the tests that follow
        registry._FILES.clear()  # a test may rewrite a model file between two commands
    return subprocess.CompletedProcess(["vibench", *args], code, stdout.getvalue(),
                                       stderr.getvalue())


def python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -c CODE`` in a fresh interpreter from the repository, capturing its output:
    what importing a module does to a process (the modules it pulls in, say)."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


def arviz():
    """ArviZ, imported without its announcement of 1.0 (a FutureWarning)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz
    return arviz


def exported_again(run_dir: Path, where: Path) -> tuple:
    """A copy of ``run_dir`` at ``where`` without its posterior.nc, written again by ``vibench
    export``: the run's InferenceData and the export's, to compare."""
    import shutil

    shutil.copytree(run_dir, where)
    (where / "posterior.nc").unlink()
    result = vibench("export", str(where))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(where / "posterior.nc")
    az = arviz()
    return az.from_netcdf(run_dir / "posterior.nc"), az.from_netcdf(where / "posterior.nc")


def start(recipe: Path, out: Path, *args: str) -> subprocess.Popen:
    """``vibench run RECIPE ARGS --out OUT`` started in a child process, not waited for."""
    return subprocess.Popen([sys.executable, "-m", "workbench", "run", str(recipe), *args,
                             "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ---- a recipe through the service layer, in this process --------------------------------

def resolved(*sets: str, source: Path | dict = COIN, registry=None) -> dict:
    """The recipe ``source`` with ``--set`` items ``sets``, checked and with every default
    filled, as ``vibench run`` reads it (``service.prepare``)."""
    from workbench import service
    from workbench.plugins.registry import get_registry

    return service.prepare(source, list(sets), registry or get_registry())


def setup(*sets: str, source: Path | dict = COIN, registry=None, **overrides):
    """The run of ``source`` with ``sets``, its components built and not yet trained; keys
    in ``overrides`` replace the checked recipe's top-level entries (``seed``, ``device``)."""
    from workbench.plugins.registry import get_registry
    from workbench.train.runner import Run

    registry = registry or get_registry()
    recipe = resolved(*sets, source=source, registry=registry)
    return Run.setup({**recipe, **overrides}, registry)


def fitted() -> dict:
    """The param store's parameters now, as detached copies: a fit to compare with another."""
    import pyro

    return {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


def train(run, where: Path) -> dict:
    """Train ``run`` in a new run directory inside ``where``; its summary."""
    run_dir = fresh(where)
    run_dir.mkdir()
    return run.train(run_dir)


def fit(where: Path, *sets: str, source: Path | dict = COIN) -> tuple[dict, Path]:
    """Start, set up and train the recipe as ``vibench run`` does (``service.start``: a run
    directory claimed and locked, ``lr: auto`` searched, the automatic pipeline where no
    guide is named), in a new run directory inside ``where``; its summary and directory."""
    from workbench import service
    from workbench.plugins.registry import get_registry

    job = service.start(source, list(sets), fresh(where), get_registry())
    return job.train(), job.path


def one_fit_recipe(model: str, steps: int) -> dict:
    """A recipe of the automatic pipeline on ``model`` (named by file) with two stages:
    tests/auto_models.py's ``OneFit`` of ``steps`` steps, then psis; no loggers or plots."""
    return {"model": {"name": model}, "data": {}, "loggers": [],
            "train": {"plots": False, "eval_every": 0},
            "auto": {"stages": [{"name": f"{REPO / 'tests' / 'auto_models.py'}:OneFit",
                                 "steps": steps}, "psis"]}}


def coin_fit(where: Path, *sets: str):
    """The coin with ``sets``, without plots or the diagnostic, trained in a new run directory
    inside ``where``: the run and its summary."""
    run = setup(*sets, *QUICK[1:])
    return run, train(run, where)


def fresh(where: Path) -> Path:
    """A name for a run directory inside ``where`` that is not yet taken."""
    return where / f"run{len(list(where.iterdir()))}"


def defaults(kind: str) -> list[str]:
    """The names of the components of ``kind`` that vibench itself ships."""
    from workbench.plugins.registry import get_registry

    registry = get_registry()
    return [n for n in registry.names(kind)
            if registry.components[kind][n].plugin.startswith("vibench.")]


@functools.cache
def refused() -> frozenset[tuple[str, str]]:
    """The (guide, loss) pairs set-up refuses: closed-form KL needs a guide of plain
    densities, and every autoguide samples an auxiliary latent or a point mass."""
    return frozenset((g, "analytic_kl_elbo") for g in defaults("guide") if g != "beta")


class Flaky:
    """A model whose log density is -inf on about a third of its draws."""

    def __call__(self, y):
        import pyro
        import pyro.distributions as dist
        import torch

        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)
        if torch.rand(()) < 0.3:
            pyro.factor("trouble", torch.tensor(float("-inf")))


class FlakyPlugin:
    """Registers ``Flaky`` as the model ``flaky``."""

    @hookimpl
    def register_models(self, register):
        register("flaky", Flaky)


def flaky_registry():
    """The default components and ``flaky``."""
    from workbench.plugins.registry import collect, make_plugin_manager

    pm, problems = make_plugin_manager()
    pm.register(FlakyPlugin(), name="test-flaky")
    return collect(pm, problems)


FLAKY = {"name": "flaky", "data": {"y": 0.5}, "model": "flaky", "guide": "auto_normal",
         "loss": "elbo", "optimizer": {"name": "adam", "lr": 0.05}, "train": {"steps": 200}}


# ---- waiting on a run's files --------------------------------------------------------------

def checkpointed_step(out: Path) -> int:
    """The step of the run directory's checkpoint, read as --resume reads it."""
    import torch

    return torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"]


def wait_for_checkpoint(out: Path, past: int, child: subprocess.Popen | None = None,
                        timeout: float = 120) -> None:
    """Wait until the run has checkpointed a step after ``past`` (the child still running)."""
    def done() -> bool:
        try:
            return checkpointed_step(out) > past
        except (FileNotFoundError, EOFError, RuntimeError):
            return False

    wait_until(done, f"no checkpoint after step {past} in {out}", child, timeout)


def training(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` is in its training loop, where a stop signal has it
    save and stop: it has checkpointed there once (its losses file holds losses; the
    checkpoint before the loop leaves it empty)."""
    from workbench.rundir.layout import LOSSES

    try:
        return (run_dir / LOSSES).stat().st_size > 0
    except OSError:
        return False


def wait_training(run_dirs: list[Path], child: subprocess.Popen | None = None,
                  timeout: float = 120) -> None:
    """Wait until each run in ``run_dirs`` is in its training loop (see ``training``)."""
    wait_until(lambda: all(training(d) for d in run_dirs),
               f"the runs did not start training: {[d.name for d in run_dirs]}", child, timeout)


def wait_until(ready: Callable[[], bool], what: str, child: subprocess.Popen | None = None,
               timeout: float = 120) -> None:
    """Poll ``ready`` until it holds; fail saying ``what`` after ``timeout`` seconds, or at
    once with the child's output if ``child`` ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if child is not None and child.poll() is not None:
            raise AssertionError(f"{what}: the child exited {child.returncode}: "
                                 f"{child.communicate()}")
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


# ---- reading what a command wrote ----------------------------------------------------------

def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV file (compare.csv) as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def alive(pid: int) -> bool:
    """Whether a process exists and has not ended (a zombie has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def runs_of(out: Path) -> dict[int, list[str]]:
    """Each live ``vibench run`` process whose run directory is inside ``out``: its pid and
    command line."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode().split("\0")
        except OSError:
            continue
        if args[1:4] == ["-m", "workbench", "run"] and any(
                a.startswith(f"{out}{os.sep}") for a in args):
            pid = int(cmdline.parent.name)
            if alive(pid):
                found[pid] = args
    return found
