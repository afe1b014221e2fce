"""Writing files so that a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.locking import hold_new_lock, remove_if_abandoned

METADATA_KEY = "supsup"
MAX_HEADER_BYTES = 1 << 20
"""Largest safetensors header (JSON) read, in bytes; safetensors itself allows 100 MB."""
TENSOR_DTYPES = frozenset({"BOOL", "U8", "I8", "I16", "I32", "I64", "F16", "BF16", "F32", "F64"})
"""The safetensors dtypes a file may hold: those torch and numpy both read natively."""


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


def metadata_text(metadata: dict[str, Any]) -> str:
    """The canonical JSON text of a metadata object (sorted keys, no spaces)."""
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"))


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor],
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    *,
    header_extra: dict[str, str] | None = None,
) -> None:
    """Save tensors in the safetensors format atomically, with JSON metadata.

    The metadata is stored as canonical JSON (:func:`metadata_text`) under the header key
    ``METADATA_KEY``, so the same tensors and metadata always give the same bytes.

    Args:
        tensors: name to tensor (moved to the CPU and made contiguous).
        path: final file path.
        metadata: JSON-serialisable metadata.
        header_extra: more ``__metadata__`` strings beside ``METADATA_KEY`` (e.g. a hash).

    Example:
        >>> save_safetensors_atomic({"x": torch.zeros(2)}, "/tmp/x.safetensors", {"kind": "demo"})
    """
    prepared = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    header = {METADATA_KEY: metadata_text(metadata or {}), **(header_extra or {})}
    atomic_write_bytes(path, _sorted_header_metadata(save(prepared, metadata=header)))


def _sorted_header_metadata(data: bytes) -> bytes:
    """The file with its ``__metadata__`` keys in sorted order.

    safetensors writes them in hash-map order, which changes from call to call; the header is
    rewritten (same JSON, padded with spaces to a multiple of 8 bytes as safetensors pads it) so
    that equal content always gives equal bytes. The tensor bytes are unchanged.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


@dataclass(frozen=True)
class StoredFile:
    """A safetensors file as read by :func:`read_safetensors`."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    header_metadata: dict[str, Any]
    """The header's raw ``__metadata__`` object (``METADATA_KEY``'s text and any other keys)."""


def load_safetensors(
    path: str | Path, *, max_bytes: Callable[[dict[str, Any]], int] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` of a file; see :func:`read_safetensors`."""
    stored = read_safetensors(path, max_bytes=max_bytes)
    return stored.tensors, stored.metadata


def read_safetensors(
    path: str | Path, *, max_bytes: Callable[[dict[str, Any]], int] | None = None
) -> StoredFile:
    """Load a file written by :func:`save_safetensors_atomic`, refusing hostile ones cheaply.

    Only a regular file is opened, and at most ``MAX_HEADER_BYTES`` of header is read before the
    metadata is checked; the tensors are read only when the file is no larger than
    ``max_bytes(metadata)``. Tensor dtypes are limited to ``TENSOR_DTYPES``.

    Args:
        path: the file.
        max_bytes: given the file's metadata, the largest file size its contents can need (it
            may raise FormatError itself); no limit when omitted.

    Returns:
        The tensors (on the CPU), the parsed metadata and the raw header metadata.

    Raises:
        FormatError: missing, truncated, oversized or corrupt file, or metadata that is not ours.

    Example:
        >>> stored = read_safetensors("/tmp/x.safetensors")
    """
    path = Path(path)
    with _open_regular_file(path) as stream:
        size = os.fstat(stream.fileno()).st_size
        header = _read_header(stream, path, size)
        header_metadata, metadata = _parse_header(header, path)
        limit = size if max_bytes is None else max_bytes(metadata)
        if size > limit:
            raise FormatError(f"{path}: {size} bytes, more than the {limit} its contents can need")
        data = header + stream.read(size - len(header))
    if len(data) != size:
        raise FormatError(f"{path}: changed while it was being read")
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, KeyError, TypeError) as error:
        raise FormatError(f"{path}: not a valid supsup safetensors file ({error})") from None
    return StoredFile(tensors, metadata, header_metadata)


