"""Run SVI for a checked recipe: build its components, train, and write the run directory.

``Run.setup`` does everything that can fail because of the recipe (a data key the model does
not take, a guide that cannot fit the model) before anything is written, in phases: device,
model and data, guide and loss, optimizer. ``Run.train`` then loops over a ``TrainState``,
taking Pyro's SVI step itself (so a bad step is never applied) and calling its callbacks
(logging, averaging, early stopping) after each step; checkpoints hold the state and the
callbacks' state, so a resumed run ends bitwise where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import torch_item, zero_grads

from workbench import distributed, signals
from workbench.compile import compiled_step
from workbench.config.recipe import dump
from workbench.data.minibatch import Minibatch
from workbench.data.sources import Rows
from workbench.device import DTYPES, pick_device, rng_devices, run_context, seed_device
from workbench.distributed import World
from workbench.errors import Interrupted, PeerLost, RunError, UsageError, VibenchError, one_line
from workbench.plugins.build import build
from workbench.plugins.registry import Registry
from workbench.report import broadcast, posterior
from workbench.rundir import files, layout
from workbench.seams import torch_optimizer
from workbench.train import checkpoint
from workbench.train.callbacks import (
    Averaging,
    Callback,
    Converged,
    EarlyStopping,
    MetricLogging,
    log_params,
)
from workbench.train.callbacks import restore as restore_callbacks
from workbench.train.callbacks import states as callback_states
from workbench.train.loggers import Loggers
from workbench.train.optim import make_optimizer, make_optimizers, optimizer_state, schedule_stepper
from workbench.train.tensors import check_support, load_data, shard

StepCallback = Callable[[int, float], None]


@dataclass
class TrainState:
    """The loop's own state; with the callbacks' it is what a checkpoint adds to the
    parameters, optimizers and random generators."""

    step: int = 0
    skipped: int = 0
    wall: float = 0.0
    losses: list[float] = field(default_factory=list)  # kept in losses.f64, not checkpoints
    trained: bool = False  # every step taken (or stopped early): only the report may remain
    reported: bool = False
    stopped_early: int | None = None
    resumes: list[dict] = field(default_factory=list)  # {"step", "changes"} per resume

    def to_checkpoint(self) -> dict:
        return {**asdict(self), "losses": len(self.losses)}


@dataclass
class Run:
    """A recipe's components, built and checked against each other, ready to train."""

    recipe: dict
    device: torch.device
    dtype: torch.dtype
    data: dict
    model: Any
    guide: Any
    svi: SVI
    sites: dict[str, torch.Size]  # the model's latent sites and their shapes
    nesting: int  # how many batch dimensions the model's plates use
    exact: dict | None  # the exact posterior per site, where the model gives it
    data_hash: str = ""
    schedule: Callable[[float], None] | None = None  # steps the learning-rate schedule
    can_evaluate: bool = True  # the loss has a gradient-free estimate for Eval/loss
    notes: list[str] = field(default_factory=list)  # what the user should know before training
    minibatch: Minibatch = field(default_factory=Minibatch)
    registry: Registry | None = None  # builds the loggers, once the run directory is known
    world: World = field(default_factory=World)  # the processes training this run together
    whole_data: dict | None = None  # under torchrun, on rank 0: the whole data, for the report
    peers_stop: bool = False  # under torchrun: some rank was asked to stop at the last step
    rank_rngs: list[dict] = field(default_factory=list)  # every rank's, at the last checkpoint
    compiled: compiled_step.CompiledStep | None = None  # the step, compiled (train.compile)
    threads: int | None = None  # CPU threads the user gave (--threads), kept by --resume

    @classmethod
    def setup(cls, recipe: dict, registry: Registry, compile: bool = True) -> Run:
        """Build the recipe's components and try them once; any misfit is a UsageError. The
        step is compiled as train.compile asks unless ``compile`` is False (``lr: auto``
        compiles after its search, for the optimizer it chose)."""
        logging.getLogger("pyro").setLevel(logging.WARNING)
        world = distributed.world()
        device = pick_device(recipe["device"], world)
        dtype = DTYPES[recipe.get("dtype", "float32")]
        pyro.clear_param_store()
        pyro.set_rng_seed(recipe["seed"])
        names = {kind: recipe[kind]["name"] for kind in ("model", "guide", "loss")}
        notes: list[str] = []
        with run_context(device, dtype):
            model = build(registry, "model", recipe["model"], device=device)
            # under torchrun a rank other than 0 reads only its rows where the data allow;
            # rank 0 reads the whole data, for the report
            rows = Rows(world.rank, world.size) if world.distributed and not world.leader \
                else None
            data, origin = load_data(registry, recipe["data"], model, names["model"], device,
                                     rows)
            trace = trace_model(model, data, names["model"])
            if rows is not None and rows.total is not None and not Minibatch.fits_rows(
                    trace, recipe["train"], world, rows.total):
                rows = None
                data, origin = load_data(registry, recipe["data"], model, names["model"],
                                         device)
                trace = trace_model(model, data, names["model"])
            total = rows.total if rows is not None else None
            check_support(trace, data, origin)
            guide = build(registry, "guide", recipe["guide"], model=model, device=device)
            loss = build(registry, "loss", recipe["loss"], device=device)
            notes.extend(fit_particles(loss, broadcast.verdict(
                model, data, posterior.plate_nesting(trace), trace), names))
            check_step_memory(trace, loss, device)
            optimizer, optim_args = make_optimizer(registry, recipe, device)
            minibatch = Minibatch.of(trace, recipe["train"], device, world, total)
            whole, data = data, rank_data(data, minibatch)
            if world.distributed:
                notes.append(parallel_note(minibatch, world))
            svi = SVI(minibatch(model), minibatch(guide), optimizer, loss=loss)
            minibatch.resample()
            try_once(svi, data, names, model)
            if hasattr(guide, "initialise"):  # its parameters exist now: set their start
                try:
                    notes.extend(guide.initialise(**data) or [])
                except Exception as exc:
                    raise UsageError(f"guide {names['guide']!r}: {one_line(exc)}") from exc
            params = [param for _, param in pyro.get_param_store().named_parameters()]
            for param in params:
                param.grad = None
            optim_args.check(list(pyro.get_param_store().keys()))
            try:
                make_optimizers(svi.optim, params)
            except Exception as exc:
                raise UsageError(
                    f"optimizer {recipe['optimizer']['name']!r}: {one_line(exc)}") from exc
            can_evaluate = recipe["train"]["eval_every"] > 0
            if can_evaluate:
                try:
                    with torch.random.fork_rng(devices=rng_devices(device)):
                        minibatch.resample()
                        svi.evaluate_loss(**data)
                except NotImplementedError:
                    can_evaluate = False
                    notes.append(f"loss {names['loss']!r} has no gradient-free estimate, so "
                                 "Eval/loss is not logged")
            # a rank holding only its rows neither reports nor checks the data on --resume
            exact = exact_posterior(model, whole, names["model"]) if total is None else None
            if world.distributed:
                distributed.broadcast_params()
                pyro.set_rng_seed(distributed.rank_seed(recipe["seed"], world.rank))
        sites = posterior.latent_sites(trace)
        run = cls(recipe, device, dtype, data, model, guide, svi, sites,
                  posterior.plate_nesting(trace), exact, data_hash(whole) if total is None else "",
                  schedule_stepper(optimizer), can_evaluate, notes, minibatch, registry, world,
                  whole if world.distributed and world.leader else None)
        if compile:
            run.compile_step()
        if run.compiled is None or not run.compiled.updates:
            # torch's first optimizer step imports torch._dynamo (a second; several where
            # triton is installed): taken in set-up, with no gradients (it changes nothing),
            # not in the loop; a step that updates in its graph never takes it
            svi.optim([p for _, p in pyro.get_param_store().named_parameters()
                       if p.grad is None])
        return run

    def compile_step(self) -> None:
        """Compile the step as train.compile asks, for the optimizer the run holds now: at the
        end of set-up, and again where ``optimizer.lr: auto`` swaps the optimizer."""
        with run_context(self.device, self.dtype):
            self.compiled, note = compiled_step.prepare(
                self.recipe["train"].get("compile", "auto"), self.svi, self.data, self.device,
                self.recipe["train"]["steps"], self.minibatch.plate is not None, self.world.size)
        if note and note not in self.notes:
            self.notes.append(note)

    def scale_lr(self, factor: float) -> None:
        """Multiply every parameter's step size by ``factor`` (``train.stop: converged``
        lowers it); a compiled step reads the step size afresh each step."""
        for optimizer in getattr(self.svi.optim, "optim_objs", {}).values():
            for group in torch_optimizer(optimizer).param_groups:
                group["lr"] *= factor

    # ----------------------------------------------------------------------------------------
    # training

    def callbacks(self) -> list[Callback]:
        """What runs after each step besides the step itself, in order."""
        settings = self.recipe["train"]
        found: list[Callback] = [MetricLogging(settings, self.svi.optim,
                                              self.evaluate if self.can_evaluate else None)]
        if settings["average_last"]:
            found.append(Averaging(settings["steps"] * (1 - settings["average_last"])))
        if settings["early_stop_patience"]:
            found.append(EarlyStopping(settings["early_stop_patience"],
                                       settings["early_stop_window"],
                                       settings["early_stop_min_delta"]))
        if settings.get("stop") == "converged":
            found.append(Converged(settings["converge_window"], settings["converge_skl"],
                                   settings["converge_lr_factor"], settings["converge_rhat"],
                                   self.guide, self.scale_lr))
        return found

    def train(self, run_dir: Path, on_step: StepCallback | None = None,
              resume: dict | None = None, changes: dict | None = None) -> dict:
        """Train for the recipe's steps, logging to TensorBoard and checkpointing in
        ``run_dir``; returns the summary, which is also written there.

        A stop signal ends the step in progress; a bad step (non-finite loss or gradient) is
        skipped up to ``train.skip_bad_steps`` times, then stops the run; either way the last
        good state is checkpointed and ``resume`` (a checkpoint) goes on from it, with
        ``changes`` (key -> [old, new]) recorded. params.pt and summary.json are written
        before the report, so a report that fails or is killed costs nothing else.
        """
        run_dir = Path(run_dir)
        settings = self.recipe["train"]
        callbacks = self.callbacks()
        state = TrainState()
        with run_context(self.device, self.dtype):
            if resume is not None:
                state = self.restore(resume, callbacks, run_dir, changes)
        losses = LossFile(run_dir / layout.LOSSES, len(state.losses))
        try:
            log = Loggers([])  # only rank 0 writes the run directory
            if self.world.leader:  # the recipe first: a run whose logger fails says what it was
                files.write_atomic(run_dir / layout.RECIPE,
                                   recipe_text(self.recipe, state.resumes).encode())
                log = Loggers.of(self.registry, self.recipe, run_dir, state.step)
            if resume is None:  # a run killed before its first checkpoint can still resume
                self.save(run_dir, state, callbacks, losses)
        except OSError as exc:
            raise RunError(f"cannot write to {run_dir}: {one_line(exc)}") from None
        failure: VibenchError | None = None
        good = True  # whether the run's state is fit to checkpoint
        start = time.perf_counter()
        report: dict = {}
        with run_context(self.device, self.dtype), signals.deferred() as stop:
            try:
                if not state.trained:
                    failure = self.fit(state, callbacks, log, stop, on_step,
                                       lambda: self.save(run_dir, state, callbacks, losses,
                                                         start, log))
            except OSError as exc:
                failure = RunError(f"cannot write to {run_dir}: {one_line(exc)}")
            except PeerLost as exc:  # another rank is gone: no more collectives, no checkpoint
                good = False
                failure = exc
            except Exception as exc:  # the model, guide or optimizer broke: keep the last good
                good = False
                failure = RunError(f"step {state.step + 1} failed: {one_line(exc)}")
            bad = [name for name, value in pyro.get_param_store().items()
                   if not torch.isfinite(value).all()]
            if bad:
                good = False
                detail = f"parameters {', '.join(bad)} are not finite after step {state.step}"
                failure = RunError(f"{failure}; {detail}" if failure else detail)
            finished = state.stopped_early is not None or state.step >= settings["steps"]
            if failure is None and self.stopping(stop) and not finished:
                failure = Interrupted(f"interrupted after step {state.step}", stop.signum)
            if failure is None and not state.trained:
                for callback in callbacks:
                    callback.on_train_end()
                state.trained = True
            wall = state.wall + time.perf_counter() - start
            try:
                if good:
                    self.save(run_dir, state, callbacks, losses, start, log)
                    log_params(log, state.step, self.svi.optim)
                summary = self.summarize(state, callbacks, wall, report, failure)
                if good:  # the last collective is behind us: the report is rank 0's alone
                    distributed.finish(together=True)
                if not self.world.leader:
                    raise _Follower()
                write_results(run_dir, summary, params=good)
                if good and (state.losses or settings["steps"] == 0) and not stop.hurry:
                    self.use_whole_data()
                    report = self.report(run_dir, log, state.losses, stop)
                    if failure is None and stop:
                        failure = Interrupted(f"interrupted while writing the report after "
                                              f"step {state.step}", stop.signum)
                    elif failure is None:
                        state.reported = True
                        self.save(run_dir, state, callbacks, losses, start, log, gather=False)
                    summary = self.summarize(state, callbacks, wall, report, failure)
                    write_results(run_dir, summary, params=False)
                log.close(summary)
            except OSError as exc:
                failure = RunError(f"cannot write to {run_dir}: {one_line(exc)}")
            except _Follower:
                pass
        if failure is not None:
            failure.args = (f"{failure}; {self.how_to_go_on(run_dir, good, failure)}",)
            raise failure
        return summary

    def fit(self, state: TrainState, callbacks: list[Callback], log: Loggers,
            stop: signals.StopRequest, on_step: StepCallback | None,
            save: Callable[[], None]) -> VibenchError | None:
        """The loop: a step, its callbacks, a checkpoint now and then; returns why it
        stopped before the last step, if it did."""
        settings = self.recipe["train"]
        every = settings["checkpoint_every"]
        for step in range(state.step, settings["steps"]):
            loss, bad = self.step(stop)
            if bad:
                state.skipped += 1
                if state.skipped > settings["skip_bad_steps"]:
                    return RunError(f"step {step + 1}: {bad}")
            else:
                state.losses.append(loss)
                log.scalar("Train/loss", loss, step)
            state.step = step + 1
            for callback in callbacks:
                callback.after_step(step, None if bad else loss, log)
            if on_step is not None:
                on_step(step + 1, loss)
            stopped = next((c.stopped for c in callbacks if c.stopped), None)
            if stopped:
                state.stopped_early = step + 1
                return None
            if self.stopping(stop):
                return None
            if every and (step + 1) % every == 0 and step + 1 < settings["steps"]:
                save()
        return None

    def step(self, stop: signals.StopRequest | None = None) -> tuple[float, str]:
        """One SVI step (Pyro's SVI.step, guarded): a non-finite loss or gradient is not
        applied, and comes back as the reason the step was bad. Under torchrun the ranks'
        losses and gradients are averaged first (and whether any was asked to stop)."""
        if self.compiled is not None:
            loss, bad = self.compiled()
            if not bad and self.schedule is not None:
                self.schedule(loss)
            return loss, bad
        self.minibatch.resample()
        svi = self.svi
        with poutine.trace(param_only=True) as capture:
            loss = svi.loss_and_grads(svi.model, svi.guide, **self.data)
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        if self.world.distributed:
            loss, params, self.peers_stop = distributed.reduce_step(
                loss, params, self.weight, bool(stop))
        loss = torch_item(loss)
        bad = ""
        if not math.isfinite(loss):
            bad = f"the loss is {loss}"
        else:
            grads = [p.grad for p in params if p.grad is not None]
            if grads and not torch.isfinite(torch.stack([g.sum() for g in grads])).all():
                store = pyro.get_param_store()
                names = [store.param_name(p) for p in params
                         if p.grad is not None and not torch.isfinite(p.grad).all()]
                bad = f"the gradient of {', '.join(sorted(names))} is not finite"
        if not bad:
            svi.optim(params)
            if self.schedule is not None:
                self.schedule(loss)
        zero_grads(params)
        return loss, bad

    def evaluate(self, step: int) -> float:
        """SVI's gradient-free loss estimate, on its own random stream (seeded by the run's
        seed and the step), so logging it never changes the fit."""
        with torch.random.fork_rng(devices=rng_devices(self.device)):
            seed_device(self.device, self.recipe["seed"] * 1_000_003 + step)
            self.minibatch.resample()
            value = self.svi.evaluate_loss(**self.data)
        if self.world.distributed:
            value = distributed.weighted_sum(value, self.weight, self.device)
        return value

    @property
    def weight(self) -> float:
        """This rank's weight in the sum of the ranks' estimates: its share of the data."""
        share = self.minibatch.weight
        return share if share is not None else 1 / self.world.size

    def stopping(self, stop: signals.StopRequest) -> bool:
        """Whether to stop after this step: asked to, or, under torchrun, some rank was (all
        ranks must stop after the same step)."""
        return self.peers_stop if self.world.distributed else bool(stop)

    def use_whole_data(self) -> None:
        """Rank 0 under torchrun goes back to the whole data and an unsharded plate for the
        report, as a single process would have them."""
        if self.whole_data is None:
            return
        old = self.minibatch
        self.data, self.whole_data = self.whole_data, None
        self.minibatch = Minibatch()
        if old.shard is not None and old.batch_size:
            self.minibatch = Minibatch(old.plate, old.shard.size, old.batch_size, self.device,
                                       old.dim)
            self.minibatch.indices = old.shard.owned[old.indices] if old.shard.local \
                else old.indices
        if getattr(self.guide, "create_plates", None) == old.guide_plates:
            self.guide.create_plates = (self.minibatch.guide_plates
                                        if self.minibatch.plate is not None else None)

    # ----------------------------------------------------------------------------------------
    # checkpoints

    def save(self, run_dir: Path, state: TrainState, callbacks: list[Callback],
             losses: LossFile, start: float | None = None, log: Loggers | None = None,
             gather: bool = True) -> None:
        """A checkpoint of the run as it is now; the losses and events up to it are made
        durable first, so a resume finds all of them. Under torchrun every rank takes part
        (``gather``: its random generators' state goes to rank 0), and rank 0 writes."""
        rngs = self.rng_states(gather)
        if not self.world.leader:
            return
        losses.write(state.losses)
        if log is not None:
            log.flush()
        wall = state.wall + (time.perf_counter() - start if start is not None else 0.0)
        params, buffers = checkpoint.params_state(self.guide)
        checkpoint.save(run_dir, {
            "recipe": self.recipe, "data_hash": self.data_hash,
            "state": {**state.to_checkpoint(), "wall": wall},
            "callbacks": callback_states(callbacks),
            "params": params, "buffers": buffers,
            "optim": optimizer_state(self.svi.optim), "rng": rngs[0], "threads": self.threads,
            **({"world_size": self.world.size, "rng_ranks": rngs}
               if self.world.distributed else {}),
        })

    def rng_states(self, gather: bool = True) -> list[dict]:
        """Every rank's random generators' state (on rank 0; the others get []): gathered
        now, or (without ``gather``, when only rank 0 went on, drawing from forked streams)
        as last gathered."""
        if not self.world.distributed:
            return [checkpoint.rng_state()]
        if gather:
            self.rank_rngs = distributed.gather(checkpoint.rng_state()) or []
        return self.rank_rngs

    def restore(self, saved: dict, callbacks: list[Callback], run_dir: Path,
                changes: dict | None) -> TrainState:
        """Put a checkpoint's state back, exactly: parameters, buffers, optimizers (unless the
        resume changes their settings: then they start afresh), random generators, callbacks."""
        where = f"--resume {run_dir}"
        checkpoint.restore_params(saved["params"], saved["buffers"], self.guide, where)
        optim = self.svi.optim
        if not any(key.startswith("optimizer") for key in changes or {}):
            optim.optim_objs.clear()
            optim.grad_clip.clear()
            optim.set_state(saved["optim"])
            make_optimizers(optim, [p for _, p in pyro.get_param_store().named_parameters()])
        if self.compiled is not None:
            self.compiled.adopt_optimizer()
        checkpoint.set_rng_state(saved["rng_ranks"][self.world.rank] if self.world.distributed
                                 else saved["rng"], where)
        restore_callbacks(callbacks, saved.get("callbacks", {}))
        known = {f.name for f in dataclasses.fields(TrainState)}
        fields = {key: value for key, value in saved["state"].items() if key in known}
        state = TrainState(**{**fields, "losses": LossFile.read(run_dir / layout.LOSSES,
                                                                 fields["losses"], where)})
        if state.trained and state.step < self.recipe["train"]["steps"] and \
                "train.steps" in (changes or {}):  # asked to run longer
            state.trained = state.reported = False
            state.stopped_early = None
            for callback in callbacks:
                callback.go_on()
        if changes:
            state.resumes.append({"step": state.step, "changes": changes})
        return state

    def how_to_go_on(self, run_dir: Path, good: bool, failure: VibenchError) -> str:
        resume = f"vibench run --resume {run_dir}"
        if self.threads:
            resume += f" --threads {self.threads}"
        if self.world.distributed:
            resume = (f"torchrun --nproc-per-node {self.world.size} -m workbench run "
                      f"--resume {run_dir} (the same number of processes)")
        if isinstance(failure, Interrupted):
            return f"saved in {run_dir}; go on with: {resume}"
        if isinstance(failure, PeerLost):
            return f"the last checkpoint is in {run_dir}; go on from it with: {resume}"
        lr = self.recipe["optimizer"].get("lr")
        lower = f" --set optimizer.lr={lr / 10:g}" if isinstance(lr, (int, float)) else ""
        kept = f"saved in {run_dir}" if good else f"the last good checkpoint is in {run_dir}"
        return f"{kept}; go on from it (with a smaller step size, say) with: {resume}{lower}"

    # ----------------------------------------------------------------------------------------
    # the report

    def report(self, run_dir: Path, log: Loggers, losses: list[float],
               stop: signals.StopRequest) -> dict:
        """What the fitted guide says of the posterior, how far to trust it (PSIS k-hat), and
        the plots, as PNG files in ``run_dir/plots`` and images in TensorBoard. Each part that
        fails is left out with its reason; a stop signal skips the parts not yet begun.

        A minibatch run gets no k-hat and no per-site plots: both need the whole data's
        likelihood for every draw, which a minibatch run is there to avoid. posterior.nc
        (``workbench.report.inference_data``) is written on its own random stream; when it fails,
        the summary's ``diagnostics.inference_data`` says why. Where the model offers a
        reference posterior, ``workbench.report.reference`` scores the guide against it."""
        from workbench.report import inference_data, plots, reference

        began = time.perf_counter()
        settings = self.recipe["train"]
        post: dict = {}
        compared: dict = {}  # {"reference": ...} where the model offers a reference posterior
        diagnostics: dict = {"khat": None, "reason": "not computed for a minibatch run"}
        sources: dict = {}
        whole = self.minibatch.plate is None
        guide = self.guide
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices(self.device)), \
                posterior.whole_data(self.minibatch):
            torch.manual_seed(self.recipe["seed"])  # the same numbers after any resume
            try:
                if hasattr(guide, "posterior_guide"):
                    with torch.enable_grad():  # a Laplace approximation takes a Hessian
                        guide = guide.posterior_guide(**self.data)
                post = posterior.summarize(guide, self.data, self.sites, self.nesting,
                                           self.exact, model=self.model)
                if not settings["diagnostics"]:
                    diagnostics = {"khat": None, "reason": "train.diagnostics is off"}
                elif stop:
                    diagnostics = {"khat": None, "reason": "interrupted"}
                elif whole:
                    diagnostics = posterior.diagnostics(self.model, guide, self.data,
                                                        self.nesting)
                    for site, estimates in diagnostics.pop("sites", {}).items():
                        post[site].update(estimates)
                if whole and settings["plots"] and not stop:
                    sources = posterior.plot_sources(self.model, guide, self.data, self.sites,
                                                     self.nesting, self.exact)
                if not stop:
                    compared = reference.section(self.model, self.data, post)
            except Exception as exc:  # the report must never cost the run its results
                diagnostics = {"khat": None, "reason": f"the report failed: {one_line(exc)}"}
            written = None
            if not stop:
                try:
                    written = inference_data.write(self, run_dir, guide)
                    diagnostics["inference_data"] = "written"
                except Exception as exc:
                    diagnostics["inference_data"] = f"failed: {one_line(exc)}"
                    warnings.warn(f"vibench could not write {layout.POSTERIOR}: "
                                  f"{one_line(exc)}", stacklevel=1)
            try:
                if settings["plots"] and not stop:
                    ppc = inference_data.ppc_sources(written) if written else {}
                    plots.write_plots(run_dir, losses, sources, writer=log, step=len(losses),
                                      ppc=ppc)
            except OSError:
                raise
            except Exception as exc:
                warnings.warn(f"vibench could not draw the plots: {one_line(exc)}",
                              stacklevel=1)
        return {"posterior": post, "diagnostics": diagnostics, **compared,
                "report_seconds": time.perf_counter() - began}

    def summarize(self, state: TrainState, callbacks: list[Callback], wall: float,
                  report: dict, failure: VibenchError | None) -> dict:
        """The run's summary.json content (the contract docs/reference/summary-json.md gives,
        plus how the run went)."""
        tail = state.losses[-100:]
        summary = {
            "recipe": self.recipe,
            "steps": state.step,
            "wall_seconds": wall,
            "steps_per_second": state.step / wall if wall > 0 else 0.0,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "posterior": report.get("posterior", {}),
            "diagnostics": report.get("diagnostics", {}),
            **{key: report[key] for key in ("reference", "report_seconds") if key in report},
            "params": {name: posterior.to_plain(value)
                       for name, value in pyro.get_param_store().items()},
            "status": _status(failure),
            "skipped_steps": state.skipped,
            "averaged_steps": 0,
            "stopped_early": state.stopped_early,
            "resumes": state.resumes,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "versions": versions(),
            "data_hash": self.data_hash,
            "world_size": self.world.size,
            "threads": torch.get_num_threads(),
            "compiled": self.compiled is not None,  # train.compile: the step ran compiled
        }
        for callback in callbacks:
            summary.update(callback.summary())
        if failure is not None:
            summary["error"] = str(failure)
        return summary


