"""``supsup pack``, ``inspect`` and ``add-task``: the commands that make, show and extend a
bundle (argument parsing and printing only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._choices import AlphaDtype, FloatDtype, MaskEncoding
from ._common import (
    DEFAULT_BUNDLE,
    DEFAULT_RUN,
    BundleArgument,
    one_line_errors,
    open_bundle,
    path_option,
    print_json,
)


@one_line_errors
def pack_command(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory written by `supsup train`.")
    ] = DEFAULT_RUN,
    out: Annotated[Path, path_option("Bundle folder to create.")] = DEFAULT_BUNDLE,
    norm_dtype: Annotated[
        FloatDtype,
        typer.Option(
            help="Precision of the per-task normalisation statistics.",
        ),
    ] = "float32",
    alpha_dtype: Annotated[
        AlphaDtype | None,
        typer.Option(
            help="Precision of the alpha tasks' coefficient tables; int8 and int4 keep one "
            "scale per row (default: the run's `supsup train --alpha-dtype`, which its tables "
            "were trained for: int4 for a run with a pool, else float32).",
        ),
    ] = None,
    mask_encoding: Annotated[
        MaskEncoding,
        typer.Option(
            help="packed (1 bit per weight), rice (near-entropy for sparse masks) or sparse "
            "(bitarray's sc_encode).",
        ),
    ] = "packed",
    pool: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Store a calibration pool of this many training images per basis task "
            "(BatchNorm runs; the run's data must be at hand). Tasks learned into the bundle "
            "then store no statistics: a table under 1 KB. Default: the run's own pool "
            "(`supsup train --pool`), else none.",
        ),
    ] = None,
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
        pool=pool,
        force=force,
    )
    _print_bundle(bundle, as_json)


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
        + (
            f"\ncalibration pool: {report['pool_images']} images (statistics of tasks that "
            "store none)"
            if report["pool_images"]
            else ""
        )
    )
    table = Table(title=f"{len(report['tasks'])} tasks")
    columns = (
        "id",
        "name",
        "kind",
        "classes",
        "stored",
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
            _stored(task),
            f"{task['file_bytes']:,}",
            f"{task['state_bytes']:,}",
            "" if accuracy is None else f"{accuracy:.4f}",
        )
    console.print(table)
    console.print(f"total bytes on disk: {report['total_bytes']:,}")


def _stored(task: dict) -> str:
    """What a task's file holds: ``alpha dtype/norm dtype`` (``x2`` after the alpha dtype for two
    rows per layer, ``/pool`` when the statistics come from the calibration pool), and
    ``+signature`` when it stores one."""
    groups = task["alpha_groups"]
    alpha = task["alpha_dtype"] + (f"x{groups}" if groups > 1 else "")
    stored = "/".join(filter(None, (alpha, task["norm_dtype"] or task["statistics"])))
    return stored + ("+signature" if task["signature"] else "")
