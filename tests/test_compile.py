"""train.compile: the compiled step gives eager's posterior, falls back or refuses in one line
where it cannot compile, and resumes exactly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    COIN,
    EXACT_MEAN,
    EXACT_STD,
    FLAKY,
    RECIPES,
    REPO,
    defaults,
    fitted,
    flaky_registry,
    python,
    refused,
    setup,
)
from workbench.compile import compiled_step
from workbench.config import recipe as recipes
from workbench.errors import UsageError
from workbench.seams import torch_optimizer
from workbench.train import checkpoint

# What keeps a default loss from compiling; every other pair must compile.
EAGER_ONLY = {"enum_elbo": "the loss enumerates discrete sites"}
STEPS = 10


@pytest.mark.slow
@pytest.mark.parametrize("loss", defaults("loss"))
@pytest.mark.parametrize("guide", defaults("guide"))
def test_every_guide_and_loss_compiles_to_the_eager_step_or_says_why_not(guide: str, loss: str):
    """The traced graph replayed uncompiled draws the random numbers eager Pyro draws, so the
    two fits agree to rounding, far inside the posterior's sd; inductor compiles that graph."""
    if (guide, loss) in refused():
        pytest.skip("refused before training")
    sets = [f"guide={guide}", f"loss={loss}", "train.compile=false", "train.eval_every=0",
            "optimizer.lr=0.01"]
    why = EAGER_ONLY.get(loss)
    if why:
        run = setup(*sets)
        with pytest.raises(compiled_step.CannotCompile, match=why):
            compiled_step.compile_step(run.svi, run.data, backend="fx")
        return
    eager, traced = eager_and_traced(sets)
    for name, value in traced.items():
        # each step moves a parameter by about lr; rounding may differ, the fit may not
        assert torch.allclose(value, eager[name], rtol=1e-3, atol=1e-3), name


def eager_and_traced(sets: list[str], **source) -> tuple[dict, dict]:
    """The parameters after STEPS eager steps of the run ``sets`` give, and after as many of
    the same run on its traced graph replayed uncompiled (the same random draws)."""
    run = setup(*sets, **source)  # seeded: the same start, the same random stream, each time
    for _ in range(STEPS):
        assert run.step()[1] == ""
    eager = fitted()
    run = setup(*sets, **source)
    run.compiled = compiled_step.compile_step(run.svi, run.data, backend="fx")
    assert run.compiled is not None and run.compiled.updates
    for _ in range(STEPS):
        assert run.step()[1] == ""
    return eager, fitted()


@pytest.mark.parametrize("schedule", ["{name: exponential, gamma: 0.9}",
                                      "{name: step, step_size: 3, gamma: 0.5}",
                                      "{name: reduce_on_plateau, patience: 1}"])
def test_a_scheduled_adam_updates_inside_the_graph_as_it_does_eagerly(schedule: str):
    """The schedule moves the learning rate between steps; the graph reads it as an input, so
    the compiled fit follows the eager one step for step, without torch's warning that the
    schedule stepped before the optimizer."""
    sets = ["guide=auto_normal", "train.compile=false", "train.eval_every=0",
            "optimizer.lr=0.05", f"optimizer.schedule={schedule}"]
    run = setup(*sets)
    for _ in range(STEPS):
        assert run.step()[1] == ""
    eager, eager_lr = fitted(), _lrs(run)
    run = setup(*sets)
    run.compiled = compiled_step.compile_step(run.svi, run.data, backend="fx")
    assert run.compiled is not None and run.compiled.updates
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(STEPS):
            assert run.step()[1] == ""
    assert _lrs(run) == pytest.approx(eager_lr) and eager_lr != pytest.approx(
        [0.05] * len(eager_lr))
    for name, value in fitted().items():
        assert torch.allclose(value, eager[name], rtol=1e-3, atol=1e-4), name


