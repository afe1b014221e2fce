"""A new task learned on a shipped bundle, against a dedicated mask and against ``supsup train``.

Run: ``python -m bench.learn [--quick] [--work artifacts/bench_learn]``. About 10 minutes on 2
idle CPU cores (``--quick``: about 3). Writes ``bench/results/learn.json``.

Setup (Fashion-MNIST, ``gem_resnet18``, seed 0): the *shipped bundle* is the demo's protocol
(split, 5 tasks x 2 classes, 3 basis masks) trained with the budget below and packed. The new
task's classes are those of the run's last task, so the same classes were also trained *inside
supsup train*, as an alpha task of the run (its own seeded rows, same budget). Side by side:

- ``learn (folder)``: ``learn_task`` on a folder of PNG files (``train/``, ``val/``, ``test/``
  class folders) holding exactly the rows the IDX path below uses, so both see the same images;
- ``learn (IDX)``: ``learn_task(dataset="fashion-mnist", classes=...)``, the in-memory path;
- ``dedicated mask``: a SupSup mask (edge-popup scores) for the same classes, rows and budget,
  over the bundle's backbone;
- ``inside supsup train``: the run's own alpha task for those classes.

Each row records test accuracy, wall time, validation accuracy after every epoch with its time,
the steps until validation accuracy first reaches 95% of its final value, and training
throughput (training images per second of training steps, their batches' loading and decoding
included, the epochs' evaluations not). The time ratio compares the new task's time to
its best epoch (the one ``learn`` keeps; also recorded with every epoch) with the time the
dedicated mask needs to first reach that validation accuracy (None if it never does).

Goals (issue 20): the new task in at most 1/3 of the time the dedicated mask needs to
reach the same validation accuracy; folder accuracy within 0.5 points of IDX and its throughput
at least 0.8 of IDX's; the learned task file the size of a packed task with the same dtypes.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from PIL import Image

from bench._common import machine_info, print_table, write_result
from supsup_deploy import data as datasets
from supsup_deploy.bundles.reader import load_bundle, single_task_config
from supsup_deploy.learn import learn_task
from supsup_deploy.models import build_model
from supsup_deploy.pack import pack_run
from supsup_deploy.runs import collect_metrics
from supsup_deploy.train import Reporter, RunData, train_run, train_task
from supsup_deploy.train_config import TaskRecipe, TrainConfig

RUN = dict(
    protocol="split", classes_per_task=2, num_tasks=5, basis=3, seed=0, val_fraction=0.05, pool=0
)
BUDGET = dict(epochs=4, max_train_samples=1000, max_test_samples=1000)
QUICK_BUDGET = dict(epochs=2, max_train_samples=300, max_test_samples=300)
GOAL_TIME_RATIO = 1 / 3
GOAL_ACCURACY_POINTS = 0.5
GOAL_THROUGHPUT_RATIO = 0.8
TO_FINAL = 0.95


class CurveReporter(Reporter):
    """Records each task's wall-clock start, steps, the seconds spent in training steps (batch
    loading included, the epochs' evaluations not) and validation accuracy after every epoch."""

    def __init__(self) -> None:
        self.curves: dict[int, dict[str, Any]] = {}
        self.current: dict[str, Any] = {}
        self.last = 0.0

    def task_started(self, task: int, kind: str, total_steps: int) -> None:
        self.last = time.perf_counter()
        self.current = {"start": self.last, "steps": 0, "train_seconds": 0.0, "epochs": []}
        self.curves[task] = self.current

    def step(self) -> None:
        now = time.perf_counter()
        self.current["steps"] += 1
        self.current["train_seconds"] += now - self.last
        self.last = now

    def epoch_finished(self, task: int, epoch: int, metrics: dict[str, float]) -> None:
        self.last = time.perf_counter()
        elapsed = self.last - self.current["start"]
        self.current["epochs"].append(
            {"seconds": elapsed, "steps": self.current["steps"], "val": metrics["val_accuracy"]}
        )