class _Follower(Exception):
    """Ends a rank other than 0's part in ``Run.train``: rank 0 writes the results."""


def parallel_note(minibatch: Minibatch, world: World) -> str:
    """What the user should know of how the ranks split the work."""
    found = minibatch.shard
    if found is None:
        return (f"training on {world.size} processes, each on the whole data (no single plate "
                "to split: name it with train.subsample_plate), as more particles")
    kept = ("each keeps only its rows" if found.local else
            "each keeps the data whole, since latent sites live in the plate")
    return (f"training data-parallel on {world.size} processes: plate {minibatch.plate!r} "
            f"({found.size}) is split, {found.count} on rank 0; {kept}")


def trace_model(model: Any, data: dict, name: str) -> poutine.Trace:
    """The model run once on the data (``posterior.site_trace``: at a prior draw, or at its
    supports' centre where it cannot compute there); a model that fails is a UsageError."""
    try:
        return posterior.site_trace(model, **data)
    except Exception as exc:
        raise UsageError(f"model {name!r}: {broadcast.described(exc, model)}") from exc


def rank_data(data: dict, minibatch: Minibatch) -> dict:
    """This rank's data: the rows of its shard where the plate is sharded, else all of it."""
    found = minibatch.shard
    if found is None or not found.local:
        return data
    return shard(data, found.size, found.owned)


