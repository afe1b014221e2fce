"""The registry of task-inference methods: one small class per method, each scoring every
candidate task on a batch (lowest score wins).

:class:`supsup_deploy.task_inference.TaskInferrer` resolves ``auto`` with :func:`resolve_method`,
builds the registered class and ranks its scores. A new method is one :class:`InferenceMethod`
subclass registered in :data:`TASK_INFERENCE_METHODS`; the methods' maths is described in
:mod:`supsup_deploy.task_inference`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from supsup_deploy.alpha_groups import common_groups, expand_groups
from supsup_deploy.bundles.reader import Bundle, single_task_config
from supsup_deploy.errors import ConfigError
from supsup_deploy.models import build_model, masked_layers
from supsup_deploy.normalization import TaskBatchNorm2d, task_norms
from supsup_deploy.stem_statistics import StemStatistics, gaussian_divergence
from supsup_deploy.task_signatures import (
    REFERENCE_TASK,
    class_sets_tell_tasks_apart,
    has_reference_task,
    image_features,
)
from supsup_deploy.weight_sources import AlphaMask

DEFAULT_SHORTLIST = 5
"""Tasks the statistics method runs in full after the first-layer shortlist."""
VARIANCE_FLOOR = 0.01
"""The signatures method adds this share of the features' mean variance to each variance."""


@dataclass(frozen=True)
class InferenceOptions:
    """The settings of every method; each method reads only its own.

    Attributes:
        normalize_alpha: oneshot: scale each task's alpha rows to unit norm.
        steps: oneshot: forward and backward passes (each one updates ``beta``).
        step_size: oneshot: exponentiated-gradient step on the standardised gradient.
        shortlist: statistics: when more tasks are installed, score them all at the first norm
            layer and run only this many best ones in full; 0 runs every task.
    """

    normalize_alpha: bool = True
    steps: int = 3
    step_size: float = 1.0
    shortlist: int = DEFAULT_SHORTLIST

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"one-shot steps must be at least 1, got {self.steps}")
        if self.shortlist < 0:
            raise ConfigError(f"the shortlist must be 0 (off) or more tasks, got {self.shortlist}")


class InferenceMethod(ABC):
    """Scores a bundle's tasks on a batch of one task's images.

    Args:
        bundle: a loaded bundle with tasks.
        device: where to run.
        options: the methods' settings.
    """

    name: ClassVar[str]
    needs_task_statistics: ClassVar[bool] = False
    """Whether the method reads per-task norm statistics (BatchNorm bundles only)."""

    def __init__(self, bundle: Bundle, *, device: str, options: InferenceOptions) -> None:
        self.bundle = bundle
        self.device = device
        self.options = options
        self.task_ids = [info.index for info in bundle.tasks]

    @abstractmethod
    def scores(self, images: torch.Tensor, candidates: list[int]) -> list[float | None]:
        """Each task's score by position in ``task_ids`` (None: not run), among ``candidates``."""

    def settings(self) -> dict[str, Any]:
        """The options that shaped the scores, for reports."""
        return {}


class _PerTaskMethod(InferenceMethod):
    """Runs each candidate task's network in turn and scores it with :meth:`task_score`."""

    def __init__(self, bundle: Bundle, *, device: str, options: InferenceOptions) -> None:
        super().__init__(bundle, device=device, options=options)
        self.model = bundle.model(self.task_ids[0], device=device)

    def scores(self, images: torch.Tensor, candidates: list[int]) -> list[float | None]:
        scores: list[float | None] = [None] * len(self.task_ids)
        for position in candidates:
            self.bundle.switch(self.model, self.task_ids[position])
            scores[position] = self.task_score(images)
        return scores

    @abstractmethod
    def task_score(self, images: torch.Tensor) -> float:
        """The score of the task the model runs now."""


