"""An example third-party vibench plugin; see docs/plugins.md in the vibench repository."""
