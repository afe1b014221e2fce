"""Task inference without a task id on trained runs: accuracy and time per method.

Run: ``python -m bench.task_inference [--limit 192] [--runs artifacts/.../split_batch ...]``.

Each run is packed into a temporary bundle; every task's test images are cut into batches of 64
(from one task each) and the task of every batch is inferred. ``oneshot`` is timed with one pass
(SupSup's rule) and with the default three; ``calibrated`` only where training recorded
reference entropies.
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
)
VARIANTS = (("oneshot", 1), ("oneshot", 3), ("calibrated", 1))


def measure(run: str, method: str, steps: int, *, limit: int | None) -> dict | None:
    """One run and method: the summary of :func:`evaluate_task_inference` and its wall time."""
    with tempfile.TemporaryDirectory() as folder:
        bundle = pack_run(run, Path(folder) / "bundle")
        if method == "calibrated" and not all("val_entropy" in t.metrics for t in bundle.tasks):
            return None
        start = time.perf_counter()
        summary = evaluate_task_inference(
            bundle, Runner(bundle), limit=limit, method=method, steps=steps
        )
    summary.update(run=run, tasks_installed=len(bundle.tasks), limit=limit)
    summary["seconds"] = time.perf_counter() - start
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument("--limit", type=int, default=None, help="test images per task")
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        for method, steps in VARIANTS:
            summary = measure(run, method, steps, limit=args.limit)
            if summary is not None:
                rows.append(summary)
    print_table(
        "task inference, batches of 64",
        ("run", "tasks", "method", "passes", "inference", "acc inferred", "acc true", "seconds"),
        [
            [
                Path(row["run"]).name,
                str(row["tasks_installed"]),
                row["method"],
                str(row.get("steps", row["tasks_installed"])),
                f"{row['task_inference_accuracy']:.3f}",
                f"{row['accuracy_inferred_task']:.3f}",
                f"{row['accuracy_true_task']:.3f}",
                f"{row['seconds']:.0f}",
            ]
            for row in rows
        ],
    )
    write_result("task_inference", {"machine": machine_info(), "results": rows})


if __name__ == "__main__":
    main()
