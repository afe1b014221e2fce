"""``supsup demo``: the main job in one command (the steps live in :mod:`supsup_deploy.demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import (
    DEVICE_HELP,
    one_line_errors,
    path_option,
    print_json,
    use_device,
    wide_console,
)
from .train import print_metrics_table


@one_line_errors
def demo_command(
    out: Annotated[
        Path,
        path_option("Folder for everything the demo writes."),
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
    bundle = storage["bundle"]
    statistics = row["norm_bytes_per_task"]
    line = f"per-task bytes include {statistics:,} bytes of normalisation statistics"
    if bundle["pool_images"]:
        line += (
            f"; this bundle's alpha tasks store none: they get theirs from the calibration pool "
            f"of {bundle['pool_images']} images in its basis (files below)"
        )
    console.print(line)
    checks = storage["bytes_check"]
    exact = sum(check["ok"] for check in checks)
    task_bytes = ", ".join(f"{task['file_bytes']:,}" for task in bundle["tasks"])
    console.print(
        f"bundle on disk: {bundle['total_bytes']:,} bytes (basis {bundle['basis_file_bytes']:,}, "
        f"tasks {task_bytes}); {exact} of {len(checks)} components exactly as predicted"
    )
