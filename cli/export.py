"""``supsup export``: argument parsing and printing only (the export lives in
:mod:`supsup_deploy.onnx_graphs.export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._choices import Exporter
from ._common import (
    DEFAULT_BUNDLE,
    DEFAULT_ONNX,
    DEVICE_HELP,
    BundleArgument,
    adapter_graph,
    one_line_errors,
    open_bundle,
    path_option,
    print_json,
    use_device,
)


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
        path_option(
            f"With --task: the .onnx file (default {DEFAULT_ONNX}/<task name>.onnx); with "
            f"--all: the folder for one <task name>.onnx per task (default {DEFAULT_ONNX})."
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
        path_option("With --task: write the task's adapter for a shared graph to this file."),
    ] = None,
    graph: Annotated[
        Path | None,
        path_option(
            "With --adapter: the shared graph it is for (default: model.onnx in the folder "
            "above the adapter's)."
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
    targets = _graph_targets(bundle, task, out, force)
    device = use_device(device)
    options = {"opset": opset, "exporter": exporter, "fp16": fp16, "device": device}
    reports = _export_tasks(bundle, targets, options, force)
    if as_json:
        print_json(reports)
        return
    for report in reports:
        print(
            f"task {report['task']} -> {report['path']}: parity ok, max |logit difference| "
            f"{report['max_abs_diff']:.2e} <= {report['tolerance']:g}, argmax equal, "
            f"{report['batch']} {report['probe']}, {report['provider']} ({report['device']})"
        )


def _graph_targets(bundle, task, out, force) -> list:
    """Each task to export and its graph's path (every task with ``task`` None, into the folder
    ``out``), every path checked by the output rule before anything is exported."""
    from supsup_deploy.onnx_graphs.format import GRAPH
    from supsup_deploy.outputs import FOLDER, check_output

    if task is None:
        folder = out or DEFAULT_ONNX
        check_output(folder, FOLDER)
        targets = [(info.index, folder / f"{info.name}.onnx") for info in bundle.tasks]
    else:
        info = bundle.task(task)
        targets = [(info.index, out or DEFAULT_ONNX / f"{info.name}.onnx")]
    for _, path in targets:
        check_output(path, GRAPH, force=force)
    return targets


def _export_tasks(bundle, targets, options: dict, force: bool) -> list[dict]:
    """Export every target with one exporter (traced once), a progress bar, parity reports."""
    from supsup_deploy.onnx_graphs.export import TaskExporter
    from supsup_deploy.onnx_graphs.parity import probe_batch

    from ._progress import progress_bar

    exporter = TaskExporter(bundle, **options)
    probe, probe_name = probe_batch(bundle)
    reports = []
    with progress_bar("export", len(targets)) as advance:
        for index, path in targets:
            report = exporter.export(index, path, probe=probe, probe_name=probe_name, force=force)
            reports.append({**report.to_dict(), "device": options["device"]})
            advance(1)
    return reports


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
