"""The plugin manager and the registry of components it collects (``registry``), and making a
component from its recipe section (``build``)."""
