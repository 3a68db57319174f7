"""Training: the run and its loop (``runner``), callbacks and loggers, optimizers and the step-size search, checkpoints, and data-parallel training."""
