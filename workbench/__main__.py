"""``python -m workbench`` is the ``vibench`` command (the console script runs ``main`` too).

The stop signals' handlers go in first, before the command line's imports (typer, then torch
for a run): a signal during them is then a stop like any other (``workbench.signals``)."""

from workbench import signals


def main() -> None:
    """Install the stop signals' handlers, then import and run the command line. A signal
    while the handlers go in (the first is in, the rest to come) is a stop as well."""
    try:
        signals.install()
        from workbench import cli

        cli.main()
    except KeyboardInterrupt as exc:  # a stop signal before cli.main's own handling begins
        signals.stop_now(getattr(exc, "signum", None) or signals.first() or 2)


if __name__ == "__main__":
    main()
