"""The ``supsup`` entry point: parses arguments, imports the library lazily, prints results."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated

import typer

from ._choices import (
    Dataset,
    DistributedMode,
    Exporter,
    FloatDtype,
    MaskEncoding,
    Norm,
    Protocol,
    Runtime,
    TaskInferenceMethod,
)
from ._common import (
    DEFAULT_BUNDLE,
    DEFAULT_ONNX,
    DEFAULT_RUN,
    DEVICE_HELP,
    adapter_graph,
    is_bundle_or_run,
    not_an_option,
    one_line_errors,
    open_bundle,
    print_error,
    print_json,
    use_device,
    wide_console,
)
from .learn import learn_command
from .reports import report_app
from .verify import verify_command

app = typer.Typer(
    help="Train, pack, materialise, export and verify supermask continual-learning models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        from supsup_deploy import __version__

        print(f"supsup-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show version."),
    ] = False,
) -> None:
    """Supermask continual learning you can ship."""


@app.command("models")
@one_line_errors
def models_command(
    family: Annotated[str | None, typer.Option(help="Only this architecture family.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the registered architectures with their masked-layer, weight and norm counts.

    Counts are for each architecture's default configuration and are computed without
    allocating any weights.
    """
    from supsup_deploy.models import get_model_entry, list_models

    rows = []
    for name in list_models(family):
        entry = get_model_entry(name)
        summary = entry.summary.to_dict()
        summary["torchvision_name"] = entry.torchvision_name
        summary["description"] = entry.description
        rows.append(summary)
    if as_json:
        print_json(rows)
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title="Registered architectures (default configuration)")
    for column in ("name", "stem", "classes", "masked layers", "masked weights", "norm channels"):
        is_text = column in ("name", "stem")
        table.add_column(column, justify="left" if is_text else "right", no_wrap=is_text)
    for row in rows:
        config = row["config"]
        table.add_row(
            row["arch"],
            config["stem"],
            str(config["num_classes"]),
            str(row["masked_layers"]),
            f"{row['masked_weights']:,}",
            f"{row['norm_channels']:,}",
        )
    Console(markup=False).print(table)


@app.command("train")
@one_line_errors
def train_command(
    context: typer.Context,
    out: Annotated[
        Path, typer.Option(help="Run directory to write.", callback=not_an_option)
    ] = DEFAULT_RUN,
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
    stored = read_run_record(out)["config"]
    changed = [name for name in names if name in given and settings[name] != stored.get(name)]
    if changed:
        differences = ", ".join(
            f"--{name.replace('_', '-')} {settings[name]} (run.json: {stored.get(name)})"
            for name in changed
        )
        raise ConfigError(
            f"cannot resume {out} with different settings: {differences}; leave these flags "
            "out to resume with the recorded ones"
        )
    return TrainConfig(**{name: stored[name] for name in names if name in stored})


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


BundleArgument = Annotated[
    Path, typer.Argument(help="A bundle folder (made by `supsup pack`).", show_default=True)
]


@app.command("pack")
@one_line_errors
def pack_command(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory written by `supsup train`.")
    ] = DEFAULT_RUN,
    out: Annotated[
        Path, typer.Option(help="Bundle folder to create.", callback=not_an_option)
    ] = DEFAULT_BUNDLE,
    norm_dtype: Annotated[
        FloatDtype,
        typer.Option(
            help="Precision of the per-task normalisation statistics.",
        ),
    ] = "float32",
    alpha_dtype: Annotated[
        FloatDtype,
        typer.Option(help="Precision of the alpha tasks' coefficient tables."),
    ] = "float32",
    mask_encoding: Annotated[
        MaskEncoding,
        typer.Option(
            help="packed (1 bit per weight), rice (near-entropy for sparse masks) or sparse "
            "(bitarray's sc_encode).",
        ),
    ] = "packed",
    force: Annotated[
        bool, typer.Option(help="Replace an existing bundle at --out (never another folder).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the bundle summary as JSON.")
    ] = False,
) -> None:
    """Pack a training run into a bundle: basis masks bit-packed, one small file per task.

    No weight is stored: the backbone is regenerated from the architecture and seed.
    """
    from supsup_deploy.pack import pack_run

    bundle = pack_run(
        run_dir,
        out,
        norm_dtype=norm_dtype,
        alpha_dtype=alpha_dtype,
        mask_encoding=mask_encoding,
        force=force,
    )
    _print_bundle(bundle, as_json)


