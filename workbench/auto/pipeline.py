"""The automatic pipeline: a recipe that names a model and its data but no guide (or
``guide: {name: auto}``) runs the stages its ``auto: {stages: [...]}`` section lists (by
default start, gaussian, rhat, psis, hmc, flow; ``plugins/stages.py``). Each stage fits through
``Pipeline.fit``, which is an ordinary vibench run (``Run.setup``, ``Run.train``) in the run
directory's ``fits/<label>``; the pipeline then reports one set of estimates, pooled over the
fits that agree or taken from the best, importance-weighted where k-hat allows, with the
reasons not to trust them (``flags``). summary.json's ``auto`` section says which stages ran
and why; ``posterior.nc`` holds draws of that answer and ``plots/`` its densities and
posterior predictive check (``workbench/auto/answer.py``), so the pipeline's directory reads as
a run's.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from workbench.auto import answer
from workbench.errors import Interrupted, RunError, UsageError, VibenchError, one_line
from workbench.plugins.registry import Registry
from workbench.report import thresholds
from workbench.rundir import files, layout

# What ``vibench list guide`` says of ``guide: auto``.
DESCRIPTION = ("The automatic pipeline: Gaussian fits from good starts, checked against each "
               "other (R-hat) and by importance sampling (k-hat), a normalizing flow where they "
               "fall short, importance-weighted (PSIS) estimates, and HMC started from the "
               "best fit where no fit can be trusted; a recipe with it names no loss or "
               "optimizer.")


def catalogue_entry() -> dict:
    """``guide: auto`` as ``vibench list`` shows it among the guides. No plugin registers it
    and nothing builds it (the recipe runs this pipeline instead of a guide), so it has no
    plugin and no options: ``built_in``, with the stages it runs when the recipe's
    ``auto.stages`` lists none."""
    from workbench.config.recipe import AUTO, DEFAULT_STAGES

    return {"name": AUTO, "plugin": None, "built_in": True, "description": DESCRIPTION,
            "options": {}, "stages": list(DEFAULT_STAGES)}


@dataclass
class Fit:
    """One run of the pipeline: its summary (None if it failed) and its fitted Gaussian
    where the guide has one: (loc, scale_tril) in the unconstrained space, or (loc, sds) for
    a mean-field guide or one beyond ``FULL_UP_TO`` dimensions (workbench/report/gaussians.py)."""

    label: str
    path: Path
    summary: dict | None
    gaussian: tuple | None = None
    lr: float | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.summary is not None

    @property
    def khat(self) -> float | None:
        return ((self.summary or {}).get("diagnostics") or {}).get("khat")

    @property
    def elbo(self) -> float:
        value = ((self.summary or {}).get("diagnostics") or {}).get("elbo")
        return float("-inf") if value is None else value

    def ending(self) -> str:
        """How the fit ended, in a few words."""
        if not self.ok:
            return f"{self.label} failed"
        at = (self.summary.get("converged") or {}).get("at_step")
        steps = self.summary["steps"]
        return (f"{self.label} converged at step {at}" if at else
                f"{self.label} stopped at its {steps} steps, not converged")

    def estimates(self, weighted: float | None) -> tuple[dict, bool]:
        """Per site mean and sd: the importance-weighted ones where ``weighted`` is set and
        the k-hat is below it, else the guide's own; and whether they are weighted."""
        use = weighted is not None and self.khat is not None and self.khat < weighted
        post = {}
        for site, entry in self.summary["posterior"].items():
            pick = use and "iw_mean" in entry
            post[site] = {"mean": entry["iw_mean" if pick else "mean"],
                          "std": entry["iw_std" if pick else "std"]}
        return post, use


def _stderr(line: str) -> None:
    """What the pipeline is starting, on stderr as it starts (a stage or a fit), where no
    ``say`` is given (``service.run_recipe`` passes its own)."""
    print(line, file=sys.stderr, flush=True)


