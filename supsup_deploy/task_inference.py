"""Which task does a batch belong to? Calibrated entropy, or SupSup's one-shot gradient.

``calibrated`` (the default when every task recorded one): run each task on the batch and pick
the lowest mean prediction entropy relative to the task's own reference entropy on its validation
images (``val_entropy``, recorded by training). Tasks differ widely in how confident they are;
without the reference the most confident task wins whatever the batch. Costs one forward per task.

``oneshot``: SupSup's one-shot entropy gradient, in alpha form.

All tasks are put in superposition with weights ``beta`` (uniform): layer ``d`` uses the alpha row
``sum_t beta_t * A_t[d]``, so the cost is one forward and backward over ``|B|``-term layers
whatever the number of tasks. The task whose ``beta`` most decreases the mean entropy of the
batch's predictions is chosen: ``argmin_t dH/dbeta_t = sum_d <dH/dalpha_d, A_t[d]>``.

Two problems the published code left open, and what this does about them (it remains far less
accurate than ``calibrated``; see bench notes):

- per-task normalisation statistics have no superposed form: the superposed pass normalises
  with the batch's own statistics (the batch is one task's data, which is the premise);
- alpha's scale on the classifier acts as a temperature and biases the entropy comparison
  (and elsewhere sets a task's weight in the mixture): every task's alpha rows are scaled to
  unit L2 norm in the superposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from supsup_deploy.bundle import Bundle, _single_slot
from supsup_deploy.errors import ConfigError
from supsup_deploy.layers import AlphaMask
from supsup_deploy.models import build_model, masked_layers
from supsup_deploy.normalization import TaskBatchNorm2d

METHODS = ("auto", "calibrated", "oneshot")


@dataclass(frozen=True)
class TaskGuess:
    """The inferred task of one batch, with every task's score (lowest wins)."""

    task: int
    scores: tuple[float, ...]
    method: str


