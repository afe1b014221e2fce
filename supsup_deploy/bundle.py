"""Bundles: a basis file plus one small file per task; see ``docs/FORMAT.md``.

A bundle is a folder::

    basis.safetensors               model config, input preprocessing, bit-packed basis masks
    tasks/<id>.<name>.safetensors   one per task: alpha table, normalisation statistics, classes

No weight is stored: the backbone is regenerated from the model config's seed. Every task,
basis tasks included (one-hot alpha), is an alpha table over the basis masks.

Opening a bundle reads its basis and lists ``tasks/`` by file name; a task file is read, checked
and cached the first time the task is used (format 1 bundles, whose file names carry no id, are
read whole when opened).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from supsup_deploy import backbone
from supsup_deploy.binary_masks import (
    MAX_BASIS,
    check_num_basis,
    code_value_table,
    codes_from_packed,
    pack_bits,
)
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.files import (
    MAX_HEADER_BYTES,
    METADATA_KEY,
    metadata_text,
    read_safetensors,
    save_safetensors_atomic,
)
from supsup_deploy.mask_compression import ENCODINGS, decode_mask, encode_mask
from supsup_deploy.models import (
    MaskedModel,
    ModelConfig,
    ModelSummary,
    build_model,
    masked_layers,
    summarize_model,
)
from supsup_deploy.normalization import load_norm_state
from supsup_deploy.weight_sources import use_fixed

FORMAT_VERSION = 2
"""The version writers write."""
READ_VERSIONS = (1, 2)
"""The versions readers read."""
CONTENT_HASH_KEY = "supsup_sha256"
"""Format 2: the header ``__metadata__`` key holding the content hash of metadata and tensors."""
BASIS_FORMAT = "supsup-basis"
TASK_FORMAT = "supsup-task"
BASIS_FILE = "basis.safetensors"
TASKS_FOLDER = "tasks"
SIGN_HASH = "mix32x2-v1"
TASK_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TASK_FILE_PATTERN = re.compile(
    r"(0|[1-9][0-9]{0,9})\.([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\.safetensors"
)
"""Format 2 task file names: ``<id>.<name>.safetensors``, the id decimal, no leading zeros."""
TASK_FILE_SUFFIX = ".safetensors"
MAX_LISTED_TASKS = 10
"""Tasks named in the error for an unknown task."""
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
"""The dtypes a task's float tensors (alpha table, norm statistics) may be stored in, by name."""
CONFIG_FIELDS = {
    "arch": str,
    "num_classes": int,
    "in_channels": int,
    "stem": str,
    "width": float,
    "seed": int,
    "norm": str,
    "norm_groups": int,
    "num_tasks": int,
}
# Limits on what a bundle may declare, checked before anything is allocated (docs/SECURITY.md).
MAX_MASKED_WEIGHTS = 1 << 30
"""Masked weights of an architecture (wide_resnet101_2 has 126.8 million)."""
MAX_INPUT_SIZE = 4096
"""Side of the square input images."""
MAX_TASK_ID = 2**31 - 1
"""Largest task id."""
ENCODED_MASK_SLACK = 64
"""Bytes an encoded mask may take beyond twice its packed size (its header and size entry)."""


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


