"""``supsup train``: argument parsing and printing only (the training lives in
:mod:`supsup_deploy.train`)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated

import typer

from ._choices import AlphaDtype, Dataset, DistributedMode, Norm, Protocol
from ._common import (
    DEFAULT_RUN,
    DEVICE_HELP,
    one_line_errors,
    path_option,
    print_json,
    use_device,
)


@one_line_errors
def train_command(
    context: typer.Context,
    out: Annotated[Path, path_option("Run directory to write.")] = DEFAULT_RUN,
    dataset: Annotated[
        Dataset,
        typer.Option(
            help="fashion-mnist is built in; cifar10/cifar100 read from --data-root.",
        ),
    ] = "fashion-mnist",
    data_root: Annotated[
        str | None,
        typer.Option(help="Folder with the dataset files (default: the system's copy or cache)."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Instead of --dataset: your image folder, one subfolder per class (optionally "
            "under train/, val/, test/; else validation and test are carved from it, seeded). "
            "Mean and std are computed from its training images.",
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(help="Draw the tasks from these class ids only, comma-separated (1,3,5)."),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="With --data: input size; images are resized (shorter side) and centre-cropped "
            "(default: their size when all are square and alike, else 32).",
        ),
    ] = None,
    test_fraction: Annotated[
        float, typer.Option(help="With --data and no test/: share of each class for testing.")
    ] = 0.1,
    arch: Annotated[str, typer.Option(help="Architecture (see `supsup models`).")] = "gem_resnet18",
    width: Annotated[float, typer.Option(help="Channel width multiplier.")] = 1.0,
    protocol: Annotated[
        Protocol,
        typer.Option(
            help="split (disjoint class groups) or random (random class subsets).",
        ),
    ] = "split",
    classes_per_task: Annotated[int, typer.Option(help="Classes in each task.")] = 2,
    num_tasks: Annotated[int, typer.Option(help="Number of tasks.")] = 5,
    basis: Annotated[
        int, typer.Option(help="Tasks trained as SupSup masks; later tasks are alpha tables.")
    ] = 3,
    epochs: Annotated[int, typer.Option(help="Epochs per task.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate of mask scores.")] = 1e-3,
    alpha_lr: Annotated[float, typer.Option(help="Adam learning rate of alpha tables.")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="Adam weight decay.")] = 1e-4,
    density: Annotated[
        str, typer.Option(help="Fraction of weights each mask keeps, or er:SCALE for the ER rule.")
    ] = "0.5",
    norm: Annotated[
        Norm,
        typer.Option(
            help="batch (per-task statistics) or group (statistic-free).",
        ),
    ] = "batch",
    pool: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Train the alpha tasks against a calibration pool of this many training images "
            "per basis task (BatchNorm): `supsup pack` stores the pool once in the basis and "
            "each alpha task as a table with no statistics, under 1 KB. Default: 32 for a "
            "BatchNorm run with alpha tasks, else 0. 0: none, each alpha task stores its own "
            "statistics (13 KB per task).",
        ),
    ] = None,
    alpha_groups: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Alpha rows per layer: each row mixes the basis masks for its own contiguous "
            "group of output channels (at most the narrowest layer's channels). Default: 2 "
            "with a pool, else 1.",
        ),
    ] = None,
    alpha_dtype: Annotated[
        AlphaDtype | None,
        typer.Option(
            help="How `supsup pack` stores the alpha tables; an int4 table is trained against "
            "its int4 form, int8 keeps one scale per row. Default: int4 with a pool, else "
            "float32.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of backbone, task split, data and init.")] = 0,
    val_fraction: Annotated[
        float, typer.Option(help="Share of training data held out for validation.")
    ] = 0.1,
    max_train_samples: Annotated[
        int | None, typer.Option(help="Cap on training samples per task (smoke runs).")
    ] = None,
    max_test_samples: Annotated[
        int | None, typer.Option(help="Cap on test samples per task.")
    ] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the run in --out with the settings its run.json records, skipping "
            "finished tasks (other training flags may be left out)."
        ),
    ] = False,
    distributed: Annotated[
        DistributedMode,
        typer.Option(
            help="Under torchrun: tasks (whole tasks per rank) or data (DDP).",
        ),
    ] = "tasks",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the device and per-task metrics as JSON.")
    ] = False,
) -> None:
    """Train basis masks (SupSup) and then alpha tasks over them on real data or your images.

    The first --basis tasks are learned as edge-popup masks over the seeded random backbone;
    every later task learns only an alpha table over those masks. Writes run.json, one
    safetensors file per task and metrics.json/csv to --out. Run it under
    `torchrun --nproc-per-node N -m supsup_deploy train ...` to train with N processes.
    Ctrl-C keeps the finished tasks and prints the command that resumes.
    """
    import os

    from rich.console import Console

    from supsup_deploy.runs import collect_metrics
    from supsup_deploy.train import train_run

    config = _train_config(context, out, resume)
    is_main_rank = int(os.environ.get("RANK", "0")) == 0
    console = Console(stderr=True, quiet=not is_main_rank)
    device = use_device(device)
    from ._progress import RichReporter, make_progress

    finished = len(collect_metrics(out, config.num_tasks)) if resume else 0
    try:
        with make_progress(console) as progress:
            reporter = RichReporter(progress, config.num_tasks, finished)
            results = train_run(
                config,
                out,
                resume=resume,
                device=device,
                distributed_mode=distributed,
                reporter=reporter,
            )
    except KeyboardInterrupt:
        if is_main_rank:
            print(_interrupted_message(out), file=sys.stderr)
        raise typer.Exit(130) from None
    if not is_main_rank:
        return
    if as_json:
        print_json({"device": device, "tasks": results})
        return
    print_metrics_table(
        results,
        title=f"{out}: {config.data or config.dataset}, {config.arch}, {config.protocol} "
        f"({device})",
    )


def _train_config(context: typer.Context, out: Path, resume: bool):
    """The run's settings: from the flags, or with --resume from the run's run.json (where a
    flag given on the command line must agree with it)."""
    from supsup_deploy.errors import ConfigError
    from supsup_deploy.runs import read_run_record
    from supsup_deploy.train_config import TrainConfig

    names = [field.name for field in dataclasses.fields(TrainConfig)]
    settings = {name: context.params[name] for name in names}
    given = {
        name
        for name in names
        if getattr(context.get_parameter_source(name), "name", None) == "COMMANDLINE"
    }
    if settings["data"] is not None and given & {"dataset", "data_root"}:
        raise ConfigError("--data FOLDER is the dataset: leave out --dataset and --data-root")
    if not (resume and (out / "run.json").is_file()):
        return TrainConfig(**settings)
    stored = TrainConfig.from_record(read_run_record(out)["config"])
    changed = [name for name in given if settings[name] != getattr(stored, name)]
    if changed:
        differences = ", ".join(
            f"--{name.replace('_', '-')} {settings[name]} (run.json: {getattr(stored, name)})"
            for name in changed
        )
        raise ConfigError(
            f"cannot resume {out} with different settings: {differences}; leave these flags "
            "out to resume with the recorded ones"
        )
    return stored


def _interrupted_message(out: Path) -> str:
    import shlex

    if (out / "run.json").is_file():
        return (
            f"interrupted; finished tasks are kept in {out}. Resume with: "
            f"supsup train --resume --out {shlex.quote(str(out))}"
        )
    return f"interrupted before {out}/run.json was written; nothing to resume: run it again"


def print_metrics_table(results: list[dict], *, title: str) -> None:
    """Per-task accuracies and bytes, with the mean test accuracy of each kind of task."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("task", "kind", "classes", "val acc", "test acc", "state bytes"):
        table.add_column(column, justify="left" if column in ("kind", "classes") else "right")
    for row in results:
        table.add_row(
            str(row["task"]),
            row["kind"],
            ", ".join(row["class_names"]),
            f"{row['val_accuracy']:.4f}",
            f"{row['test_accuracy']:.4f}",
            f"{row['state_bytes']:,}",
        )
    console = Console(markup=False)
    console.print(table)
    for kind in ("basis", "alpha"):
        accuracies = [row["test_accuracy"] for row in results if row["kind"] == kind]
        if accuracies:
            mean = sum(accuracies) / len(accuracies)
            console.print(
                f"mean test accuracy of {kind} tasks: {mean:.4f} ({len(accuracies)} tasks)"
            )
