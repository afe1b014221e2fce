"""A run's settings (:class:`TrainConfig`) and how each task is trained (:class:`TaskRecipe`).

They are the run format's record of a run (``run.json``'s ``config``, read by
:mod:`supsup_deploy.runs`) and the training loop's input (:mod:`supsup_deploy.train`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from supsup_deploy import data as datasets
from supsup_deploy.alpha_codes import ALPHA_DTYPES
from supsup_deploy.binary_masks import check_num_basis, resolve_densities
from supsup_deploy.bundles.format import MAX_POOL_IMAGES
from supsup_deploy.errors import ConfigError
from supsup_deploy.models import ModelConfig, get_model_entry


@dataclass(frozen=True, kw_only=True)
class TaskRecipe:
    """How one task is trained: a run's settings for each task, or ``supsup learn``'s.

    Attributes:
        epochs: passes over the task's training images; the epoch with the best validation
            accuracy is kept.
        batch_size: images per step.
        lr: Adam learning rate of a basis task's mask scores.
        alpha_lr: Adam learning rate of an alpha task's table.
        weight_decay: Adam weight decay.
        density: fraction of weights a basis mask keeps, or ``er:SCALE``.
        seed: seeds the scores' initialisation and the batch order, with the task's index.
    """

    epochs: int
    batch_size: int
    lr: float
    alpha_lr: float
    weight_decay: float
    density: str
    seed: int


DEFAULT_POOL = 32
"""Calibration pool images per basis task of a BatchNorm run with alpha tasks, unless told."""

POOL_ALPHA_GROUPS = 2
"""Alpha rows per layer of a task trained against a calibration pool, unless told: with int4
codes (:data:`POOL_ALPHA_DTYPE`) its file stays under 1 KB at 15 basis masks
(``bench.alpha_variants``' ``pool_groups_2_epochs_6_int4_rows_qat``, ``bench.learn_pool``)."""

POOL_ALPHA_DTYPE = "int4"
"""How a task trained against a calibration pool stores its table, unless told."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run's result (the device does not, on a given machine).

    ``pool`` left as ``None`` becomes :func:`default_pool`'s: a BatchNorm run with alpha tasks
    trains them against a calibration pool (task files under 1 KB, no statistics), any other run
    gets none (0). ``alpha_groups`` (rows per layer of an alpha table,
    :mod:`supsup_deploy.alpha_groups`) and ``alpha_dtype`` (how ``supsup pack`` stores the
    tables; an int4 table is trained against its int4 form) left as ``None`` become
    :data:`POOL_ALPHA_GROUPS` and :data:`POOL_ALPHA_DTYPE` with a pool, else 1 and float32.
    Read a recorded run with :meth:`from_record`.
    """

    dataset: str = "fashion-mnist"
    data_root: str | None = None
    arch: str = "gem_resnet18"
    width: float = 1.0
    protocol: str = "split"
    classes_per_task: int = 2
    num_tasks: int = 5
    basis: int = 3
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    alpha_lr: float = 0.1
    weight_decay: float = 1e-4
    density: str = "0.5"
    norm: str = "batch"
    seed: int = 0
    val_fraction: float = 0.1
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    classes: str | None = None
    data: str | None = None
    image_size: int | None = None
    test_fraction: float = 0.1
    pool: int | None = None
    alpha_groups: int | None = None
    alpha_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.pool is None:
            object.__setattr__(self, "pool", default_pool(self.norm, self.basis, self.num_tasks))
        if self.alpha_groups is None:
            object.__setattr__(self, "alpha_groups", POOL_ALPHA_GROUPS if self.pool else 1)
        if self.alpha_dtype is None:
            object.__setattr__(self, "alpha_dtype", POOL_ALPHA_DTYPE if self.pool else "float32")
        checks = [
            (self.num_tasks >= 1, f"--num-tasks must be at least 1, got {self.num_tasks}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0 and self.alpha_lr > 0, "learning rates must be positive"),
            (self.weight_decay >= 0, "--weight-decay must not be negative"),
            (self.seed >= 0, f"--seed must not be negative, got {self.seed}"),
            (self.pool >= 0, f"--pool must not be negative, got {self.pool}"),
            (
                self.alpha_groups >= 1,
                f"--alpha-groups must be at least 1, got {self.alpha_groups}",
            ),
            (
                self.alpha_dtype in ALPHA_DTYPES,
                f"--alpha-dtype must be one of {', '.join(ALPHA_DTYPES)}, got {self.alpha_dtype!r}",
            ),
            (
                1 <= self.basis <= self.num_tasks,
                f"--basis must be in 1..--num-tasks ({self.num_tasks}), got {self.basis}",
            ),
            (
                self.image_size is None or self.data is not None,
                "--image-size sets the input size of an image folder: give --data FOLDER too",
            ),
            (
                self.image_size is None or 8 <= self.image_size <= 1024,
                f"--image-size must be in 8..1024, got {self.image_size}",
            ),
            (
                0.0 <= self.test_fraction < 1.0,
                f"--test-fraction must be in [0, 1), got {self.test_fraction}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.pool:
            check_pool(self.norm, self.basis, self.pool)
        if self.basis < self.num_tasks:
            check_num_basis(self.basis)
        resolve_densities([(1, 1)], self.density)
        get_model_entry(self.arch)

    @classmethod
    def from_record(cls, settings: dict[str, Any]) -> TrainConfig:
        """The settings ``run.json`` records.

        A record without ``pool`` predates pools (none); one without ``alpha_groups`` and
        ``alpha_dtype`` predates them: one row per layer, stored as int8 with a pool (trained as
        float, like any int8 table) and float32 without.

        Args:
            settings: ``run.json``'s ``config``; keys this version does not know are ignored.

        Returns:
            The run's settings.

        Example:
            >>> config = TrainConfig.from_record(read_run_record("artifacts/run")["config"])
        """
        names = {field.name for field in dataclasses.fields(cls)}
        known = {"pool": 0, **{name: settings[name] for name in names & settings.keys()}}
        if "alpha_groups" not in known:
            known["alpha_groups"] = 1
        if "alpha_dtype" not in known:
            known["alpha_dtype"] = "int8" if known["pool"] else "float32"
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        """The settings as ``run.json`` records them (``pool`` only when there is one, so a run
        without a pool records what it did before pools existed)."""
        settings = dataclasses.asdict(self)
        if not self.pool:
            del settings["pool"]
        return settings

    @property
    def recipe(self) -> TaskRecipe:
        """How each task of the run is trained."""
        return TaskRecipe(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            alpha_lr=self.alpha_lr,
            weight_decay=self.weight_decay,
            density=self.density,
            seed=self.seed,
        )

    def model_config(self, spec: datasets.DatasetSpec) -> ModelConfig:
        """The architecture this run trains: one classifier output per class of a task."""
        entry = get_model_entry(self.arch)
        return entry.config(
            num_classes=self.classes_per_task,
            in_channels=spec.in_channels,
            stem=entry.family.stem_for_image_size(spec.image_size),
            width=self.width,
            seed=self.seed,
            norm=self.norm,
            num_tasks=self.num_tasks,
        )


def default_pool(norm: str, basis: int, num_tasks: int) -> int:
    """Pool images per basis task a run gets unless told: :data:`DEFAULT_POOL` (fewer where the
    bundle's pool limit needs it) for a BatchNorm run with alpha tasks, else 0.

    Args:
        norm: the run's norm.
        basis: basis tasks, each giving the pool its images.
        num_tasks: tasks in the run; those after the basis are alpha tasks.

    Returns:
        Images per basis task; 0 for no pool.
    """
    if norm != "batch" or basis >= num_tasks or basis < 1:
        return 0
    return min(DEFAULT_POOL, MAX_POOL_IMAGES // basis)


def check_pool(norm: str, basis: int, per_task: int) -> None:
    """Refuse a calibration pool a bundle cannot hold.

    Args:
        norm: the run's norm (a pool serves BatchNorm statistics only).
        basis: the number of basis tasks, each giving ``per_task`` images.
        per_task: pool images per basis task.

    Raises:
        ConfigError: not BatchNorm, or a pool outside 1 .. ``MAX_POOL_IMAGES`` images.
    """
    if norm != "batch":
        raise ConfigError(f"--pool needs BatchNorm (--norm batch); this run uses norm {norm!r}")
    if not 1 <= per_task * basis <= MAX_POOL_IMAGES:
        raise ConfigError(
            f"--pool {per_task} with {basis} basis tasks: the pool holds 1 to "
            f"{MAX_POOL_IMAGES} images, so use 1 to {MAX_POOL_IMAGES // basis} per task"
        )
