"""A component named by its file or module (``file.py:attr``, ``package.module:attr``): a
user's own model, guide or loss without a package, checked and built like a registered one."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, resolved, setup, train, vibench
from workbench.config import recipe as recipes
from workbench.errors import RecipeError
from workbench.plugins.registry import get_registry
from workbench.train.runner import Run

COIN_MODEL = """
    import pyro
    import pyro.distributions as dist


    class Coin:
        \"\"\"A coin whose fairness has a Beta(prior, prior) prior.\"\"\"

        def __init__(self, prior: float = 10.0):
            self.prior = prior

        def __call__(self, flips):
            fairness = pyro.sample("fairness", dist.Beta(float(self.prior), float(self.prior)))
            with pyro.plate("flips", len(flips)):
                pyro.sample("obs", dist.Bernoulli(fairness), obs=flips)


    def model(flips):
        fairness = pyro.sample("fairness", dist.Beta(10.0, 10.0))
        with pyro.plate("flips", len(flips)):
            pyro.sample("obs", dist.Bernoulli(fairness), obs=flips)
"""

FLIPS = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def recipe_file(directory: Path, **sections) -> Path:
    """A recipe in ``directory``: the coin's data, AutoNormal and Adam unless ``sections``
    say otherwise."""
    recipe = {"data": {"flips": FLIPS}, "guide": {"name": "auto_normal"}, "loss": {"name": "elbo"},
              "optimizer": {"name": "adam", "lr": 0.05},
              "train": {"steps": 20, "eval_every": 0, "plots": False}, **sections}
    return write(directory / "recipe.yaml", yaml.safe_dump(recipe))


def problems(path: Path, *sets: str) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        resolved(*sets, source=path)
    return caught.value.problems


def test_the_example_recipe_runs_from_anywhere_and_resumes(tmp_path: Path):
    out = tmp_path / "run"
    result = vibench("run", str(REPO / "recipes" / "my_model.yaml"), "--steps", "20",
                     "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["model"] == {"name": f"{REPO / 'recipes' / 'my_model.py'}:model"}
    assert "fairness" in json.loads((out / "summary.json").read_text())["posterior"]
    result = vibench("run", "--resume", str(out), "--steps", "30", cwd=tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 30


def test_a_factory_class_from_a_file_gets_its_options(tmp_path: Path):
    write(tmp_path / "coin.py", COIN_MODEL)
    path = recipe_file(tmp_path, model={"name": "coin.py:Coin", "prior": 2.0})
    recipe = resolved(source=path)
    assert recipe["model"] == {"name": f"{tmp_path / 'coin.py'}:Coin", "prior": 2.0}
    run = Run.setup(recipe, get_registry())
    assert run.model.prior == 2.0
    assert problems(path, "model.prior=abc") == [
        "model.prior: expected float, got 'abc' (set on the command line)"]
    assert problems(path, "model.prio=3") == [
        "model.prio: model 'coin.py:Coin' has no option 'prio'; did you mean 'prior'? "
        "(set on the command line)"]


def test_a_plain_function_is_the_model_itself_and_takes_its_data(tmp_path: Path):
    write(tmp_path / "line.py", """
        import pyro
        import pyro.distributions as dist


        def model(x, y):
            slope = pyro.sample("slope", dist.Normal(0.0, 10.0))
            with pyro.plate("data", len(x)):
                pyro.sample("y", dist.Normal(slope * x, 0.5), obs=y)
    """)
    path = recipe_file(tmp_path, model={"name": "line.py:model"},
                       data={"x": [0.0, 1.0, 2.0, 3.0], "y": [0.1, 2.1, 3.9, 6.2]})
    summary = train(setup(source=path), tmp_path)
    assert summary["steps"] == 20 and "slope" in summary["posterior"]
    assert problems(path, "model.noise=1") == [
        "model.noise: model 'line.py:model' has no option 'noise'; a function is the model "
        "itself (its parameters are the data), so it takes no options; to give it options, "
        "make it a class whose __init__ takes them (set on the command line)"]


def test_a_guide_and_a_loss_from_a_file(tmp_path: Path):
    write(tmp_path / "coin.py", COIN_MODEL)
    write(tmp_path / "mine.py", """
        import pyro
        import pyro.distributions as dist
        import torch
        from torch.distributions import constraints


        def guide(flips):
            a = pyro.param("a", torch.tensor(15.0), constraint=constraints.positive)
            b = pyro.param("b", torch.tensor(15.0), constraint=constraints.positive)
            pyro.sample("fairness", dist.Beta(a, b))


        def elbo(num_particles: int = 1):
            \"\"\"Pyro's ELBO with that many particles.\"\"\"
            return pyro.infer.Trace_ELBO(num_particles=num_particles)
    """)
    path = recipe_file(tmp_path, model={"name": "coin.py:model"},
                       guide={"name": "mine.py:guide"},
                       loss={"name": "mine.py:elbo", "num_particles": 3})
    run = setup(source=path)
    assert run.svi.loss.__self__.num_particles == 3
    summary = train(run, tmp_path)
    assert set(summary["params"]) == {"a", "b"} and summary["steps"] == 20
    assert problems(path, "loss.num_particle=3") == [
        "loss.num_particle: loss 'mine.py:elbo' has no option 'num_particle'; did you mean "
        "'num_particles'? (set on the command line)"]


def test_a_class_from_a_module_is_a_factory_and_its_saved_recipe_runs_again(tmp_path: Path):
    write(tmp_path / "coin.py", COIN_MODEL)
    path = recipe_file(tmp_path, model={"name": "coin.py:model"},
                       guide={"name": "pyro.infer.autoguide:AutoNormal", "init_scale": 0.05})
    recipe = resolved(source=path)
    # init_loc_fn defaults to a function, which no recipe could hold: it is no option
    assert recipe["guide"] == {"name": "pyro.infer.autoguide:AutoNormal",
                               "init_scale": 0.05, "create_plates": None}
    saved = write(tmp_path / "saved" / "recipe.yaml", recipes.dump(recipe))
    assert recipes.dump(resolved(source=saved)) == recipes.dump(recipe)
    assert Run.setup(recipe, get_registry()).guide._init_scale == 0.05


def test_a_package_module_attribute_on_the_python_path(tmp_path: Path):
    write(tmp_path / "lib" / "mypkg" / "__init__.py", "")
    write(tmp_path / "lib" / "mypkg" / "models.py", COIN_MODEL)
    recipe = recipe_file(tmp_path, model={"name": "mypkg.models:Coin", "prior": 3.0})
    out = tmp_path / "run"
    result = vibench("run", str(recipe), "--out", str(out), cwd=tmp_path,
                     env={"PYTHONPATH": os.pathsep.join(
                         filter(None, [str(tmp_path / "lib"), os.environ.get("PYTHONPATH")]))})
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["model"] == {"name": "mypkg.models:Coin", "prior": 3.0}


def test_a_file_is_imported_once_per_process(tmp_path: Path):
    write(tmp_path / "counted.py", f"""
        with open({str(tmp_path / 'imports')!r}, "a") as log:
            log.write("imported\\n")


        def model(flips):
            pass
    """)
    path = recipe_file(tmp_path, model={"name": "counted.py:model"})
    resolved(source=path)
    resolved(f"model.name={tmp_path / 'counted.py'}:model", source=path)
    get_registry().get("model", "counted.py:model", tmp_path)
    assert (tmp_path / "imports").read_text() == "imported\n"


ERRORS = {
    "missing file": (None, "nope.py:model",
                     "model.name: nope.py:model: no such file nope.py (looked for {dir}/nope.py)"),
    "missing attribute": ("def model(flips):\n    pass\n", "mine.py:modle",
                          "model.name: mine.py:modle: no attribute 'modle' in mine.py; "
                          "did you mean 'model'?"),
    "syntax error": ("x = 1\ndef model(flips:\n    pass\n", "mine.py:model",
                     "model.name: mine.py:model: syntax error in mine.py at line 2: "
                     "'(' was never closed"),
    "exception at import": ("x = 1\ny = x / 0\n", "mine.py:model",
                            "model.name: mine.py:model: importing mine.py raised "
                            "ZeroDivisionError: division by zero at line 2"),
    "exit at import": ("import sys\nsys.exit(3)\n", "mine.py:model",
                       "model.name: mine.py:model: importing mine.py raised SystemExit: 3 "
                       "at line 2"),
    "missing module": (None, "no_such_pkg.models:model",
                       "model.name: no_such_pkg.models:model: no module named 'no_such_pkg' "
                       "(is it installed, or its directory on PYTHONPATH?)"),
    "not a python name": (None, "mine.py:my-model",
                          "model.name: mine.py:my-model: 'my-model' is not a Python name; "
                          "expected path/to/file.py:attr or package.module:attr"),
    "not callable": ("model = 3\n", "mine.py:model",
                     "model.name: mine.py:model: not a function or class (it is int)"),
    "no attribute named": (None, "mine.py",
                           "model.name: unknown model 'mine.py'; to use a file, name its "
                           "function or class too: 'mine.py:model'"),
}


@pytest.mark.parametrize("case", ERRORS, ids=str)
def test_each_failure_is_one_line_and_exit_2(tmp_path: Path, case: str):
    content, name, expected = ERRORS[case]
    if content is not None:
        write(tmp_path / "mine.py", content)
    recipe = recipe_file(tmp_path, model={"name": name})
    result = vibench("run", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    said = [line for line in result.stderr.splitlines() if not line.startswith("note: ")]
    assert said == [f"error: {recipe}: {expected.format(dir=tmp_path.resolve())}"], result.stderr
    assert not (tmp_path / "run").exists()


# A regression on two predictors, written for one draw (``x @ beta``): it does not broadcast
# over draws, and data with another number of predictors break it at its last line.
NOT_BROADCASTING = """
    import pyro
    import pyro.distributions as dist
    import torch

    def model(x, y):
        beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("rows", len(y)):
            pyro.sample("y", dist.Normal(x @ beta, 1.0), obs=y)
