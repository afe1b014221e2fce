"""Tasks learned over a calibration pool, through the product (issue 22): bytes and accuracy.

Run: ``python -m bench.learn_pool [--seeds 0 1] [--epochs 6]`` (resumable: the runs of
``bench.accuracy`` and the dedicated masks of ``bench.alpha_variants`` in ``--work`` are reused,
and trained when missing). About 65 minutes per seed on one idle CPU core, after the runs (20
with the int8 form of one row per layer, which trains without quantisation).

Protocol: ``bench.accuracy``'s ``random`` one (20 x 5-way tasks over Fashion-MNIST's 10 classes,
|B| = 15, per-task BatchNorm, <= 3,000 training images per task), one run per seed. The run is
packed with ``pack_run(..., pool=32)`` (32 training images of each basis task: 480 images, stored
once in the basis) and its own alpha tasks are taken out of the bundle (so it ships its basis
tasks, and each learned task's class set is new to it: one that repeats an installed task's
class set also stores a 256-byte signature for task inference), then each of the run's 5 alpha
tasks is taught to the bundle with
``learn_task(bundle, dataset="fashion-mnist", classes=<the task's classes, in order>)`` at the
product's defaults over a pool (``POOL_ALPHA_GROUPS`` = 2 rows per layer as int4 codes, trained
against that form; statistics from the pool, nothing stored) and ``--epochs`` epochs, and
installed. Its test accuracy is measured on the run's own test images of
that task (the ones its dedicated mask is measured on) with the installed task as a reader serves
it (table from the file, statistics computed from the pool).

The ratio's denominator is a dedicated SupSup mask per alpha task trained with the same epochs
(``bench.alpha_variants``' ``random_batch_seed<seed>_dedicated_epochs<epochs>`` run). Bytes are
the installed task file on disk, header included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from bench._common import machine_info, print_table, write_result
from bench.accuracy import (
    BUDGET,
    GOAL_BYTES,
    GOAL_RATIO,
    PROTOCOLS,
    train_dedicated_twin,
    train_pair,
)
from supsup_deploy.bundles.reader import load_bundle
from supsup_deploy.learn import teach
from supsup_deploy.pack import pack_run
from supsup_deploy.runs import collect_metrics
from supsup_deploy.train import RunData, evaluate, train_run
from supsup_deploy.train_config import POOL_ALPHA_GROUPS, TrainConfig

POOL_IMAGES_PER_BASIS_TASK = 32


LEARNED_FORM = f"int4_groups{POOL_ALPHA_GROUPS}"
"""The table ``learn`` writes over a pool at its defaults, as cache files name it."""


def measure_seed(seed: int, work: Path, epochs: int) -> dict:
    """One seed's record, cached in
    ``<work>/random_batch_seed<seed>_learn_pool<epochs>_<LEARNED_FORM>.json``."""
    cache = work / f"random_batch_seed{seed}_learn_pool{epochs}_{LEARNED_FORM}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    config = TrainConfig(**PROTOCOLS["random"], **BUDGET, norm="batch", seed=seed)
    name = f"random_batch_seed{seed}"
    if epochs == config.epochs:
        run_dir, dedicated_dir = train_pair(config, work, name)
    else:
        run_dir = work / name
        train_run(config, run_dir, resume=True)
        dedicated_dir = work / f"{name}_dedicated_epochs{epochs}"
        train_dedicated_twin(dataclasses.replace(config, epochs=epochs), run_dir, dedicated_dir)
    dedicated = collect_metrics(dedicated_dir, config.num_tasks)
    run_data = RunData.load(config)
    bundle_dir = work / f"random_batch_seed{seed}_pool_bundle"
    bundle = pack_run(run_dir, bundle_dir, pool=POOL_IMAGES_PER_BASIS_TASK, force=True)
    for info in bundle.tasks:
        if info.kind == "alpha":
            info.path.unlink()
    bundle = load_bundle(bundle_dir)
    tasks = []
    for index in range(config.basis, config.num_tasks):
        splits = run_data.splits(index)
        classes = ",".join(str(c) for c in splits.task.classes)
        started = time.perf_counter()
        info = teach(
            bundle,
            name=f"learned_{index}",
            dataset=config.dataset,
            classes=classes,
            epochs=epochs,
            max_train_samples=config.max_train_samples,
            seed=seed,
            device="cpu",
        )
        seconds = time.perf_counter() - started
        served = load_bundle(bundle_dir).model(info.index)
        accuracy = evaluate(served, splits.test, "cpu", 256, outputs=len(splits.task.classes))
        tasks.append(
            {
                "task": index,
                "classes": [int(c) for c in splits.task.classes],
                "file_bytes": info.file_bytes,
                "test_accuracy": accuracy,
                "learn_test_accuracy": info.metrics["test_accuracy"],
                "dedicated_test_accuracy": dedicated[index]["test_accuracy"],
                "ratio": accuracy / dedicated[index]["test_accuracy"],
                "seconds": seconds,
            }
        )
    record = {
        "seed": seed,
        "pool_images": len(bundle.pool),
        "basis_file_bytes": bundle.basis_path.stat().st_size,
        "tasks": tasks,
    }
    cache.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("artifacts/bench_accuracy/full"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    seeds = [measure_seed(seed, args.work, args.epochs) for seed in args.seeds]
    ratios = [_mean([task["ratio"] for task in seed["tasks"]]) for seed in seeds]
    file_bytes = max(task["file_bytes"] for seed in seeds for task in seed["tasks"])
    print_table(
        f"tasks learned over a calibration pool, random 20 x 5, |B| = 15, {args.epochs} epochs",
        ("seed", "task", "classes", "file bytes", "accuracy", "dedicated", "ratio"),
        [
            [
                str(seed["seed"]),
                str(task["task"]),
                ",".join(map(str, task["classes"])),
                f"{task['file_bytes']:,}",
                f"{task['test_accuracy']:.4f}",
                f"{task['dedicated_test_accuracy']:.4f}",
                f"{task['ratio']:.3f}",
            ]
            for seed in seeds
            for task in seed["tasks"]
        ],
    )
    ratio = _mean(ratios)
    print(
        f"ratio {ratio:.3f} (per seed {', '.join(f'{r:.3f}' for r in ratios)}), largest task "
        f"file {file_bytes:,} bytes; goal {GOAL_RATIO} at <= {GOAL_BYTES:,} bytes: "
        + ("met" if ratio >= GOAL_RATIO and file_bytes <= GOAL_BYTES else "missed")
    )
    result = {
        "benchmark": "learn_pool",
        "setup": {
            "protocol": PROTOCOLS["random"],
            "budget": {**BUDGET, "epochs": args.epochs},
            "norm": "batch",
            "seeds": args.seeds,
            "pool_images_per_basis_task": POOL_IMAGES_PER_BASIS_TASK,
            "learn": "supsup_deploy.learn.teach defaults over a pool: "
            f"{POOL_ALPHA_GROUPS} rows per layer as int4 codes (trained for them), no statistics",
        },
        "machine": machine_info(),
        "ratio": ratio,
        "ratio_per_seed": ratios,
        "largest_task_file_bytes": file_bytes,
        "goal": {"ratio": GOAL_RATIO, "bytes": GOAL_BYTES},
        "per_seed": seeds,
    }
    print(f"wrote {write_result('learn_pool', result)}")


if __name__ == "__main__":
    main()
