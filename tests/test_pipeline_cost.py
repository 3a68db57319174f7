"""What the automatic pipeline leaves out because it does not pay: the Laplace start and the
mode searches make their L-BFGS without importing torch._dynamo (a second or more of an
eager process, to guard against a tracer that is not running), and a fit read back from its
checkpoint for the answer's draws does not search its start again."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import python

HERE = Path(__file__).resolve().parent


def test_the_mode_search_s_lbfgs_imports_no_dynamo():
    probe = ("import sys, torch\n"
             "from vibench_plugins.laplace import descend\n"
             "fit = descend(lambda x: ((x - 1) ** 2).sum(), torch.zeros(3), True)\n"
             "print(fit.converged, [round(v, 4) for v in fit.point.tolist()],\n"
             "      'torch._dynamo' in sys.modules)")
    done = python(probe)
    assert done.stdout.strip() == "True [1.0, 1.0, 1.0] False", done.stderr


def test_the_laplace_hessian_of_a_latent_gaussian_process_imports_no_dynamo():
    """The double backward of a latent GP's log joint runs one of torch's Python references
    (``torch._refs.add``), whose guard against dynamo imports it at the first call (0.5 s);
    the Hessian runs it without. autograd's own Hessian is the control."""
    probe = ("import sys, torch, pyro, pyro.distributions as dist\n"
             "from pyro.infer.autoguide import AutoMultivariateNormal\n"
             "from vibench_plugins import laplace\n"
             "x, y = torch.linspace(0, 2, 6), torch.tensor([1., 0., 2., 4., 1., 0.])\n"
             "def model():\n"
             "    amplitude = pyro.sample('amplitude', dist.HalfNormal(torch.tensor(1.5)))\n"
             "    scale = pyro.sample('scale', dist.InverseGamma(torch.tensor(4.0), 6.0))\n"
             "    K = amplitude ** 2 * torch.exp(-0.5 * (x[:, None] - x) ** 2 / scale ** 2)\n"
             "    K = K + 1e-3 * torch.eye(6)\n"
             "    f = pyro.sample('f', dist.MultivariateNormal(torch.zeros(6), K))\n"
             "    pyro.sample('y', dist.Poisson(f.exp()).to_event(1), obs=y)\n"
             "guide = AutoMultivariateNormal(model)\n"
             "pyro.infer.Trace_ELBO().loss(model, guide)\n"
             "sites = laplace.layout(guide)\n"
             "potential = laplace.potential_fn(model, sites, (), {})\n"
             "point = torch.zeros(sites[-1].stop)\n"
             "hessian = HESSIAN(potential, point)\n"
             "print(bool(torch.isfinite(hessian).all()), 'torch._dynamo' in sys.modules)")
    ours = python(probe.replace("HESSIAN", "laplace._hessian"))
    autograds = python(probe.replace("HESSIAN", "torch.autograd.functional.hessian"))
    assert ours.stdout.strip() == "True False", ours.stderr
    assert autograds.stdout.strip() == "True True", autograds.stderr


def test_a_fit_read_back_for_the_answer_does_not_search_its_start_again(tmp_path, monkeypatch):
    import yaml

    from vibench_plugins import laplace
    from workbench import service
    from workbench.plugins.registry import get_registry

    recipe = tmp_path / "coin.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "coin", "model": {"name": "beta_bernoulli"},
        "data": {"flips": [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]}, "loggers": [],
        "train": {"plots": False, "eval_every": 0},
        "auto": {"stages": [{"name": f"{HERE / 'auto_models.py'}:OneFit", "init": "laplace"}]}}))
    job = service.start(recipe, [], tmp_path / "run", get_registry())
    job.train()
    (fit,) = job.pipeline.fits

    def searched(*args, **kwargs):
        raise AssertionError("the Laplace start searched again")

    monkeypatch.setattr(laplace, "find_mode", searched)
    run = job.pipeline.load(fit.path)
    loaded = {f"AutoNormal.{name.removesuffix('_unconstrained')}": value
              for name, value in run.guide.named_parameters()}
    trained = fit.summary["params"]  # constrained: the scales positive
    assert sorted(loaded) == sorted(trained)
    assert float(loaded["AutoNormal.locs.latent_fairness"]) == pytest.approx(
        trained["AutoNormal.locs.latent_fairness"])  # the checkpoint's, not a start's
