"""The pipeline's hmc stage (plugins/stages.py, plugins/hmc.py): where the fits' answer is
flagged, HMC chains started from the best Gaussian fit give the answer, judged by
their nested R-hat, ESS and divergences (workbench/report/draws.py), and every reader of a
pipeline run (summary.json, posterior.nc, ``vibench show``, ``workbench.load``) gets the
chains' draws."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import yaml

from tests.helpers import arviz, vibench
from vibench_plugins import hmc, laplace
from workbench import service
from workbench.plugins.registry import get_registry
from workbench.report.draws import chain_diagnostics

HERE = Path(__file__).resolve()


def banana():
    """x1 ~ Normal(0, 1), x2 ~ Normal(x1^2, 0.5): a curved ridge no Gaussian follows, so
    Gaussian fits from different starts disagree (E x2 = 1, sd x2 = sqrt(2.25) = 1.5)."""
    x1 = pyro.sample("x1", dist.Normal(torch.tensor(0.0), 1.0))
    pyro.sample("x2", dist.Normal(x1 ** 2, 0.5))


def _ar1(chains: int, length: int, dimension: int, rho: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.zeros(chains, length, dimension, dtype=torch.float64)
    x[:, 0] = torch.randn(chains, dimension, generator=generator, dtype=torch.float64)
    for t in range(1, length):
        x[:, t] = rho * x[:, t - 1] + math.sqrt(1 - rho ** 2) * torch.randn(
            chains, dimension, generator=generator, dtype=torch.float64)
    return x


def test_the_chains_diagnostics_are_arvizs():
    """Rank-normalised split R-hat to rounding, bulk ESS within 0.1% and tail ESS within 1%
    (ArviZ sums the autocorrelations a little differently, and interpolates its 5% and 95%
    quantiles differently), on autocorrelated chains, one shifted, one heavy-tailed."""
    az = arviz()
    chains = _ar1(4, 500, 3, 0.9, seed=0)
    chains[0, :, 2] += 0.5
    chains[:, :, 1] = chains[:, :, 1] ** 3  # a heavy tail: the folded R-hat's case
    ours = chain_diagnostics(chains)
    theirs = az.convert_to_dataset(chains.numpy())
    assert np.allclose(ours["rhat"].numpy(), az.rhat(theirs)["x"].values, rtol=1e-6)
    assert np.allclose(ours["ess_bulk"].numpy(), az.ess(theirs, method="bulk")["x"].values,
                       rtol=1e-3)
    assert np.allclose(ours["ess_tail"].numpy(), az.ess(theirs, method="tail")["x"].values,
                       rtol=0.01)


def test_the_nested_rhat_passes_groups_that_agree_and_flags_one_apart():
    """32 chains of 200 independent draws in 4 groups: each group's mean is known to
    1 / sqrt(1600) sd, so the nested R-hat sits within 1.01; one group shifted by half an
    sd pushes it past (sqrt(1 + 0.0625 * 3 / 16) = 1.006 from the shift alone is below it:
    a whole sd is 1.046)."""
    chains = _ar1(32, 200, 2, 0.0, seed=1)
    assert float(chain_diagnostics(chains, groups=4)["nested_rhat"].max()) <= 1.01
    chains[:8, :, 0] += 1.0
    found = chain_diagnostics(chains, groups=4)["nested_rhat"]
    assert float(found[0]) > 1.02 and float(found[1]) <= 1.01


def _flagged(chains: torch.Tensor, groups: int = 4) -> bool:
    from vibench_plugins.stages import _worst
    from workbench.report.thresholds import chains_distrusted

    found = chain_diagnostics(chains, groups)
    rhat, limit, at, _, _ = _worst(found, [str(i) for i in range(chains.shape[-1])], groups)
    return bool(chains_distrusted(rhat, limit, at, math.inf, "", 0))


def test_the_nested_rhat_limit_follows_the_ess_stationary_chains_pass_and_groups_apart_do_not():
    """32 stationary chains of 50 draws (AR(1), 0.5) in 4 groups, 40 coordinates: their groups'
    means hold each its own noise (B / W about 4 / ESS), which 1.01 alone flagged in about 80%
    of such sets; the limit allows it and flags about 30%. Groups 0.3 sd apart in one
    coordinate are flagged (about all of them). 20 sets each; the bounds are several binomial
    sds from those rates."""
    from workbench.report.thresholds import RHAT_AGREE, nested_rhat_limit

    assert nested_rhat_limit(1e12, 4) == pytest.approx(RHAT_AGREE)
    assert nested_rhat_limit(400, 4) == pytest.approx(math.sqrt(RHAT_AGREE ** 2 + 0.01))
    offsets = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64) / math.sqrt(1.25)
    stationary = apart = 0
    for seed in range(20):
        chains = _ar1(32, 50, 40, 0.5, seed=100 + seed)
        stationary += _flagged(chains)
        chains[:, :, 0] += 0.3 * offsets.repeat_interleave(8)[:, None]
        apart += _flagged(chains)
    assert stationary <= 12 and apart >= 16, (stationary, apart)


def test_the_stage_judges_its_chains_from_the_second_round_on():
    """Independent draws are trusted after one round of 50, but the stage's rounds go on to a
    second: the first draws after a warm-up carry the start every group shares."""
    from vibench_plugins.stages import enough

    chains = _ar1(32, 100, 2, 0.0, seed=5)
    assert not _flagged(chains[:, :50])
    assert not enough(chains[:, :50], groups=4, labels=["a", "b"], draws=50)
    assert enough(chains, groups=4, labels=["a", "b"], draws=50)


def test_hmc_from_a_narrow_misplaced_gaussian_samples_a_correlated_gaussian():
    """The metric is re-estimated from the chains: a start half as wide as the target and a
    sd away still gives its moments, within 5 Monte Carlo standard errors (by the chains'
    own ESS) for the means and 20% for the sds."""
    scale = torch.tensor([[1.0, 0.0, 0.0], [1.8, 0.6, 0.0], [0.0, 0.0, 3.0]])
    precision = torch.cholesky_inverse(scale)

    def potentials(x):
        return 0.5 * ((x @ precision) * x).sum(-1)

    found = hmc.sample(potentials, torch.ones(3), 0.5 * torch.eye(3), chains=16, warmup=150,
                       draws=100, seed=3, groups=4)
    assert found.points.shape == (16, 100, 3) and found.divergences == 0
    draws = found.points.flatten(0, 1)
    sds = (scale @ scale.T).diagonal().sqrt().double()
    ess = chain_diagnostics(found.points, 4)["ess_bulk"]
    assert (draws.mean(0).abs() <= 5 * sds / ess.sqrt()).all(), (draws.mean(0), ess)
    assert ((draws.std(0) / sds - 1).abs() <= 0.2).all(), draws.std(0)


def test_the_replayed_gradients_are_the_models_and_a_branching_model_runs_eagerly():
    """A model that broadcasts over the chains has its gradients replayed from a graph traced
    once, equal to its own runs'; one that branches in Python on a latent value is not traced
    (the graph would keep one branch) and samples through its own runs."""
    from pyro.infer import Trace_ELBO

    from vibench_plugins import laplace
    from vibench_plugins.guides import auto_multivariate_normal
    from vibench_plugins.pathfinder import batch_potential

    def branching():
        x = pyro.sample("x", dist.Normal(torch.tensor(0.0), 1.0))
        if float(x.detach().max()) > 0:  # reads a value
            pyro.factor("pull", -x ** 2)

    for model, replayed in ((banana, True), (branching, False)):
        pyro.clear_param_store()  # each guide's own parameters, not the last one's
        guide = auto_multivariate_normal(model)
        Trace_ELBO().loss(model, guide)
        sites = laplace.layout(guide)
        potentials = batch_potential(model, sites, (), {}, laplace.potential_fn(
            model, sites, (), {}), grad=True)
        points = torch.randn(8, sites[-1].stop, generator=torch.Generator().manual_seed(0))
        with pyro.validation_enabled(False):
            potentials(points)
            gradients = hmc._Gradients(potentials, points)
            assert (gradients.graph is not None) == replayed
            again = points * 1.5
            assert all(torch.allclose(a, b) for a, b in zip(gradients(again),
                                                            gradients.eager(again)))


def _banana_potentials():
    """The banana's chains' potential, as the hmc stage sets it up, and points for 8 chains."""
    from pyro.infer import Trace_ELBO

    from vibench_plugins import laplace
    from vibench_plugins.guides import auto_multivariate_normal
    from vibench_plugins.pathfinder import batch_potential

    pyro.clear_param_store()
    guide = auto_multivariate_normal(banana)
    Trace_ELBO().loss(banana, guide)
    sites = laplace.layout(guide)
    potentials = batch_potential(banana, sites, (), {}, laplace.potential_fn(
        banana, sites, (), {}), grad=True)
    points = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    potentials(points)
    return potentials, points


def test_a_packaged_graph_that_is_not_the_models_is_not_used(monkeypatch, tmp_path):
    """The gradients compiled by an earlier run are found by a record of the function, and
    used only where they agree with the model's own: a package giving other values is set
    aside for the graph traced here. A child asked to package a key the function it sets up
    does not record to packages nothing (and compiles nothing: it stops before tracing)."""
    import functools

    from workbench.compile import traced

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    with pyro.validation_enabled(False):
        potentials, points = _banana_potentials()
        function = functools.partial(laplace.value_and_gradient, potentials)
        found, key = traced.packaged(function, [points])
        assert found is None and len(key) == 40  # none built yet: the key to build it under
        assert traced.packaged(function, [points * 2])[1] == key  # by layout, not values
        assert traced.packaged(function, [points[:4]])[1] != key  # 4 chains: another graph

        def wrong(x):
            value, gradient = laplace.value_and_gradient(potentials, x)
            return [value + 1.0, gradient]

        gradients = hmc._Gradients(potentials, points, packaged=wrong)
        assert gradients.how == "traced" and gradients.graph is not wrong
        right = hmc._Gradients(potentials, points, packaged=function)
        assert right.how == "packaged"
        monkeypatch.setattr(traced, "traced", lambda *args: pytest.fail("traced"))
        with pytest.raises(RuntimeError, match="not the one the run asked for"):
            traced.package(function, [points], "0" * 40)
    assert not list((tmp_path / "cache").rglob("*.pt2"))


@pytest.mark.parametrize("reversed_batch", [False, True])
def test_where_the_graph_fails_on_some_chains_only_those_run_through_the_model(reversed_batch):
    """A density built on a Cholesky factor fails for the whole batch where one chain's
    matrix is no longer positive definite. The rows it fails on are found with the graph
    (the others at the last points it passed: from the batch element torch's error names, or,
    where that is not the chain, by halving) and only they run through the model, which
    says inf: the values and gradients are the model's own."""
    rows_run = []

    def one(point):  # the model, a point at a time: inf where it refuses the point
        rows_run.append(point)
        try:
            return batched(point[None])[0]
        except torch.linalg.LinAlgError:
            return point.new_tensor(math.inf)  # as plugins/laplace.py's potential says

    def batched(x):  # [[1, x0], [x0, 1]] is positive definite while |x0| < 1
        x = x.flip(0) if reversed_batch else x  # batch element k is then the chain n - 1 - k
        matrix = torch.eye(2).expand(len(x), 2, 2) + x[:, 0, None, None] * torch.tensor(
            [[0.0, 1.0], [1.0, 0.0]])
        factor = torch.linalg.cholesky(matrix)
        value = 0.5 * (x ** 2).sum(-1) + factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return value.flip(0) if reversed_batch else value

    def potentials(x):
        try:
            return batched(x)
        except RuntimeError:
            return torch.stack([one(point) for point in x])

    potentials.rowwise = False
    generator = torch.Generator().manual_seed(0)
    points = 0.3 * torch.randn(32, 2, generator=generator)
    gradients = hmc._Gradients(potentials, points)
    assert gradients.how == "traced"
    gradients(points)
    x = 0.3 * torch.randn(32, 2, generator=generator)
    x[[3, 17, 18], 0] = torch.tensor([1.5, -2.0, 1.2])
    rows_run.clear()
    value, gradient = gradients(x)
    assert len(rows_run) == 3  # the three refused points alone went through the model
    wanted_value, wanted_gradient = laplace.value_and_gradient(potentials, x)
    assert torch.isinf(value[[3, 17, 18]]).all() and torch.isinf(wanted_value[[3, 17, 18]]).all()
    assert torch.allclose(value, wanted_value) and torch.allclose(gradient, wanted_gradient)


