"""A recipe's data: read from inline values, files or data sets (``sources``), made tensors on the run's device (``tensors``), and minibatches (``minibatch``)."""