def test_fits_from_different_starts_ask_for_one_package(tmp_path: Path, monkeypatch):
    """The whitened Gaussian's fixed map (buffers each fit of a pipeline sets to its own
    start) is an input of the step's graph, not a constant folded into it, so the fits of one
    model share one package, whatever their starts."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    keys = set()
    for loc, scale in [(0.3, 0.5), (-1.0, 2.0)]:
        run = setup("guide=auto_gaussian_flow", "guide.num_transforms=0", "train.compile=false")
        run.guide.start_at(torch.tensor([loc]), torch.tensor([[scale]]))
        with pytest.raises(compiled_step.NotYet) as cold:  # none cached; too few steps to pay
            compiled_step.compile_step(run.svi, run.data, steps=5000)
        keys.add(cold.value.key)
    assert len(keys) == 1


@pytest.mark.parametrize("model, compiles", [("hierarchical", True), ("guarded", False)])
def test_a_value_read_from_the_data_alone_is_a_constant_of_the_graph(tmp_path: Path,
                                                                    model: str, compiles: bool):
    """A plate sized ``int(g.max()) + 1`` reads the data in Python: the value is the same every
    step, so the graph keeps it and trains as eager does. A guard that reads a draw's value
    (``intercept.item()``) would burn one draw into every step: it stays eager."""
    from tests import plain_models
    from tests.test_user_model import PLAIN

    data = (plain_models.hierarchical_data(rows=200) if model == "hierarchical" else
            {"dataset": {"name": "synthetic_regression", "n": 50}})
    sets = ["train.compile=false", "train.eval_every=0", "optimizer.lr=0.01"]
    source = {**FLAKY, "data": data, "model": {"name": f"{PLAIN}:{model}"}}
    run = setup(*sets, source=source)
    if not compiles:
        with pytest.raises(compiled_step.CannotCompile, match="depends on the parameters or "
                                                              "a random draw"):
            compiled_step.compile_step(run.svi, run.data, backend="fx")
        return
    eager, traced = eager_and_traced(sets, source=source)
    for name, value in traced.items():
        assert torch.allclose(value, eager[name], rtol=1e-3, atol=1e-4), name


def _lrs(run) -> list[float]:
    return [torch_optimizer(o).param_groups[0]["lr"] for o in run.svi.optim.optim_objs.values()]


@pytest.mark.xdist_group("compiled_coin")  # the coin's step, compiled once for the group
def test_compiled_coin_reaches_the_exact_posterior(tmp_path: Path):
    """Inductor's own random numbers, Adam's update in the graph: the posterior within a
    quarter of its sd of the exact one, as the eager catalogue test asks."""
    run = setup("train.compile=true", "train.steps=1500", "optimizer.lr=0.01",
                "train.average_last=0.5", "train.eval_every=0", "train.plots=false",
                "train.diagnostics=false")
    assert run.compiled is not None and run.compiled.updates
    summary = run.train(tmp_path)
    post = summary["posterior"]["latent_fairness"]
    assert abs(post["mean"] - EXACT_MEAN) < 0.25 * EXACT_STD, post
    assert abs(post["std"] - EXACT_STD) < 0.25 * EXACT_STD, post
    assert summary["status"] == "completed" and math.isfinite(summary["final_loss"])


def test_auto_falls_back_with_one_note_and_true_refuses_in_one_line():
    run = setup("loss=enum_elbo", "train.steps=100000", "train.eval_every=0",
                "train.compile=auto")
    assert run.compiled is None
    assert [n for n in run.notes if "compiled" in n] == [
        "training eagerly, not compiled: the loss enumerates discrete sites"]
    registry = flaky_registry()
    for seed in range(10):  # the model's own -inf may refuse a seed's trial step first
        with pytest.raises(UsageError) as caught:
            setup("train.steps=100000", "train.compile=true", source=FLAKY, registry=registry,
                  seed=seed)
        if "train.compile" in str(caught.value):
            break
    assert str(caught.value) == ("train.compile: true, but this step cannot be compiled: "
                                 "data-dependent control flow (the model, guide or loss reads "
                                 "in Python a value that depends on the parameters or a random "
                                 "draw)")


def test_auto_keeps_short_runs_eager_and_false_never_compiles():
    run = setup("train.compile=false", "train.steps=100000")
    assert run.compiled is None and not any("compiled" in n for n in run.notes)


@pytest.mark.parametrize("sets", [["train.steps=100"],
                                  ["train.steps=100000", "loss=enum_elbo"]])
def test_a_run_auto_leaves_eager_is_bitwise_the_eager_run(sets: list[str]):
    """Trying to compile (a few steps short, or a loss that cannot) leaves no trace: no random
    draw taken, no gradient left over for the first real step."""
    fits = []
    for setting in ("auto", "false"):
        run = setup(*sets, f"train.compile={setting}", "train.eval_every=0")
        assert run.compiled is None
        for _ in range(3):
            run.step()
        fits.append(fitted())
    assert all(torch.equal(fits[0][k], fits[1][k]) for k in fits[0])


def test_minibatches_stay_eager_saying_so_only_where_compiling_would_pay():
    with pytest.raises(UsageError, match="draws new indices each step"):
        setup("train.compile=true", "train.batch_size=5")
    assert setup("train.batch_size=5", "train.steps=100", "train.compile=auto").notes == []
    assert setup("train.batch_size=5", "train.steps=100000", "train.compile=auto").notes == [
        "training eagerly, not compiled: a minibatch (train.batch_size) draws new indices "
        "each step"]


@pytest.mark.xdist_group("compiled_coin")  # the coin's step, compiled once for the group
def test_compiled_runs_resume_exactly_and_eager_can_take_over(tmp_path: Path):
    sets = ["train.compile=true", "train.eval_every=0", "train.plots=false",
            "train.diagnostics=false", "optimizer.lr=0.01", "train.checkpoint_every=10"]
    whole = setup(*sets, "train.steps=60")
    (tmp_path / "whole").mkdir()
    whole.train(tmp_path / "whole")
    want = fitted()
    for compile_again, exact in (("true", True), ("false", False)):
        out = tmp_path / compile_again
        out.mkdir()
        setup(*sets, "train.steps=30").train(out)
        saved = checkpoint.load(out)
        resumed = setup(*sets, "train.steps=60", f"train.compile={compile_again}")
        assert (resumed.compiled is not None) == exact
        summary = resumed.train(out, resume=saved, changes={"train.steps": [30, 60]})
        assert summary["steps"] == 60 and summary["status"] == "completed"
        got = fitted()
        for name, value in want.items():
            if exact:
                assert torch.equal(got[name], value), name
            else:  # another random stream from step 30: close, not equal
                assert torch.allclose(got[name], value, atol=0.05), name


def test_the_machine_default_comes_from_vibench_compile(monkeypatch):
    """VIBENCH_COMPILE sets train.compile where a recipe leaves it out (the run's recipe.yaml
    records it); a recipe's own value wins; a bad value is one line."""
    monkeypatch.setenv("VIBENCH_COMPILE", "true")
    assert recipes.compile_default() is True
    monkeypatch.setenv("VIBENCH_COMPILE", "sometimes")
    with pytest.raises(UsageError, match="VIBENCH_COMPILE='sometimes': expected auto, true or"):
        recipes.compile_default()
    monkeypatch.setenv("VIBENCH_COMPILE", "false")
    assert setup("train.steps=100000").recipe["train"]["compile"] is False
    assert setup("train.steps=100000", "train.compile=auto").recipe["train"]["compile"] == "auto"


