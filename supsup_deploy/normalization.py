"""Normalisation layers without affine parameters.

- ``"batch"``: :class:`TaskBatchNorm2d`, BatchNorm with one set of running statistics per task
  (the per-task state SupSup needs; without it every task but the last evaluates at chance).
- ``"group"``: :class:`GroupNorm2d`, statistic-free GroupNorm: nothing stored per task.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from supsup_deploy.errors import ConfigError

NORM_KINDS = ("batch", "group")


class TaskBatchNorm2d(nn.Module):
    """Non-affine BatchNorm with running statistics per task, selected by ``task``.

    Args:
        num_features: channels.
        num_tasks: number of statistic slots.
        momentum: running-average momentum, as in ``nn.BatchNorm2d``.
        eps: added to the variance.
    """

    def __init__(
        self, num_features: int, *, num_tasks: int = 1, momentum: float = 0.1, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.momentum = momentum
        self.eps = eps
        self.task = 0
        self.reference_images = 0
        self.register_buffer("running_mean", torch.zeros(num_tasks, num_features))
        self.register_buffer("running_var", torch.ones(num_tasks, num_features))

    @property
    def num_tasks(self) -> int:
        return self.running_mean.shape[0]

    def set_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise ConfigError(f"task slot {task} out of range: this layer has {self.num_tasks}")
        self.task = task

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training and self.reference_images:
            variance, mean = torch.var_mean(
                inputs[: self.reference_images], dim=(0, 2, 3), unbiased=False
            )
            shape = (1, -1, 1, 1)
            return (inputs - mean.view(shape)) / torch.sqrt(variance.view(shape) + self.eps)
        return F.batch_norm(
            inputs,
            self.running_mean[self.task],
            self.running_var[self.task],
            None,
            None,
            self.training,
            self.momentum,
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_tasks={self.num_tasks}, affine=False"


class GroupNorm2d(nn.Module):
    """Non-affine GroupNorm: statistics from each sample, nothing stored.

    The group count is ``gcd(groups, num_features)`` so that every width divides evenly.
    """

    def __init__(self, num_features: int, *, groups: int = 4, eps: float = 1e-5) -> None:
        super().__init__()
        if groups < 1:
            raise ConfigError(f"norm groups must be at least 1, got {groups}")
        self.num_features = num_features
        self.groups = math.gcd(groups, num_features)
        self.eps = eps

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.group_norm(inputs, self.groups, None, None, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.groups}, affine=False"


NormLayer = TaskBatchNorm2d | GroupNorm2d


def task_norms(model: nn.Module) -> list[TaskBatchNorm2d]:
    """The model's normalisation layers with per-task statistics, in module order."""
    return [module for module in model.modules() if isinstance(module, TaskBatchNorm2d)]


def set_task(model: nn.Module, task: int) -> None:
    """Select the normalisation statistics slot of every per-task norm layer."""
    for norm in task_norms(model):
        norm.set_task(task)


@contextlib.contextmanager
def reference_batch(model: nn.Module, count: int) -> Iterator[None]:
    """While in training mode, every per-task BatchNorm normalises its whole input with the
    statistics of its first ``count`` samples (a reference batch) instead of the input's own,
    and keeps no running statistics. Training against a pool of reference images this way makes
    a task's training agree with statistics computed from that pool alone."""
    norms = task_norms(model)
    for norm in norms:
        norm.reference_images = count
    try:
        yield
    finally:
        for norm in norms:
            norm.reference_images = 0


@torch.no_grad()
def average_batch_statistics(model: nn.Module, slot: int, batches: Iterable[torch.Tensor]) -> None:
    """Set slot ``slot``'s running statistics to the plain average of the batch statistics.

    Each batch runs through the model in training mode (normalised by its own mean and biased
    variance); every per-task BatchNorm's running mean becomes the average of the batch means and
    its running variance the average of the unbiased batch variances. The selected slots,
    momenta and the model's mode are restored afterwards; no other slot changes.

    Args:
        model: the model, on the batches' device.
        slot: the statistics slot to set.
        batches: model inputs, in order.
    """
    norms = task_norms(model)
    if not norms:
        return
    was_training = model.training
    model.train()
    saved = [(module.momentum, module.task) for module in norms]
    for module in norms:
        module.set_task(slot)
    try:
        for number, batch in enumerate(batches, start=1):
            for module in norms:
                module.momentum = 1.0 / number
            model(batch)
    finally:
        for module, (momentum, task) in zip(norms, saved, strict=True):
            module.momentum, module.task = momentum, task
        model.train(was_training)


def norm_layers(model: nn.Module) -> list[NormLayer]:
    """Every normalisation layer of the model, in module order."""
    return [
        module for module in model.modules() if isinstance(module, (TaskBatchNorm2d, GroupNorm2d))
    ]


def make_norm(kind: str, num_features: int, *, num_tasks: int = 1, groups: int = 4) -> NormLayer:
    """Build the normalisation layer of the given kind (``"batch"`` or ``"group"``)."""
    if kind == "batch":
        return TaskBatchNorm2d(num_features, num_tasks=num_tasks)
    if kind == "group":
        return GroupNorm2d(num_features, groups=groups)
    raise ConfigError(f"unknown norm {kind!r}: expected one of {', '.join(NORM_KINDS)}")


def norm_state(model: nn.Module, task: int) -> dict[str, torch.Tensor]:
    """One task's normalisation statistics, concatenated over the per-task norm layers."""
    norms = task_norms(model)
    if not norms:
        return {}
    return {
        "norm.running_mean": torch.cat([m.running_mean[task] for m in norms]).float(),
        "norm.running_var": torch.cat([m.running_var[task] for m in norms]).float(),
    }


def load_norm_state(model: nn.Module, task: int, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`norm_state` into slot ``task``."""
    norms = task_norms(model)
    if not norms:
        return
    sizes = [m.num_features for m in norms]
    with torch.no_grad():
        for key, attribute in (
            ("norm.running_mean", "running_mean"),
            ("norm.running_var", "running_var"),
        ):
            for module, chunk in zip(norms, state[key].split(sizes), strict=True):
                getattr(module, attribute)[task].copy_(chunk)
