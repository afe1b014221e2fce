"""The ``supsup`` command line: a thin Typer layer over :mod:`supsup_deploy`."""
