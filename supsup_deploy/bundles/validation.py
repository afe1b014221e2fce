"""Every check that turns a bad bundle file into a :class:`~supsup_deploy.errors.FormatError`.

In the order ``docs/SECURITY.md`` lists them: each file's format, version, size limit and
content hash (:func:`load_checked`; the safetensors header itself is checked by
:func:`supsup_deploy.files.read_safetensors`), then the basis (:func:`read_basis`), then the
task file names (:func:`list_task_files`) and each task file (:func:`read_task`). Every error
names the file; values from a file are quoted at most 40 characters long.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supsup_deploy.alpha_codes import dequantize_alpha, unpack_nibbles
from supsup_deploy.alpha_groups import as_grouped, max_groups
from supsup_deploy.binary_masks import MAX_BASIS
from supsup_deploy.bundles.format import (
    BASIS_FILE,
    BASIS_FORMAT,
    CONTENT_HASH_KEY,
    FLOAT_DTYPES,
    MAX_POOL_IMAGES,
    POOL_TENSOR,
    READ_VERSIONS,
    SIGN_HASH,
    SIGNATURE_SCALE_SHAPE,
    SIGNATURE_SCALE_TENSOR,
    SIGNATURE_SHAPE,
    SIGNATURE_TENSOR,
    TASK_FILE_PATTERN,
    TASK_FILE_SUFFIX,
    TASK_FORMAT,
    TASK_KINDS,
    TASK_NAME_PATTERN,
    InputSpec,
    TaskInfo,
    content_sha256,
    task_file_name,
    tensors_sha256,
)
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.files import MAX_HEADER_BYTES, METADATA_KEY, read_safetensors
from supsup_deploy.mask_compression import ENCODINGS, decode_mask
from supsup_deploy.models import ModelConfig, ModelSummary, summarize_model

# Limits on what a bundle may declare, checked before anything is allocated (docs/SECURITY.md).
MAX_MASKED_WEIGHTS = 1 << 30
"""Masked weights of an architecture (wide_resnet101_2 has 126.8 million)."""
MAX_INPUT_SIZE = 4096
"""Side of the square input images."""
MAX_TASK_ID = 2**31 - 1
"""Largest task id."""
ENCODED_MASK_SLACK = 64
"""Bytes an encoded mask may take beyond twice its packed size (its header and size entry)."""
CONFIG_FIELDS = {
    field.name: {"str": str, "int": int, "float": float}[field.type]
    for field in dataclasses.fields(ModelConfig)
}
"""The model config's fields and their JSON types, as :class:`ModelConfig` declares them."""


def model_summary(config: ModelConfig) -> ModelSummary:
    """The layers of the architecture a model config builds (no weight is allocated)."""
    options = config.to_dict()
    return summarize_model(options.pop("arch"), **options)


def check_bundle_folder(path: Path) -> None:
    """A bundle is a folder holding a basis file."""
    if not (path / BASIS_FILE).is_file():
        raise FormatError(f"{path}: not a bundle (no {BASIS_FILE})")


# --- every file -------------------------------------------------------------------------------


