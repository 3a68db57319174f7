"""The TensorBoard event file that the default logger writes by hand (scalars encoded without
protobuf, checksums computed in batches) reads back through TensorBoard's own reader, which
checks every checksum, as the events protobuf would have written them."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from vibench_plugins import tensorboard_events
from vibench_plugins.tensorboard_events import EventLog


def read_events(path: Path) -> list:
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboardX.proto.event_pb2 import Event

    return [Event.FromString(record) for record in RawEventFileLoader(str(path)).Load()]


def test_masked_crc32c_matches_tensorboardx_for_any_length():
    from tensorboardX.record_writer import masked_crc32c

    rng = random.Random(0)
    chunks = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 70))) for _ in range(300)]
    chunks += [rng.randbytes(length) for length in (127, 128, 1535, 1536, 4097, 20_000)]
    assert [tensorboard_events.masked_crc32c(c) for c in chunks] == \
        [masked_crc32c(c) for c in chunks]


VALUES = [7.0461, 0.0, -0.0, 1e39, -1e39, math.inf, math.nan, 1e-50, -3.5]
STEPS = [0, 1, 127, 128, 16_383, 16_384, 10**12]
TAGS = ["Train/loss", "Eval/loss", "x" * 200, "Params/µ"]


@pytest.mark.parametrize("batch, runs", [(3, False), (4096, False), (4096, True)])
def test_scalars_read_back_as_protobuf_wrote_them(tmp_path: Path, monkeypatch, batch: int,
                                                  runs: bool):
    """Each scalar alone, or (``runs``) in runs of one tag and one width of step, which the
    drain encodes and checksums together."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary

    monkeypatch.setattr(tensorboard_events, "BATCH", batch)  # written in batches, or at close
    log = EventLog(tmp_path, start_step=5)
    logged = ([(tag, value, step) for tag in TAGS for step in STEPS for value in VALUES * 3]
              if runs else
              [(tag, value, step) for tag in TAGS for value in VALUES for step in STEPS])
    for i, (tag, value, step) in enumerate(logged):
        log.scalar(tag, value, step)
        if i == 100:
            log.histogram("Params/h", [0.1, 0.2, 0.3], step)
    log.close()
    events = read_events(log.path)
    assert events[0].file_version == "brain.Event:2"
    assert events[1].session_log.status == events[1].session_log.START
    assert events[1].step == 5
    scalars = [e for e in events[2:] if e.summary.value[0].HasField("simple_value")]
    assert len(scalars) == len(logged)
    assert [e.summary.value[0].tag for e in events[2:]].index("Params/h") == 101
    for event, (tag, value, step) in zip(scalars, logged):
        want = Event(wall_time=event.wall_time, step=step, summary=Summary(
            value=[Summary.Value(tag=tag, simple_value=value)]))
        if math.isnan(value):
            assert math.isnan(event.summary.value[0].simple_value)
        else:
            assert event.SerializeToString() == want.SerializeToString()
    assert_checksums(log.path)


def assert_checksums(path: Path) -> None:
    """Every record's framing: its length and both masked CRC-32Cs as tensorboardX's."""
    import struct

    from tensorboardX.record_writer import masked_crc32c

    data, at = path.read_bytes(), 0
    while at < len(data):
        size = data[at:at + 8]
        length = struct.unpack("<Q", size)[0]
        assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked_crc32c(size)
        record = data[at + 12:at + 12 + length]
        assert struct.unpack("<I", data[at + 12 + length:at + 16 + length])[0] == \
            masked_crc32c(record)
        at += 16 + length


def test_a_slow_run_s_scalars_reach_the_file_within_seconds(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(tensorboard_events, "LIVE_SECONDS", 0.0)
    log = EventLog(tmp_path)
    log.scalar("Train/loss", 7.0, 0)
    log.scalar("Train/loss", 6.5, 1)  # before any flush: a live TensorBoard sees them
    assert [e.step for e in read_events(log.path)[1:]] == [0, 1]
    log.close()
