"""Teaching a shipped bundle a new task: one alpha table over its basis masks, from your images.

:func:`learn_task` trains the table (and, for a BatchNorm bundle, the task's normalisation
statistics) on an image folder or on classes of a built-in dataset, keeping the epoch with the
best validation accuracy. Over a bundle with a calibration pool the task trains against the
pool's statistics and stores none: its file holds an int4 table with two rows per layer
(trained against its int4 form; int8 with one row in a format 3 bundle) and its metadata (under
1 KB).
:func:`install_learned_task` gives it the next free task id and links its file into the bundle
under the bundle's lock, as ``supsup add-task`` does; :meth:`LearnedTask.save` writes the file
only; :func:`teach` learns and installs for an opened bundle. Nothing in the bundle changes until
the install, so an interrupted or failed run leaves it as it was.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from supsup_deploy import data as datasets
from supsup_deploy.alpha_codes import (
    ALPHA_DTYPES,
    alpha_dtype_name,
    encode_alpha,
    served_alpha,
    trained_for,
)
from supsup_deploy.alpha_groups import check_groups
from supsup_deploy.bundles.format import (
    FORMAT_VERSION,
    TASKS_FOLDER,
    TaskInfo,
    check_task_name,
    float_dtype,
    task_file_name,
)
from supsup_deploy.bundles.reader import Bundle, load_bundle, single_task_config
from supsup_deploy.bundles.writer import save_task, signature_tensors
from supsup_deploy.devices import resolve_device
from supsup_deploy.errors import ConfigError
from supsup_deploy.image_folder import ImageFolderData, scan_image_folder
from supsup_deploy.locking import LOCK_TIMEOUT, folder_lock
from supsup_deploy.models import build_model
from supsup_deploy.normalization import norm_state
from supsup_deploy.pack import install_task_file
from supsup_deploy.task_signatures import (
    REFERENCE_TASK,
    SIGNATURE_IMAGES,
    TaskClasses,
    class_sets_tell_tasks_apart,
    has_reference_task,
    task_signature,
)
from supsup_deploy.train import Reporter, serve_table, train_task
from supsup_deploy.train_config import POOL_ALPHA_DTYPE, POOL_ALPHA_GROUPS, TaskRecipe
from supsup_deploy.weight_sources import alpha_table

STATISTICS = ("task", "pool")
"""Where a learned task's normalisation statistics come from: its own training images (stored in
its file) or the bundle's calibration pool (computed when the task is used, nothing stored)."""
LEARN_RECIPE = TaskRecipe(
    epochs=5, batch_size=64, lr=1e-3, alpha_lr=0.1, weight_decay=1e-4, density="0.5", seed=0
)
"""``supsup learn``'s defaults: the alpha settings ``supsup train`` uses for its alpha tasks."""


@dataclass(frozen=True, kw_only=True)
class LearnedTask:
    """A task learned over a bundle's basis, not yet written or installed.

    Attributes:
        name: the task's name.
        alpha: ``[num_layers, |B|]`` table, in the dtype it will be stored in (int8 codes with
            ``alpha_scale``).
        norm_state: normalisation statistics (empty for a statistic-free norm, or when they come
            from the bundle's calibration pool).
        class_names: one per class, in label order; the task uses the first
            ``len(class_names)`` classifier outputs.
        metrics: validation accuracy of the best epoch, test accuracy (None without a test
            split), sizes and timing.
        data: where the images came from and how they were split (seeded), as recorded.
        stored_metrics: the metrics the task file keeps.
        alpha_scale: with a coded ``alpha``, one float16 scale per row.
        signature: float16 ``[2, SIGNATURE_SIZE]`` when class names cannot tell the task apart
            (:mod:`supsup_deploy.task_signatures`), else None.
    """

    name: str
    alpha: torch.Tensor
    norm_state: dict[str, torch.Tensor]
    class_names: tuple[str, ...]
    metrics: dict[str, Any]
    data: dict[str, Any]
    stored_metrics: dict[str, Any]
    alpha_scale: torch.Tensor | None = None
    signature: torch.Tensor | None = None

    def save(self, path: str | Path, *, index: int, bundle: Bundle) -> Path:
        """Write the task file for ``bundle`` (atomically), e.g. to ship it or ``add-task`` it.

        Args:
            path: the file to write.
            index: the task id the file declares.
            bundle: the bundle whose basis the task was learned over.

        Returns:
            ``path``.
        """
        save_task(
            path,
            index=index,
            name=self.name,
            alpha=self.alpha,
            norm_state=self.norm_state,
            class_names=self.class_names,
            basis_sha256=bundle.basis_sha256,
            kind="alpha",
            extra={"metrics": self.stored_metrics},
            alpha_scale=self.alpha_scale,
            signature=self.signature,
            version=bundle.format_version,
        )
        return Path(path)


