"""Training runs: SupSup basis masks, then every later task as an alpha table over them.

The run directory it writes (``run.json``, one file per finished task, metrics) is described and
read by :mod:`supsup_deploy.runs`.

Every random choice of task ``i`` derives from ``(seed, purpose, i)`` (:func:`derive_seed`), so a
task's result does not depend on which process trains it or on what ran before it. ``--resume``
skips finished tasks and retrains an interrupted one from its start, giving the same result as an
uninterrupted run. Under ``torchrun`` the ``"tasks"`` mode spreads whole tasks over ranks and the
``"data"`` mode trains each task with DistributedDataParallel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from supsup_deploy import data as datasets
from supsup_deploy.alpha_codes import FakeQuantized, served_alpha, trained_for
from supsup_deploy.alpha_groups import check_groups
from supsup_deploy.bundles.format import POOL_BATCH
from supsup_deploy.devices import resolve_device
from supsup_deploy.errors import ConfigError
from supsup_deploy.files import save_safetensors_atomic
from supsup_deploy.image_folder import (
    ImageFolderData,
    compute_mean_std,
    folder_dataset_spec,
    scan_image_folder,
)
from supsup_deploy.models import build_model, masked_layers
from supsup_deploy.normalization import (
    average_batch_statistics,
    reference_batch,
    set_task,
    task_norms,
)
from supsup_deploy.outputs import check_output
from supsup_deploy.runs import (
    RUN,
    collect_metrics,
    derive_seed,
    prepare_run_dir,
    read_task_masks,
    run_record,
    task_path,
    task_state,
    write_metrics,
)
from supsup_deploy.train_config import TaskRecipe, TrainConfig
from supsup_deploy.weight_sources import alpha_table, load_alpha_table, use_alpha, use_scores

DISTRIBUTED_MODES = ("tasks", "data")
NORM_REFRESH_IMAGES = 2048
REFERENCE_IMAGES = 64
"""Pool images that set the normalisation statistics of each step when training against a pool."""


@dataclass(frozen=True)
class RunData:
    """A run's data and task sequence, and each task's splits, as its config defines them.

    A built-in dataset is held in memory (``train`` and ``test``); an image folder (``--data``)
    is listed (``folder``) and its images are decoded batch by batch while training.
    """

    config: TrainConfig
    spec: datasets.DatasetSpec
    tasks: list[datasets.TaskSpec]
    train: datasets.Dataset | None = None
    test: datasets.Dataset | None = None
    folder: ImageFolderData | None = None

    @classmethod
    def load(cls, config: TrainConfig) -> RunData:
        """Load the config's data (both splits of a dataset, or an image folder's listing and
        statistics) and build its task sequence."""
        if config.data is not None:
            return cls._load_folder(config)
        train = datasets.load_dataset(config.dataset, split="train", data_root=config.data_root)
        test = datasets.load_dataset(config.dataset, split="test", data_root=config.data_root)
        tasks = cls._tasks(config, train.spec)
        return cls(config, train.spec, tasks, train=train, test=test)

    @classmethod
    def _load_folder(cls, config: TrainConfig) -> RunData:
        folder = scan_image_folder(
            config.data,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
        )
        size = config.image_size or folder.image_size
        draft = folder_dataset_spec(folder, size=size, mean=(0.0,), std=(1.0,))
        tasks = cls._tasks(config, draft)
        used = {c for task in tasks for c in task.classes}
        samples = [sample for sample in folder.splits["train"] if sample.label in used]
        mean, std = compute_mean_std(samples, channels=folder.channels, size=size, seed=config.seed)
        spec = folder_dataset_spec(folder, size=size, mean=mean, std=std)
        return cls(config, spec, tasks, folder=folder)

    @staticmethod
    def _tasks(config: TrainConfig, spec: datasets.DatasetSpec) -> list[datasets.TaskSpec]:
        classes = datasets.parse_classes(config.classes, spec)
        tasks = datasets.make_tasks(
            protocol=config.protocol,
            num_classes=len(classes),
            classes_per_task=config.classes_per_task,
            num_tasks=config.num_tasks,
            seed=config.seed,
        )
        return datasets.tasks_over_classes(tasks, classes)

    def splits(self, index: int) -> datasets.TaskSplits:
        """Task ``index``'s training, validation and test data."""
        config = self.config
        caps = {
            "max_train_samples": config.max_train_samples,
            "max_test_samples": config.max_test_samples,
            "seed": config.seed,
        }
        if self.folder is not None:
            spec = self.spec
            return self.folder.task_splits(
                self.tasks[index],
                channels=spec.in_channels,
                size=spec.image_size,
                mean=spec.mean,
                std=spec.std,
                **caps,
            )
        return datasets.task_splits(
            self.train, self.test, self.tasks[index], val_fraction=config.val_fraction, **caps
        )


