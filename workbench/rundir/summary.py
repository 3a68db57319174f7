"""summary.json: every field it holds, typed and described once, for a training run
(``RunSummary``) and for an automatic pipeline's answer (``PipelineSummary``).

The runner and the pipeline write through these classes (``to_json``); ``show``, ``runs``,
``compare``, the CLI's report and the Python API read through them (``check`` says in one
line what a file lacks, ``read`` gives the typed view). Summaries written by earlier versions
lack the fields added since (``status``, ``diagnostics``, ``device``, ...) and may hold NaN
for ``final_loss``: reading fills the documented default in. docs/reference/summary-json.md
renders its table of fields from ``FIELDS``. No torch here: ``runs`` and ``show`` stay quick.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypedDict

FINAL_LOSS_STEPS = 100  # final_loss is the mean loss of the last 100 steps


class SiteSummary(TypedDict, total=False):
    """One site of ``posterior``: numbers for a scalar site, nested lists in its shape else."""

    mean: Any
    std: Any
    method: str  # "analytic" (read off the guide's distribution) or "sampled"
    q05: Any
    q50: Any
    q95: Any
    exact_mean: Any
    exact_std: Any
    mean_error: Any
    std_error: Any
    kl: float | None
    kl_method: str
    kl_se: float | None
    iw_mean: Any
    iw_std: Any
    iw_mean_mcse: Any  # their Monte Carlo standard errors (workbench/report/iw_error.py)
    iw_std_mcse: Any
    iw_std_khat: Any  # the k-hat of the tail of the sd's weighted squared deviations


class Diagnostics(TypedDict, total=False):
    """``diagnostics``: PSIS k-hat (or null with a ``reason``) and what the same draws say."""

    khat: float | None
    reason: str
    reading: str
    ess: float | None
    ess_fraction: float | None
    num_draws: int
    elbo: float | None
    elbo_se: float | None
    log_evidence: float | None
    log_evidence_se: float | None
    khat_se: float | None
    sized: str
    more_draws: str  # PSIS took MORE_DRAWS times the draws: an sd's tail was unbounded
    per_draw: str
    inference_data: str
    khats: dict  # the pipeline's: each fit's k-hat
    proposal: dict  # the pipeline's answer from a heavier-tailed proposal: which, its fits
    proposals: dict  # the heavier-tailed proposals' k-hats, where none was trusted


class Reference(TypedDict, total=False):
    """``reference``: the guide scored against a reference posterior, or why it was not."""

    params: dict  # per reference parameter: mean, std, ref_mean, ref_sd, z, r (iw_z, iw_r)
    max_z: float | None
    min_r: float | None
    max_r: float | None
    iw_max_z: float | None
    iw_min_r: float | None
    iw_max_r: float | None
    good: bool | None
    skipped: dict  # parameter -> why it was not compared
    reason: str  # why nothing was compared


class Reading(Exception):
    """A summary that does not hold what its schema says; the message names the field."""


_NUMBER, _INTEGER = "number", "integer"
_KINDS: dict[str, tuple[str, tuple[type, ...]]] = {  # kind -> what a message calls it, types
    _NUMBER: ("a number", (int, float)), _INTEGER: ("a number", (int,)),
    "string": ("a string", (str,)), "object": ("an object", (dict,)),
    "list": ("a list", (list,)), "boolean": ("true or false", (bool,)),
}


def _field(doc: str, kind: str, *, default: Any = dataclasses.MISSING, null: bool = False,
           omit: bool = False, contract: bool = False, factory: Any = None) -> Any:
    """One summary field: ``doc`` for the reference page; ``kind`` its JSON type (a key of
    _KINDS); ``null`` whether null is allowed; ``omit`` left out of the file while None;
    ``contract`` DESIGN.md's (it must not change); ``default`` what a summary written
    before the field existed reads as (none: the field is required)."""
    meta = {"doc": doc, "kind": kind, "null": null or omit, "omit": omit,
            "contract": contract}
    if factory is not None:
        return field(default_factory=factory, metadata={**meta, "default": factory()})
    return field(default=default, metadata={**meta, "default": default})


@dataclass(kw_only=True)
class Summary:
    """What every summary.json holds, a training run's or a pipeline's."""

    recipe: dict = _field("the recipe as run, every default filled in", "object",
                          contract=True)
    steps: int = _field("the steps taken", _INTEGER, contract=True)
    wall_seconds: float = _field("the training loop's time", _NUMBER, contract=True)
    steps_per_second: float = _field("`steps / wall_seconds`", _NUMBER, contract=True)
    final_loss: float | None = _field(
        f"mean loss of the last {FINAL_LOSS_STEPS} steps (null without a good step)", _NUMBER,
        default=None, null=True, contract=True)
    posterior: dict[str, SiteSummary] = _field(
        "per latent and `pyro.deterministic` site: [below](#posterior)", "object",
        contract=True)
    diagnostics: Diagnostics = _field("the PSIS diagnostic and the ELBO: [below](#diagnostics)",
                                      "object", factory=dict)
    reference: Reference | None = _field(
        "where the model has a reference posterior: [below](#reference)", "object",
        default=None, omit=True)
    params: dict = _field("every parameter of Pyro's parameter store, by name", "object",
                          factory=dict, contract=True)
    status: str = _field("`completed`, `interrupted` or `failed`", "string",
                         default="completed")
    error: str | None = _field("with `failed` or `interrupted`: what went wrong", "string",
                               default=None, omit=True)
    device: str | None = _field("the device used", "string", default=None, null=True,
                                contract=True)
    dtype: str | None = _field("`float32` or `float64`", "string", default=None, null=True,
                               contract=True)
    versions: dict | None = _field("of vibench, torch and pyro", "object", default=None,
                                   null=True, contract=True)
    data_hash: str | None = _field("a hash of the model's tensors, which `--resume` checks",
                                   "string", default=None, null=True, contract=True)
    world_size: int | None = _field("the number of processes (torchrun)", _INTEGER,
                                    default=None, null=True, contract=True)

    def to_json(self) -> dict:
        """The summary as summary.json holds it: optional fields left out while unset."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.metadata["omit"] and getattr(self, f.name) is None)}

    @property
    def khat(self) -> float | None:
        return self.diagnostics.get("khat")

    @property
    def name(self) -> str | None:
        """The recipe's name, where it has one."""
        name = self.recipe.get("name")
        return name if isinstance(name, str) else None

    @property
    def report_missing(self) -> str:
        """Why a completed summary holds no report ('' where it does, or where the report is
        its fits')."""
        return ""


