"""Writing files so that a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from supsup_deploy.errors import FormatError

METADATA_KEY = "supsup"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Args:
        path: final file path; its folder is created if needed.
        data: the complete contents.

    Example:
        >>> atomic_write_bytes("/tmp/example.bin", b"abc")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_current_umask())
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> None:
    """Write JSON (sorted keys, indented) atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any] | None = None
) -> None:
    """Save tensors in the safetensors format atomically, with JSON metadata.

    The metadata is stored as canonical JSON (sorted keys) under the single header key
    ``METADATA_KEY``, so the same tensors and metadata always give the same bytes.

    Args:
        tensors: name to tensor (moved to the CPU and made contiguous).
        path: final file path.
        metadata: JSON-serialisable metadata.

    Example:
        >>> save_safetensors_atomic({"x": torch.zeros(2)}, "/tmp/x.safetensors", {"kind": "demo"})
    """
    prepared = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    header = {METADATA_KEY: json.dumps(metadata or {}, sort_keys=True, separators=(",", ":"))}
    atomic_write_bytes(path, save(prepared, metadata=header))


def load_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_safetensors_atomic`.

    Args:
        path: the file.

    Returns:
        ``(tensors, metadata)``, tensors on the CPU.

    Raises:
        FormatError: missing, truncated or corrupt file, or metadata that is not ours.

    Example:
        >>> tensors, metadata = load_safetensors("/tmp/x.safetensors")
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except OSError as error:
        raise FormatError(f"{path}: cannot read ({error.strerror})") from None
    try:
        tensors = load(data)
        header_size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_size])
        metadata = json.loads(header["__metadata__"][METADATA_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError) as error:
        raise FormatError(f"{path}: not a valid supsup safetensors file ({error})") from None
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: metadata is not a JSON object")
    return tensors, metadata


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
