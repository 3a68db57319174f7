"""The automatic pipeline: a recipe that names a model and its data but no guide
(``pipeline``)."""
