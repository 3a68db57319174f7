"""A comparison in words: the table on stdout (a row per combination, its seeds combined, and
what the columns mean) and compare.csv (a row per run)."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

from workbench.compare.metrics import METRICS, combined, mean, untrusted
from workbench.compare.plan import Grid
from workbench.compare.results import Result, group
from workbench.report.thresholds import KHAT_TRUSTED

CSV_TAIL = ("seed", "status", "exit_code", *METRICS, "khat_reading", "steps", "wall_seconds",
            "process_seconds", "run_dir", "error")
COLUMNS = (  # the table's number columns: header, the metric, its format
    ("ELBO", "elbo", ".3f"),
    ("log evidence", "log_evidence", ".3f"),
    ("mean error / sd", "mean_error_sd", ".3f"),
    ("sd ratio", "sd_ratio", ".2f"),
    ("k-hat", "khat", ".2f"),
    ("train loss", "final_loss", ".4f"),
    ("steps/s", "steps_per_second", ".0f"),
)


def write_csv(path: Path, grids: list[Grid], results: list[Result]) -> None:
    """compare.csv: a row per run, its grid values then CSV_TAIL ("" for what it lacks)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(g.key for g in grids), *CSV_TAIL])
        for r in results:
            row = {"seed": r.spec.seed, "status": r.status, "exit_code": r.exit_code,
                   **r.metrics, "khat_reading": r.khat_reading, "steps": r.steps,
                   "wall_seconds": r.wall_seconds,
                   "process_seconds": r.process_seconds, "run_dir": str(r.run_dir),
                   "error": r.error}
            writer.writerow([*r.spec.combo,
                             *("" if row.get(c) is None else row.get(c) for c in CSV_TAIL)])


def print_table(grids: list[Grid], results: list[Result]) -> None:
    """One row per combination, the seeds combined, and under it what the columns mean; the
    status column gives way first on a narrow terminal, and every failure's error follows the
    table in full."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    rows = [[*g[0].spec.combo, *_row(g)] for g in group(results)]
    headers = [*(g.key for g in grids), "runs", *(c[0] for c in COLUMNS), "wall s"]
    console = Console() if sys.stdout.isatty() else Console(width=200, no_color=True)
    widths, room = _widths(headers, rows, len(grids), console.width)
    frame = 3 * (len(headers) + 1) + 1
    if sum(widths) + frame + room > console.width:  # too narrow: keep every cell whole and
        console = Console(width=sum(widths) + frame + room)  # let the terminal wrap lines
    table = Table(box=box.SIMPLE_HEAD)
    for i, header in enumerate(headers):
        table.add_column(header, width=widths[i], overflow="fold",
                         justify="left" if i < len(grids) else "right")
    table.add_column("status", width=min(room, max(len(row[-1]) for row in rows + [["status"]])),
                     no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in table_notes(results):
        console.print(line, markup=False, highlight=False, overflow="fold")
    for r in results:  # the table may cut an error short: each in full
        if r.status != "ok":
            console.print(f"{r.status}: {r.run_dir.name}: {r.error}",
                          markup=False, highlight=False, overflow="fold")


def _widths(headers: list[str], rows: list[list[str]], keys: int,
            width: int) -> tuple[list[int], int]:
    """The widths of the columns before the status column, and the room left for it.

    Set here, not by rich: the grid's values and the numbers keep their width (their headers
    wrap on a narrow terminal) and the status column gives way. A grid value wraps at its
    spaces past 24 characters, never inside a word: a component's name
    (auto_lowrank_multivariate_normal) stays whole on one line."""
    cells = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    natural = [max(len(h), c) for h, c in zip(headers, cells)]
    compact = [max(max(len(w) for w in re.split(r"[ .]", h)), c) for h, c in zip(headers, cells)]
    frame = 3 * (len(headers) + 1) + 1  # each column's padding and rule, and the edges
    widths = natural if sum(natural) + frame + 12 <= width else compact
    words = [max(len(w) for row in rows for w in row[i].split() or [""]) for i in range(keys)]
    widths = [min(w, max(24, words[i])) if i < keys else w for i, w in enumerate(widths)]
    return widths, max(12, width - sum(widths) - frame)


def _row(runs: list[Result]) -> list[str]:
    """A combination's cells after its grid values: runs done, the COLUMNS, wall time and
    status. "-": no run to read it from; "n/a": the runs do not have it (no exact posterior,
    no diagnostics); "!" after the k-hat: do not trust this fit."""
    ok = [r for r in runs if r.status == "ok"]
    shown = ok or [r for r in runs if r.status == "interrupted"]  # what it had learned
    cells = [f"{len(ok)}/{len(runs)}"]
    for _, key, spec in COLUMNS:
        value = combined(shown, key)
        cells.append("-" if not shown else "n/a" if value is None else format(value, spec))
    if untrusted(combined(shown, "khat")):
        cells[1 + [c[1] for c in COLUMNS].index("khat")] += " !"
    se = combined(shown, "log_evidence_se")
    if se is not None and cells[2] not in ("-", "n/a"):
        cells[2] += f" ± {se:.3f}"
    wall = mean([r.wall_seconds for r in shown])
    return [*cells, "-" if wall is None else f"{wall:.1f}", _status_cell(runs)]


def table_notes(results: list[Result]) -> list[str]:
    """What the table's columns mean, the lines that apply to these results."""
    shown = [r for r in results if r.status in ("ok", "interrupted")]
    draws = {r.draws for r in shown if r.draws is not None}
    counted = f"the same {draws.pop()}" if len(draws) == 1 else "the same number of"
    notes = [f"ELBO, log evidence ± se: from {counted} guide draws for every run, whatever its "
             "loss; train loss is each run's own objective, not comparable across losses or "
             "guides."]
    if any(r.metrics.get("mean_error_sd") is not None for r in shown):
        notes.append("mean error / sd = |guide mean - exact mean| / exact sd, sd ratio = guide "
                     "sd / exact sd (1 is right): the worst site or element (against a "
                     "reference posterior: the report's z and r, worst parameter).")
    if any(r.metrics.get(key) is None for r in shown for _, key, _ in COLUMNS):
        notes.append("n/a: not known for these runs (mean error / sd, sd ratio: no exact "
                     "posterior; ELBO, log evidence, k-hat: no diagnostics).")
    if any(len(g) > 1 for g in group(results)):
        notes.append("seeds: mean error / sd, sd ratio and k-hat are the worst seed's; the "
                     "other numbers, the mean over seeds.")
    if any(untrusted(r.metrics.get("khat")) for r in shown):
        notes.append(f"! k-hat > {KHAT_TRUSTED} in at least one seed: do not trust this fit; "
                     "the guide misses the posterior's tails and its numbers, log evidence "
                     "included, may be far off.")
    return notes


def _status_cell(runs: list[Result]) -> str:
    """ok, or how many of a combination's runs failed or were interrupted, and the first one's
    error."""
    bad = [r for r in runs if r.status != "ok"]
    if not bad:
        return "ok"
    word = "interrupted" if all(r.status == "interrupted" for r in bad) else "failed"
    first = next(r for r in bad if r.status == word)
    error = first.error.removeprefix("error: ")
    if len(bad) < len(runs):
        return f"{len(bad)} of {len(runs)} {word}: {error}"
    return error if error.startswith(word) else f"{word}: {error}"
