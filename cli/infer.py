"""``supsup infer``: argument parsing and printing only (prediction lives in
:mod:`supsup_deploy.predictor`, ``--task auto`` in :mod:`._task_auto`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._choices import Runtime, TaskInferenceMethod
from ._common import (
    DEFAULT_BUNDLE,
    DEVICE_HELP,
    is_bundle_or_run,
    one_line_errors,
    open_bundle,
    path_option,
    print_json,
    use_device,
)
from ._task_auto import (
    guess_summary,
    guess_task,
    print_task_inference_accuracy,
    task_inferrer,
    unsure_line,
)


@one_line_errors
def infer_command(
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help=f"Image files or folders (PNG, JPEG, ...), optionally preceded by the bundle "
            f"folder (default {DEFAULT_BUNDLE}).",
            show_default=False,
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="Required: task id or name, or auto to infer it from the batch."),
    ] = None,
    task_inference: Annotated[
        TaskInferenceMethod,
        typer.Option(
            help="With --task auto: classes (the class set the batch covers, scored by the "
            "basis tasks), signatures (the batch's mean features against each task's stored "
            "signature), statistics (batch statistics against each task's norm statistics), "
            "information (confident and diverse predictions), oneshot (SupSup's entropy "
            "gradient) or auto (classes when class names tell the tasks apart, else signatures "
            "when every task stores one, else statistics for BatchNorm bundles, else "
            "information).",
        ),
    ] = "auto",
    shortlist: Annotated[
        int,
        typer.Option(
            help="statistics: with more tasks, rank them all at the first norm layer and run "
            "only this many in full (0: run every task)."
        ),
    ] = 5,
    oneshot_steps: Annotated[
        int, typer.Option(help="oneshot: forward and backward passes per batch.")
    ] = 3,
    dataset_split: Annotated[
        str | None,
        typer.Option(help="Instead of images: the task's images of this split (e.g. test)."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many dataset images.")
    ] = None,
    data_root: Annotated[
        str | None, typer.Option(help="Dataset folder for --dataset-split.")
    ] = None,
    runtime: Annotated[
        Runtime | None,
        typer.Option(
            help="torch (the default) or onnx (ONNX Runtime); --onnx FILE implies onnx.",
            show_default=False,
        ),
    ] = None,
    onnx: Annotated[
        Path | None,
        path_option(
            "An exported graph to run with ONNX Runtime (default with --runtime onnx: "
            "export the task on the fly); a shared graph (export --shared) runs the task from "
            "its adapter in DIR/tasks."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    hot_tasks: Annotated[
        int,
        typer.Option(
            help="With a shared graph: specialised sessions kept for the tasks asked for "
            "often (a task is specialised in the background from its second batch on; "
            "docs/SHARED_GRAPH.md). Without --onnx the shared graph is built in memory."
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print predictions as JSON.")] = False,
) -> None:
    """Predict classes for images with a task's model, in PyTorch or ONNX Runtime.

    Images are converted to the bundle's input format (channels, size, normalisation). With
    --dataset-split the task's images of that split are used and accuracy is reported.
    """
    paths = list(inputs or [])
    bundle_path = paths.pop(0) if paths and is_bundle_or_run(paths[0]) else DEFAULT_BUNDLE
    _check_infer_options(paths, task, dataset_split, onnx, runtime, batch_size)
    bundle = open_bundle(bundle_path)
    from supsup_deploy.predictor import Predictor

    runner = Predictor(
        bundle,
        runtime=runtime or ("onnx" if onnx is not None or hot_tasks else "torch"),
        device=use_device(device),
        onnx_path=onnx,
        hot_tasks=hot_tasks,
    )
    inference = {"method": task_inference, "steps": oneshot_steps, "shortlist": shortlist}
    if task == "auto" and dataset_split is not None:
        print_task_inference_accuracy(
            bundle,
            runner,
            as_json,
            split=dataset_split,
            batch_size=min(batch_size, 64),
            limit=limit,
            data_root=data_root,
            **inference,
        )
        return
    inferrer = task_inferrer(bundle, runner, **inference) if task == "auto" else None
    images, names, labels = _infer_inputs(bundle, paths, task, dataset_split, limit, data_root)
    guess = None
    if inferrer is not None:
        guess = guess_task(inferrer, images)
        task = str(guess.task)
    info = bundle.task(task)
    predictions = _predict_in_batches(runner, info.index, images, names, labels, batch_size)
    accuracy = None
    if labels is not None and predictions:
        accuracy = sum(p.class_index == p.label for p in predictions) / len(predictions)
    if as_json:
        print_json(
            {
                "runtime": runner.provider,
                "device": runner.device,
                "task": info.index,
                "task_guess": None if guess is None else guess_summary(guess),
                "accuracy": accuracy,
                "predictions": [p.to_dict() for p in predictions],
            }
        )
        return
    if guess is not None and guess.unsure:
        print(f"warning: {unsure_line(guess)}")
    _print_predictions(predictions, accuracy, runner)


def _check_infer_options(paths, task, dataset_split, onnx, runtime, batch_size) -> None:
    """Refuse option combinations ``infer`` cannot run, each with one line."""
    from supsup_deploy.errors import ConfigError

    if task is None:
        raise ConfigError("give --task ID or NAME, or --task auto to infer it from the images")
    if dataset_split is not None and paths:
        raise ConfigError(
            f"give image paths or --dataset-split, not both ({paths[0]} and --dataset-split "
            f"{dataset_split})"
        )
    if onnx is not None and runtime == "torch":
        raise ConfigError("--onnx runs a graph with ONNX Runtime: leave out --runtime torch")
    if onnx is not None and onnx.is_dir():
        raise ConfigError(
            f"--onnx {onnx}: is a folder; give a graph file (for a shared graph's folder: "
            f"--onnx {onnx / 'model.onnx'})"
        )
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")


def _predict_in_batches(runner, task: int, images, names, labels, batch_size: int) -> list:
    """The runner's predictions for every image, ``batch_size`` at a time, with progress."""
    from ._progress import progress_bar

    predictions = []
    with progress_bar(f"task {task}", len(images)) as advance:
        for start in range(0, len(images), batch_size):
            rows = slice(start, start + batch_size)
            predictions += runner.predict(
                task, images[rows], names[rows], None if labels is None else labels[rows]
            )
            advance(len(names[rows]))
    return predictions


