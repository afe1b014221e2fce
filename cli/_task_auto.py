"""``infer --task auto``: the task inferrer, its guess and what is printed about it."""

from __future__ import annotations

import typer

from ._common import print_json


def task_inferrer(bundle, runner, *, method: str, steps: int, shortlist: int):
    """``--task auto``: the task inferrer, built before any image is read (so a method the
    bundle cannot run fails first)."""
    from supsup_deploy.task_inference import TaskInferrer

    return TaskInferrer(
        bundle, device=runner.device, method=method, steps=steps, shortlist=shortlist
    )


def guess_task(inferrer, images):
    """The inferred task of the whole batch, printed with its margin on stderr."""
    from supsup_deploy.errors import ConfigError

    if len(images) < 2:
        raise ConfigError("--task auto infers the task of a batch: give at least 2 images")
    guess = inferrer.infer(images)
    print_task_guess(guess)
    return guess


def guess_summary(guess) -> dict:
    """``--task auto`` in ``--json``: the guess, its runner-up and whether it is unsure."""
    return {
        "method": guess.method,
        "task": guess.task,
        "runner_up": guess.runner_up,
        "margin": guess.margin,
        "relative_margin": guess.relative_margin,
        "images": guess.images,
        "unsure": guess.unsure,
        "mixed": guess.mixed,
    }


def unsure_line(guess) -> str:
    """What an unsure guess means for the predictions, and what to do."""
    from supsup_deploy.task_inference import SURE_IMAGES

    return (
        f"task auto is unsure: task {guess.task} beat task {guess.runner_up} by "
        f"{guess.relative_margin:.1%} of its score on {guess.images} images; the predictions "
        "may use the wrong task (their probabilities do not say so): give --task, or at least "
        f"{SURE_IMAGES} images of one task"
    )


def print_task_inference_accuracy(bundle, runner, as_json: bool, **settings) -> None:
    """``--task auto --dataset-split``: task-inference accuracy over every task's images."""
    from supsup_deploy.task_inference import evaluate_task_inference

    from ._progress import progress_bar

    with progress_bar("task inference over every task's images", None):
        summary = evaluate_task_inference(bundle, runner, **settings)
    summary["runtime"] = runner.provider
    summary["device"] = runner.device
    if as_json:
        print_json(summary)
        return
    print(
        f"task inference ({summary['method']}, batches of {summary['batch_size']}): "
        f"{summary['task_inference_accuracy']:.4f}; accuracy with the inferred task "
        f"{summary['accuracy_inferred_task']:.4f}, with the true task "
        f"{summary['accuracy_true_task']:.4f} ({runner.provider}, device {runner.device})"
    )


def print_task_guess(guess) -> None:
    """The inferred task, its margin over the runner-up and any mixed-batch warning (stderr)."""
    line = f"task auto ({guess.method}): task {guess.task}, score {guess.scores[guess.task]:.4g}"
    if guess.runner_up is not None:
        line += f"; runner-up task {guess.runner_up}, margin {guess.margin:.4g} (lower wins)"
    typer.echo(line, err=True)
    if guess.mixed:
        first, second = guess.half_tasks
        typer.echo(
            f"warning: the batch looks mixed (its first half looks like task {first}, its second "
            f"like task {second}); one task for every image is wrong for some: infer each "
            "task's images separately",
            err=True,
        )