@pytest.mark.slow  # the compiled-coin group's cold compile runs the probe and notes it
def test_the_vector_isa_probe_is_skipped_only_where_it_found_every_reported_set(
        tmp_path: Path, monkeypatch):
    """Inductor's probe of the CPU's vector instruction sets (a child process per set, about
    1 s) runs once per machine and torch: its finding is noted, and trusted only while it
    says that every set the CPU reports is usable."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert compiled_step._vector_isa_known() == {}
    compiled_step._remember_vector_isa()
    path, reported = compiled_step._vector_isa_file()
    assert path.parent == tmp_path and path.is_file()
    if not reported:
        pytest.skip("not an x86 CPU: inductor probes every time")
    assert compiled_step._vector_isa_known() == {"cpp.vec_isa_ok": True}
    path.write_text(json.dumps({"reported": reported, "usable": reported[1:]}))
    assert compiled_step._vector_isa_known() == {}
    path.write_text("not json")
    assert compiled_step._vector_isa_known() == {}


def _graph(fn, *inputs: torch.Tensor) -> torch.fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx
    return make_fx(fn)(*inputs)


def _targets(graph: torch.fx.GraphModule) -> list:
    return [node.target for node in graph.graph.nodes if node.op == "call_function"]


def test_a_gather_of_every_row_in_order_is_dropped_and_any_other_kept():
    """Pyro's ``x.index_select(0, ind)`` under a plate that is not subsampled reads x itself;
    a subsample, a shorter range, or a gather written to in place stays a gather."""
    x, y = torch.randn(6, 2), torch.randn(6)

    def whole(x, y):
        ind = torch.arange(x.shape[0])
        return x.index_select(0, ind).sum(0), y[ind].sum()

    def others(x, y):
        some, short = torch.tensor([3, 0, 5]), torch.arange(5)
        written = y.index_select(0, torch.arange(6))
        written.add_(1.0)
        return x.index_select(0, some).sum(0), y[short].sum(), written

    aten = torch.ops.aten
    for fn, left in ((whole, 0), (others, 3)):
        graph = _graph(fn, x, y)
        expected = graph(x, y)
        compiled_step._drop_whole_gathers(graph)
        gathers = [t for t in _targets(graph)
                   if t in (aten.index_select.default, aten.index.Tensor)]
        assert len(gathers) == left, graph.code
        for got, want in zip(graph(x, y), expected):
            assert torch.equal(got, want)
    assert torch.equal(y, y.clone())  # the in-place write stayed on its own copy


def test_long_sums_to_few_outputs_are_summed_in_two_stages():
    """A GPU step sums a long dim to few outputs over a (blocks, rows / blocks) view; the
    same sums, keepdim kept; many outputs, or a length with no divisor near its root, stay."""
    rows = 2**16 + 2**10  # 66560 = 256 x 260
    x, w = torch.randn(rows, 2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    prime = torch.randn(65537, dtype=torch.float64)

    def sums(x, w, prime):
        g = torch.sigmoid(x @ w).unsqueeze(-1) * x
        return (g.sum(0, keepdim=True), (x * w).sum(-1).sum(0), prime.sum(0),
                x.t().reshape(2, 64, -1).sum(-1), x.sum(-1))

    graph = _graph(sums, x, w, prime)
    expected = graph(x, w, prime)
    compiled_step._split_long_sums(graph)
    reductions = [node for node in graph.graph.nodes
                  if node.target is torch.ops.aten.sum.dim_IntList]
    assert len(reductions) == 2 * 2 + 4, graph.code  # two sums split in two, four not
    for got, want in zip(graph(x, w, prime), expected):
        assert got.shape == want.shape and torch.allclose(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("guide, loss", [("auto_normal", "elbo"),
                                         ("auto_multivariate_normal", "renyi_elbo"),
                                         ("pathfinder", "iwae")])
def test_two_stage_sums_train_as_eager_does(monkeypatch, guide: str, loss: str):
    """The GPU's rewrite, forced on here: logistic regression on 70,000 rows (4 particles:
    the gradient is a sum over the rows, split in two) compiles and its steps follow eager
    Pyro's to rounding."""
    sets = [f"guide={guide}", f"loss={loss}", "loss.num_particles=4", "data.dataset.n=70000",
            "train.compile=false", "train.eval_every=0", "optimizer.lr=0.01"]
    run = setup(*sets, source=RECIPES / "logistic_regression.yaml")
    for _ in range(STEPS):
        assert run.step()[1] == ""
    eager = fitted()
    split, rewrite = [], compiled_step._split_long_sums

    def counted(graph: torch.fx.GraphModule) -> None:
        rewrite(graph)
        split.append(graph.code.count("view"))

    monkeypatch.setattr(compiled_step, "_sums_in_two_stages", lambda device: True)
    monkeypatch.setattr(compiled_step, "_split_long_sums", counted)
    run = setup(*sets, source=RECIPES / "logistic_regression.yaml")
    run.compiled = compiled_step.compile_step(run.svi, run.data, backend="fx")
    assert run.compiled is not None and split and split[0] > 0
    for _ in range(STEPS):
        assert run.step()[1] == ""
    for name, value in fitted().items():
        assert torch.allclose(value, eager[name], rtol=1e-3, atol=1e-3), name


