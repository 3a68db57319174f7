"""Run directories: a new one for every run, never one that holds anything already."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from workbench.errors import UsageError


def make_run_dir(name: str, out: Path | None = None) -> Path:
    """A new, empty run directory: ``out`` if given, else ``runs/<name>-<timestamp>``.

    Never an existing non-empty one, so no run writes over another.
    """
    if out is not None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--out {out}: already exists and is not an empty directory")
        out.mkdir(parents=True, exist_ok=True)
        return out
    base = Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1000):
        path = base if attempt == 0 else base.with_name(f"{base.name}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UsageError(f"cannot find a free run directory next to {base}")
