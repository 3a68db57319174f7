"""``python -m workbench`` is the ``vibench`` command."""

from workbench.cli import main

main()