@dataclass
class Pipeline:
    """What the stages share: the recipe, the fits so far and what the report needs."""

    recipe: dict
    registry: Registry
    run_dir: Path
    on_step: Callable[[int, float], None] | None = None
    on_fit: Callable[[str, int], None] | None = None  # a fit starts: its label, its steps
    say: Callable[[str], None] = _stderr  # each line for the user, as it happens
    guide: dict = field(default_factory=dict)  # options every Gaussian fit's guide gets
    fits: list[Fit] = field(default_factory=list)
    candidates: list[Fit] = field(default_factory=list)  # where the estimates come from
    weighted: float | None = None  # report PSIS estimates of fits with k-hat below this
    rhat: dict | None = None
    modes: Any = None  # what the gaussian stage's mode searches found (plugins/modes.py)
    mixture: Any = None  # the fits' weighed mixture where it is the answer (the rhat stage)
    proposals: Any = None  # heavier-tailed proposals weighed, kept (answer.proposals)
    sampled: Any = None  # the hmc stage's chains where they are the answer (plugins/stages.py)
    model: dict | None = None  # the fits' model section where a stage changed it, else the recipe's
    flags: list[str] = field(default_factory=list)
    last_run: Any = None
    resumed: bool = False  # going on after a stop (--resume): a fit finished before is kept
    _dimension: int | None = None
    _enumerated: tuple[list[str], int] | None = None  # the sites a loss sums out, the nesting
    _noted: set[str] = field(default_factory=set)  # the fits' notes said so far

    @property
    def dimension(self) -> int:
        """The number of unconstrained latent dimensions of the model."""
        return self._traced()[0]

    def _traced(self) -> tuple[int, tuple[list[str], int] | None]:
        """``latent_dimension``'s answer, found once."""
        if self._dimension is None:
            self._dimension, self._enumerated = latent_dimension(self.recipe, self.registry)
        return self._dimension, self._enumerated

    def summing_out(self, loss: dict) -> dict:
        """The loss a fit trains on: the stage's, or, for a model that marks discrete sites
        for enumeration (which the guides hide), enum_elbo with as many particles, summing
        them out at the model's plate nesting."""
        enumerated = self._traced()[1]
        if enumerated is None:
            return loss
        names, nesting = enumerated
        if "enumerated" not in self._noted:
            self._noted.add("enumerated")
            self.say(f"auto: note: the model sums out {', '.join(map(repr, names))} by "
                     "enumeration: its fits use loss enum_elbo")
        return {"name": "enum_elbo", "num_particles": loss.get("num_particles", 1),
                "max_plate_nesting": nesting}

    def _fit_recipe(self, label: str, guide: dict, loss: dict, optimizer: dict, train: dict,
                    seed_offset: int) -> dict:
        """The recipe of fit ``label``: the pipeline's model, data and loggers with these
        sections, checked whole."""
        from workbench.config import recipe as recipes

        base = {key: self.recipe[key] for key in ("seed", "device", "dtype", "data", "model",
                                                  "loggers")}
        if self.model is not None:  # the same posterior, reparameterised (plugins/reparam.py)
            base["model"] = self.model
        sub = {**base, "name": f"{self.recipe['name']}-{label}",
               "seed": self.recipe["seed"] + seed_offset, "guide": guide, "loss": loss,
               "optimizer": optimizer,
               # no plots and no replicated data: the pipeline draws its answer's
               # (answer.write_plots, answer.write), and a fit's cost a second or more each
               "train": {**self.recipe["train"], "plots": False, "predictive": False,
                         **train}}
        return recipes.resolve(sub, self.registry, str(self.run_dir / layout.RECIPE))

    def _say_notes(self, label: str, notes: list[str]) -> None:
        """A fit's notes (the Laplace start's fallbacks, say), each once per pipeline."""
        for note in notes:
            if note not in self._noted:
                self._noted.add(note)
                self.say(f"auto: {label}: note: {note}")

    def fit(self, label: str, guide: dict, loss: dict, optimizer: dict, train: dict,
            seed_offset: int = 0, start: Callable[[Any, dict], None] | None = None,
            compile_for: int | None = None) -> Fit:
        """One vibench run with these sections in ``fits/<label>``; a run that fails to set up
        or to train is a Fit with the error (an interruption stops the pipeline, and a recipe
        the checks refuse is the user's error). ``start(guide, data)`` sets the guide's
        start after set-up, the model's data at hand. ``compile_for``: the steps of every fit
        that shares this one's step, which decide (with train.compile) whether to compile it
        (a few hundred eager steps each: compiled only where a package of it is cached, and
        packaged for later runs in the background where that would pay)."""
        from workbench.device import run_context
        from workbench.report.gaussians import fitted_gaussian
        from workbench.rundir.claim import claim
        from workbench.train import stepsize

        loss = self.summing_out(loss)
        self.say(f"auto: fit {label}: {guide['name']}, {loss['name']} ...")
        path = self.run_dir / answer.FITS / label
        resolved = self._fit_recipe(label, guide, loss, optimizer, train, seed_offset)
        kept = self._finished(label, path, resolved, start) if self.resumed else None
        if kept is not None:
            self.fits.append(kept)
            return kept
        held = claim(resolved["name"], path)
        try:
            searching = stepsize.wanted(resolved)
            run = self._set_up(resolved, start, compile=not searching,
                               compile_for=compile_for)
            if searching:
                stepsize.adapt(run)
        except VibenchError as exc:  # the recipe was checked: this fit, not the recipe, failed
            held.abandon()
            found = Fit(label, path, None, error=one_line(exc))
            self.fits.append(found)
            return found
        except BaseException:
            held.release()
            raise
        self.last_run = run
        self._say_notes(label, run.notes)
        if self.on_fit is not None:
            self.on_fit(label, run.recipe["train"]["steps"])
        try:
            summary = run.train(held.path, self.on_step)
        except Interrupted:
            raise
        except VibenchError as exc:
            found = Fit(label, path, None, error=one_line(exc))
            self.fits.append(found)
            return found
        finally:
            held.release()
        if not summary.get("posterior"):  # trained, but its report could not read the guide
            reason = (summary.get("diagnostics") or {}).get("reason", "no posterior")
            found = Fit(label, path, None, error=f"no estimates: {reason}")
            self.fits.append(found)
            return found
        with run_context(run.device, run.dtype):  # beyond FULL_UP_TO dimensions its marginals
            gaussian = fitted_gaussian(run.guide, diagonal=True)
        found = Fit(label, path, summary, gaussian, run.recipe["optimizer"].get("lr"))
        self.fits.append(found)
        return found

    def _set_up(self, resolved: dict, start: Callable | None, compile: bool,
                compile_for: int | None = None) -> Any:
        """A fit set up (with a placeholder step size where one is to be searched) and put at
        its ``start``, before any step-size search (the search tries from the start) and
        before its step is compiled, where it is."""
        from workbench.device import run_context
        from workbench.train import stepsize
        from workbench.train.runner import Run

        run = Run.setup(stepsize.placeholder(resolved) if stepsize.wanted(resolved)
                        else resolved, self.registry, compile=False, compile_for=compile_for)
        if start is not None:
            with run_context(run.device, run.dtype):
                start(run.guide, run.data)
        if compile:
            run.compile_step()
        return run

    def _finished(self, label: str, path: Path, resolved: dict,
                  start: Callable | None = None) -> Fit | None:
        """The fit ``label`` as it finished before the pipeline was stopped, if it did, with
        this recipe; else None, its unfinished folder removed, to fit it again. ``start`` is
        run again on a fresh set-up of the fit, so that what it records for the later fits
        (the first fit's start, which theirs are drawn around) is there as it was."""
        from workbench.device import run_context
        from workbench.report.gaussians import fitted_gaussian

        summary = _completed(path, resolved)
        if summary is None:
            if path.is_dir() and not path.is_symlink() and not path.parent.is_symlink():
                shutil.rmtree(path)  # a link is never followed: claiming it is refused
            return None
        self.say(f"auto: fit {label}: finished before the stop, kept")
        if start is not None:
            self._set_up(resolved, start, compile=False)
        if not summary.get("posterior"):
            reason = (summary.get("diagnostics") or {}).get("reason", "no posterior")
            return Fit(label, path, None, error=f"no estimates: {reason}")
        run = self.last_run = self.load(path)
        with run_context(run.device, run.dtype):
            gaussian = fitted_gaussian(run.guide, diagonal=True)
        return Fit(label, path, summary, gaussian, run.recipe["optimizer"].get("lr"))

    def load(self, path: Path) -> Any:
        """A fit of this pipeline rebuilt from its run directory's checkpoint, for drawing."""
        return load_fit(path, self.registry)

    @staticmethod
    def best(fits: list[Fit]) -> Fit:
        """The fit with the highest ELBO (the same draws' estimate as its k-hat's)."""
        return max(fits, key=lambda fit: fit.elbo)