def test_a_packaged_function_that_fails_says_nothing_on_stderr(capfd):
    """AOTInductor's runtime prints a line of C++ to fd 2 for each operation that fails in a
    package (a Cholesky factor the chains' gradients fall back from); the caller sees the
    exception alone, and fd 2 is the run's again afterwards."""
    import os

    from workbench.compile import traced

    def failing(values):
        os.write(2, b"Error: aoti_torch_proxy_executor_call_function ... API call failed\n")
        raise RuntimeError("the package's operation failed")

    call = traced._quiet(failing)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="operation failed"):
            call(torch.ones(2))
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_a_function_whose_operations_change_with_the_random_stream_has_no_package():
    """A record taken on two random streams that differ (a branch on a draw) gives no key:
    a package of one branch would be wrong for the other."""
    from workbench.compile import traced

    def drawn(x):
        return x * 2 if float(torch.rand(())) < 0.5 else x.exp()

    keys = {traced.packaged(drawn, [torch.ones(3)])[1] for _ in range(8)}
    assert keys == {None}


def _unbroadcast_potentials(model):
    from pyro.infer import Trace_ELBO

    from vibench_plugins.guides import auto_multivariate_normal
    from vibench_plugins.pathfinder import batch_potential

    pyro.clear_param_store()
    guide = auto_multivariate_normal(model)
    Trace_ELBO().loss(model, guide)
    sites = laplace.layout(guide)
    potential = laplace.potential_fn(model, sites, (), {})
    return potential, batch_potential(model, sites, (), {}, potential, grad=True)


