"""Data-parallel training under torchrun: real torchrun processes (gloo on the CPU), and the
sharding of a plate checked in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from tests.helpers import REPO, checkpointed_step, wait_for_checkpoint
from workbench.data.minibatch import Minibatch
from workbench.data.sources import Rows, read_file
from workbench.distributed import World
from workbench.plugins.registry import get_registry
from workbench.train.tensors import load_data, shard

LINEAR = REPO / "recipes" / "linear_regression.yaml"
FAST = ["--set", "device=cpu", "--set", "loggers=[]", "--set", "train.plots=false",
        "--set", "train.eval_every=0"]


def torchrun(*args: str, nproc: int = 2, env: dict | None = None, popen: bool = False,
             timeout: float = 300):
    """``torchrun --nproc-per-node N -m workbench ARGS``, as a user would start it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--standalone", "-m", "workbench", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def params(out: Path) -> dict:
    return torch.load(out / "params.pt", weights_only=False)["params"]


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def worker_of_rank(agent: int, rank: int) -> int:
    """The pid of torchrun's worker process with this RANK."""
    for child in children(agent):
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return child
    raise AssertionError(f"no worker of rank {rank}")


def kill_all(agent: int) -> None:
    """SIGKILL torchrun and its workers at once, as a lost node or ``scancel`` would (each
    worker runs in its own session, so killing torchrun's group is not enough)."""
    for pid in [*children(agent), agent]:
        os.kill(pid, signal.SIGKILL)


SHORT = ["--steps", "400", "--set", "optimizer.schedule.gamma=0.9886"]  # lr / 100 at the end
RESUMABLE = [*FAST, *SHORT, "--set", "train.checkpoint_every=25"]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-process full-batch run of the linear regression."""
    out = tmp_path_factory.mktemp("dist") / "whole"
    done = torchrun("run", str(LINEAR), *RESUMABLE, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------------
# in-process: the shards and the loss they add up to

def _regression(x, y):
    weight = pyro.sample("w", dist.Normal(0.0, 10.0))
    with pyro.plate("data", x.shape[0]) as ind:
        pyro.sample("obs", dist.Normal(weight * x.index_select(0, ind), 1.0),
                    obs=y.index_select(0, ind))


def _guide(x, y):
    pyro.sample("w", dist.Delta(torch.tensor(0.7)))


def _data(n: int = 11) -> dict:
    x = torch.linspace(-1, 1, n)
    return {"x": x, "y": 2 * x + 0.1 * torch.cos(7 * x)}


def _minibatch(world: World, batch_size: int | None, data: dict) -> Minibatch:
    trace = poutine.trace(_regression).get_trace(**data)
    return Minibatch.of(trace, {"batch_size": batch_size, "subsample_plate": None},
                        torch.device("cpu"), world)


def test_each_rank_owns_a_disjoint_shard_and_together_they_cover_the_plate():
    data = _data()
    batches = [_minibatch(World(rank, 2), None, data) for rank in range(2)]
    owned = [set(b.shard.owned.tolist()) for b in batches]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(11))
    assert [b.weight for b in batches] == [6 / 11, 5 / 11]
    assert all(b.shard.local for b in batches)  # no latent site in the plate: data cut down


def test_the_ranks_minibatches_are_disjoint_and_drawn_from_their_own_shard():
    data = _data(100)
    seen = []
    for rank in range(2):
        batch = _minibatch(World(rank, 2), 8, data)
        torch.manual_seed(0)  # the same stream on both ranks: still disjoint batches
        drawn = set()
        for _ in range(20):
            batch.resample()
            assert len(batch.indices) == 8 and int(batch.indices.max()) < batch.shard.count
            drawn |= set(batch.shard.owned[batch.indices].tolist())
        assert drawn <= set(batch.shard.owned.tolist())
        seen.append(drawn)
    assert seen[0].isdisjoint(seen[1])


def test_the_ranks_losses_weighted_by_share_add_up_to_the_whole_data_loss():
    data = _data()
    whole = Trace_ELBO().loss(_regression, _guide, **data)
    total = 0.0
    for rank in range(2):
        batch = _minibatch(World(rank, 2), None, data)
        batch.resample()
        part = shard(data, batch.shard.size, batch.shard.owned)
        loss = Trace_ELBO().loss(batch(_regression), batch(_guide), **part)
        total += batch.weight * loss
        assert loss == pytest.approx(whole, rel=0.2)  # each rank's estimate is of the whole
    assert total == pytest.approx(whole, rel=1e-5)


def test_a_rank_reads_only_its_rows_of_an_npy_or_csv_file(tmp_path: Path):
    import numpy

    table = numpy.arange(33.0).reshape(11, 3)
    numpy.save(tmp_path / "x.npy", table)
    numpy.save(tmp_path / "fortran.npy", numpy.asfortranarray(table))
    numpy.save(tmp_path / "big_endian.npy", table.astype(">f8"))
    lines = ["a,b,c", *(",".join(map(str, row)) for row in table)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    for rank in range(3):
        for name in ("x.npy", "fortran.npy", "big_endian.npy"):
            rows = Rows(rank, 3)
            [part] = read_file(tmp_path / name, rows).values()
            assert rows.total == 11 and numpy.array_equal(part, table[rank::3]), name
        rows = Rows(rank, 3)
        columns = read_file(tmp_path / "t.csv", rows)
        assert rows.total == 11
        assert numpy.array_equal(columns["b"], table[rank::3, 1])


DATASET = """
import numpy


