"""A long step's loop rolled back up (workbench/compile/rolling.py): its repeated blocks found
in the traced graph, each compiled once and called in turn, giving the traced graph's
numbers; under train.compile: auto, a step above the bound trains that way where it pays."""

from __future__ import annotations

import collections

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from tests.helpers import fitted, setup
from workbench.compile import compiled_step, rolling
from workbench.train import checkpoint

BOUND = "VIBENCH_COMPILE_MAX_OPS"


def euler(theta: torch.Tensor, z0: torch.Tensor, steps: int = 12) -> tuple:
    """A loss through an ODE solved by Euler steps in a Python loop, and its gradients:
    the forward loop and, in reverse, its backward."""
    theta, z0 = theta.detach().requires_grad_(), z0.detach().requires_grad_()
    z, path = z0, []
    for _ in range(steps):
        z = z + 0.1 * (torch.sin(z) * theta[0] - z * theta[1] + theta[2])
        path.append(z)
    loss = (torch.stack(path) - 1.0).pow(2).sum()
    return (loss, *torch.autograd.grad(loss, (theta, z0)))


def series(theta: torch.Tensor, y: torch.Tensor) -> tuple:
    """A recursion that reads the series ``y`` at each turn (``y[t]``, an index that changes
    from turn to turn), and its gradients, ``y``'s among them (put back at each turn's t)."""
    theta, y = theta.detach().requires_grad_(), y.detach().requires_grad_()
    z, total = theta[2], 0.0
    for t in range(y.shape[0]):
        z = theta[0] * torch.tanh(z) + theta[1] * y[t]
        total = total + (z - y[t]) ** 2
    return (total, *torch.autograd.grad(total, (theta, y)))


def noisy(theta: torch.Tensor, z0: torch.Tensor, steps: int = 12) -> torch.Tensor:
    """A loop that draws a random number at each turn."""
    z = z0
    for _ in range(steps):
        z = z + 0.1 * (torch.sin(z) * theta[0] + torch.randn_like(z))
    return z.sum()


def traced(fn, steps: int = 12):
    inputs = [torch.tensor([0.5, 0.3, 0.2]), torch.linspace(-1.0, 1.0, 5)]
    return make_fx(lambda *a: fn(*a, steps=steps))(*inputs), inputs


def as_traced(block, inputs):
    """A body that is the block's graph itself, uncompiled: the same operations."""
    return block


def test_a_loop_rolls_into_calls_of_its_blocks_with_the_traced_numbers():
    graph, inputs = traced(euler)
    want = graph(*inputs)
    ops = sum(1 for node in graph.graph.nodes if node.op == "call_function")
    bodies = []
    rolled = rolling.roll(graph, inputs, lambda block, ins: bodies.append(block) or block)
    assert rolled is not None
    for rolled_graph in (graph, rolled.graph):  # the graph changed, and its fresh copy
        got = rolled_graph(*inputs)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    # the forward loop and its backward, each a block (grouped where short) called in turn
    assert 2 <= rolled.bodies <= 4 and rolled.calls >= 2 * rolling.MIN_REPEATS
    assert rolled.bodies + rolled.segments == len(bodies)  # each compiled once
    assert rolled.left < ops / 2
    assert "rolled into" in rolled.describe(ops)
    # a block called in turn takes each value once, however many of its operations read it
    calls = [node for node in rolled.graph.graph.nodes if node.op == "call_function"
             and getattr(node.target, "__name__", "") == "rolled_block"]
    repeated = collections.Counter(node.target for node in calls)
    assert all(len(set(node.args)) == len(node.args) for node in calls
               if repeated[node.target] > 1)


def test_a_longer_loop_is_rolled_into_as_few_blocks_and_leaves_as_little():
    short, inputs = traced(euler, steps=12)
    long, _ = traced(euler, steps=48)
    few = rolling.roll(short, inputs, as_traced)
    many = rolling.roll(long, inputs, as_traced)
    assert many.bodies <= few.bodies + 1  # a group of turns left over, perhaps
    assert many.left == few.left  # what is outside the loop is the same


