"""Which task does a batch belong to? The class set the basis tasks see, matched norm statistics,
prediction information, or SupSup's one-shot entropy gradient.

Every method takes a batch of images from one task (the premise of task inference) and returns
the installed task it belongs to, with every task's score (lowest wins), the runner-up, the margin
between them and whether the batch looks mixed: each half of the batch (its first and its second
half, in the order given) is inferred on its own, and the batch is flagged mixed when the two
halves pick different tasks. A batch concatenated from two tasks' images is
caught; one interleaving them image by image gives two halves that look alike and is not.

``classes`` (the default when no two tasks have the same class set and every class of every task
is a class of at least two basis tasks, as when tasks draw overlapping subsets of one label set):
a batch from one task holds that task's whole class set, and no other task has the same set.
Every basis task scores the batch over its own classes; a class's log-probability for an image
is the mean over the basis tasks that know the class (by name), each image is shared out over
the known classes by a softmax of those means, and a task's score is minus the share of the batch
its classes take. The cost is one forward per basis task whatever the number of tasks, and it
reads no task's statistics, so it serves alpha tasks that store none. Classes no basis task
knows add nothing to a task's share, and tasks with the same class set get the same score:
``auto`` checks both.

``statistics`` (otherwise the default for BatchNorm bundles): run each task's network on the
batch, in eval mode, and compare the batch's own statistics at every norm layer's input with the
running statistics the task stored there. The score is the mean, over norm layers and channels,
of the Gaussian KL divergence
``KL(N(batch mean, batch var + eps) || N(running mean, running var + eps))``.
The per-task statistics that have no superposed form are the signal here, not an obstacle: a
task's statistics describe its own data under its own weights, and no other task's data matches
them through every layer. With more tasks than ``shortlist`` (default 5), every task is first
scored at the first norm layer alone, in closed form from ``|B|`` basis convolutions
(:mod:`supsup_deploy.stem_statistics`), and only the best ``shortlist`` run in full: the cost is
then ``|B|`` stem convolutions plus ``shortlist`` forwards, whatever the number of tasks.

``information`` (otherwise the default for statistic-free GroupNorm bundles): run each task and
score the mutual information between the batch's images and the predicted class,
``H(mean prediction) - mean H(prediction)``: the right task is confident on every image and
spreads the batch over its classes. Comparing it across tasks needs no reference, so the
classifier's temperature (each task's overall confidence) does not decide the winner, as it does
for plain entropy.

``oneshot``: SupSup's entropy gradient in alpha form, iterated a fixed number of times.
All tasks are put in superposition with weights ``beta`` (uniform at first): layer ``d`` uses the
alpha row ``sum_t beta_t * A_t[d]``, so one forward and backward over ``|B|``-term layers gives
``dH/dbeta_t = sum_d <dH/dalpha_d, A_t[d]>`` for every task at once, whatever the number of tasks
(``H``: the batch's mean prediction entropy). SupSup picks ``argmin_t dH/dbeta_t`` after one pass;
here ``steps`` passes (default 3, so the cost stays independent of the number of tasks) each move
``beta`` by an exponentiated-gradient step on the standardised gradient,
``beta <- softmax(log beta - step_size * (g - mean g) / std g)``, and the task with the largest
final ``beta`` wins. One pass reduces to SupSup's rule. Its two open problems, and what it does:

- per-task normalisation statistics have no superposed form: the superposed pass normalises
  with the batch's own statistics (the batch is one task's data). The mixture of the tasks'
  running statistics (mean ``sum_t beta_t mu_t``, variance ``sum_t beta_t (var_t + mu_t^2) -
  mean^2``) was measured too and is worse: it fits none of the mixed network's features;
- alpha's scale on the classifier acts as a temperature and biases the entropy comparison
  (and elsewhere sets a task's weight in the mixture): every task's alpha rows are scaled to
  unit L2 norm in the superposition.

Measured figures for every method are in ``bench/results/task_inference.json``
(``python -m bench.task_inference``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from supsup_deploy.bundles.reader import Bundle
from supsup_deploy.errors import ConfigError
from supsup_deploy.task_inference_methods import (
    DEFAULT_SHORTLIST,
    InferenceOptions,
    resolve_method,
)

UNSURE_MARGIN = 0.1
"""A guess is unsure when the runner-up's score is within this share of its own size of the
guess's score (a relative margin below 10%)."""
SURE_IMAGES = 32
"""A guess from fewer images is unsure whatever its margin: on a quick Fashion-MNIST run (README),
batches of 16 were wrong 1 time in 10, with margins up to 61%."""