def check_learnable(bundle: Bundle, name: str, *, install: bool) -> None:
    """Refuse, before any training, what would make the result impossible to write.

    Args:
        bundle: the bundle to learn over.
        name: the new task's name.
        install: whether the task will be installed into the bundle (else only written).

    Raises:
        ConfigError: a bad or taken name, a format 1 bundle, or (to install) a bundle that is
            read-only.
    """
    check_task_name(name)
    if bundle.format_version < 2:
        raise ConfigError(
            f"{bundle.path} is a format {bundle.format_version} bundle: learn writes format 2 "
            f"and {FORMAT_VERSION} task files; pack the run again with this version"
        )
    taken = bundle.clashing_task(-1, name)
    if taken is not None:
        raise ConfigError(
            f"task name {name!r} is taken in {bundle.path} (task {taken.index}); choose another"
        )
    if install:
        folder = bundle.path / TASKS_FOLDER
        _check_writable(folder if folder.exists() else bundle.path)


def _check_writable(folder: Path) -> None:
    """Refuse a folder marked read-only (no write bit at all, which root is held to as well)."""
    mode = folder.stat().st_mode
    if not os.access(folder, os.W_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{folder} is read-only: the new task cannot be installed there")


def learn_task(
    bundle: Bundle,
    data: str | Path | None = None,
    *,
    name: str,
    dataset: str | None = None,
    classes: str | None = None,
    data_root: str | None = None,
    epochs: int = LEARN_RECIPE.epochs,
    batch_size: int = LEARN_RECIPE.batch_size,
    alpha_lr: float = LEARN_RECIPE.alpha_lr,
    weight_decay: float = LEARN_RECIPE.weight_decay,
    seed: int = LEARN_RECIPE.seed,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_train_samples: int | None = None,
    alpha_dtype: str | None = None,
    alpha_groups: int | None = None,
    norm_dtype: str | None = None,
    statistics: str | None = None,
    device: str = "cpu",
    num_workers: int | None = None,
    folder: ImageFolderData | None = None,
    reporter: Reporter | None = None,
) -> LearnedTask:
    """Train a new alpha task over a bundle's basis masks.

    Args:
        bundle: the bundle to learn over (not changed).
        data: an image folder, one subfolder per class (optionally under ``train/``, ``val/``,
            ``test/``); or None with ``dataset``.
        name: the new task's name.
        dataset: instead of ``data``, a built-in dataset (its training split, with validation
            carved from it, and its test split).
        classes: with ``dataset``: comma-separated class ids (``"1,3,5"``).
        data_root: with ``dataset``: the folder holding its files.
        epochs: passes over the training images; the best by validation accuracy is kept.
        batch_size: images per step.
        alpha_lr: Adam learning rate of the table (cosine schedule).
        weight_decay: Adam weight decay.
        seed: seeds the split of a folder without ``val/``/``test/``, the training subset and
            the batch order: the same images and seed give the same task file, byte for byte.
        val_fraction: share of each class held out for validation when the data has no split.
        test_fraction: share of each class held out for testing, for a folder without ``test/``.
        max_train_samples: cap on training images (a seeded subset), or None.
        alpha_dtype: ``"float32"``, ``"float16"``, ``"int8"`` (codes with one scale per row;
            format 3 bundles) or ``"int4"`` (format 4; the table is trained against its int4
            form); default int4 with ``statistics="pool"`` (int8 in format 3), else the dtype of
            the bundle's newest alpha task.
        alpha_groups: alpha rows per layer, each mixing the basis masks for its own contiguous
            group of output channels (:mod:`supsup_deploy.alpha_groups`; more than 1 needs
            format 4); default :data:`POOL_ALPHA_GROUPS` with ``statistics="pool"`` in a
            format 4 bundle, else 1.
        norm_dtype: ``"float32"`` or ``"float16"`` for stored statistics; default likewise.
        statistics: ``"pool"`` (train against the bundle's calibration pool, store no
            statistics; the default when the bundle has a pool) or ``"task"`` (the task's own
            training images, stored in its file).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        num_workers: processes decoding a folder's images (default: the folder loader's).
        folder: an already scanned ``data`` folder (the CLI scans it first, to refuse bad input
            before loading anything else).
        reporter: progress events.

    Returns:
        The learned task, to :meth:`~LearnedTask.save` or :func:`install_learned_task`.

    Raises:
        ConfigError: bad settings, or more classes than the bundle has outputs.
        FormatError: an image or dataset file that cannot be read (named).
    """
    check_learnable(bundle, name, install=False)
    recipe = _recipe(epochs, batch_size, alpha_lr, weight_decay, seed)
    statistics = _statistics(bundle, statistics)
    alpha_dtype = _alpha_dtype(bundle, alpha_dtype, statistics)
    alpha_groups = _alpha_groups(bundle, alpha_groups, statistics)
    norm_stored = float_dtype(norm_dtype or _stored_dtype(bundle, "norm.running_mean", "float32"))
    if (data is None) == (dataset is None):
        raise ConfigError("give the images: an image folder (--data) or --dataset with --classes")
    if data is not None:
        folder = folder or scan_image_folder(
            data,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=recipe.seed,
        )
        splits, record = _folder_splits(
            bundle, folder, name, recipe, max_train_samples, num_workers
        )
    else:
        splits, record = _dataset_splits(
            bundle, dataset, classes, name, data_root, recipe, val_fraction, max_train_samples
        )
    device = resolve_device(device)
    model = build_model(single_task_config(bundle.config)).to(device)
    pool = None
    if statistics == "pool":
        pool = datasets.preprocess_images(bundle.pool, bundle.input)
    metrics = train_task(
        model,
        recipe,
        splits,
        index=0,
        kind="alpha",
        basis=bundle.basis_masks(),
        device=device,
        slot=0,
        outputs=len(record["class_names"]),
        reporter=reporter,
        pool=pool,
        alpha_groups=alpha_groups,
        trained_for=trained_for(alpha_dtype),
    )
    table = alpha_table(model).float().cpu()
    alpha, alpha_scale = encode_alpha(table, alpha_dtype)
    if alpha_scale is not None:
        serve_table(model, served_alpha(table, alpha_dtype), splits, recipe, pool, metrics)
    test_accuracy = metrics["test_accuracy"]
    metrics["test_accuracy"] = None if math.isnan(test_accuracy) else test_accuracy
    norms = {}
    if statistics == "task":
        norms = {key: value.cpu().to(norm_stored) for key, value in norm_state(model, 0).items()}
    stored_metrics = {"test_accuracy": metrics["test_accuracy"]}
    if record.get("dataset") is not None and record["dataset"] == bundle.dataset:
        stored_metrics["classes"] = record["classes"]
    signature = _signature(bundle, record["class_names"], splits, device)
    stored = [alpha, *norms.values()]
    stored += [] if alpha_scale is None else [alpha_scale]
    if signature is not None:
        stored += signature_tensors(signature, bundle.format_version).values()
    metrics["state_bytes"] = sum(t.numel() * t.element_size() for t in stored)
    metrics["name"] = name
    metrics["statistics"] = statistics
    metrics["alpha_dtype"], metrics["alpha_groups"] = alpha_dtype, alpha_groups
    return LearnedTask(
        name=name,
        alpha=alpha,
        norm_state=norms,
        class_names=tuple(record["class_names"]),
        metrics=metrics,
        data=record,
        stored_metrics=stored_metrics,
        alpha_scale=alpha_scale,
        signature=signature,
    )


def _signature(
    bundle: Bundle, class_names: list[str], splits: datasets.TaskSplits, device: str
) -> torch.Tensor | None:
    """The new task's signature, when its class names would not tell it apart from the
    installed tasks and the bundle can hold one (format 3, basis task ``REFERENCE_TASK``)."""
    tasks = [*bundle.tasks, TaskClasses(kind="alpha", class_names=class_names)]
    if bundle.format_version < 3 or class_sets_tell_tasks_apart(tasks):
        return None
    if not has_reference_task(bundle.tasks):
        return None
    images = datasets.first_images(splits.train, SIGNATURE_IMAGES)
    return task_signature(bundle.model(REFERENCE_TASK, device=device), images)


def _statistics(bundle: Bundle, statistics: str | None) -> str:
    """Where the task's statistics come from: the pool by default when the bundle has one."""
    if bundle.config.norm != "batch":
        return "task"
    statistics = statistics or ("pool" if bundle.pool is not None else "task")
    if statistics not in STATISTICS:
        raise ConfigError(f"unknown statistics {statistics!r}: use task or pool")
    if statistics == "pool" and bundle.pool is None:
        raise ConfigError(
            f"{bundle.path} has no calibration pool: pack the run with --pool, or use "
            "--statistics task"
        )
    return statistics


def _alpha_dtype(bundle: Bundle, alpha_dtype: str | None, statistics: str) -> str:
    """The stored alpha dtype: as asked, else for a task whose statistics come from the pool
    ``POOL_ALPHA_DTYPE`` (int4 in format 4; trained for it) or int8 (format 3), so its file stays
    under 1 KB, else the newest alpha task's, else float32."""
    if alpha_dtype is None and statistics == "pool":
        alpha_dtype = POOL_ALPHA_DTYPE if bundle.format_version >= 4 else "int8"
    alpha_dtype = alpha_dtype or _stored_dtype(bundle, "alpha", "float32")
    if alpha_dtype not in ALPHA_DTYPES:
        raise ConfigError(f"unknown alpha dtype {alpha_dtype!r}: use {', '.join(ALPHA_DTYPES)}")
    needs = {"int8": 3, "int4": 4}.get(alpha_dtype, 2)
    if bundle.format_version < needs:
        raise ConfigError(
            f"{bundle.path} is a format {bundle.format_version} bundle: {alpha_dtype} alpha "
            f"tables need format {needs} (pack the run again)"
        )
    return alpha_dtype


def _alpha_groups(bundle: Bundle, alpha_groups: int | None, statistics: str) -> int:
    """Alpha rows per layer: as asked, else ``POOL_ALPHA_GROUPS`` for a task whose statistics
    come from the pool in a format 4 bundle, else 1."""
    if alpha_groups is None:
        pooled = statistics == "pool" and bundle.format_version >= 4
        alpha_groups = POOL_ALPHA_GROUPS if pooled else 1
    if alpha_groups != 1 and bundle.format_version < 4:
        raise ConfigError(
            f"{bundle.path} is a format {bundle.format_version} bundle: several alpha rows per "
            "layer need format 4 (pack the run again)"
        )
    check_groups(alpha_groups, bundle.summary.weight_shapes)
    return alpha_groups


def _recipe(
    epochs: int, batch_size: int, alpha_lr: float, weight_decay: float, seed: int
) -> TaskRecipe:
    checks = [
        (epochs >= 1, f"--epochs must be at least 1, got {epochs}"),
        (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
        (alpha_lr > 0, f"--alpha-lr must be positive, got {alpha_lr}"),
        (weight_decay >= 0, f"--weight-decay must not be negative, got {weight_decay}"),
        (seed >= 0, f"--seed must not be negative, got {seed}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return dataclasses.replace(
        LEARN_RECIPE,
        epochs=epochs,
        batch_size=batch_size,
        alpha_lr=alpha_lr,
        weight_decay=weight_decay,
        seed=seed,
    )


def _stored_dtype(bundle: Bundle, tensor: str, fallback: str) -> str:
    """The dtype the bundle's newest alpha task stores ``tensor`` in (``fallback`` if none does)."""
    for entry in reversed(bundle.task_entries):
        info = bundle.task(entry.index)
        tensors = bundle.stored_tensors(entry.index)
        if tensor in tensors and (tensor != "alpha" or info.kind == "alpha"):
            return alpha_dtype_name(tensors[tensor])
    return fallback


def _check_class_count(bundle: Bundle, count: int, source: str) -> None:
    outputs = bundle.config.num_classes
    if count > outputs:
        raise ConfigError(
            f"{source} has {count} classes but the bundle's tasks have {outputs} outputs: use "
            f"at most {outputs} classes"
        )


def _folder_splits(
    bundle: Bundle,
    folder: ImageFolderData,
    name: str,
    recipe: TaskRecipe,
    max_train_samples: int | None,
    num_workers: int | None,
) -> tuple[datasets.TaskSplits, dict[str, Any]]:
    """A scanned folder's splits, decoded to the bundle's input spec as they are read."""
    _check_class_count(bundle, len(folder.class_names), str(folder.root))
    spec = bundle.input
    task = datasets.TaskSpec(0, tuple(range(len(folder.class_names))), name)
    splits = folder.task_splits(
        task,
        channels=spec.channels,
        size=spec.size,
        mean=spec.mean,
        std=spec.std,
        max_train_samples=max_train_samples,
        seed=recipe.seed,
        num_workers=num_workers,
    )
    record = {"source": "folder", **folder.record()}
    return splits, record


def _dataset_splits(
    bundle: Bundle,
    dataset: str,
    classes: str | None,
    name: str,
    data_root: str | None,
    recipe: TaskRecipe,
    val_fraction: float,
    max_train_samples: int | None,
) -> tuple[datasets.TaskSplits, dict[str, Any]]:
    """Classes of a built-in dataset as one task, normalised as the bundle's inputs are."""
    spec = datasets.get_dataset_spec(dataset)
    wanted = datasets.parse_classes(classes, spec)
    _check_class_count(bundle, len(wanted), f"--classes {classes}")
    shape = (spec.in_channels, spec.image_size)
    if shape != (bundle.input.channels, bundle.input.size):
        raise ConfigError(
            f"{spec.name} images are {spec.in_channels}x{spec.image_size}x{spec.image_size} but "
            f"the bundle takes {bundle.input.channels}x{bundle.input.size}x{bundle.input.size}: "
            "write them as an image folder (--data), which converts them"
        )
    train, test = (
        datasets.load_dataset(dataset, split=split, data_root=data_root)
        for split in ("train", "test")
    )
    as_bundle = dataclasses.replace(train.spec, mean=bundle.input.mean, std=bundle.input.std)
    task = datasets.TaskSpec(0, wanted, name, seed=recipe.seed)
    splits = datasets.task_splits(
        dataclasses.replace(train, spec=as_bundle),
        dataclasses.replace(test, spec=as_bundle),
        task,
        val_fraction=val_fraction,
        max_train_samples=max_train_samples,
        seed=recipe.seed,
    )
    record = {
        "source": "dataset",
        "dataset": train.spec.name,
        "classes": list(wanted),
        "class_names": list(task.class_names(train.spec)),
        "seed": recipe.seed,
        "val_fraction": val_fraction,
    }
    return splits, record


def next_task_id(bundle: Bundle) -> int:
    """The id a new task gets: one more than the largest installed id (0 in an empty bundle)."""
    return max((entry.index for entry in bundle.task_entries), default=-1) + 1


def install_learned_task(
    bundle_path: str | Path, learned: LearnedTask, *, lock_timeout: float = LOCK_TIMEOUT
) -> TaskInfo:
    """Install a learned task into its bundle under the next free task id.

    Holds the bundle's lock from choosing the id to linking the file in, so concurrent
    ``learn`` and ``add-task`` runs take turns (:func:`~supsup_deploy.pack.install_task_file`).

    Args:
        bundle_path: the bundle folder the task was learned over.
        learned: the task.
        lock_timeout: seconds to wait while another process changes the bundle.

    Returns:
        The installed task, read back from the bundle.

    Raises:
        ConfigError: the name was taken meanwhile, or the bundle is read-only.
        LockError: another process held the bundle's lock for ``lock_timeout`` seconds.
    """
    bundle_path = Path(bundle_path)
    with folder_lock(bundle_path, timeout=lock_timeout):
        bundle = load_bundle(bundle_path)
        check_learnable(bundle, learned.name, install=True)
        index = next_task_id(bundle)
        with tempfile.TemporaryDirectory(prefix="supsup-learn-") as scratch:
            file = learned.save(
                Path(scratch) / task_file_name(index, learned.name), index=index, bundle=bundle
            )
            install_task_file(bundle, file, file.read_bytes())
    return load_bundle(bundle_path).task(index)


def teach(
    bundle: Bundle, data: str | Path | None = None, *, name: str, **settings: Any
) -> TaskInfo:
    """Teach an opened bundle a new task from your images and install it (``supsup learn``).

    Args:
        bundle: the opened bundle; it lists the new task afterwards.
        data: an image folder, one subfolder per class (optionally under ``train/``, ``val/``,
            ``test/``).
        name: the new task's name.
        settings: :func:`learn_task`'s keyword arguments (``epochs``, ``seed``, ``device``,
            ``dataset`` and ``classes`` instead of ``data``, ...).

    Returns:
        The installed task (the next free id).

    Example:
        >>> task = teach(bundle, "my_photos", name="shoes", epochs=3)
        >>> predict(bundle, ["my_photos/test"], task=task.name)
    """
    learned = learn_task(bundle, data, name=name, **settings)
    index = install_learned_task(bundle.path, learned).index
    bundle.refresh_tasks()
    return bundle.task(index)
