"""A recipe's data before it meets torch's device: read from inline values, files or data sets
(``sources``), and one plate's minibatch of rows each step (``minibatch``)."""