@dataclass(kw_only=True)
class RunSummary(Summary):
    """summary.json of one training run."""

    report_seconds: float | None = _field("what the report took", _NUMBER, default=None,
                                          omit=True)
    skipped_steps: int = _field("steps with a non-finite loss or gradient that were skipped "
                                "(`train.skip_bad_steps`)", _INTEGER, default=0)
    averaged_steps: int = _field("the steps averaged over (`train.average_last`)",
                                 _INTEGER, default=0)
    stopped_early: int | None = _field("the step early stopping ended the run at, else null",
                                       _INTEGER, default=None, null=True)
    converged: dict | None = _field(
        "with `train.stop: converged`: `at_step` (null when the steps ran out), `window`, "
        "`skl`, `lr_factor`, `lr_decreases`, the last `checks`, `iterate_rhat` and "
        "`averaged`", "object", default=None, omit=True)
    resumes: list = _field("each resume that changed something: its `step` and `changes`",
                           "list", factory=list)
    threads: int | None = _field("torch's CPU threads", _INTEGER, default=None, null=True)
    compiled: bool = _field("whether the steps ran compiled (`train.compile`)",
                            "boolean", default=False)

    @property
    def report_missing(self) -> str:
        """Why a completed run's summary holds no report ('' where it does): the report
        failed, or was stopped or killed before it finished (``--resume`` writes it)."""
        if self.status != "completed":
            return ""
        reason = str(self.diagnostics.get("reason") or "")
        if reason.startswith("the report failed"):
            return reason
        # the summary written before the report has no posterior yet (summaries of the
        # first layout have no report_seconds, but their posterior)
        if self.report_seconds is None and not self.posterior:
            return "its report did not finish (stopped or killed while it was written)"
        return ""


@dataclass(kw_only=True)
class PipelineSummary(Summary):
    """summary.json of the automatic pipeline: its answer, and how it was reached."""

    auto: dict = _field("with the automatic pipeline: [below](#auto)", "object")


FIELDS: list[tuple[str, dataclasses.Field]] = [
    *((f.name, f) for f in dataclasses.fields(RunSummary)),
    *((f.name, f) for f in dataclasses.fields(PipelineSummary) if f.name == "auto"),
]


def schema(data: dict) -> type[Summary]:
    """The class a summary's content belongs to: the pipeline's where it has ``auto``."""
    return PipelineSummary if "auto" in data else RunSummary


def check(data: Any) -> str:
    """What ``data`` lacks to be a summary, in a few words naming the field ("steps is not a
    number"), or "" when it is one."""
    if not isinstance(data, dict):
        return "not a JSON object"
    specs = dataclasses.fields(schema(data))
    present = [spec for spec in specs if spec.name in data]  # a wrong value before a gap
    problem = next(filter(None, (_field_problem(spec, data)
                                 for spec in [*present, *specs])), "")
    if problem:
        return problem
    for site, entry in data["posterior"].items():
        if not isinstance(entry, dict) or "mean" not in entry or "std" not in entry:
            return f"posterior {site!r} is not a mean and sd"
    return ""


def _field_problem(spec: dataclasses.Field, data: dict) -> str:
    meta = spec.metadata
    if spec.name not in data:
        required = spec.default is dataclasses.MISSING and \
            spec.default_factory is dataclasses.MISSING
        return f"{spec.name} is missing" if required else ""
    value = data[spec.name]
    if value is None and meta["null"]:
        return ""
    if meta["kind"] == _NUMBER and isinstance(value, float) and math.isnan(value) and \
            meta["null"]:
        return ""  # NaN: what a summary written before strict JSON holds for "no number"
    said, kinds = _KINDS[meta["kind"]]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        return f"{spec.name} is not {said}"
    return ""


def read(data: dict) -> Summary:
    """The typed view of a checked summary (``check`` returned ""), with the default filled in
    for each field a summary from an earlier version lacks."""
    cls = schema(data)
    values = {}
    for spec in dataclasses.fields(cls):
        if spec.name in data:
            values[spec.name] = data[spec.name]
        elif spec.default_factory is not dataclasses.MISSING:
            values[spec.name] = spec.default_factory()
    if isinstance(values.get("final_loss"), float) and math.isnan(values["final_loss"]):
        values["final_loss"] = None
    if values.get("diagnostics") is None:
        values["diagnostics"] = {}
    return cls(**values)


def of(data: dict) -> Summary:
    """The typed view of summary content that should be whole; a Reading error naming the
    field where it is not."""
    problem = check(data)
    if problem:
        raise Reading(problem)
    return read(data)