def unbroadcast():
    """x @ a vector: right for one point, wrong (or failing) for a batch of them."""
    x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(torch.tensor([1.0, -1.0]) @ x, 0.5), obs=torch.tensor(0.3))


def test_a_model_that_does_not_broadcast_is_mapped_over_the_chains():
    """The hmc stage (validation off) asks the batched potential, with two points, which way
    the model runs: one that does not broadcast over the chains is run as on one point,
    mapped over them by torch.func.vmap, with the values and gradients of its runs a point
    at a time, and so its chains are as many and its gradients traced as a broadcasting
    model's."""
    with pyro.validation_enabled(False):
        potential, potentials = _unbroadcast_potentials(unbroadcast)
        points = torch.tensor([[0.1, 0.2], [-0.5, 1.0], [2.0, -0.3]])
        found = potentials(points)
        assert potentials.rowwise is False
        assert torch.allclose(found, torch.stack([potential(point) for point in points]))
        value, gradient = laplace.value_and_gradient(potentials, points)
        for point, one in zip(points, gradient):
            x = point.clone().requires_grad_(True)
            (wanted,) = torch.autograd.grad(potential(x), x)
            assert torch.allclose(one, wanted, atol=1e-6)
        assert hmc._Gradients(potentials, points).how == "traced"