def curve_summary(curve: dict[str, Any], train_images: int) -> dict[str, Any]:
    """Steps and seconds until validation accuracy first reaches 95% of its final value."""
    epochs = curve["epochs"]
    final = max(epoch["val"] for epoch in epochs)
    first = next(epoch for epoch in epochs if epoch["val"] >= TO_FINAL * final)
    best = next(epoch for epoch in epochs if epoch["val"] == final)
    return {
        "val_curve": epochs,
        "best_val": final,
        "seconds_to_best": best["seconds"],
        "steps_to_95_percent": first["steps"],
        "seconds_to_95_percent": first["seconds"],
        "train_images_per_second": train_images * len(epochs) / curve["train_seconds"],
    }


def seconds_to_reach(curve: list[dict[str, Any]], accuracy: float) -> float | None:
    """When a curve first reaches a validation accuracy (None: never)."""
    return next((epoch["seconds"] for epoch in curve if epoch["val"] >= accuracy), None)


def write_png_folder(root: Path, splits: datasets.TaskSplits, source: dict[str, Any]) -> None:
    """The exact rows of a task's splits as PNG files: ``root/<split>/<class>/<row>.png``."""
    names = [name.replace("/", "-") for name in source["class_names"]]
    for split, pair in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        dataset = source["test" if split == "test" else "train"]
        for row, label in zip(pair.source_indices.tolist(), pair.labels.tolist(), strict=True):
            folder = root / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = dataset.images[row, 0].numpy()
            Image.fromarray(pixels, "L").save(folder / f"{row:05d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="A smaller budget (about 3 minutes).")
    parser.add_argument("--work", type=Path, default=Path("artifacts/bench_learn"))
    args = parser.parse_args()
    budget = QUICK_BUDGET if args.quick else BUDGET
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    config = TrainConfig(**RUN, **budget)
    run_reporter = CurveReporter()
    started = time.perf_counter()
    train_run(config, args.work / "run", reporter=run_reporter)
    run_seconds = time.perf_counter() - started
    bundle = load_bundle(pack_run(args.work / "run", args.work / "bundle").path)
    run_data = RunData.load(config)
    new_task = run_data.tasks[-1]
    classes = ",".join(map(str, new_task.classes))
    shared = dict(epochs=budget["epochs"], seed=0, device="cpu", val_fraction=RUN["val_fraction"])

    idx_splits = datasets.task_splits(
        run_data.train,
        run_data.test,
        datasets.TaskSpec(0, new_task.classes, "new", seed=0),
        val_fraction=RUN["val_fraction"],
        max_train_samples=budget["max_train_samples"],
        seed=0,
    )
    class_names = list(new_task.class_names(run_data.spec))
    write_png_folder(
        args.work / "photos",
        idx_splits,
        {"class_names": class_names, "train": run_data.train, "test": run_data.test},
    )

    rows: dict[str, dict[str, Any]] = {}
    for label, file, source in (
        ("learn (folder)", "folder", {"data": args.work / "photos"}),
        ("learn (IDX)", "idx", {"dataset": "fashion-mnist", "classes": classes}),
    ):
        reporter = CurveReporter()
        started = time.perf_counter()
        learned = learn_task(
            bundle,
            **source,
            name="new_task",
            max_train_samples=budget["max_train_samples"],
            reporter=reporter,
            **shared,
        )
        seconds = time.perf_counter() - started
        path = learned.save(args.work / f"{file}.safetensors", index=5, bundle=bundle)
        rows[label] = {
            "test_accuracy": learned.metrics["test_accuracy"],
            "wall_seconds": seconds,
            "file_bytes": path.stat().st_size,
            **curve_summary(reporter.curves[0], learned.metrics["train_samples"]),
        }

    dedicated = CurveReporter()
    model = build_model(single_task_config(bundle.config))
    recipe = TaskRecipe(
        epochs=budget["epochs"],
        batch_size=config.batch_size,
        lr=config.lr,
        alpha_lr=config.alpha_lr,
        weight_decay=config.weight_decay,
        density=config.density,
        seed=0,
    )
    started = time.perf_counter()
    metrics = train_task(
        model, recipe, idx_splits, index=0, kind="basis", basis=[], device="cpu",
        reporter=dedicated,
    )  # fmt: skip
    rows["dedicated mask"] = {
        "test_accuracy": metrics["test_accuracy"],
        "wall_seconds": time.perf_counter() - started,
        **curve_summary(dedicated.curves[0], metrics["train_samples"]),
    }

    inside = collect_metrics(args.work / "run", config.num_tasks)[-1]
    packed = next(task for task in bundle.tasks if task.index == new_task.index)
    inside_curve = curve_summary(run_reporter.curves[new_task.index], inside["train_samples"])
    rows["inside supsup train"] = {
        "test_accuracy": inside["test_accuracy"],
        "wall_seconds": inside_curve["val_curve"][-1]["seconds"],
        "file_bytes": packed.file_bytes,
        **inside_curve,
    }

    folder, idx = rows["learn (folder)"], rows["learn (IDX)"]
    dedicated_reach = seconds_to_reach(rows["dedicated mask"]["val_curve"], folder["best_val"])
    goals = {
        "time_ratio_to_dedicated": {
            "learn_seconds_to_best_epoch": folder["seconds_to_best"],
            "learn_seconds_all_epochs": folder["wall_seconds"],
            "dedicated_seconds_to_same_val": dedicated_reach,
            "dedicated_reached": dedicated_reach is not None,
            "ratio": None
            if dedicated_reach is None
            else folder["seconds_to_best"] / dedicated_reach,
            "ratio_all_epochs": (
                None if dedicated_reach is None else folder["wall_seconds"] / dedicated_reach
            ),
            "goal": GOAL_TIME_RATIO,
        },
        "folder_vs_idx_accuracy_points": {
            "difference": 100 * abs(folder["test_accuracy"] - idx["test_accuracy"]),
            "goal": GOAL_ACCURACY_POINTS,
        },
        "folder_vs_idx_throughput": {
            "ratio": folder["train_images_per_second"] / idx["train_images_per_second"],
            "goal": GOAL_THROUGHPUT_RATIO,
        },
        "file_bytes": {
            "learned": folder["file_bytes"],
            "packed": rows["inside supsup train"]["file_bytes"],
        },
    }
    timing = goals["time_ratio_to_dedicated"]
    timing["met"] = timing["ratio"] is not None and timing["ratio"] <= GOAL_TIME_RATIO
    throughput = goals["folder_vs_idx_throughput"]
    throughput["met"] = throughput["ratio"] >= GOAL_THROUGHPUT_RATIO
    accuracy = goals["folder_vs_idx_accuracy_points"]
    accuracy["met"] = accuracy["difference"] <= GOAL_ACCURACY_POINTS
    goals["file_bytes"]["met"] = goals["file_bytes"]["learned"] <= goals["file_bytes"]["packed"]
    result = {
        "machine": machine_info("cpu"),
        "setup": {
            "run": {**RUN, **budget},
            "new_task_classes": list(new_task.classes),
            "new_task_class_names": class_names,
            "run_seconds": run_seconds,
            "quick": args.quick,
        },
        "rows": rows,
        "goals": goals,
    }
    path = write_result("learn_quick" if args.quick else "learn", result)
    table = []
    for label, row in rows.items():
        table.append(
            [
                label,
                f"{row['test_accuracy']:.4f}",
                f"{row['best_val']:.4f}",
                f"{row['wall_seconds']:.1f}",
                str(row["steps_to_95_percent"]),
                f"{row['train_images_per_second']:.0f}",
                f"{row.get('file_bytes', 0):,}" if "file_bytes" in row else "-",
            ]
        )
    print_table(
        "A new task on a shipped bundle (Fashion-MNIST, classes " + ", ".join(class_names) + ")",
        ("method", "test acc", "best val", "wall s", "steps to 95%", "train img/s", "file bytes"),
        table,
    )
    for name, goal in goals.items():
        print(f"{name}: {goal}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
