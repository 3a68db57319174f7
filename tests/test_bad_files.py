"""Bad data files: each is refused in one line (a UsageError; exit 2 from the CLI) naming the
file, never a traceback, a hang or a memory blow-up; size limits are checked before reading."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy
import pytest
from numpy.lib import format as npy

from tests.helpers import COIN, vibench
from workbench.data import sources as data_module
from workbench.data.sources import gather, read_file
from workbench.errors import UsageError

MB = 2**20


def npy_header(shape: tuple, descr: str = "<f8") -> bytes:
    """An NPY file's magic string and header, as numpy.save writes them, with no data."""
    stream = io.BytesIO()
    npy.write_array_header_1_0(stream, {"descr": descr, "fortran_order": False, "shape": shape})
    return stream.getvalue()


def savez_bytes(**arrays) -> bytes:
    stream = io.BytesIO()
    numpy.savez(stream, **arrays)
    return stream.getvalue()


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w", compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return stream.getvalue()


def npy_bytes(array: numpy.ndarray) -> bytes:
    stream = io.BytesIO()
    numpy.save(stream, array)
    return stream.getvalue()


def refused(path: Path) -> str:
    """The one-line message read_file refuses ``path`` with."""
    with pytest.raises(UsageError) as caught:
        read_file(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(path.name), message
    return message


BAD_FILES: list[tuple[str, Callable[[], bytes], str]] = [
    ("flips.npy", lambda: b"", "flips.npy: is empty (0 bytes)"),
    ("flips.npy", lambda: npy_header((10**12,)),
     "its header promises 1000000000000 values of float64 (8000000000000 bytes) in shape "
     "(1000000000000,), but 0 bytes follow it; the file is damaged or cut short"),
    ("flips.npy", lambda: npy_bytes(numpy.arange(100.0))[:300], "but 172 bytes follow it"),
    ("flips.npy", lambda: npy_bytes(numpy.arange(3.0)) + b"extra", "but 29 bytes follow it"),
    ("flips.npy", lambda: npy_header((1,), "|O") + bytes(8),
     "holds object values, not plain numbers; save an array of bool, int or float"),
    ("flips.npy", lambda: npy_bytes(numpy.ones(2, complex)), "holds complex128 values"),
    ("flips.npy", lambda: npy_bytes(numpy.array(["1", "0"])), "holds <U1 values"),
    ("flips.npy", lambda: b"\x93NUMPY\x01\x00" + struct.pack("<H", 60000) + b"{" * 20,
     "not an NPY array (EOF: reading array header"),
    ("flips.npy", lambda: b"not numpy at all", "flips.npy: not an NPY array"),
    ("flips.npy", lambda: b"\x93NUMPY\x09\x00" + bytes(100), "NPY format version 9.0 is not "
                                                             "supported"),
    ("flips.npz", lambda: savez_bytes(flips=numpy.arange(1000.0))[:400],
     "not a readable NPZ file (File is not a zip file); save it again with numpy.savez"),
    ("flips.npz", lambda: savez_bytes(flips=numpy.arange(1000.0))[:-30],
     "not a readable NPZ file"),
    ("flips.npz", lambda: zip_of({"readme.txt": b"hello"}),
     "holds 'readme.txt', not an NPY array; an NPZ file holds only arrays"),
    ("flips.npz", lambda: b"just text", "not a readable NPZ file"),
    ("flips.npz", lambda: zip_of({"flips.npy": npy_header((10**9,)) + bytes(80)},
                                 zipfile.ZIP_DEFLATED),
     "flips.npz member 'flips.npy': its header promises 1000000000 values"),
    ("flips.npz", lambda: zip_of({"flips.npy": npy_header((2,), "|O") + bytes(16)}),
     "flips.npz member 'flips.npy': holds object values"),
    ("flips.npz", lambda: b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, 50 * MB, 0, 0),
     "lists too many arrays"),
    ("flips.csv", lambda: b"flips,flips\n1,0\n1,1\n0,0\n",
     "flips.csv: the header names column 'flips' twice (columns 1 and 2); give each column "
     "its own name"),
    ("flips.csv", lambda: b'flips\n"' + b"1" * 200_000 + b'"\n',
     "flips.csv line 2: not valid CSV (field larger than field limit (131072))"),
    ("flips.csv", lambda: "flips\n1\né\n".encode("latin-1"),
     "flips.csv: is not UTF-8 text; save it as UTF-8"),
    ("flips.csv", lambda: b"flips\n1\n" + b"x" * 1000 + b"\n",
     "flips.csv line 3 column 'flips': 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... is not a "
     "number"),
    ("flips.json", lambda: b"[" * 100_000 + b"]" * 100_000,
     "flips.json: nested too deeply to be data"),
    ("flips.json", lambda: b'{"flips": [1], "flips": [0, 1]}',
     "flips.json: names 'flips' twice; give each array its own name"),
    ("flips.json", lambda: b'{"flips": [1, 0,]}', "flips.json line 1 column 17: not valid JSON"),
    ("flips.json", lambda: b'{"flips": [' + b"9" * 5000 + b"]}",
     "flips.json: not valid JSON: Exceeds the limit (4300 digits)"),
    ("flips.json", lambda: b"\xff\xfe{}", "flips.json: is not UTF-8 text"),
]