def _completed(path: Path, resolved: dict) -> dict | None:
    """The summary of a fit that completed in ``path`` with the recipe ``resolved`` (its
    step size aside, which a search may have chosen), or None."""
    from workbench.rundir import summary as schema
    from workbench.rundir.jsonsafe import plain

    if not (path / layout.SUMMARY).is_file() or not (path / layout.CHECKPOINT).is_file():
        return None
    try:
        summary = json.loads(files.read_bounded(path / layout.SUMMARY))
    except (OSError, ValueError, RecursionError):
        return None
    if schema.check(summary) or summary.get("status") != "completed":
        return None

    def settled(recipe: dict) -> dict:
        return {**recipe, "optimizer": {k: v for k, v in recipe["optimizer"].items()
                                        if k != "lr"}}

    return summary if plain(settled(summary["recipe"])) == plain(settled(resolved)) else None


def latent_dimension(recipe: dict, registry: Registry
                     ) -> tuple[int, tuple[list[str], int] | None]:
    """The number of unconstrained numbers a guide over the model's latent sites holds; and
    the discrete sites the model marks for enumeration with its plate nesting, or None."""
    import torch
    from pyro import poutine
    from pyro.infer.autoguide.initialization import InitMessenger
    from pyro.poutine.util import site_is_subsample
    from torch.distributions import biject_to

    from workbench.device import DTYPES, pick_device, run_context
    from workbench.plugins.build import build
    from workbench.report.marginal import enumerated_sites, init_to_feasible, sequential_sites
    from workbench.report.posterior import plate_nesting
    from workbench.train.tensors import load_data

    device = pick_device(recipe["device"])
    with run_context(device, DTYPES[recipe["dtype"]]), torch.no_grad():
        model = build(registry, "model", recipe["model"], device=device)
        data, _ = load_data(registry, recipe["data"], model, recipe["model"]["name"], device)
        try:  # at feasible values, not prior draws: an improper prior's draw may be no number
            with InitMessenger(init_to_feasible):
                trace = poutine.trace(model).get_trace(**data)
        except Exception as exc:
            raise UsageError(f"model {recipe['model']['name']!r}: {one_line(exc)}") from exc
        summed = enumerated_sites(trace)
        sequential = sequential_sites(trace)
        if sequential:
            raise UsageError(
                f"model {recipe['model']['name']!r} enumerates "
                f"{', '.join(map(repr, sequential))} sequentially, which enum_elbo cannot sum "
                "out in a model: mark it infer={'enumerate': 'parallel'}")
        total = 0
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site["is_observed"] \
                    and not site_is_subsample(site) and site["name"] not in summed:
                total += biject_to(site["fn"].support).inv(site["value"]).numel()
    return total, ((summed, plate_nesting(trace)) if summed else None)