class StatisticsMethod(_PerTaskMethod):
    """Batch statistics against each task's stored norm statistics (BatchNorm bundles)."""

    name = "statistics"
    needs_task_statistics = True

    def __init__(self, bundle: Bundle, *, device: str, options: InferenceOptions) -> None:
        super().__init__(bundle, device=device, options=options)
        self.stem: StemStatistics | None = None
        if 0 < options.shortlist < len(self.task_ids):
            self.stem = StemStatistics.for_bundle(bundle, self.model, device)

    def scores(self, images: torch.Tensor, candidates: list[int]) -> list[float | None]:
        shortlist = self.options.shortlist
        if self.stem is not None and len(candidates) > shortlist:
            divergences = self.stem.divergences(images)
            candidates = sorted(candidates, key=lambda position: float(divergences[position]))
            candidates = candidates[:shortlist]
        return super().scores(images, candidates)

    def task_score(self, images: torch.Tensor) -> float:
        return statistics_divergence(self.model, images)

    def settings(self) -> dict[str, Any]:
        return {"shortlist": self.options.shortlist} if self.stem is not None else {}


class InformationMethod(_PerTaskMethod):
    """Confident and diverse predictions: minus the images' mutual information with the class."""

    name = "information"

    def task_score(self, images: torch.Tensor) -> float:
        return -prediction_information(self.model, images)


class OneShotMethod(InferenceMethod):
    """SupSup's entropy gradient over every task's alpha rows in superposition."""

    name = "oneshot"

    def __init__(self, bundle: Bundle, *, device: str, options: InferenceOptions) -> None:
        super().__init__(bundle, device=device, options=options)
        tables = [bundle.task_tensors(t)["alpha"].float() for t in self.task_ids]
        groups = common_groups(len(table[0]) for table in tables)
        tables = torch.stack([expand_groups(table, groups) for table in tables])
        if options.normalize_alpha:
            tables = tables / tables.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.tables = tables.to(device)
        self.model = build_model(single_task_config(bundle.config)).to(device)
        for layer, codes in zip(masked_layers(self.model), bundle.codes(device), strict=True):
            layer.set_source(AlphaMask(layer, codes, bundle.num_basis, groups=groups))
        for norm in self.model.task_norms():
            norm.momentum = 0.0  # batch statistics, leaving the running ones untouched
        self.model.train()

    def scores(self, images: torch.Tensor, candidates: list[int]) -> list[float | None]:
        """``-log beta`` of each candidate after ``steps`` passes over the candidates' mixture."""
        sources = [layer.source for layer in masked_layers(self.model)]
        tables = self.tables[candidates]
        log_beta = torch.full((len(candidates),), -math.log(len(candidates)))
        log_beta = log_beta.to(self.device)
        for _ in range(self.options.steps):
            gradient = self.entropy_gradient(images, sources, log_beta.softmax(0), tables)
            spread = gradient.std(unbiased=False).clamp_min(1e-12)
            step = self.options.step_size * (gradient - gradient.mean()) / spread
            log_beta = (log_beta - step).log_softmax(0)
        scores: list[float | None] = [None] * len(self.task_ids)
        for position, score in zip(candidates, (-log_beta).tolist(), strict=True):
            scores[position] = score
        return scores

    def entropy_gradient(self, images, sources, beta: torch.Tensor, tables) -> torch.Tensor:
        """``dH/dbeta`` of the batch's mean prediction entropy: one forward and backward."""
        mixed = torch.einsum("t,tlgb->lgb", beta, tables)
        with torch.no_grad():
            for source, row in zip(sources, mixed, strict=True):
                source.alpha.copy_(row)
                source.alpha.grad = None
        logits = self.model(images)
        entropy = -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()
        entropy.backward()
        alpha_gradients = torch.stack([source.alpha.grad for source in sources])
        return torch.einsum("lgb,tlgb->t", alpha_gradients, tables)

    def settings(self) -> dict[str, Any]:
        return {"steps": self.options.steps}