def load_checked(
    path: Path,
    expected_format: str,
    versions: tuple[int, ...],
    max_bytes: Callable[[dict[str, Any]], int],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file of ``expected_format``: format, version, size limit, then content hash.

    Args:
        path: the file.
        expected_format: its ``format`` (``supsup-basis`` or ``supsup-task``).
        versions: the ``format_version`` values accepted.
        max_bytes: the largest file its (format- and version-checked) metadata allows.

    Returns:
        Its tensors and its metadata.
    """

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


# --- the basis --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BasisHeader:
    """What a basis file's metadata declares, checked: all that is needed before its tensors."""

    version: int
    config: ModelConfig
    summary: ModelSummary
    input: InputSpec
    num_basis: int
    encoding: str
    dataset: str
    pool_images: int = 0
    """Format 3: images in the basis's calibration pool (0: no pool)."""

    @property
    def pool_shape(self) -> tuple[int, int, int, int]:
        """The calibration pool's shape: ``[images, channels, size, size]``."""
        return (self.pool_images, self.input.channels, self.input.size, self.input.size)

    def max_file_bytes(self) -> int:
        """The largest basis file this architecture can need; larger ones are never read."""
        mask_bytes = [math.ceil(math.prod(shape) / 8) for shape in self.summary.weight_shapes]
        data = self.num_basis * sum(mask_bytes)
        if self.encoding != "packed":
            data = 2 * data + self.num_basis * len(mask_bytes) * ENCODED_MASK_SLACK
        return 8 + MAX_HEADER_BYTES + data + math.prod(self.pool_shape)

    def task_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors every task serves (as :meth:`Bundle.task_tensors` gives them), by name:
        shape, ``alpha``'s for one row per layer (a grouped task serves ``[L, G, |B|]``). A task
        file may store them in another form: see :func:`stored_task_forms`."""
        expected = {"alpha": (self.summary.masked_layers, 1, self.num_basis)}
        if self.config.norm == "batch":
            channels = (self.summary.norm_channels,)
            expected.update({"norm.running_mean": channels, "norm.running_var": channels})
        return expected

    @property
    def max_groups(self) -> int:
        """The most alpha rows per layer a task may hold (1 before format 4)."""
        return max_groups(self.summary.weight_shapes) if self.version >= 4 else 1

    def max_task_bytes(self, _metadata: dict[str, Any]) -> int:
        """The largest task file this basis can need (float32 tensors with the most alpha rows,
        plus a scale per row); larger ones are not read."""
        shapes = self.task_tensor_shapes()
        rows = self.summary.masked_layers * self.max_groups
        elements = sum(math.prod(shapes[key]) for key in shapes if key != "alpha")
        return 8 + MAX_HEADER_BYTES + 4 * (elements + rows * (self.num_basis + 1))


@dataclass(frozen=True)
class CheckedBasis:
    """A basis file read and checked whole."""

    header: BasisHeader
    metadata: dict[str, Any]
    packed_masks: list[torch.Tensor]
    """Each masked layer's ``[|B|, ceil(numel / 8)]`` uint8 masks (decoded when compressed)."""
    pool: torch.Tensor | None
    """The calibration pool: uint8 ``[images, channels, size, size]``, or None."""


def read_basis(path: Path) -> CheckedBasis:
    """Read and check a basis file: its metadata, then its tensors, then decode its masks.

    Raises:
        FormatError: anything missing, corrupt, out of its limits or not matching its
            architecture; the message names the file.
    """
    headers: list[BasisHeader] = []

    def max_bytes(metadata: dict[str, Any]) -> int:
        headers.append(basis_header(path, metadata))
        return headers[0].max_file_bytes()

    tensors, metadata = load_checked(path, BASIS_FORMAT, READ_VERSIONS, max_bytes)
    header = headers[0]
    check_basis_tensors(path, header, tensors)
    pool = tensors.get(POOL_TENSOR)
    return CheckedBasis(header, metadata, _unpack_basis(path, header, tensors), pool)


def basis_header(path: Path, metadata: dict[str, Any]) -> BasisHeader:
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
    pool_images = _pool_images(path, metadata, config)
    return BasisHeader(
        metadata["format_version"], config, summary, spec, num_basis, encoding, dataset, pool_images
    )


def _pool_images(path: Path, metadata: dict[str, Any], config: ModelConfig) -> int:
    """Format 3's optional ``pool_images``: 1..MAX_POOL_IMAGES, in a BatchNorm basis only."""
    if "pool_images" not in metadata:
        return 0
    count = metadata["pool_images"]
    if metadata["format_version"] < 3:
        return 0
    if not _is_int(count) or not 1 <= count <= MAX_POOL_IMAGES:
        raise FormatError(f"{path}: pool_images {_short(count)} out of range 1..{MAX_POOL_IMAGES}")
    if config.norm != "batch":
        raise FormatError(f"{path}: a calibration pool needs norm 'batch', not {config.norm!r}")
    return count


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
        summary = model_summary(config)
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


def check_basis_tensors(path: Path, header: BasisHeader, tensors: dict[str, torch.Tensor]) -> None:
    """Names, dtypes and shapes against the architecture; nothing is decoded yet."""
    layers = range(header.summary.masked_layers)
    expected = {f"mask.{layer:03d}" for layer in layers}
    if header.encoding != "packed":
        expected |= {f"mask_sizes.{layer:03d}" for layer in layers}
    if header.pool_images:
        expected.add(POOL_TENSOR)
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3]
        unknown = sorted(set(tensors) - expected)[:3]
        raise FormatError(
            f"{path}: tensors do not match {header.config.arch} "
            f"(missing {missing}, unexpected {unknown})"
        )
    if header.pool_images:
        pool = tensors[POOL_TENSOR]
        if pool.dtype != torch.uint8 or tuple(pool.shape) != header.pool_shape:
            raise FormatError(
                f"{path}: pool is {pool.dtype} {list(pool.shape)}, expected uint8 "
                f"{list(header.pool_shape)}"
            )
    for layer, shape in enumerate(header.summary.weight_shapes):
        name = f"mask.{layer:03d}"
        if header.encoding == "packed":
            _check_packed(path, name, tensors[name], math.prod(shape), header.num_basis)
        else:
            sizes = tensors[f"mask_sizes.{layer:03d}"]
            _check_encoded(path, name, tensors[name], sizes, header.num_basis)