def execute(pipeline: Pipeline) -> dict:
    """Run the stages, then assemble, write and return the summary."""
    from workbench.plugins.build import build

    records, began = [], time.perf_counter()
    for section in pipeline.recipe["auto"]["stages"]:
        stage = build(pipeline.registry, "stage", section)
        pipeline.say(f"auto: stage {section['name']} ...")
        started = time.perf_counter()
        try:
            said = stage.run(pipeline)
        except (Interrupted, UsageError):
            raise
        except Exception as exc:
            raise RunError(f"stage {section['name']!r} failed: {one_line(exc)}") from exc
        records.append({"stage": section["name"], "said": said,
                        "seconds": time.perf_counter() - started})
    wall = time.perf_counter() - began
    for record in records:  # where the time went: each stage's share of the stages' wall time
        record["share"] = record["seconds"] / wall if wall > 0 else 0.0
    summary = assemble(pipeline, records, wall)
    summary["diagnostics"]["inference_data"] = answer_files(pipeline, summary)
    from workbench.train.runner import write_results

    write_results(pipeline.run_dir, summary, params=False)
    return summary


def answer_files(pipeline: Pipeline, summary: dict) -> str:
    """The answer's posterior.nc and (unless ``train.plots`` is off) plots in the pipeline's
    directory; what became of posterior.nc, for summary.json's ``diagnostics.inference_data``
    (as a run's). A failure here costs the pipeline nothing but these files; a stop signal
    meanwhile (the fits are done) lets posterior.nc finish, skips the plots, and the summary
    is written (a third signal stops at once)."""
    from workbench import signals

    with signals.deferred() as stop:
        try:
            path, drawn = answer.write(pipeline.run_dir, summary, pipeline.load)
        except Interrupted:
            raise
        except Exception as exc:
            warnings.warn(f"vibench could not write {layout.POSTERIOR}: {one_line(exc)}",
                          stacklevel=1)
            return f"failed: {one_line(exc)}"
        if pipeline.recipe["train"].get("plots", True) and not stop:
            try:
                answer.write_plots(pipeline.run_dir, summary, drawn, pipeline.load, path)
            except OSError:
                raise
            except Exception as exc:
                warnings.warn(f"vibench could not draw the plots: {one_line(exc)}",
                              stacklevel=1)
    return "written"


