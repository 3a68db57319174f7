"""vibench from Python, the shell's twin: ``fit`` runs a recipe as ``vibench run`` does and
``load`` reads back any finished run; both give a ``Fit``: the run's summary, the trust
verdict the terminal prints, draws from the fitted posterior, its ArviZ InferenceData, its
plots and its run directory.

``fit`` goes through the function ``vibench run`` goes through (``service.run_recipe``): the
same checks, the same errors (a ``UsageError`` whose message is the line the CLI prints), the
same run directory and, for the same recipe and seed, the same numbers. ``from workbench
import fit, load`` imports this module (and torch) only when first asked for.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from workbench import service
from workbench.auto.answer import keeping_random, seeded
from workbench.config.recipe import SECTIONS
from workbench.errors import UsageError, did_you_mean
from workbench.plugins.registry import Registry, get_registry
from workbench.rundir import summary as schema
from workbench.rundir.layout import FITS, PLOTS, POSTERIOR


def fit(recipe: str | Path | Mapping | None = None, /, *, steps: int | None = None,
        seed: int | None = None, device: str | None = None, out: str | Path | None = None,
        threads: int | None = None, set: Mapping[str, Any] | None = None,
        progress: bool = True, **sections: Any) -> Fit:
    """Run a recipe as ``vibench run`` does and return the finished run.

    ``recipe`` is a YAML file's path, or a recipe as a dict (as YAML would give it; relative
    paths in it are taken from the working directory), or nothing when the keywords give the
    model and its data. ``steps``, ``seed``, ``device``, ``out`` and ``threads`` are
    ``vibench run``'s options; ``set`` is its ``--set`` pairs as a dict
    (``{"loss.num_particles": 16}``). Any other keyword sets a whole section of the recipe, as
    ``--set SECTION=VALUE`` does: ``guide="auto_normal"``, ``data={"flips": [1, 0, 1]}``, and
    ``model=my_model`` for a model function defined in the session (a guide too): it runs
    under the name ``notebook:<its name>``. A recipe with a model and data but no guide, loss
    or optimizer runs the automatic pipeline.

    Progress shows as a notebook progress bar in Jupyter, as the CLI's bar on a terminal, and
    not at all otherwise (or with ``progress=False``). Bad input raises the ``UsageError``
    (or ``RecipeError``) whose lines ``vibench run`` prints; a stop (Ctrl-C) raises
    ``Interrupted`` once what was learned is saved.
    """
    unknown = [key for key in sections if key not in SECTIONS]
    if unknown:
        own = ["steps", "seed", "device", "out", "threads", "set", "progress"]
        raise UsageError(f"fit: no option or recipe section {unknown[0]!r}; "
                         f"{did_you_mean(unknown[0], [*own, *SECTIONS])}")
    if recipe is None and not sections:
        raise UsageError("fit: give a recipe (a YAML file's path or a dict), or a model and "
                         "its data: fit(model=my_model, data={...})")
    source = _source(recipe)
    values = {key: _plain_data(value) if key == "data" else value
              for key, value in sections.items()}
    registry, values = service.with_objects(get_registry(), values)
    if isinstance(source, dict) and "name" not in source and "name" not in values:
        named = sections.get("model")
        if callable(named) and not isinstance(named, str):
            source = {"name": _run_name(getattr(named, "__name__", "")), **source}
    sets = [*service.shorthands(device, seed, steps),
            *(_set_item(key, value) for key, value in (set or {}).items())]
    done = service.run_recipe(source, sets, None if out is None else Path(out).expanduser(),
                              registry, values=values, threads=threads,
                              progress=_progress(progress))
    assert done is not None  # one process: the leader
    _, run_dir = done
    return Fit(run_dir, service.read_summary(run_dir), registry, trust_code=True)


def load(run_dir: str | Path, *, trust_code: bool = False, **objects: Any) -> Fit:
    """A finished run (any run directory with a summary.json, the automatic pipeline's
    included) as the ``Fit`` that ``fit`` returned for it. Reading it runs nothing; drawing
    from it (``sample``) rebuilds the run from its checkpoint, and imports the code its recipe
    names (``file.py:attr``) only with ``trust_code=True``. A run whose model was a function
    of a Python session (``fit(model=my_model)``) needs it again: ``load(run_dir,
    model=my_model)``."""
    run_dir = Path(run_dir).expanduser()
    summary = service.read_summary(run_dir)
    registry = None
    if objects:
        saved = service.session_names(summary.get("recipe") or {})
        for key in objects:
            if key not in saved:
                raise UsageError(f"load {run_dir}: {key}= hands in a {key} that was a Python "
                                 f"object; this run's {key} was not (its recipe.yaml names "
                                 "it)")
        registry, _ = service.with_objects(get_registry(), objects, saved)
    return Fit(run_dir, summary, registry, trust_code)


class Fit:
    """A finished run: ``run_dir``, ``summary`` (its summary.json as a dict; ``record``, the
    same read through its schema), ``verdict`` (the k-hat line the terminal prints),
    ``sample(n)``, ``to_arviz()``, ``plot()``; ``str()`` is the terminal's whole report."""

    def __init__(self, run_dir: Path, summary: dict, registry: Registry | None = None,
                 trust_code: bool = False):
        self.run_dir = Path(run_dir)
        self.summary = summary
        self.record = schema.read(summary)
        self._registry = registry
        self._trust_code = trust_code

    @property
    def name(self) -> str | None:
        """The recipe's name."""
        return self.record.name

    @property
    def status(self) -> str:
        """completed, or how the run ended (interrupted, diverged, ...)."""
        return self.record.status

    @property
    def pipeline(self) -> bool:
        """Whether the automatic pipeline made the run."""
        return isinstance(self.record, schema.PipelineSummary)

    @property
    def verdict(self) -> str:
        """The report's trust verdict as the terminal prints it: "PSIS k-hat 0.04 (good);
        importance-sampling ESS ..." or why there is no k-hat."""
        return service.verdict(self.summary)

    @property
    def reading(self) -> str | None:
        """The k-hat's reading alone ("good", ...); None without a k-hat."""
        return self.record.diagnostics.get("reading") if self.record.khat is not None else None

    def report(self) -> list[str]:
        """The lines ``vibench run`` (and ``vibench show``) print for the run."""
        return [*service.report_lines(self.summary),
                service.final_line(self.summary, self.run_dir)]

    def __str__(self) -> str:
        return "\n".join(self.report())

    def __repr__(self) -> str:
        status = "" if self.status == "completed" else f" ({self.status})"
        return (f"<Fit {self.name}{status}: {self.verdict or 'no k-hat'} | "
                f"{self.run_dir}>")

    def sample(self, n: int, seed: int | None = None) -> dict:
        """``n`` draws from the fitted posterior: ``{site: tensor of shape (n, ...)}`` for
        each latent site and ``pyro.deterministic`` site, rebuilt from the run's checkpoint.
        With ``seed`` the same draws each time; without, from torch's random stream.

        For the automatic pipeline, draws of its reported answer
        (``workbench.auto.answer.answer_draws``, as its posterior.nc holds them): an equal
        mixture of the fits it used (as its pooled estimates are), each fit's draws resampled
        by their PSIS weights where it reported importance-weighted estimates for that fit
        (from ``IS_POOL`` draws; a draw may then repeat), or where the answer is the fits'
        weighed mixture, their pooled draws resampled as one by their weights against it;
        so their moments are the reported ones up to Monte Carlo error."""
        from workbench.auto import answer
        from workbench.report import inference_data

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UsageError(f"sample: n is a number of draws >= 1, got {n!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise UsageError(f"sample: seed is a whole number, got {seed!r}")
        if self.pipeline:
            return answer.answer_draws(self.run_dir, self.summary, n, self._load, seed).draws
        run = self._load(self.run_dir)
        with seeded(seed, run.device):
            draws, _ = inference_data.site_draws(run, n)
        return draws

    def _load(self, path: Path) -> Any:
        """The run in ``path`` rebuilt from its checkpoint, afresh each time (a guide may keep
        its parameters in Pyro's global store, which another run clears), leaving the
        session's random streams as they were (set-up seeds them)."""
        with keeping_random():
            return service.load(path, self._registry or get_registry(), self._trust_code,
                                where=f"load {path}")

    def to_arviz(self) -> Any:
        """The run's posterior.nc as ArviZ InferenceData (posterior, posterior predictive,
        log likelihood, observed data, sample stats); a pipeline run's holds draws of its
        answer, ``sample_stats`` saying which fit each came from and whether it was drawn by
        importance weight."""
        az = _arviz()
        path = self.run_dir / POSTERIOR
        if not path.is_file():
            raise UsageError(f"{self.run_dir}: no {POSTERIOR}; write it with: vibench export "
                             f"{self.run_dir}")
        return az.from_netcdf(str(path))

    def plot(self) -> list[Path]:
        """The run's plots (PNG files; for a pipeline run, its answer's, or for one made
        before it drew its own, those of the fits it used), shown inline in a notebook;
        returns their paths ([] for a run made with train.plots false)."""
        folders = [self.run_dir / PLOTS]
        if self.pipeline and not any(folders[0].glob("*.png")):
            folders = [self.run_dir / FITS / label / PLOTS
                       for label in self.record.auto["used"]]
        paths = [path for folder in folders for path in sorted(folder.glob("*.png"))]
        if paths and in_notebook():
            from IPython.display import Image, display

            for path in paths:
                display(Image(filename=str(path)))
        return paths


def _source(recipe: Any) -> Path | dict:
    """What ``fit`` was given as its recipe, as the service takes it."""
    if recipe is None:
        return {}
    if isinstance(recipe, (str, Path)):
        return Path(recipe).expanduser()
    if isinstance(recipe, Mapping):
        recipe = dict(recipe)
        if isinstance(recipe.get("data"), Mapping):
            recipe["data"] = _plain_data(recipe["data"])
        return recipe
    raise UsageError(f"fit: a recipe is a YAML file's path or a dict, not "
                     f"{type(recipe).__name__}")


def _plain_data(data: Any) -> Any:
    """A data section with arrays (NumPy, torch, pandas) made lists, as a recipe holds them."""
    if not isinstance(data, Mapping):
        return data
    return {key: value.tolist() if hasattr(value, "tolist") and not isinstance(value, str)
            else value for key, value in data.items()}


def _set_item(key: str, value: Any) -> str:
    """A ``set=`` pair as the ``--set KEY=VALUE`` item it stands for (the value as YAML)."""
    if isinstance(value, float) and not math.isfinite(value):
        text = ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
    else:
        try:  # JSON is YAML, and quotes every string (so "1e-3" stays text)
            text = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise UsageError(f"fit: set[{key!r}]: {value!r} is not a value a recipe holds "
                             "(numbers, text, true/false, lists and dicts of them)") from None
    return f"{key}={text}"


def _run_name(name: str) -> str:
    """A function's name as a run's name (letters, digits, '.', '_' and '-')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip("._-") or "run"


def in_notebook() -> bool:
    """Whether this is a Jupyter kernel (IPython with a kernel), without importing IPython."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython else None
    return getattr(shell, "kernel", None) is not None


def _progress(wanted: bool) -> Callable[[int], Any]:
    """The progress display ``fit`` trains under: a notebook bar in Jupyter, the CLI's bar on
    a terminal, none otherwise."""
    if not wanted:
        return _Silent
    if in_notebook():
        return NotebookBar
    return lambda total: service.Progress(total, lines=False)


class _Silent:
    def __init__(self, total: int):
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def restart(self, label: str, total: int) -> None:
        pass

    def update(self, step: int, loss: float) -> None:
        pass


class NotebookBar:
    """The steps and the loss as a notebook progress bar (tqdm's, a widget where ipywidgets
    is installed)."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="SVI", unit="step", dynamic_ncols=True)
        self.last = 0.0

    def __enter__(self) -> NotebookBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def restart(self, label: str, total: int) -> None:
        """Count the next fit's steps afresh (the automatic pipeline's)."""
        self.bar.reset(total=total)
        self.bar.set_description(label)

    def update(self, step: int, loss: float) -> None:
        now = time.monotonic()
        if step == self.bar.total or now - self.last >= 0.1:
            self.last = now
            self.bar.n = step
            self.bar.set_postfix_str(f"loss {loss:.4f}")  # refreshes it


def _arviz() -> Any:
    """ArviZ, imported quietly (its import warns of its next major version)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz
