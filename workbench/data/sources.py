"""A recipe's data as the model's arguments: inline values, a file, or a registered data set.

Arrays from a file or a data set are matched to the model's arguments by name (or through
``columns``); ones the model does not take are left out. Every array remembers where it came
from, so an error about it names the file and column.
"""

from __future__ import annotations

import csv
import json
import math
import stat
import struct
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from workbench.errors import UsageError, did_you_mean, one_line

SUFFIXES = (".csv", ".json", ".npy", ".npz")
RESERVED = ("file", "columns", "dataset")
MB = 2**20
MAX_BINARY_BYTES = 512 * MB  # an NPY file, or what all the arrays of an NPZ file inflate to
MAX_TEXT_BYTES = 64 * MB  # a CSV or JSON file: parsed text takes several times its size
MAX_LINE_CHARS = MB  # one CSV line, so that one row cannot hold millions of fields
MAX_ZIP_DIRECTORY = MB  # an NPZ file's list of members: thousands of arrays
NPY_HEADER_BYTES = 2**16 + 16  # the magic string, the header's length and the header
ZIP_TAIL = 2**16 + 22 + 20  # a zip's end record, its comment, and a ZIP64 locator
READ_CHUNK = 16 * MB
MAX_DIMENSIONS = 32  # numpy's limit before 2.0; torch and numpy 2 stop at 64 with a traceback
_TEXT_ADVICE = f"save it as NPY or NPZ (up to {MAX_BINARY_BYTES // MB} MB)"
_BINARY_ADVICE = "use a sample of it, or a data set plugin that loads it"


@dataclass
class Data:
    """The model's arguments by name, and where each came from."""

    values: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)


@dataclass
class Rows:
    """The rows of the data one process holds under torchrun: rank ``rank`` of ``size`` takes
    rows rank, rank + size, rank + 2 size, ... A reader that reads only these sets ``total``,
    the whole data's number of rows; it stays None where the data came whole."""

    rank: int
    size: int
    total: int | None = None

    def of(self, total: int) -> slice:
        """The rows to keep of data with ``total`` rows (what a data set plugin that can read
        part of its data asks), noting ``total``."""
        if self.total is not None and self.total != total:
            raise UsageError(f"the data's arrays have different numbers of rows ({self.total} "
                             f"and {total}), so they cannot be split by rows")
        self.total = total
        return slice(self.rank, total, self.size)


def gather(section: dict, takes: dict[str, bool], dataset: Any = None,
           rows: Rows | None = None) -> Data:
    """The arrays a data section gives a model whose arguments are ``takes`` (name -> whether
    required). ``dataset`` is what the section's data set returned, if it names one. With
    ``rows``, an NPY or CSV file is read for those rows only (see ``read_file``).

    Inline values win; then ``columns`` picks arrays by name (a list of names stacks columns
    into a matrix); then arrays named as arguments are taken as they are.
    """
    data = Data()
    for key, value in section.items():
        if key not in RESERVED:
            data.values[key], data.origin[key] = value, f"data.{key}"
    if "file" in section:
        source, arrays = Path(section["file"]).name, read_file(Path(section["file"]), rows)
    elif "dataset" in section:
        source = f"data set {section['dataset']['name']!r}"
        if not isinstance(dataset, Mapping):
            raise UsageError(f"{source}: gave {type(dataset).__name__}, not a mapping of arrays")
        arrays = dict(dataset)
    else:
        _check_nesting(data)
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
        for name, value in zip(names, values):
            if _has_no_values(value):
                raise UsageError(f"{source} column {name!r}: has no values; the model's "
                                 f"argument {arg!r} needs at least one")
        data.values[arg] = _stack(values, source, names) if isinstance(wanted, list) else values[0]
        data.origin[arg] = f"{source} column " + ", ".join(repr(name) for name in names)
    _check_nesting(data)
    return data


def _check_nesting(data: Data) -> None:
    """Refuse an argument nested deeper than any array can be, before it reaches torch."""
    for arg, value in data.values.items():
        depth = _nesting(value, MAX_DIMENSIONS, {})
        if depth > MAX_DIMENSIONS:
            raise UsageError(f"{data.origin[arg]}: nested more than {MAX_DIMENSIONS} deep; data "
                             f"are arrays of at most {MAX_DIMENSIONS} dimensions")


