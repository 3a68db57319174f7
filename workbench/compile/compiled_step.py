"""A compiled SVI step: loss, gradients and (for Adam) the update, traced once and replayed.

The step is traced once through Pyro with ``make_fx`` into a graph of plain torch operations
(random draws included, so each replay draws afresh from torch's generator), checked against
Pyro's own eager step, and compiled with TorchInductor. Anything that would make the replay
differ from the eager step refuses to trace or fails the checks, and the run stays eager:
data-dependent control flow (a value read in Python that depends on a parameter or a random
draw; one read from the data alone is kept as a constant), enumeration, minibatches (new
indices each step), several processes, a trace whose structure changes between steps, or a
gradient that is not the eager one. ``train.compile: auto`` then notes why in one line,
``true`` stops with that line, ``false`` never tries. On the CPU a step compiled by an earlier
run is found by a record of its operations (``package_cache``) and loaded, with no tracing;
where none is, ``auto`` compiles only where the eager steps would cost more than a first
compile, else trains eagerly and compiles the step for later runs in the background
(``background``).

The optimizer's state stays in Pyro's optimizers (the update writes it in place), so
checkpoints are the eager ones and a run resumes with or without compiling.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine

from workbench import environment, progress, seams
from workbench.compile import background, package_cache, rolling
from workbench.errors import UsageError, one_line
from workbench.rundir import files

# the code that wraps, rewrites, compiles and packages a step: part of a packaged step's key,
# so that any change to it (AOTInductor's settings included) makes new packages
_SOURCE = hashlib.sha256(Path(__file__).read_bytes() + Path(package_cache.__file__).read_bytes()
                         ).hexdigest()

# what an eager step costs per torch operation, by device type (on the CPU here 7.6-9.7 us
# for the coin's and six hard posteriors' steps, Pyro's handlers included; 5.8 ms for the
# coin's 236 on an H100, where each operation is a kernel launch and a Python dispatch)
EAGER_OP_SECONDS = {"cpu": 9e-6, "cuda": 2.5e-5}
# auto compiles where the eager steps would take longer than compiling costs: on an H100 the
# coin's compiled run spent 6.3 s more outside its loop than an eager one. On the CPU a step
# is compiled once into a package: a package is looked up where the eager steps would take
# more than LOAD_SECONDS (loading one, its key recorded, takes 0.05-0.1 s), and built where
# they would take more than PAYS_SECONDS (by a child for later runs, where a first compile
# costs more than they do)
PAYS_SECONDS = {"cpu": 2.0, "cuda": 6.0}
LOAD_SECONDS = 0.3
# what a CPU step's first compile costs where no package of it is cached (tracing, checking,
# export, inductor's lowering, the C++ compiler): COLD_SECONDS plus COLD_OP_SECONDS for each
# torch operation of the step; benchmarks/README.md ("A new model's first run") has the
# measurements
COLD_SECONDS = 10.0
COLD_OP_SECONDS = 0.03
# meanwhile (no package yet, a first compile dearer than the eager steps) the traced step is
# replayed uncompiled where that pays for tracing it: a replay takes about REPLAY_SHARE of an
# eager step (no Pyro in it), tracing and checking about TRACE_SECONDS plus TRACE_OP_SECONDS
# an operation (benchmarks/README.md, "A new model's first run, traced", and "Tracing with
# one fake mode": 0.4-0.7 ms an operation traced once)
REPLAY_SHARE = 0.5
TRACE_SECONDS = 0.8
TRACE_OP_SECONDS = 0.0005
# auto compiles a step of at most this many torch operations: compiling costs grow with the
# count (a loop the trace unrolls runs tens of thousands), so a longer step stays eager,
# decided from the count before anything is traced; benchmarks/README.md ("Loops") has the
# costs measured and the counts of the shipped models and ports
MAX_OPS = 4000
MAX_OPS_ENV = "VIBENCH_COMPILE_MAX_OPS"
# a longer step is traced and its repeated blocks rolled (workbench/compile/rolling.py) where
# that pays: the rolled step takes about ROLLED_SHARE of an eager one, and compiling its
# blocks about ROLL_SECONDS beside the tracing (benchmarks/README.md, "Loops rolled")
ROLLED_SHARE = 0.2
ROLL_SECONDS = 30.0
# the last rolled step this process made, {key: (graph, note)}, for the next run of the same
# structure (the pipeline's next fit): its graph takes the parameters as inputs
_LAST_ROLLED: dict[str, tuple[Any, str]] = {}
# the checked traced graphs this process replays uncompiled, by their package's key: a
# pipeline's later fits of the same step replay the first's (its parameters are inputs)
_TRACED: dict[str, torch.fx.GraphModule] = {}
# a rolled block whose inputs are this small (a turn's few numbers a particle) is compiled to
# scalar loops: vector code's set-up and tails cost more than they save on a few numbers
# (benchmarks/README.md, "Loops rolled, round 3"); a whole step's larger tensors keep it
SCALAR_UP_TO = 1024


class CannotCompile(Exception):
    """Why this run's step cannot be compiled, in one line."""


class NotYet(CannotCompile):
    """``auto``: no package of this step is cached, and a first compile would cost more than
    the eager steps; ``key`` is the package's, to compile it for later runs, and ``ops`` and
    ``eager`` the step's operations and the eager steps' estimated seconds."""

    def __init__(self, why: str, key: str, ops: int = 0, eager: float = 0.0):
        super().__init__(why)
        self.key, self.ops, self.eager = key, ops, eager