def assemble(pipeline: Pipeline, records: list[dict], wall: float) -> dict:
    """summary.json of the pipeline: the fits' estimates (pooled when R-hat says they agree,
    their weighed mixture where they sit at several modes and it has a trusted k-hat, else
    the highest-ELBO fit's), scored against the reference where the model has one, with
    its flags and its cautions (an sd these draws do not pin down, ``iw_error.verdict``)."""
    from workbench.report import reference
    from workbench.rundir.summary import PipelineSummary

    fits = [fit for fit in pipeline.candidates if fit.ok]
    if not fits:
        errors = "; ".join(f"{fit.label}: {fit.error}" for fit in pipeline.fits) or "none ran"
        kept = pipeline.run_dir / layout.FITS  # a fit that failed to set up left no folder
        raise RunError(f"the automatic pipeline fitted nothing ({errors})"
                       + (f"; see {kept}" if kept.exists() else ""))
    found, cautions = ((_sampled(pipeline), []) if pipeline.sampled is not None
                       else variational_answer(pipeline))
    used, post, weighted, estimates, diagnostics, flags = found
    best = pipeline.best(used)
    for site, entry in best.summary["posterior"].items():  # the exact answer
        if site in post:
            post[site].update({k: entry[k] for k in ("exact_mean", "exact_std") if k in entry})
    compared = {}
    if pipeline.last_run is not None:
        from workbench.device import run_context

        run = pipeline.last_run
        with run_context(run.device, run.dtype):
            compared = reference.section(run.model, run.data, post)
    steps = sum(fit.summary["steps"] for fit in pipeline.fits if fit.ok)
    return PipelineSummary(
        recipe=pipeline.recipe, steps=steps, wall_seconds=wall,
        steps_per_second=steps / wall if wall > 0 else 0.0,
        final_loss=best.summary["final_loss"], posterior=post, diagnostics=diagnostics,
        reference=compared.get("reference"), params=best.summary["params"],
        status="completed", device=best.summary["device"], dtype=best.summary["dtype"],
        versions=best.summary["versions"], data_hash=best.summary["data_hash"], world_size=1,
        auto={"stages": records, "fits": [_fit_record(fit) for fit in pipeline.fits],
              "estimates": estimates, "answer": (answer.TAILS if "proposal" in diagnostics
                                                 else _kind(pipeline, used)),
              "used": [fit.label for fit in used], "weighted": weighted,
              "rhat": pipeline.rhat and {k: v for k, v in pipeline.rhat.items()
                                         if k != "params"},
              "flags": flags, "cautions": cautions, "trusted": not flags},
    ).to_json()


