"""Writing bundles: :func:`save_bundle` for a whole bundle, :func:`save_basis` and
:func:`save_task` for its single files (every file written atomically, format 4)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from supsup_deploy.alpha_groups import as_grouped
from supsup_deploy.binary_masks import check_num_basis, pack_bits
from supsup_deploy.bundles.format import (
    BASIS_FILE,
    BASIS_FORMAT,
    FORMAT_VERSION,
    MAX_POOL_IMAGES,
    POOL_TENSOR,
    SIGN_HASH,
    SIGNATURE_SCALE_TENSOR,
    SIGNATURE_TENSOR,
    TASK_FORMAT,
    TASKS_FOLDER,
    InputSpec,
    check_task_name,
    file_sha256,
    save_sealed,
    task_file_name,
)
from supsup_deploy.bundles.validation import model_summary
from supsup_deploy.errors import ConfigError
from supsup_deploy.files import new_folder
from supsup_deploy.mask_compression import ENCODINGS, encode_mask
from supsup_deploy.models import ModelConfig

WRITE_VERSIONS = (2, 3, FORMAT_VERSION)
"""The versions task files are written in (a bundle keeps its version when it learns a task)."""


@dataclass(frozen=True, kw_only=True)
class TaskData:
    """One task of a bundle in memory, as :func:`save_bundle` and :func:`save_task` write it.

    Attributes:
        index: task id, unique within the bundle.
        name: task name (letters, digits, ``_.-``; also its file name).
        alpha: ``[num_layers, |B|]`` or (format 4) ``[num_layers, G, |B|]`` table, float32 or
            float16; or int8 codes with ``alpha_scale``
            (:func:`~supsup_deploy.alpha_codes.quantize_alpha`); or (format 4) int4 codes
            packed two to a byte (:func:`~supsup_deploy.alpha_codes.pack_nibbles`, uint8), their
            rows per layer given by ``alpha_scale``'s shape
            (:func:`~supsup_deploy.alpha_codes.encode_alpha` gives both).
        norm_state: ``norm.running_mean`` / ``norm.running_var``; empty for statistic-free norms
            and for a task whose statistics come from the bundle's calibration pool.
        class_names: one per classifier output.
        kind: ``"basis"`` (a basis mask as a one-hot table) or ``"alpha"``.
        extra: more JSON metadata (e.g. training metrics).
        alpha_scale: with coded ``alpha``, one float16 scale per row (``[L]`` or ``[L, G]``).
        signature: float16 ``[2, SIGNATURE_SIZE]`` (:mod:`supsup_deploy.task_signatures`), or None.
    """

    index: int
    name: str
    alpha: torch.Tensor
    norm_state: dict[str, torch.Tensor]
    class_names: list[str] | tuple[str, ...]
    kind: str = "alpha"
    extra: dict[str, Any] | None = None
    alpha_scale: torch.Tensor | None = None
    signature: torch.Tensor | None = None


def save_bundle(
    out: str | Path,
    *,
    model_config: ModelConfig,
    basis_masks: list[list[torch.Tensor]],
    input_spec: InputSpec,
    tasks: Iterable[TaskData],
    encoding: str = "packed",
    extra: dict[str, Any] | None = None,
    replace: bool = False,
    pool: torch.Tensor | None = None,
) -> Path:
    """Write a new bundle folder: its basis file and one file per task.

    The bundle is assembled in a scratch folder beside ``out`` and renamed into place
    (:func:`~supsup_deploy.files.new_folder`), so ``out`` either does not exist or holds a
    complete bundle, even if the process is killed.

    Args:
        out: the bundle folder to create; it must not exist yet unless ``replace``.
        model_config: the architecture and backbone seed.
        basis_masks: ``|B|`` mask sets, one bool mask per masked layer each.
        input_spec: input preprocessing the tasks were trained with.
        tasks: the tasks to install, each written as it is taken (a generator may build them
            one at a time).
        encoding: how masks are stored: ``"packed"``, ``"rice"`` or ``"sparse"``.
        extra: more JSON metadata for the basis file (e.g. the training dataset's name).
        replace: replace an existing ``out`` once the new bundle is complete (the caller has
            checked it may go: :func:`supsup_deploy.outputs.check_output`).
        pool: a calibration pool for a BatchNorm model (see :func:`save_basis`), or None.

    Returns:
        ``out``, which :func:`~supsup_deploy.bundles.reader.load_bundle` opens.

    Example:
        >>> save_bundle("b", model_config=model.config, basis_masks=[masks_a, masks_b],
        ...             input_spec=spec, tasks=[TaskData(index=0, name="t0", alpha=table,
        ...             norm_state={}, class_names=["a", "b"])])
        >>> load_bundle("b").task("t0").class_names
        ('a', 'b')
    """
    out = Path(out)
    with new_folder(out, replace=replace) as staging:
        basis_sha256 = save_basis(
            staging / BASIS_FILE,
            model_config,
            basis_masks,
            input_spec,
            encoding=encoding,
            extra=extra,
            pool=pool,
        )
        for task in tasks:
            save_task(
                staging / TASKS_FOLDER / task_file_name(task.index, task.name),
                index=task.index,
                name=task.name,
                alpha=task.alpha,
                norm_state=task.norm_state,
                class_names=task.class_names,
                basis_sha256=basis_sha256,
                kind=task.kind,
                extra=task.extra,
                alpha_scale=task.alpha_scale,
                signature=task.signature,
            )
    return out


def save_basis(
    path: str | Path,
    model_config: ModelConfig,
    basis_masks: list[list[torch.Tensor]],
    input_spec: InputSpec,
    *,
    encoding: str = "packed",
    extra: dict[str, Any] | None = None,
    pool: torch.Tensor | None = None,
) -> str:
    """Write a basis file and return its SHA-256.

    Args:
        path: file to write (atomically).
        model_config: the architecture and backbone seed.
        basis_masks: ``|B|`` mask sets, one bool mask per masked layer each.
        input_spec: input preprocessing the tasks were trained with.
        encoding: how masks are stored: ``"packed"`` (1 bit per weight), ``"rice"`` or
            ``"sparse"`` (compressed; see :mod:`supsup_deploy.mask_compression`).
        extra: more JSON metadata (e.g. where the masks came from).
        pool: a calibration pool, uint8 images ``[N, channels, size, size]`` (``N`` up to
            :data:`~supsup_deploy.bundles.format.MAX_POOL_IMAGES`) of the basis tasks' training
            data, for a BatchNorm model: a task that stores no statistics gets them from these
            images under its own weights.

    Returns:
        The file's SHA-256, which every task file of the bundle records.

    Example:
        >>> save_basis("b/basis.safetensors", model.config, [masks_a, masks_b], spec)
    """
    summary = model_summary(model_config)
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
    if pool is not None:
        tensors[POOL_TENSOR] = _checked_pool(pool, model_config, input_spec)
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
        **({"pool_images": len(pool)} if pool is not None else {}),
        **({"extra": extra} if extra else {}),
    }
    save_sealed(path, tensors, metadata)
    return file_sha256(Path(path))


def _checked_pool(pool: torch.Tensor, config: ModelConfig, spec: InputSpec) -> torch.Tensor:
    shape = (spec.channels, spec.size, spec.size)
    if config.norm != "batch":
        raise ConfigError(f"a calibration pool needs norm 'batch', this model has {config.norm!r}")
    if pool.dtype != torch.uint8 or pool.dim() != 4 or tuple(pool.shape[1:]) != shape:
        raise ConfigError(
            f"the calibration pool must be uint8 [N, {', '.join(map(str, shape))}], got "
            f"{pool.dtype} {list(pool.shape)}"
        )
    if not 1 <= len(pool) <= MAX_POOL_IMAGES:
        raise ConfigError(
            f"a calibration pool holds 1 to {MAX_POOL_IMAGES} images, not {len(pool)}"
        )
    return pool.contiguous()


def signature_tensors(signature: torch.Tensor, version: int) -> dict[str, torch.Tensor]:
    """A task signature as a task file of this format version stores it: float16 in format 3,
    uint8 codes with a float16 step and minimum per row (:data:`SIGNATURE_SCALE_TENSOR`) from
    format 4. The codes span each row from its minimum to its maximum: the means of tasks seen
    through one reference network differ by little against their size, and codes from zero (as
    an int8 alpha row's) lost a GroupNorm split task in ``bench.accuracy``.

    Args:
        signature: ``[2, SIGNATURE_SIZE]`` (:func:`~supsup_deploy.task_signatures.task_signature`).
        version: the task file's format version (3 or later).

    Returns:
        Tensor name to stored tensor.
    """
    if version < 4:
        return {SIGNATURE_TENSOR: signature.half()}
    signature = signature.float()
    minimum = signature.amin(dim=1, keepdim=True).half()
    step = ((signature.amax(dim=1, keepdim=True) - minimum) / 255).half()
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((signature - minimum) / step).round().clamp(0, 255).to(torch.uint8)
    return {SIGNATURE_TENSOR: codes, SIGNATURE_SCALE_TENSOR: torch.cat([step, minimum], dim=1)}


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
    alpha_scale: torch.Tensor | None = None,
    signature: torch.Tensor | None = None,
    version: int = FORMAT_VERSION,
) -> None:
    """Write one task file (atomically), e.g. a task shipped on its own for ``supsup add-task``.

    Args:
        path: file to write; inside a bundle it is ``tasks/`` +
            :func:`~supsup_deploy.bundles.format.task_file_name`.
        index, name, alpha, norm_state, class_names, kind, extra, alpha_scale, signature: as
            :class:`TaskData`.
        basis_sha256: SHA-256 of the basis file this task belongs to.
        version: the format version of that basis (2, 3 or 4); an int8 table and a signature
            need 3, an int4 or grouped table 4.

    Example:
        >>> save_task("b/tasks/3.t3.safetensors", index=3, name="t3", alpha=table,
        ...           norm_state={}, class_names=["a", "b"], basis_sha256=digest)
    """
    check_task_name(name)
    if version not in WRITE_VERSIONS:
        raise ConfigError(f"task files are written in format 2, 3 or 4, not {version}")
    coded = alpha.dtype in (torch.int8, torch.uint8)
    if coded != (alpha_scale is not None):
        raise ConfigError("a coded alpha table needs its scales, and only a coded table has them")
    if version < 4 and alpha.dtype == torch.uint8:
        raise ConfigError("an int4 alpha table needs a format 4 bundle")
    if version < 3 and coded:
        raise ConfigError("an int8 alpha table needs a format 3 bundle")
    if version >= 4 and alpha.dtype != torch.uint8:
        alpha = as_grouped(alpha)
    elif alpha.dim() == 3:
        if alpha.shape[1] != 1:
            raise ConfigError("an alpha table with several rows per layer needs a format 4 bundle")
        alpha = alpha.squeeze(1)
    tensors = {"alpha": alpha, **norm_state}
    if alpha_scale is not None:
        # int4 codes are stored flat: their scales keep the rows ([L, G], [L] as G = 1)
        rows = (len(alpha_scale), -1) if alpha.dtype == torch.uint8 else alpha.shape[:-1]
        tensors["alpha.scale"] = alpha_scale.reshape(rows)
    if signature is not None:
        if version < 3:
            raise ConfigError("a task signature needs a format 3 bundle")
        tensors |= signature_tensors(signature, version)
    metadata = {
        "format": TASK_FORMAT,
        "format_version": version,
        "index": int(index),
        "name": name,
        "kind": kind,
        "class_names": list(class_names),
        "basis_sha256": basis_sha256,
        **({"extra": extra} if extra else {}),
    }
    save_sealed(path, tensors, metadata)
