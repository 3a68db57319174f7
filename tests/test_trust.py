"""Runs you can trust: every guide resumes bitwise after SIGKILL, SIGTERM and repeated Ctrl-C
save, a checkpoint cannot run code, a failing report costs nothing else, run directories are
locked, and what --resume may change it records."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.adversarial.test_stop_anywhere import launch
from tests.helpers import COIN, REPO, checkpointed_step, python, start, vibench, wait_for_checkpoint
from workbench import hookimpl

LINEAR = REPO / "recipes" / "linear_regression.yaml"
QUIET = ["--set", "train.plots=false", "--set", "train.eval_every=7"]


def strict_json(path: Path) -> dict:
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def params(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["params"]


def assert_bitwise_equal(a: Path, b: Path) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    different = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not different, different
    sa, sb = strict_json(a / "summary.json"), strict_json(b / "summary.json")
    for key in ("params", "posterior", "final_loss", "steps", "status", "averaged_steps"):
        assert sa[key] == sb[key], key


# The quick suite resumes auto_iaf_normal, whose state includes a neural network's weights
# besides pyro params; every other guide resumes in the slow suite (the coin's beta guide
# also quick in tests/test_resume.py).
QUICK_GUIDE = "auto_iaf_normal"
GUIDES = [pytest.param(LINEAR, g, marks=() if g == QUICK_GUIDE else pytest.mark.slow,
                       id=f"linear_regression-{g}")
          for g in ("auto_normal", "auto_diagonal_normal", "auto_multivariate_normal",
                    "auto_lowrank_multivariate_normal", "auto_delta",
                    "auto_laplace_approximation", QUICK_GUIDE)]


@pytest.mark.parametrize("recipe,guide", [
    pytest.param(COIN, "beta", id="coin-beta", marks=pytest.mark.slow), *GUIDES])
def test_every_guide_resumes_bitwise_after_sigkill(tmp_path: Path, recipe: Path, guide: str):
    args = ["--steps", "300", "--set", f"guide={guide}", "--set", "train.checkpoint_every=10",
            "--set", "train.diagnostics=false", *QUIET]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert vibench("run", str(recipe), *args, "--out", str(whole)).returncode == 0
    child = start(recipe, killed, *args)
    wait_for_checkpoint(killed, 20, child)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert 20 < checkpointed_step(killed) < 300
    resumed = vibench("run", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(whole, killed)


def test_schedule_averaging_and_early_stopping_resume_bitwise(tmp_path: Path):
    args = ["--steps", "400", "--set", "train.checkpoint_every=10",
            "--set", "optimizer.schedule={name: reduce_on_plateau, patience: 20}",
            "--set", "train.average_last=0.5", "--set", "train.early_stop_patience=100000",
            "--set", "train.early_stop_window=20", "--set", "optimizer.lr=0.01", *QUIET]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert vibench("run", str(COIN), *args, "--out", str(whole)).returncode == 0
    child = start(COIN, killed, *args)
    wait_for_checkpoint(killed, 220, child)  # inside the averaging window
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert vibench("run", "--resume", str(killed)).returncode == 0
    assert_bitwise_equal(whole, killed)
    assert strict_json(whole / "summary.json")["averaged_steps"] > 0


# SIGINT's exit code and saved summary are also checked quick by the two-signals test below.
@pytest.mark.parametrize("signum,code", [
    (signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_a_stop_signal_finishes_the_step_saves_and_resumes(tmp_path: Path, signum: int,
                                                           code: int):
    out = tmp_path / "r"
    child = start(COIN, out, "--steps", "100000", "--set", "train.checkpoint_every=25")
    wait_for_checkpoint(out, 25, child)
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == code, stderr
    assert f"vibench run --resume {out}" in stderr and "Traceback" not in stderr
    summary = strict_json(out / "summary.json")
    assert summary["status"] == "interrupted"
    assert checkpointed_step(out) == summary["steps"]
    resumed = vibench("run", "--resume", str(out), "--steps", str(summary["steps"] + 10))
    assert resumed.returncode == 0, resumed.stderr
    assert strict_json(out / "summary.json")["steps"] == summary["steps"] + 10


def test_two_quick_signals_still_leave_a_summary_and_a_good_checkpoint(tmp_path: Path):
    out = tmp_path / "r"
    child = start(COIN, out, "--steps", "100000", "--set", "train.checkpoint_every=25")
    wait_for_checkpoint(out, 25, child)
    child.send_signal(signal.SIGINT)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert "Traceback" not in stderr
    summary = strict_json(out / "summary.json")
    assert summary["status"] == "interrupted" and checkpointed_step(out) == summary["steps"]
    assert (out / "params.pt").is_file()


class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_code_is_refused_without_running_it(tmp_path: Path):
    out = tmp_path / "r"
    assert vibench("run", str(COIN), "--steps", "3", "--out", str(out)).returncode == 0
    marker = tmp_path / "pwned"
    Planted.marker = marker
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["state"]["step"] = 0
    state["evil"] = Planted()
    torch.save(state, out / "checkpoint.pt")
    result = vibench("run", "--resume", str(out), "--steps", "10")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "vibench never loads code" in lines[0], lines
    assert not marker.exists()


def test_a_checkpoint_of_the_wrong_shape_is_one_line(tmp_path: Path):
    out = tmp_path / "r"
    assert vibench("run", str(COIN), "--steps", "3", "--out", str(out)).returncode == 0
    torch.save({"version": 2, "state": {}}, out / "checkpoint.pt")
    result = vibench("run", "--resume", str(out), "--steps", "10")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "lacks" in result.stderr


def test_resume_refuses_a_recipe_edited_to_another_guide(tmp_path: Path):
    out = tmp_path / "r"
    assert vibench("run", str(COIN), "--steps", "5", "--out", str(out)).returncode == 0
    recipe = out / "recipe.yaml"
    edited = yaml.safe_load(recipe.read_text())
    edited["guide"] = {"name": "auto_normal"}
    recipe.write_text(yaml.safe_dump(edited))
    result = vibench("run", "--resume", str(out), "--steps", "10")
    assert result.returncode == 2, result.stderr
    assert "recipe.yaml no longer describes this run (guide.name: 'beta' -> 'auto_normal')" \
        in result.stderr
    for args in (["--set", "model.prior_alpha=2"], ["--set", "seed=4"]):
        result = vibench("run", "--resume", str(out), *args)
        assert result.returncode == 2 and "cannot change when a run goes on" in result.stderr


def test_a_diverged_run_says_how_to_go_on_with_a_smaller_step(tmp_path: Path):
    out = tmp_path / "r"
    diverging = ["--steps", "200", "--set", "guide=auto_normal", "--set", "optimizer.lr=1e30"]
    failed = vibench("run", str(COIN), *diverging, "--out", str(out))
    assert failed.returncode == 1, failed.stderr
    assert strict_json(out / "summary.json")["status"] == "failed"
    hint = failed.stderr.strip().splitlines()[-1]
    assert f"vibench run --resume {out} --set optimizer.lr=1e+29" in hint


def test_resume_takes_new_optimizer_settings_and_records_them(tmp_path: Path):
    out = tmp_path / "r"
    child = start(COIN, out, "--steps", "100000", "--set", "train.checkpoint_every=25")
    wait_for_checkpoint(out, 25, child)
    child.send_signal(signal.SIGINT)
    child.communicate(timeout=120)
    step = strict_json(out / "summary.json")["steps"]
    result = vibench("run", "--resume", str(out), "--set", "optimizer.lr=0.01",
                     "--steps", str(step + 20))
    assert result.returncode == 0, result.stderr
    summary = strict_json(out / "summary.json")
    assert summary["status"] == "completed" and summary["steps"] == step + 20
    assert summary["resumes"] == [{"step": step, "changes": {
        "optimizer.lr": [0.0005, 0.01], "train.steps": [100000, step + 20]}}]
    text = (out / "recipe.yaml").read_text()
    assert "lr: 0.01" in text
    assert f"# resumed at step {step}: optimizer.lr: 0.0005 -> 0.01, train.steps: 100000 -> " \
        f"{step + 20}" in text
    assert yaml.safe_load(text)["optimizer"]["lr"] == 0.01


def test_a_run_killed_during_its_report_writes_it_on_resume(tmp_path: Path):
    out = tmp_path / "r"
    assert vibench("run", str(COIN), "--steps", "20", "--out", str(out)).returncode == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["state"]["reported"] = False  # as the checkpoint saved before the report has it
    torch.save(state, out / "checkpoint.pt")
    before = strict_json(out / "summary.json")
    (out / "summary.json").unlink()
    result = vibench("run", "--resume", str(out))
    assert result.returncode == 0, result.stderr
    after = strict_json(out / "summary.json")
    assert after["posterior"] == before["posterior"] and after["steps"] == 20
    assert "latent_fairness" in result.stdout
    again = vibench("run", "--resume", str(out))
    assert again.returncode == 2 and "already took all its 20 steps" in again.stderr


def test_an_early_stopped_run_goes_on_only_when_asked_for_more_steps(tmp_path: Path):
    out = tmp_path / "r"
    args = ["--steps", "3000", "--set", "train.early_stop_patience=30",
            "--set", "train.early_stop_window=5", "--set", "optimizer.lr=0.05"]
    assert vibench("run", str(COIN), *args, "--out", str(out)).returncode == 0
    stopped = strict_json(out / "summary.json")["stopped_early"]
    assert stopped and stopped < 3000
    refused = vibench("run", "--resume", str(out))
    assert refused.returncode == 2 and f"stopped early at step {stopped}" in refused.stderr
    result = vibench("run", "--resume", str(out), "--steps", "4000")
    assert result.returncode == 0, result.stderr
    assert strict_json(out / "summary.json")["steps"] >= stopped + 30


def test_resume_is_refused_while_the_run_is_still_writing(tmp_path: Path):
    out = tmp_path / "r"
    child = start(COIN, out, "--steps", "100000", "--set", "train.checkpoint_every=25")
    try:
        wait_for_checkpoint(out, 25, child)
        result = vibench("run", "--resume", str(out))
        assert result.returncode == 2
        assert f"another vibench process (pid {child.pid}) is writing" in result.stderr
        same_out = vibench("run", str(COIN), "--out", str(out))
        assert same_out.returncode == 2
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("out", ["/dev/null/x", "/proc/vibench"])
def test_an_unwritable_out_is_one_line_before_set_up(out: str):
    result = vibench("run", str(COIN), "--out", out)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --out {out}: "), lines


def test_no_good_step_gives_strict_json(tmp_path: Path):
    out = tmp_path / "r"
    result = vibench("run", str(COIN), "--set", "guide=auto_normal",
                     "--set", "optimizer.lr=1e30", "--steps", "50", "--out", str(out))
    assert result.returncode == 1
    summary = strict_json(out / "summary.json")
    assert summary["status"] == "failed"


class BrokenReport:
    """A model whose exact posterior has no mean, so the report's summary raises."""

    def __call__(self, y):
        import pyro
        import pyro.distributions as dist

        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    def exact_posterior(self, y):
        return {"z": object()}