def variational_answer(pipeline: Pipeline) -> tuple[tuple, list[str]]:
    """The answer from the fits (the hmc stage's draws aside): the fits' own (``_answer``),
    their weighed mixture's (``_mixed``) or a heavier-tailed proposal's
    (``answer.heavier_tails``), its flags with those of the sds it does not pin down
    (``iw_error.verdict``); and its cautions. The hmc stage asks it whether to sample."""
    from workbench.report import iw_error

    fits = [fit for fit in pipeline.candidates if fit.ok]
    found = answer.heavier_tails(pipeline, _mixed(pipeline, fits) if pipeline.mixture
                                 is not None else _answer(pipeline, fits))
    used, post, weighted, estimates, diagnostics, flags = found
    noisy, cautions = iw_error.verdict(post, diagnostics.get("khat"))  # the sds' own error
    return (used, post, weighted, estimates, diagnostics, [*flags, *noisy]), cautions


def _answer(pipeline: Pipeline, fits: list[Fit]) -> tuple:
    """The answer from the fits alone: pooled where they agree, else the highest-ELBO
    fit's; each fit's importance-weighted estimates where the psis stage allows. As
    ``_mixed``: the fits used, the estimates, the fits weighted, the estimates' line, the
    diagnostics and the flags."""
    from workbench.report import iw_error  # torch: not at import, for `vibench list`

    agree = (len(fits) > 1 and pipeline.rhat is not None
             and pipeline.rhat["max"] <= pipeline.rhat["threshold"])
    used = fits if agree else [pipeline.best(fits)]
    parts = [fit.estimates(pipeline.weighted) for fit in used]
    post = pool([estimates for estimates, _ in parts])
    weighted = [fit.label for fit, (_, w) in zip(used, parts) if w]
    khats = [fit.khat for fit in used]
    source = ("importance-weighted (PSIS)" if len(weighted) == len(used) else
              "the guide's own" if not weighted else "mixed (importance-weighted where "
              "k-hat allows)")
    how = f"pooled over {len(used)} fits" if len(used) > 1 else f"from {used[0].label}"
    post = iw_error.pooled([fit.summary["posterior"] for fit, (_, w) in zip(used, parts) if w],
                           len(used), post)  # with the Monte Carlo error of what is weighted
    return (used, post, weighted, f"{source} estimates, {how}",
            _worst_diagnostics(used, khats, pipeline.best(used)), _flags(pipeline, used, khats))


def _mixed(pipeline: Pipeline, fits: list[Fit]) -> tuple:
    """The answer where it is the fits' weighed mixture (the rhat stage's
    ``pipeline.mixture``): its moments and quantiles per latent and deterministic site, its
    k-hat and ESS as the diagnostics, each fit's k-hat beside them; the flags are the
    stages' (the fits' own k-hats judge their guides, not the mixture)."""
    mixture = pipeline.mixture
    post = {site: dict(entry) for site, entry in mixture.entries.items()}
    labels = [fit.label for fit in fits]
    diagnostics = {**mixture.diagnostics(), "khats": {fit.label: fit.khat for fit in fits}}
    estimates = (f"importance-weighted (PSIS) estimates of the weighed mixture of "
                 f"{len(fits)} fits ({', '.join(labels)}), which sit at several modes")
    return fits, post, labels, estimates, diagnostics, list(pipeline.flags)


def _sampled(pipeline: Pipeline) -> tuple:
    """The answer where it is the hmc stage's chains: their moments and quantiles per site
    of the model as written, the sampler's record as the diagnostics (there is no k-hat:
    nothing is weighed), its flag where the chains are not trusted. The stages' flags speak
    of the variational fits, which the answer no longer comes from."""
    sampled = pipeline.sampled
    start = next(fit for fit in pipeline.fits if fit.label == sampled.label)
    post = answer.chains_summary(pipeline.run_dir, sampled.label, pipeline.load)
    record = sampled.record()
    diagnostics = {"khat": None, "reason": "the answer is HMC draws, not importance-sampled "
                   "(diagnostics.sampler)", "sampler": record}
    estimates = (f"HMC draws: {record['chains']} chains x {record['draws']} after "
                 f"{record['warmup']} warm-up, started from {sampled.label}'s Gaussian")
    flags = [f"HMC: {sampled.distrusted}"] if sampled.distrusted else []
    return [start], post, [], estimates, diagnostics, flags