@pytest.mark.parametrize("name, content, expected", BAD_FILES,
                         ids=[expected[:40] for _, _, expected in BAD_FILES])
def test_bad_files_are_refused_in_one_line(tmp_path: Path, name: str, content, expected: str):
    path = tmp_path / name
    path.write_bytes(content())
    assert expected in refused(path)


def test_a_directory_named_like_a_data_file_is_refused(tmp_path: Path):
    (tmp_path / "x.csv").mkdir()
    assert refused(tmp_path / "x.csv").startswith("x.csv: is a directory, not a data file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path):
    os.mkfifo(tmp_path / "x.csv")
    assert "is not a regular file (a device or a pipe)" in refused(tmp_path / "x.csv")


@pytest.mark.parametrize("name, limit, content, expected", [
    ("x.csv", "MAX_TEXT_BYTES", b"x\n" + b"1\n" * MB,
     "x.csv: 2.0 MB is over the 1 MB limit for a CSV or JSON data file; save it as NPY or NPZ"),
    ("x.json", "MAX_TEXT_BYTES", json.dumps({"x": [1] * MB}).encode(),
     "x.json: 3.0 MB is over the 1 MB limit for a CSV or JSON data file"),
    ("x.npy", "MAX_BINARY_BYTES", npy_bytes(numpy.zeros(MB // 4)),
     "x.npy: 2.0 MB is over the 1 MB limit for an NPY or NPZ data file"),
    ("x.npz", "MAX_BINARY_BYTES", savez_bytes(x=numpy.zeros(MB // 4)),
     "x.npz: 2.0 MB is over the 1 MB limit for an NPY or NPZ data file"),
    ("x.csv", "MAX_LINE_CHARS", b"x\n" + b"1," * MB + b"1\n", "x.csv line 2: over 1048576 "
                                                             "characters long"),
])
def test_files_over_their_limit_are_refused_before_reading(
        tmp_path: Path, monkeypatch, name: str, limit: str, content: bytes, expected: str):
    monkeypatch.setattr(data_module, limit, MB)
    path = tmp_path / name
    path.write_bytes(content)
    assert refused(path).startswith(expected)


def test_an_npz_that_inflates_past_the_limit_is_refused_unread(tmp_path: Path, monkeypatch):
    """Its members' sizes are checked before any is inflated: 2 MB of zeros compress to KBs."""
    monkeypatch.setattr(data_module, "MAX_BINARY_BYTES", MB)
    path = tmp_path / "x.npz"
    numpy.savez_compressed(path, x=numpy.zeros(MB // 4))
    assert path.stat().st_size < 10_000
    assert refused(path).startswith("x.npz: 2.0 MB is over the 1 MB limit for the arrays of an "
                                    "NPZ data file")


def test_a_csv_with_a_byte_order_mark_names_its_first_column_plainly(tmp_path: Path):
    path = tmp_path / "x.csv"
    path.write_bytes("flips,other\n1,7\n0,7\n".encode("utf-8-sig"))
    assert gather({"file": str(path)}, {"flips": True}).values["flips"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("name, write", [
    ("x.npy", lambda path: numpy.save(path, numpy.zeros(0))),
    ("x.npz", lambda path: numpy.savez(path, flips=numpy.zeros((0, 3)))),
    ("x.json", lambda path: path.write_text('{"flips": [[]]}')),
])
def test_an_empty_array_from_a_file_is_refused_naming_it(tmp_path: Path, name: str, write):
    path = tmp_path / name
    write(path)
    column = "x" if name == "x.npy" else "flips"
    with pytest.raises(UsageError) as caught:
        gather({"file": str(path), "columns": {"flips": column}}, {"flips": True})
    assert str(caught.value) == (f"{name} column {column!r}: has no values; the model's "
                                 "argument 'flips' needs at least one")


def test_stacking_a_column_that_is_not_a_list_is_refused(tmp_path: Path):
    path = tmp_path / "x.json"
    path.write_text('{"a": [1, 2], "J": 3}')
    with pytest.raises(UsageError, match="x.json column 'J': not a list of numbers"):
        gather({"file": str(path), "columns": {"x": ["a", "J"]}}, {"x": True})


def test_binary_arrays_keep_their_values_shape_and_order(tmp_path: Path):
    fortran = numpy.asfortranarray(numpy.arange(6.0).reshape(2, 3))
    numpy.savez_compressed(tmp_path / "x.npz", f=fortran, b=numpy.array([1, 2], ">i4"),
                           s=numpy.float32(2.5), t=numpy.array([True, False]))
    arrays = read_file(tmp_path / "x.npz")
    assert arrays["f"].tolist() == fortran.tolist()
    assert arrays["b"].tolist() == [1, 2] and arrays["b"].dtype.isnative
    assert arrays["s"].shape == () and arrays["s"] == 2.5
    assert arrays["t"].tolist() == [True, False]


@pytest.mark.parametrize("name, good", [
    ("x.npy", npy_bytes(numpy.arange(5.0))),
    ("x.npz", savez_bytes(a=numpy.arange(5.0), b=numpy.ones((2, 2), bool))),
    ("x.csv", b'a,"b c"\n1,2.5\n3,-4e3\n'),
    ("x.json", json.dumps({"a": [1, 2.5], "b": [[1, 2], [3, 4]]}).encode()),
])
def test_damaged_files_are_read_or_refused_never_anything_else(tmp_path: Path, name, good):
    """Every truncation, and each byte overwritten in turn: a value or a UsageError."""
    path, rng = tmp_path / name, random.Random(0)
    variants = [good[:end] for end in range(len(good))]
    for index in range(len(good)):
        for byte in (0, 0xFF, rng.randrange(256)):
            variants.append(good[:index] + bytes([byte]) + good[index + 1:])
    for variant in variants:
        path.write_bytes(variant)
        try:
            read_file(path)
        except UsageError as error:
            assert "\n" not in str(error)


@pytest.mark.parametrize("name, content, expected", [
    ("flips.npy", b"", "error: flips.npy: is empty (0 bytes)"),  # was "interrupted", exit 130
    ("flips.npy", npy_bytes(numpy.zeros(0)), "error: flips.npy column 'flips': has no values"),
    ("flips.npy", npy_header((10**12,)), "error: flips.npy: its header promises"),
    ("flips.csv", b"flips,flips\n1,0\n1,1\n0,0\n", "error: flips.csv: the header names column "
                                                   "'flips' twice"),
    ("flips.npz", b"PK\x03\x04 not a zip", "error: flips.npz: not a readable NPZ file"),
])
def test_the_cli_refuses_bad_data_files_in_one_line(tmp_path: Path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    result = vibench("run", str(COIN), "--set", "data=null", "--set", f"data.file={path}",
                     "--out", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "run").exists()
