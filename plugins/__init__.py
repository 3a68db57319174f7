"""vibench's default plugins, installed as ``vibench_plugins`` and registered through the
``vibench`` entry-point group exactly as a third-party plugin is."""
