"""``supsup models``: the registered architectures, as a table or JSON."""

from __future__ import annotations

from typing import Annotated

import typer

from ._common import one_line_errors, print_json


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