def _nesting(value: Any, room: int, seen: dict[int, int]) -> int:
    """How deep lists nest in ``value`` (an array's dimensions count), looking no more than
    ``room`` below it; each list shared by YAML aliases is walked once."""
    if not isinstance(value, (list, tuple)):
        return len(getattr(value, "shape", ()))
    if room <= 0:
        return 1
    if id(value) not in seen:
        seen[id(value)] = 1 + max((_nesting(item, room - 1, seen) for item in value), default=0)
    return seen[id(value)]


def read_file(path: Path, rows: Rows | None = None) -> dict[str, Any]:
    """The named arrays in a CSV (by header), JSON (a mapping), NPY (named by the file's stem)
    or NPZ file; a file too large, damaged or holding other than numbers is a UsageError.

    With ``rows`` a CSV file's columns and an NPY array hold only those rows (its first
    dimension), and ``rows.total`` is set: the process holds its share of the data, never the
    whole. JSON and NPZ files are read whole (the rows are kept later)."""
    name, suffix = path.name, path.suffix.lower()
    try:
        size = _file_size(path)
        if suffix in (".csv", ".json"):
            _check_size(name, size, MAX_TEXT_BYTES, "a CSV or JSON", _TEXT_ADVICE)
            return _read_csv(path, rows) if suffix == ".csv" else _read_json(path)
        _check_size(name, size, MAX_BINARY_BYTES, "an NPY or NPZ", _BINARY_ADVICE)
        if size == 0:
            raise UsageError(f"{name}: is empty (0 bytes); write arrays into it with "
                             "numpy.save or numpy.savez")
        if suffix == ".npy":
            with path.open("rb") as handle:
                return {path.stem: _read_npy(handle, size, name, rows, path)}
        return _read_npz(path, size)
    except UsageError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{name}: no such data file ({path})") from None
    except UnicodeDecodeError:
        excel = " (in Excel: CSV UTF-8)" if suffix == ".csv" else ""
        raise UsageError(f"{name}: is not UTF-8 text; save it as UTF-8{excel}") from None
    except OSError as exc:
        raise UsageError(f"{name}: cannot read it: {exc.strerror or exc}") from None


def _file_size(path: Path) -> int:
    """The size of a regular file; a directory, device or pipe is refused before it is opened,
    as reading one can hang or never end."""
    info = path.stat()
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{path.name}: is a directory, not a data file ({path})")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{path.name}: is not a regular file (a device or a pipe); "
                         "give a data file")
    return info.st_size


def _check_size(name: str, size: int, limit: int, kind: str, advice: str) -> None:
    """Refuse a file over its kind's limit, before reading it takes memory and time."""
    if size > limit:
        raise UsageError(f"{name}: {size / MB:.1f} MB is over the {limit // MB} MB limit for "
                         f"{kind} data file; {advice}")


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object of named arrays."""
    name = path.name
    with path.open("rb") as handle:
        content = handle.read(MAX_TEXT_BYTES + 1)
    _check_size(name, len(content), MAX_TEXT_BYTES, "a CSV or JSON", _TEXT_ADVICE)
    text = content.decode("utf-8-sig")
    try:
        content = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, name))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{name} line {exc.lineno} column {exc.colno}: not valid JSON: "
                         f"{exc.msg}") from None
    except RecursionError:
        raise UsageError(f"{name}: nested too deeply to be data; a JSON data file is an "
                         "object of arrays") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise UsageError(f"{name}: not valid JSON: {one_line(exc).split(';')[0]}") from None
    if not isinstance(content, dict):
        raise UsageError(f"{name}: expected a JSON object of named arrays")
    return content


def _unique_keys(pairs: list[tuple[str, Any]], name: str) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a name given twice (JSON keeps the last)."""
    content: dict[str, Any] = {}
    for key, value in pairs:
        if key in content:
            raise UsageError(f"{name}: names {key!r} twice; give each array its own name")
        content[key] = value
    return content


