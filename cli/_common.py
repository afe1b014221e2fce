"""What every command shares: one-line errors, JSON output, default paths and devices."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

Command = TypeVar("Command", bound=Callable[..., Any])

EXIT_USER_ERROR = 2
DEFAULT_RUN = Path("artifacts/run")
DEFAULT_BUNDLE = Path("artifacts/bundle")
DEFAULT_ONNX = Path("artifacts/onnx")
DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N."
BundleArgument = Annotated[
    Path, typer.Argument(help="A bundle folder (made by `supsup pack`).", show_default=True)
]


def one_line_errors(command: Command) -> Command:
    """Turn the package's own errors into one line on stderr and exit code 2, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from supsup_deploy.errors import SupsupError

        try:
            return command(*args, **kwargs)
        except SupsupError as error:
            print_error(str(error))
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper  # type: ignore[return-value]


def print_error(message: str) -> None:
    """One line on stderr, whatever line breaks the message holds."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


def print_json(payload: Any) -> None:
    """Print machine-readable output on stdout."""
    print(json.dumps(payload, indent=2, sort_keys=True))


def wide_console():
    """A rich console for tables of user data (no markup parsing); when not writing to a
    terminal, wide enough that tables are not cut."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200, markup=False)


def not_an_option(value: Path | None) -> Path | None:
    """Option callback: refuse a path that looks like an option (``--out --fp16``)."""
    if value is not None and str(value).startswith("-"):
        raise typer.BadParameter(f"{str(value)!r} looks like an option, not a path")
    return value


def path_option(help: str, *names: str) -> Any:
    """A ``typer.Option`` for a path the command reads or writes, refused when it looks like an
    option (:func:`not_an_option`)."""
    return typer.Option(*names, help=help, callback=not_an_option)


def use_device(name: str) -> str:
    """Resolve ``--device`` once: ``cpu``, ``cuda`` or ``cuda:N`` (``auto`` picks CUDA when
    available); each command names the device in its output."""
    from supsup_deploy.devices import resolve_device

    return resolve_device(name)


def open_bundle(path: Path):
    """Load a bundle; a training run or a missing default bundle gets a line saying what to do."""
    from supsup_deploy.bundles.format import BASIS_FILE
    from supsup_deploy.bundles.reader import load_bundle
    from supsup_deploy.errors import ConfigError

    if (path / "run.json").is_file() and not (path / BASIS_FILE).exists():
        raise ConfigError(f"{path} is a training run: pack it first (supsup pack {path})")
    if path == DEFAULT_BUNDLE and not path.exists():
        raise ConfigError(
            f"no bundle at {path}: train and pack one (supsup train, then supsup pack), "
            "or give the bundle folder"
        )
    return load_bundle(path)


def is_bundle_or_run(path: Path) -> bool:
    """Whether a path names a bundle or a training run rather than images: such a folder, or a
    missing path without an image file's suffix (so that the error names it)."""
    import os

    from supsup_deploy.bundles.format import BASIS_FILE
    from supsup_deploy.runtime import IMAGE_SUFFIXES

    if not os.path.lexists(path):
        return path.suffix.lower() not in IMAGE_SUFFIXES
    return path.is_dir() and ((path / BASIS_FILE).is_file() or (path / "run.json").is_file())


def adapter_graph(adapter: Path, graph: Path | None, *, force: bool) -> Path:
    """``--adapter FILE [--graph]``: check the adapter's path (the output rule) and return the
    shared graph it is for (default: model.onnx in the folder above the adapter's)."""
    from supsup_deploy.errors import ConfigError
    from supsup_deploy.onnx_graphs.format import ADAPTER, MODEL_FILE
    from supsup_deploy.outputs import check_output

    check_output(adapter, ADAPTER, force=force)
    graph = graph or adapter.parent.parent / MODEL_FILE
    if not graph.is_file():
        raise ConfigError(f"{graph}: no shared graph there; give --graph DIR/{MODEL_FILE}")
    return graph