"""


def test_a_report_failure_is_one_line_in_summary_json(tmp_path: Path):
    """A plain model that does not broadcast over draws fails in the report's batched draws;
    what summary.json says of it is one line (Pyro's shape tables left out)."""
    (tmp_path / "plain.py").write_text(textwrap.dedent(NOT_BROADCASTING))
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({
        "model": {"name": "plain.py:model"}, "guide": {"name": "auto_normal"},
        "loss": {"name": "elbo"}, "optimizer": {"name": "adam", "lr": 0.01},
        "data": {"x": [[1.0, 0.5], [0.2, -1.0], [0.3, 0.3]], "y": [1.0, -0.5, 0.2]},
        "loggers": [], "train": {"steps": 20, "plots": False}}))
    result = vibench("run", str(tmp_path / "plain.yaml"), "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())

    def texts(value):
        if isinstance(value, dict):
            return [t for v in value.values() for t in texts(v)]
        if isinstance(value, list):
            return [t for v in value for t in texts(v)]
        return [value] if isinstance(value, str) else []

    assert all("\n" not in text for text in texts(summary["diagnostics"]))


# --------------------------------------------------------------------------------------------
# plain Pyro: models that do not broadcast over a leading dimension (tests/plain_models.py)

PLAIN = REPO / "tests" / "plain_models.py"
REGRESSION = {"dataset": {"name": "synthetic_regression", "n": 100}}
TWINS = {  # case: (plain model, its broadcasting twin, data, its line that fails with draws)
    "coin": (f"{PLAIN}:coin", {"name": "beta_bernoulli"}, {"flips": FLIPS * 3},
             "Bernoulli(fairness.expand(len(flips)))"),
    "linear": (f"{PLAIN}:linear", {"name": "linear_regression", "noise": 0.5}, REGRESSION,
               "intercept + x @ coefficients"),
    "hierarchical": (f"{PLAIN}:hierarchical", {"name": f"{PLAIN}:hierarchical_broadcasting"},
                     None, "a[g.index_select(0, ind)] + X.index_select(0, ind) @ beta"),
}
GUIDES = {"auto_normal": 1, "auto_multivariate_normal": 2}  # guide: particles


def plain_recipe(directory: Path, model: dict, data: dict | None, guide: str = "auto_normal",
                 particles: int = 1, steps: int = 600, **sections) -> Path:
    """A recipe for a plain model or its twin: Adam with a decaying step size and the last
    half of the iterates averaged, so that two fits' means differ by far less than a
    posterior sd."""
    from tests import plain_models

    recipe = {"data": data or plain_models.hierarchical_data(rows=400), "model": model,
              "guide": {"name": guide}, "loss": {"name": "elbo", "num_particles": particles},
              "optimizer": {"name": "adam", "lr": 0.05,
                            "schedule": {"name": "exponential", "gamma": 0.995}},
              "loggers": [], "train": {"steps": steps, "eval_every": 0, "average_last": 0.5},
              **sections}
    directory.mkdir(parents=True, exist_ok=True)
    return write(directory / "recipe.yaml", yaml.safe_dump(recipe))


def fit(path: Path) -> tuple[Run, dict, Path]:
    run = setup(source=path)
    out = path.parent / "out"
    out.mkdir()
    return run, run.train(out), out


def means(summary: dict) -> dict[str, tuple]:
    """Per latent site, the guide's mean and sd as flat tensors."""
    import torch

    return {name: (torch.tensor(entry["mean"]).reshape(-1), torch.tensor(entry["std"]).reshape(-1))
            for name, entry in summary["posterior"].items()}


# The quick suite fits the coin with one particle and with two, one after another; the other
# pairs (the newcomer's hierarchical model among them) run in the slow suite.
QUICK_TWINS = {("coin", "auto_normal"), ("coin", "auto_multivariate_normal")}


@pytest.mark.parametrize("case,guide", [
    pytest.param(case, guide, id=f"{case}-{guide}",
                 marks=() if (case, guide) in QUICK_TWINS else pytest.mark.slow)
    for case in TWINS for guide in GUIDES])
def test_a_plain_model_is_fitted_and_reported_as_its_broadcasting_twin(tmp_path: Path,
                                                                        case: str, guide: str):
    """Each plain model trains (its particles at once, vmapped), gets a PSIS k-hat over every
    draw (vmap), density plots and posterior.nc with its posterior predictive, and agrees with
    its broadcasting twin within a fraction of a posterior sd."""
    import h5netcdf

    plain, twin, data, line = TWINS[case]
    particles = GUIDES[guide]
    run, summary, out = fit(plain_recipe(tmp_path / "plain", {"name": plain}, data, guide,
                                         particles))
    assert run.notes[0].startswith(f"model {plain!r} does not broadcast over a leading "
                                   "dimension of draws: plain_models.py:"), run.notes
    assert line in run.notes[0]
    assert "torch.func.vmap" in run.notes[1]
    assert ("particles run at once with torch.func.vmap" in run.notes[1]) == (particles > 1)
    assert "one after another" not in run.notes[1]
    assert run.svi.loss.__self__.vectorize_particles == (particles > 1)
    assert summary["status"] == "completed"
    diagnostics = summary["diagnostics"]
    assert diagnostics["khat"] is not None, diagnostics
    assert diagnostics["num_draws"] == 10_000 and "vmap" in diagnostics["per_draw"]
    assert diagnostics["inference_data"] == "written"
    for site in summary["posterior"]:
        assert (out / "plots" / f"site-{site}.png").exists(), site
    assert (out / "plots" / "ppc.png").exists()
    with h5netcdf.File(str(out / "posterior.nc"), "r") as nc:
        assert set(summary["posterior"]) <= set(nc.groups["posterior"].variables)
        assert {"posterior_predictive", "log_likelihood", "sample_stats"} <= set(nc.groups)

    twin_run, twin_summary, _ = fit(plain_recipe(tmp_path / "twin", twin, data, guide,
                                                 particles))
    assert twin_run.notes == [] and twin_run.svi.loss.__self__.vectorize_particles == (
        particles > 1)
    assert twin_summary["diagnostics"]["num_draws"] == 10_000
    assert "per_draw" not in twin_summary["diagnostics"]
    theirs = means(twin_summary)
    for site, (mean, sd) in means(summary).items():
        twin_mean, twin_sd = theirs[site]
        assert ((mean - twin_mean).abs() <= 0.25 * twin_sd).all(), (site, mean, twin_mean, sd)
        # a full-rank Gaussian's sd is still moving after these steps, in either fit
        assert ((sd / twin_sd - 1).abs() <= 0.8).all(), (site, sd, twin_sd)


@pytest.mark.parametrize("case", ["coin", "hierarchical"])
def test_vmapped_particles_step_as_the_broadcasting_twins_vectorised_ones(tmp_path: Path,
                                                                          case: str):
    """One step of a plain model's particles, vmapped, has the loss and gradients of its
    broadcasting twin's vectorised particles, from the same seed (the same guide draws)."""
    import pyro
    import torch

    plain, twin, data, _ = TWINS[case]
    steps, notes = {}, {}
    for name, model in (("plain", {"name": plain}), ("twin", twin)):
        run = setup(source=plain_recipe(tmp_path / name, model, data,
                                        "auto_multivariate_normal", 4, steps=1))
        notes[name] = run.notes
        pyro.set_rng_seed(3)
        loss = run.svi.loss_and_grads(run.svi.model, run.svi.guide, **run.data)
        store = pyro.get_param_store()
        steps[name] = loss, {key: store.get_param(key).unconstrained().grad.clone()
                             for key in store.keys()}
    assert "its 4 particles run at once with torch.func.vmap" in notes["plain"][1]
    assert notes["twin"] == []
    (loss, grads), (twin_loss, twin_grads) = steps["plain"], steps["twin"]
    assert loss == pytest.approx(twin_loss, rel=1e-5)
    assert grads.keys() == twin_grads.keys()
    for key, grad in grads.items():
        assert torch.allclose(grad, twin_grads[key], rtol=1e-4, atol=1e-4), key


def test_a_model_that_mixes_its_draws_is_found_out(tmp_path: Path):
    """A model that runs with a plate of draws but sums over it (``effects.sum()``) would
    train silently wrong with vectorised particles: the check compares draws at once with
    each alone, and its particles run vmapped, each one alone."""
    run, summary, _ = fit(plain_recipe(tmp_path, {"name": f"{PLAIN}:soft_sum_to_zero"},
                                       REGRESSION, "auto_normal", 4, steps=100,
                                       train={"steps": 100, "eval_every": 0, "plots": False}))
    assert "site 'sum_to_zero' for two draws at once is not each draw's alone (it mixes the " \
           "draws)" in run.notes[0]
    assert "its 4 particles run at once with torch.func.vmap" in run.notes[1]
    assert summary["diagnostics"]["khat"] is not None


def test_where_vmap_does_not_apply_the_report_runs_the_model_once_per_draw(tmp_path: Path):
    """A model that reads a draw in Python (``intercept.item()``) is run once per draw: on
    1,000 draws for k-hat (with its Monte Carlo error), the plots and posterior.nc, each
    saying so; its answer is its broadcasting twin's."""
    run, summary, out = fit(plain_recipe(tmp_path / "plain", {"name": f"{PLAIN}:guarded"},
                                         REGRESSION, steps=300))
    assert "plain_models.py:" in run.notes[0] and "intercept.item()" in run.notes[0]
    assert "the report runs it once per draw, on 1,000 draws instead of 10,000 " \
           "(torch.func.vmap does not apply: plain_models.py:" in run.notes[1]
    diagnostics = summary["diagnostics"]
    assert diagnostics["khat"] is not None and diagnostics["num_draws"] == 1000
    assert diagnostics["khat_se"] >= 0
    assert diagnostics["sized"] == ("PSIS on 1000 of 10000 draws: the model does not "
                                    "broadcast over draws, so each is one run of it")
    assert "once per draw" in diagnostics["per_draw"]
    assert {f"site-{site}.png" for site in summary["posterior"]} <= {
        path.name for path in (out / "plots").iterdir()}
    assert diagnostics["inference_data"] == "written"
    _, twin, _, _ = TWINS["linear"]
    _, twin_summary, _ = fit(plain_recipe(tmp_path / "twin", twin, REGRESSION, steps=300))
    theirs = means(twin_summary)
    for site, (mean, _) in means(summary).items():
        assert ((mean - theirs[site][0]).abs() <= 0.25 * theirs[site][1]).all(), site


def test_models_that_broadcast_keep_the_vectorised_path():
    """The check is a few runs of the model; a model that broadcasts is evaluated as before."""
    import time

    import torch

    from tests import plain_models
    from vibench_plugins.models import BetaBernoulli, LinearRegression
    from workbench.report import broadcast

    data = {key: torch.tensor(value, dtype=torch.float32)
            for key, value in plain_models.hierarchical_data(rows=2000).items()}
    regression = {"x": torch.randn(200, 3), "y": torch.randn(200)}
    for model, values in [(BetaBernoulli(), {"flips": FLIPS_TENSOR()}),
                          (LinearRegression(noise=0.5), regression),
                          (plain_models.hierarchical_broadcasting, data)]:
        began = time.perf_counter()
        state = torch.random.get_rng_state()
        way = broadcast.check(model, values, 1)
        assert way.broadcasts and way.why == "" and way.draws(10_000) == 10_000
        assert torch.equal(torch.random.get_rng_state(), state)  # the run's streams untouched
        assert time.perf_counter() - began < 1.0
    way = broadcast.check(plain_models.hierarchical, data, 1)
    assert way.method == broadcast.VMAP and way.draws(10_000) == 10_000


def test_a_bernoulli_under_vmap_weighs_draws_as_each_run_alone():
    """The report's vmapped draws of a logistic model give each draw's log densities, its
    pointwise ones among them, as the model run once a draw does, to float64's rounding
    (vmap's Bernoulli takes a faster route to the same numbers)."""
    import pyro
    import torch

    from tests import plain_models

    data = {key: torch.tensor(value, dtype=torch.float64)
            for key, value in plain_models.hierarchical_data(rows=300).items()}
    model = plain_models.hierarchical
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        at_once, alone = _weighed_both_ways(model, data)
    finally:
        torch.set_default_dtype(default)
        pyro.clear_param_store()
    for name, entry in alone.items():
        for key in ("log_prob", "pointwise"):
            if key in entry:
                assert torch.allclose(at_once[name][key], entry[key], rtol=1e-12,
                                      atol=1e-10), (name, key)


def _weighed_both_ways(model, data):
    """50 guide draws of ``model``, evaluated vmapped and one run a draw."""
    import pyro
    import torch
    from pyro.infer.autoguide import AutoNormal

    from workbench.report import broadcast

    with torch.random.fork_rng():
        torch.manual_seed(0)
        guide = AutoNormal(model, init_scale=1.0)
        guide(**data)
        with torch.no_grad(), pyro.plate("draws", 50, dim=-2):
            source = pyro.poutine.trace(guide).get_trace(**data)
        single = pyro.poutine.trace(model).get_trace(**data)
        draws = {name: broadcast._draws_of(source.nodes[name]["value"], 50, shape)
                 for name, shape in broadcast._replayable(single).items()}
        with torch.no_grad():
            return (broadcast._vmapped(model, data, draws, source, predictive=True),
                    broadcast._looped(model, data, draws, source, 50, predictive=True))


def FLIPS_TENSOR():
    import torch

    return torch.tensor(FLIPS, dtype=torch.float32)


def test_a_model_that_cannot_work_is_named_with_its_line(tmp_path: Path):
    """A model that fails for one draw is a one-line error naming the model and the line of
    its file that failed."""
    write(tmp_path / "broken.py", NOT_BROADCASTING)
    recipe = recipe_file(tmp_path, model={"name": "broken.py:model"},
                         data={"x": [[1.0, 2.0, 3.0] for _ in range(4)],
                               "y": [1.0, 2.0, 3.0, 4.0]})
    result = vibench("run", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = [said for said in result.stderr.splitlines() if not said.startswith("note: ")]
    assert line.startswith(  # then torch's own words: "size mismatch, got input (4), ..."
        f"error: model '{tmp_path.resolve() / 'broken.py'}:model': broken.py:8 "
        "`pyro.sample(\"y\", dist.Normal(x @ beta, 1.0), obs=y)`: "), line


def test_a_loss_that_needs_particles_at_once_names_the_model_and_its_line(tmp_path: Path):
    from workbench.errors import UsageError

    path = plain_recipe(tmp_path, {"name": f"{PLAIN}:linear"}, REGRESSION,
                        loss={"name": "tail_adaptive_elbo", "num_particles": 4})
    with pytest.raises(UsageError) as caught:
        setup(source=path)
    message = str(caught.value)
    assert message.startswith("loss 'tail_adaptive_elbo' needs particles evaluated at once, "
                              f"and model '{PLAIN}:linear' does not broadcast"), message
    assert "plain_models.py:" in message and "`pyro.sample(\"obs\"" in message


def test_the_automatic_pipeline_fits_a_plain_model(tmp_path: Path):
    """A plain regression through the pipeline (full-rank Gaussians, started at the Laplace
    approximation, the step size searched): every fit an answer, a k-hat over draws
    evaluated by vmap, and posterior.nc. The stages are cut short for time; the slow test
    below runs them all on the newcomer's hierarchical model."""
    check_pipeline(tmp_path, "[start, {name: gaussian, runs: 2, max_steps: 50}, rhat, psis]",
                   f"{PLAIN}:linear", REGRESSION, "train.plots=false")  # the twins' test draws them


@pytest.mark.slow
def test_the_whole_automatic_pipeline_fits_a_plain_hierarchical_model(tmp_path: Path):
    from tests import plain_models

    check_pipeline(tmp_path, None, f"{PLAIN}:hierarchical",
                   plain_models.hierarchical_data(rows=400))


def check_pipeline(tmp_path: Path, stages: str | None, model: str, data: dict,
                   *sets: str) -> None:
    write(tmp_path / "recipe.yaml", yaml.safe_dump({"model": {"name": model}, "data": data}))
    out = tmp_path / "run"
    result = vibench("run", str(tmp_path / "recipe.yaml"), "--out", str(out),
                     *(["--set", f"auto.stages={stages}"] if stages else []),
                     *(arg for item in sets for arg in ("--set", item)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["diagnostics"]["khat"] is not None
    fits = sorted((out / "fits").iterdir())
    assert fits
    for fitted in fits:
        inner = json.loads((fitted / "summary.json").read_text())
        assert inner["status"] == "completed", inner.get("error")
        assert inner["diagnostics"]["khat"] is not None, inner["diagnostics"]
        assert "vmap" in inner["diagnostics"]["per_draw"]
        assert (fitted / "posterior.nc").exists()
