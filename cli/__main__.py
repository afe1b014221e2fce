"""``python -m cli`` (and ``torchrun -m cli``) run the ``supsup`` command."""

from cli.main import main

main()
