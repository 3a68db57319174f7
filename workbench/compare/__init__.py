"""``vibench compare``: a recipe over a grid of settings and seeds. ``grid.compare`` reads
straight through: plan the runs (``plan``), run them on a backend (``scheduler``,
``backends``), gather their numbers (``results``, ``metrics``) and report them (``table``,
``plot``, ``hparams``)."""