class BrokenReportPlugin:
    @hookimpl
    def register_models(self, register):
        register("broken_report", BrokenReport)


def test_a_failing_report_keeps_the_summary_and_parameters(tmp_path: Path):
    from workbench.config import recipe as recipes
    from workbench.plugins.registry import collect, make_plugin_manager
    from workbench.train.runner import Run

    pm, problems = make_plugin_manager()
    pm.register(BrokenReportPlugin(), name="test-broken-report")
    registry = collect(pm, problems)
    raw = {"data": {"y": 0.5}, "model": "broken_report", "guide": "auto_normal",
           "loss": "elbo", "optimizer": {"name": "adam", "lr": 0.05}, "train": {"steps": 20}}
    resolved = recipes.resolve(raw, registry, "broken.yaml")
    summary = Run.setup(resolved, registry).train(tmp_path)
    assert summary["status"] == "completed"
    assert summary["diagnostics"]["reason"].startswith("the report failed")
    assert (tmp_path / "params.pt").is_file()
    assert strict_json(tmp_path / "summary.json")["steps"] == 20


def test_logging_never_changes_the_fit(tmp_path: Path):
    from workbench import service
    from workbench.plugins.registry import get_registry

    summaries = []
    for every in (0, 3):
        job = service.start(COIN, ["train.steps=60", f"train.eval_every={every}",
                                   "train.log_params_every=0", "train.plots=false",
                                   "train.diagnostics=false"], tmp_path / f"e{every}",
                            get_registry())
        summaries.append(job.train())
    assert summaries[0]["params"] == summaries[1]["params"]