def test_a_model_that_neither_broadcasts_nor_maps_is_run_a_point_at_a_time_even_for_two():
    """A model that reads a latent value in Python can be neither broadcast nor mapped: it
    is run once a point, two included."""
    def branching():
        x = pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        shift = 1.0 if float(x.detach().sum()) > 0 else -1.0  # a value read in Python
        pyro.sample("y", dist.Normal(torch.tensor([1.0, -1.0]) @ x + shift, 0.5),
                    obs=torch.tensor(0.3))

    with pyro.validation_enabled(False):
        potential, potentials = _unbroadcast_potentials(branching)
        points = torch.tensor([[0.1, 0.2], [-0.5, 1.0]])
        found = potentials(points)
        assert potentials.rowwise is True
        assert torch.allclose(found, torch.stack([potential(point) for point in points]))


def test_a_model_refusing_a_point_sends_no_chain_there():
    """A potential that is infinite beyond a wall (a model's support, a covariance no
    longer one) rejects the trajectories that cross it: no draw beyond it."""
    def potentials(x):
        value = 0.5 * (x ** 2).sum(-1)
        return torch.where(x[:, 0] > 1.0, torch.inf, value)

    found = hmc.sample(potentials, torch.zeros(2), torch.eye(2), chains=8, warmup=60,
                       draws=40, seed=0, groups=2)
    assert (found.points[..., 0] <= 1.0).all()
    assert torch.isfinite(found.points).all()


def run(tmp_path: Path, model: str, stages: list, data: dict | None = None) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": f"{HERE}:{model}"}, "data": data or {}, "loggers": [],
        "train": {"plots": True, "eval_every": 0}, "auto": {"stages": stages}}))
    return service.start(path, [], tmp_path / "run", get_registry()).train()


HMC_STAGES = ["start", {"name": "gaussian", "runs": 2, "modes": 0, "reparam": "none",
                        "max_steps": 100}, "rhat", "psis",
              {"name": "hmc", "chains": 16, "groups": 4, "warmup": 150, "draws": 50,
               "rounds": 6}]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> tuple[dict, Path]:
    where = tmp_path_factory.mktemp("banana")
    return run(where, "banana", HMC_STAGES), where / "run"


