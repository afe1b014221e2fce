"""The ``supsup`` entry point: parses arguments, imports the library lazily, prints results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli._common import one_line_errors, print_json, wide_console
from cli.reports import report_app, verify_command

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
    out: Annotated[Path, typer.Option(help="Run directory to write.")] = Path("artifacts/run"),
    dataset: Annotated[
        str, typer.Option(help="fashion-mnist (built in), cifar10 or cifar100.")
    ] = "fashion-mnist",
    data_root: Annotated[
        str | None,
        typer.Option(help="Folder with the dataset files (default: the system's copy or cache)."),
    ] = None,
    arch: Annotated[str, typer.Option(help="Architecture (see `supsup models`).")] = "gem_resnet18",
    width: Annotated[float, typer.Option(help="Channel width multiplier.")] = 1.0,
    protocol: Annotated[
        str, typer.Option(help="split (disjoint class groups) or random (random class subsets).")
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
        str, typer.Option(help="batch (per-task statistics) or group (statistic-free).")
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
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out (same settings), skipping done tasks.")
    ] = False,
    distributed: Annotated[
        str, typer.Option(help="Under torchrun: tasks (whole tasks per rank) or data (DDP).")
    ] = "tasks",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print per-task metrics as JSON.")
    ] = False,
) -> None:
    """Train basis masks (SupSup) and then alpha tasks over them on real data.

    The first --basis tasks are learned as edge-popup masks over the seeded random backbone;
    every later task learns only an alpha table over those masks. Writes run.json, one
    safetensors file per task and metrics.json/csv to --out. Run it under
    `torchrun --nproc-per-node N` to train with N processes.
    """
    import os

    from rich.console import Console

    from supsup_deploy.train import TrainConfig, collect_metrics, train_run

    config = TrainConfig(
        dataset=dataset,
        data_root=data_root,
        arch=arch,
        width=width,
        protocol=protocol,
        classes_per_task=classes_per_task,
        num_tasks=num_tasks,
        basis=basis,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        alpha_lr=alpha_lr,
        weight_decay=weight_decay,
        density=density,
        norm=norm,
        seed=seed,
        val_fraction=val_fraction,
        max_train_samples=max_train_samples,
        max_test_samples=max_test_samples,
    )
    is_main_rank = int(os.environ.get("RANK", "0")) == 0
    console = Console(stderr=True, quiet=not is_main_rank)
    from cli._progress import RichReporter, make_progress

    finished = len(collect_metrics(out, num_tasks)) if resume else 0
    with make_progress(console) as progress:
        reporter = RichReporter(progress, num_tasks, finished)
        results = train_run(
            config,
            out,
            resume=resume,
            device=device,
            distributed_mode=distributed,
            reporter=reporter,
        )
    if not is_main_rank:
        return
    if as_json:
        print_json(results)
        return
    print_metrics_table(results, title=f"{out}: {dataset}, {arch}, {protocol}")


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
    for kind in ("mask", "alpha"):
        accuracies = [row["test_accuracy"] for row in results if row["kind"] == kind]
        if accuracies:
            mean = sum(accuracies) / len(accuracies)
            console.print(
                f"mean test accuracy of {kind} tasks: {mean:.4f} ({len(accuracies)} tasks)"
            )


@app.command("pack")
@one_line_errors
def pack_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `supsup train`.")],
    out: Annotated[Path, typer.Option(help="Bundle folder to create.")] = Path("artifacts/bundle"),
    norm_dtype: Annotated[
        str, typer.Option(help="float32 or float16 for per-task normalisation statistics.")
    ] = "float32",
    mask_encoding: Annotated[
        str,
        typer.Option(
            help="packed (1 bit per weight), rice (near-entropy for sparse masks) or sparse "
            "(bitarray's sc_encode)."
        ),
    ] = "packed",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the bundle summary as JSON.")
    ] = False,
) -> None:
    """Pack a training run into a bundle: basis masks bit-packed, one small file per task.

    No weight is stored: the backbone is regenerated from the architecture and seed.
    """
    from supsup_deploy.pack import pack_run

    bundle = pack_run(run_dir, out, norm_dtype=norm_dtype, mask_encoding=mask_encoding)
    _print_bundle(bundle, as_json)


@app.command("inspect")
@one_line_errors
def inspect_command(
    bundle_path: Annotated[Path, typer.Argument(help="A bundle folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show a bundle's backbone, basis masks, tasks, bytes per component and integrity.

    Loading checks the format version, content hashes, names, shapes and dtypes of every file;
    any problem is reported as one line naming the file, with exit code 2.
    """
    from supsup_deploy.bundle import load_bundle

    _print_bundle(load_bundle(bundle_path), as_json)


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

    _print_bundle(add_task(bundle_path, task_file, lock_timeout=lock_timeout), as_json)


