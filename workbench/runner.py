"""Run SVI for a checked recipe: build its components, train, and write the run directory.

``Run.setup`` does everything that can fail because of the recipe (a data key the model does
not take, a guide that cannot fit the model) before anything is written; ``Run.train`` then
trains and writes the run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI
from pyro.infer.util import torch_item, zero_grads

from workbench import checkpoint, posterior
from workbench.build import build
from workbench.errors import RunError, UsageError, VibenchError, one_line
from workbench.minibatch import Minibatch
from workbench.optim import make_optimizer, schedule_stepper
from workbench.recipe import dump
from workbench.registry import Registry
from workbench.tensors import check_support, load_data

StepCallback = Callable[[int, float], None]


class Interrupted(VibenchError):
    """The user pressed Ctrl-C; what was learned so far is saved."""

    exit_code = 130


def pick_device(name: str) -> torch.device:
    """The torch device for a recipe's ``device`` value; ``auto`` takes CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU found"
            raise UsageError(
                f"device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                f"{build}); use --device cpu"
            )
        if (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"device {name!r}: there are {torch.cuda.device_count()} GPUs")
    return device


@dataclass
class Run:
    """A recipe's components, built and checked against each other, ready to train."""

    recipe: dict
    device: torch.device
    data: dict
    model: Any
    guide: Any
    svi: SVI
    sites: dict[str, torch.Size]  # the model's latent sites and their shapes
    nesting: int  # how many batch dimensions the model's plates use
    exact: dict | None  # the exact posterior per site, where the model gives it
    schedule: Callable[[float], None] | None = None  # steps the learning-rate schedule
    can_evaluate: bool = True  # the loss has a gradient-free estimate for Eval/loss
    notes: list[str] = field(default_factory=list)  # what the user should know before training
    minibatch: Minibatch | None = None  # draws each step's batch when the recipe asks for one

    @classmethod
    def setup(cls, recipe: dict, registry: Registry) -> Run:
        """Build the recipe's components and try them once; any misfit is a UsageError."""
        logging.getLogger("pyro").setLevel(logging.WARNING)
        device = pick_device(recipe["device"])
        pyro.clear_param_store()
        pyro.set_rng_seed(recipe["seed"])
        names = {kind: recipe[kind]["name"] for kind in ("model", "guide", "loss")}
        notes: list[str] = []
        with on_device(device):
            model = build(registry, "model", recipe["model"], device=device)
            data, origin = load_data(registry, recipe["data"], model, names["model"], device)
            try:
                trace = poutine.trace(model).get_trace(**data)
            except Exception as exc:
                raise UsageError(f"model {names['model']!r}: {one_line(exc)}") from exc
            check_support(trace, data, origin)
            guide = build(registry, "guide", recipe["guide"], model=model, device=device)
            loss = build(registry, "loss", recipe["loss"], device=device)
            optimizer, optim_args = make_optimizer(registry, recipe, device)
            minibatch = Minibatch.of(trace, recipe["train"], device)
            svi = SVI(minibatch(model), minibatch(guide), optimizer, loss=loss)
            minibatch.resample()
            try_once(svi, data, names)
            params = [param for _, param in pyro.get_param_store().named_parameters()]
            for param in params:
                param.grad = None
            optim_args.check(list(pyro.get_param_store().keys()))
            try:  # make each parameter's torch optimizer now (no gradients: no step), so
                svi.optim(params)  # torch refuses bad settings here, not at step 1
            except Exception as exc:
                raise UsageError(
                    f"optimizer {recipe['optimizer']['name']!r}: {one_line(exc)}") from exc
            can_evaluate = recipe["train"]["eval_every"] > 0
            if can_evaluate:
                try:
                    minibatch.resample()
                    svi.evaluate_loss(**data)
                except NotImplementedError:
                    can_evaluate = False
                    notes.append(f"loss {names['loss']!r} has no gradient-free estimate, so "
                                 "Eval/loss is not logged")
            exact = exact_posterior(model, data, names["model"])
        sites = posterior.latent_sites(trace)
        return cls(recipe, device, data, model, guide, svi, sites, posterior.plate_nesting(trace),
                   exact, schedule_stepper(optimizer), can_evaluate, notes, minibatch)

    def train(self, run_dir: Path, on_step: StepCallback | None = None,
              resume: dict | None = None) -> dict:
        """Train for the recipe's steps, logging to TensorBoard and checkpointing in
        ``run_dir``; returns the summary, which is also written there.

        Ctrl-C stops at the end of the step in progress; a bad step (non-finite loss or
        gradient) is skipped up to ``train.skip_bad_steps`` times, then stops the run. Either
        way the last good state is checkpointed, and ``resume`` (a checkpoint) goes on from it.
        """
        from tensorboardX import SummaryWriter  # imported here: it is slow to import

        settings = self.recipe["train"]
        progress = {"step": 0, "losses": [], "skipped": 0, "wall": 0.0}
        (run_dir / "recipe.yaml").write_text(dump(self.recipe))
        if resume is not None:
            progress = self.restore(resume)
        else:  # a run killed before its first checkpoint can still be resumed, from the start
            checkpoint.save(run_dir, self.svi.optim, progress)
        losses: list[float] = progress["losses"]
        writer = SummaryWriter(logdir=str(run_dir), purge_step=progress["step"] or None,
                               filename_suffix=f".{progress['step']:09d}")
        failure: VibenchError | None = None
        good = True  # whether the run's state is fit to checkpoint
        start = time.perf_counter()
        with on_device(self.device), _deferred_interrupt() as interrupted:
            try:
                for step in range(progress["step"], settings["steps"]):
                    loss, bad = self.step()
                    if bad:
                        progress["skipped"] += 1
                        if progress["skipped"] > settings["skip_bad_steps"]:
                            failure = RunError(f"step {step + 1}: {bad}")
                            break
                    else:
                        losses.append(loss)
                        writer.add_scalar("Train/loss", loss, step)
                        if step + 1 > settings["steps"] * (1 - (settings["average_last"] or 0)):
                            average(progress)
                        if settings["early_stop_patience"] and self.plateaued(progress, loss):
                            progress["stopped_early"] = step + 1
                    progress["step"] = step + 1
                    self.log(writer, step)
                    if on_step is not None:
                        on_step(step + 1, loss)
                    if interrupted():
                        failure = Interrupted(f"interrupted after step {step + 1}")
                        break
                    if progress.get("stopped_early"):
                        break
                    if settings["checkpoint_every"] and (step + 1) % settings["checkpoint_every"] == 0:
                        # tensorboardX cannot flush its queue, only close: so that the event
                        # files hold every step up to the checkpoint, start a new file here
                        writer.close()
                        writer = SummaryWriter(logdir=str(run_dir),
                                               filename_suffix=f".{step + 1:09d}")
                        self.checkpoint(run_dir, progress, start)
            except Exception as exc:  # the model, guide or optimizer broke: keep the last good
                good = False
                failure = RunError(f"step {progress['step'] + 1} failed: {one_line(exc)}")
            bad_params = [name for name, value in pyro.get_param_store().items()
                          if not torch.isfinite(value).all()]
            if bad_params:
                good = False
                detail = (f"parameters {', '.join(bad_params)} are not finite after step "
                          f"{progress['step']}")
                failure = RunError(f"{failure}; {detail}" if failure else detail)
            if good:
                if failure is None and "average" in progress:
                    use_average(progress["average"])
                self.checkpoint(run_dir, progress, start)
                log_params(writer, progress["step"], self.svi.optim)
            wall = progress["wall"] + time.perf_counter() - start
            report = self.report(run_dir, writer, losses) if good and losses else {}
        writer.close()
        summary = self.summarize(losses, progress, wall, report)
        summary["status"] = ("completed" if failure is None else
                             "interrupted" if isinstance(failure, Interrupted) else "failed")
        if failure is not None:
            summary["error"] = str(failure)
        write_results(run_dir, summary, params=good)
        if failure is not None:
            kept = (f"saved in {run_dir}; go on with: vibench run --resume {run_dir}" if good
                    else f"the last good checkpoint is in {run_dir}; go on from it with: "
                         f"vibench run --resume {run_dir}")
            raise type(failure)(f"{failure}; {kept}")
        return summary

    def step(self) -> tuple[float, str]:
        """One SVI step (Pyro's SVI.step, guarded): a non-finite loss or gradient is not
        applied, and comes back as the reason the step was bad."""
        self.minibatch.resample()
        svi = self.svi
        with poutine.trace(param_only=True) as capture:
            loss = svi.loss_and_grads(svi.model, svi.guide, **self.data)
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        loss = torch_item(loss)
        bad = ""
        if not math.isfinite(loss):
            bad = f"the loss is {loss}"
        elif params and not torch.isfinite(torch.stack(
                [p.grad.sum() for p in params if p.grad is not None] or [torch.zeros(())])).all():
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

    def plateaued(self, progress: dict, loss: float) -> bool:
        """Whether the smoothed loss (an exponential moving average over about
        ``early_stop_window`` steps) has not improved by ``early_stop_min_delta`` for
        ``early_stop_patience`` steps."""
        settings = self.recipe["train"]
        state = progress.setdefault("early", {"ema": loss, "best": math.inf, "since": 0})
        state["ema"] += 2 / (settings["early_stop_window"] + 1) * (loss - state["ema"])
        if state["ema"] < state["best"] - settings["early_stop_min_delta"]:
            state["best"], state["since"] = state["ema"], 0
        else:
            state["since"] += 1
        return state["since"] >= settings["early_stop_patience"]

    def log(self, writer: Any, step: int) -> None:
        """What TensorBoard gets after a step besides its loss."""
        settings = self.recipe["train"]
        if self.can_evaluate and (step + 1) % settings["eval_every"] == 0:
            self.minibatch.resample()
            writer.add_scalar("Eval/loss", self.svi.evaluate_loss(**self.data), step)
        if settings["log_params_every"] and step % settings["log_params_every"] == 0:
            log_params(writer, step, self.svi.optim)

    def checkpoint(self, run_dir: Path, progress: dict, start: float) -> None:
        checkpoint.save(run_dir, self.svi.optim,
                        {**progress, "wall": progress["wall"] + time.perf_counter() - start})

    def restore(self, state: dict) -> dict:
        """Put a checkpoint's state back, exactly: parameters, optimizers, random generators."""
        store = pyro.get_param_store()
        store.set_state(state["params"])
        with torch.no_grad():  # modules take the restored tensors as their own parameters
            poutine.trace(self.guide).get_trace(**self.data)
        params = [param for _, param in store.named_parameters()]
        optim = self.svi.optim
        optim.optim_objs.clear()
        optim.grad_clip.clear()
        optim.set_state(state["optim"])
        optim(params)  # no gradients: makes each optimizer and loads its state, no step
        checkpoint.set_rng_state(state["rng"])
        return dict(state["progress"])

    def report(self, run_dir: Path, writer: Any, losses: list[float]) -> dict:
        """What the fitted guide says of the posterior, how far to trust it (PSIS k-hat), and
        the plots, as PNG files in ``run_dir/plots`` and images in TensorBoard.

        A minibatch run gets no k-hat and no per-site plots: both need the whole data's
        likelihood for every draw, which a minibatch run is there to avoid."""
        from workbench import plots

        guide = self.guide
        if hasattr(guide, "posterior_guide"):
            guide = guide.posterior_guide(**self.data)
        settings = self.recipe["train"]
        with torch.no_grad():
            post = posterior.summarize(guide, self.data, self.sites, self.nesting, self.exact)
            sources: dict = {}
            diagnostics = {"khat": None, "reason": "not computed for a minibatch run"}
            if not settings["diagnostics"]:
                diagnostics = {"khat": None, "reason": "train.diagnostics is off"}
            try:  # the report's extras must never cost the run its results
                if self.minibatch.plate is None and settings["diagnostics"]:
                    diagnostics = posterior.diagnostics(self.model, guide, self.data, self.nesting)
                    for site, estimates in diagnostics.pop("sites", {}).items():
                        post[site].update(estimates)
                if self.minibatch.plate is None and settings["plots"]:
                    sources = posterior.plot_sources(self.model, guide, self.data, self.sites,
                                                     self.nesting, self.exact)
            except Exception as exc:
                diagnostics = {"khat": None, "reason": f"failed: {one_line(exc)}"}
            try:
                if settings["plots"]:
                    plots.write_plots(run_dir, losses, sources, writer=writer, step=len(losses))
            except Exception as exc:
                warnings.warn(f"vibench could not draw the plots: {one_line(exc)}")
        return {"posterior": post, "diagnostics": diagnostics}

    def summarize(self, losses: list[float], progress: dict, wall: float, report: dict) -> dict:
        """The run's summary.json content (DESIGN.md's contract, plus diagnostics and how the
        run went)."""
        tail = losses[-100:]
        steps = progress["step"]
        return {
            "recipe": self.recipe,
            "steps": steps,
            "wall_seconds": wall,
            "steps_per_second": steps / wall if wall > 0 else 0.0,
            "final_loss": sum(tail) / len(tail) if tail else float("nan"),
            "posterior": report.get("posterior", {}),
            "diagnostics": report.get("diagnostics", {}),
            "params": {name: posterior.to_plain(value)
                       for name, value in pyro.get_param_store().items()},
            "skipped_steps": progress["skipped"],
            "averaged_steps": progress.get("average", {}).get("count", 0),
            "stopped_early": progress.get("stopped_early"),
        }