def _toy(scale: float = 0.1, constant: float = 0.5, noisy: bool = True):
    """A step: a loss with a constant and (if ``noisy``) a random draw, and an in-place
    update."""
    def step(param, data):
        noise = torch.randn_like(param) if noisy else torch.zeros_like(param)
        loss = ((param + noise - data) ** 2).sum() * torch.tensor(constant)
        param.sub_(scale * (param - data).sum())
        return (loss,)
    return step


def _toy_inputs() -> list[torch.Tensor]:
    return [torch.zeros(2), torch.arange(6.0).reshape(3, 2)]


def test_a_packaged_step_is_keyed_by_what_it_runs(tmp_path: Path, monkeypatch):
    """The record behind a package's key is the same for the same operations on the same
    layouts, whatever the random draws, and differs where a constant's contents, a number
    argument, an input's dtype or strides, or where a tensor came from differ. A damaged
    package is left for the caller to compile around. A build that failed is tried once more,
    by a later run (the first failure may be the machine's passing state), then no more."""
    from workbench.compile import package_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(package_cache, "_failed_here", set())
    inputs = _toy_inputs()
    record = package_cache.record(_toy(), _toy_inputs())
    assert record == package_cache.record(_toy(), _toy_inputs())
    assert record == package_cache.record(_toy(), _toy_inputs(), seed_offset=1)
    assert record != package_cache.record(_toy(constant=0.25), _toy_inputs())
    assert record != package_cache.record(_toy(scale=0.2), _toy_inputs())
    assert record != package_cache.record(_toy(), [inputs[0], inputs[1].double()])
    assert record != package_cache.record(_toy(), [inputs[0], inputs[1].t().contiguous().t()])
    a, b = torch.ones(3), torch.zeros(3)
    swapped = package_cache.record(lambda x, y: y - x, [a, b])
    assert package_cache.record(torch.sub, [a, b]) != swapped
    key = package_cache.key(record, inputs, 2, [((0.9, 0.999), 1e-8, 0)])
    assert key != package_cache.key(record, inputs, 2, [((0.9, 0.99), 1e-8, 0)])
    assert package_cache.load(key) is None
    path = tmp_path / package_cache.FOLDER / f"{key}.pt2"  # where a package is kept
    graph = _graph(_toy(), *_toy_inputs())
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"not a package")
    assert package_cache.load(key) is None and package_cache.build(graph, inputs, key) is None
    assert path.read_bytes() == b"not a package"
    path.unlink()
    tries = []

    def broken(*args, **kwargs):
        tries.append(args)
        raise RuntimeError("no compiler\nits log")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    package_cache.note_failure(key, package_cache.FAILED, "CppCompileError: an earlier run's")
    assert package_cache.state(key) == "absent"
    assert package_cache.build(graph, inputs, key) is None and len(tries) == 1
    assert package_cache.failures(key) == ["CppCompileError: an earlier run's",
                                           "RuntimeError: no compiler"]
    assert package_cache.state(key) == "failed"
    package_cache._failed_here.clear()  # as a later run
    assert package_cache.build(graph, inputs, key) is None and len(tries) == 1
    assert not path.exists()


