"""Setting a run up, in named phases: the device, the data, the guide, the loss, the
parameters, the optimizer, the evaluation. Each phase checks what can go wrong because of
the recipe (a data key the model does not take, a guide that cannot fit the model), so a
misfit is a UsageError before the run directory is written. ``Run.setup`` calls them in
order and builds the ``Run`` from what they return.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI

from workbench.data.minibatch import Minibatch
from workbench.data.sources import Rows
from workbench.device import DTYPES, pick_device, rng_devices
from workbench.distributed import World
from workbench.errors import UsageError, one_line
from workbench.plugins.build import build
from workbench.plugins.registry import Registry
from workbench.report import broadcast, posterior
from workbench.train.optim import make_optimizers
from workbench.train.tensors import check_support, load_data, shard


@dataclass
class Loaded:
    """The data as the model takes it, and the model traced once on it."""

    values: dict
    origin: Any  # where each value came from, for the support check's messages
    trace: poutine.Trace
    total: int | None  # where this rank holds only its rows: how many the data has


def names(recipe: dict) -> dict[str, str]:
    """The model's, guide's and loss's names, for messages."""
    return {kind: recipe[kind]["name"] for kind in ("model", "guide", "loss")}


def setup_device(recipe: dict, world: World) -> tuple[torch.device, torch.dtype]:
    """The run's device and dtype, and Pyro's parameter store and seed made fresh."""
    device = pick_device(recipe["device"], world)
    pyro.clear_param_store()
    pyro.set_rng_seed(recipe["seed"])
    return device, DTYPES[recipe.get("dtype", "float32")]


def setup_data(registry: Registry, recipe: dict, model: Any, device: torch.device,
               world: World) -> Loaded:
    """The recipe's data on the device, checked against the model's signature and its
    likelihood's support. Under torchrun a rank other than 0 reads only its rows where the
    data allow; rank 0 reads the whole data, for the report."""
    name = recipe["model"]["name"]
    rows = Rows(world.rank, world.size) if world.distributed and not world.leader else None
    data, origin = load_data(registry, recipe["data"], model, name, device, rows)
    trace = trace_model(model, data, name)
    if rows is not None and rows.total is not None and not Minibatch.fits_rows(
            trace, recipe["train"], world, rows.total):
        rows = None
        data, origin = load_data(registry, recipe["data"], model, name, device)
        trace = trace_model(model, data, name)
    check_support(trace, data, origin)
    return Loaded(data, origin, trace, rows.total if rows is not None else None)


def setup_guide(registry: Registry, recipe: dict, model: Any, device: torch.device) -> Any:
    """The recipe's guide, made for the model."""
    return build(registry, "guide", recipe["guide"], model=model, device=device)


def setup_loss(registry: Registry, recipe: dict, model: Any, loaded: Loaded,
               device: torch.device, world: World) -> tuple[Any, Any, list[str]]:
    """The recipe's loss and the model it steps, fitted to how the model broadcasts (with
    notes saying how), checked to fit one step in the device's memory."""
    loss = build(registry, "loss", recipe["loss"], device=device)
    way = broadcast.verdict(model, loaded.values, posterior.plate_nesting(loaded.trace),
                            loaded.trace)
    whole = (recipe["train"].get("batch_size") is None and not world.distributed)
    stepped, notes = fit_particles(loss, way, names(recipe), model, loaded.trace, whole)
    check_step_memory(loaded.trace, loss, device)
    return loss, stepped, notes


def setup_params(svi: SVI, data: dict, recipe: dict, model: Any, guide: Any,
                 minibatch: Minibatch) -> list[str]:
    """The guide's parameters, made by one step's loss and gradient, then started where the
    guide starts them itself (``initialise``); returns the guide's notes."""
    minibatch.resample()
    try_once(svi, data, names(recipe), model)
    if not hasattr(guide, "initialise"):
        return []
    try:
        return list(guide.initialise(**data) or [])
    except Exception as exc:
        raise UsageError(f"guide {names(recipe)['guide']!r}: {one_line(exc)}") from exc


