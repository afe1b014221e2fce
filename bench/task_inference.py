"""Task inference without a task id on trained runs: accuracy and time per method.

Run: ``python -m bench.task_inference [--limit 320] [--runs artifacts/.../split_batch ...]``.

Each run is packed into a temporary bundle; every task's test images are cut into batches of 64
(from one task each) and the task of every batch is inferred. ``statistics`` runs on BatchNorm
runs only (GroupNorm keeps no statistics); ``information`` on every run; ``oneshot`` with one pass
(SupSup's rule) and with the default three.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench._common import machine_info, print_table, write_result
from supsup_deploy.pack import pack_run
from supsup_deploy.runtime import Runner
from supsup_deploy.task_inference import evaluate_task_inference

RUNS = (
    "artifacts/bench_accuracy/full/split_batch",
    "artifacts/bench_accuracy/full/random_batch",
    "artifacts/bench_accuracy/full/split_group",
    "artifacts/bench_accuracy/full/random_group",
)
VARIANTS = (
    ("statistics", {"shortlist": 5}),
    ("statistics", {"shortlist": 0}),
    ("information", {}),
    ("oneshot", {"steps": 1}),
    ("oneshot", {"steps": 3}),
)


def measure(run: str, method: str, options: dict, *, limit: int | None) -> dict | None:
    """One run and method: the summary of :func:`evaluate_task_inference` and its wall time."""
    with tempfile.TemporaryDirectory() as folder:
        bundle = pack_run(run, Path(folder) / "bundle")
        if method == "statistics" and bundle.config.norm != "batch":
            return None
        start = time.perf_counter()
        summary = evaluate_task_inference(
            bundle, Runner(bundle), limit=limit, method=method, **options
        )
    tasks = len(bundle.tasks)
    if method == "oneshot":
        cost = f"{options['steps']} forward+backward"
    elif summary.get("shortlist"):
        cost = f"{summary['shortlist']} forwards + {bundle.num_basis} stem convs"
    else:
        cost = f"{tasks} forwards"
    summary.update(run=run, tasks_installed=tasks, limit=limit, cost=cost)
    summary["seconds"] = time.perf_counter() - start
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument("--limit", type=int, default=320, help="test images per task")
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        for method, options in VARIANTS:
            summary = measure(run, method, options, limit=args.limit)
            if summary is not None:
                rows.append(summary)
    print_table(
        "task inference, batches of 64",
        (
            "run",
            "tasks",
            "method",
            "cost per batch",
            "inference",
            "acc inferred",
            "acc true",
            "ms/batch",
        ),
        [
            [
                Path(row["run"]).name,
                str(row["tasks_installed"]),
                row["method"],
                row["cost"],
                f"{row['task_inference_accuracy']:.3f}",
                f"{row['accuracy_inferred_task']:.3f}",
                f"{row['accuracy_true_task']:.3f}",
                f"{1000 * row['seconds_per_batch']:.0f}",
            ]
            for row in rows
        ],
    )
    write_result("task_inference", {"machine": machine_info(), "results": rows})


if __name__ == "__main__":
    main()