def test_a_loop_that_reads_a_series_at_each_turn_rolls_too():
    """Each turn's ``y[t]`` is taken out of the turn, and the gradient each turn puts back
    into ``y`` is gathered after it, so the turns are the same block; a group of turns takes
    its stretch of ``y`` as one view and gives its gradients as one tensor (a cat of a few
    joins them): what is left outside the blocks does not grow with the series."""
    inputs = [torch.tensor([0.5, 0.3, 0.2]), torch.linspace(-1.0, 1.0, 40)]
    left = []
    for length in (20, 40):
        graph = make_fx(series)(inputs[0], inputs[1][:length])
        want = graph(inputs[0], inputs[1][:length])
        rolled = rolling.roll(graph, [inputs[0], inputs[1][:length]], as_traced)
        got = graph(inputs[0], inputs[1][:length])
        assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(want, got))
        names = [str(node.target) for node in graph.graph.nodes]
        assert not any("select_backward" in name for name in names)
        views = [node for node in graph.graph.nodes if node.meta.get(rolling._CHUNK)]
        assert len(views) >= rolling.MIN_REPEATS  # a stretch of y for each call of a group
        joined = [node for node in graph.graph.nodes if node.target in rolling._GATHERS]
        assert joined and all(len(node.args[0]) <= rolling.GATHER_INPUTS for node in joined)
        assert rolled.calls >= 2 * rolling.MIN_REPEATS
        left.append(rolled.left)
    assert left[1] - left[0] < 20  # far less than an operation for each turn added


def test_a_stack_of_many_tensors_stays_as_traced_between_the_calls():
    """A stack of 40 turns' gradients that the groups cannot give as runs (here each turn's
    gradient is summed with another value first) is left out of the compiled stretches
    (inductor would copy each tensor in a kernel of its own); shorter stretches compile."""

    def summed(theta, y):
        theta, y = theta.detach().requires_grad_(), y.detach().requires_grad_()
        z, path = theta[2], []
        for t in range(y.shape[0]):
            z = theta[0] * torch.tanh(z) + theta[1] * y[t]
            path.append(z)
        loss = sum((p - 0.5) ** 2 for p in path)
        return (loss, torch.stack([p * 2.0 + y[0] for p in path]).sum(),
                *torch.autograd.grad(loss, (theta, y)))

    inputs = [torch.tensor([0.5, 0.3, 0.2]), torch.linspace(-1.0, 1.0, 40)]
    graph = make_fx(summed)(*inputs)
    compiled = []
    rolling.roll(graph, inputs, lambda block, ins: compiled.append(block) or block)
    stacks = [node for node in graph.graph.nodes if node.target is torch.ops.aten.stack.default]
    assert 40 in [len(node.args[0]) for node in stacks]
    assert not any(len(node.all_input_nodes) > rolling.GATHER_INPUTS
                   for block in compiled for node in block.graph.nodes
                   if node.target in (torch.ops.aten.stack.default, torch.ops.aten.cat.default))


def test_a_group_takes_its_stretch_of_a_series_and_gives_its_turns_as_one_tensor():
    """A long recursion's calls take ``y``'s stretch as one view (no tensor a turn) and give
    the turns' values that a stack after the loop gathers as one tensor, stacked inside the
    compiled block; the numbers are the traced graph's."""
    inputs = [torch.tensor([0.5, 0.3, 0.2]), torch.linspace(-1.0, 1.0, 200)]
    graph = make_fx(series)(*inputs)
    want = graph(*inputs)
    blocks = []
    rolled = rolling.roll(graph, inputs, lambda block, ins: blocks.append((block, ins)) or block)
    got = rolled.graph(*inputs)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(want, got))
    nodes = list(rolled.graph.graph.nodes)
    assert not any(node.target is torch.ops.aten.unbind.int and len(node.users) > 32
                   for node in nodes)
    assert sum(1 for node in nodes if node.meta.get(rolling._CHUNK)) >= rolling.MIN_REPEATS
    assert all(len(node.args[0]) <= rolling.GATHER_INPUTS for node in nodes
               if node.target in rolling._GATHERS)  # the 200 gradients: a cat of runs
    assert any(node.target is torch.ops.aten.stack.default
               for block, _ in blocks for node in block.graph.nodes)
    assert rolled.left < 40


class Wrapped:
    """A compiled block as inductor gives it: callable, its own code inside."""

    def __init__(self, own_code):
        self._compiled_fn = type("Fn", (), {"current_callable": staticmethod(own_code)})

    def __call__(self, *args):
        return (args[0] + 1.0, args[0] * 2.0)


