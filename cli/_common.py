"""What every command shares: one-line errors and JSON output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

Command = TypeVar("Command", bound=Callable[..., Any])

EXIT_USER_ERROR = 2


def one_line_errors(command: Command) -> Command:
    """Turn the package's own errors into one line on stderr and exit code 2, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from supsup_deploy.errors import SupsupError

        try:
            return command(*args, **kwargs)
        except SupsupError as error:
            message = " ".join(str(error).split())
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper  # type: ignore[return-value]


def print_json(payload: Any) -> None:
    """Print machine-readable output on stdout."""
    print(json.dumps(payload, indent=2, sort_keys=True))


def wide_console():
    """A rich console for tables of user data (no markup parsing); when not writing to a
    terminal, wide enough that tables are not cut."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200, markup=False)