class LossFile:
    """Every good step's loss, appended as raw float64 at each checkpoint: a checkpoint then
    costs the same at step 10 as at step 10^6."""

    def __init__(self, path: Path, written: int):
        self.path = path
        self.written = written

    def write(self, losses: list[float]) -> None:
        import array

        with files.open_for_writing(self.path, append=True) as handle:
            handle.truncate(self.written * 8)  # what a checkpoint after this one counted
            array.array("d", losses[self.written:]).tofile(handle)
            handle.flush()
            os.fsync(handle.fileno())  # before the checkpoint that counts them
        self.written = len(losses)

    @staticmethod
    def read(path: Path, count: int, where: str) -> list[float]:
        import array

        values = array.array("d")
        try:
            with open(path, "rb") as handle:
                values.fromfile(handle, count)
        except (OSError, EOFError) as exc:
            raise UsageError(f"{where}: {path.name} lacks the losses of the checkpoint "
                             f"({count}): {exc}") from None
        return values.tolist()


def recipe_text(recipe: dict, resumes: list[dict]) -> str:
    """recipe.yaml: the recipe as it runs now, then what each resume changed, as comments, so
    the file still runs and still says what happened."""
    lines = [dump(recipe).rstrip("\n")]
    for resume in resumes:
        changed = ", ".join(f"{key}: {old!r} -> {new!r}"
                            for key, (old, new) in resume["changes"].items())
        lines.append(f"# resumed at step {resume['step']}: {changed}")
    return "\n".join(lines) + "\n"


