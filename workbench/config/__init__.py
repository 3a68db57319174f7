"""Recipes: read the YAML, apply ``--set`` overrides and check the whole recipe against the
components (``recipe``); the options a component's factory takes (``options``)."""