class CompiledStep:
    """One training step, compiled: call it for ``(loss, bad)`` as ``Run.step`` gives them (a
    bad step, with a non-finite loss or gradient, is not applied)."""

    def __init__(self, run: Callable, params: list[torch.Tensor], inputs: list[torch.Tensor],
                 optim: Any, update: _AdamUpdate | None, names: list[str],
                 compiled: bool = True):
        self._run = run
        self.compiled = compiled  # False: the traced graph replayed uncompiled (``fx``)
        self._update = update
        self.params = params
        self._inputs = inputs
        self._optim = optim
        self.updates = update is not None  # the graph applies the optimizer's update itself
        # how the optimizer steps after the graph where it does not update: Pyro's own step,
        # unless the runner gives its own (workbench/train/optim.py ``step_optimizers``)
        self.step_optimizers: Callable[[list[torch.Tensor]], None] = optim
        self._names = names
        self.note: str | None = None  # how it was compiled, where the run should say so

    def __call__(self) -> tuple[float, str]:
        if self._update is not None:
            self._update.refresh()
        with torch.no_grad(), _no_collections():
            head, finite, *grads = self._run(self._inputs)
        value, ok = head.tolist()  # one read of the device per step: loss and whether applied
        if not ok:
            if not math.isfinite(value):
                return value, f"the loss is {value}"
            bad = [name for name, good in zip(self._names, finite.tolist()) if not good]
            return value, f"the gradient of {', '.join(sorted(bad))} is not finite"
        if not self.updates:
            for param, grad in zip(self.params, grads):
                param.grad = grad
            self.step_optimizers(self.params)
            for param in self.params:
                param.grad = None
        return value, ""

    def adopt_optimizer(self, optim: Any = None) -> None:
        """After the optimizers were made afresh (a resume), or to step with ``optim`` (Pyro's,
        its optimizers made) from now on: move their state into the tensors the compiled
        update writes, and give them those tensors back."""
        if optim is not None:
            self._optim = optim
        if self._update is not None:
            self._update.adopt(self._optim.optim_objs, self.params)