def _save_sealed(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write a format 2 file: metadata and tensors under one content hash."""
    digest = content_sha256(metadata_text(metadata), tensors)
    save_safetensors_atomic(tensors, path, metadata, header_extra={CONTENT_HASH_KEY: digest})


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


def save_basis(
    path: str | Path,
    model_config: ModelConfig,
    basis_masks: list[list[torch.Tensor]],
    input_spec: InputSpec,
    *,
    encoding: str = "packed",
    extra: dict[str, Any] | None = None,
) -> str:
    """Write a basis file and return its SHA-256.

    Args:
        path: file to write (atomically).
        model_config: the architecture and backbone seed.
        basis_masks: ``|B|`` mask sets, one bool mask per masked layer each.
        input_spec: input preprocessing the tasks were trained with.
        encoding: how masks are stored: ``"packed"`` (1 bit per weight), ``"rice"`` or
            ``"sparse"`` (compressed; see :mod:`supsup_deploy.mask_encoding`).
        extra: more JSON metadata (e.g. where the masks came from).

    Returns:
        The file's SHA-256, which every task file of the bundle records.

    Example:
        >>> save_basis("b/basis.safetensors", model.config, [masks_a, masks_b], spec)
    """
    summary = summarize_model(model_config.arch, **_options(model_config))
    num_basis = len(basis_masks)
    check_num_basis(num_basis)
    if encoding not in ENCODINGS:
        raise ConfigError(f"unknown mask encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
    tensors = {}
    for layer, shape in enumerate(summary.weight_shapes):
        numel = math.prod(shape)
        rows = []
        for number, mask_set in enumerate(basis_masks):
            if len(mask_set) != summary.masked_layers or mask_set[layer].numel() != numel:
                raise ConfigError(f"basis mask {number} does not fit {model_config.arch}")
            rows.append(pack_bits(mask_set[layer].cpu()))
        if encoding == "packed":
            tensors[f"mask.{layer:03d}"] = torch.stack(rows)
            continue
        streams = [encode_mask(row.numpy(), numel, encoding) for row in rows]
        blob = bytearray(b"".join(streams))
        tensors[f"mask.{layer:03d}"] = torch.frombuffer(blob, dtype=torch.uint8)
        tensors[f"mask_sizes.{layer:03d}"] = torch.tensor([len(item) for item in streams])
    metadata = {
        "format": BASIS_FORMAT,
        "format_version": FORMAT_VERSION,
        "sign_hash": SIGN_HASH,
        "model": model_config.to_dict(),
        "num_basis": num_basis,
        "mask_encoding": encoding,
        "layers": [
            {"name": name, "shape": list(shape)}
            for name, shape in zip(summary.layer_names, summary.weight_shapes, strict=True)
        ],
        "norm_channels": summary.norm_channels,
        "input": input_spec.to_dict(),
        **({"extra": extra} if extra else {}),
    }
    _save_sealed(path, tensors, metadata)
    return file_sha256(Path(path))


def save_task(
    path: str | Path,
    *,
    index: int,
    name: str,
    alpha: torch.Tensor,
    norm_state: dict[str, torch.Tensor],
    class_names: list[str] | tuple[str, ...],
    basis_sha256: str,
    kind: str = "alpha",
    extra: dict[str, Any] | None = None,
) -> None:
    """Write one task file (atomically).

    Args:
        path: file to write; inside a bundle it is ``tasks/`` + :func:`task_file_name`.
        index: task id, unique within the bundle.
        name: task name (letters, digits, ``_.-``; also its file name).
        alpha: ``[num_layers, |B|]`` table, float32 or float16.
        norm_state: ``norm.running_mean`` / ``norm.running_var`` (empty for statistic-free norms).
        class_names: one per classifier output.
        basis_sha256: SHA-256 of the basis file this task belongs to.
        kind: ``"basis"`` (a basis mask as a one-hot table) or ``"alpha"``.
        extra: more JSON metadata (e.g. training metrics).

    Example:
        >>> save_task("b/tasks/3.t3.safetensors", index=3, name="t3", alpha=table,
        ...           norm_state={}, class_names=["a", "b"], basis_sha256=digest)
    """
    check_task_name(name)
    tensors = {"alpha": alpha, **norm_state}
    metadata = {
        "format": TASK_FORMAT,
        "format_version": FORMAT_VERSION,
        "index": int(index),
        "name": name,
        "kind": kind,
        "class_names": list(class_names),
        "basis_sha256": basis_sha256,
        **({"extra": extra} if extra else {}),
    }
    _save_sealed(path, tensors, metadata)


def check_task_name(name: str) -> None:
    """Refuse a task name that is not 1-64 of ``A-Z a-z 0-9 _ . -`` (starting with a letter or
    digit) or that is all digits (it would read as a task id; see :meth:`Bundle.task`)."""
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


def _options(config: ModelConfig) -> dict[str, Any]:
    options = config.to_dict()
    options.pop("arch")
    return options


@dataclass(frozen=True)
class _BasisHeader:
    """What a basis file's metadata declares, checked: all that is needed before its tensors."""

    version: int
    config: ModelConfig
    summary: ModelSummary
    input: InputSpec
    num_basis: int
    encoding: str
    dataset: str

    def max_file_bytes(self) -> int:
        """The largest basis file this architecture can need; larger ones are never read."""
        mask_bytes = [math.ceil(math.prod(shape) / 8) for shape in self.summary.weight_shapes]
        data = self.num_basis * sum(mask_bytes)
        if self.encoding != "packed":
            data = 2 * data + self.num_basis * len(mask_bytes) * ENCODED_MASK_SLACK
        return 8 + MAX_HEADER_BYTES + data


class Bundle:
    """An opened bundle: its basis read and validated, its tasks listed. Use :func:`load_bundle`.

    A format 2 task file is read and checked the first time its task is used (:meth:`task`,
    :meth:`task_tensors`, :meth:`model`, ...) and then cached; :attr:`tasks` checks them all.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.basis_path = path / BASIS_FILE
        headers: list[_BasisHeader] = []

        def max_bytes(metadata: dict[str, Any]) -> int:
            headers.append(_basis_header(self.basis_path, metadata))
            return headers[0].max_file_bytes()

        tensors, self.metadata = _load_checked(
            self.basis_path, BASIS_FORMAT, READ_VERSIONS, max_bytes
        )
        header = headers[0]
        self.format_version = header.version
        self.config, self.summary = header.config, header.summary
        self.input, self.num_basis = header.input, header.num_basis
        self.dataset = header.dataset  # the training dataset's name ("" when not recorded)
        self.basis_sha256 = file_sha256(self.basis_path)
        self._check_basis_tensors(tensors, header.encoding)
        self._checked: dict[int, tuple[TaskInfo, dict[str, torch.Tensor]]] = {}
        self._task_folder = self.path / TASKS_FOLDER
        self._names: dict[int, str] = {}
        self._ids: dict[str, int] = {}
        if self.format_version >= 2:
            self._list_tasks()
        else:
            self._read_version_1_tasks()
        self._packed_masks = self._unpack_basis(tensors, header.encoding)
        self._codes: dict[str, list[torch.Tensor]] = {}

    @functools.cached_property
    def task_entries(self) -> tuple[TaskEntry, ...]:
        """Every installed task as listed, by id, without reading its file."""
        return tuple(self._task_entry(index) for index in sorted(self._names))

    @property
    def tasks(self) -> list[TaskInfo]:
        """Every installed task by id, each read and checked (those not used yet are read now)."""
        return [self._checked_task(entry)[0] for entry in self.task_entries]

    def clashing_task(self, index: int, name: str) -> TaskEntry | None:
        """The installed task with this id or this name, if any (no file is read)."""
        if index in self._names:
            return self._task_entry(index)
        if name in self._ids:
            return self._task_entry(self._ids[name])
        return None

    def _task_entry(self, index: int) -> TaskEntry:
        name = self._names[index]
        file_name = task_file_name(index, name, version=self.format_version)
        return TaskEntry(index, name, self._task_folder / file_name)

    def _check_basis_tensors(self, tensors: dict[str, torch.Tensor], encoding: str) -> None:
        """Names, dtypes and shapes against the architecture; nothing is decoded yet."""
        layers = range(self.summary.masked_layers)
        expected = {f"mask.{layer:03d}" for layer in layers}
        if encoding != "packed":
            expected |= {f"mask_sizes.{layer:03d}" for layer in layers}
        if set(tensors) != expected:
            missing = sorted(expected - set(tensors))[:3]
            unknown = sorted(set(tensors) - expected)[:3]
            raise FormatError(
                f"{self.basis_path}: tensors do not match {self.config.arch} "
                f"(missing {missing}, unexpected {unknown})"
            )
        for layer, shape in enumerate(self.summary.weight_shapes):
            name = f"mask.{layer:03d}"
            if encoding == "packed":
                self._check_packed(name, tensors[name], math.prod(shape))
            else:
                self._check_encoded(name, tensors[name], tensors[f"mask_sizes.{layer:03d}"])

    def _check_packed(self, name: str, tensor: torch.Tensor, numel: int) -> None:
        want = (self.num_basis, math.ceil(numel / 8))
        if tensor.dtype != torch.uint8 or tuple(tensor.shape) != want:
            raise FormatError(
                f"{self.basis_path}: {name} is {tensor.dtype} {list(tensor.shape)}, "
                f"expected uint8 {list(want)}"
            )
        if numel % 8 and (tensor[:, -1] >> (numel % 8)).any():
            raise FormatError(f"{self.basis_path}: {name} has bits set past its {numel} elements")

    def _check_encoded(self, name: str, blob: torch.Tensor, sizes: torch.Tensor) -> None:
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise FormatError(f"{self.basis_path}: {name} must be a 1-D uint8 tensor")
        if sizes.dtype != torch.int64 or tuple(sizes.shape) != (self.num_basis,):
            raise FormatError(
                f"{self.basis_path}: mask sizes of {name} must be int64 [{self.num_basis}]"
            )
        if (sizes < 0).any() or int(sizes.sum()) != blob.numel():
            raise FormatError(f"{self.basis_path}: mask sizes of {name} do not add up to its bytes")

    def _unpack_basis(self, tensors: dict[str, torch.Tensor], encoding: str) -> list[torch.Tensor]:
        """Each layer's ``[|B|, ceil(numel / 8)]`` packed masks (decoded when compressed)."""
        if encoding == "packed":
            return [tensors[f"mask.{layer:03d}"] for layer in range(self.summary.masked_layers)]
        return [
            self._decode_layer(
                f"mask.{layer:03d}",
                tensors[f"mask.{layer:03d}"],
                tensors[f"mask_sizes.{layer:03d}"],
                math.prod(shape),
                encoding,
            )
            for layer, shape in enumerate(self.summary.weight_shapes)
        ]

    def _decode_layer(self, name, blob, sizes, numel: int, encoding: str) -> torch.Tensor:
        data = blob.numpy().tobytes()
        rows, start = [], 0
        for size in sizes.tolist():
            try:
                rows.append(
                    torch.from_numpy(
                        decode_mask(data[start : start + size], numel, encoding).copy()
                    )
                )
            except FormatError as error:
                raise FormatError(f"{self.basis_path}: {name}: {error}") from None
            start += size
        return torch.stack(rows)

    def _has_task_folder(self) -> bool:
        folder = self._task_folder
        if not folder.is_dir():
            if os.path.lexists(folder):
                raise FormatError(f"{folder}: not a folder")
            return False
        return True

    def _list_tasks(self) -> None:
        """Format 2: the tasks named by ``tasks/<id>.<name>.safetensors``; no file is opened."""
        if not self._has_task_folder():
            return
        try:
            file_names = os.listdir(self._task_folder)
        except OSError as error:
            raise FormatError(f"{self._task_folder}: cannot list ({error.strerror})") from None
        names, ids, parse = self._names, self._ids, TASK_FILE_PATTERN.fullmatch
        for file_name in file_names:
            if file_name.startswith(".") or not file_name.endswith(TASK_FILE_SUFFIX):
                continue
            match = parse(file_name)
            if match is None or int(match[1]) > MAX_TASK_ID:
                raise FormatError(
                    f"{self._task_folder / file_name}: not a task file name (<id>.<name>"
                    f".safetensors, id 0 to {MAX_TASK_ID}); install tasks with supsup add-task"
                )
            index, name = int(match[1]), match[2]
            if index in names or name in ids:
                other = index if index in names else ids[name]
                raise FormatError(
                    f"{self._task_folder / file_name}: task {index} ({name}) clashes with "
                    f"{task_file_name(other, names[other])}, also installed"
                )
            names[index], ids[name] = name, index

    def _read_version_1_tasks(self) -> None:
        """Format 1: every ``tasks/*.safetensors`` read and checked now (ids are inside)."""
        if not self._has_task_folder():
            return
        for file in sorted(self._task_folder.glob(f"*{TASK_FILE_SUFFIX}")):
            info, tensors = self._check_task(file)
            if file.name != f"{info.name}{TASK_FILE_SUFFIX}":
                raise FormatError(f"{file}: holds task {info.name!r}, whose file is named after it")
            if info.index in self._names:
                other = task_file_name(info.index, self._names[info.index], version=1)
                raise FormatError(f"{file}: task id {info.index} is also used by {other}")
            self._names[info.index], self._ids[info.name] = info.name, info.index
            self._checked[info.index] = (info, tensors)

    def _checked_task(self, entry: TaskEntry) -> tuple[TaskInfo, dict[str, torch.Tensor]]:
        """A listed task's file, read and checked on first use, then cached."""
        checked = self._checked.get(entry.index)
        if checked is None:
            checked = self._check_task(entry.path)
            info = checked[0]
            if (info.index, info.name) != (entry.index, entry.name):
                raise FormatError(
                    f"{entry.path}: holds task {info.index} ({info.name}), not the "
                    f"{entry.index} ({entry.name}) its file name says"
                )
            self._checked[entry.index] = checked
        return checked

    def check_task_file(self, file: Path) -> TaskInfo:
        """Validate a task file against this bundle's basis; raise FormatError naming it."""
        return self._check_task(file)[0]

    def _expected_task_tensors(self) -> dict[str, tuple[int, ...]]:
        expected = {"alpha": (self.summary.masked_layers, self.num_basis)}
        if self.config.norm == "batch":
            channels = (self.summary.norm_channels,)
            expected.update({"norm.running_mean": channels, "norm.running_var": channels})
        return expected

    def _max_task_bytes(self, metadata: dict[str, Any]) -> int:
        """The largest task file this basis can need (float32 tensors); larger ones are not read."""
        elements = sum(math.prod(shape) for shape in self._expected_task_tensors().values())
        return 8 + MAX_HEADER_BYTES + 4 * elements

    def _check_task(self, file: Path) -> tuple[TaskInfo, dict[str, torch.Tensor]]:
        tensors, metadata = _load_checked(
            file, TASK_FORMAT, (self.format_version,), self._max_task_bytes
        )
        basis_sha256 = metadata.get("basis_sha256")
        if not isinstance(basis_sha256, str):
            raise FormatError(f"{file}: bad task metadata (basis_sha256 {_short(basis_sha256)})")
        if basis_sha256 != self.basis_sha256:
            raise FormatError(
                f"{file}: made for another basis (sha256 {basis_sha256[:12]}..., this bundle's "
                f"basis is {self.basis_sha256[:12]}...)"
            )
        index, name, kind = (metadata.get(key) for key in ("index", "name", "kind"))
        if not (
            _is_int(index)
            and 0 <= index <= MAX_TASK_ID
            and isinstance(name, str)
            and TASK_NAME_PATTERN.fullmatch(name)
            and kind in ("basis", "alpha")
        ):
            raise FormatError(
                f"{file}: bad task id, name or kind ({_short(index)}, {_short(name)}, "
                f"{_short(kind)})"
            )
        class_names = metadata.get("class_names")
        if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
            raise FormatError(f"{file}: class names must be a list of strings")
        if len(class_names) != self.config.num_classes:
            raise FormatError(
                f"{file}: {len(class_names)} class names for {self.config.num_classes} outputs"
            )
        self._check_task_tensors(file, tensors)
        if kind == "basis":
            _check_one_hot(file, tensors["alpha"])
        state_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        info = TaskInfo(
            index,
            name,
            kind,
            tuple(class_names),
            file,
            file.stat().st_size,
            state_bytes,
            _task_metrics(file, metadata),
        )
        return info, tensors

    def _check_task_tensors(self, file: Path, tensors: dict[str, torch.Tensor]) -> None:
        expected = self._expected_task_tensors()
        if set(tensors) != set(expected):
            raise FormatError(f"{file}: tensors {sorted(tensors)}, expected {sorted(expected)}")
        for key, shape in expected.items():
            tensor = tensors[key]
            if tensor.dtype not in FLOAT_DTYPES.values() or tuple(tensor.shape) != shape:
                raise FormatError(
                    f"{file}: {key} is {tensor.dtype} {list(tensor.shape)}, "
                    f"expected float32 or float16 {list(shape)}"
                )
            if not torch.isfinite(tensor).all():
                raise FormatError(f"{file}: {key} holds non-finite values")
        if "norm.running_var" in tensors and (tensors["norm.running_var"] < 0).any():
            raise FormatError(f"{file}: norm.running_var holds negative values")

    def task(self, task: int | str) -> TaskInfo:
        """A task by id or name, read and checked on first use.

        An int or a string of digits is a task id (``7``, ``"7"``); any other string is a name
        (task names are never all digits).

        Raises:
            ConfigError: no such task (the message lists installed ones).
            FormatError: the task's file is corrupt or inconsistent.
        """
        return self._checked_task(self._entry(task))[0]

    def _entry(self, task: int | str) -> TaskEntry:
        by_name = isinstance(task, str) and not (task.isascii() and task.isdigit())
        if by_name:
            index = self._ids.get(task)
        else:
            index = int(task) if isinstance(task, str) else operator.index(task)
        if index is not None and index in self._names:
            return self._task_entry(index)
        shown = sorted(self._names)[:MAX_LISTED_TASKS]
        known = ", ".join(f"{index} ({self._names[index]})" for index in shown) or "none"
        if len(self._names) > len(shown):
            known += f" and {len(self._names) - len(shown)} more"
        wanted = f"named {task!r}" if by_name else f"with id {index}"
        raise ConfigError(f"no task {wanted} in {self.path}; installed tasks: {known}")

    def task_tensors(self, task: int | str) -> dict[str, torch.Tensor]:
        """A task's tensors (alpha table, norm statistics), read and checked on first use."""
        return dict(self._checked_task(self._entry(task))[1])

    def packed_basis(self, layer: int) -> torch.Tensor:
        """The basis masks of one masked layer, bit-packed: uint8 ``[|B|, ceil(numel / 8)]``."""
        return self._packed_masks[layer]

    def codes(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Per-layer int32 codes (sign and basis bits), computed once per device."""
        key = str(torch.device(device))
        if key not in self._codes:
            codes = []
            for layer, (packed, shape) in enumerate(
                zip(self._packed_masks, self.summary.weight_shapes, strict=True)
            ):
                numel = math.prod(shape)
                negative = backbone.sign_bits(self.config.seed, layer, numel, device=device)
                codes.append(codes_from_packed(packed.to(device), negative, numel))
            self._codes[key] = codes
        return self._codes[key]

    def materialize(
        self,
        task: int | str,
        device: torch.device | str = "cpu",
        *,
        out: list[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Every masked layer's effective float32 weight for ``task``, bit-exact per the spec.

        Args:
            task: task id or name.
            device: where to build the weights.
            out: optional float32 tensors of the layers' shapes to write into (no allocation).

        Returns:
            One weight per masked layer (``out`` itself when given).
        """
        return self._materialize(self.task_tensors(task)["alpha"], device, out)

    def _materialize(self, alpha, device, out) -> list[torch.Tensor]:
        alpha = alpha.to(device=device, dtype=torch.float32)
        weights = []
        for layer, codes in enumerate(self.codes(device)):
            shape = self.summary.weight_shapes[layer]
            table = code_value_table(alpha[layer], backbone.weight_constant(backbone.fan_in(shape)))
            if out is None:
                weights.append(table.index_select(0, codes).view(shape))
            else:
                torch.index_select(table, 0, codes, out=out[layer].view(-1))
                weights.append(out[layer])
        return weights

    def model(self, task: int | str, *, device: torch.device | str = "cpu") -> MaskedModel:
        """An eval-mode model running ``task``, its weights materialised."""
        tensors = self.task_tensors(task)
        model = build_model(_single_slot(self.config)).to(device)
        use_fixed(model, self._materialize(tensors["alpha"], device, None))
        load_norm_state(model, 0, tensors)
        model.bundle_task = self.task(task).index
        return model.eval()

    @torch.no_grad()
    def switch(self, model: nn.Module, task: int | str) -> None:
        """Make a model from :meth:`model` run another task, in place (no rebuild)."""
        tensors = self.task_tensors(task)
        fixed = [layer.source.fixed for layer in masked_layers(model)]
        self._materialize(tensors["alpha"], fixed[0].device, fixed)
        load_norm_state(model, 0, tensors)
        model.bundle_task = self.task(task).index

    def predict(
        self,
        images: torch.Tensor | list[str | Path],
        *,
        task: int | str,
        runtime: str = "torch",
        device: str = "cpu",
        batch_size: int = 256,
    ) -> list[Any]:
        """Predict classes with one task's model (the Python side of ``supsup infer``).

        Args:
            images: image files or folders (converted to the bundle's input format), or a
                tensor of images already normalised like :func:`supsup_deploy.data.normalise`.
            task: task id or name.
            runtime: ``"torch"`` or ``"onnx"`` (the task exported on the fly, parity checked).
            device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            batch_size: images per forward pass.

        Returns:
            One :class:`supsup_deploy.runtime.Prediction` per image (class index, class name,
            probability), in input order.
        """
        from supsup_deploy.runtime import Runner, collect_image_paths, load_images

        if isinstance(images, torch.Tensor):
            names = [f"image[{row}]" for row in range(len(images))]
        else:
            files = collect_image_paths(images)
            images, names = load_images(files, self), [str(path) for path in files]
        runner = Runner(self, runtime=runtime, device=device)
        return runner.predict(task, images, names, batch_size=batch_size)


def _single_slot(config: ModelConfig) -> ModelConfig:
    values = config.to_dict()
    values["num_tasks"] = 1
    return ModelConfig.from_dict(values)


def _load_checked(
    path: Path,
    expected_format: str,
    versions: tuple[int, ...],
    max_bytes: Callable[[dict[str, Any]], int],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file of ``expected_format``: format, version, size limit, then content hash."""

    def limit(metadata: dict[str, Any]) -> int:
        if metadata.get("format") != expected_format:
            raise FormatError(f"{path}: not a {expected_format} file")
        version = metadata.get("format_version")
        if not _is_int(version) or version not in versions:
            wanted = " or ".join(map(str, versions))
            raise FormatError(f"{path}: format version {_short(version)}, expected {wanted}")
        return max_bytes(metadata)

    stored = read_safetensors(path, max_bytes=limit)
    tensors, metadata = stored.tensors, stored.metadata
    if metadata["format_version"] == 1:
        sealed = metadata.get("tensors_sha256") == tensors_sha256(tensors)
    else:
        header = stored.header_metadata
        if set(header) != {METADATA_KEY, CONTENT_HASH_KEY} or not isinstance(
            header[CONTENT_HASH_KEY], str
        ):
            raise FormatError(
                f"{path}: header metadata must hold exactly {METADATA_KEY!r} and "
                f"{CONTENT_HASH_KEY!r}"
            )
        try:
            digest = content_sha256(header[METADATA_KEY], tensors)
        except FormatError as error:
            raise FormatError(f"{path}: {error}") from None
        sealed = header[CONTENT_HASH_KEY] == digest
    if not sealed:
        raise FormatError(f"{path}: content hash mismatch (the file is corrupt)")
    return tensors, metadata


def _check_one_hot(path: Path, alpha: torch.Tensor) -> None:
    """A basis task's table: every row the same one-hot row (1 in column t, 0 elsewhere)."""
    alpha = alpha.float()
    column = int(alpha[0].argmax()) if alpha.numel() else 0
    one_hot = torch.zeros_like(alpha)
    one_hot[:, column] = 1.0
    if not torch.equal(alpha, one_hot):
        raise FormatError(f"{path}: a basis task's alpha must be one one-hot row in every layer")


def _basis_header(path: Path, metadata: dict[str, Any]) -> _BasisHeader:
    """Check a basis file's metadata (before its tensors are read)."""
    if metadata.get("sign_hash") != SIGN_HASH:
        raise FormatError(f"{path}: unknown sign hash {_short(metadata.get('sign_hash'))}")
    encoding = metadata.get("mask_encoding", "packed")
    if encoding not in ENCODINGS:
        raise FormatError(f"{path}: unknown mask encoding {_short(encoding)}")
    config = _model_config(path, metadata.get("model"))
    summary = _summary(path, config)
    num_basis = metadata.get("num_basis")
    if not _is_int(num_basis) or not 1 <= num_basis <= MAX_BASIS:
        raise FormatError(f"{path}: num_basis {_short(num_basis)} out of range 1..{MAX_BASIS}")
    layers = [
        {"name": name, "shape": list(shape)}
        for name, shape in zip(summary.layer_names, summary.weight_shapes, strict=True)
    ]
    recorded = (metadata.get("layers"), metadata.get("norm_channels"))
    if _json(recorded) != _json((layers, summary.norm_channels)):
        raise FormatError(f"{path}: layers or norm_channels do not match {config.arch}")
    dataset = _extra(path, metadata).get("dataset", "")
    if not isinstance(dataset, str):
        raise FormatError(f"{path}: extra.dataset must be a string")
    spec = _input_spec(path, metadata.get("input"), config)
    return _BasisHeader(
        metadata["format_version"], config, summary, spec, num_basis, encoding, dataset
    )


def _model_config(path: Path, values: Any) -> ModelConfig:
    """The model config, every field present and of its JSON type, then range-checked."""
    if not isinstance(values, dict) or set(values) != set(CONFIG_FIELDS):
        raise FormatError(f"{path}: model config must have exactly {sorted(CONFIG_FIELDS)}")
    for key, kind in CONFIG_FIELDS.items():
        value = values[key]
        fits = {
            str: isinstance(value, str),
            int: _is_int(value) and 0 <= value < 2**32,
            float: _is_number(value),
        }[kind]
        if not fits:
            raise FormatError(f"{path}: model config {key} is {_short(value)}")
    try:
        return ModelConfig.from_dict(values)
    except ConfigError as error:
        raise FormatError(f"{path}: bad model config ({error})") from None


def _summary(path: Path, config: ModelConfig) -> ModelSummary:
    """The architecture's layers, refused past ``MAX_MASKED_WEIGHTS`` masked weights."""
    try:
        summary = summarize_model(config.arch, **_options(config))
    except ConfigError as error:
        raise FormatError(f"{path}: bad model config ({error})") from None
    if summary.masked_weights > MAX_MASKED_WEIGHTS:
        raise FormatError(
            f"{path}: {config.arch} with these options has {summary.masked_weights} masked "
            f"weights, more than the {MAX_MASKED_WEIGHTS} a bundle may have"
        )
    return summary


def _input_spec(path: Path, values: Any, config: ModelConfig) -> InputSpec:
    """The input preprocessing: a size in ``1..MAX_INPUT_SIZE``, finite means, positive stds."""
    if not isinstance(values, dict) or set(values) != {"size", "channels", "mean", "std"}:
        raise FormatError(f"{path}: input must have exactly size, channels, mean and std")
    size, channels, mean, std = (values[key] for key in ("size", "channels", "mean", "std"))
    valid = (
        _is_int(size)
        and 1 <= size <= MAX_INPUT_SIZE
        and _is_int(channels)
        and channels == config.in_channels
        and isinstance(mean, list)
        and isinstance(std, list)
        and len(mean) == len(std) == channels
        and all(_is_number(value) for value in mean + std)
        and all(value > 0 for value in std)
    )
    if not valid:
        raise FormatError(f"{path}: bad input spec {_short(values)}")
    return InputSpec(size, channels, tuple(map(float, mean)), tuple(map(float, std)))


def _extra(path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    extra = metadata.get("extra", {})
    if not isinstance(extra, dict):
        raise FormatError(f"{path}: extra metadata is not a JSON object")
    return extra


def _task_metrics(path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """A task's recorded metrics, with the values readers use checked for type."""
    metrics = _extra(path, metadata).get("metrics", {})
    if not isinstance(metrics, dict):
        raise FormatError(f"{path}: extra.metrics is not a JSON object")
    accuracy = metrics.get("test_accuracy")
    classes = metrics.get("classes", [])
    if accuracy is not None and not _is_number(accuracy):
        raise FormatError(f"{path}: extra.metrics.test_accuracy is {_short(accuracy)}")
    if not isinstance(classes, list) or not all(
        _is_int(label) and 0 <= label < 2**31 for label in classes
    ):
        raise FormatError(f"{path}: extra.metrics.classes must be a list of class numbers")
    return metrics


def _is_int(value: Any) -> bool:
    """A JSON integer (JSON's true and false are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _json(value: Any) -> str:
    """Canonical JSON, for comparisons where 3.0 must not equal 3, nor true 1."""
    return json.dumps(value, sort_keys=True)


def _short(value: Any) -> str:
    """A value's repr cut to one short line, for error messages about hostile metadata."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load_bundle(path: str | Path) -> Bundle:
    """Open and validate a bundle folder.

    Args:
        path: the bundle folder.

    Returns:
        A :class:`Bundle`; ``bundle.task_entries`` lists the installed tasks (no task file is
        read yet), ``bundle.tasks`` reads and checks them all.

    Raises:
        FormatError: anything missing, corrupt, or inconsistent; the message names the file.

    Example:
        >>> bundle = load_bundle("artifacts/bundle")
        >>> model = bundle.model(bundle.tasks[0].index)
    """
    path = Path(path)
    if not (path / BASIS_FILE).is_file():
        raise FormatError(f"{path}: not a bundle (no {BASIS_FILE})")
    return Bundle(path)