class Reporter:
    """Receives progress events; the default ignores them (the CLI draws progress bars)."""

    def task_started(self, task: int, kind: str, total_steps: int) -> None: ...

    def step(self) -> None: ...

    def epoch_finished(self, task: int, epoch: int, metrics: dict[str, float]) -> None: ...

    def task_finished(self, metrics: dict[str, Any]) -> None: ...


@dataclass
class _Distributed:
    mode: str
    rank: int
    world_size: int

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def owns(self, task: int) -> bool:
        return self.mode != "tasks" or task % self.world_size == self.rank

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def train_run(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    distributed_mode: str = "tasks",
    reporter: Reporter | None = None,
) -> list[dict[str, Any]]:
    """Train (or continue) a run and write its directory.

    Args:
        config: what to train.
        run_dir: output folder.
        resume: continue the run already in ``run_dir`` (its config must equal ``config``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``; run.json records the device
            the run started on.
        distributed_mode: under torchrun, ``"tasks"`` (whole tasks per rank) or ``"data"`` (DDP).
        reporter: progress events.

    Returns:
        Per-task metrics, in task order.
    """
    run_dir = Path(run_dir)
    check_output(run_dir, RUN)
    reporter = reporter or Reporter()
    if distributed_mode not in DISTRIBUTED_MODES:
        raise ConfigError(f"unknown distributed mode {distributed_mode!r}: {DISTRIBUTED_MODES}")
    parallel = _start_distributed(distributed_mode, device)
    try:
        device = _resolve_device(device, parallel)
        run_data = RunData.load(config)
        spec, tasks = run_data.spec, run_data.tasks
        data_split = run_data.folder.record() if run_data.folder is not None else None
        record = {**run_record(config, spec, tasks, data_split=data_split), "device": device}
        model = build_model(config.model_config(spec)).to(device)
        if config.basis < config.num_tasks:
            shapes = [layer.weight_shape for layer in masked_layers(model)]
            check_groups(config.alpha_groups, shapes)
        if parallel.rank == 0:
            prepare_run_dir(run_dir, record, resume)
        parallel.barrier()

        basis: list[list[torch.Tensor]] = [[] for _ in range(config.basis)]
        pool: torch.Tensor | None = None
        phases = (range(config.basis), range(config.basis, config.num_tasks))
        for phase in phases:
            for index in phase:
                path = task_path(run_dir, index)
                if path.exists() or not parallel.owns(index):
                    continue
                splits = run_data.splits(index)
                kind = "basis" if index < config.basis else "alpha"
                metrics = train_task(
                    model,
                    config.recipe,
                    splits,
                    index=index,
                    kind=kind,
                    basis=basis,
                    device=device,
                    parallel=parallel,
                    reporter=reporter,
                    pool=pool,
                    alpha_groups=config.alpha_groups,
                    trained_for=trained_for(config.alpha_dtype),
                )
                if kind == "alpha" and (pool is not None or config.alpha_dtype != "float32"):
                    table = served_alpha(alpha_table(model).cpu(), config.alpha_dtype)
                    serve_table(model, table, splits, config.recipe, pool, metrics, slot=index)
                tensors = task_state(model, index, kind, statistics=pool is None)
                metrics["state_bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
                metrics["class_names"] = [spec.class_names[c] for c in metrics["classes"]]
                if parallel.rank == 0 or parallel.mode == "tasks":
                    metadata = {"kind": kind, "task": index, "metrics": metrics}
                    save_safetensors_atomic(tensors, path, metadata)
                reporter.task_finished(metrics)
            parallel.barrier()
            if phase is phases[0]:
                basis = [read_task_masks(task_path(run_dir, t), model) for t in phase]
                if config.pool:
                    pixels = calibration_pool(run_data, config.basis, config.pool)
                    pool = datasets.preprocess_images(pixels, spec).to(device)
        results = collect_metrics(run_dir, config.num_tasks)
        if parallel.rank == 0:
            write_metrics(run_dir, results)
        return results
    finally:
        if parallel.active and dist.is_initialized():
            dist.destroy_process_group()


def calibration_pool(run_data: RunData, basis: int, per_task: int) -> torch.Tensor:
    """A run's calibration pool: the first ``per_task`` training images of each of its ``basis``
    basis tasks, in stored order, as uint8 pixels (what ``supsup pack`` stores in the basis)."""
    splits = (run_data.splits(index) for index in range(basis))
    parts = [datasets.first_images(task.train, per_task) for task in splits]
    return datasets.pixels_from_inputs(torch.cat(parts), run_data.spec)


def serve_table(
    model: nn.Module,
    table: torch.Tensor,
    splits: datasets.TaskSplits,
    recipe: TaskRecipe,
    pool: torch.Tensor | None,
    metrics: dict[str, Any],
    *,
    slot: int = 0,
) -> None:
    """Give an alpha task's model the table as it will be stored (e.g. codes times scales), its
    statistics recomputed under it (from ``pool``, else the task's training images), and record
    the test accuracy of what the task file will serve in ``metrics``."""
    device = str(next(model.parameters()).device)
    set_task(model, slot)
    load_alpha_table(model, table.to(device))
    if pool is None:
        refresh_norm_statistics(model, slot, splits.train, recipe.batch_size, device)
    else:
        refresh_norm_statistics(model, slot, pool, POOL_BATCH, device)
    outputs = len(splits.task.classes)
    metrics["test_accuracy"] = evaluate(
        model, splits.test, device, recipe.batch_size, outputs=outputs
    )


def _start_distributed(mode: str, device: str) -> _Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return _Distributed(mode, 0, 1)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return _Distributed(mode, dist.get_rank(), dist.get_world_size())


def _resolve_device(device: str, parallel: _Distributed) -> str:
    device = resolve_device(device)
    if parallel.active and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', parallel.rank))}"
    return device


def train_task(
    model: nn.Module,
    recipe: TaskRecipe,
    splits: datasets.TaskSplits,
    *,
    index: int,
    kind: str,
    basis: list[list[torch.Tensor]],
    device: str,
    slot: int | None = None,
    outputs: int | None = None,
    parallel: _Distributed | None = None,
    reporter: Reporter | None = None,
    pool: torch.Tensor | None = None,
    alpha_groups: int = 1,
    trained_for: str | None = None,
) -> dict[str, Any]:
    """Train one task in ``model`` and leave the model holding its best epoch.

    Args:
        model: built with at least ``slot + 1`` norm slots.
        recipe: epochs, batch size, learning rates, density and seed.
        splits: the task's training, validation and test data.
        index: the task's id (its seeds derive from it) as the metrics record it.
        kind: ``"basis"`` (edge-popup mask scores) or ``"alpha"`` (a table over ``basis``).
        basis: the basis mask sets (for alpha tasks).
        device: where to train.
        slot: the norm statistics slot the task uses (default ``index``).
        outputs: train and evaluate on the first ``outputs`` classifier outputs only (a task
            with fewer classes than the model has outputs); default every output.
        parallel: the distributed setting (default one process).
        reporter: progress events.
        pool: a bundle's calibration pool as model inputs (a BatchNorm model only): every step
            normalises its batch with the statistics of ``REFERENCE_IMAGES`` pool images drawn
            at random (:func:`~supsup_deploy.normalization.reference_batch`), and each epoch's
            statistics come from the pool, as a bundle computes them for a task that stores
            none (:data:`~supsup_deploy.bundles.format.POOL_BATCH` images at a time).
        alpha_groups: an alpha task's rows per layer (:mod:`supsup_deploy.alpha_groups`).
        trained_for: a coded alpha dtype (``"int8"``, ``"int4"``) to train the table against:
            the forward pass sees it as that dtype will store it (and the best epoch is judged
            so) while the gradient reaches the float table
            (:class:`~supsup_deploy.alpha_codes.FakeQuantized`); None trains the float table.
            The model is left holding the float table of the best epoch.

    Returns:
        The task's metrics (validation accuracy of the best epoch, test accuracy, sizes).
    """
    slot = index if slot is None else slot
    parallel = parallel or _Distributed("tasks", 0, 1)
    reporter = reporter or Reporter()
    set_task(model, slot)
    _reset_norm_slot(model, slot)
    if kind == "basis":
        generator = torch.Generator().manual_seed(derive_seed(recipe.seed, "scores", index))
        sources = use_scores(model, recipe.density, generator=generator)
        parameters = [source.scores for source in sources]
        lr = recipe.lr
    else:
        sources = use_alpha(model, basis, groups=alpha_groups)
        parameters = [source.alpha for source in sources]
        if trained_for is not None:
            for source in sources:
                parametrize.register_parametrization(source, "alpha", FakeQuantized(trained_for))
        lr = recipe.alpha_lr
    trainer: nn.Module = model
    if parallel.active and parallel.mode == "data":
        device_ids = [torch.device(device).index] if device.startswith("cuda") else None
        trainer = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=recipe.weight_decay)
    train = splits.train
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, steps_per_epoch * recipe.epochs)
    )
    shuffle = torch.Generator().manual_seed(derive_seed(recipe.seed, "shuffle", index))
    draw = torch.Generator().manual_seed(derive_seed(recipe.seed, "reference", index))
    reporter.task_started(index, kind, steps_per_epoch * recipe.epochs)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    train_loss = float("nan")
    for epoch in range(recipe.epochs):
        trainer.train()
        total, count = 0.0, 0
        batches = train.batches(batch_size=recipe.batch_size, shuffle=True, generator=shuffle)
        for images, labels in batches:
            images, labels = _shard(images, labels, parallel)
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            if pool is None:
                logits = trainer(images)
            else:
                chosen = torch.randperm(len(pool), generator=draw)[:REFERENCE_IMAGES]
                reference = pool[chosen].to(device)
                with reference_batch(model, len(reference)):
                    logits = trainer(torch.cat([reference, images]))[len(reference) :]
            loss = F.cross_entropy(logits[:, :outputs], labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(labels)
            count += len(labels)
            reporter.step()
        train_loss = total / max(count, 1)
        if pool is None:
            refresh_norm_statistics(model, slot, train, recipe.batch_size, device)
        else:
            refresh_norm_statistics(model, slot, pool, POOL_BATCH, device)
        val_accuracy = evaluate(model, splits.val, device, recipe.batch_size, outputs=outputs)
        reporter.epoch_finished(
            index, epoch, {"train_loss": train_loss, "val_accuracy": val_accuracy}
        )
        if best is None or val_accuracy > best[0]:
            state = {name: value.detach().clone() for name, value in model.state_dict().items()}
            best = (val_accuracy, epoch, state)
    assert best is not None
    model.load_state_dict(best[2])
    test_accuracy = evaluate(model, splits.test, device, recipe.batch_size, outputs=outputs)
    for layer in masked_layers(model):
        if parametrize.is_parametrized(layer.source):
            parametrize.remove_parametrizations(layer.source, "alpha", leave_parametrized=False)
    return {
        "task": index,
        "name": splits.task.name,
        "kind": kind,
        "classes": [int(c) for c in splits.task.classes],
        "epochs": recipe.epochs,
        "best_epoch": best[1],
        "train_loss": train_loss,
        "val_accuracy": best[0],
        "test_accuracy": test_accuracy,
        "train_samples": len(train),
        "val_samples": len(splits.val),
        "test_samples": len(splits.test),
    }


def _shard(images: torch.Tensor, labels: torch.Tensor, parallel: _Distributed):
    if parallel.active and parallel.mode == "data":
        return images[parallel.rank :: parallel.world_size], labels[
            parallel.rank :: parallel.world_size
        ]
    return images, labels


def _reset_norm_slot(model: nn.Module, task: int) -> None:
    with torch.no_grad():
        for norm in task_norms(model):
            norm.running_mean[task].zero_()
            norm.running_var[task].fill_(1.0)


@torch.no_grad()
def refresh_norm_statistics(
    model: nn.Module,
    task: int,
    images: torch.Tensor | datasets.LabelledImages,
    batch_size: int,
    device: str,
) -> None:
    """Recompute slot ``task``'s running statistics under the current weights.

    The running averages kept during training lag behind weights that keep changing (most with
    few steps or a high learning rate); this replaces them by the plain average of the batch
    statistics of up to ``NORM_REFRESH_IMAGES`` training images, in their stored order. The norm
    layers' selected slot is ``task`` meanwhile and is restored afterwards; no other slot changes.

    Args:
        model: the model whose norm layers to refresh.
        task: the norm slot.
        images: normalised images, as a tensor or a split read batch by batch.
        batch_size: images per forward pass.
        device: where the model runs.
    """
    batches = (batch.to(device) for batch in _first_images(images, batch_size))
    average_batch_statistics(model, task, batches)


def _first_images(
    images: torch.Tensor | datasets.LabelledImages, batch_size: int
) -> Iterator[torch.Tensor]:
    """The first ``NORM_REFRESH_IMAGES`` images in stored order, ``batch_size`` at a time."""
    if isinstance(images, torch.Tensor):
        images = images[:NORM_REFRESH_IMAGES]
        yield from (
            images[start : start + batch_size] for start in range(0, len(images), batch_size)
        )
        return
    remaining = NORM_REFRESH_IMAGES
    for batch, _ in images.batches(batch_size=batch_size, shuffle=False, generator=None):
        yield batch[:remaining]
        remaining -= len(batch)
        if remaining <= 0:
            return


@torch.no_grad()
def evaluate(
    model: nn.Module,
    pair: datasets.LabelledImages,
    device: str,
    batch_size: int,
    *,
    outputs: int | None = None,
) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on a task's data; NaN when empty.

    ``outputs`` limits the prediction to the first classifier outputs (the task's classes).
    """
    if len(pair) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for images, labels in pair.batches(
        batch_size=max(batch_size, 256), shuffle=False, generator=None
    ):
        predictions = model(images.to(device))[:, :outputs].argmax(dim=1).cpu()
        correct += int((predictions == labels).sum())
    return correct / len(pair)