@app.command("export")
@one_line_errors
def export_command(
    bundle_path: Annotated[Path, typer.Argument(help="A bundle folder.")],
    task: Annotated[str | None, typer.Option(help="Task id or name to export.")] = None,
    onnx: Annotated[Path | None, typer.Option(help="Output .onnx file (with --task).")] = None,
    all_tasks: Annotated[bool, typer.Option("--all", help="Export every task.")] = False,
    out_dir: Annotated[
        Path, typer.Option(help="Folder for --all (one <name>.onnx per task).")
    ] = Path("artifacts/onnx"),
    fp16: Annotated[
        bool, typer.Option(help="Store weights in float16 (I/O stay float32).")
    ] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    exporter: Annotated[
        str, typer.Option(help="dynamo (the default PyTorch exporter) or legacy (TorchScript).")
    ] = "dynamo",
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
        typer.Option(help="With --task: write the task's adapter for a shared graph to this file."),
    ] = None,
    graph: Annotated[
        Path | None,
        typer.Option(
            help="With --adapter: the shared graph it is for (default: model.onnx in the folder "
            "above the adapter's)."
        ),
    ] = None,
) -> None:
    """Export task graphs to ONNX with the task's weights baked in, proving parity first.

    Each graph has a dynamic batch axis and metadata (task id and name, class names, basis hash,
    format version, input preprocessing). It passes onnx.checker's full check and must match the
    PyTorch model on a probe batch (real test images when the dataset is available) within
    1e-4 (fp32; 5e-2 for --fp16) with identical argmax, or nothing is written.
    """
    from supsup_deploy.bundle import load_bundle
    from supsup_deploy.errors import ConfigError
    from supsup_deploy.export import TaskExporter, probe_batch

    bundle = load_bundle(bundle_path)
    if shared or adapter is not None:
        _export_shared(bundle, shared, task, adapter, graph, out_dir, fp16, opset, as_json)
        return
    if all_tasks == (task is not None):
        raise ConfigError("give either --task ID (with --onnx FILE) or --all (with --out-dir)")
    targets = [(info.index, out_dir / f"{info.name}.onnx") for info in bundle.tasks]
    if task is not None:
        index = bundle.task(task).index
        targets = [(index, onnx or out_dir / f"{bundle.task(index).name}.onnx")]
    exporter_ = TaskExporter(bundle, opset=opset, exporter=exporter, fp16=fp16)
    probe, probe_name = probe_batch(bundle)
    reports = [
        exporter_.export(index, path, probe=probe, probe_name=probe_name).to_dict()
        for index, path in targets
    ]
    if as_json:
        print_json(reports)
        return
    for report in reports:
        print(
            f"task {report['task']} -> {report['path']}: parity ok, max |logit difference| "
            f"{report['max_abs_diff']:.2e} <= {report['tolerance']:g}, argmax equal, "
            f"{report['batch']} {report['probe']}, {report['provider']}"
        )