def test_where_the_fits_answer_is_flagged_the_answer_is_the_chains_draws(sampled):
    summary, path = sampled
    said = {stage["stage"]: stage["said"] for stage in summary["auto"]["stages"]}
    assert ": HMC from gaussian-" in said["hmc"]  # why: the first flag of the fits' answer
    auto = summary["auto"]
    assert auto["answer"] == "hmc draws" and auto["weighted"] == []
    sampler = summary["diagnostics"]["sampler"]
    assert auto["used"] == [sampler["from"]] and summary["diagnostics"]["khat"] is None
    assert sampler["chains"] == 16 and sampler["groups"] == 4
    # the banana broadcasts and reads no value in Python; the suite compiles nothing for later
    assert sampler["graph"] == "traced"
    assert sampler["draws"] in range(50, 301, 50)  # whole rounds, stopped once trusted
    assert sampler["trusted"] == auto["trusted"] == (not auto["flags"])
    if not auto["trusted"]:
        assert auto["flags"][0].startswith("HMC: ")  # the chains' own reasons, no fit's
    chains = np.load(path / "chains.npy", allow_pickle=False)
    assert chains.shape == (16, sampler["draws"], 2) and chains.dtype == np.float64
    # the summary's moments are those of all the chains' draws (x1 and x2 are unconstrained)
    x1, x2 = chains[..., 0].ravel(), chains[..., 1].ravel()
    assert summary["posterior"]["x1"]["mean"] == pytest.approx(x1.mean(), abs=1e-5)
    assert summary["posterior"]["x2"]["std"] == pytest.approx(x2.std(ddof=1), rel=1e-4)
    # against the banana's exact moments: the means within 5 Monte Carlo standard errors
    ess = sampler["ess"]
    assert abs(x1.mean()) <= 5 / math.sqrt(ess) and abs(x2.mean() - 1) <= 5 * 1.5 / math.sqrt(ess)


