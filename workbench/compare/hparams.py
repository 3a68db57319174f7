"""TensorBoard hparams for a comparison: each successful run's grid values and seed beside its
final numbers, so TensorBoard's HParams tab compares the runs."""

from __future__ import annotations

from workbench.compare.results import Result


def write_hparams(results: list[Result]) -> None:
    """Each successful run's hparams (the grid's keys and the seed) and final metrics, as one
    TensorBoard HParams session in its own run directory.

    No experiment summary is written: TensorBoard then builds the table from the sessions,
    with every value each key took, also when several comparisons share a log directory
    (an experiment summary per run, as tensorboardX's add_hparams writes, lists only that
    run's value, and TensorBoard would filter the other runs out). The events go in a file of
    their own (suffix .hparams): tensorboardX names files by the second, and a second writer
    in the same second would truncate the run's own events file.
    """
    done = [result for result in results if result.status == "ok"]
    if not done:
        return
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    for result in done:
        scalars = {f"hparam/{k}": v for k, v in result.metrics.items() if v is not None}
        _, start, end = hparams(dict(result.spec.hparams), scalars)
        writer = SummaryWriter(logdir=str(result.run_dir), filename_suffix=".hparams")
        try:
            writer.file_writer.add_summary(start)
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, result.steps or 0)
            writer.file_writer.add_summary(end)
        finally:
            writer.close()