def _export_shared(bundle, shared, task, adapter, graph, out_dir, fp16, opset, as_json) -> None:
    """``export --shared`` and ``export --task NAME --adapter FILE``."""
    from supsup_deploy.errors import ConfigError
    from supsup_deploy.export import export_adapter, export_shared
    from supsup_deploy.shared_graph import MODEL_FILE

    if fp16:
        raise ConfigError("--fp16 applies to per-task graphs; the shared graph computes in float32")
    if shared:
        if task is not None or adapter is not None:
            raise ConfigError("--shared exports every task: leave out --task and --adapter")
        reports = export_shared(bundle, out_dir, opset=opset)
    else:
        if task is None:
            raise ConfigError("--adapter needs --task NAME (the task to write)")
        graph = graph or adapter.parent.parent / MODEL_FILE
        if not graph.is_file():
            raise ConfigError(f"{graph}: no shared graph there; give --graph DIR/{MODEL_FILE}")
        reports = [export_adapter(bundle, task, adapter, graph=graph)]
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
    bundle_path: Annotated[Path, typer.Argument(help="A bundle folder.")],
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Image files or folders (PNG, JPEG, ...).")
    ] = None,
    task: Annotated[
        str, typer.Option(help="Task id or name, or auto to infer it from the batch.")
    ] = "0",
    task_inference: Annotated[
        str,
        typer.Option(
            help="With --task auto: statistics (batch statistics against each task's stored "
            "norm statistics), information (confident and diverse predictions), oneshot "
            "(SupSup's entropy gradient, cost independent of the number of tasks) or auto "
            "(statistics for BatchNorm bundles, else information)."
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
    limit: Annotated[int | None, typer.Option(help="At most this many dataset images.")] = None,
    data_root: Annotated[
        str | None, typer.Option(help="Dataset folder for --dataset-split.")
    ] = None,
    runtime: Annotated[str, typer.Option(help="torch or onnx.")] = "torch",
    onnx: Annotated[
        Path | None,
        typer.Option(
            help="Exported graph to run (default: export on the fly); a shared graph "
            "(export --shared) runs the task from its adapter in DIR/tasks."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print predictions as JSON.")] = False,
) -> None:
    """Predict classes for images with a task's model, in PyTorch or ONNX Runtime.

    Images are converted to the bundle's input format (channels, size, normalisation). With
    --dataset-split the task's images of that split are used and accuracy is reported.
    """
    from supsup_deploy.bundle import load_bundle
    from supsup_deploy.errors import ConfigError
    from supsup_deploy.runtime import Runner, collect_image_paths, load_images
    from supsup_deploy.runtime import dataset_split as split_images

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    bundle = load_bundle(bundle_path)
    runner = Runner(bundle, runtime=runtime, device=device, onnx_path=onnx)
    if task == "auto":
        from supsup_deploy.task_inference import TaskInferrer, evaluate_task_inference

        if dataset_split is not None:
            summary = evaluate_task_inference(
                bundle,
                runner,
                split=dataset_split,
                batch_size=min(batch_size, 64),
                limit=limit,
                data_root=data_root,
                method=task_inference,
                steps=oneshot_steps,
                shortlist=shortlist,
            )
            summary["runtime"] = runner.provider
            if as_json:
                print_json(summary)
                return
            print(
                f"task inference ({summary['method']}, batches of {summary['batch_size']}): "
                f"{summary['task_inference_accuracy']:.4f}; accuracy with the inferred task "
                f"{summary['accuracy_inferred_task']:.4f}, with the true task "
                f"{summary['accuracy_true_task']:.4f} ({runner.provider})"
            )
            return
        inferrer = TaskInferrer(
            bundle, device=device, method=task_inference, steps=oneshot_steps, shortlist=shortlist
        )
        files = collect_image_paths(paths or [])
        if len(files) < 2:
            raise ConfigError("--task auto infers the task of a batch: give at least 2 images")
        guess = inferrer.infer(load_images(files, bundle))
        _print_task_guess(guess)
        task = str(guess.task)
    info = bundle.task(task)
    labels = None
    if dataset_split is not None:
        images, labels = split_images(
            bundle, info.index, split=dataset_split, limit=limit, data_root=data_root
        )
        names = [f"{dataset_split}[{row}]" for row in range(len(images))]
    else:
        files = collect_image_paths(paths or [])
        images, names = load_images(files, bundle), [str(path) for path in files]
    predictions = runner.predict(info.index, images, names, labels, batch_size)
    accuracy = None
    if labels is not None and predictions:
        accuracy = sum(p.class_index == p.label for p in predictions) / len(predictions)
    if as_json:
        print_json(
            {
                "runtime": runner.provider,
                "task": info.index,
                "accuracy": accuracy,
                "predictions": [p.to_dict() for p in predictions],
            }
        )
        return
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
    console.print(f"ran on {runner.provider}")


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
        f"{report['path']}  format {report['format_version']}, integrity "
        f"{report['integrity']}\n"
        f"backbone: {model['arch']} seed {model['seed']}, {report['masked_layers']} masked "
        f"layers, {report['masked_weights']:,} weights (regenerated, 0 bytes stored), "
        f"norm {model['norm']}\n"
        f"basis: {report['num_basis']} masks, {report['basis_file_bytes']:,} bytes "
        f"({report['basis_bits_per_weight']:.3f} bits per weight), "
        f"sha256 {report['basis_sha256'][:16]}"
    )
    table = Table(title=f"{len(report['tasks'])} tasks")
    for column in ("id", "name", "kind", "classes", "file bytes", "state bytes", "test acc"):
        table.add_column(column, justify="right" if "bytes" in column or column == "id" else "left")
    for task in report["tasks"]:
        accuracy = task.get("test_accuracy")
        table.add_row(
            str(task["index"]),
            task["name"],
            task["kind"],
            ", ".join(task["class_names"]),
            f"{task['file_bytes']:,}",
            f"{task['state_bytes']:,}",
            "" if accuracy is None else f"{accuracy:.4f}",
        )
    console.print(table)
    console.print(f"total bytes on disk: {report['total_bytes']:,}")


@app.command("demo")
@one_line_errors
def demo_command(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path(
        "artifacts/demo"
    ),
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """The main job in one command, on Fashion-MNIST with the default small model.

    Trains 3 basis masks and 2 alpha tasks (2 epochs, 1,500 training images per task), packs
    them into a bundle, exports an alpha task to ONNX with the parity check, predicts a few
    test images with the task given (PyTorch and ONNX Runtime) and inferred, and prints the
    accuracy table and the storage report. Running it again reuses what is finished.
    """
    from rich.console import Console

    from cli._progress import RichReporter, make_progress
    from supsup_deploy.demo import demo_config, run_demo

    console = Console(stderr=True)
    config = demo_config()
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
    console.print(f"ran on {given['torch']['provider']} and {given['onnx']['provider']}")
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
app.command("verify")(verify_command)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
