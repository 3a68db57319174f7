"""TensorBoard's event file, written in the run's own thread: the default logger.

tensorboardX's SummaryWriter queues events for a background thread that it can only close,
not drain, and that dies silently on a full disk. Writing synchronously lets a checkpoint make
every event up to it durable with one ``flush``, and a write error reaches the run as an
``OSError``, which it reports.
"""

from __future__ import annotations

import functools
import socket
import time
from pathlib import Path
from typing import Any

from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.record_writer import RecordWriter


@functools.cache
def _tensorflow_bins() -> list[float]:
    """TensorBoard's own histogram buckets: +-1e-12 to 1e20, each 1.1 times the last."""
    edges, v = [], 1e-12
    while v < 1e20:
        edges.append(v)
        v *= 1.1
    return [-e for e in reversed(edges)] + [0.0] + edges


class EventLog:
    """One event file in ``run_dir``; a run that resumes at ``start_step`` starts a new file
    that tells TensorBoard to drop the old files' events from that step on."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        name = (f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}"
                f".{start_step:09d}")
        self.path = run_dir / name
        self._writer = RecordWriter(str(self.path))
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if start_step:
            self._write(Event(wall_time=time.time(), step=start_step,
                              session_log=SessionLog(status=SessionLog.START)))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._summary(Summary(value=[Summary.Value(tag=tag, simple_value=float(value))]), step)

    def histogram(self, tag: str, values: Any, step: int) -> None:
        from tensorboardX.summary import histogram

        self._summary(histogram(tag, values, _tensorflow_bins()), step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """An HxWxC uint8 or float image array."""
        from tensorboardX.summary import image as image_summary

        self._summary(image_summary(tag, image, dataformats="HWC"), step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self, summary: dict | None = None) -> None:
        self._writer.flush()
        self._writer.close()

    def _summary(self, summary: Summary, step: int) -> None:
        self._write(Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event: Event) -> None:
        self._writer.write(event.SerializeToString())