@contextlib.contextmanager
def _no_collections() -> Iterator[None]:
    """The garbage collector off for one step: a rolled step makes thousands of tensors that
    live through the collector's young passes and die by reference counting at its end;
    counted as long-lived, they set off a full pass over the whole process every second or
    so (0.2 s each on an RK4 loop). No cycle is made in a step's graph."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def prepare(setting: str | bool, svi: Any, data: dict, device: torch.device, steps: int,
            minibatch: bool = False, processes: int = 1, recipe: dict | None = None,
            cached_only: bool = False) -> tuple[CompiledStep | None, list[str]]:
    """The compiled step for ``svi`` on ``data`` as ``train.compile`` asks, or None and the
    notes saying why not (none for ``false``, nor where ``auto`` finds ``steps`` too few to
    pay for compiling). Under ``true`` a step that cannot compile is a UsageError;
    ``minibatch`` (new indices each step) and several ``processes`` cannot. Where ``auto``
    leaves a step eager until it is cached, a child compiles it from ``recipe`` (resolved),
    if given. ``cached_only``: ``auto`` never compiles a whole step in this process (a
    pipeline's fit), only loads a CPU step's package, and off the CPU trains eagerly; a step
    too long to compile whole is still rolled where that pays for ``steps`` (every fit that
    shares it: the later ones take the first's rolled graph), and one with no package yet is
    replayed traced where that pays for ``steps`` (the later fits replay the first's trace)."""
    mode = {True: "true", False: "false"}.get(setting, setting)  # YAML's true/false are bools
    if mode == "false":
        return None, []
    bound = max_ops()
    try:
        if type(getattr(svi.loss_and_grads, "__self__", None)).__name__.startswith("Jit"):
            raise CannotCompile("the loss is Pyro's JIT ELBO already (loss.jit: true)")
        refusal = None
        if minibatch:
            refusal = "a minibatch (train.batch_size) draws new indices each step"
        elif processes > 1:
            refusal = f"training on {processes} processes"
        elif mode == "auto" and device.type not in ("cpu", "cuda"):
            refusal = (f"compiled steps are checked against the exact posterior on the CPU "
                       f"and CUDA only, not yet on {device.type} (train.compile: true uses "
                       f"them)")
        try:  # inductor's cache and ours hold compiled code this process will load
            package_cache.check_folders()
        except files.UnsafeFile as exc:
            raise CannotCompile(str(exc)) from None
        auto = mode == "auto"
        step = compile_step(svi, data, steps if auto else None, refusal=refusal,
                            max_ops=bound, refuse_above=auto, cached_only=auto and cached_only)
        return step, [step.note] if step is not None and step.note else []
    except NotYet as exc:
        later = background.start(recipe, exc.key) if recipe is not None else None
        later_notes = [later] if later else []
        if _replay_pays(exc.ops, exc.eager):  # exc.eager: every fit's, for a pipeline's
            replayed = _replayed(svi, data, exc.key)
            if replayed is not None:
                return replayed, [f"training on the traced step, replayed uncompiled: {exc}",
                                  *later_notes]
        return None, [f"training eagerly, not compiled: {exc}", *later_notes]
    except CannotCompile as exc:
        if mode == "true":
            raise UsageError(f"train.compile: true, but this step cannot be compiled: {exc}")\
                from None
        return None, [f"training eagerly, not compiled: {exc}"]
    except Exception as exc:  # tracing broke (a JIT loss, say): eager is still right
        if mode == "true":
            raise UsageError(f"train.compile: true, but tracing the step failed: "
                             f"{one_line(exc)}") from None
        return None, [f"training eagerly, not compiled: tracing the step failed: "
                      f"{one_line(exc)}"]
    finally:  # no gradient of the trial steps may reach the first real step
        for _, param in pyro.get_param_store().named_parameters():
            param.grad = None


def compile_step(svi: Any, data: dict, steps: int | None = None, backend: str = "inductor",
                 refusal: str | None = None, max_ops: int = MAX_OPS,
                 refuse_above: bool = False, cached_only: bool = False,
                 traced_key: str | None = None) -> CompiledStep | None:
    """Trace, check and compile one step of ``svi`` (whose parameters and optimizers exist).
    Given ``steps``, None where so few eager steps would cost less than loading a compiled
    step, and NotYet where no package of it is cached and they cost less than compiling it:
    the estimates count the step's torch operations, so a resumed run decides as the first
    did (unless the package has been cached since). ``backend="fx"`` replays the traced
    graph uncompiled (the same random draws as eager).
    ``refusal``: the caller's reason not to compile, raised only where compiling would pay.
    A step of more than ``max_ops`` operations is refused before tracing where
    ``refuse_above``, else compiled with a warning that it may take long (or, where
    ``refuse_above``, rolled where that pays: ``_rolled``). ``cached_only``: a CPU step is
    loaded from its package or NotYet, never compiled whole here; on another device None.
    ``traced_key``: the package's key of a step replayed uncompiled, whose checked trace is
    kept for the process's later steps of that key (a pipeline's later fits)."""
    params, ops = _probe(svi, data)
    device = params[0].device if params else torch.device("cpu")
    per_op = EAGER_OP_SECONDS.get(device.type, EAGER_OP_SECONDS["cpu"])
    pays = PAYS_SECONDS.get(device.type, PAYS_SECONDS["cpu"])
    eager = None if steps is None else steps * ops * per_op
    packages = device.type == "cpu" and backend == "inductor"  # a CPU step runs from one
    if (eager is not None and eager < (LOAD_SECONDS if packages else pays)) or \
            (cached_only and device.type != "cpu"):
        return None
    _check_compilable(svi, params, refusal)
    long = ops > max_ops
    too_long = CannotCompile(f"one step runs {ops} torch operations (a loop unrolled?), above "
                             f"the {max_ops} that train.compile: auto compiles "
                             f"({MAX_OPS_ENV} sets it; train.compile: true compiles anyway)")
    roll = long and refuse_above
    if roll and (eager is None or backend != "inductor" or
                 eager * (1 - ROLLED_SHARE) < TRACE_SECONDS + TRACE_OP_SECONDS * ops
                 + ROLL_SECONDS):
        raise too_long
    store = pyro.get_param_store()
    names = [store.param_name(p) or "?" for p in params]
    # the data's tensors are inputs of the graph, not constants (which inductor would fold
    # and hash, at a cost growing with the data); single numbers stay constants, so a model
    # may read a size or a flag given as data in Python (they never change between steps).
    # The guide's buffers are inputs too (a whitened Gaussian's fixed map, which each fit of
    # a pipeline sets to its own start): one package serves every start
    feeds = [value for value in data.values() if torch.is_tensor(value) and value.numel() > 1]
    fixed = range(len(params), len(params) + len(feeds))  # the data's: a value read is fixed
    feeds += _buffers(svi.guide)
    loss_and_grads = _loss_and_grads(svi, data, params)
    if roll:
        return _rolled(loss_and_grads, svi, data, params, feeds, names, fixed, ops, max_ops,
                       device, too_long)
    key = None
    if packages:
        packaged, key = _packaged(loss_and_grads, svi.optim, params, feeds, names)
        if packaged is not None:
            return packaged
        if eager is not None and eager < pays:  # too few steps to build a package for
            return None
        if eager is not None and key is not None:
            _first_compile_pays(ops, steps, eager, key)
        if cached_only and key is None:
            raise CannotCompile("the trace's structure changes from step to step")
        if cached_only:
            raise NotYet(f"no compiled package of this step ({ops} operations) is cached yet, "
                         "and a pipeline's fits compile none themselves", key)
    probing = contextlib.nullcontext()
    if packages and not _vector_isa_known():
        probing = seams.vector_isa_probed_beside()  # inductor asks only once it generates code
    saying = _saying(ops, max_ops) if backend == "inductor" else contextlib.nullcontext()
    with saying, probing:
        graph = _TRACED.get(traced_key) if traced_key is not None else None
        if graph is None:  # a key means _packaged's two records agreed already
            graph = _checked_graph(loss_and_grads, svi, data, params, feeds, device, fixed,
                                   recorded=key is not None)
        if traced_key is not None and backend == "fx":
            _TRACED[traced_key] = graph
        update = _adam_update(svi.optim, params)
        states = update.tensors if update else []
        inputs = [t.detach() for t in (*params, *states, *feeds)]  # the same storage
        replay = _compiled(_step_function(graph, _finishing(update), len(params),
                                          len(params) + len(states)),
                           inputs, len(params) + len(states), device, backend, key)
    return CompiledStep(replay, params, inputs, svi.optim, update, names,
                        compiled=backend != "fx")


def _rolled(loss_and_grads: Callable, svi: Any, data: dict, params: list[torch.Tensor],
            feeds: list[torch.Tensor], names: list[str], fixed: range, ops: int, max_ops: int,
            device: torch.device, too_long: CannotCompile) -> CompiledStep:
    """A step too long to compile whole, traced, checked, and its repeated blocks (a loop the
    trace unrolled) compiled once each (``rolling``); ``too_long`` where what is left outside
    the blocks is still above ``max_ops`` operations. Not packaged: each process compiles it
    (inductor's own cache keeps the blocks' code), once for every run of the same structure
    (``_LAST_ROLLED``: a pipeline's fits after the first check it against eager and go)."""
    # the guide's buffers themselves, as the step reads them: copies would record each fit's
    # start as a constant
    steady = package_cache.steady_record(loss_and_grads, [*params, *feeds])
    key = None if steady is None else \
        package_cache.key(steady, [*params, *feeds], len(params), "rolled", _SOURCE)
    inputs = [t.detach() for t in (*params, *feeds)]
    held = _LAST_ROLLED.get(key) if key is not None else None
    if held is not None:
        graph, note = held
        _check_against_eager(svi, data, params, feeds, graph)
    else:
        _LAST_ROLLED.clear()  # one at a time: a rolled step holds the blocks' example values
        with progress.working(f"compiling the step's repeated blocks ({ops} operations, a "
                              "loop unrolled): tracing it takes about "
                              f"{TRACE_SECONDS + TRACE_OP_SECONDS * ops:.0f} s",
                              "compiled the step's repeated blocks in {seconds:.1f} s"):
            traced = _checked_graph(loss_and_grads, svi, data, params, feeds, device, fixed,
                                    recorded=key is not None)
            with package_cache.trial_stream(), torch.no_grad():
                rolled = rolling.roll(traced, inputs, _compiled_body)
            del traced  # left for the collection below: rolled holds a fresh copy
            if rolled is None or rolled.left > max_ops:
                raise too_long
            _check_against_eager(svi, data, params, feeds, rolled.graph)
        graph, note = rolled.graph, rolled.describe(ops)
        if key is not None:
            _LAST_ROLLED[key] = (graph, note)
    update = _adam_update(svi.optim, params)  # compiled apart, after the graph
    states = update.tensors if update else []
    mutable = len(params) + len(states)
    values = [t.detach() for t in (*params, *states, *feeds)]
    with package_cache.trial_stream(), torch.no_grad():  # its draws leave the run's stream
        outs = list(graph(*params, *feeds))
    finish = _compiled_finishing(update, values, len(params), mutable, outs, device)
    step = _step_function(graph, finish, len(params), mutable)
    compiled = CompiledStep(lambda values: step(*values), params, values, svi.optim, update,
                            names)
    compiled.note = note
    gc.collect()  # the trace's millions of objects, freed in the set-up, not in training
    return compiled


def _compiled_body(block: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable:
    """One repeated block compiled by inductor, for inputs laid out as ``inputs``."""
    try:
        cpu = all(t.device.type == "cpu" for t in inputs)
        with _inductor_settings(cpu, scalar=cpu and all(t.numel() <= SCALAR_UP_TO
                                                        for t in inputs)):
            compiled = torch._inductor.standalone_compile(block, inputs,
                                                          dynamic_shapes="from_example_inputs")
    except Exception as exc:
        raise CannotCompile(f"torch.compile failed on a repeated block: {one_line(exc)}") \
            from exc
    return _bare(compiled, inputs)


def _bare(compiled: Callable, inputs: list[torch.Tensor]) -> Callable:
    """A compiled block's own code, called without AOTAutograd's wrappers around it (a few
    microseconds a call, where a rolled step makes tens of calls), where on ``inputs`` it
    gives what the wrapped block gives, bit for bit; else the wrapped block. The wrappers
    rebuild outputs that are views of inputs for autograd, which the rolled graph, run
    without gradients, does not need."""
    code = getattr(getattr(compiled, "_compiled_fn", None), "current_callable", None)
    if code is None:
        return compiled
    with torch.no_grad():
        wanted, got = compiled(*inputs), code(list(inputs))
    if not isinstance(got, (list, tuple)) or len(got) != len(wanted) or not all(
            torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape
            and a.stride() == b.stride() and a.dtype == b.dtype and torch.equal(a, b)
            for a, b in zip(wanted, got)):
        return compiled
    return lambda *args: code(list(args))


def _replay_pays(ops: int, eager: float) -> bool:
    """Whether replaying a step of ``ops`` operations uncompiled saves more of the ``eager``
    steps' seconds than tracing and checking it costs."""
    return eager * (1 - REPLAY_SHARE) > TRACE_SECONDS + TRACE_OP_SECONDS * ops


def _replayed(svi: Any, data: dict, key: str | None) -> CompiledStep | None:
    """The step traced, checked against eager and replayed uncompiled (traced once a process
    for its package's ``key``); None where it cannot be (the run trains eagerly)."""
    try:
        return compile_step(svi, data, backend="fx", traced_key=key)
    except Exception:  # whatever refuses to trace refuses to compile too: eager is right
        return None
    finally:  # no gradient of the trial steps may reach the first real step
        for _, param in pyro.get_param_store().named_parameters():
            param.grad = None


def _buffers(guide: Any) -> list[torch.Tensor]:
    """The guide's floating-point buffers (none where it is no module)."""
    if not isinstance(guide, torch.nn.Module):
        return []
    return [buffer for buffer in guide.buffers() if buffer.is_floating_point()]


def _first_compile_pays(ops: int, steps: int, eager: float, key: str) -> None:
    """NotYet where ``steps`` eager steps (``eager`` seconds) cost less than a first compile of
    a step of ``ops`` operations, whose package is ``key``."""
    cold = COLD_SECONDS + COLD_OP_SECONDS * ops
    if eager < cold:
        raise NotYet(f"a first compile of this step ({ops} operations) takes about {cold:.0f} s, "
                     f"more than its {steps} eager steps (about {eager:.0f} s)", key, ops, eager)


def _saying(ops: int, max_ops: int) -> contextlib.AbstractContextManager:
    """The line (a spinner on a terminal) over a compile, silent for tens of seconds."""
    takes = (f"above the {max_ops} auto compiles, it may take many minutes and GBs of "
             "memory" if ops > max_ops else "a model's first compile usually takes 20-60 s")
    return progress.working(
        f"compiling the step ({ops} operations): {takes}; later runs of it load it from "
        "the cache",
        f"compiled the step ({ops} operations) in {{seconds:.1f}} s; later runs of it "
        "load it from the cache")


def max_ops() -> int:
    """The most torch operations a step may run for ``auto`` to compile it: MAX_OPS, or
    VIBENCH_COMPILE_MAX_OPS; a value that is not a whole number >= 0 is a UsageError."""
    return environment.count(MAX_OPS_ENV, MAX_OPS, "operations")


def _probe(svi: Any, data: dict) -> tuple[list[torch.Tensor], int]:
    """One eager step on a forked random stream, its gradients dropped: the parameters it
    touches (unconstrained) and how many torch operations it runs."""
    with poutine.trace(param_only=True) as capture, torch.random.fork_rng(), \
            seams.Counting() as counted:
        svi.loss_and_grads(svi.model, svi.guide, **data)
    params = list({id(p): p for p in (site["value"].unconstrained()
                                      for site in capture.trace.nodes.values())}.values())
    for param in params:  # that step's gradients must not reach the first real one
        param.grad = None
    return params, counted.ops


def _check_compilable(svi: Any, params: list[torch.Tensor], refusal: str | None) -> None:
    """Refuse (CannotCompile) what a traced graph cannot replay, or the caller's reason."""
    if refusal:
        raise CannotCompile(refusal)
    elbo = getattr(svi.loss_and_grads, "__self__", None)
    if any("Enum" in cls.__name__ for cls in type(elbo).__mro__):
        raise CannotCompile("the loss enumerates discrete sites")
    if not params:
        raise CannotCompile("the guide has no parameters")


def _loss_and_grads(svi: Any, data: dict, params: list[torch.Tensor]) -> Callable:
    """The step to trace: the loss and each parameter's gradient, as plain tensors."""

    def loss_and_grads(*values: torch.Tensor) -> tuple:  # values: parameters, data (as traced)
        for param in params:
            param.grad = None
        with _traceable():
            value = svi.loss_and_grads(svi.model, svi.guide, **data)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for param in params:
            param.grad = None
        return (torch.as_tensor(value, dtype=params[0].dtype), *grads)

    return loss_and_grads


def _checked_graph(loss_and_grads: Callable, svi: Any, data: dict, params: list[torch.Tensor],
                   feeds: list[torch.Tensor], device: torch.device, fixed: range,
                   recorded: bool = False) -> torch.fx.GraphModule:
    """The step traced, its whole-data gathers dropped, checked against Pyro's eager step,
    its long sums split where that pays. A value read in Python from the inputs at ``fixed``
    (the data's) alone is kept as a constant; one read from anything else is a CannotCompile
    of the trace, and the step recorded on two random streams must run the same operations
    (``package_cache.record``: a twentieth of a trace's time), unless the caller's two
    records agreed already (``recorded``)."""
    inputs = [*params, *feeds]
    graph = _trace(loss_and_grads, inputs, fixed=fixed)
    if not recorded and package_cache.steady_record(loss_and_grads, inputs) is None:
        raise CannotCompile("the trace's structure changes from step to step")
    _drop_whole_gathers(graph)
    _check_against_eager(svi, data, params, feeds, graph)
    if _sums_in_two_stages(device):  # after the check, like inductor's own reordering of sums
        _split_long_sums(graph)
    return graph


def _step_function(graph: Callable, finish: Callable, at: int, mutable: int) -> Callable:
    """The whole step on its inputs (parameters ``[:at]``, optimizer state ``[at:mutable]``,
    data): the loss and gradients of ``graph``, then ``finish`` (``_finishing``: whether they
    are finite, and the update applied in place where they are)."""

    def step(*values: torch.Tensor) -> tuple:  # values: parameters, optimizer state, data
        loss_value, *grads = graph(*values[:at], *values[mutable:])
        return finish(loss_value, grads, values[:at], values[at:mutable])

    return step


def _finishing(update: _AdamUpdate | None) -> Callable:
    """What a step does after its loss and gradients: the loss and whether every number is
    finite (``head``), which gradients are (``finite``), and ``update`` applied in place where
    all are (without one, the gradients returned for the optimizer)."""

    def finish(loss_value: torch.Tensor, grads: list[torch.Tensor],
               params: tuple[torch.Tensor, ...], states: tuple[torch.Tensor, ...]) -> tuple:
        finite = torch.stack([torch.isfinite(g).all() for g in grads])
        ok = torch.isfinite(loss_value) & finite.all()
        head = torch.stack([loss_value.reshape(()), ok.to(loss_value.dtype)])
        if update is not None:
            update(ok, grads, params, states)
            return head, finite
        return (head, finite, *grads)

    return finish


def _compiled_finishing(update: _AdamUpdate | None, values: list[torch.Tensor], at: int,
                        mutable: int, outs: list[torch.Tensor], device: torch.device
                        ) -> Callable:
    """``_finishing(update)`` compiled for a step whose graph is called in parts (a rolled
    loop's): one call instead of a few operations per parameter, run eagerly. ``values`` are
    the step's inputs, ``outs`` its graph's loss and gradients. On a GPU it stays eager: a
    CUDA graph would replay the first step's gradients."""
    finish = _finishing(update)
    if device.type != "cpu":
        return finish

    def flat(*args: torch.Tensor) -> tuple:  # parameters, optimizer state, loss, gradients
        return finish(args[mutable], list(args[mutable + 1:]), args[:at], args[at:mutable])

    run = _compiled(flat, [*values[:mutable], *outs], mutable, device, "inductor", None)
    return lambda loss_value, grads, params, states: run([*params, *states, loss_value,
                                                          *grads])


def _compiled(step: Callable, inputs: list[torch.Tensor], mutable: int,
              device: torch.device, backend: str, key: str | None) -> Callable:
    """``step`` traced into plain operations and compiled: packaged under ``key`` (a CPU
    step), else by inductor, replayed as a CUDA graph on a GPU; ``backend="fx"`` replays the
    traced graph uncompiled. Tracing runs the step on copies, on a forked random stream."""
    try:
        with package_cache.trial_stream(), torch.no_grad():
            stepper = _make_fx(step, _copies(inputs, mutable))
            if backend == "fx":
                return lambda values: stepper(*values)
            with _inductor_settings(device.type == "cpu"):
                replay = (package_cache.build(stepper, _copies(inputs, mutable), key)
                          if key else None)
                if replay is None:  # reads inductor's cache, if it can
                    run = torch._inductor.standalone_compile(
                        stepper, _copies(inputs, mutable), dynamic_shapes="from_example_inputs")
                    replay = _unwrap(run)
    except Exception as exc:
        raise CannotCompile(f"torch.compile failed: {one_line(exc)}") from exc
    if device.type == "cuda":  # captured outside the forked stream: its draws advance the run's
        try:
            with torch.no_grad():
                replay = _cuda_graph(run, inputs, mutable)
        except Exception as exc:
            raise CannotCompile(f"capturing the step as a CUDA graph failed: "
                                f"{one_line(exc)}") from exc
    return replay


def _packaged(loss_and_grads: Callable, optim: Any, params: list[torch.Tensor],
              feeds: list[torch.Tensor], names: list[str]
              ) -> tuple[CompiledStep | None, str | None]:
    """The step from its package where a run before this one built it, else None; and the
    key to build it under. The step is recorded twice, on two random streams, not traced:
    where the records differ there is no key, and the traces' checks say why. A package is
    built only from a graph that passed the check against eager, for the same record."""
    first = package_cache.steady_record(loss_and_grads, [*params, *feeds])
    if first is None:
        return None, None
    update = _adam_update(optim, params)
    settings = [(group["betas"], group["eps"], group["weight_decay"])
                for group in update.settings] if update else None  # the rate is an input
    inputs = [t.detach() for t in (*params, *(update.tensors if update else []), *feeds)]
    key = package_cache.key(first, inputs, len(params), settings, _SOURCE)
    replay = package_cache.load(key)
    return (None if replay is None else
            CompiledStep(replay, params, inputs, optim, update, names)), key


@contextlib.contextmanager
def _inductor_settings(cpu: bool, scalar: bool = False) -> Iterator[None]:
    """Inductor's settings for every compile here: no worker processes; no per-call checks
    of the inputs' sizes and strides (a step is always given the same tensors); on a CPU
    whose vector instruction sets an earlier run found usable, no probe of them, else what
    the probe found noted for later runs. With ``scalar``, loops without vector
    instructions: for a rolled block's few numbers a turn they are faster."""
    isa = _vector_isa_known() if cpu else {}
    scalar_loops = {"cpp.simdlen": 1} if scalar else {}
    with torch._inductor.config.patch(compile_threads=1, size_asserts=False, **isa,
                                      **scalar_loops):
        yield
    if cpu and not isa:
        _remember_vector_isa()


def _vector_isa_file() -> tuple[Any, list[str]]:
    """Where the vector instruction sets this machine's CPU reports (x86 only) are noted as
    usable, inside inductor's own cache, for this torch; and those sets."""
    from torch._inductor import cpu_vec_isa

    flags = cpu_vec_isa.x86_isa_checker()
    reported = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list
                if isinstance(isa, cpu_vec_isa.VecISA) and str(isa).startswith(("avx", "amx"))
                and all(flag in flags for flag in str(isa).split())]
    return package_cache.cache_dir() / f"vibench-vector-isa-{torch.__version__}.json", reported


def _vector_isa_known() -> dict:
    """Inductor settings that skip its probe of the CPU's vector instruction sets (it builds
    a library and loads it in a child process: about 1 s in every process that compiles)
    where an earlier run here, with this torch, found every set the CPU reports usable."""
    import json

    try:
        path, reported = _vector_isa_file()
        noted = json.loads(path.read_text())
    except Exception:  # none noted yet (or unreadable): inductor probes
        return {}
    if reported and noted == {"reported": reported, "usable": reported}:
        return {"cpp.vec_isa_ok": True}
    return {}


def _remember_vector_isa() -> None:
    """Note what inductor's probe found usable, for ``_vector_isa_known`` in later runs."""
    import json

    from torch._inductor import cpu_vec_isa

    try:
        path, reported = _vector_isa_file()
        usable = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]
        files.write_atomic(path, json.dumps({"reported": reported, "usable": usable}).encode(),
                           mode=0o600)
    except Exception:  # a cache we cannot write only costs the probe next time
        pass


def _copies(inputs: list[torch.Tensor], mutable: int) -> list[torch.Tensor]:
    """Inputs to trace or compile on: copies of the ``mutable`` first (the step writes them),
    the data themselves (read only, and perhaps too large to copy)."""
    return [t.clone() if i < mutable else t for i, t in enumerate(inputs)]


def _unwrap(run: Callable) -> Callable:
    return lambda values: run(*values)


def _cuda_graph(run: Callable, inputs: list[torch.Tensor], mutable: int) -> Callable:
    """The compiled step captured as one CUDA graph and replayed: one launch per step instead
    of one per kernel. The step reads and writes ``inputs`` in place, so their addresses stay
    fixed; its random draws advance the captured generator's offset at each replay."""
    copies = _copies(inputs, mutable)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.random.fork_rng(devices=[inputs[0].device]):
        for _ in range(2):  # warm up (Triton's lazy set-up) on copies: the real step waits
            run(*copies)
    torch.cuda.current_stream().wait_stream(side)
    del copies
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run(*inputs)

    def replay(values: list[torch.Tensor]) -> tuple:
        graph.replay()
        return outputs

    return replay


def _make_fx(fn: Callable, inputs: list[torch.Tensor],
             fixed: range = range(0)) -> torch.fx.GraphModule:
    """``fn`` traced into a graph of torch operations. A value it reads in Python (the size
    of a plate as ``int(g.max()) + 1``, say) becomes a constant of the graph where it comes
    from the inputs at ``fixed`` (the data, the same every step) and constants alone; one
    that depends on another input or a random draw is a CannotCompile."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._lazy_graph_module import _use_lazy_graph_module
    from torch.fx.experimental.proxy_tensor import make_fx

    # Each node's metadata is a fake tensor; with no fake mode to find, make_fx makes a new
    # one per operation, half of a long step's trace. One mode serves them all. The graph's
    # Python code is written when it is first run, not after each change to it (a second a
    # change for a long loop's graph).
    with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True))), \
            _use_lazy_graph_module(True):
        graph = make_fx(fn, _error_on_data_dependent_ops=False)(*inputs)
    placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
    allowed = {placeholders[i] for i in fixed}
    for node in graph.graph.nodes:
        if node.op == "call_function" and _reads_a_value(node.target) and \
                not _fixed_by(node, allowed):
            raise CannotCompile("data-dependent control flow (the model, guide or loss reads "
                                "in Python a value that depends on the parameters or a random "
                                "draw)")
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph


def _reads_a_value(target: Any) -> bool:
    """Whether an operation gives Python a tensor's value (or a shape that depends on it)."""
    return isinstance(target, torch._ops.OpOverload) and \
        torch.Tag.data_dependent_output in target.tags


def _fixed_by(node: torch.fx.Node, allowed: set[torch.fx.Node]) -> bool:
    """Whether ``node``'s value follows from the ``allowed`` placeholders and constants
    alone, with no random draw on the way."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder" and current not in allowed:
            return False
        if isinstance(current.target, torch._ops.OpOverload) and \
                torch.Tag.nondeterministic_seeded in current.target.tags:
            return False
        todo.extend(current.all_input_nodes)
    return True


_ARANGES = {torch.ops.aten.arange.default, torch.ops.aten.arange.start,
            torch.ops.aten.arange.start_step}


def _drop_whole_gathers(graph: torch.fx.GraphModule) -> None:
    """Where a plate is not subsampled, Pyro's idiom ``x.index_select(0, ind)`` (or ``x[ind]``)
    gathers every row in order: ``ind`` is ``arange(len(x))``. Such gathers become ``x``
    itself, so the step reads the rows directly rather than through an index each step."""
    aten = torch.ops.aten
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.index_select.default and node.args[1] == 0:
            source, index = node.args[0], node.args[2]
        elif node.target is aten.index.Tensor and len(node.args[1]) == 1:
            source, index = node.args[0], node.args[1][0]
        else:
            continue
        if _whole_range(index, source) and not any(
                getattr(user.target, "_schema", None) is None or user.target._schema.is_mutable
                for user in node.users):
            node.replace_all_uses_with(source)
            graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()
    graph.recompile()


def _whole_range(index: Any, source: Any) -> bool:
    """Whether graph node ``index`` is ``arange(n)`` (from 0, step 1) with ``n`` the length
    of ``source``'s first dim."""
    if not isinstance(index, torch.fx.Node) or index.target not in _ARANGES:
        return False
    args = list(index.args)
    if len(args) == 1:
        args = [0, *args]
    if len(args) == 2:
        args.append(1)
    shape = getattr(getattr(source, "meta", {}).get("val"), "shape", None)
    return (not index.kwargs.get("dtype") or not index.kwargs["dtype"].is_floating_point) \
        and args[0] == 0 and args[2] == 1 and bool(shape) and args[1] == shape[0]


LONG_SUM = 2**16  # a GPU step sums a dim this long (or longer) to at most FEW_OUTPUTS
FEW_OUTPUTS = 1024  # numbers in two stages


def _sums_in_two_stages(device: torch.device) -> bool:
    """Whether a step on ``device`` gets ``_split_long_sums``: on GPUs only."""
    return device.type == "cuda"


def _split_long_sums(graph: torch.fx.GraphModule) -> None:
    """Each sum of a long dim to few outputs (a gradient's sum over 10^8 rows) becomes two
    sums over a (blocks, rows / blocks) view of that dim. Inductor (torch 2.11) gave such a
    reduction one GPU block per output when no read spans all of its outputs' dims: 34 of
    the 38 ms of a step of logistic regression at 10^8 rows on an H100 (6.1 ms with this
    rewrite). A dim with no divisor near its square root stays whole. The sums are the same
    up to rounding, which differs from eager Pyro's as inductor's own order of summing does,
    so the check against eager runs before this rewrite (on a trace of eager's own
    operations)."""
    aten = torch.ops.aten
    for node in list(graph.graph.nodes):
        if node.target is not aten.sum.dim_IntList or node.kwargs.get("dtype") is not None:
            continue
        source, dims = node.args[0], node.args[1]
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        value = getattr(source, "meta", {}).get("val")
        if not torch.is_tensor(value) or len(dims) != 1 or value.dim() == 0:
            continue
        at = dims[0] % value.dim()
        rows = value.shape[at]
        if rows < LONG_SUM or value.numel() // rows > FEW_OUTPUTS:
            continue
        blocks = _divisor_near_root(rows)
        if blocks is None:
            continue
        shape = [*value.shape[:at], blocks, rows // blocks, *value.shape[at + 1:]]
        if not _viewable(value, shape):
            continue
        with graph.graph.inserting_before(node):
            view = graph.graph.call_function(aten.view.default, (source, shape))
            part = graph.graph.call_function(aten.sum.dim_IntList, (view, [at + 1]))
            total = graph.graph.call_function(aten.sum.dim_IntList, (part, [at], keep))
        node.replace_all_uses_with(total)
        graph.graph.erase_node(node)
    graph.recompile()


def _divisor_near_root(n: int) -> int | None:
    """A divisor of ``n`` within a factor 16 below its square root, the nearest; else None."""
    root = math.isqrt(n)
    return next((k for k in range(root, max(root // 16, 1), -1) if n % k == 0), None)


def _viewable(value: torch.Tensor, shape: list[int]) -> bool:
    try:
        value.view(shape)
    except RuntimeError:
        return False
    return True


def _trace(fn: Callable, inputs: list[torch.Tensor], fixed: range = range(0)
           ) -> torch.fx.GraphModule:
    """``fn`` as a graph of torch operations, on a ``trial_stream``; a value read in Python
    while tracing is a CannotCompile unless it follows from the inputs at ``fixed``."""
    with package_cache.trial_stream():
        try:
            return _make_fx(fn, inputs, fixed)
        except CannotCompile:
            raise
        except Exception as exc:
            text = one_line(exc)
            if "_local_scalar_dense" in text or "data-dependent" in text:
                raise CannotCompile("data-dependent control flow (the model, guide or loss "
                                    "reads a tensor's value in Python)") from exc
            raise CannotCompile(f"tracing failed: {text}") from exc


def _check_against_eager(svi: Any, data: dict, params: list[torch.Tensor],
                         feeds: list[torch.Tensor], graph: torch.fx.GraphModule) -> None:
    """The traced loss and gradients must be Pyro's eager ones for the same random draws."""
    seed = torch.initial_seed() + 2
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        eager_loss = float(torch.as_tensor(svi.loss_and_grads(svi.model, svi.guide, **data))
                           .detach())
        eager = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for p in params]
    for param in params:
        param.grad = None
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        traced_loss, *traced = graph(*params, *feeds)
    same = math.isclose(float(traced_loss), eager_loss, rel_tol=1e-4, abs_tol=1e-5) or \
        not math.isfinite(eager_loss)
    for want, got in zip(eager, traced):
        scale = want.abs().max().item() if want.numel() else 0.0
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-5 * max(scale, 1.0)):
            same = False
    if not same:
        raise CannotCompile("the traced gradient differs from Pyro's eager one")


class _AdamUpdate:
    """torch.optim.Adam's update (no amsgrad), written in place into each parameter's own
    optimizer state, applied only where ``ok``: Pyro's optimizers keep the state, so
    checkpoints are unchanged. The learning rate is an input of the graph, refreshed from the
    optimizer before each step, so a schedule (which changes only it) steps as it does eagerly."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], states: list[torch.Tensor]):
        self.optimizers = optimizers
        self.settings = [dict(o.param_groups[0]) for o in optimizers]  # betas, eps: fixed
        self.states = states  # per parameter: step, exp_avg, exp_avg_sq
        self.lrs = [torch.tensor(float(s["lr"]), dtype=st.dtype, device=st.device)
                    for s, st in zip(self.settings, states[::3])]
        self._now = [float(s["lr"]) for s in self.settings]
        self.tensors = [*states, *self.lrs]  # the graph's inputs after the parameters

    def adopt(self, objs: dict, params: list[torch.Tensor]) -> None:
        """Take over optimizers made afresh (a resume): their state moves into the tensors
        the graph writes, which they get back."""
        keys = ("step", "exp_avg", "exp_avg_sq")
        for i, param in enumerate(params):
            optimizer = seams.torch_optimizer(objs[param])
            optimizer._opt_called = True
            self.optimizers[i], self._now[i] = optimizer, math.nan  # refreshed at the next step
            state = optimizer.state[param]
            mine = self.states[3 * i:3 * i + 3]
            with torch.no_grad():
                for key, tensor in zip(keys, mine):
                    tensor.copy_(state[key] if key in state else torch.zeros_like(tensor))
            state.update(zip(keys, mine))

    def refresh(self) -> None:
        """The learning rates as the optimizers hold them now (a schedule moved them)."""
        for i, optimizer in enumerate(self.optimizers):
            lr = optimizer.param_groups[0]["lr"]
            if lr != self._now[i]:
                self.lrs[i].fill_(lr)
                self._now[i] = lr

    def __call__(self, ok: torch.Tensor, grads: list[torch.Tensor],
                 params: tuple[torch.Tensor, ...], tensors: tuple[torch.Tensor, ...]) -> None:
        states, lrs = tensors[:3 * len(params)], tensors[3 * len(params):]
        for i, (param, grad, group) in enumerate(zip(params, grads, self.settings)):
            step, exp_avg, exp_avg_sq = states[3 * i:3 * i + 3]
            beta1, beta2 = group["betas"]
            if group["weight_decay"]:
                grad = grad + group["weight_decay"] * param
            new_step = step + 1
            new_avg = exp_avg.lerp(grad, 1 - beta1)
            new_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
            bias1 = 1 - torch.pow(beta1, new_step)
            bias2 = 1 - torch.pow(beta2, new_step)
            denom = new_sq.sqrt() / bias2.sqrt() + group["eps"]
            new_param = param - (lrs[i] / bias1) * new_avg / denom
            param.copy_(torch.where(ok, new_param, param))
            step.copy_(torch.where(ok, new_step, step))
            exp_avg.copy_(torch.where(ok, new_avg, exp_avg))
            exp_avg_sq.copy_(torch.where(ok, new_sq, exp_avg_sq))


def _adam_update(optim: Any, params: list[torch.Tensor]) -> _AdamUpdate | None:
    """The in-graph update for plain Adam, with or without a learning-rate schedule; None
    (the optimizer steps eagerly after the compiled gradients) for anything else."""
    objs = getattr(optim, "optim_objs", None)
    if objs is None or getattr(optim, "grad_clip", {}) and any(
            v is not None for v in optim.grad_clip.values()):
        return None
    optimizers, states = [], []
    for param in params:
        torch_optim = objs.get(param)
        if getattr(torch_optim, "cycle_momentum", False):
            return None  # the schedule moves Adam's betas too
        torch_optim = seams.torch_optimizer(torch_optim)
        if type(torch_optim) is not torch.optim.Adam or len(torch_optim.param_groups) != 1:
            return None
        group = torch_optim.param_groups[0]
        if group.get("amsgrad") or group.get("maximize") or group.get("decoupled_weight_decay") \
                or torch.is_tensor(group["lr"]):
            return None
        state = torch_optim.state[param]
        if state and state["step"].device != param.device:
            state["step"] = state["step"].to(param.device)
        if not state:  # torch creates it at the first step; create it now, as torch would
            # (the step count on the parameter's device, as torch's capturable Adam keeps it:
            # a CPU scalar would split a CUDA step in two and cannot be captured in a graph)
            state["step"] = torch.tensor(0.0, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        # the schedule's check that Adam stepped first: the graph steps it
        torch_optim._opt_called = True
        optimizers.append(torch_optim)
        states += [state["step"], state["exp_avg"], state["exp_avg_sq"]]
    return _AdamUpdate(optimizers, states)


@contextlib.contextmanager
def _traceable() -> Iterator[None]:
    """Pyro's ELBOs read their loss into a Python float and warn on NaN, both by reading a
    value the trace cannot see; while tracing they keep the tensor (``item()`` gives the
    tensor itself: arithmetic on it is traced, a branch on it still fails), validation
    (which checks values in Python) is off, and ``torch.jit.is_tracing()`` is true, as under
    Pyro's own JIT ELBOs."""
    from pyro.infer.util import torch_item
    from pyro.util import warn_if_nan

    patched = []
    for module in list(sys.modules.values()):  # Pyro's and any plugin's that imported them
        for attr, original in (("torch_item", torch_item), ("warn_if_nan", warn_if_nan)):
            try:  # a lazy module's __getattr__ may raise anything
                found = getattr(module, attr, None)
            except Exception:
                continue
            if found is original:
                patched.append((module, attr, original))
                setattr(module, attr, _keep)
    patched.append((torch.jit, "is_tracing", torch.jit.is_tracing))
    torch.jit.is_tracing = _tracing
    patched.append((torch.Tensor, "item", torch.Tensor.item))
    torch.Tensor.item = _keep  # arithmetic on it is traced; a branch on it still fails
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        for module, attr, original in patched:
            setattr(module, attr, original)


def _keep(value: Any, *args: Any, **kwargs: Any) -> Any:
    return value


def _tracing() -> bool:
    return True
