"""The one rule for every path a command writes: graphs, adapters, plots, bundles, run folders
and the folders graphs are written into.

- A path that looks like an option, lies under a file, or is a folder where a file goes (or a
  file where a folder goes) is refused.
- An existing file is replaced when supsup-deploy wrote it, as the file's own metadata says (an
  ONNX graph's ``supsup.*`` properties; an adapter's shared-graph format version and task
  tensors; a task file's ``supsup-task`` format; a plot's PNG software tag), or with ``force``.
- An existing bundle folder is replaced only with ``force``, and only when it is a bundle (or
  empty): it may hold tasks installed since. Run folders and the shared graph's folder are written
  into, never replaced: a folder of other files is refused as a run folder.

Every refusal is one :class:`~supsup_deploy.errors.ConfigError` line, raised before anything is
written; the writers then write atomically, so a failure leaves no partial output.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from supsup_deploy.errors import ConfigError

PLOT_SOFTWARE = "supsup-deploy"
"""The software tag of every PNG plot this package writes."""


@dataclass(frozen=True)
class Output:
    """A kind of output path.

    Attributes:
        what: its name in messages (``"an ONNX graph"``).
        ours: whether an existing path of this kind is one supsup-deploy wrote.
        folder: a folder rather than a file.
        replaced: writing replaces an existing one whole (rather than writing into it).
    """

    what: str
    ours: Callable[[Path], bool]
    folder: bool = False
    replaced: bool = True


def _our_plot(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.info.get("Software") == PLOT_SOFTWARE
    except (UnidentifiedImageError, OSError):
        return False


def is_empty_folder(path: Path) -> bool:
    """Whether a folder holds nothing (an empty folder counts as ours for any folder output)."""
    return not any(path.iterdir())


PLOT = Output("a plot", _our_plot)
FOLDER = Output("a folder", lambda path: True, folder=True, replaced=False)


def check_output(path: str | Path, output: Output, *, force: bool = False) -> None:
    """Raise unless ``output`` may be written at ``path`` (the module's rule).

    Args:
        path: where the command writes.
        output: what it writes there (:data:`PLOT` or :data:`FOLDER`; each format defines
            its own: ``bundles.format.BUNDLE`` and ``TASK_FILE``, ``runs.RUN``,
            ``onnx_graphs.format.GRAPH`` and ``ADAPTER``).
        force: the command's ``--force``.

    Raises:
        ConfigError: one line naming ``path`` and what to do.
    """
    path = Path(path)
    if str(path).startswith("-"):
        raise ConfigError(f"{str(path)!r} looks like an option, not a path")
    blocker = next((parent for parent in path.parents if _is_file(parent)), None)
    if blocker is not None:
        raise ConfigError(f"{path}: cannot write there, {blocker} is a file, not a folder")
    if not os.path.lexists(path):
        return
    if path.is_dir() != output.folder:
        if output.folder:
            raise ConfigError(f"{path}: is a file, not a folder; give a folder to write into")
        raise ConfigError(f"{path}: is a folder; give the path of the file to write")
    if not output.ours(path):
        if force and not output.folder:
            return
        if output.folder:
            instead = (
                f"--force replaces only {output.what}" if output.replaced else "or an empty one"
            )
            raise ConfigError(
                f"{path}: exists and is not {output.what} written by supsup-deploy; choose a new "
                f"folder ({instead})"
            )
        raise ConfigError(
            f"{path}: exists and is not {output.what} written by supsup-deploy; pass --force to "
            "replace it, or choose another path"
        )
    if output.folder and output.replaced and not force:
        raise ConfigError(
            f"{path} already exists: pass --force to replace {output.what}, or choose another --out"
        )


def _is_file(path: Path) -> bool:
    return os.path.lexists(path) and not path.is_dir()