def test_a_compiled_block_is_called_bare_only_where_its_own_code_gives_the_same():
    x = torch.arange(6.0).reshape(2, 3)
    same = compiled_step._bare(Wrapped(lambda args: (args[0] + 1.0, args[0] * 2.0)), [x])
    assert not isinstance(same, Wrapped) and torch.equal(same(x)[1], x * 2.0)
    for other in (lambda args: (args[0] + 1.0,),  # fewer outputs
                  lambda args: (args[0] + 1.0, (args[0] * 2.0).t().contiguous().t()),  # strides
                  lambda args: (args[0] + 1.0, args[0] * 2.0 + 1e-6)):  # numbers
        wrapped = Wrapped(other)
        assert compiled_step._bare(wrapped, [x]) is wrapped
    x = torch.linspace(-1.0, 1.0, 5)
    block = make_fx(lambda a: (torch.sin(a) * 2.0, a.cos()))(x)  # real inductor
    bare = compiled_step._compiled_body(block, [x])
    assert not hasattr(bare, "_compiled_fn")  # inductor's own code, called directly
    assert all(torch.allclose(a, b) for a, b in zip(bare(x), (torch.sin(x) * 2.0, x.cos())))


def test_blocks_that_draw_random_numbers_are_left_as_traced():
    graph, inputs = traced(noisy)
    draws = [node for node in graph.graph.nodes if "randn" in str(node.target)]
    assert len(draws) == 12
    rolling.roll(graph, inputs, as_traced)  # a node rolled into a block leaves the graph
    assert [node for node in graph.graph.nodes if "randn" in str(node.target)] == draws


def drift(y):
    """A noisy recursion over the observations as a Python loop: level += drift * tanh."""
    rate = pyro.sample("rate", dist.Normal(torch.tensor(0.0), 1.0))
    pull = pyro.sample("pull", dist.Normal(torch.tensor(0.0), 1.0))
    level, levels = torch.zeros_like(rate), []
    for _ in range(y.shape[0]):
        level = level + rate * torch.tanh(level - pull) + 0.3
        levels.append(level)
    pyro.sample("y", dist.Normal(torch.stack(levels, -1), 1.0).to_event(1), obs=y)


def drift_recipe(steps: int) -> dict:
    return {"name": "drift", "seed": 3, "data": {"y": [0.3 * (t + 1) for t in range(40)]},
            "model": {"name": f"{__name__}:drift"}, "guide": {"name": "auto_normal"},
            "loss": {"name": "elbo", "num_particles": 4, "vectorize_particles": True},
            "optimizer": {"name": "adam", "lr": 0.01},
            "train": {"steps": steps, "eval_every": 0}}


def test_auto_rolls_a_step_above_the_bound_and_trains_as_eager_does(monkeypatch):
    """A step of more operations than the bound, whose eager steps cost more than tracing
    it, trains on its rolled blocks (compiled by inductor): one note says so, and ten steps
    end where ten eager steps do, to rounding. A later run of the same structure in the
    process (a pipeline's next fit, ``cached_only``: it compiles no whole step) takes the
    rolled graph without tracing again, and ends there too."""
    monkeypatch.setenv(BOUND, "400")
    fits = []
    for setting in ("false", "auto", "the pipeline's next fit"):
        run = setup(f"train.compile={'false' if ' ' in setting else setting}",
                    source=drift_recipe(10**6))
        if " " in setting:
            monkeypatch.setattr(compiled_step, "_trace",
                                lambda *args, **kwargs: pytest.fail("traced a second time"))
            run.compiled, run.notes = compiled_step.prepare(
                "auto", run.svi, run.data, run.device, 10**6, cached_only=True)
        for _ in range(10):
            run.step()
        fits.append((run, fitted()))
    (eager, want), *rolled = fits
    assert eager.compiled is None
    for run, got in rolled:
        assert run.compiled is not None
        notes = [note for note in run.notes if "rolled into" in note]
        assert len(notes) == 1 and notes[0].startswith("a loop of "), run.notes
        assert want.keys() == got.keys()
        for name in want:
            assert torch.allclose(want[name], got[name], rtol=1e-5, atol=1e-6), name