def safetensors_layout(path: str | Path) -> tuple[int, dict[str, int]]:
    """Header bytes (length prefix included) and payload bytes per tensor of a safetensors file.

    Reads only the header, with the same guards as :func:`load_safetensors`.

    Raises:
        FormatError: missing, not a regular file, or a header that is too large or not JSON.
    """
    path = Path(path)
    with _open_regular_file(path) as stream:
        header = _read_header(stream, path, os.fstat(stream.fileno()).st_size)
    try:
        entries = json.loads(header[8:])
        payload = {
            name: entry["data_offsets"][1] - entry["data_offsets"][0]
            for name, entry in entries.items()
            if name != "__metadata__"
        }
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise FormatError(f"{path}: not a valid supsup safetensors file ({error})") from None
    return len(header), payload


def safetensors_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a safetensors file written by :func:`save_safetensors_atomic`, read from
    its header alone (with the same guards as :func:`read_safetensors`).

    Raises:
        FormatError: missing, not a regular file, or a header that is not ours.
    """
    path = Path(path)
    with _open_regular_file(path) as stream:
        header = _read_header(stream, path, os.fstat(stream.fileno()).st_size)
    return _parse_header(header, path)[1]


def _open_regular_file(path: Path) -> BinaryIO:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except OSError as error:
        raise FormatError(f"{path}: cannot read ({error.strerror})") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise FormatError(f"{path}: not a regular file")
    return os.fdopen(descriptor, "rb")


def _read_header(stream: BinaryIO, path: Path, size: int) -> bytes:
    """The 8-byte length and the JSON header, checked against the limits before reading it."""
    if size < 8:
        raise FormatError(f"{path}: not a valid supsup safetensors file ({size} bytes)")
    prefix = stream.read(8)
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES:
        raise FormatError(
            f"{path}: declares a {length}-byte header, more than the {MAX_HEADER_BYTES} allowed"
        )
    if 8 + length > size:
        raise FormatError(f"{path}: truncated (its header runs past the end of the file)")
    return prefix + stream.read(length)


def _parse_header(header: bytes, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw ``__metadata__`` and our parsed metadata, once every tensor's dtype is checked."""
    try:
        entries = json.loads(header[8:])
        for name, entry in entries.items():
            if name != "__metadata__" and entry["dtype"] not in TENSOR_DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {entry['dtype']!r}")
        header_metadata = entries["__metadata__"]
        metadata = json.loads(header_metadata[METADATA_KEY])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise FormatError(f"{path}: not a valid supsup safetensors file ({error})") from None
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: metadata is not a JSON object")
    return header_metadata, metadata


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


@contextmanager
def new_folder(out: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Build a new folder in a scratch folder beside ``out``, renamed to ``out`` when complete.

    ``out`` either does not exist or holds everything written in the ``with`` block, even if the
    process is killed; the folder gets the umask's permissions (not a temporary folder's 0700).
    Scratch folders are named ``.<out>.*.tmp`` and hold a lock while their writer lives; those
    left by killed writers are removed by the next call for the same ``out``.

    Args:
        out: the folder to create; it must not exist unless ``replace``.
        replace: move an existing ``out`` into the scratch folder (removed with it) just before
            the new folder is renamed into place; the caller has checked that it may go.

    Yields:
        The folder to fill.

    Raises:
        ConfigError: ``out`` exists (without ``replace``), or appeared while the block ran.

    Example:
        >>> with new_folder("artifacts/bundle") as folder:
        ...     (folder / "basis.safetensors").write_bytes(data)
    """
    out = Path(out)
    if out.exists() and not replace:
        raise _folder_exists(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        with hold_new_lock(scratch):
            for leftover in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
                if leftover != scratch and leftover.is_dir() and not leftover.is_symlink():
                    remove_if_abandoned(leftover)
            staging = scratch / out.name
            staging.mkdir()
            yield staging
            if replace and out.exists():
                os.rename(out, scratch / "replaced")
            try:
                os.rename(staging, out)
            except OSError as error:
                if out.exists():
                    raise _folder_exists(out) from None
                raise ConfigError(f"{out}: cannot create the folder ({error.strerror})") from None
            _fsync_folder(out.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_scratch_files(folder: Path) -> None:
    """Remove the scratch files (``.*.tmp``) in ``folder``, which only killed writers leave.

    Call it only while holding the lock that every writer into ``folder`` holds.
    """
    with os.scandir(folder) as listing:
        leftovers = [
            item.name
            for item in listing
            if item.name.startswith(".")
            and item.name.endswith(".tmp")
            and item.is_file(follow_symlinks=False)
        ]
    for name in leftovers:
        (folder / name).unlink(missing_ok=True)


def _folder_exists(out: Path) -> ConfigError:
    return ConfigError(f"{out} already exists: choose a new folder (bundles are never merged)")
