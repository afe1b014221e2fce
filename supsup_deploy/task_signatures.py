"""How tasks are told apart without their normalisation statistics: by class names, or by a
signature of what their images look like.

A batch of one task's images names its task when the tasks' class sets differ and each class is
known to two basis tasks or more (:func:`class_sets_tell_tasks_apart`; the ``classes`` method of
task inference reads the class names alone). When they are not (a task with classes no basis
task saw, as on split protocols), a task stores a *signature*: the mean and variance, over its
training images, of the classifier inputs of the bundle's reference network (basis task
:data:`REFERENCE_TASK` as installed), averaged over consecutive channels into
:data:`~supsup_deploy.bundles.format.SIGNATURE_SIZE` bins and stored in float16 (task tensor
``signature``, format 3) or as uint8 codes spanning each row (format 4). The ``signatures``
method compares a batch's mean to every task's mean, each feature scaled by the tasks' average
variance: one forward pass, whatever the number of tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from supsup_deploy.bundles.format import SIGNATURE_SIZE
from supsup_deploy.models import MaskedModel, masked_layers
from supsup_deploy.weight_sources import model_device

REFERENCE_TASK = 0
"""The task id of the network signatures are measured with: the bundle's first basis task."""
SIGNATURE_IMAGES = 512
"""Training images (the first ones, in stored order) a writer averages into a signature."""
FEATURE_BATCH = 256
"""Images per forward pass when measuring features."""


class LabelledTask(Protocol):
    """What the class-set rule reads of a task: a bundle's task or a task about to be written."""

    kind: str
    class_names: Sequence[str]


class IndexedTask(LabelledTask, Protocol):
    """An installed task, as the reference-task rule reads it."""

    index: int


@dataclass(frozen=True)
class TaskClasses:
    """A task not written yet, as the class-set rule reads it."""

    kind: str
    class_names: Sequence[str]


def class_sets_tell_tasks_apart(tasks: Sequence[LabelledTask]) -> bool:
    """Whether class names alone tell these tasks apart: no two tasks have the same class set,
    and every class of every task is a class of two basis tasks or more."""
    known: dict[str, int] = {}
    for task in tasks:
        if task.kind == "basis":
            for name in task.class_names:
                known[name] = known.get(name, 0) + 1
    sets = [frozenset(task.class_names) for task in tasks]
    return len(set(sets)) == len(sets) and all(
        known.get(name, 0) >= 2 for names in sets for name in names
    )


def has_reference_task(tasks: Sequence[IndexedTask]) -> bool:
    """Whether task :data:`REFERENCE_TASK` is among ``tasks`` and is a basis task (signatures are
    measured with it)."""
    return any(task.index == REFERENCE_TASK and task.kind == "basis" for task in tasks)


@torch.no_grad()
def image_features(reference: MaskedModel, images: torch.Tensor) -> torch.Tensor:
    """The reference network's classifier inputs for normalised images, pooled into bins.

    Args:
        reference: an eval-mode model running the reference task.
        images: normalised model inputs ``[N, C, H, W]``, on the model's device.

    Returns:
        float32 ``[N, SIGNATURE_SIZE]``: each image's classifier inputs (its pooled features),
        averaged over consecutive channels (``adaptive_avg_pool1d``'s bins).
    """
    captured: list[torch.Tensor] = []
    classifier = masked_layers(reference)[-1]
    handle = classifier.register_forward_hook(
        lambda _module, inputs, _output: captured.append(inputs[0].flatten(1).float())
    )
    try:
        for chunk in images.split(FEATURE_BATCH):
            reference(chunk)
    finally:
        handle.remove()
    features = torch.cat(captured)
    return F.adaptive_avg_pool1d(features.unsqueeze(1), SIGNATURE_SIZE).squeeze(1)


def task_signature(reference: MaskedModel, images: torch.Tensor) -> torch.Tensor:
    """A task's signature from its training images (the first :data:`SIGNATURE_IMAGES`).

    Args:
        reference: an eval-mode model running the reference task.
        images: the task's normalised training images, in stored order (the first
            ``SIGNATURE_IMAGES`` count).

    Returns:
        float16 ``[2, SIGNATURE_SIZE]`` on the CPU: the pooled features' means over the images,
        then their (biased) variances.

    Example:
        >>> signature = task_signature(bundle.model(REFERENCE_TASK), train.images)
    """
    images = images[:SIGNATURE_IMAGES].to(model_device(reference))
    features = image_features(reference, images)
    variance, mean = torch.var_mean(features, dim=0, unbiased=False)
    return torch.stack([mean, variance]).cpu().half()