class TaskInferrer:
    """Task inference over every task installed in a bundle.

    Args:
        bundle: a loaded bundle.
        device: where to run.
        method: ``"calibrated"``, ``"oneshot"`` or ``"auto"`` (calibrated when every task has a
            reference entropy).
        normalize_alpha: one-shot only: scale each task's alpha rows to unit norm.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "cpu",
        method: str = "auto",
        normalize_alpha: bool = True,
    ):
        if not bundle.tasks:
            raise ConfigError(f"{bundle.path}: no tasks installed")
        if method not in METHODS:
            raise ConfigError(f"unknown task-inference method {method!r}: {', '.join(METHODS)}")
        self.bundle = bundle
        self.device = device
        self.task_ids = [info.index for info in bundle.tasks]
        references = [info.metrics.get("val_entropy") for info in bundle.tasks]
        known = all(isinstance(value, float) and math.isfinite(value) for value in references)
        if method == "auto":
            method = "calibrated" if known else "oneshot"
        if method == "calibrated" and not known:
            raise ConfigError(
                f"{bundle.path}: some tasks have no reference entropy (val_entropy); "
                "retrain them or use --task-inference oneshot"
            )
        self.method = method
        if method == "calibrated":
            self.references = torch.tensor(references).clamp_min(1e-6)
            self.model = bundle.model(self.task_ids[0], device=device)
            return
        tables = torch.stack([bundle.task_tensors(t)["alpha"].float() for t in self.task_ids])
        if normalize_alpha:
            tables = tables / tables.norm(dim=2, keepdim=True).clamp_min(1e-12)
        self.tables = tables.to(device)
        self.model = build_model(_single_slot(bundle.config)).to(device)
        for layer, codes in zip(masked_layers(self.model), bundle.codes(device), strict=True):
            layer.set_source(AlphaMask(layer, codes, bundle.num_basis))
        for module in self.model.modules():
            if isinstance(module, TaskBatchNorm2d):
                module.momentum = 0.0  # batch statistics, leaving the running ones untouched
        self.model.train()

    def infer(self, images: torch.Tensor) -> TaskGuess:
        """The task of a batch of normalised images (at least 2, from one task)."""
        if self.method == "calibrated":
            return self._calibrated(images)
        return self._one_shot(images)

    @torch.no_grad()
    def _calibrated(self, images: torch.Tensor) -> TaskGuess:
        entropies = []
        for task in self.task_ids:
            self.bundle.switch(self.model, task)
            logits = self.model(images.to(self.device))
            entropies.append(float(-(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()))
        scores = torch.tensor(entropies) / self.references
        return TaskGuess(self.task_ids[int(scores.argmin())], tuple(scores.tolist()), "calibrated")

    def _one_shot(self, images: torch.Tensor) -> TaskGuess:
        beta = torch.full((len(self.task_ids),), 1.0 / len(self.task_ids), device=self.device)
        mixed = torch.einsum("t,tlb->lb", beta, self.tables)
        sources = [layer.source for layer in masked_layers(self.model)]
        with torch.no_grad():
            for source, row in zip(sources, mixed, strict=True):
                source.alpha.copy_(row)
                source.alpha.grad = None
        logits = self.model(images.to(self.device))
        entropy = -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()
        entropy.backward()
        alpha_gradients = torch.stack([source.alpha.grad for source in sources])
        gradients = torch.einsum("lb,tlb->t", alpha_gradients, self.tables)
        return TaskGuess(
            self.task_ids[int(gradients.argmin())], tuple(gradients.tolist()), "oneshot"
        )


def evaluate_task_inference(
    bundle: Bundle,
    runner,
    *,
    split: str = "test",
    batch_size: int = 64,
    limit: int | None = None,
    data_root: str | None = None,
    method: str = "auto",
) -> dict:
    """Task-inference accuracy over every task's labelled images, batch by batch.

    Args:
        bundle: a bundle packed from a training run (its dataset and task classes are recorded).
        runner: a :class:`supsup_deploy.runtime.Runner` for the predictions.
        split: dataset split.
        batch_size: images per inferred batch (each batch comes from one task).
        limit: at most this many images per task.
        data_root: dataset folder.

    Returns:
        Task-inference accuracy, and classification accuracy with the inferred and the true task.
    """
    from supsup_deploy.runtime import dataset_split

    inferrer = TaskInferrer(bundle, device=runner.device, method=method)
    rows = []
    for info in bundle.tasks:
        images, labels = dataset_split(
            bundle, info.index, split=split, limit=limit, data_root=data_root
        )
        batches = right = inferred_correct = true_correct = 0
        for start in range(0, len(images) - 1, batch_size):
            batch, batch_labels = (
                images[start : start + batch_size],
                labels[start : start + batch_size],
            )
            guess = inferrer.infer(batch).task
            batches += 1
            right += guess == info.index
            inferred_correct += int((runner.logits(guess, batch).argmax(1) == batch_labels).sum())
            true_correct += int((runner.logits(info.index, batch).argmax(1) == batch_labels).sum())
        rows.append(
            {
                "task": info.index,
                "batches": batches,
                "task_inference_accuracy": right / max(batches, 1),
                "accuracy_inferred_task": inferred_correct / max(len(images), 1),
                "accuracy_true_task": true_correct / max(len(images), 1),
                "images": len(images),
            }
        )
    batches = sum(row["batches"] for row in rows)
    images = sum(row["images"] for row in rows)
    return {
        "method": inferrer.method,
        "batch_size": batch_size,
        "task_inference_accuracy": sum(r["task_inference_accuracy"] * r["batches"] for r in rows)
        / max(batches, 1),
        "accuracy_inferred_task": sum(r["accuracy_inferred_task"] * r["images"] for r in rows)
        / max(images, 1),
        "accuracy_true_task": sum(r["accuracy_true_task"] * r["images"] for r in rows)
        / max(images, 1),
        "tasks": rows,
    }