@dataclass(frozen=True)
class TaskGuess:
    """The inferred task of one batch and how sure the guess is.

    Attributes:
        task: the guessed task id.
        scores: every installed task's score by task id (lowest wins; None: not run).
        method: the task-inference method that scored them.
        runner_up: the task id with the second-lowest score (None with a single candidate).
        margin: the runner-up's score minus the guess's (0 or more; None without a runner-up),
            in the method's score units.
        mixed: the batch's two halves guess different tasks: it probably holds images of more
            than one task, and one task for the whole batch is wrong for some of them.
        half_tasks: the tasks guessed for the first and the second half (empty when the mixed
            check did not run: it needs at least 4 images).
        images: the batch's size.
    """

    task: int
    scores: dict[int, float | None]
    method: str
    runner_up: int | None = None
    margin: float | None = None
    mixed: bool = False
    half_tasks: tuple[int, ...] = ()
    images: int = SURE_IMAGES

    @property
    def relative_margin(self) -> float | None:
        """The margin as a share of the runner-up's score's size (None without a runner-up)."""
        if self.runner_up is None or self.margin is None:
            return None
        return self.margin / max(abs(self.scores[self.runner_up]), 1e-12)

    @property
    def unsure(self) -> bool:
        """Whether the guess may well be wrong: there was a runner-up, and the guess came from
        fewer than :data:`SURE_IMAGES` images or the runner-up came close (:data:`UNSURE_MARGIN`).
        """
        if self.relative_margin is None:
            return False
        return self.relative_margin < UNSURE_MARGIN or self.images < SURE_IMAGES


class TaskInferrer:
    """Task inference over every task installed in a bundle.

    Args:
        bundle: a loaded bundle.
        device: where to run.
        method: a name in :data:`~supsup_deploy.task_inference_methods.METHODS`; ``"auto"``
            picks one (:func:`~supsup_deploy.task_inference_methods.resolve_method`).
        normalize_alpha: one-shot only: scale each task's alpha rows to unit norm.
        steps: one-shot only: forward and backward passes (each one updates ``beta``).
        step_size: one-shot only: exponentiated-gradient step on the standardised gradient.
        shortlist: statistics only: when more tasks are installed, score them all at the first
            norm layer from ``|B|`` basis convolutions (:mod:`supsup_deploy.stem_statistics`)
            and run only this many best ones in full; 0 runs every task.

    Example:
        >>> inferrer = TaskInferrer(load_bundle("artifacts/bundle"))
        >>> inferrer.infer(images).task
        3
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "cpu",
        method: str = "auto",
        normalize_alpha: bool = True,
        steps: int = 3,
        step_size: float = 1.0,
        shortlist: int = DEFAULT_SHORTLIST,
    ):
        if not bundle.tasks:
            raise ConfigError(f"{bundle.path}: no tasks installed")
        chosen = resolve_method(bundle, method)
        options = InferenceOptions(
            normalize_alpha=normalize_alpha, steps=steps, step_size=step_size, shortlist=shortlist
        )
        self.bundle = bundle
        self.device = device
        self.task_ids = [info.index for info in bundle.tasks]
        self.method = chosen.name
        self.scorer = chosen(bundle, device=device, options=options)

    def infer(self, images: torch.Tensor, *, check_mixed: bool = True) -> TaskGuess:
        """The task of a batch of normalised images (at least 2, from one task).

        Args:
            images: the batch, already in the bundle's input format.
            check_mixed: also infer the task of each half of the batch (4 images or more) and
                flag the batch mixed when the halves disagree; this costs about as much again
                as the guess.

        Returns:
            The guess, its runner-up and margin, and the mixed-batch flag.
        """
        if len(images) < 2:
            raise ConfigError(
                f"task inference needs a batch of at least 2 images, got {len(images)}"
            )
        images = images.to(self.device)
        scores = self._scores(images, range(len(self.task_ids)))
        ranked = sorted((score, at) for at, score in enumerate(scores) if score is not None)
        best_score, best = ranked[0]
        runner_up = margin = None
        if len(ranked) > 1:
            runner_up, margin = self.task_ids[ranked[1][1]], ranked[1][0] - best_score
        half_tasks: tuple[int, ...] = ()
        if check_mixed and len(images) >= 4:
            middle = len(images) // 2
            half_tasks = tuple(
                self.task_ids[_best(self._scores(half, range(len(self.task_ids))))]
                for half in (images[:middle], images[middle:])
            )
        return TaskGuess(
            task=self.task_ids[best],
            scores={task: scores[position] for position, task in enumerate(self.task_ids)},
            method=self.method,
            runner_up=runner_up,
            margin=margin,
            mixed=len(set(half_tasks)) > 1,
            half_tasks=half_tasks,
            images=len(images),
        )

    def _scores(self, images: torch.Tensor, candidates) -> list[float | None]:
        """Each task's score by position in ``task_ids`` (None: not run), among ``candidates``."""
        return self.scorer.scores(images, list(candidates))


