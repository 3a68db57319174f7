"""The report at the end of a run: what the fitted guide says of the posterior, how far to
trust it (PSIS k-hat), posterior.nc and the plots. Each part that fails is left out with its
reason, so the report never costs the run its results; a stop signal skips the parts not yet
begun.

A minibatch run gets no k-hat and no per-site plots: both need the whole data's likelihood
for every draw, which a minibatch run is there to avoid. posterior.nc
(``workbench.report.inference_data``) is drawn on its own random stream; when it fails, the
summary's ``diagnostics.inference_data`` says why. Where the model offers a reference
posterior, ``workbench.report.reference`` scores the guide against it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workbench import signals
from workbench.device import rng_devices
from workbench.errors import one_line
from workbench.report import posterior
from workbench.rundir import layout
from workbench.train.loggers import Loggers

if TYPE_CHECKING:
    from workbench.train.runner import Run


@dataclass
class Estimates:
    """The report's part about the posterior, as far as it got."""

    guide: Any  # the guide the estimates come from (a Laplace guide's posterior_guide)
    posterior: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=lambda: {
        "khat": None, "reason": "not computed for a minibatch run"})
    sources: dict = field(default_factory=dict)  # what the per-site plots draw
    compared: dict = field(default_factory=dict)  # {"reference": ...} where there is one


def write(run: Run, run_dir: Path, log: Loggers, losses: list[float],
          stop: signals.StopRequest) -> dict:
    """The report's part of summary.json (``posterior``, ``diagnostics``, ``reference``,
    ``report_seconds``), with posterior.nc and the plots written in ``run_dir`` and the
    plots' images in TensorBoard; drawn on the run's seed, the same after any resume."""
    began = time.perf_counter()
    with torch.no_grad(), torch.random.fork_rng(devices=rng_devices(run.device)), \
            posterior.whole_data(run.minibatch):
        torch.manual_seed(run.recipe["seed"])
        found = Estimates(run.guide)
        try:
            estimate(run, found, stop)
        except Exception as exc:  # the report must never cost the run its results
            found.diagnostics = {"khat": None, "reason": f"the report failed: {one_line(exc)}"}
        written = None if stop else inference_data(run, run_dir, found)
        if run.recipe["train"]["plots"] and not stop:
            plots(run_dir, log, losses, found.sources, written)
    return {"posterior": found.posterior, "diagnostics": found.diagnostics, **found.compared,
            "report_seconds": time.perf_counter() - began}


def estimate(run: Run, found: Estimates, stop: signals.StopRequest) -> None:
    """Fill ``found`` in: the posterior summary, the PSIS diagnostics (whole-data runs), the
    per-site plots' sources and the reference comparison, each skipped once stopped."""
    from workbench.report import reference

    settings = run.recipe["train"]
    whole = run.minibatch.plate is None
    if hasattr(found.guide, "posterior_guide"):
        with torch.enable_grad():  # a Laplace approximation takes a Hessian
            found.guide = found.guide.posterior_guide(**run.data)
    found.posterior = posterior.summarize(found.guide, run.data, run.sites, run.nesting,
                                          run.exact, model=run.model)
    if not settings["diagnostics"]:
        found.diagnostics = {"khat": None, "reason": "train.diagnostics is off"}
    elif stop:
        found.diagnostics = {"khat": None, "reason": "interrupted"}
    elif whole:
        found.diagnostics = posterior.diagnostics(run.model, found.guide, run.data,
                                                  run.nesting)
        for site, estimates in found.diagnostics.pop("sites", {}).items():
            found.posterior[site].update(estimates)
    if whole and settings["plots"] and not stop:
        found.sources = posterior.plot_sources(run.model, found.guide, run.data, run.sites,
                                               run.nesting, run.exact)
    if not stop:
        found.compared = reference.section(run.model, run.data, found.posterior)


def inference_data(run: Run, run_dir: Path, found: Estimates) -> Path | None:
    """posterior.nc, from the guide the estimates came from; where it fails, the
    diagnostics say why and a warning does."""
    from workbench.report import inference_data as arviz_data

    try:
        written = arviz_data.write(run, run_dir, found.guide)
    except Exception as exc:
        found.diagnostics["inference_data"] = f"failed: {one_line(exc)}"
        warnings.warn(f"vibench could not write {layout.POSTERIOR}: {one_line(exc)}",
                      stacklevel=1)
        return None
    found.diagnostics["inference_data"] = "written"
    return written


def plots(run_dir: Path, log: Loggers, losses: list[float], sources: dict,
          written: Path | None) -> None:
    """The loss, per-site density and posterior predictive plots; a plot that cannot be
    drawn is a warning (a full disk is not: the caller says it cannot write)."""
    from workbench.report import inference_data as arviz_data
    from workbench.report import plots as drawing

    try:
        ppc = arviz_data.ppc_sources(written) if written else {}
        drawing.write_plots(run_dir, losses, sources, writer=log, step=len(losses), ppc=ppc)
    except OSError:
        raise
    except Exception as exc:
        warnings.warn(f"vibench could not draw the plots: {one_line(exc)}", stacklevel=1)