def test_float64_runs_in_float64(tmp_path: Path):
    from workbench import service
    from workbench.plugins.registry import get_registry

    job = service.start(LINEAR, ["dtype=float64", "train.steps=30", "train.plots=false"],
                        tmp_path / "r", get_registry())
    assert all(v.dtype == torch.float64 for v in job.run.data.values() if torch.is_tensor(v))
    summary = job.train()
    assert summary["dtype"] == "float64" and torch.get_default_dtype() == torch.float32
    assert all(p.dtype == torch.float64 for p in params(tmp_path / "r").values())
    assert math.isfinite(summary["diagnostics"]["khat"])


def test_huge_num_particles_is_refused_with_an_estimate():
    result = vibench("run", str(COIN), "--set", "loss.num_particles=1000000000")
    assert result.returncode == 2
    assert "loss.num_particles: 1000000000 particles need about" in result.stderr


def test_a_finished_run_loads_back_with_its_guide(tmp_path: Path):
    from workbench import service
    from workbench.plugins.registry import get_registry

    out = tmp_path / "r"
    result = vibench("run", str(LINEAR), "--steps", "50", "--set", "guide=auto_iaf_normal",
                     "--set", "train.plots=false", "--out", str(out))
    assert result.returncode == 0, result.stderr
    run = service.load(out, get_registry())
    saved = params(out)
    store = dict(pyro_params())
    assert saved.keys() == store.keys()
    assert all(torch.equal(saved[k], store[k]) for k in saved)
    masks = torch.load(out / "checkpoint.pt", weights_only=True)["buffers"]
    assert masks and all(torch.equal(masks[k], b) for k, b in run.guide.named_buffers())
    draw = run.guide(**run.data)
    assert all(torch.isfinite(v).all() for v in draw.values())