def _check_packed(path: Path, name: str, tensor: torch.Tensor, numel: int, num_basis: int) -> None:
    want = (num_basis, math.ceil(numel / 8))
    if tensor.dtype != torch.uint8 or tuple(tensor.shape) != want:
        raise FormatError(
            f"{path}: {name} is {tensor.dtype} {list(tensor.shape)}, expected uint8 {list(want)}"
        )
    if numel % 8 and (tensor[:, -1] >> (numel % 8)).any():
        raise FormatError(f"{path}: {name} has bits set past its {numel} elements")


def _check_encoded(
    path: Path, name: str, blob: torch.Tensor, sizes: torch.Tensor, num_basis: int
) -> None:
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise FormatError(f"{path}: {name} must be a 1-D uint8 tensor")
    if sizes.dtype != torch.int64 or tuple(sizes.shape) != (num_basis,):
        raise FormatError(f"{path}: mask sizes of {name} must be int64 [{num_basis}]")
    if (sizes < 0).any() or int(sizes.sum()) != blob.numel():
        raise FormatError(f"{path}: mask sizes of {name} do not add up to its bytes")


def _unpack_basis(
    path: Path, header: BasisHeader, tensors: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """Each layer's ``[|B|, ceil(numel / 8)]`` packed masks (decoded when compressed)."""
    if header.encoding == "packed":
        return [tensors[f"mask.{layer:03d}"] for layer in range(header.summary.masked_layers)]
    return [
        _decode_layer(path, f"mask.{layer:03d}", tensors, layer, math.prod(shape), header.encoding)
        for layer, shape in enumerate(header.summary.weight_shapes)
    ]


def _decode_layer(
    path: Path, name: str, tensors: dict[str, torch.Tensor], layer: int, numel: int, encoding: str
) -> torch.Tensor:
    """A compressed layer's masks, each decoding to exactly ``numel`` bits."""
    data = tensors[name].numpy().tobytes()
    rows, start = [], 0
    for size in tensors[f"mask_sizes.{layer:03d}"].tolist():
        try:
            rows.append(
                torch.from_numpy(decode_mask(data[start : start + size], numel, encoding).copy())
            )
        except FormatError as error:
            raise FormatError(f"{path}: {name}: {error}") from None
        start += size
    return torch.stack(rows)


# --- the tasks --------------------------------------------------------------------------------


def has_task_folder(folder: Path) -> bool:
    """Whether a bundle has a ``tasks`` folder (a file of that name is refused)."""
    if not folder.is_dir():
        if os.path.lexists(folder):
            raise FormatError(f"{folder}: not a folder")
        return False
    return True


def list_task_files(folder: Path) -> dict[int, str]:
    """Format 2: the tasks named by ``tasks/<id>.<name>.safetensors``; no file is opened.

    Returns:
        Task names by id.
    """
    if not has_task_folder(folder):
        return {}
    try:
        file_names = os.listdir(folder)
    except OSError as error:
        raise FormatError(f"{folder}: cannot list ({error.strerror})") from None
    names: dict[int, str] = {}
    ids: dict[str, int] = {}
    parse = TASK_FILE_PATTERN.fullmatch
    for file_name in file_names:
        if file_name.startswith(".") or not file_name.endswith(TASK_FILE_SUFFIX):
            continue
        match = parse(file_name)
        if match is None or int(match[1]) > MAX_TASK_ID:
            raise FormatError(
                f"{folder / file_name}: not a task file name (<id>.<name>"
                f".safetensors, id 0 to {MAX_TASK_ID}); install tasks with supsup add-task"
            )
        index, name = int(match[1]), match[2]
        if index in names or name in ids:
            other = index if index in names else ids[name]
            raise FormatError(
                f"{folder / file_name}: task {index} ({name}) clashes with "
                f"{task_file_name(other, names[other])}, also installed"
            )
        names[index], ids[name] = name, index
    return names


def read_version_1_tasks(
    folder: Path, header: BasisHeader, basis_sha256: str
) -> dict[int, tuple[TaskInfo, dict[str, torch.Tensor]]]:
    """Format 1: every ``tasks/*.safetensors`` read and checked now (ids are inside).

    Returns:
        Each task's info and tensors, by id.
    """
    if not has_task_folder(folder):
        return {}
    tasks: dict[int, tuple[TaskInfo, dict[str, torch.Tensor]]] = {}
    for file in sorted(folder.glob(f"*{TASK_FILE_SUFFIX}")):
        info, tensors = read_task(file, header, basis_sha256)
        if file.name != f"{info.name}{TASK_FILE_SUFFIX}":
            raise FormatError(f"{file}: holds task {info.name!r}, whose file is named after it")
        if info.index in tasks:
            other = task_file_name(info.index, tasks[info.index][0].name, version=1)
            raise FormatError(f"{file}: task id {info.index} is also used by {other}")
        tasks[info.index] = (info, tensors)
    return tasks


def check_listed_task(info: TaskInfo, index: int, name: str) -> None:
    """A format 2 task file holds the task its file name says."""
    if (info.index, info.name) != (index, name):
        raise FormatError(
            f"{info.path}: holds task {info.index} ({info.name}), not the "
            f"{index} ({name}) its file name says"
        )


def read_task(
    file: Path, header: BasisHeader, basis_sha256: str
) -> tuple[TaskInfo, dict[str, torch.Tensor]]:
    """Read and check a task file against its basis.

    Args:
        file: the task file.
        header: the basis's checked header (version, architecture, ``|B|``).
        basis_sha256: the basis file's SHA-256, which the task must record.

    Returns:
        The task's info and its tensors.

    Raises:
        FormatError: the file is corrupt, made for another basis or inconsistent with it.
    """
    tensors, metadata = load_checked(file, TASK_FORMAT, (header.version,), header.max_task_bytes)
    recorded_basis = metadata.get("basis_sha256")
    if not isinstance(recorded_basis, str):
        raise FormatError(f"{file}: bad task metadata (basis_sha256 {_short(recorded_basis)})")
    if recorded_basis != basis_sha256:
        raise FormatError(
            f"{file}: made for another basis (sha256 {recorded_basis[:12]}..., this bundle's "
            f"basis is {basis_sha256[:12]}...)"
        )
    index, name, kind = (metadata.get(key) for key in ("index", "name", "kind"))
    if not (
        _is_int(index)
        and 0 <= index <= MAX_TASK_ID
        and isinstance(name, str)
        and TASK_NAME_PATTERN.fullmatch(name)
        and kind in TASK_KINDS
    ):
        raise FormatError(
            f"{file}: bad task id, name or kind ({_short(index)}, {_short(name)}, {_short(kind)})"
        )
    class_names = metadata.get("class_names")
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
        raise FormatError(f"{file}: class names must be a list of strings")
    if not 2 <= len(class_names) <= header.config.num_classes:
        raise FormatError(
            f"{file}: {len(class_names)} class names for {header.config.num_classes} outputs "
            "(a task has 2 classes up to one per output)"
        )
    _check_alpha_groups(file, stored_groups(tensors), header)
    check_task_tensors(file, tensors, stored_task_forms(header, tensors))
    _check_padding_nibbles(file, tensors, header.num_basis)
    if kind == "basis":
        _check_one_hot(file, stored_alpha(tensors, header.num_basis))
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


def stored_task_forms(
    header: BasisHeader, tensors: Mapping[str, torch.Tensor]
) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """The tensors a task file of this basis must hold, given which it holds: name to shape and
    allowed dtypes.

    The alpha table is float32 or float16, or (format 3) int8 codes with ``alpha.scale``, one
    float16 or float32 scale per row. In format 4 it is ``[L, G, |B|]``, ``G`` from 1 to
    :attr:`BasisHeader.max_groups` (:func:`stored_groups`), and may also be int4 codes stored two
    to a byte (uint8 ``[ceil(L * G * |B| / 2)]``); before, ``[L, |B|]``. The statistics
    are stored with BatchNorm, except that a task of a basis with a calibration pool may leave
    both out (they are computed from the pool). A format 3 or 4 task may hold a float16
    ``signature``; in format 4 it may instead be uint8 codes with ``signature.scale``, a float16
    step and minimum per row.
    """
    shapes = header.task_tensor_shapes()
    floats = tuple(FLOAT_DTYPES)
    forms = {key: (shape, floats) for key, shape in shapes.items()}
    alpha = tensors.get("alpha")
    layers, num_basis = header.summary.masked_layers, header.num_basis
    rows: tuple[int, ...] = (layers,)
    if header.version >= 4:
        groups = stored_groups(tensors)
        rows = (layers, groups if 1 <= groups <= header.max_groups else 1)
    forms["alpha"] = ((*rows, num_basis), floats)
    coded = alpha is not None and alpha.dtype in (torch.int8, torch.uint8)
    if header.version >= 3 and (coded or "alpha.scale" in tensors):
        forms["alpha"] = ((*rows, num_basis), ("int8",))
        if header.version >= 4 and alpha is not None and alpha.dtype == torch.uint8:
            forms["alpha"] = ((-(-math.prod(rows) * num_basis // 2),), ("uint8",))
        forms["alpha.scale"] = (rows, floats)
    if header.version >= 3 and SIGNATURE_TENSOR in tensors:
        forms[SIGNATURE_TENSOR] = (SIGNATURE_SHAPE, ("float16",))
        signature = tensors[SIGNATURE_TENSOR]
        if header.version >= 4 and (
            signature.dtype == torch.uint8 or SIGNATURE_SCALE_TENSOR in tensors
        ):
            forms[SIGNATURE_TENSOR] = (SIGNATURE_SHAPE, ("uint8",))
            forms[SIGNATURE_SCALE_TENSOR] = (SIGNATURE_SCALE_SHAPE, ("float16",))
    if header.pool_images and not {"norm.running_mean", "norm.running_var"} & set(tensors):
        forms.pop("norm.running_mean", None)
        forms.pop("norm.running_var", None)
    return forms


def stored_groups(tensors: Mapping[str, torch.Tensor]) -> int:
    """A stored alpha table's rows per layer: its second dimension (``[L, G, |B|]``), the scales'
    for int4 codes (stored flat), 1 for a ``[L, |B|]`` table."""
    alpha, scale = tensors.get("alpha"), tensors.get("alpha.scale")
    if alpha is not None and alpha.dtype == torch.uint8:
        return scale.shape[1] if scale is not None and scale.dim() == 2 else 1
    return alpha.shape[1] if alpha is not None and alpha.dim() == 3 else 1


def stored_alpha(tensors: Mapping[str, torch.Tensor], num_basis: int) -> torch.Tensor:
    """A task file's alpha table as it serves, ``[L, G, |B|]``: int8 or int4 codes times their
    scales (float32), or the stored float table; a ``[L, |B|]`` table (before format 4) as
    ``G = 1``."""
    alpha = tensors["alpha"]
    if alpha.dtype == torch.uint8:
        scale = tensors["alpha.scale"]
        alpha = dequantize_alpha(unpack_nibbles(alpha, (*scale.shape, num_basis)), scale)
    elif alpha.dtype == torch.int8:
        alpha = dequantize_alpha(alpha, tensors["alpha.scale"])
    return as_grouped(alpha)


def stored_signature(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """A task file's signature as it serves, float32 ``[2, SIGNATURE_SIZE]`` (uint8 codes times
    their row's step plus its minimum, or the stored float16 values), or None when it holds
    none."""
    signature = tensors.get(SIGNATURE_TENSOR)
    if signature is None:
        return None
    signature = torch.as_tensor(signature).float()
    if SIGNATURE_SCALE_TENSOR in tensors:
        step, minimum = torch.as_tensor(tensors[SIGNATURE_SCALE_TENSOR]).float().unbind(dim=1)
        return signature * step[:, None] + minimum[:, None]
    return signature


def check_task_tensors(
    file: Path,
    tensors: Mapping[str, torch.Tensor | np.ndarray],
    expected: Mapping[str, tuple[tuple[int, ...], tuple[str, ...]]],
    *,
    holds: str = "tensors",
    wanted: str = "expected",
) -> None:
    """The one check of a task's tensors, wherever they come from: a task file (torch tensors)
    or an ONNX Runtime adapter (numpy arrays).

    Args:
        file: the file that holds them, for messages.
        tensors: tensor name to values.
        expected: tensor name to its shape and the dtype names it may have.
        holds: what the names message calls ``tensors`` (``"adapter holds"``).
        wanted: what the messages call ``expected`` (``"the shared graph takes"``).

    Raises:
        FormatError: another set of names, a dtype or shape not expected, a non-finite value,
            or a negative running variance.
    """
    if set(tensors) != set(expected):
        raise FormatError(f"{file}: {holds} {sorted(tensors)}, {wanted} {sorted(expected)}")
    for key, (shape, dtypes) in expected.items():
        tensor = tensors[key]
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in dtypes or tuple(tensor.shape) != shape:
            raise FormatError(
                f"{file}: {key} is {tensor.dtype} {list(tensor.shape)}, "
                f"{wanted} {' or '.join(dtypes)} {list(shape)}"
            )
        if not torch.isfinite(torch.as_tensor(tensor)).all():
            raise FormatError(f"{file}: {key} holds non-finite values")
    if "norm.running_var" in tensors and (tensors["norm.running_var"] < 0).any():
        raise FormatError(f"{file}: norm.running_var holds negative values")
    if SIGNATURE_TENSOR in tensors and (stored_signature(tensors)[1] < 0).any():
        raise FormatError(f"{file}: the signature's variances hold negative values")


def _check_alpha_groups(path: Path, groups: int, header: BasisHeader) -> None:
    """A format 4 table's rows per layer: 1 to :attr:`BasisHeader.max_groups`."""
    if header.version >= 4 and not 1 <= groups <= header.max_groups:
        raise FormatError(
            f"{path}: alpha has {groups} rows per layer; a table has 1 to "
            f"{header.max_groups} (the smallest layer's outputs)"
        )


def _check_padding_nibbles(path: Path, tensors: Mapping[str, torch.Tensor], num_basis: int) -> None:
    """int4 codes of an odd count: the last byte's high nibble is unused and must be 0."""
    alpha = tensors["alpha"]
    if alpha.dtype != torch.uint8:
        return
    count = tensors["alpha.scale"].numel() * num_basis
    if count % 2 and int(alpha[-1]) >> 4:
        raise FormatError(f"{path}: alpha's unused last high nibble (an odd code count) must be 0")


def _check_one_hot(path: Path, alpha: torch.Tensor) -> None:
    """A basis task's table: every row the same one-hot row (1 in column t, 0 elsewhere)."""
    alpha = alpha.float().flatten(0, -2)
    column = int(alpha[0].argmax()) if alpha.numel() else 0
    one_hot = torch.zeros_like(alpha)
    one_hot[:, column] = 1.0
    if not torch.equal(alpha, one_hot):
        raise FormatError(f"{path}: a basis task's alpha must be one one-hot row in every layer")


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


# --- JSON values --------------------------------------------------------------------------------


def _extra(path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    extra = metadata.get("extra", {})
    if not isinstance(extra, dict):
        raise FormatError(f"{path}: extra metadata is not a JSON object")
    return extra


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
