"""Task inference without a task id on trained runs: accuracy and time per method.

Run: ``python -m bench.task_inference [--limit 320] [--runs artifacts/.../split_batch_seed0 ...]
[--methods classes ...] [--scaling] [--result task_inference]``.

Each run is packed into a temporary bundle; every task's test images are cut into batches of 64
(from one task each) and the task of every batch is inferred. ``statistics`` runs on BatchNorm
runs only (GroupNorm keeps no statistics); ``information`` on every run; ``oneshot`` with one pass
(SupSup's rule) and with the default three; ``classes`` on every run; ``signatures`` on runs whose
packed tasks store signatures (split runs, where class names cannot tell tasks apart).

``--scaling`` times ``classes`` per batch of 64 on the random BatchNorm run's bundle, and
``signatures`` on the split BatchNorm run's, with more tasks installed (copies of its first alpha
task, signature included, under random class sets of its classes), to show that their cost does
not grow with the number of tasks.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from bench._common import machine_info, print_table, write_result
from supsup_deploy.bundles.format import BASIS_FILE, TASKS_FOLDER, file_sha256, task_file_name
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.bundles.writer import save_task
from supsup_deploy.pack import pack_run
from supsup_deploy.runtime import Runner, dataset_split
from supsup_deploy.task_inference import TaskInferrer, evaluate_task_inference
from supsup_deploy.task_inference_methods import has_signatures

RUNS = (
    "artifacts/bench_accuracy/full/split_batch_seed0",
    "artifacts/bench_accuracy/full/random_batch_seed0",
    "artifacts/bench_accuracy/full/split_group_seed0",
    "artifacts/bench_accuracy/full/random_group_seed0",
)
SCALING_RUNS = {
    "classes": "artifacts/bench_accuracy/full/random_batch_seed0",
    "signatures": "artifacts/bench_accuracy/full/split_batch_seed0",
}
SCALING_TASKS = (20, 100, 1000)
VARIANTS = (
    ("classes", {}),
    ("signatures", {}),
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
        if method == "signatures" and not has_signatures(bundle):
            return None
        start = time.perf_counter()
        summary = evaluate_task_inference(
            bundle, Runner(bundle), limit=limit, method=method, **options
        )
    tasks = len(bundle.tasks)
    if method == "oneshot":
        cost = f"{options['steps']} forward+backward"
    elif method == "classes":
        cost = f"{bundle.num_basis} forwards"
    elif method == "signatures":
        cost = "1 forward"
    elif summary.get("shortlist"):
        cost = f"{summary['shortlist']} forwards + {bundle.num_basis} stem convs"
    else:
        cost = f"{tasks} forwards"
    summary.update(run=run, tasks_installed=tasks, limit=limit, cost=cost)
    summary["seconds"] = time.perf_counter() - start
    return summary


def scaling(
    method: str, run: str, counts: tuple[int, ...] = SCALING_TASKS, batches: int = 5
) -> list[dict]:
    """Seconds per batch of ``method`` with ``counts`` tasks installed (one bundle, grown)."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bundle"
        bundle = pack_run(run, path)
        template = next(info for info in bundle.tasks if info.kind == "alpha")
        tensors = bundle.task_tensors(template.index)
        signature = bundle.task_signature(template.index)
        names = sorted({name for info in bundle.tasks for name in info.class_names})
        draw = random.Random(0)
        batch = dataset_split(bundle, template.index, split="test", limit=64)[0]
        digest = file_sha256(path / BASIS_FILE)
        for count in counts:
            for index in range(len(bundle.tasks), count):
                save_task(
                    path / TASKS_FOLDER / task_file_name(index, f"copy{index}"),
                    index=index,
                    name=f"copy{index}",
                    alpha=tensors["alpha"],
                    norm_state={k: v for k, v in tensors.items() if k.startswith("norm.")},
                    class_names=draw.sample(names, len(template.class_names)),
                    basis_sha256=digest,
                    signature=signature,
                )
            bundle = load_bundle(path)
            inferrer = TaskInferrer(bundle, method=method)
            inferrer.infer(batch, check_mixed=False)
            start = time.perf_counter()
            for _ in range(batches):
                inferrer.infer(batch, check_mixed=False)
            seconds = (time.perf_counter() - start) / batches
            rows.append({"tasks_installed": len(bundle.tasks), "seconds_per_batch": seconds})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS))
    parser.add_argument("--limit", type=int, default=320, help="test images per task")
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="also time classes and signatures (those of --methods) up to 1,000 tasks",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=sorted({method for method, _ in VARIANTS}),
        default=[method for method, _ in VARIANTS],
        help="measure only these methods",
    )
    parser.add_argument(
        "--result", default="task_inference", help="write bench/results/<RESULT>.json"
    )
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        for method, options in VARIANTS:
            if method not in args.methods:
                continue
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
    result = {"machine": machine_info(), "results": rows}
    if args.scaling:
        for method, run in SCALING_RUNS.items():
            if method not in args.methods:
                continue
            result[f"{method}_scaling"] = scaling(method, run)
            print_table(
                f"{method}: time per batch of 64 against installed tasks",
                ("tasks", "ms/batch"),
                [
                    [str(row["tasks_installed"]), f"{1000 * row['seconds_per_batch']:.0f}"]
                    for row in result[f"{method}_scaling"]
                ],
            )
    write_result(args.result, result)


if __name__ == "__main__":
    main()
