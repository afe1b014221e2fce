"""``supsup report storage``: argument parsing and printing only."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._choices import FloatDtype, Stem
from ._common import one_line_errors, path_option, print_json, wide_console

report_app = typer.Typer(
    help="Reports computed from the registered architectures.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@report_app.command("storage")
@one_line_errors
def storage_command(
    arch: Annotated[
        list[str] | None,
        typer.Option(help="Only these architectures (repeat the option); default: all."),
    ] = None,
    basis: Annotated[int, typer.Option(help="Basis masks |B| (the poster used 15).")] = 15,
    num_tasks: Annotated[int, typer.Option(help="Tasks T for the totals.")] = 100,
    density: Annotated[
        float, typer.Option(help="Fraction of weights a SupSup mask keeps (sets the CSC size).")
    ] = 0.5,
    input_size: Annotated[
        int, typer.Option(help="Input height and width for the multiply-accumulate count.")
    ] = 224,
    num_classes: Annotated[
        int | None, typer.Option(help="Classifier outputs (default: each entry's standard).")
    ] = None,
    stem: Annotated[
        Stem | None, typer.Option(help="imagenet or cifar (default: each entry's standard).")
    ] = None,
    norm_dtype: Annotated[
        FloatDtype, typer.Option(help="float32 or float16 for the stored norm statistics.")
    ] = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print Markdown.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    plot: Annotated[
        Path | None,
        path_option("Write a PNG of total bytes vs number of tasks."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Replace an existing --plot file supsup-deploy did not write.")
    ] = False,
    plot_arch: Annotated[str, typer.Option(help="Architecture drawn by --plot.")] = "resnet50",
    bundle: Annotated[
        Path | None,
        path_option(
            "Report on this bundle: its architecture and settings (|B|, tasks, density, "
            "norm dtype, input size) instead of the options above, its bytes on disk marked in "
            "the table and plot."
        ),
    ] = None,
) -> None:
    """Bytes per task and for T tasks under every storage scheme, for every architecture.

    Schemes: a dense fine-tuned fp32 copy, a SupSup bitmask, SupSup's sparse CSC with int16
    indices at --density, and our alpha table (fp32, fp16) over |B| shared basis masks; every
    scheme also pays the task's normalisation statistics. Rows use each architecture's standard
    configuration (ImageNet stem, 1000 classes) and are checked against torchvision's counts.
    The poster's own table is printed beside ours with what each figure counts.
    """
    from supsup_deploy.errors import ConfigError
    from supsup_deploy.report import (
        StorageSettings,
        storage_csv,
        storage_markdown,
        storage_report,
    )

    if sum((as_json, markdown, as_csv)) > 1:
        raise ConfigError("choose one of --json, --markdown and --csv")
    if plot is not None:
        from supsup_deploy.outputs import PLOT, check_output

        check_output(plot, PLOT, force=force)
    settings = StorageSettings(
        num_basis=basis,
        num_tasks=num_tasks,
        density=density,
        norm_dtype=norm_dtype,
        input_size=input_size,
    )
    options = {
        key: value
        for key, value in (("num_classes", num_classes), ("stem", stem))
        if value is not None
    }
    rows, settings = _storage_rows(bundle, arch, settings, options, plot, plot_arch)
    if as_json:
        print_json(storage_report(rows, settings))
    elif as_csv:
        print(storage_csv(rows), end="")
    elif markdown:
        print(storage_markdown(rows, settings), end="")
    else:
        print_storage_table(rows, settings)
    if plot is not None and not (as_json or as_csv or markdown):
        print(f"plot: {plot}")


def _storage_rows(bundle, arch, settings, options, plot, plot_arch):
    """The table's rows and settings: the bundle's own (``--bundle``) or one row per
    architecture at the options' settings; the plot written when asked for."""
    from supsup_deploy.errors import ConfigError
    from supsup_deploy.report import bundle_storage, plot_storage, storage_row, storage_table

    if bundle is not None:
        from supsup_deploy.bundles.reader import load_bundle

        if arch:
            raise ConfigError("--bundle reports on that bundle's architecture: drop --arch")

        rows = [bundle_storage(load_bundle(bundle))]
        settings = rows[0].settings
        if plot is not None:
            plot_storage(rows[0], plot, max_tasks=max(settings.num_tasks, 1000))
    else:
        rows = storage_table(arch, settings, **options)
        if plot is not None:
            plot_storage(storage_row(plot_arch, settings, **options), plot)
    return rows, settings


def print_storage_table(rows, settings) -> None:
    """The storage table and the poster comparison as rich tables."""
    from rich.table import Table

    from supsup_deploy.report import (
        NORM_DEFINITION,
        PER_TASK_COLUMNS,
        POSTER_BASIS,
        POSTER_COLUMNS,
        POSTER_NOTES,
        POSTER_ROWS,
        SCHEME_DEFINITIONS,
        SCHEME_LABELS,
        SCHEMES,
        TOTAL_COLUMNS,
        format_cell,
        poster_cells,
        storage_cells,
    )

    console = wide_console()
    cells = [storage_cells(row) for row in rows]
    for title, columns in (
        (
            f"Bytes per task (|B| = {settings.num_basis}, density {settings.density}, "
            f"norm {settings.norm_dtype})",
            PER_TASK_COLUMNS,
        ),
        (f"Total bytes for T = {settings.num_tasks} tasks", TOTAL_COLUMNS),
    ):
        table = Table(title=title)
        for key, header in columns:
            table.add_column(header, justify="left" if key == "arch" else "right")
        for row in cells:
            table.add_row(*(format_cell(row[key]) for key, _ in columns))
        console.print(table)
    for scheme in SCHEMES:
        console.print(f"  {SCHEME_LABELS[scheme]}: {SCHEME_DEFINITIONS[scheme]}.")
    console.print(f"  norm: {NORM_DEFINITION}. The backbone costs 0 bytes (regenerated).")
    checks = [row.torchvision for row in rows if row.torchvision]
    if checks:
        matching = sum(check["match"] for check in checks)
        console.print(f"  torchvision check: {matching} of {len(checks)} rows match its shapes.")
    else:
        console.print(
            "  torchvision check: none of these rows has torchvision's configuration "
            "(ImageNet stem, width 1, 3 channels) to compare."
        )
    for row in rows:
        if row.bundle:
            facts = row.bundle
            console.print(
                f"  your bundle {facts['path']}: {facts['tasks']} tasks over {facts['num_basis']} "
                f"basis masks ({facts['mask_encoding']}, density {facts['basis_density']:.3f}), "
                f"{facts['bytes_on_disk']:,} bytes on disk (basis file "
                f"{facts['basis_file_bytes']:,}, task files {facts['task_file_bytes']:,})."
            )
    poster = Table(
        title=f"The poster's table beside ours, both at the poster's |B| = {POSTER_BASIS}"
    )
    for key, title in POSTER_COLUMNS:
        poster.add_column(title, justify="left" if key == "poster_name" else "right")
    for entry in POSTER_ROWS:
        cells = poster_cells(entry)
        poster.add_row(*(format_cell(cells[key]) for key, _ in POSTER_COLUMNS))
    console.print(poster)
    for note in POSTER_NOTES:
        console.print(f"  - {note}")