def test_the_chains_answer_reaches_every_reader(sampled, tmp_path):
    import workbench

    summary, path = sampled
    az = arviz()
    written = az.from_netcdf(path / "posterior.nc")
    assert list(written.posterior.data_vars) == ["x1", "x2"]
    assert written.posterior.sizes["draw"] == 1000
    assert "log_weight" not in written.sample_stats
    assert not written.sample_stats["resampled"].values.any()
    assert "HMC" in written.posterior.attrs["method"]
    assert written.sample_stats.attrs["description"].startswith(
        "fit: 0, every draw is a draw of the HMC")
    assert {p.name for p in (path / "plots").glob("site-*.png")} == {"site-x1.png",
                                                                     "site-x2.png"}
    shown = vibench("show", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "auto: HMC draws: 16 chains x" in shown.stdout
    sampler = summary["diagnostics"]["sampler"]
    assert sampler["nested_rhat"] <= sampler["nested_rhat_limit"] < 1.03
    assert (f"HMC draws: nested R-hat {sampler['nested_rhat']:.3f} (at most "
            f"{sampler['nested_rhat_limit']:.3f}), ESS "
            f"{sampler['ess']:.0f} (at least 400; the means' Monte Carlo error "
            f"+-{1 / math.sqrt(sampler['ess']):.3f} sd at most), {sampler['divergences']} "
            "divergent transitions: ") in shown.stdout
    fitted = workbench.load(path, trust_code=True)
    assert fitted.verdict.startswith("HMC draws: nested R-hat ")
    draws = workbench.load(path, trust_code=True).sample(20, seed=0)
    assert set(draws) == {"x1", "x2"} and draws["x1"].shape == (20,)
    recorded = json.loads((path / "summary.json").read_text())
    assert recorded["diagnostics"]["sampler"] == summary["diagnostics"]["sampler"]
    copy = _without_posterior(path, tmp_path / "copy")
    done = vibench("export", str(copy), "--trust-code")  # from chains.npy: the same draws
    assert done.returncode == 0, done.stderr
    assert np.array_equal(written.posterior["x2"].values,
                          az.from_netcdf(copy / "posterior.nc").posterior["x2"].values)


def _without_posterior(path: Path, where: Path) -> Path:
    import shutil

    shutil.copytree(path, where)
    (where / "posterior.nc").unlink()
    return where


def test_a_chains_file_holding_pickled_objects_is_refused_unread(sampled, tmp_path):
    """chains.npy is read without pickle: a planted file holding Python objects (which
    np.load would otherwise unpickle, running code) makes export fail in one line."""
    _, path = sampled
    copy = _without_posterior(path, tmp_path / "copy")
    planted = tmp_path / "planted"
    payload = np.array([_Planted(str(planted))], dtype=object)
    np.save(copy / "chains.npy", payload, allow_pickle=True)
    done = vibench("export", str(copy), "--trust-code")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "chains.npy" in done.stderr or "pickle" in done.stderr, done.stderr
    assert not planted.exists() and not (copy / "posterior.nc").exists()


def test_a_chains_file_over_the_bound_is_refused_before_it_is_parsed(sampled, monkeypatch):
    """chains.npy is read as every file read back is (``files.read_bounded``): one larger
    than the bound is refused, in one line naming it, before NumPy sees it."""
    from workbench.auto import answer
    from workbench.rundir.files import UnsafeFile

    _, path = sampled
    monkeypatch.setattr(answer, "MAX_CHAINS_BYTES", 100)
    with pytest.raises(UnsafeFile, match="chains.npy"):
        answer.chains_run(path, "gaussian-1", lambda fit: None)


class _Planted:
    """Unpickled, it would write a file: the proof that loading ran code."""

    def __init__(self, where: str):
        self.where = where

    def __reduce__(self):
        return (Path(self.where).touch, ())


@pytest.mark.parametrize("options, problem", [
    ({"chains": 10, "groups": 4}, "groups >= 2 dividing chains"),
    ({"groups": 1}, "groups >= 2 dividing chains"),
    ({"target_accept": 1.0}, "target_accept must be in (0, 1)"),
])
def test_a_bad_hmc_option_is_one_line(tmp_path, options, problem):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": f"{HERE}:banana"}, "data": {},
        "auto": {"stages": ["start", "gaussian", {"name": "hmc", **options}]}}))
    done = vibench("run", str(recipe), "--out", str(tmp_path / "run"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert problem in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


HARD = HERE.parent.parent / "packages" / "vibench-hardcases" / "recipes"


@pytest.mark.slow
@pytest.mark.parametrize("posterior", ["hard_latent_gp", "hard_hier_centred"])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_hard_posteriors_no_fit_pins_down_are_answered_by_the_chains(tmp_path, posterior,
                                                                         seed):
    """latent_gp (no Gaussian, flow or proposal with a k-hat within 0.7) and hier_centred (an
    sd the weighted draws do not pin down) with the default pipeline: the hmc stage's draws,
    trusted and right against the reference: every mean within 0.2 of its sd (the chains' ESS
    of 400 or more puts their Monte Carlo error near 0.05 sd) and every sd within 20%."""
    pytest.importorskip("vibench_hardcases")
    summary = service.start(HARD / f"{posterior}.yaml", [f"seed={seed}", "loggers=[]",
                            "train.plots=false", "train.eval_every=0"], tmp_path / "run",
                            get_registry()).train()
    auto = summary["auto"]
    assert auto["answer"] == "hmc draws" and auto["trusted"], auto["flags"]
    assert summary["diagnostics"]["sampler"]["ess"] >= 400
    reference = summary["reference"]
    assert reference["max_z"] <= 0.2 and 0.8 <= reference["min_r"] <= reference["max_r"] <= 1.2


@pytest.mark.slow  # a real compile in the child
def test_a_later_run_takes_the_chains_gradients_from_the_package_a_child_built(
        tmp_path, monkeypatch, capfd):
    """The first run starts a child (``python -m vibench_plugins.hmc_package``) that rebuilds
    the fit from its run directory and packages the chains' gradients; the next run of the
    same model loads that package, checks it against the model's own gradients, samples with
    it and gives the same answer as the chains did with the traced graph."""
    import os
    import re

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VIBENCH_BACKGROUND_COMPILE", "true")
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = run(tmp_path / "first", "banana", HMC_STAGES)
    text = capfd.readouterr().err
    started = re.search(r"compiling the chains' gradients for later runs in the background "
                        r"\(pid (\d+), log (.+?)\)", text)
    assert started, text
    pid, child_log = int(started.group(1)), Path(started.group(2))
    os.waitpid(pid, 0)  # this process started it (in a session of its own)
    assert "packaged the chains' gradients" in child_log.read_text(), child_log.read_text()
    second = run(tmp_path / "second", "banana", HMC_STAGES)
    assert first["diagnostics"]["sampler"]["graph"] == "traced"
    sampler = second["diagnostics"]["sampler"]
    assert sampler["graph"] == "packaged" and sampler["trusted"], sampler
    for name in ("x1", "x2"):  # the same chains but for rounding: the same moments to MC error
        assert second["posterior"][name]["mean"] == pytest.approx(
            first["posterior"][name]["mean"], abs=5 * 1.5 / math.sqrt(sampler["ess"]))
