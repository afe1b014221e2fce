"""The ``supsup`` entry point: parses arguments, imports the library lazily, prints results."""

from __future__ import annotations

from typing import Annotated

import typer

from cli._common import one_line_errors, print_json

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
    Console().print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