def pyro_params():
    import pyro

    return ((name, p.detach()) for name, p in pyro.get_param_store().named_parameters())


def test_a_stop_signal_while_the_handlers_go_in_is_one_line():
    """A signal that lands inside ``signals.install``, once a handler is in, stops the
    process as any other stop does: one line, 128 + signum, no traceback."""
    code = ("import os, signal\n"
            "from workbench import __main__ as entry, signals\n"
            "installed = signals.install\n"
            "def install():\n"
            "    installed()\n"
            "    os.kill(os.getpid(), signal.SIGTERM)  # handled here, still in install\n"
            "signals.install = install\n"
            "entry.main()\n")
    child = python(code)
    assert child.returncode == 128 + signal.SIGTERM, child.stderr
    assert child.stderr.strip() == "interrupted", child.stderr


@pytest.mark.parametrize("where", ["reporting", "leaving"])
def test_a_stop_signal_that_cuts_into_a_failure_still_tells_the_failure(where: str):
    """A signal on the heels of a failure (torchrun's SIGTERM after another rank died) does not
    hide why the run ended: the error's line and exit code, once, and no traceback."""
    code = (
        "import os, signal\n"
        "from workbench import cli, service, signals\n"
        "from workbench.errors import PeerLost\n"
        "told = cli._err\n"
        "def stop():\n"
        "    if not signals.received:  # one signal\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    sum(range(10_000))  # the handler runs here\n"
        "def err(line):\n"
        f"    if line.startswith('error:') and {where == 'reporting'}:\n"
        "        stop()\n"
        "    told(line)\n"
        "def run_recipe(*args, **kwargs):\n"
        "    try:\n"
        "        raise PeerLost('rank 0 lost contact with the other processes')\n"
        "    finally:\n"
        f"        if {where == 'leaving'}:\n"
        "            stop()\n"
        "cli._err, service.run_recipe = err, run_recipe\n"
        f"cli.main(['run', {str(COIN)!r}])\n")
    child = python(code)
    assert child.returncode == 1, child.stderr
    assert child.stderr.strip() == "error: rank 0 lost contact with the other processes", \
        child.stderr


