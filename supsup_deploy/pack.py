"""Turning a training run into a bundle, and installing shipped task files into one."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from supsup_deploy.alpha_codes import ALPHA_DTYPES, encode_alpha
from supsup_deploy.bundles.format import (
    BUNDLE,
    TASKS_FOLDER,
    InputSpec,
    check_task_name,
    float_dtype,
    task_file_name,
)
from supsup_deploy.bundles.reader import Bundle, load_bundle
from supsup_deploy.bundles.validation import check_bundle_folder
from supsup_deploy.bundles.writer import TaskData, save_bundle
from supsup_deploy.data import first_images
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.files import atomic_write_bytes, remove_scratch_files
from supsup_deploy.locking import LOCK_TIMEOUT, folder_lock
from supsup_deploy.models import ModelConfig, build_model
from supsup_deploy.outputs import check_output
from supsup_deploy.runs import (
    load_task,
    read_run_record,
    read_task_file,
    read_task_masks,
    task_path,
)
from supsup_deploy.task_signatures import (
    REFERENCE_TASK,
    SIGNATURE_IMAGES,
    class_sets_tell_tasks_apart,
    task_signature,
)
from supsup_deploy.train import RunData, calibration_pool
from supsup_deploy.train_config import TrainConfig, check_pool

PACKED_METRICS = ("test_accuracy", "classes")
"""The training metrics a packed task file keeps (the run folder keeps them all)."""


def pack_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    norm_dtype: str = "float32",
    alpha_dtype: str | None = None,
    mask_encoding: str = "packed",
    pool: int | None = None,
    force: bool = False,
) -> Bundle:
    """Pack a training run's finished tasks into a new bundle folder.

    The bundle is written by :func:`~supsup_deploy.bundles.writer.save_bundle`: assembled in a
    temporary folder beside ``out`` (named ``.<out>.*.tmp``) and renamed into place, so ``out``
    either does not exist or holds a complete bundle, even if the process is killed; the folder
    gets the usual permissions (the umask's), not the temporary's.

    Args:
        run_dir: a run directory written by ``supsup train`` (all basis tasks finished).
        out: the bundle folder to create; it must not exist yet, unless ``force`` (see
            :func:`supsup_deploy.outputs.check_output`).
        norm_dtype: ``"float32"`` or ``"float16"`` for the per-task normalisation statistics.
        alpha_dtype: ``"float32"``, ``"float16"``, ``"int8"`` or ``"int4"`` (codes with one
            scale per row) for the alpha tables of the alpha tasks (basis tasks' one-hot tables
            are exact in any and keep float32); default the run's ``alpha_dtype``, which its
            tables were trained for (int4 for a run trained with a pool, unless told).
        mask_encoding: ``"packed"``, ``"rice"`` or ``"sparse"`` for the basis masks.
        pool: store a calibration pool of this many training images of each basis task (the
            first ones of its training split, in stored order; the run's data must be at hand),
            so that tasks learned later can store no statistics; 0 for none. BatchNorm only.
            Default: the run's own pool (``supsup train --pool``), whose alpha tasks were
            trained against it and store no statistics; a run with a pool takes no other.
        force: replace an existing bundle at ``out`` once the new one is complete.

    Returns:
        The loaded, validated bundle.

    Example:
        >>> bundle = pack_run("artifacts/run", "artifacts/bundle")
    """
    run_dir, out = Path(run_dir), Path(out)
    record = read_run_record(run_dir)
    check_output(out, BUNDLE, force=force)
    config = TrainConfig.from_record(record["config"])
    if pool is None:
        pool = config.pool
    elif config.pool and pool != config.pool:
        raise ConfigError(
            f"{run_dir} trained its alpha tasks against a pool of {config.pool} images per basis "
            f"task: pack it with that pool (leave out --pool), not {pool}"
        )
    alpha_dtype = alpha_dtype or config.alpha_dtype
    if alpha_dtype not in ALPHA_DTYPES:
        raise ConfigError(f"unknown alpha dtype {alpha_dtype!r}: {', '.join(ALPHA_DTYPES)}")
    norm_stored = float_dtype(norm_dtype)
    model_config = ModelConfig.from_dict(record["model"])
    with torch.device("meta"):
        model = build_model(model_config)
    basis = [_basis_masks(run_dir, index, model) for index in range(config.basis)]
    dataset = record["dataset"]
    input_spec = InputSpec(
        size=int(dataset["image_size"]),
        channels=int(dataset["in_channels"]),
        mean=tuple(dataset["mean"]),
        std=tuple(dataset["std"]),
    )
    tasks = [
        _task_data(run_dir, index, config, norm_stored, alpha_dtype)
        for index in range(config.num_tasks)
        if task_path(run_dir, index).exists()
    ]
    signing = not class_sets_tell_tasks_apart(tasks)
    if pool:
        check_pool(config.norm, config.basis, pool)
    run_data = RunData.load(config) if pool or signing else None
    pool_images = calibration_pool(run_data, config.basis, pool) if pool else None
    if signing:
        tasks = _signed(run_dir, run_data, model_config, tasks)
    save_bundle(
        out,
        model_config=model_config,
        basis_masks=basis,
        input_spec=input_spec,
        tasks=tasks,
        encoding=mask_encoding,
        extra={"dataset": dataset["name"], "tasks": record["tasks"], "seeds": record["seeds"]},
        replace=force,
        pool=pool_images,
    )
    return load_bundle(out)


def _signed(
    run_dir: Path, run_data: RunData, model_config: ModelConfig, tasks: list[TaskData]
) -> list[TaskData]:
    """The tasks with their signatures, measured on the run's training images (its data must be
    at hand) with basis task ``REFERENCE_TASK`` as the reference network."""
    model = build_model(model_config)
    basis_tasks = range(run_data.config.basis)
    basis = [read_task_masks(task_path(run_dir, index), model) for index in basis_tasks]
    load_task(model, run_dir, REFERENCE_TASK, basis)
    model.eval()
    signed = []
    for task in tasks:
        images = first_images(run_data.splits(task.index).train, SIGNATURE_IMAGES)
        signed.append(dataclasses.replace(task, signature=task_signature(model, images)))
    return signed


def _basis_masks(run_dir: Path, index: int, model) -> list[torch.Tensor]:
    path = task_path(run_dir, index)
    if not path.exists():
        raise FormatError(f"{path}: basis task {index} has not finished training; resume the run")
    return read_task_masks(path, model)


def _task_data(
    run_dir: Path,
    index: int,
    config: TrainConfig,
    norm_dtype: torch.dtype,
    alpha_dtype: str,
) -> TaskData:
    """A finished task of the run as a bundle task: a basis task's mask as a one-hot table."""
    tensors, metadata = read_task_file(task_path(run_dir, index))
    metrics = metadata["metrics"]
    kind = metadata["kind"]
    alpha_scale = None
    if kind == "basis":
        layers = sum(key.startswith("mask.") for key in tensors)
        alpha = torch.zeros(layers, config.basis)
        alpha[:, index] = 1.0
    else:
        alpha, alpha_scale = encode_alpha(tensors["alpha"], alpha_dtype)
    norm_state = {
        key: value.to(norm_dtype) for key, value in tensors.items() if key.startswith("norm.")
    }
    return TaskData(
        index=index,
        name=str(metrics["name"]),
        alpha=alpha,
        norm_state=norm_state,
        class_names=metrics["class_names"],
        kind=kind,
        extra={"metrics": {key: metrics[key] for key in PACKED_METRICS if key in metrics}},
        alpha_scale=alpha_scale,
    )


def add_task(
    bundle_path: str | Path, task_file: str | Path, *, lock_timeout: float = LOCK_TIMEOUT
) -> Bundle:
    """Install a shipped task file into a bundle: validated, never overwriting, atomic.

    Holds the bundle's lock (:func:`~supsup_deploy.locking.folder_lock`) from listing the
    installed tasks to linking the new file in, so two processes adding tasks at once take turns
    and never install two tasks with the same id or name. Under the lock it first removes the
    scratch files (``tasks/.*.tmp``) that killed add-task processes left.

    Args:
        bundle_path: the bundle folder.
        task_file: a task file made for this bundle's basis.
        lock_timeout: seconds to wait while another process is adding a task.

    Returns:
        The reloaded bundle.

    Raises:
        FormatError: not a bundle, or the file is corrupt or made for another basis.
        ConfigError: a task with the same id or name is already installed.
        LockError: another process held the bundle's lock for ``lock_timeout`` seconds.
    """
    bundle_path, task_file = Path(bundle_path), Path(task_file)
    check_bundle_folder(bundle_path)
    try:
        data = task_file.read_bytes()
    except OSError as error:
        raise FormatError(f"{task_file}: cannot read ({error.strerror})") from None
    with folder_lock(bundle_path, timeout=lock_timeout):
        bundle = load_bundle(bundle_path)
        install_task_file(bundle, task_file, data)
        return load_bundle(bundle_path)


def install_task_file(bundle: Bundle, task_file: Path, data: bytes) -> None:
    """Check a task file's bytes against a bundle and link them in under the task's name.

    The caller holds the bundle's lock (:func:`~supsup_deploy.locking.folder_lock`).

    Args:
        bundle: the bundle as loaded under its lock.
        task_file: where ``data`` came from (named in errors).
        data: the task file's bytes.
    """
    folder = bundle.path / TASKS_FOLDER
    folder.mkdir(exist_ok=True)
    remove_scratch_files(folder)
    staged = folder / f".incoming-{os.getpid()}.safetensors.tmp"
    atomic_write_bytes(staged, data)
    try:
        try:
            info = bundle.check_task_file(staged)
        except FormatError as error:
            raise FormatError(str(error).replace(str(staged), str(task_file))) from None
        try:
            check_task_name(info.name)
        except ConfigError as error:
            raise ConfigError(f"{task_file}: {error}") from None
        installed = bundle.clashing_task(info.index, info.name)
        if installed is not None:
            raise ConfigError(
                f"{task_file}: task {info.index} ({info.name}) clashes with installed task "
                f"{installed.index} ({installed.name}) in {bundle.path}"
            )
        final = folder / task_file_name(info.index, info.name, version=bundle.format_version)
        try:
            os.link(staged, final)
        except FileExistsError:
            raise ConfigError(f"{final} already exists") from None
    finally:
        staged.unlink(missing_ok=True)