def _read_csv(path: Path, keep: Rows | None = None) -> dict[str, Any]:
    """Each column of numbers by its header's name, as one float64 array; with ``keep``, of
    its rows only (the others are counted, not parsed)."""
    import numpy

    name = path.name
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = csv.reader(_lines(handle, name))
        try:
            header = next(rows, None)
            if not header:
                raise UsageError(f"{name}: empty; a CSV file starts with a header of column names")
            header = [column.strip() for column in header]
            _check_header(header, name)
            values = array("d")  # row after row: 8 bytes a number, not a float object's 32
            count = 0
            for row in rows:
                if not row:
                    continue
                count += 1
                if keep is not None and (count - 1) % keep.size != keep.rank:
                    continue
                if len(row) != len(header):
                    raise UsageError(
                        f"{name} line {rows.line_num}: {len(row)} values for {len(header)} columns")
                try:
                    values.extend(map(float, row))
                except ValueError:
                    _refuse_row(row, header, f"{name} line {rows.line_num}")
        except csv.Error as exc:
            raise UsageError(f"{name} line {rows.line_num}: not valid CSV ({exc}); is it a "
                             "CSV file?") from None
    if not count:
        raise UsageError(f"{name}: has a header but no rows")
    if keep is not None:
        keep.of(count)
    table = numpy.frombuffer(values, dtype=numpy.float64).reshape(-1, len(header))
    return {column: table[:, index] for index, column in enumerate(header)}


def _lines(handle: Iterable[str], name: str) -> Iterator[str]:
    """A text file's lines, refusing one so long that its row alone could take gigabytes."""
    for number, line in enumerate(handle, start=1):
        if len(line) > MAX_LINE_CHARS:
            raise UsageError(f"{name} line {number}: over {MAX_LINE_CHARS} characters long; "
                             "is it a CSV file?")
        yield line


def _check_header(header: list[str], name: str) -> None:
    """Refuse a header naming a column twice: the columns' values would be mixed up."""
    seen: dict[str, int] = {}
    for number, column in enumerate(header, start=1):
        if column in seen:
            raise UsageError(f"{name}: the header names column {column!r} twice (columns "
                             f"{seen[column]} and {number}); give each column its own name")
        seen[column] = number


def _refuse_row(row: list[str], header: list[str], where: str) -> None:
    """Name the first value in a row that is not a number."""
    for column, text in zip(header, row):
        try:
            float(text)
        except ValueError:
            shown = repr(text) if len(text) <= 40 else repr(text[:37]) + "..."
            raise UsageError(f"{where} column {column!r}: {shown} is not a number") from None


def _read_npz(path: Path, size: int) -> dict[str, Any]:
    """The arrays of an NPZ file (a zip of NPY files, as numpy.savez writes), each member's
    size and header checked before it is inflated."""
    import zipfile
    import zlib

    name = path.name
    _check_zip_directory(path, size)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            _check_members(members, name)
            arrays = {}
            for member in members:
                with archive.open(member) as handle:
                    arrays[member.filename[:-4]] = _read_npy(
                        handle, member.file_size, f"{name} member {member.filename!r}")
            return arrays
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError,
            struct.error, ValueError, OSError) as exc:  # OSError: a seek the damage misplaced
        raise UsageError(f"{name}: not a readable NPZ file ({one_line(exc)}); save it again "
                         "with numpy.savez") from None


def _check_zip_directory(path: Path, size: int) -> None:
    """Refuse a zip whose directory alone is large: zipfile holds an object per member, so a
    small file listing millions of members takes gigabytes before any member is read."""
    with path.open("rb") as handle:
        handle.seek(max(0, size - ZIP_TAIL))
        tail = handle.read()
    signature = b"PK\x05\x06"  # found as zipfile finds it: the last 22 bytes, else searched
    plain = tail[-22:-18] == signature and tail[-2:] == b"\0\0"
    end = len(tail) - 22 if plain else tail.rfind(signature)
    if end < 0 or len(tail) < end + 22:
        return  # not a zip: zipfile says so
    directory = struct.unpack_from("<I", tail, end + 12)[0]
    zip64 = tail[max(0, end - 20):end].startswith(b"PK\x06\x07")  # numpy writes one only
    if zip64 or directory > MAX_ZIP_DIRECTORY:  # for over 65535 arrays or 4 GB
        raise UsageError(f"{path.name}: lists too many arrays (a zip directory over "
                         f"{MAX_ZIP_DIRECTORY // MB} MB); an NPZ data file holds a few arrays")


def _check_members(members: list, name: str) -> None:
    """Every member is a .npy array, named once, and all of them inflate to at most
    MAX_BINARY_BYTES."""
    seen = set()
    for member in members:
        if not member.filename.endswith(".npy"):
            raise UsageError(f"{name}: holds {member.filename!r}, not an NPY array; an NPZ "
                             "file holds only arrays, as numpy.savez writes them")
        if member.filename in seen:
            raise UsageError(f"{name}: holds {member.filename!r} twice; give each array its "
                             "own name")
        seen.add(member.filename)
    total = sum(member.file_size for member in members)
    _check_size(name, total, MAX_BINARY_BYTES, "the arrays of an NPZ", _BINARY_ADVICE)