def average(progress: dict) -> None:
    """Add the parameters as they are now to their running (Polyak-Ruppert) average."""
    state = progress.setdefault("average", {"count": 0, "params": {}})
    state["count"] += 1
    with torch.no_grad():
        for name, param in pyro.get_param_store().named_parameters():
            mean = state["params"].get(name)
            if mean is None:
                state["params"][name] = param.detach().clone()
            else:
                mean.add_(param.detach() - mean, alpha=1 / state["count"])


def use_average(state: dict) -> None:
    """Set the parameters to their averages."""
    with torch.no_grad():
        for name, param in pyro.get_param_store().named_parameters():
            if name in state["params"]:
                param.copy_(state["params"][name])


def try_once(svi: SVI, data: dict, names: dict[str, str]) -> None:
    """One loss and gradient, as a step takes them (it also creates the guide's parameters):
    what the model, guide and loss cannot do together fails here, before the run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            svi.loss_and_grads(svi.model, svi.guide, **data)
        except Exception as exc:
            raise UsageError(
                f"model {names['model']!r}, guide {names['guide']!r} and loss "
                f"{names['loss']!r} do not work together: {one_line(exc)}"
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


def log_params(writer: Any, step: int, optim: Any) -> None:
    """Each parameter of the param store, as a scalar or (for a tensor) a histogram, and the
    learning rate each parameter's optimizer uses now."""
    store = pyro.get_param_store()
    for name, value in store.items():
        value = value.detach()
        if value.numel() == 1:
            writer.add_scalar(f"Params/{name}", value.item(), step)
        else:
            writer.add_histogram(f"Params/{name}", value.cpu().numpy(), step)
    for param, optimizer in getattr(optim, "optim_objs", {}).items():
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a scheduler wraps one
        groups = getattr(optimizer, "param_groups", None)
        if groups and "lr" in groups[0]:
            writer.add_scalar(f"LR/{store.param_name(param)}", float(groups[0]["lr"]), step)


def write_results(run_dir: Path, summary: dict, params: bool = True) -> None:
    """summary.json and (unless they went bad) the learned parameters, each written whole or
    not at all."""
    _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=repr).encode())
    if params:
        tmp = run_dir / "params.pt.tmp"
        pyro.get_param_store().save(str(tmp))
        os.replace(tmp, run_dir / "params.pt")


def _write_atomic(path: Path, content: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


@contextlib.contextmanager
def _deferred_interrupt():
    """Ctrl-C sets a flag that the loop reads after each step, so no step is left half done;
    a second Ctrl-C interrupts at once."""
    pressed = []

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def on_device(device: torch.device):
    """Make new tensors on the run's device, so plugins never name it."""
    if device.type == "cpu":
        yield
    else:
        with device:
            yield