def _print_predictions(predictions, accuracy, runner) -> None:
    """The first predictions (all up to 50), the accuracy when labelled, and the provider."""
    from rich.console import Console

    console = Console(markup=False)
    shown = predictions if len(predictions) <= 50 else predictions[:20]
    for prediction in shown:
        console.print(
            f"{prediction.input}: task {prediction.task} -> {prediction.class_index} "
            f"({prediction.class_name}), p={prediction.probability:.3f}"
        )
    if len(shown) < len(predictions):
        console.print(f"... {len(predictions) - len(shown)} more (use --json for all)")
    if accuracy is not None:
        console.print(f"accuracy on {len(predictions)} images: {accuracy:.4f}")
    console.print(f"ran on {runner.provider} (device {runner.device})")


def _infer_inputs(bundle, paths, task, dataset_split, limit, data_root):
    """Normalised images, their names and (for a dataset split) their labels."""
    from supsup_deploy.runtime import collect_image_paths, load_images
    from supsup_deploy.runtime import dataset_split as split_images

    if dataset_split is None:
        files = collect_image_paths(paths)
        return load_images(files, bundle), [str(path) for path in files], None
    images, labels = split_images(
        bundle, bundle.task(task).index, split=dataset_split, limit=limit, data_root=data_root
    )
    return images, [f"{dataset_split}[{row}]" for row in range(len(images))], labels