def _kind(pipeline: Pipeline, used: list[Fit]) -> str:
    """summary.json's ``auto.answer``: what the answer is, for its readers
    (workbench/auto/answer.py): ``answer.CHAINS`` (the hmc stage's draws), ``answer.MIXTURE``
    (the fits' weighed mixture, resampled as one), ``pooled`` (the fits' equal mixture) or
    ``best`` (one fit)."""
    if pipeline.sampled is not None:
        return answer.CHAINS
    if pipeline.mixture is not None:
        return answer.MIXTURE
    return "pooled" if len(used) > 1 else "best"


def _flags(pipeline: Pipeline, used: list, khats: list) -> list[str]:
    """Every reason not to trust the pipeline's answer: the stages', then its fits' k-hats."""
    flags = list(pipeline.flags)
    unchecked = [fit.label for fit, k in zip(used, khats) if k is None]
    if unchecked:
        flags.append(f"no k-hat for {', '.join(unchecked)} (see its summary.json): its "
                     "estimates could not be checked by importance sampling")
    worst = max((k for k in khats if k is not None), default=None)
    if worst is not None and not thresholds.khat_trusted(worst):
        ess = min(((fit.summary.get("diagnostics") or {}).get("ess_fraction") or 0.0)
                  for fit, k in zip(used, khats) if k is not None)
        note = thresholds.tails_note(ess)
        flags.append(f"k-hat {worst:.2f} > {thresholds.KHAT_TRUSTED}: " + (
            f"do not trust{note}" if note else "the fit is not a good importance sampler of "
            "the posterior; do not trust its estimates"))
    return flags


def _worst_diagnostics(used: list, khats: list, best: Any) -> dict:
    """The worst fit's diagnostics (its k-hat with its own reading, ESS and evidence, so the
    report's line about it holds together), and every used fit's k-hat beside it."""
    worst = max((k for k in khats if k is not None), default=None)
    worst_fit = next((fit for fit, k in zip(used, khats) if k is not None and k == worst), best)
    diagnostics = {**(worst_fit.summary.get("diagnostics") or {}),
                   "khats": dict(zip([fit.label for fit in used], khats))}
    diagnostics.pop("sites", None)
    return diagnostics


def _fit_record(fit: Any) -> dict:
    """One fit as summary.json's ``auto.fits`` lists it."""
    return {"label": fit.label, "path": str(fit.path), "ok": fit.ok,
            "steps": fit.summary["steps"] if fit.ok else None, "lr": fit.lr,
            "converged_at": ((fit.summary or {}).get("converged") or {}).get("at_step"),
            "khat": fit.khat, "elbo": fit.elbo if fit.ok else None,
            "ending": fit.ending(), **({"error": fit.error} if fit.error else {})}


def pool(estimates: list[dict]) -> dict:
    """The moments of an equal mixture of the fits' estimates, per site."""
    import torch

    if len(estimates) == 1:
        return estimates[0]
    pooled = {}
    for site in estimates[0]:
        means = torch.tensor([e[site]["mean"] for e in estimates], dtype=torch.float64)
        sds = torch.tensor([e[site]["std"] for e in estimates], dtype=torch.float64)
        mean = means.mean(0)
        variance = (sds.pow(2) + means.pow(2)).mean(0) - mean.pow(2)
        pooled[site] = {"mean": mean.tolist(), "std": variance.clamp(min=0).sqrt().tolist()}
    return pooled


