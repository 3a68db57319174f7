"""Recipes: read the YAML, apply overrides, check it whole against the components (``recipe``), and the options a component's factory takes (``options``)."""
