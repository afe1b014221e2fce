"""The ``supsup`` entry point: assembles the commands into one app; each command parses its
arguments in its own module, imports the library lazily and prints its results."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from ._common import print_error
from .bundle import add_task_command, inspect_command, pack_command
from .demo import demo_command
from .export import export_command
from .infer import infer_command
from .learn import learn_command
from .models import models_command
from .reports import report_app
from .train import train_command
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


app.command("models")(models_command)
app.command("train")(train_command)
app.command("pack")(pack_command)
app.command("inspect")(inspect_command)
app.command("add-task")(add_task_command)
app.command("export")(export_command)
app.command("infer")(infer_command)
app.command("demo")(demo_command)
app.add_typer(report_app, name="report")
app.command("learn")(learn_command)
app.command("verify")(verify_command)


def flow_help(command: TyperCommand | TyperGroup) -> TyperCommand | TyperGroup:
    """Join the lines of every help paragraph of ``command`` and its subcommands, so the terminal
    wraps them at its own width (typer keeps a docstring's line breaks after its first paragraph).
    """
    if command.help:
        paragraphs = command.help.split("\n\n")
        command.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    if isinstance(command, TyperGroup):
        for subcommand in command.commands.values():
            flow_help(subcommand)
    return command


def main() -> None:
    """Console-script entry point: usage errors, like the package's own errors, are one line
    on stderr with exit code 2."""
    try:
        command = flow_help(typer.main.get_command(app))
        code = command.main(prog_name="supsup", standalone_mode=False)
    except typer.TyperException as error:
        print_error(error.format_message())
        code = error.exit_code
    except typer.Abort:
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
