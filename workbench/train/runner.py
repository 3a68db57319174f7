"""Run SVI for a checked recipe: set it up, train, and write the run directory.

``Run.setup`` builds the recipe's components in the named phases of ``workbench.train.setup``
(device, data, guide, loss, parameters, optimizer, evaluation), so a misfit is a UsageError
before anything is written. ``Run.train`` then reads straight through: open the run
directory, the loop over one ``TrainState`` (``fit``: Pyro's SVI step taken here, so a bad
step is never applied, then the callbacks), how it ended (``Ending``), the last checkpoint,
summary.json (``workbench.train.results``) and the report (``workbench.train.report``).
Checkpoints hold the state and the callbacks' state, so a resumed run ends bitwise where an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
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
from workbench.data.minibatch import Minibatch
from workbench.device import rng_devices, run_context, seed_device
from workbench.distributed import World
from workbench.errors import CannotWrite, Interrupted, PeerLost, RunError, VibenchError, one_line
from workbench.plugins.build import build
from workbench.plugins.registry import Registry
from workbench.report import posterior
from workbench.rundir import files, layout
from workbench.seams import torch_optimizer
from workbench.train import checkpoint, report
from workbench.train import setup as phases
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
from workbench.train.optim import (
    make_optimizer,
    make_optimizers,
    optimizer_state,
    schedule_stepper,
    step_optimizers,
)
from workbench.train.results import LossFile, recipe_text, summarize, write_results
from workbench.train.setup import trace_model

__all__ = ["Run", "TrainState", "recipe_text", "trace_model", "write_results"]

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
class Ending:
    """How training ended: why it stopped before its last step (None: it did not), and
    whether the run's state is fit to checkpoint."""

    failure: VibenchError | None = None
    good: bool = True

    def fail(self, failure: VibenchError) -> None:
        """A failure that leaves the state unfit to checkpoint."""
        self.failure, self.good = failure, False