def _read_npy(handle: BinaryIO, size: int, where: str, rows: Rows | None = None,
              path: Path | None = None) -> Any:
    """One array from an open NPY stream of ``size`` bytes. Its header is read first and
    must describe plain numbers filling exactly the rest of the stream, so no memory is
    taken for an array the file does not hold; nothing in it can run code. With ``rows`` and
    the file's ``path``, only those rows are read (the file mapped into memory, the rows
    copied out of it)."""
    import numpy

    shape, fortran_order, dtype = _npy_header(_Capped(handle, NPY_HEADER_BYTES), where)
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise UsageError(f"{where}: holds {dtype} values, not plain numbers; save an array "
                         "of bool, int or float")
    count = math.prod(shape)
    nbytes, data_bytes = count * dtype.itemsize, size - handle.tell()
    if nbytes != data_bytes:
        raise UsageError(f"{where}: its header promises {count} values of {dtype} "
                         f"({nbytes} bytes) in shape {shape}, but {data_bytes} bytes follow "
                         "it; the file is damaged or cut short: save it again")
    if rows is not None and path is not None and shape and count:
        mapped = numpy.memmap(path, dtype=dtype, mode="r", offset=handle.tell(), shape=shape,
                              order="F" if fortran_order else "C")
        part = numpy.array(mapped[rows.of(shape[0])])
        del mapped
        return part if dtype.isnative else part.astype(dtype.newbyteorder("="))
    flat = numpy.empty(count, dtype=dtype)
    buffer, done = flat.view(numpy.uint8), 0
    while done < nbytes:
        got = handle.readinto(buffer[done:done + READ_CHUNK])
        if not got:
            raise UsageError(f"{where}: cut short after {done} of {nbytes} bytes of data; "
                             "save it again")
        done += got
    shaped = flat.reshape(shape, order="F" if fortran_order else "C")
    return shaped if dtype.isnative else shaped.astype(dtype.newbyteorder("="))


def _npy_header(handle: Any, where: str) -> tuple[tuple[int, ...], bool, Any]:
    """An NPY stream's shape, order and dtype, read by numpy's own header parser."""
    import tokenize

    from numpy.lib import format as npy

    try:
        version = npy.read_magic(handle)
        if version == (1, 0):
            shape, fortran_order, dtype = npy.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran_order, dtype = npy.read_array_header_2_0(handle)
        else:
            raise UsageError(f"{where}: NPY format version {version[0]}.{version[1]} is not "
                             "supported; save arrays with numpy.save or numpy.savez")
    except (ValueError, TypeError, SyntaxError, RecursionError, tokenize.TokenError) as exc:
        raise UsageError(f"{where}: not an NPY array ({one_line(exc)}); save arrays with "
                         "numpy.save or numpy.savez") from None
    if any(length < 0 for length in shape):
        raise UsageError(f"{where}: its header gives the shape {shape}; the file is damaged")
    return shape, fortran_order, dtype


class _Capped:
    """The first bytes of a stream: numpy's header parser reads as many bytes as the header
    claims to have, which a damaged file can make gigabytes."""

    def __init__(self, handle: BinaryIO, limit: int):
        self.handle, self.left = handle, limit

    def read(self, size: int = -1) -> bytes:
        """At most ``size`` bytes, and never more than are left of the cap."""
        data = self.handle.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data


def _stack(arrays: list, source: str, names: list[str]) -> Any:
    """Columns side by side, as one (rows x columns) matrix."""
    import numpy

    for values, name in zip(arrays, names):
        if not isinstance(values, (list, tuple)) and getattr(values, "ndim", None) != 1:
            raise UsageError(f"{source} column {name!r}: not a list of numbers, so it cannot "
                             "be a column of a matrix")
    lengths = {len(values) for values in arrays}
    if len(lengths) > 1:
        raise UsageError(f"{source}: columns {names} have different lengths")
    if all(isinstance(values, numpy.ndarray) for values in arrays):
        return numpy.column_stack(arrays)
    return [list(row) for row in zip(*arrays)]


def _has_no_values(value: Any) -> bool:
    """Whether an array (a list, numpy array or tensor) has a dimension of length 0."""
    while isinstance(value, (list, tuple)):
        if not value:
            return True
        value = value[0]
    return 0 in tuple(getattr(value, "shape", ()))