@app.command("inspect")
@one_line_errors
def inspect_command(
    bundle_path: BundleArgument = DEFAULT_BUNDLE,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show a bundle's backbone, basis masks, tasks, bytes per component and what was checked.

    Loading checks the format version, content hashes, names, shapes and dtypes of every file;
    any problem is reported as one line naming the file, with exit code 2.
    """
    _print_bundle(open_bundle(bundle_path), as_json)


@app.command("add-task")
@one_line_errors
def add_task_command(
    bundle_path: Annotated[Path, typer.Argument(help="A bundle folder.")],
    task_file: Annotated[Path, typer.Argument(help="A task file made for this bundle's basis.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the bundle summary as JSON.")
    ] = False,
    lock_timeout: Annotated[
        float,
        typer.Option(
            "--lock-timeout",
            min=0.0,
            help="Seconds to wait while another process is adding a task to the bundle.",
        ),
    ] = 30.0,
) -> None:
    """Install a shipped task file into a bundle (checked against its basis, never overwriting)."""
    from supsup_deploy.pack import add_task

    open_bundle(bundle_path)
    _print_bundle(add_task(bundle_path, task_file, lock_timeout=lock_timeout), as_json)


@app.command("export")
@one_line_errors
def export_command(
    bundle_path: BundleArgument = DEFAULT_BUNDLE,
    task: Annotated[str | None, typer.Option(help="Task id or name to export.")] = None,
    all_tasks: Annotated[bool, typer.Option("--all", help="Export every task.")] = False,
    onnx: Annotated[
        bool,
        typer.Option("--onnx", help="Write ONNX graphs (the only format, so also the default)."),
    ] = True,
    out: Annotated[
        Path | None,
        typer.Option(
            help=f"With --task: the .onnx file (default {DEFAULT_ONNX}/<task name>.onnx); with "
            f"--all: the folder for one <task name>.onnx per task (default {DEFAULT_ONNX}).",
            callback=not_an_option,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="Replace an existing file even if supsup-deploy did not write it."),
    ] = False,
    fp16: Annotated[
        bool, typer.Option(help="Store weights in float16 (I/O stay float32).")
    ] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    exporter: Annotated[
        Exporter,
        typer.Option(
            help="dynamo (the default PyTorch exporter) or legacy (TorchScript).",
        ),
    ] = "dynamo",
    device: Annotated[
        str, typer.Option(help="Where the parity check runs: " + DEVICE_HELP)
    ] = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the parity figures as JSON.")
    ] = False,
    shared: Annotated[
        bool,
        typer.Option(
            "--shared",
            help="Instead: one graph for every task, OUT_DIR/model.onnx, and one ONNX Runtime "
            "adapter per task, OUT_DIR/tasks/<name>.onnx_adapter (see docs/SHARED_GRAPH.md).",
        ),
    ] = False,
    adapter: Annotated[
        Path | None,
        typer.Option(
            help="With --task: write the task's adapter for a shared graph to this file.",
            callback=not_an_option,
        ),
    ] = None,
    graph: Annotated[
        Path | None,
        typer.Option(
            help="With --adapter: the shared graph it is for (default: model.onnx in the folder "
            "above the adapter's).",
            callback=not_an_option,
        ),
    ] = None,
) -> None:
    """Export task graphs to ONNX with the task's weights baked in, proving parity first.

    Each graph has a dynamic batch axis and metadata (task id and name, class names, basis hash,
    format version, input preprocessing). It passes onnx.checker's full check and must match the
    PyTorch model on a probe batch (real test images when the dataset is available) within
    1e-4 (fp32; 5e-2 for --fp16) with identical argmax, or nothing is written. An existing file
    is replaced only if supsup-deploy wrote it (or with --force).
    """
    from supsup_deploy.errors import ConfigError
    from supsup_deploy.onnx_graphs.export import TaskExporter
    from supsup_deploy.onnx_graphs.format import GRAPH
    from supsup_deploy.onnx_graphs.parity import probe_batch
    from supsup_deploy.outputs import FOLDER, check_output

    from ._progress import progress_bar

    if bundle_path.suffix == ".onnx":
        raise ConfigError(
            f"{bundle_path} is not a bundle: --onnx is a format flag now; give the output file "
            f"with --out {bundle_path}"
        )
    if shared or adapter is not None:
        folder = out or DEFAULT_ONNX / "shared"
        _export_shared(
            open_bundle(bundle_path),
            shared,
            task,
            adapter,
            graph,
            folder,
            fp16,
            opset,
            as_json,
            force,
        )
        return
    if all_tasks == (task is not None):
        raise ConfigError("give either --task ID (one graph) or --all (every task)")
    bundle = open_bundle(bundle_path)
    if all_tasks:
        folder = out or DEFAULT_ONNX
        check_output(folder, FOLDER)
        targets = [(info.index, folder / f"{info.name}.onnx") for info in bundle.tasks]
    else:
        info = bundle.task(task)
        targets = [(info.index, out or DEFAULT_ONNX / f"{info.name}.onnx")]
    for _, path in targets:
        check_output(path, GRAPH, force=force)
    device = use_device(device)
    exporter_ = TaskExporter(bundle, opset=opset, exporter=exporter, fp16=fp16, device=device)
    probe, probe_name = probe_batch(bundle)
    reports = []
    with progress_bar("export", len(targets)) as advance:
        for index, path in targets:
            report = exporter_.export(index, path, probe=probe, probe_name=probe_name, force=force)
            reports.append({**report.to_dict(), "device": device})
            advance(1)
    if as_json:
        print_json(reports)
        return
    for report in reports:
        print(
            f"task {report['task']} -> {report['path']}: parity ok, max |logit difference| "
            f"{report['max_abs_diff']:.2e} <= {report['tolerance']:g}, argmax equal, "
            f"{report['batch']} {report['probe']}, {report['provider']} ({report['device']})"
        )


def _export_shared(
    bundle, shared, task, adapter, graph, out_dir, fp16, opset, as_json, force
) -> None:
    """``export --shared`` and ``export --task NAME --adapter FILE``."""
    from supsup_deploy.errors import ConfigError
    from supsup_deploy.onnx_graphs.export import export_adapter, export_shared
    from supsup_deploy.onnx_graphs.targets import export_target

    target = export_target("shared" if shared else "adapter")
    target.validate(precision="float16" if fp16 else "float32")
    if shared:
        if task is not None or adapter is not None:
            raise ConfigError("--shared exports every task: leave out --task and --adapter")
        reports = export_shared(bundle, out_dir, opset=opset, force=force)
    else:
        if task is None:
            raise ConfigError("--adapter needs --task NAME (the task to write)")
        graph = adapter_graph(adapter, graph, force=force)
        reports = [export_adapter(bundle, task, adapter, graph=graph, force=force)]
    if as_json:
        print_json([report.to_dict() for report in reports])
        return
    print(f"shared graph: {reports[0].path}")
    for report in reports:
        print(
            f"task {report.task} -> {report.adapter}: parity ok, max |logit difference| "
            f"{report.max_abs_diff_inputs:.2e} fed, {report.max_abs_diff_adapter:.2e} as adapter "
            f"<= {report.tolerance:g}, argmax equal, {report.batch} {report.probe}, "
            f"{report.provider}"
        )


@app.command("infer")
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
            help="With --task auto: statistics (batch statistics against each task's stored "
            "norm statistics), information (confident and diverse predictions), oneshot "
            "(SupSup's entropy gradient, cost independent of the number of tasks) or auto "
            "(statistics for BatchNorm bundles, else information).",
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
        typer.Option(
            help="An exported graph to run with ONNX Runtime (default with --runtime onnx: "
            "export the task on the fly); a shared graph (export --shared) runs the task from "
            "its adapter in DIR/tasks.",
            callback=not_an_option,
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
        _print_task_inference_accuracy(
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
    inferrer = _task_inferrer(bundle, runner, **inference) if task == "auto" else None
    images, names, labels = _infer_inputs(bundle, paths, task, dataset_split, limit, data_root)
    guess = None
    if inferrer is not None:
        guess = _guess_task(inferrer, images)
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
                "task_guess": None if guess is None else _guess_summary(guess),
                "accuracy": accuracy,
                "predictions": [p.to_dict() for p in predictions],
            }
        )
        return
    if guess is not None and guess.unsure:
        print(f"warning: {_unsure_line(guess)}")
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


def _task_inferrer(bundle, runner, *, method: str, steps: int, shortlist: int):
    """``--task auto``: the task inferrer, built before any image is read (so a method the
    bundle cannot run fails first)."""
    from supsup_deploy.task_inference import TaskInferrer

    return TaskInferrer(
        bundle, device=runner.device, method=method, steps=steps, shortlist=shortlist
    )


def _guess_task(inferrer, images):
    """The inferred task of the whole batch, printed with its margin on stderr."""
    from supsup_deploy.errors import ConfigError

    if len(images) < 2:
        raise ConfigError("--task auto infers the task of a batch: give at least 2 images")
    guess = inferrer.infer(images)
    _print_task_guess(guess)
    return guess


def _guess_summary(guess) -> dict:
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


def _unsure_line(guess) -> str:
    """What an unsure guess means for the predictions, and what to do."""
    from supsup_deploy.task_inference import SURE_IMAGES

    return (
        f"task auto is unsure: task {guess.task} beat task {guess.runner_up} by "
        f"{guess.relative_margin:.1%} of its score on {guess.images} images; the predictions "
        "may use the wrong task (their probabilities do not say so): give --task, or at least "
        f"{SURE_IMAGES} images of one task"
    )


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


def _print_task_inference_accuracy(bundle, runner, as_json: bool, **settings) -> None:
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


def _print_task_guess(guess) -> None:
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


def _print_bundle(bundle, as_json: bool) -> None:
    from supsup_deploy.report import bundle_report

    report = bundle_report(bundle)
    if as_json:
        print_json(report)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(markup=False)
    model = report["model"]
    console.print(
        f"{report['path']}  format {report['format_version']}, checked "
        f"{report['checked']}\n"
        f"backbone: {model['arch']} seed {model['seed']}, {report['masked_layers']} masked "
        f"layers, {report['masked_weights']:,} weights (regenerated, 0 bytes stored), "
        f"norm {model['norm']}\n"
        f"basis: {report['num_basis']} masks at density {report['basis_density']:.3f}, "
        f"{report['mask_encoding']} encoding, {report['basis_file_bytes']:,} bytes "
        f"({report['basis_bits_per_weight']:.3f} bits per weight), "
        f"sha256 {report['basis_sha256'][:16]}"
    )
    table = Table(title=f"{len(report['tasks'])} tasks")
    columns = (
        "id",
        "name",
        "kind",
        "classes",
        "alpha/norm",
        "file bytes",
        "state bytes",
        "test acc",
    )
    for column in columns:
        table.add_column(column, justify="right" if "bytes" in column or column == "id" else "left")
    for task in report["tasks"]:
        accuracy = task.get("test_accuracy")
        table.add_row(
            str(task["index"]),
            task["name"],
            task["kind"],
            ", ".join(task["class_names"]),
            "/".join(filter(None, (task["alpha_dtype"], task["norm_dtype"]))),
            f"{task['file_bytes']:,}",
            f"{task['state_bytes']:,}",
            "" if accuracy is None else f"{accuracy:.4f}",
        )
    console.print(table)
    console.print(f"total bytes on disk: {report['total_bytes']:,}")


@app.command("demo")
@one_line_errors
def demo_command(
    out: Annotated[
        Path,
        typer.Option(help="Folder for everything the demo writes.", callback=not_an_option),
    ] = Path("artifacts/demo"),
    device: Annotated[
        str, typer.Option(help="Where to train, check the export and infer: " + DEVICE_HELP)
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """The main job in one command, on Fashion-MNIST with the default small model.

    Trains 3 basis masks and 2 alpha tasks (2 epochs, 1,500 training images per task), packs
    them into a bundle, exports an alpha task to ONNX with the parity check, predicts a few
    test images with the task given (PyTorch and ONNX Runtime) and inferred, and prints the
    accuracy table and the storage report. Running it again reuses what is finished. The last
    lines say how to point the other commands at its bundle.
    """
    from rich.console import Console

    from supsup_deploy.demo import demo_config, run_demo

    from ._progress import RichReporter, make_progress

    console = Console(stderr=True)
    config = demo_config()
    device = use_device(device)
    with make_progress(console) as progress:
        reporter = RichReporter(progress, config.num_tasks, 0)
        summary = run_demo(
            out,
            device=device,
            reporter=reporter,
            step=lambda name: progress.console.print(f"step: {name}", markup=False),
        )
    if as_json:
        print_json(summary)
        return
    print_demo(summary)


def print_demo(summary: dict) -> None:
    """The demo's accuracy, parity, inference and storage tables."""
    from rich.table import Table

    from supsup_deploy.demo import DEMO_PREDICTIONS_SHOWN

    print_metrics_table(summary["metrics"], title="Accuracy per task (Fashion-MNIST test split)")
    console = wide_console()
    parity = summary["parity"]
    console.print(
        f"ONNX export of task {parity['task']}: {parity['path']}, max |logit difference| "
        f"{parity['max_abs_diff']:.2e} <= {parity['tolerance']:g} on {parity['batch']} "
        f"{parity['probe']}, argmax equal"
    )
    inference = summary["inference"]
    table = Table(title=f"Predictions for task {parity['task']} (task given, first images)")
    for column in ("image", "label", "torch", "onnx", "p (onnx)"):
        table.add_column(column)
    given = inference["task_given"]
    shown = zip(given["torch"]["predictions"], given["onnx"]["predictions"], strict=True)
    for torch_row, onnx_row in list(shown)[:DEMO_PREDICTIONS_SHOWN]:
        table.add_row(
            Path(torch_row["input"]).name,
            str(torch_row["label"]),
            f"{torch_row['class_index']} ({torch_row['class_name']})",
            f"{onnx_row['class_index']} ({onnx_row['class_name']})",
            f"{onnx_row['probability']:.3f}",
        )
    console.print(table)
    console.print(
        f"ran on {given['torch']['provider']} and {given['onnx']['provider']} "
        f"(device {summary['device']})"
    )
    table = Table(title=f"Task inferred from each task's images ({inference['method']})")
    for column in ("true task", "inferred task", "images"):
        table.add_column(column, justify="right")
    for row in inference["task_inferred"]:
        table.add_row(str(row["true_task"]), str(row["inferred_task"]), str(row["images"]))
    console.print(table)
    print_bundle_storage(summary["storage"])
    paths = summary["paths"]
    console.print(
        f"plots: {paths['accuracy_plot']} (accuracy per task), {paths['storage_plot']} "
        f"(storage vs tasks); summary: {paths['summary']}"
    )
    task_images = Path(paths["images"]) / Path(parity["path"]).stem
    console.print(
        f"the other commands take the bundle's folder first: supsup infer {paths['bundle']} "
        f"--task {parity['task']} {task_images} (or pack your own run into artifacts/bundle, "
        "where they look by default)"
    )
    seconds = summary["seconds"]
    console.print(
        "time: "
        + ", ".join(f"{name} {value:.1f}s" for name, value in seconds.items())
        + f"; total {sum(seconds.values()):.1f}s"
    )


def print_bundle_storage(storage: dict) -> None:
    """Bytes per task under every scheme for the bundle's configuration, and its files."""
    from rich.table import Table

    from supsup_deploy.report import SCHEME_LABELS, SCHEMES

    row = storage["row"]
    table = Table(
        title=f"Storage for this bundle's {row['arch']} ({row['masked_weights']:,} weights)"
    )
    for column in (
        "scheme",
        "bytes per task",
        "shared bytes",
        f"total, {len(storage['bundle']['tasks'])} tasks",
    ):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    for scheme in SCHEMES:
        table.add_row(
            SCHEME_LABELS[scheme],
            f"{row['per_task_bytes'][scheme]:,}",
            f"{row['shared_bytes'][scheme]:,}",
            f"{row['total_bytes'][scheme]:,}",
        )
    console = wide_console()
    console.print(table)
    console.print(
        f"per-task bytes include {row['norm_bytes_per_task']:,} bytes of normalisation statistics"
    )
    bundle = storage["bundle"]
    checks = storage["bytes_check"]
    exact = sum(check["ok"] for check in checks)
    task_bytes = ", ".join(f"{task['file_bytes']:,}" for task in bundle["tasks"])
    console.print(
        f"bundle on disk: {bundle['total_bytes']:,} bytes (basis {bundle['basis_file_bytes']:,}, "
        f"tasks {task_bytes}); {exact} of {len(checks)} components exactly as predicted"
    )


app.add_typer(report_app, name="report")
app.command("learn")(learn_command)
app.command("verify")(verify_command)


def main() -> None:
    """Console-script entry point: usage errors, like the package's own errors, are one line
    on stderr with exit code 2."""
    try:
        code = typer.main.get_command(app).main(prog_name="supsup", standalone_mode=False)
    except typer.TyperException as error:
        print_error(error.format_message())
        code = error.exit_code
    except typer.Abort:
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