@dataclass(kw_only=True)
class Run:
    """A recipe's components, built and checked against each other, ready to train; made by
    ``setup``, with keywords."""

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
    # an automatic pipeline's fit: the steps of every fit of the same step, which decide
    # whether a compiled one pays (else the recipe's); such a fit never compiles its step
    # itself under train.compile: auto, it loads a package or trains eagerly
    compile_for: int | None = None

    @classmethod
    def setup(cls, recipe: dict, registry: Registry, compile: bool = True,
              compile_for: int | None = None) -> Run:
        """Build the recipe's components and try them once, phase by phase (``setup.py``);
        any misfit is a UsageError. The step is compiled as train.compile asks unless
        ``compile`` is False (``lr: auto`` compiles before its trials, which run on the compiled
        step), for ``compile_for`` steps (default: the recipe's)."""
        logging.getLogger("pyro").setLevel(logging.WARNING)
        world = distributed.world()
        device, dtype = phases.setup_device(recipe, world)
        with run_context(device, dtype):
            model = build(registry, "model", recipe["model"], device=device)
            loaded = phases.setup_data(registry, recipe, model, device, world)
            guide = phases.setup_guide(registry, recipe, model, device)
            loss, stepped, notes = phases.setup_loss(registry, recipe, model, loaded, device,
                                                     world)
            optimizer, optim_args = make_optimizer(registry, recipe, device)
            minibatch = Minibatch.of(loaded.trace, recipe["train"], device, world,
                                     loaded.total)
            data = phases.rank_data(loaded.values, minibatch)
            if world.distributed:
                notes.append(phases.parallel_note(minibatch, world))
            svi = SVI(minibatch(stepped), minibatch(guide), optimizer, loss=loss)
            notes += phases.setup_params(svi, data, recipe, model, guide, minibatch)
            phases.setup_optimizer(svi, optim_args, recipe)
            can_evaluate, more = phases.setup_evaluation(svi, data, minibatch, device, recipe)
            whole = loaded.total is None  # a rank holding only its rows neither reports nor
            exact = phases.exact_posterior(model, loaded.values, recipe["model"]["name"]) \
                if whole else None  # checks the data on --resume
            if world.distributed:
                distributed.broadcast_params()
                pyro.set_rng_seed(distributed.rank_seed(recipe["seed"], world.rank))
        run = cls(
            recipe=recipe, device=device, dtype=dtype, data=data, model=model, guide=guide,
            svi=svi, sites=posterior.latent_sites(loaded.trace),
            nesting=posterior.plate_nesting(loaded.trace), exact=exact,
            data_hash=phases.data_hash(loaded.values) if whole else "",
            schedule=schedule_stepper(optimizer), can_evaluate=can_evaluate,
            notes=notes + more, minibatch=minibatch, registry=registry, world=world,
            whole_data=loaded.values if world.distributed and world.leader else None,
            compile_for=compile_for)
        if compile:
            run.compile_step()
        return run

    def compile_step(self) -> None:
        """Compile the step as train.compile asks, for the optimizer the run holds now: at the
        end of set-up, and again where ``optimizer.lr: auto`` swaps the optimizer."""
        with run_context(self.device, self.dtype):
            self.compiled, notes = compiled_step.prepare(
                self.recipe["train"].get("compile", "auto"), self.svi, self.data, self.device,
                self.compile_for or self.recipe["train"]["steps"],
                self.minibatch.plate is not None, self.world.size, recipe=self.recipe,
                cached_only=self.compile_for is not None)
        if self.compiled is not None:  # an update left to the optimizer steps as eager ones do
            self.compiled.step_optimizers = functools.partial(step_optimizers, self.svi.optim)
        self.notes += [note for note in notes if note not in self.notes]

    def use_optimizer(self, optimizer: Any) -> None:
        """Step with ``optimizer`` (Pyro's) from now on, its state as it holds it:
        ``optimizer.lr: auto`` swaps one in for each trial step size and the winner's after."""
        make_optimizers(optimizer, [param for _, param in pyro.get_param_store()
                                    .named_parameters()])
        self.svi.optim = optimizer
        if self.compiled is not None:  # its update takes the optimizer's state over
            self.compiled.adopt_optimizer(optimizer)
            self.compiled.step_optimizers = functools.partial(step_optimizers, optimizer)

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
        callbacks = self.callbacks()
        state = TrainState()
        if resume is not None:
            with run_context(self.device, self.dtype):
                state = self.restore(resume, callbacks, run_dir, changes)
        losses = LossFile(run_dir / layout.LOSSES, len(state.losses))
        log = self.open_run_dir(run_dir, state, callbacks, losses, fresh=resume is None)
        start = time.perf_counter()
        save = functools.partial(self.save, run_dir, state, callbacks, losses, start, log)
        with run_context(self.device, self.dtype), signals.deferred() as stop:
            ending = self.train_steps(run_dir, state, callbacks, log, stop, on_step, save)
            self.end_training(state, callbacks, ending, stop)
            wall = state.wall + time.perf_counter() - start
            summary = self.finish(run_dir, state, callbacks, ending, wall, log, stop, save)
            if ending.failure is not None:  # told while a signal still waits its turn
                how = self.how_to_go_on(run_dir, ending.good, ending.failure, bool(state.losses))
                ending.failure.args = (f"{ending.failure}; {how}",)
        if ending.failure is not None:
            raise ending.failure
        return summary

    def open_run_dir(self, run_dir: Path, state: TrainState, callbacks: list[Callback],
                     losses: LossFile, fresh: bool) -> Loggers:
        """recipe.yaml first (a run whose logger fails still says what it was), then the
        loggers, then (``fresh``: not resumed) a first checkpoint, so a run killed before its
        own first checkpoint can still resume. Only rank 0 writes the run directory."""
        log = Loggers([])
        try:
            if self.world.leader:
                files.write_atomic(run_dir / layout.RECIPE,
                                   recipe_text(self.recipe, state.resumes).encode())
                log = Loggers.of(self.registry, self.recipe, run_dir, state.step)
            if fresh:
                self.save(run_dir, state, callbacks, losses)
        except OSError as exc:
            raise CannotWrite(run_dir, exc) from None
        return log

    def train_steps(self, run_dir: Path, state: TrainState, callbacks: list[Callback],
                    log: Loggers, stop: signals.StopRequest, on_step: StepCallback | None,
                    save: Callable[[], None]) -> Ending:
        """The loop (``fit``), unless a resumed run had already taken every step, with what
        can break in it turned into how it ended."""
        if state.trained:
            return Ending()
        try:
            return Ending(self.fit(state, callbacks, log, stop, on_step, save))
        except OSError as exc:
            return Ending(CannotWrite(run_dir, exc))
        except PeerLost as exc:  # another rank is gone: no more collectives, no checkpoint
            return Ending(exc, good=False)
        except Exception as exc:  # the model, guide or optimizer broke: keep the last good
            return Ending(RunError(f"step {state.step + 1} failed: {one_line(exc)}"),
                          good=False)

    def end_training(self, state: TrainState, callbacks: list[Callback], ending: Ending,
                     stop: signals.StopRequest) -> None:
        """After the last step taken: parameters that went non-finite spoil the state; a stop
        before the last step is an interruption; else training is over (``on_train_end``)."""
        bad = [name for name, value in pyro.get_param_store().items()
               if not torch.isfinite(value).all()]
        if bad:
            detail = f"parameters {', '.join(bad)} are not finite after step {state.step}"
            ending.fail(RunError(f"{ending.failure}; {detail}" if ending.failure else detail))
        finished = state.stopped_early is not None or \
            state.step >= self.recipe["train"]["steps"]
        if ending.failure is None and self.stopping(stop) and not finished:
            ending.failure = Interrupted(f"interrupted after step {state.step}", stop.signum)
        if ending.failure is None and not state.trained:
            for callback in callbacks:
                callback.on_train_end()
            state.trained = True

    def finish(self, run_dir: Path, state: TrainState, callbacks: list[Callback],
               ending: Ending, wall: float, log: Loggers, stop: signals.StopRequest,
               save: Callable[..., None]) -> dict:
        """The last checkpoint (of a good state), then, on rank 0, summary.json and params.pt,
        the report and summary.json again with it; a write that fails is how the run ends."""
        summary: dict = {}
        try:
            if ending.good:
                save()
                log_params(log, state.step, self.svi.optim)
            summary = summarize(self, state, callbacks, wall, {}, ending.failure)
            if ending.good:  # the last collective is behind us: the report is rank 0's alone
                distributed.finish(together=True)
            if not self.world.leader:
                return summary
            write_results(run_dir, summary, params=ending.good)
            if ending.good and (state.losses or self.recipe["train"]["steps"] == 0) \
                    and not stop.hurry:
                summary = self.report(run_dir, state, callbacks, ending, wall, log, stop, save)
            log.close(summary)
        except OSError as exc:
            ending.failure = CannotWrite(run_dir, exc)
        return summary

    def report(self, run_dir: Path, state: TrainState, callbacks: list[Callback],
               ending: Ending, wall: float, log: Loggers, stop: signals.StopRequest,
               save: Callable[..., None]) -> dict:
        """The report on the whole data (``workbench.train.report``), then summary.json with
        it; a report finished is checkpointed, so a resume does not draw it again."""
        self.use_whole_data()
        found = report.write(self, run_dir, log, state.losses, stop)
        if ending.failure is None and stop:
            ending.failure = Interrupted(f"interrupted while writing the report after step "
                                         f"{state.step}", stop.signum)
        elif ending.failure is None:
            state.reported = True
            save(gather=False)
        summary = summarize(self, state, callbacks, wall, found, ending.failure)
        write_results(run_dir, summary, params=False)
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
            step_optimizers(svi.optim, list(params))
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

    def how_to_go_on(self, run_dir: Path, good: bool, failure: VibenchError,
                     any_finite: bool = True) -> str:
        """Advice fitting the failure: free the disk, check the model where no step ever had a
        finite loss, else a smaller step size; each with the command that goes on."""
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
        if isinstance(failure, CannotWrite):
            return f"then go on from the last checkpoint with: {resume}"
        if not any_finite:
            return ("no step had a finite loss: the model's log density is not finite where "
                    "training starts (check the data for values outside the likelihood's "
                    "support or too large, and the priors); a smaller step size will not help")
        lr = self.recipe["optimizer"].get("lr")
        lower = f" --set optimizer.lr={lr / 10:g}" if isinstance(lr, (int, float)) else ""
        kept = f"saved in {run_dir}" if good else f"the last good checkpoint is in {run_dir}"
        return f"{kept}; go on from it (with a smaller step size, say) with: {resume}{lower}"
