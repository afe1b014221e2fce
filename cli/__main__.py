"""``python -m cli`` from a source checkout runs the ``supsup`` command (installed, the same
command is ``python -m supsup_cli`` or ``python -m supsup_deploy``)."""

from .main import main

main()
