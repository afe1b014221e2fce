"""``supsup verify``: argument parsing and printing only (the checks live in
:mod:`supsup_deploy.verify`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import (
    DEVICE_HELP,
    one_line_errors,
    open_bundle,
    path_option,
    print_json,
    use_device,
    wide_console,
)


@one_line_errors
def verify_command(
    arch: Annotated[
        str, typer.Option(help="An architecture name, or all (every registered one).")
    ] = "all",
    quick: Annotated[
        bool, typer.Option(help="Only a small subset (gem_resnet18, resnet18).")
    ] = False,
    bundle: Annotated[
        Path | None,
        path_option("Verify this bundle (from a trained run) instead, with accuracy parity."),
    ] = None,
    run: Annotated[
        Path | None,
        path_option("Pack this finished training run as the basis instead of random masks."),
    ] = None,
    work_dir: Annotated[
        Path | None,
        path_option("Keep bundles and ONNX graphs here (default: a temporary folder).", "--out"),
    ] = None,
    device: Annotated[
        str, typer.Option(help="Where the parity and accuracy checks run: " + DEVICE_HELP)
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check every architecture end to end: pack, load, materialise, export, parity, bytes.

    For each architecture: build a basis, pack, load, materialise, export ONNX (per-task graphs
    and the shared graph with its adapters), prove ONNX Runtime parity (the shared graph
    specialised to each task against its per-task graph too), and compare the bytes on disk
    with the storage report's prediction.

    Without --run the basis is 2 seeded random masks plus 2 alpha tasks, at 32x32 inputs. With
    --bundle (packed from a trained run) it also measures every task's test accuracy with PyTorch,
    with its per-task graph and with the shared graph, and requires identical predictions. Exits 1
    if any check fails.
    """
    import tempfile

    from supsup_deploy.errors import ConfigError
    from supsup_deploy.models import get_model_entry, list_models
    from supsup_deploy.verify import QUICK_ARCHS, verify_all, verify_bundle

    from ._progress import progress_bar

    if bundle is not None and run is not None:
        raise ConfigError("give --bundle or --run, not both")
    if bundle is not None:
        open_bundle(bundle)
        archs = [str(bundle)]
    elif quick:
        archs = list(QUICK_ARCHS)
    elif arch == "all":
        archs = list_models()
    else:
        archs = [get_model_entry(arch).name]
    if run is not None:
        archs = archs[:1]
    device = use_device(device)
    results = []

    def announce(arch: str, step: str) -> None:
        typer.echo(f"verify {arch}: {step}", err=True)

    with progress_bar("verify", len(archs)) as advance:
        for name in archs:
            if bundle is not None:
                with tempfile.TemporaryDirectory(prefix="supsup-verify-") as folder:
                    results.append(
                        verify_bundle(bundle, work_dir or folder, progress=announce, device=device)
                    )
            else:
                results += verify_all(
                    [name], run_dir=run, work_dir=work_dir, progress=announce, device=device
                )
            advance(1)
    if as_json:
        print_json([result.to_dict() for result in results])
    else:
        print_verify_table(results)
    if not all(result.ok for result in results):
        raise typer.Exit(1)


def print_verify_table(results) -> None:
    """One row per architecture, then per-task accuracies when measured."""
    from rich.table import Table

    console = wide_console()
    devices = ", ".join(sorted({result.device for result in results}))
    table = Table(title=f"supsup verify (device {devices})")
    columns = (
        "arch",
        "source",
        "layers",
        "weights",
        "tasks",
        "pack s",
        "export s",
        "max |diff|",
        "shared |diff|",
        "specialized |diff|",
        "bytes",
        "result",
    )
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("arch", "source", "result") else "right"
        )
    for result in results:
        seconds = result.seconds
        table.add_row(
            result.arch,
            result.source,
            str(result.masked_layers),
            f"{result.masked_weights:,}",
            str(result.tasks),
            f"{seconds.get('pack', seconds.get('load', 0.0)):.1f}",
            f"{seconds['export']:.1f}" if "export" in seconds else "-",
            f"{result.max_abs_diff:.1e}" if result.max_abs_diff is not None else "-",
            f"{result.shared_max_abs_diff:.1e}" if result.shared_max_abs_diff is not None else "-",
            f"{result.specialized_max_abs_diff:.1e}"
            if result.specialized_max_abs_diff is not None
            else "-",
            f"{result.bytes_checked} exact" if result.bytes_ok else "-",
            "ok" if result.ok else f"FAILED: {result.error}",
        )
    console.print(table)
    rows = [(result.arch, row) for result in results for row in result.accuracy]
    if rows:
        accuracy = Table(title="Accuracy parity (test split)")
        for column in ("arch", "task", "images", "torch", "onnx", "shared", "differing"):
            accuracy.add_column(column, justify="left" if column == "arch" else "right")
        for arch, row in rows:
            if "skipped" in row:
                accuracy.add_row(arch, row["name"], "-", "-", "-", "-", row["skipped"])
                continue
            accuracy.add_row(
                arch,
                row["name"],
                str(row["images"]),
                f"{row['torch_accuracy']:.4f}",
                f"{row['onnx_accuracy']:.4f}",
                f"{row['shared_accuracy']:.4f}",
                str(row["differing_predictions"] + row["shared_differing_predictions"]),
            )
        console.print(accuracy)