def fit_particles(loss: Any, way: broadcast.Verdict, names: dict[str, str]) -> list[str]:
    """Where the model does not broadcast over a leading dimension (``way``), a loss with
    vectorised particles takes them one after another instead; the notes say so, where the
    model failed, and what it costs (the report's cost too)."""
    if way.broadcasts:
        return []
    cost = way.report_cost(posterior.NUM_IS_DRAWS)
    particles = getattr(loss, "num_particles", 1)
    if getattr(loss, "vectorize_particles", False) and particles > 1:
        from pyro.infer import TraceTailAdaptive_ELBO

        if isinstance(loss, TraceTailAdaptive_ELBO):
            raise UsageError(f"loss {names['loss']!r} needs particles evaluated at once, and "
                             f"{way.line(names['model'])}; make the model broadcast "
                             "(docs: Your own model) or use another loss")
        loss.vectorize_particles = False
        cost = (f"its {particles} particles run one after another (about {particles}x the "
                f"step's time); {cost}")
    return [way.line(names["model"]), cost]


def check_step_memory(trace: poutine.Trace, loss: Any, device: torch.device) -> None:
    """Refuse a loss whose vectorised particles would need more memory in one step than the
    device has: a huge ``num_particles`` is a typo, not a run."""
    particles = getattr(loss, "num_particles", 1)
    if not getattr(loss, "vectorize_particles", False) or particles <= 1:
        return
    numbers = sum(site["value"].numel() for site in trace.nodes.values()
                  if site["type"] in ("sample", "param") and torch.is_tensor(site["value"]))
    # values, densities, gradients and the guide's copy of each, and autograd's saved
    # intermediates: six copies (four fell 1.3-1.5x short of what a step really took)
    need = 6 * numbers * particles * torch.get_default_dtype().itemsize
    have = available_memory(device)
    if have is not None and need > have:
        raise UsageError(f"loss.num_particles: {particles} particles need about "
                         f"{need / 1e9:.1f} GB a step ({numbers} numbers a trace), more than "
                         f"the {have / 1e9:.1f} GB free on {device}; use fewer")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a step's tensors on ``device``, where it can be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def data_hash(data: dict) -> str:
    """A hash of the data as the model gets it (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for key in sorted(data):
        value = data[key]
        digest.update(key.encode())
        if torch.is_tensor(value):
            digest.update(f"{tuple(value.shape)}{value.dtype}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return "sha256:" + digest.hexdigest()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("vibench")
    except PackageNotFoundError:
        own = "unknown"
    return {"vibench": own, "torch": torch.__version__, "pyro": pyro.__version__}


def try_once(svi: SVI, data: dict, names: dict[str, str], model: Any = None) -> None:
    """One loss and gradient, as a step takes them (it also creates the guide's parameters):
    what the model, guide and loss cannot do together fails here, before the run, named by
    the line of the ``model``'s file that failed where it was there."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            svi.loss_and_grads(svi.model, svi.guide, **data)
        except Exception as exc:
            raise UsageError(
                f"model {names['model']!r}, guide {names['guide']!r} and loss "
                f"{names['loss']!r} do not work together: {broadcast.described(exc, model)}"
            ) from exc
    for warning in caught:
        if "in model but not guide" in str(warning.message):
            raise UsageError(
                f"guide {names['guide']!r} with loss {names['loss']!r} leaves latent sites of "
                f"model {names['model']!r} unfitted ({warning.message}); a discrete site "
                "marked for enumeration needs a loss that enumerates it")
        warnings.warn_explicit(warning.message, warning.category, warning.filename,
                               warning.lineno)


def exact_posterior(model: Any, data: dict, name: str) -> dict | None:
    """The model's exact or reference posterior per site, if it gives one."""
    method = getattr(model, "exact_posterior", None)
    if method is None:
        return None
    try:
        return dict(method(**data))
    except Exception as exc:
        raise UsageError(f"model {name!r}: its exact posterior failed: {one_line(exc)}") from exc


def write_results(run_dir: Path, summary: dict, params: bool = True) -> None:
    """summary.json (strict JSON) and (unless they went bad) the learned parameters, each
    written whole or not at all."""
    from workbench.rundir import jsonsafe

    files.write_atomic(run_dir / layout.SUMMARY, jsonsafe.dumps(summary, indent=2).encode())
    if params:
        with files.atomic_path(run_dir / layout.PARAMS) as tmp:
            pyro.get_param_store().save(str(tmp))


def _status(failure: VibenchError | None) -> str:
    return ("completed" if failure is None else
            "interrupted" if isinstance(failure, Interrupted) else "failed")
