"""TensorBoard's event file, written in the run's own thread: the default logger.

tensorboardX's SummaryWriter queues events for a background thread that it can only close,
not drain, and that dies silently on a full disk. Writing synchronously lets a checkpoint make
every event up to it durable with one ``flush``, and a write error reaches the run as an
``OSError``, which it reports.

A scalar, logged every step, comes in a batch from the run's ``Loggers`` (at most about a
second old) and is queued as its numbers; the queue is encoded by hand (the few bytes of each
scalar's protobuf), framed and written in batches (at each flush, every 4096 records, and at
least every second while scalars come, so a live TensorBoard sees a step within about two),
each run of scalars of one tag encoded together with numpy. Each record's CRC-32C is Google's C
implementation's (``google-crc32c``): tensorboardX's pure-Python one cost more per step than a
compiled step's Python overhead. The file is byte for byte a TFRecord file of ``Event``
protos either way.
"""

from __future__ import annotations

import functools
import math
import socket
import struct
import time
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import HistogramProto, Summary

from workbench.rundir import files

BATCH = 4096  # records queued before they are written (a flush writes them too)
LIVE_SECONDS = 1.0  # the longest a logged event waits in the queue, while scalars come
TOGETHER = 16  # scalars of one tag encoded together, with numpy, from this many


@functools.cache
def _tensorflow_bins() -> np.ndarray:
    """TensorBoard's own histogram buckets: +-1e-12 to 1e20, each 1.1 times the last (an
    array made once: numpy converting the list of 3,000 edges cost more than the histogram)."""
    edges, v = [], 1e-12
    while v < 1e20:
        edges.append(v)
        v *= 1.1
    return np.array([-e for e in reversed(edges)] + [0.0] + edges)


class EventLog:
    """One event file in ``run_dir``; a run that resumes at ``start_step`` starts a new file
    that tells TensorBoard to drop the old files' events from that step on."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        name = (f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}"
                f".{start_step:09d}")
        self.path = run_dir / name
        self._file = files.open_for_writing(self.path)
        self._pending: list[bytes | tuple] = []  # events, or scalars as scalar_event's args
        self._tags: dict[str, bytes] = {}  # tag -> scalar_summary(tag)
        self._due = time.time() + LIVE_SECONDS  # when queued events go to the file anyway
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if start_step:
            self._write(Event(wall_time=time.time(), step=start_step,
                              session_log=SessionLog(status=SessionLog.START)))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars([(tag, value, step, time.time())])

    def scalars(self, records: list[tuple[str, float, int, float]]) -> None:
        """Scalars as ``(tag, value, step, wall_time)``, queued as their numbers: each is
        encoded with its run at the drain."""
        tags, pending = self._tags, self._pending
        for tag, value, step, wall_time in records:
            fixed = tags.get(tag)
            if fixed is None:
                fixed = tags[tag] = scalar_summary(tag)
            pending.append((wall_time, step, fixed, value))
        if len(pending) >= BATCH:
            self._drain()
        elif time.time() >= self._due:  # a slow run's curve still reaches a live TensorBoard
            self._drain()
            self._file.flush()

    def histogram(self, tag: str, values: Any, step: int) -> None:
        self._summary(Summary(value=[Summary.Value(tag=tag, histo=histogram(values))]), step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """An HxWxC uint8 or float image array."""
        from tensorboardX.summary import image as image_summary

        self._summary(image_summary(tag, image, dataformats="HWC"), step)

    def flush(self) -> None:
        """Every event logged so far, handed to the operating system: a run killed after a
        checkpoint keeps them, as it keeps losses.f64. No fsync (tensorboardX's writer made
        one at each flush, 6-60 ms a checkpoint here, inside the training loop): only the
        checkpoint itself is synced, for its atomic rename."""
        self._drain()
        self._file.flush()

    def close(self, summary: dict | None = None) -> None:
        self.flush()
        self._file.close()

    def _summary(self, summary: Summary, step: int) -> None:
        self._write(Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event: Event) -> None:
        self._pending.append(event.SerializeToString())
        if len(self._pending) >= BATCH:
            self._drain()

    def _drain(self) -> None:
        self._due = time.time() + LIVE_SECONDS
        if self._pending:
            records, self._pending = self._pending, []
            self._file.write(frame(records))


def histogram(values: Any) -> HistogramProto:
    """``values`` in TensorBoard's own buckets, as tensorboardX's ``make_histogram`` counts
    them, each run of empty buckets between the first and last filled one written as one
    bucket (as TensorFlow writes its histograms): the same distribution, in a record of tens
    of bytes instead of kilobytes (bucket limits from +-1e-12 up are 1.1 apart)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("the histogram has no values")
    limits = _tensorflow_bins()
    # np.histogram's counts (each bucket closed on the left, the last on both sides, values
    # outside or NaN left out), by a search per value rather than numpy's pass over 3,000
    # edges: a few parameters' histogram in 5 us, not 35
    index = np.searchsorted(limits, values, side="right") - 1
    index[values == limits[-1]] = len(limits) - 2
    index = index[(index >= 0) & (index < len(limits) - 1)]
    if index.size == 0:
        raise ValueError("the histogram has no value between -1e20 and 1e20")
    start, end = int(index.min()), int(index.max()) + 1
    # an empty bucket first, whose right limit is the histogram's left edge (tensorboardX's),
    # then the buckets from the first filled one to the last
    counts = np.concatenate([[0], np.bincount(index - start)])
    limits = limits[start:end + 1]
    last_of_run = np.ones(len(counts), dtype=bool)  # keep a bucket unless the next is empty too
    last_of_run[:-1] = ~((counts[:-1] == 0) & (counts[1:] == 0))
    return HistogramProto(min=values.min(), max=values.max(), num=values.size,
                          sum=values.sum(), sum_squares=values.dot(values),
                          bucket_limit=limits[last_of_run].tolist(),
                          bucket=counts[last_of_run].tolist())


