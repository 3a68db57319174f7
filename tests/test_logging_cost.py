"""Logging kept cheap keeps what it logs: histograms in few bytes hold the counts tensorboardX
would have written, long records' checksums pass TensorBoard's reader, a run's defaults log
parameter summaries and evaluations sparingly, and a run killed after a checkpoint keeps
every value the checkpoint counts, as TensorBoard's own EventAccumulator reads them."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np

from tests.helpers import COIN, checkpointed_step, start, wait_for_checkpoint
from vibench_plugins.tensorboard_events import EventLog


def accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def tensorflow_bins() -> list[float]:
    """TensorBoard's histogram buckets: +-1e-12 to 1e20, each 1.1 times the last."""
    edges = [1e-12]
    while edges[-1] * 1.1 < 1e20:
        edges.append(edges[-1] * 1.1)
    return [-e for e in reversed(edges)] + [0.0] + edges


ARRAYS = [[0.1, 0.2, 0.3], [0.0, 0.0], [-1.5, 0.0, 0.0, 2.0, 3e5], [7.0],
          np.random.default_rng(0).normal(size=(3, 3)),
          np.random.default_rng(1).standard_cauchy(2000)]


def test_histograms_read_back_with_tensorboardx_s_counts(tmp_path: Path):
    from tensorboardX.summary import make_histogram

    log = EventLog(tmp_path)
    for step, values in enumerate(ARRAYS):
        log.histogram("Params/h", values, step)
    log.close()
    read = accumulator(tmp_path).Histograms("Params/h")
    assert [event.step for event in read] == list(range(len(ARRAYS)))
    for event, values in zip(read, ARRAYS):
        want = make_histogram(np.asarray(values, dtype=float), tensorflow_bins())
        got = event.histogram_value
        assert (got.min, got.max, got.num, got.sum, got.sum_squares) == (
            want.min, want.max, want.num, want.sum, want.sum_squares)
        # every limit written is one of tensorboardX's, with the same count up to it
        limits, counts = np.array(want.bucket_limit), np.cumsum(want.bucket)
        at = np.searchsorted(limits, got.bucket_limit)
        assert (limits[at] == got.bucket_limit).all()
        assert (counts[at] == np.cumsum(got.bucket)).all()
        assert (got.bucket_limit[0], got.bucket_limit[-1]) == (limits[0], limits[-1])


def test_a_run_s_defaults_summarise_parameters_and_evaluate_sparingly():
    from workbench.config.recipe import TRAIN

    assert TRAIN["log_params_every"].default >= 500
    assert TRAIN["eval_every"].default == 0 or TRAIN["eval_every"].default >= 1000


def test_a_run_killed_after_a_checkpoint_keeps_every_value_it_counts(tmp_path: Path):
    out = tmp_path / "r"
    child = start(COIN, out, "--steps", "100000", "--set", "train.checkpoint_every=50",
                  "--set", "train.eval_every=10", "--set", "train.log_params_every=25")
    wait_for_checkpoint(out, 100, child)
    child.send_signal(signal.SIGKILL)
    child.wait()
    counted = checkpointed_step(out)
    losses = np.fromfile(out / "losses.f64", dtype="<f8")
    assert len(losses) >= counted
    events = accumulator(out)
    train = [e for e in events.Scalars("Train/loss") if e.step < counted]
    assert [e.step for e in train] == list(range(counted))
    assert [e.value for e in train] == losses[:counted].astype(np.float32).tolist()
    assert {e.step for e in events.Scalars("Eval/loss")} >= set(range(9, counted, 10))
    assert {e.step for e in events.Scalars("Params/log_alpha_q")} >= set(range(0, counted, 25))