def make(n: int = 11, rows=None):
    pick = slice(None) if rows is None else rows.of(n)
    x = numpy.linspace(-1, 1, n)[pick]
    return {"x": x, "y": 2 * x + 0.1 * numpy.cos(7 * x)}
"""


def test_data_read_as_a_ranks_rows_give_the_shard_that_cutting_the_whole_data_gives(
        tmp_path: Path):
    """A data set plugin that takes ``rows`` makes only the rank's rows; the rank's minibatch
    then has the same shard, the same data and the same loss as one made from the whole
    data and cut down."""
    (tmp_path / "rows_dataset.py").write_text(DATASET)
    section = {"dataset": {"name": f"{tmp_path / 'rows_dataset.py'}:make", "n": 11}}
    train = {"batch_size": None, "subsample_plate": None}
    cpu = torch.device("cpu")
    whole, _ = load_data(get_registry(), section, _regression, "m", cpu)
    for rank in range(2):
        world, rows = World(rank, 2), Rows(rank, 2)
        read, _ = load_data(get_registry(), section, _regression, "m", cpu, rows)
        assert rows.total == 11 and len(read["x"]) == len(range(rank, 11, 2))
        trace = poutine.trace(_regression).get_trace(**read)
        assert Minibatch.fits_rows(trace, train, world, rows.total)
        batch = Minibatch.of(trace, train, cpu, world, rows.total)
        cut = _minibatch(world, None, whole)
        assert torch.equal(batch.shard.owned, cut.shard.owned) and batch.weight == cut.weight
        part = shard(read, batch.shard.size, batch.shard.owned)  # what the run does: nothing
        assert all(torch.equal(part[k], v) for k, v in shard(
            whole, cut.shard.size, cut.shard.owned).items())
        losses = []
        for mb, data in ((batch, part), (cut, shard(whole, cut.shard.size, cut.shard.owned))):
            mb.resample()
            losses.append(Trace_ELBO().loss(mb(_regression), mb(_guide), **data))
        assert losses[0] == losses[1]


def test_rows_that_do_not_fit_the_plate_send_the_rank_back_to_the_whole_data():
    def per_datum(x, y):  # a latent site in the plate: every rank needs the whole data
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z * x, 1.0), obs=y)

    train = {"batch_size": None, "subsample_plate": None}
    part = {key: value[1::2] for key, value in _data().items()}
    assert not Minibatch.fits_rows(poutine.trace(per_datum).get_trace(**part), train,
                                   World(1, 2), 11)
    trace = poutine.trace(_regression).get_trace(**part)
    assert not Minibatch.fits_rows(trace, train, World(1, 2), 12)  # not this rank's rows


# ------------------------------------------------------------------------------------------
# torchrun

def test_two_processes_reach_the_exact_posterior_and_rank_0_alone_writes(whole_run: Path,
                                                                         tmp_path: Path):
    found = summary(whole_run)
    assert found["world_size"] == 2 and found["status"] == "completed"
    for site in ("intercept", "coefficients"):
        entry = found["posterior"][site]
        mean, exact = torch.tensor(entry["mean"]), torch.tensor(entry["exact_mean"])
        sd = torch.tensor(entry["exact_std"])
        assert ((mean - exact).abs() < 0.2 * sd).all(), (site, mean, exact, sd)
    assert found["diagnostics"]["khat"] is not None  # the report ran on the whole data
    assert not (whole_run.parent / "runs").exists()


@pytest.mark.slow  # the shards' arithmetic is tested in-process above; the processes below
def test_a_minibatch_run_under_torchrun_reaches_the_posterior(tmp_path: Path):
    """... from a CSV file, which rank 1 reads only its rows of."""
    from plugins.datasets import synthetic_regression

    made = synthetic_regression(n=200, coefficients=[1.5, -2.0, 0.5], intercept=1.0, noise=0.5)
    rows = torch.cat([made["x"], made["y"][:, None]], 1).double().tolist()
    lines = ["x0,x1,x2,y", *(",".join(repr(v) for v in row) for row in rows)]
    (tmp_path / "xy.csv").write_text("\n".join(lines) + "\n")
    data = f"data={{file: {tmp_path / 'xy.csv'}, columns: {{x: [x0, x1, x2], y: y}}}}"
    out = tmp_path / "mb"
    done = torchrun("run", str(LINEAR), *FAST, *SHORT, "--set", "train.batch_size=25",
                    "--set", data, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("run directory:") == 1  # rank 1 prints nothing
    for site, entry in summary(out)["posterior"].items():
        mean, exact = torch.tensor(entry["mean"]), torch.tensor(entry["exact_mean"])
        assert ((mean - exact).abs() < 0.4 * torch.tensor(entry["exact_std"])).all(), site


def test_under_torchrun_rank_0_claims_the_run_directory_named_by_out(tmp_path: Path):
    from workbench.errors import UsageError
    from workbench.service import _claim_as

    with pytest.raises(UsageError, match="under torchrun give --out RUN_DIR"):
        _claim_as(World(0, 2), "x", None)
    follower = _claim_as(World(1, 2), "x", tmp_path / "run")
    assert follower.fd == -1 and not (tmp_path / "run").exists()
    leader = _claim_as(World(0, 2), "x", tmp_path / "run")
    assert (tmp_path / "run" / ".lock").exists()
    leader.release()


def test_a_run_goes_on_with_as_many_processes_as_it_trained_on():
    from workbench.errors import UsageError
    from workbench.service import _check_world

    _check_world({"world_size": 2}, 2, "--resume r")
    _check_world({}, 1, "--resume r")
    with pytest.raises(UsageError, match="trained on 2 process.* go on under torchrun with 2"):
        _check_world({"world_size": 2}, 1, "--resume r")
    with pytest.raises(UsageError, match="as one process, without torchrun"):
        _check_world({}, 2, "--resume r")


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_timeout_that_is_not_seconds_is_one_line(monkeypatch, value: str):
    from workbench import distributed
    from workbench.errors import UsageError

    monkeypatch.setenv("VIBENCH_DIST_TIMEOUT", value)
    with pytest.raises(UsageError) as caught:
        distributed.timeout()
    assert str(caught.value) == (f"VIBENCH_DIST_TIMEOUT={value!r}: expected a number of "
                                 f"seconds above 0 (default {distributed.DEFAULT_TIMEOUT:g})")
    monkeypatch.setenv("VIBENCH_DIST_TIMEOUT", " 2.5 ")
    assert distributed.timeout() == 2.5


def test_a_dead_rank_stops_the_others_with_one_line_and_keeps_the_checkpoint(tmp_path: Path):
    out = tmp_path / "killed"
    child = torchrun("run", str(LINEAR), *RESUMABLE, "--out", str(out), popen=True,
                     env={"VIBENCH_DIST_TIMEOUT": "20"})
    try:
        wait_for_checkpoint(out, past=50)
        os.kill(worker_of_rank(child.pid, 1), signal.SIGKILL)
        started = time.monotonic()
        _, stderr = child.communicate(timeout=90)
        assert time.monotonic() - started < 60
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode != 0
    assert "lost contact with the other processes" in stderr, stderr[-3000:]
    assert 50 < checkpointed_step(out) < 400
    assert summary(out)["status"] == "failed"  # rank 0 wrote what it could


@pytest.mark.slow  # quick: a single process's SIGKILL and resume (test_resume.py), and a dead
# rank under torchrun (above); here four torchrun processes start twice
def test_resume_after_killing_the_whole_torchrun_group_continues_exactly(whole_run: Path,
                                                                         tmp_path: Path):
    out = tmp_path / "group"
    child = torchrun("run", str(LINEAR), *RESUMABLE, "--out", str(out), popen=True)
    try:
        wait_for_checkpoint(out, past=100)
    finally:
        kill_all(child.pid)
        child.wait(timeout=60)
    assert checkpointed_step(out) < 400
    resumed = torchrun("run", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = params(whole_run), params(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary(out)["final_loss"] == summary(whole_run)["final_loss"]
