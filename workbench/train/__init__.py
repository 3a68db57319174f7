"""Training a run: set-up and the loop (``runner``), the data as tensors on the run's device
(``tensors``), callbacks and loggers, optimizers and the step-size search (``optim``,
``stepsize``), and checkpoints."""