def _best(scores: list[float | None]) -> int:
    """The position of the lowest score that was run."""
    return min((score, at) for at, score in enumerate(scores) if score is not None)[1]


def evaluate_task_inference(
    bundle: Bundle,
    runner,
    *,
    split: str = "test",
    batch_size: int = 64,
    limit: int | None = None,
    data_root: str | None = None,
    method: str = "auto",
    steps: int = 3,
    shortlist: int = DEFAULT_SHORTLIST,
) -> dict:
    """Task-inference accuracy over every task's labelled images, batch by batch.

    Args:
        bundle: a bundle packed from a training run (its dataset and task classes are recorded).
        runner: a :class:`supsup_deploy.runtime.Runner` for the predictions.
        split: dataset split.
        batch_size: images per inferred batch (each batch comes from one task).
        limit: at most this many images per task.
        data_root: dataset folder.
        method: task-inference method (see :class:`TaskInferrer`).
        steps: one-shot passes per batch.
        shortlist: tasks the statistics method runs in full (0: all).

    Returns:
        Task-inference accuracy, classification accuracy with the inferred and the true task, and
        the mean wall time of inferring one batch's task.
        With the inferred task a prediction counts as right when it names the image's dataset
        class: tasks that share classes (the random protocol) can be wrong about the task and
        right about the class.
    """
    from supsup_deploy.runtime import dataset_split

    inferrer = TaskInferrer(
        bundle, device=runner.device, method=method, steps=steps, shortlist=shortlist
    )
    classes = {info.index: info.metrics.get("classes") for info in bundle.tasks}
    rows = []
    inference_seconds = 0.0
    for info in bundle.tasks:
        images, labels = dataset_split(
            bundle, info.index, split=split, limit=limit, data_root=data_root
        )
        right = inferred_correct = true_correct = 0
        batches = _batch_slices(len(images), batch_size)
        for rows_of_batch in batches:
            batch, batch_labels = images[rows_of_batch], labels[rows_of_batch]
            started = time.perf_counter()
            guess = inferrer.infer(batch, check_mixed=False).task
            inference_seconds += time.perf_counter() - started
            right += guess == info.index
            true_hits = int((runner.logits(info.index, batch).argmax(1) == batch_labels).sum())
            true_correct += true_hits
            if guess == info.index:
                inferred_correct += true_hits
            else:
                predicted = _dataset_classes(runner.logits(guess, batch).argmax(1), classes[guess])
                truth = _dataset_classes(batch_labels, classes[info.index])
                inferred_correct += int((predicted == truth).sum())
        rows.append(
            {
                "task": info.index,
                "batches": len(batches),
                "task_inference_accuracy": right / max(len(batches), 1),
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
        **inferrer.scorer.settings(),
        "task_inference_accuracy": sum(r["task_inference_accuracy"] * r["batches"] for r in rows)
        / max(batches, 1),
        "accuracy_inferred_task": sum(r["accuracy_inferred_task"] * r["images"] for r in rows)
        / max(images, 1),
        "accuracy_true_task": sum(r["accuracy_true_task"] * r["images"] for r in rows)
        / max(images, 1),
        "seconds_per_batch": inference_seconds / max(batches, 1),
        "tasks": rows,
    }


def _batch_slices(count: int, batch_size: int) -> list[slice]:
    """Consecutive batches of ``batch_size`` rows; a last single row joins the batch before it."""
    starts = list(range(0, count, batch_size))
    if len(starts) > 1 and count - starts[-1] < 2:
        starts.pop()
    ends = [*starts[1:], count] if starts else []
    return [slice(start, end) for start, end in zip(starts, ends, strict=True)]


def _dataset_classes(labels: torch.Tensor, classes: list[int] | None) -> torch.Tensor:
    """Task labels as dataset class ids when the task recorded its classes, else unchanged."""
    return torch.tensor(classes)[labels] if classes else labels