class ClassSetMethod(InferenceMethod):
    """Which task's class set the batch covers, judged by the basis tasks alone.

    Every basis task scores the batch's images over its own classes; a class's log-probability
    for an image is the mean over the basis tasks that know the class (by name). Each image is
    then shared out over the known classes (a softmax of those means), and a task's score is
    minus the share of the batch its classes take. The cost is one forward per basis task,
    whatever the number of installed tasks, and no task needs stored statistics.
    """

    name = "classes"

    def __init__(self, bundle: Bundle, *, device: str, options: InferenceOptions) -> None:
        super().__init__(bundle, device=device, options=options)
        self.basis_tasks = [info for info in bundle.tasks if info.kind == "basis"]
        if not self.basis_tasks:
            raise ConfigError(f"{bundle.path}: no basis task is installed to score classes with")
        self.vocabulary = sorted({name for info in self.basis_tasks for name in info.class_names})
        column = {name: position for position, name in enumerate(self.vocabulary)}
        self.basis_columns = [[column[n] for n in info.class_names] for info in self.basis_tasks]
        self.task_columns = [
            [column[n] for n in info.class_names if n in column] for info in bundle.tasks
        ]
        self.model = bundle.model(self.basis_tasks[0].index, device=device)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, candidates: list[int]) -> list[float | None]:
        total = images.new_zeros((len(images), len(self.vocabulary)), dtype=torch.float64)
        count = torch.zeros(len(self.vocabulary), dtype=torch.float64, device=images.device)
        for info, columns in zip(self.basis_tasks, self.basis_columns, strict=True):
            self.bundle.switch(self.model, info.index)
            self.model.eval()
            logits = self.model(images)[:, : len(columns)]
            log_probabilities = logits.double().log_softmax(dim=1)
            for output, position in enumerate(columns):
                total[:, position] += log_probabilities[:, output]
                count[position] += 1
        share = (total / count).softmax(dim=1).mean(dim=0)
        scores: list[float | None] = [None] * len(self.task_ids)
        for position in candidates:
            scores[position] = -float(share[self.task_columns[position]].sum())
        return scores


class SignatureMethod(InferenceMethod):
    """The task whose signature's mean features are nearest the batch's.

    The batch runs once through the reference network (basis task 0); a task's score is the
    squared distance between its signature's means and the batch's mean pooled features, each
    feature divided by the installed tasks' average variance of it (plus 1% of that variance's
    mean over features, so a feature that hardly varies cannot dominate;
    :mod:`supsup_deploy.task_signatures`). The cost is one forward pass whatever the number of
    installed tasks, and no task needs stored statistics; every task needs a signature.
    """

    name = "signatures"

    def __init__(self, bundle: Bundle, *, device: str, options: InferenceOptions) -> None:
        super().__init__(bundle, device=device, options=options)
        check_signatures(bundle)
        signatures = torch.stack([bundle.task_signature(index) for index in self.task_ids])
        self.means = signatures[:, 0].float().to(device)
        variance = signatures[:, 1].float().mean(dim=0)
        self.scale = (variance + VARIANCE_FLOOR * variance.mean()).clamp_min(1e-12).to(device)
        self.reference = bundle.model(REFERENCE_TASK, device=device)

    def scores(self, images: torch.Tensor, candidates: list[int]) -> list[float | None]:
        mean = image_features(self.reference, images).mean(dim=0)
        distances = ((self.means[candidates] - mean).square() / self.scale).sum(dim=1)
        scores: list[float | None] = [None] * len(self.task_ids)
        for position, distance in zip(candidates, distances.tolist(), strict=True):
            scores[position] = distance
        return scores


def check_signatures(bundle: Bundle) -> None:
    """Refuse a bundle the signatures method cannot run on, naming why.

    Raises:
        ConfigError: no basis task :data:`REFERENCE_TASK`, or a task without a signature.
    """
    if not has_reference_task(bundle.tasks):
        raise ConfigError(
            f"{bundle.path}: task signatures are measured with basis task {REFERENCE_TASK}, "
            "which is not installed"
        )
    unsigned = [info.name for info in bundle.tasks if bundle.task_signature(info.index) is None]
    if unsigned:
        raise ConfigError(
            f"{bundle.path}: {len(unsigned)} task(s) store no signature ({', '.join(unsigned[:5])}"
            f"{', ...' if len(unsigned) > 5 else ''}); pack the run again to add them"
        )