def scalar_summary(tag: str) -> bytes:
    """What a scalar's encoded Event holds after its step, up to its value: the summary's
    key and length, the Value's key and length, its tag field and simple_value's key."""
    encoded = tag.encode()
    value = b"\x0a" + _varint(len(encoded)) + encoded + b"\x15"
    summary = b"\x0a" + _varint(len(value) + 4) + value
    return b"\x2a" + _varint(len(summary) + 4) + summary


def scalar_event(wall_time: float, step: int, fixed: bytes, value: float) -> bytes:
    """``Event(wall_time, step, summary=Summary(value=[Value(tag, simple_value)]))`` encoded
    as protobuf encodes it, given ``fixed = scalar_summary(tag)``."""
    try:
        number = _FLOAT.pack(value)
    except OverflowError:  # protobuf rounds a double beyond float32's range to +-inf
        number = _FLOAT.pack(math.inf if value > 0 else -math.inf)
    if 0 < step < 0x80:
        at = _STEP1.pack(9, wall_time, 0x10, step)
    elif step == 0:  # protobuf leaves a zero out
        at = _WALL.pack(9, wall_time)
    elif 0 < step < 0x4000:
        at = _STEP2.pack(9, wall_time, 0x10, (step & 0x7F) | 0x80, step >> 7)
    else:
        at = _WALL.pack(9, wall_time) + b"\x10" + _varint(step)
    return at + fixed + number


_FLOAT = struct.Struct("<f")
_WALL = struct.Struct("<Bd")
_STEP1 = struct.Struct("<BdBB")
_STEP2 = struct.Struct("<BdBBB")


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64, as protobuf writes a negative one
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame(records: list[bytes | tuple]) -> bytes:
    """TFRecord framing of each record: its length, the length's masked CRC-32C, the record
    and its masked CRC-32C. A scalar queued as ``scalar_event``'s arguments is encoded here,
    each run of scalars of one tag and one width of step at once (``_scalar_run``)."""
    parts, start, count = [], 0, len(records)
    while start < count:
        first, end = records[start], start + 1
        if type(first) is tuple:
            fixed, width = first[2], _step_width(first[1])
            while end < count and type(records[end]) is tuple and records[end][2] is fixed \
                    and _step_width(records[end][1]) == width:
                end += 1
            parts.append(_scalar_run(records[start:end], fixed, width))
        else:
            while end < count and type(records[end]) is not tuple:
                end += 1
            parts.append(_framed(records[start:end]))
        start = end
    return b"".join(parts)


def _step_width(step: int) -> int:
    """The bytes of an event's step field after its key: none for step 0, which protobuf
    leaves out, else its varint's."""
    return 0 if step == 0 else 1 if 0 < step < 0x80 else 2 if 0 < step < 0x4000 \
        else len(_varint(step))


def _scalar_run(run: list[tuple], fixed: bytes, width: int) -> bytes:
    """Scalar events of one tag (``fixed``) and one step ``width``, encoded as
    ``scalar_event`` encodes each and framed, all at once with numpy (fewer than
    ``TOGETHER`` one by one)."""
    if len(run) < TOGETHER:
        return _framed([scalar_event(*event) for event in run])
    count, length = len(run), 9 + (1 + width if width else 0) + len(fixed) + 4
    rows = np.empty((count, length), dtype=np.uint8)
    rows[:, 0] = 9  # wall_time's key, then the double
    rows[:, 1:9] = np.fromiter((e[0] for e in run), "<f8", count).view(np.uint8).reshape(-1, 8)
    at = 9
    if width:
        steps = np.fromiter((e[1] for e in run), np.int64, count).astype(np.uint64)
        rows[:, 9] = 0x10  # step's key, then its varint
        for i in range(width):
            rows[:, 10 + i] = (steps >> np.uint64(7 * i)) & np.uint64(0x7F) | \
                np.uint64(0x80 if i < width - 1 else 0)
        at = 10 + width
    rows[:, at:at + len(fixed)] = np.frombuffer(fixed, dtype=np.uint8)
    with np.errstate(over="ignore"):  # beyond float32's range: +-inf, as protobuf rounds it
        values = np.fromiter((e[3] for e in run), np.float64, count).astype("<f4")
    rows[:, at + len(fixed):] = values.view(np.uint8).reshape(-1, 4)
    data = rows.tobytes()
    crcs = np.array([masked_crc32c(data[i:i + length]) for i in range(0, len(data), length)],
                    dtype="<u4")
    size = struct.pack("<Q", length)
    framed = np.empty((count, 12 + length + 4), dtype=np.uint8)
    framed[:, :12] = np.frombuffer(size + struct.pack("<I", masked_crc32c(size)),
                                   dtype=np.uint8)
    framed[:, 12:12 + length] = rows
    framed[:, 12 + length:] = crcs.view(np.uint8).reshape(-1, 4)
    return framed.tobytes()


def _framed(records: list[bytes]) -> bytes:
    """``frame`` of encoded records."""
    parts = []
    for record in records:
        length = struct.pack("<Q", len(record))
        parts += (length, struct.pack("<I", masked_crc32c(length)), record,
                  struct.pack("<I", masked_crc32c(record)))
    return b"".join(parts)


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data``."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
