"""A recipe's data as the model's arguments: inline values, a file, or a registered data set.

Arrays from a file or a data set are matched to the model's arguments by name (or through
``columns``); ones the model does not take are left out. Every array remembers where it came
from, so an error about it names the file and column.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import UsageError, did_you_mean

SUFFIXES = (".csv", ".json", ".npy", ".npz")
RESERVED = ("file", "columns", "dataset")


@dataclass
class Data:
    """The model's arguments by name, and where each came from."""

    values: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)


def gather(section: dict, takes: dict[str, bool], dataset: Any = None) -> Data:
    """The arrays a data section gives a model whose arguments are ``takes`` (name -> whether
    required). ``dataset`` is what the section's data set returned, if it names one.

    Inline values win; then ``columns`` picks arrays by name (a list of names stacks columns
    into a matrix); then arrays named as arguments are taken as they are.
    """
    data = Data()
    for key, value in section.items():
        if key not in RESERVED:
            data.values[key], data.origin[key] = value, f"data.{key}"
    if "file" in section:
        source, arrays = Path(section["file"]).name, read_file(Path(section["file"]))
    elif "dataset" in section:
        source = f"data set {section['dataset']['name']!r}"
        if not isinstance(dataset, Mapping):
            raise UsageError(f"{source}: gave {type(dataset).__name__}, not a mapping of arrays")
        arrays = dict(dataset)
    else:
        return data
    columns = section.get("columns") or {}
    for arg in columns:
        if arg not in takes:
            raise UsageError(f"data.columns.{arg}: the model takes no argument {arg!r}; "
                             f"{did_you_mean(arg, takes)}")
    for arg, required in takes.items():
        if arg in data.values:
            continue
        wanted = columns.get(arg, arg)
        names = wanted if isinstance(wanted, list) else [wanted]
        missing = [name for name in names if name not in arrays]
        if missing:
            if arg in columns or required:
                raise UsageError(f"{source}: no column {missing[0]!r} for the model's argument "
                                 f"{arg!r}; {did_you_mean(missing[0], arrays)}")
            continue
        values = [arrays[name] for name in names]
        data.values[arg] = _stack(values, source, names) if isinstance(wanted, list) else values[0]
        data.origin[arg] = f"{source} column " + ", ".join(repr(name) for name in names)
    return data


def read_file(path: Path) -> dict[str, Any]:
    """The named arrays in a CSV (by header), JSON (a mapping), NPY (named by the file's stem)
    or NPZ file."""
    name = path.name
    try:
        if path.suffix == ".csv":
            return _read_csv(path)
        if path.suffix == ".json":
            content = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(content, dict):
                raise UsageError(f"{name}: expected a JSON object of named arrays")
            return content
        import numpy

        if path.suffix == ".npy":
            return {path.stem: numpy.load(path, allow_pickle=False)}
        with numpy.load(path, allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{name}: no such data file ({path})") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{name}: cannot read it: {exc}") from None


def _read_csv(path: Path) -> dict[str, list[float]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if not header:
            raise UsageError(f"{path.name}: empty; a CSV file starts with a header of column names")
        header = [column.strip() for column in header]
        columns: dict[str, list[float]] = {column: [] for column in header}
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise UsageError(
                    f"{path.name} line {line}: {len(row)} values for {len(header)} columns")
            for column, text in zip(header, row):
                try:
                    columns[column].append(float(text))
                except ValueError:
                    raise UsageError(
                        f"{path.name} line {line} column {column!r}: {text!r} is not a number"
                    ) from None
    if not next(iter(columns.values()), []):
        raise UsageError(f"{path.name}: has a header but no rows")
    return columns


def _stack(arrays: list, source: str, names: list[str]) -> Any:
    """Columns side by side, as one (rows x columns) matrix."""
    lengths = {len(array) for array in arrays}
    if len(lengths) > 1:
        raise UsageError(f"{source}: columns {names} have different lengths")
    return [list(row) for row in zip(*arrays)]