def has_signatures(bundle: Bundle) -> bool:
    """Whether the signatures method can run on this bundle."""
    try:
        check_signatures(bundle)
    except ConfigError:
        return False
    return True


TASK_INFERENCE_METHODS: dict[str, type[InferenceMethod]] = {
    method.name: method
    for method in (
        ClassSetMethod,
        SignatureMethod,
        StatisticsMethod,
        InformationMethod,
        OneShotMethod,
    )
}
METHODS = ("auto", *TASK_INFERENCE_METHODS)
"""The names a user may choose: every registered method, and ``auto``."""


def resolve_method(bundle: Bundle, method: str) -> type[InferenceMethod]:
    """The method class for ``method`` on ``bundle``.

    ``auto`` is classes when :func:`~supsup_deploy.task_signatures.class_sets_tell_tasks_apart`
    (every task has its own class set, and every class is known to at least two basis tasks);
    otherwise signatures when every task stores one; otherwise statistics when the bundle's norm
    layers keep per-task statistics, else information.

    Raises:
        ConfigError: an unknown name, or a method the bundle cannot run.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown task-inference method {method!r}: {', '.join(METHODS)}")
    has_statistics = bundle.config.norm == "batch"
    if method == "auto" and class_sets_tell_tasks_apart(bundle.tasks):
        method = ClassSetMethod.name
    elif method == "auto" and has_signatures(bundle):
        method = SignatureMethod.name
    elif method == "auto":
        method = "statistics" if has_statistics else "information"
    chosen = TASK_INFERENCE_METHODS[method]
    if chosen.needs_task_statistics and not has_statistics:
        raise ConfigError(
            f"{bundle.path}: its {bundle.config.norm} norm keeps no per-task statistics; "
            "use --task-inference information or oneshot"
        )
    return chosen


@torch.no_grad()
def statistics_divergence(model: torch.nn.Module, images: torch.Tensor) -> float:
    """How far a batch's statistics are from the ones its task stored, under that task's weights.

    Args:
        model: an eval-mode model running one task (its norm layers hold the task's statistics).
        images: normalised images of one batch (at least 2).

    Returns:
        The mean over norm layers and channels of ``KL(N(m, v + eps) || N(mu, var + eps))``,
        where ``m, v`` are the batch's per-channel mean and variance at the layer's input and
        ``mu, var`` the stored running statistics; 0 when they agree.
    """
    divergences: list[torch.Tensor] = []

    def measure(module: TaskBatchNorm2d, inputs: tuple[torch.Tensor, ...], _output) -> None:
        batch_var, batch_mean = torch.var_mean(inputs[0], dim=(0, 2, 3), unbiased=False)
        batch_var = batch_var.double() + module.eps
        var = module.running_var[module.task].double() + module.eps
        mean = module.running_mean[module.task].double()
        divergences.append(gaussian_divergence(batch_mean.double(), batch_var, mean, var).mean())

    norms = task_norms(model)
    handles = [norm.register_forward_hook(measure) for norm in norms]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return float(torch.stack(divergences).mean())


@torch.no_grad()
def prediction_information(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Mutual information between a batch's images and a model's predicted class, in nats.

    ``H(mean prediction) - mean H(prediction)``: high when every image is predicted confidently
    and the batch spreads over the classes.
    """
    logits = model(images).double()
    probabilities = logits.softmax(dim=1)
    mean_entropy = -(probabilities * logits.log_softmax(dim=1)).sum(dim=1).mean()
    marginal = probabilities.mean(dim=0)
    marginal_entropy = -(marginal * marginal.clamp_min(1e-300).log()).sum()
    return float(marginal_entropy - mean_entropy)