def test_a_step_another_process_is_packaging_is_waited_for_and_loaded(tmp_path: Path,
                                                                      monkeypatch):
    """Two runs compiling the same step at once build its package one after the other:
    inductor writes both builds' files at the same paths. The second waits for the first's
    lock (held here by another open file, as another process would hold it), then loads the
    package the first built, without building it again."""
    from workbench.compile import package_cache
    from workbench.rundir import files

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(package_cache, "_failed_here", set())
    key = "0" * 40
    holder, _ = files.try_lock(package_cache.file(key, package_cache.BUILD_LOCK))

    def first_build_ends() -> None:
        package_cache.file(key, ".pt2").write_bytes(b"the first build's package")
        os.close(holder)

    def opened(path: Path, asked: str) -> bytes:
        return path.read_bytes()

    def built_again(*args, **kwargs):
        raise AssertionError("built a second time")

    monkeypatch.setattr(package_cache, "_open", opened)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", built_again)
    ending = threading.Timer(0.3, first_build_ends)
    ending.start()
    try:
        assert package_cache.build(None, [], key) == b"the first build's package"
    finally:
        ending.join()


@pytest.mark.parametrize("given", [True, False])
def test_the_package_folder_is_inductors_cache_found_without_importing_inductor(
        tmp_path: Path, given: bool):
    """``package_cache.cache_dir`` names the directory inductor's own ``cache_dir`` does, with
    the variable set or not, and a process that asks imports neither inductor nor dynamo."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    if given:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "cache")
    probe = ("import sys; from workbench.compile import package_cache\n"
             "mine = package_cache.cache_dir()\n"
             "print(any(m.startswith(('torch._inductor', 'torch._dynamo')) for m in sys.modules))\n"
             "from torch._inductor.runtime.cache_dir_utils import cache_dir\n"
             "print(str(mine) == cache_dir())")
    done = python(probe, env=env)
    assert done.stdout.split() == ["False", "True"], done.stderr


@pytest.mark.slow
def test_a_packaged_step_runs_as_the_graph_does(tmp_path: Path, monkeypatch):
    """Built once (AOTInductor), then loaded: the same loss, and the parameter written in
    place, as the traced graph gives."""
    from workbench.compile import package_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    graph, inputs = _graph(_toy(noisy=False), *_toy_inputs()), _toy_inputs()
    expected = [t.clone() for t in inputs]
    (want,) = graph(*expected)
    key = package_cache.key(package_cache.record(_toy(noisy=False), _toy_inputs()), inputs)
    assert package_cache.build(graph, _toy_inputs(), key) is not None
    run = package_cache.load(key)
    (got,) = run(inputs)
    assert torch.allclose(got, want) and torch.allclose(inputs[0], expected[0])


@pytest.mark.parametrize("recipe", [
    COIN, pytest.param(REPO / "recipes" / "logistic_regression.yaml", marks=pytest.mark.slow)])
def test_a_second_run_loads_its_packaged_step_without_importing_inductor(tmp_path: Path,
                                                                          recipe: Path):
    """The first compiled run of a recipe packages its step (unless a test before it did:
    inductor's cache is the test session's); the next loads it and trains to the
    same numbers without importing inductor or torch._dynamo (a second between them).
    Logistic regression squares its prior's scale, a constant, which failed to package
    until the package folded its constants at load. Neither leaves the package's unpacked
    library behind in the temporary folder (torch's loader removes it only when collected)."""
    from workbench.compile.package_cache import cache_dir

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"VIBENCH_COMPILE": "true", "TMPDIR": str(scratch),
           "TORCHINDUCTOR_CACHE_DIR": str(cache_dir())}  # the session's, as TMPDIR moves
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
             "try:\n    runpy.run_module('workbench', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('imported:', [m for m in ('torch._inductor', 'torch._dynamo')\n"
             "                    if m in sys.modules])")
    finals = []
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        done = subprocess.run(
            [sys.executable, "-c", probe, "workbench", "run", str(recipe), "--steps", "300",
             "--set", "train.plots=false", "--out", str(out)],
            cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["compiled"] is True
        finals.append(summary["final_loss"])
        if n == 2:
            assert "imported: []" in done.stdout, done.stdout
            assert "compiling the step" not in done.stderr  # it loads what run 1 compiled
    assert finals[0] == finals[1]
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []


@pytest.mark.slow
def test_a_cold_compile_says_what_it_is_doing(tmp_path: Path):
    """A model's first compile (a cache of its own here) is announced before its silence."""
    done = subprocess.run(
        [sys.executable, "-m", "workbench", "run", str(REPO / "recipes" / "coin.yaml"),
         "--steps", "100", "--set", "train.compile=true", "--set", "train.plots=false",
         "--out", str(tmp_path / "r")], cwd=REPO, capture_output=True, text=True,
        timeout=600, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("compiling the step"))
    assert "operations" in line and "first compile usually takes" in line


def test_a_trace_s_metadata_comes_from_one_fake_mode_and_its_code_from_its_first_run():
    """make_fx would make a fake mode for each operation's metadata (half a long loop's
    trace) and write the graph's Python after each change to it (a second each)."""
    from torch._subclasses.fake_tensor import FakeTensor

    x = torch.randn(5)

    def loop(x):
        for _ in range(20):
            x = torch.sin(x) * 0.5 + x
        return x.sum()

    graph = compiled_step._make_fx(loop, [x])
    modes = {id(node.meta["val"].fake_mode) for node in graph.graph.nodes
             if isinstance(node.meta.get("val"), FakeTensor)}
    assert len(modes) == 1
    from torch.fx._lazy_graph_module import _LazyGraphModule

    assert isinstance(graph, _LazyGraphModule)
    assert torch.equal(graph(x), loop(x))
