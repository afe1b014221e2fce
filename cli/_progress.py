"""Rich progress bars, one style for every long command (training, inference, export, verify)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from supsup_deploy.train import Reporter


class RichReporter(Reporter):
    """Draws one bar for the tasks and one for the steps of the task in progress."""

    def __init__(self, progress: Progress, num_tasks: int, finished: int) -> None:
        self.progress = progress
        self.tasks_bar = progress.add_task("tasks", total=num_tasks, completed=finished)
        self.steps_bar: Any = None

    def task_started(self, task: int, kind: str, total_steps: int) -> None:
        if self.steps_bar is not None:
            self.progress.remove_task(self.steps_bar)
        self.steps_bar = self.progress.add_task(f"task {task} ({kind})", total=total_steps)

    def step(self) -> None:
        self.progress.advance(self.steps_bar)

    def epoch_finished(self, task: int, epoch: int, metrics: dict[str, float]) -> None:
        self.progress.console.print(
            f"task {task} epoch {epoch + 1}: train loss {metrics['train_loss']:.4f}, "
            f"val accuracy {metrics['val_accuracy']:.4f}"
        )

    def task_finished(self, metrics: dict[str, Any]) -> None:
        self.progress.advance(self.tasks_bar)
        self.progress.console.print(
            f"task {metrics['task']} ({metrics['kind']}) done: "
            f"test accuracy {metrics['test_accuracy']:.4f}, {metrics['state_bytes']:,} bytes"
        )


def make_progress(console: Console) -> Progress:
    """Bars drawn only on a terminal: piped or captured output gets the messages, not bars."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """One bar on stderr (stdout stays clean for --json), in the style of training's bars;
    yields ``advance(count)``. Without a total the bar pulses and the time still counts."""
    with make_progress(Console(stderr=True)) as progress:
        bar = progress.add_task(description, total=total)
        yield lambda count: progress.advance(bar, count)