def setup_optimizer(svi: SVI, optim_args: Any, recipe: dict) -> None:
    """The optimizer of every parameter, made now, with its per-parameter settings checked
    against the parameters' names."""
    store = pyro.get_param_store()
    params = [param for _, param in store.named_parameters()]
    for param in params:
        param.grad = None
    optim_args.check(list(store.keys()))
    try:
        make_optimizers(svi.optim, params)
    except Exception as exc:
        raise UsageError(
            f"optimizer {recipe['optimizer']['name']!r}: {one_line(exc)}") from exc


def setup_evaluation(svi: SVI, data: dict, minibatch: Minibatch, device: torch.device,
                     recipe: dict) -> tuple[bool, list[str]]:
    """Whether the loss has a gradient-free estimate for Eval/loss (tried once, on its own
    random stream), and a note where it has none."""
    if recipe["train"]["eval_every"] <= 0:
        return False, []
    try:
        with torch.random.fork_rng(devices=rng_devices(device)):
            minibatch.resample()
            svi.evaluate_loss(**data)
    except NotImplementedError:
        return False, [f"loss {names(recipe)['loss']!r} has no gradient-free estimate, so "
                       "Eval/loss is not logged"]
    return True, []


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


def fit_particles(loss: Any, way: broadcast.Verdict, names: dict[str, str], model: Any,
                  trace: poutine.Trace, whole: bool) -> tuple[Any, list[str]]:
    """The model the loss steps, and the notes, where the model does not broadcast over a
    leading dimension (``way``): a loss's vectorised particles run the model vmapped per
    particle where vmap applies and each step sees the ``whole`` data in one process
    (``broadcast.particles_vmapped``), else one after another; the notes say so, where the
    model failed, and what it costs (the report's cost too)."""
    if way.broadcasts:
        return model, []
    cost = way.report_cost(posterior.NUM_IS_DRAWS)
    particles = getattr(loss, "num_particles", 1)
    if not getattr(loss, "vectorize_particles", False) or particles <= 1:
        return model, [way.line(names["model"]), cost]
    from pyro.infer import TraceEnum_ELBO, TraceTailAdaptive_ELBO

    if isinstance(loss, TraceTailAdaptive_ELBO):
        raise UsageError(f"loss {names['loss']!r} needs particles evaluated at once, and "
                         f"{way.line(names['model'])}; make the model broadcast "
                         "(docs: Your own model) or use another loss")
    if way.method == broadcast.VMAP and whole and not isinstance(loss, TraceEnum_ELBO):
        if loss.max_plate_nesting == float("inf"):  # the adapter hides the model's plates
            loss.max_plate_nesting = way.nesting + 1
        return (broadcast.particles_vmapped(model, trace, loss.max_plate_nesting - 1,
                                            particles),
                [way.line(names["model"]), f"its {particles} particles run at once with "
                 f"torch.func.vmap, one particle's model batched; {cost}"])
    loss.vectorize_particles = False
    return model, [way.line(names["model"]), f"its {particles} particles run one after "
                   f"another (about {particles}x the step's time); {cost}"]


# The bytes a vectorised step holds at its peak, in copies of the model trace's numbers per
# particle: values, densities, gradients, the guide's copy of each, autograd's saved
# intermediates, and (iwae, renyi_elbo) the per-particle weights: the highest peak resident
# memory of real steps (benchmarks/README.md), 10 copies, and a fifth more for the allocator.
STEP_COPIES = 12


def check_step_memory(trace: poutine.Trace, loss: Any, device: torch.device) -> None:
    """Refuse a loss whose vectorised particles would need more memory in one step than the
    device has: a huge ``num_particles`` is a typo, not a run."""
    particles = getattr(loss, "num_particles", 1)
    if not getattr(loss, "vectorize_particles", False) or particles <= 1:
        return
    numbers = sum(site["value"].numel() for site in trace.nodes.values()
                  if site["type"] in ("sample", "param") and torch.is_tensor(site["value"]))
    need = STEP_COPIES * numbers * particles * torch.get_default_dtype().itemsize
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