def test_a_stop_signal_during_set_up_is_one_line_and_leaves_nothing(tmp_path: Path):
    child, _ = launch([str(COIN)], tmp_path / "r")  # its handlers in, its imports to come
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 143, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]  # "interrupted", or where: "... while loading plugin"
    assert last == "interrupted" or last.startswith("interrupted while loading plugin "), stderr
    assert not (tmp_path / "r").exists()


def test_a_stop_signal_inside_a_finalizer_is_raised_after_it_not_dropped():
    """A signal whose handler runs inside a finalizer (``__del__``, where Python can only
    print "Exception ignored" and drop the exception) still stops the process once it is out."""
    done = python(
        "import os, signal, time\n"
        "from workbench import signals\n"
        "signals.install()\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        sum(range(10_000))  # the handler runs here, inside the finalizer\n"
        "try:\n"
        "    Finalized()\n"
        "    time.sleep(30)\n"
        "    print('not stopped')\n"
        "except signals.Signalled as exc:\n"
        "    print('stopped by', exc)\n")
    assert done.stdout.strip() == "stopped by SIGTERM", done.stdout + done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_rank_whose_rank_0_never_answers_stops_at_a_signal(tmp_path: Path, signum: int):
    """Rank 1 of two waits to join a rank 0 that never started; a stop signal ends it at
    once with its code, not after VIBENCH_DIST_TIMEOUT."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "VIBENCH_DIST_TIMEOUT": "600"}
    child, _ = launch([str(COIN)], tmp_path / "r", env)
    while not has_a_socket(child.pid):  # trying to reach rank 0
        assert child.poll() is None, child.communicate()
        time.sleep(0.01)
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr


def has_a_socket(pid: int) -> bool:
    """Whether the process has a socket open."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                return True
        except OSError:  # closed meanwhile
            pass
    return False


def test_a_rank_outside_the_world_is_bad_input(tmp_path: Path):
    result = vibench("run", str(COIN), "--out", str(tmp_path / "r"),
                     env={"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, child=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: RANK is 2 and LOCAL_RANK 0, but WORLD_SIZE is 2: "
                                     "RANK must be 0 to 1; start vibench with torchrun")


def test_two_runs_on_the_default_threads_give_the_same_numbers(tmp_path: Path):
    """Without --threads (and without OMP_NUM_THREADS) a run uses one thread, whose sums add
    in one order: the same recipe and seed give the same numbers bit for bit."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    args = ["run", str(COIN), "--steps", "200", *QUIET]
    done = subprocess.run([sys.executable, "-m", "workbench", *args, "--out", str(tmp_path / "a")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    again = vibench(*args, "--out", str(tmp_path / "b"))  # this process: one thread too
    assert again.returncode == 0, again.stderr
    summaries = [strict_json(tmp_path / name / "summary.json") for name in ("a", "b")]
    assert summaries[0]["threads"] == 1
    for key in ("params", "posterior", "final_loss"):
        assert summaries[0][key] == summaries[1][key], key


@pytest.mark.xdist_group("compiled_coin")  # the coin's step, compiled once for the group
def test_loading_a_compiled_run_back_compiles_nothing(tmp_path: Path):
    out = tmp_path / "r"
    done = vibench("run", str(COIN), "--steps", "30", "--set", "train.compile=auto",
                   *QUIET, "--out", str(out))
    assert done.returncode == 0, done.stderr
    from workbench import service
    from workbench.plugins.registry import get_registry

    run = service.load(out, get_registry())
    assert run.compiled is None