def lines(summary: dict) -> list[str]:
    """The pipeline's part of the terminal report: each stage and what it said, the
    estimates' source, the flags and the cautions."""
    section = summary.get("auto")
    if not section:
        return []
    found = [f"auto: {record['stage']}: {record['said']}" + _time(record)
             for record in section["stages"]]
    found.append(f"auto: {section['estimates']}")
    found += [f"auto: FLAG: {flag}" for flag in section["flags"]]
    if not section["flags"]:
        found.append("auto: no flags (k-hat within bounds; the fits' disagreement is answered "
                     "by their weighed mixture)" if section.get("answer") == answer.MIXTURE
                     else "auto: no flags (the HMC chains' R-hat, ESS and divergences within "
                     "bounds)" if section.get("answer") == answer.CHAINS
                     else "auto: no flags (R-hat and k-hat within bounds)")
    return found + [f"auto: CAUTION: {caution}" for caution in section.get("cautions", [])]


def _time(record: dict) -> str:
    """A stage's wall time and share, as the report gives them after its line."""
    if "seconds" not in record:
        return ""
    share = f", {record['share']:.0%}" if "share" in record else ""
    return f" ({record['seconds']:.1f} s{share})"


class AutoJob:
    """The pipeline set up and holding its run directory, as ``service.Job`` is for one run;
    ``run`` offers what the CLI reads before training (notes, the step count)."""

    def __init__(self, pipeline: Pipeline, run_dir: Any):
        self.pipeline = pipeline
        self.run_dir = run_dir
        stages = ", ".join(s["name"] for s in pipeline.recipe["auto"]["stages"])
        self.run = SimpleNamespace(recipe=pipeline.recipe, notes=[
            f"automatic pipeline: stages {stages}; each fit is a run in "
            f"{run_dir.path / answer.FITS}"])

    @property
    def path(self) -> Path:
        return self.run_dir.path

    def train(self, on_step=None) -> dict:
        from workbench.train.runner import recipe_text

        self.pipeline.on_step = on_step
        try:
            files.write_atomic(self.path / "recipe.yaml",
                               recipe_text(self.pipeline.recipe, []).encode())
            return execute(self.pipeline)
        except (Interrupted, KeyboardInterrupt) as exc:  # a fit's advice goes on with it alone
            from workbench import signals

            signum = (exc.exit_code - 128 if isinstance(exc, Interrupted) else
                      getattr(exc, "signum", None) or signals.first() or 2)
            raise Interrupted(f"interrupted; go on with: vibench run --resume {self.path} "
                              "(the fits that finished are kept)", signum) from None
        finally:
            self.run_dir.release()


def load_fit(path: Path, registry: Registry) -> Any:
    """A pipeline's fit rebuilt from its run directory's checkpoint, for drawing (as the
    pipeline reads its fits back, and a child compiling for a later run: ``service.load``
    does the same for a run read back later, with its checks of code and session objects,
    which a fit a pipeline just ran needs no more)."""
    from workbench.config import recipe as recipes
    from workbench.device import run_context
    from workbench.train import checkpoint
    from workbench.train.runner import Run

    where = f"the pipeline's fit {path}"
    saved = checkpoint.load(path, where)
    resolved = recipes.resolve(recipes.as_yaml(saved["recipe"]), registry,
                               str(path / layout.RECIPE))
    if resolved["guide"].get("init", "init_loc") != "init_loc":
        # its parameters come from the checkpoint: a Laplace or Pathfinder start's search
        # (seconds on a large model) would be overwritten
        resolved["guide"]["init"] = "init_loc"
    run = Run.setup(resolved, registry, compile=False)  # it draws; it never steps
    with run_context(run.device, run.dtype):
        checkpoint.restore_params(saved["params"], saved["buffers"], run.guide, where)
    return run


def start(recipe: dict, registry: Registry, held: Any, resumed: bool = False) -> AutoJob:
    """An automatic pipeline for a checked recipe, its run directory claimed (``held``); a
    stage that cannot be built raises (the caller lets the directory go). ``resumed``: it
    goes on after a stop, keeping the fits that finished before it."""
    from workbench.plugins.build import build

    for section in recipe["auto"]["stages"]:
        build(registry, "stage", section)
    return AutoJob(Pipeline(recipe, registry, held.path, resumed=resumed), held)
