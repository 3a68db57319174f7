"""The hooks a vibench plugin implements, one per kind of component.

Each hook receives a ``register(name, factory)`` callable and calls it once per component.
``factory`` is a function: its keyword parameters are the component's options (a recipe
sets them, ``vibench list`` shows them with their defaults), and its docstring's first line
is the component's description. A few parameter names are not options but are filled in by
vibench from the run: ``device`` (the run's ``torch.device``) for any factory; ``model`` for
guides; ``optim_args`` for optimizers; ``defaults`` (the optimizer's options) for
optim_args; ``optimizer`` and ``steps`` (the run's length) for schedules; ``run_dir``,
``start_step`` and ``recipe`` for loggers.

New tensors are made on the run's device already (vibench sets torch's default device), so a
plugin rarely needs ``device``.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "vibench"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, Callable], None]


@hookspec
def register_models(register: Register) -> None:
    """Register model factories.

    A model factory returns a Pyro model: a callable whose keyword arguments are the
    recipe's ``data`` keys (as tensors on the run's device). It may also have a method
    ``exact_posterior(**data) -> {site: torch.distributions.Distribution}`` giving the exact
    or reference posterior, which the report compares the guide against.

    Where the posterior is known only by its moments (long MCMC runs, as posteriordb's), the
    model may instead or as well have ``reference_posterior(**data)`` returning::

        {"params": {name: {"mean": float, "sd": float, ...}},  # quantiles etc. are ignored
         "sites": {name: (site, index)},  # the model's site and the 0-based index into its value
         "draws": path}                   # optional: where the reference draws are

    ``name`` is the reference's own name for one number (Stan's ``beta[2]``, say, with
    ``("beta", (1,))``). The site may be a latent one or a ``pyro.deterministic`` one (then
    scored from guide draws run through the model). The report scores each parameter by
    z = |guide mean - ref mean| / ref sd and r = guide sd / ref sd, also for the importance-
    weighted estimates where PSIS allows, and calls the fit good when every z <= 0.2 and
    0.8 <= r <= 1.2; summary.json's ``reference`` section holds it all. A parameter whose
    site or index the model lacks is listed with the reason, not scored.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register data set factories, which a recipe names under ``data: {dataset: ...}``.

    A data set factory returns a mapping of argument name to array (a list, a NumPy array or
    a tensor), which vibench hands the model by name as it does a recipe's inline data. A
    synthetic data set takes its size, true values and its own ``seed`` as options, so its
    data stay the same when the run's seed changes.
    """


@hookspec
def register_guides(register: Register) -> None:
    """Register guide (variational family) factories.

    A guide factory takes the Pyro ``model`` and returns a guide callable with the model's
    signature, such as a Pyro autoguide. A guide that is not itself the posterior it fits
    (AutoLaplaceApproximation, say) may have a method ``posterior_guide(**data)`` returning the
    guide that the posterior report should draw from.

    A guide may also have a method ``initialise(**data)``, which vibench calls once at set-up
    with the whole data, after the one loss-and-gradient it tries has created the guide's
    parameters and before the optimizer and training start (``Run.setup``): the place to set
    a data-dependent start, overwriting the parameters in place (the Gaussian autoguides'
    ``init: laplace`` does). It returns a list of notes for the user (or None); an exception
    there is a recipe problem, reported in one line before the run. A resumed run calls it
    too, then puts the checkpoint's parameters back over what it set.
    """


@hookspec
def register_losses(register: Register) -> None:
    """Register loss factories.

    A loss factory returns a Pyro ELBO instance (``Trace_ELBO`` and friends), or a plain
    callable ``(model, guide, *args, **kwargs) -> loss`` as in Pyro's custom losses; SVI
    minimises it.
    """


@hookspec
def register_optimizers(register: Register) -> None:
    """Register optimizer factories.

    An optimizer factory takes ``optim_args``, a callable ``param_name -> dict`` that vibench
    builds from the factory's own options merged with the recipe's per-parameter rules, and
    returns a ``pyro.optim.PyroOptim`` made with it, e.g. ``pyro.optim.Adam(optim_args)``.
    """


@hookspec
def register_optim_args(register: Register) -> None:
    """Register optimizer-argument factories (Pyro's per-parameter ``optim_args``).

    Such a factory (given ``defaults``, the optimizer's own options) returns a callable
    ``param_name -> dict`` of optimizer settings for that parameter, which override the
    defaults; an empty dict keeps them. The callable may have a method ``check(param_names)``
    that raises ``ValueError`` when the recipe's rules do not fit the model's parameters (a rule
    that matches nothing, say).
    """


@hookspec
def register_schedules(register: Register) -> None:
    """Register learning-rate schedule factories.

    A schedule factory takes the ``optimizer`` (the ``PyroOptim`` the optimizer component
    made) and the run's ``steps``, and returns a ``pyro.optim.PyroLRScheduler`` over the same
    torch optimizer and ``optim_args``. vibench steps it after every SVI step, passing the
    step's loss when the scheduler's ``step`` needs one (as ReduceLROnPlateau's does).
    """


@hookspec
def register_loggers(register: Register) -> None:
    """Register logger (experiment tracker) factories, which a recipe lists under ``loggers``.

    A logger factory takes ``run_dir`` (the run directory, a ``pathlib.Path``),
    ``start_step`` (0, or the step a resumed run goes on from: drop what was logged from there
    on) and ``recipe`` (the resolved recipe, to record as the run's parameters), and returns
    an object with any of these methods, each called in the run's own thread:

    - ``scalars(records)``: numbers, each ``(tag, value, step, wall_time)`` in the order
      logged, e.g. ``Train/loss`` after every step; vibench hands them over in batches, each
      record at most about a second old, and all of them before any other call;
    - ``scalar(tag, value, step)``: one number, for a logger without ``scalars`` (called once
      a record, as the batch is handed over);
    - ``histogram(tag, values, step)``: a NumPy array, e.g. a tensor parameter;
    - ``image(tag, image, step)``: an ``(H, W, 3)`` uint8 array, e.g. a plot;
    - ``flush()``: make everything logged so far durable (called at every checkpoint);
    - ``close(summary)``: the run ended; ``summary`` is what summary.json holds.

    A method a logger lacks is skipped. A logger that raises is reported once, on stderr, and
    left out for the rest of the run: losing a tracker never costs the run.
    """


@hookspec
def register_stages(register: Register) -> None:
    """Register stages of the automatic pipeline, which a recipe lists under
    ``auto: {stages: [...]}`` (a recipe with no guide, or ``guide: {name: auto}``, runs them).

    A stage factory's options are the stage's settings; it returns an object with a method
    ``run(pipeline) -> str``, which ``workbench.auto.pipeline.Pipeline`` calls once, in the listed
    order, and which returns one line saying what the stage did and why ("escalated to a
    flow: k-hat 0.93 > 0.7"; "skipped: k-hat 0.31 <= 0.7"); the report shows these lines. A
    stage works through the pipeline, which offers:

    - ``pipeline.guide``: the guide section the next fit uses (a dict; a start stage sets its
      ``init``), and ``pipeline.dimension``: the number of unconstrained latent dimensions;
    - ``pipeline.fit(label, guide=..., loss=..., optimizer=..., train=..., seed_offset=0,
      start=None)``: one ordinary vibench run (``Run.setup`` and ``Run.train``) of those
      recipe sections (``optimizer.lr`` may be ``auto``) on the recipe's model and data, with
      seed + ``seed_offset``, in the run directory's ``fits/<label>``; returns a
      ``workbench.auto.pipeline.Fit`` (its summary, k-hat, ELBO, the fitted Gaussian where the guide
      has one; a fit that failed has ``ok`` False and its ``error``); ``start(guide)``, if
      given, may overwrite the guide's parameters after set-up, before any step;
    - ``pipeline.fits``: every fit so far; ``pipeline.candidates``: the fits the final
      estimates come from (a stage that fits replaces them); ``pipeline.weighted``: the k-hat
      below which a fit's importance-weighted (PSIS) estimates are reported, None for the
      guide's own moments; ``pipeline.rhat``: R-hat across the candidates, once computed;
    - ``pipeline.flags``: the reasons not to trust the result, which a stage appends to.

    An exception from ``run`` ends the pipeline with a run failure naming the stage.
    """