@pytest.mark.slow
def test_a_rolled_run_resumes_exactly(monkeypatch, tmp_path):
    """Stopped at step 10 and resumed, a run on rolled blocks ends where the run of 20 steps
    in one go does, bit for bit: the blocks' arithmetic and the optimizer's state carry over."""
    monkeypatch.setenv(BOUND, "400")
    for free in ("LOAD_SECONDS", "TRACE_SECONDS", "TRACE_OP_SECONDS", "ROLL_SECONDS"):
        monkeypatch.setattr(compiled_step, free, 0.0)  # so that 20 steps roll
    sets = ["train.compile=auto", "train.eval_every=0", "train.plots=false",
            "train.diagnostics=false", "train.checkpoint_every=10"]
    whole = setup(*sets, "train.steps=20", source=drift_recipe(10**6))
    assert whole.compiled is not None and whole.compiled.note
    (tmp_path / "whole").mkdir()
    whole.train(tmp_path / "whole")
    want = fitted()
    half = tmp_path / "half"
    half.mkdir()
    setup(*sets, "train.steps=10", source=drift_recipe(10**6)).train(half)
    resumed = setup(*sets, "train.steps=20", source=drift_recipe(10**6))
    assert resumed.compiled is not None and resumed.compiled.note
    summary = resumed.train(half, resume=checkpoint.load(half),
                            changes={"train.steps": [10, 20]})
    assert summary["steps"] == 20 and summary["status"] == "completed"
    got = fitted()
    assert all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.parametrize("steps", [2000])
def test_auto_leaves_a_long_step_eager_where_rolling_does_not_pay(monkeypatch, steps: int):
    monkeypatch.setenv(BOUND, "400")
    run = setup("train.compile=auto", source=drift_recipe(steps))
    assert run.compiled is None
    assert any("above the 400 that train.compile: auto compiles" in n for n in run.notes)


def _with_gradients(loss_of):
    """A loss of (theta, y, x) as the step's graph gives it: the loss and its gradients."""

    def step(theta, y, x):
        theta, y, x = (t.detach().requires_grad_() for t in (theta, y, x))
        loss = loss_of(theta, y, x)
        return (loss, *torch.autograd.grad(loss, (theta, y, x), allow_unused=True,
                                           materialize_grads=True))

    step.__name__ = loss_of.__name__
    return step


@_with_gradients
def two_series(theta, y, x):
    z, total = theta[2], 0.0
    for t in range(y.shape[0]):
        z = theta[0] * torch.tanh(z) + theta[1] * y[t] * x[t]
        total = total + (z - x[t]) ** 2
    return total


@_with_gradients
def read_backwards(theta, y, x):
    z, total, last = theta[2], 0.0, y.shape[0] - 1
    for t in range(y.shape[0]):
        z = theta[0] * torch.tanh(z) + theta[1] * y[last - t]
        total = total + (z - y[last - t]) ** 2
    return total


@_with_gradients
def lagged(theta, y, x):
    z, total = theta[2], 0.0
    for t in range(1, y.shape[0]):
        z = theta[0] * torch.tanh(z) + theta[1] * (y[t] - y[t - 1])
        total = total + (z - y[t]) ** 2
    return total


@_with_gradients
def every_other(theta, y, x):
    z, total = theta[2], 0.0
    for t in range(0, y.shape[0], 2):
        z = theta[0] * torch.tanh(z) + theta[1] * y[t]
        total = total + (z - y[t]) ** 2
    return total


@_with_gradients
def stacked_path(theta, y, x):
    z, path = theta[2], []
    for t in range(y.shape[0]):
        z = theta[0] * torch.tanh(z) + theta[1] * y[t]
        path.append(z)
    states = torch.stack(path)
    return ((states - x) ** 2).sum() + states.max()


def rolled_numbers(loss, compile_body) -> tuple:
    inputs = [torch.tensor([0.5, 0.3, 0.2]), torch.linspace(-1.0, 1.0, 120),
              torch.cos(torch.arange(120) * 0.1)]
    graph = make_fx(loss)(*inputs)
    want = graph(*inputs)
    rolled = rolling.roll(graph, inputs, compile_body)
    views = sum(1 for node in rolled.graph.graph.nodes if node.meta.get(rolling._CHUNK))
    return want, rolled.graph(*inputs), views


def test_a_series_read_from_its_end_rolls_into_views():
    """A series read from its end is taken a stretch a call all the same (each pick's place
    in the view as its turn needs it), with the traced graph's numbers (the slow test below
    compiles this and four other ways of reading a series)."""
    want, got, views = rolled_numbers(read_backwards, as_traced)
    assert views >= rolling.MIN_REPEATS
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(want, got))


@pytest.mark.slow
@pytest.mark.parametrize("loss", [two_series, read_backwards, lagged, every_other,
                                  stacked_path])
def test_series_read_every_way_give_the_traced_numbers_compiled(loss):
    """The blocks compiled by inductor and called bare, each taking its stretch of a series
    as a view at its own offset: two series a turn, read backwards, twice a turn, every other
    value, and the turns' states stacked after the loop."""
    want, got, views = rolled_numbers(loss, compiled_step._compiled_body)
    assert views >= rolling.MIN_REPEATS
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(want, got))
