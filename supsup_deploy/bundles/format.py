"""What a bundle holds on disk: file names, format versions, content hashes and its records.

A bundle is a folder::

    basis.safetensors               model config, input preprocessing, bit-packed basis masks,
                                    and (format 3, BatchNorm) an optional calibration pool
    tasks/<id>.<name>.safetensors   one per task: alpha table, normalisation statistics (none
                                    when the basis has a pool), classes

No weight is stored: the backbone is regenerated from the model config's seed. Every task,
basis tasks included (one-hot alpha), is an alpha table over the basis masks. The byte layout is
``docs/FORMAT.md``; what a reader checks is :mod:`supsup_deploy.bundles.validation`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from supsup_deploy.errors import ConfigError, FormatError, SupsupError
from supsup_deploy.files import metadata_text, safetensors_metadata, save_safetensors_atomic
from supsup_deploy.outputs import Output, is_empty_folder

FORMAT_VERSION = 4
"""The version writers write."""
READ_VERSIONS = (1, 2, 3, 4)
"""The versions readers read."""
POOL_TENSOR = "pool"
"""Format 3: the basis tensor holding the calibration pool (uint8 images)."""
MAX_POOL_IMAGES = 2048
"""Most images a calibration pool may hold."""
POOL_BATCH = 64
"""Pool images per forward pass when a task's statistics are computed from the pool."""
SIGNATURE_TENSOR = "signature"
"""Format 3: the optional task tensor telling a task's images apart (float16 ``[2, 64]``; format
4 writes uint8 codes with :data:`SIGNATURE_SCALE_TENSOR`)."""
SIGNATURE_SCALE_TENSOR = "signature.scale"
"""Format 4: the float16 ``[2, 2]`` step and minimum of a uint8 signature's rows: a row's value
is ``code * step + minimum``."""
SIGNATURE_SIZE = 64
"""Pooled features in a task signature (each with its mean and variance)."""
SIGNATURE_SHAPE = (2, SIGNATURE_SIZE)
"""A task signature's shape: the features' means, then their variances."""
SIGNATURE_SCALE_SHAPE = (SIGNATURE_SHAPE[0], 2)
"""The shape of :data:`SIGNATURE_SCALE_TENSOR`: each row's step, then its minimum."""
CONTENT_HASH_KEY = "supsup_sha256"
"""Format 2: the header ``__metadata__`` key holding the content hash of metadata and tensors."""
BASIS_FORMAT = "supsup-basis"
TASK_FORMAT = "supsup-task"
BASIS_FILE = "basis.safetensors"
TASKS_FOLDER = "tasks"
SIGN_HASH = "mix32x2-v1"
TASK_KINDS = ("basis", "alpha")
"""A basis task runs one basis mask (a one-hot alpha table); an alpha task mixes them."""
TASK_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TASK_FILE_PATTERN = re.compile(
    r"(0|[1-9][0-9]{0,9})\.([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.safetensors"
)
"""Format 2 task file names: ``<id>.<name>.safetensors``, the id decimal, no leading zeros."""
TASK_FILE_SUFFIX = ".safetensors"
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
"""The dtypes a task's float tensors (alpha table, norm statistics) may be stored in, by name."""


def float_dtype(name: str, *, what: str = "norm") -> torch.dtype:
    """The dtype a task's normalisation statistics (or alpha table) are stored in, by name.

    Args:
        name: ``"float32"`` or ``"float16"``.
        what: the tensor the dtype is for, as the error message names it.

    Returns:
        The torch dtype.

    Raises:
        ConfigError: any other name.
    """
    if name not in FLOAT_DTYPES:
        raise ConfigError(f"unknown {what} dtype {name!r}: use float32 or float16")
    return FLOAT_DTYPES[name]


def task_file_name(index: int, name: str, *, version: int = FORMAT_VERSION) -> str:
    """A task's file name in a bundle's ``tasks/`` folder.

    Args:
        index: task id.
        name: task name.
        version: the bundle's format version.

    Returns:
        ``<id>.<name>.safetensors`` (format 2), or ``<name>.safetensors`` (format 1).
    """
    return f"{int(index)}.{name}{TASK_FILE_SUFFIX}" if version >= 2 else f"{name}{TASK_FILE_SUFFIX}"


def check_task_name(name: str) -> None:
    """Refuse a task name that is not 1-64 of ``A-Z a-z 0-9 _ . -`` (starting with a letter or
    digit) or that is all digits (it would read as a task id; see
    :meth:`~supsup_deploy.bundles.reader.Bundle.task`)."""
    if not TASK_NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"bad task name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    if name.isdigit():
        raise ConfigError(
            f"bad task name {name!r}: a name of digits only would read as a task id; "
            f"add a letter (e.g. task_{name})"
        )


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Format 1's hash: SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    _hash_tensors(digest, tensors)
    return digest.hexdigest()


def content_sha256(text: str, tensors: dict[str, torch.Tensor]) -> str:
    """Format 2's hash: the metadata text (length-prefixed), then the tensors as format 1.

    Args:
        text: the metadata JSON exactly as stored under the header key ``"supsup"``.
        tensors: the file's tensors.

    Returns:
        Lowercase hex SHA-256.

    Raises:
        FormatError: ``text`` is not valid Unicode (holds a lone surrogate).
    """
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError("metadata text is not valid Unicode") from None
    digest = hashlib.sha256(f"{len(data)}|".encode() + data)
    _hash_tensors(digest, tensors)
    return digest.hexdigest()


def _hash_tensors(digest: Any, tensors: dict[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def save_sealed(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write a format 2 file (atomically): metadata and tensors under one content hash."""
    digest = content_sha256(metadata_text(metadata), tensors)
    save_safetensors_atomic(tensors, path, metadata, header_extra={CONTENT_HASH_KEY: digest})


def file_sha256(path: Path) -> str:
    """SHA-256 of a whole file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class InputSpec:
    """What a model expects as input: square images of ``size``, ``(x / 255 - mean) / std``."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class TaskEntry:
    """One installed task as listed from its file name, before its file is read."""

    index: int
    name: str
    path: Path


@dataclass(frozen=True)
class TaskInfo:
    """One installed task, as read and checked from its file."""

    index: int
    name: str
    kind: str
    class_names: tuple[str, ...]
    path: Path
    file_bytes: int
    state_bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)


def _our_bundle(path: Path) -> bool:
    if is_empty_folder(path):
        return True
    try:
        return safetensors_metadata(path / BASIS_FILE).get("format") == BASIS_FORMAT
    except SupsupError:
        return False


def _our_task_file(path: Path) -> bool:
    try:
        return safetensors_metadata(path).get("format") == TASK_FORMAT
    except SupsupError:
        return False


BUNDLE = Output("a bundle", _our_bundle, folder=True)
"""A bundle folder, as :func:`~supsup_deploy.outputs.check_output` writes it."""
TASK_FILE = Output("a task file", _our_task_file)
"""A task file, as :func:`~supsup_deploy.outputs.check_output` writes it."""
