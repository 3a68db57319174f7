"""``vibench compare``: a recipe over a grid of settings and seeds (``grid``), run here or on Ray (``backends``)."""
