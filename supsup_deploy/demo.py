"""The main job in one call: train, pack, export with parity, infer, and report storage.

Everything lands in one folder (``artifacts/demo`` from the CLI). Running it again resumes: a
finished run is not retrained and an existing bundle is reused after validation.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supsup_deploy.bundles.reader import Bundle, load_bundle
from supsup_deploy.devices import resolve_device
from supsup_deploy.errors import FormatError
from supsup_deploy.files import atomic_write_bytes, atomic_write_json
from supsup_deploy.outputs import FOLDER, check_output
from supsup_deploy.steps import StepTimer

DEMO_TRAIN = {"epochs": 2, "max_train_samples": 1500, "max_test_samples": 1000}
DEMO_IMAGES_PER_TASK = 32
DEMO_PREDICTIONS_SHOWN = 8


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo writes, under one root folder."""

    root: Path

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def onnx(self) -> Path:
        return self.root / "onnx"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def accuracy_plot(self) -> Path:
        return self.root / "accuracy.png"

    @property
    def storage_plot(self) -> Path:
        return self.root / "storage.png"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


def demo_config(**overrides: Any):
    """The demo's training configuration: the defaults of ``supsup train``, in a short budget."""
    from supsup_deploy.train_config import TrainConfig

    return TrainConfig(**{**DEMO_TRAIN, **overrides})


def train_demo(paths: DemoPaths, *, device: str = "cpu", reporter=None) -> list[dict[str, Any]]:
    """Train (or finish) the demo run; returns per-task metrics."""
    from supsup_deploy.train import train_run

    return train_run(demo_config(), paths.run, resume=True, device=device, reporter=reporter)


def pack_demo(paths: DemoPaths) -> Bundle:
    """Pack the run, or reuse the bundle already there when it holds every task of the run."""
    from supsup_deploy.pack import pack_run

    if not paths.bundle.exists():
        return pack_run(paths.run, paths.bundle)
    bundle = load_bundle(paths.bundle)
    expected = demo_config().num_tasks
    if len(bundle.tasks) != expected:
        raise FormatError(
            f"{paths.bundle} holds {len(bundle.tasks)} tasks, not the run's {expected}: "
            "move it away and run the demo again"
        )
    return bundle


def export_demo(bundle: Bundle, paths: DemoPaths, *, device: str = "cpu") -> dict[str, Any]:
    """Export the first alpha task (the last task when there is none) with the parity check."""
    from supsup_deploy.onnx_graphs.export import TaskExporter
    from supsup_deploy.onnx_graphs.parity import probe_batch

    info = next((task for task in bundle.tasks if task.kind == "alpha"), bundle.tasks[-1])
    probe, probe_name = probe_batch(bundle)
    report = TaskExporter(bundle, device=device).export(
        info.index, paths.onnx / f"{info.name}.onnx", probe=probe, probe_name=probe_name
    )
    return report.to_dict()


@dataclass(frozen=True)
class DemoImages:
    """One task's test images written as PNG files, with their labels (0..k-1 in the task)."""

    files: list[Path]
    labels: torch.Tensor


def write_demo_images(bundle: Bundle, paths: DemoPaths) -> dict[int, DemoImages]:
    """Save a few test images of every task as PNG files (the input of the infer step)."""
    from PIL import Image

    from supsup_deploy import data as datasets

    test = datasets.load_dataset(bundle.dataset, split="test")
    written = {}
    for info in bundle.tasks:
        classes = list(info.metrics["classes"])
        rows = torch.nonzero(torch.isin(test.labels, torch.tensor(classes))).flatten()
        files = []
        for row in rows[:DEMO_IMAGES_PER_TASK].tolist():
            pixels = test.images[row].numpy().astype(np.uint8)
            image = Image.fromarray(
                pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
            )
            stream = io.BytesIO()
            image.save(stream, format="PNG")
            path = paths.images / info.name / f"test_{row:05d}.png"
            atomic_write_bytes(path, stream.getvalue())
            files.append(path)
        labels = [classes.index(int(label)) for label in test.labels[rows[: len(files)]]]
        written[info.index] = DemoImages(files, torch.tensor(labels))
    return written


def infer_demo(
    bundle: Bundle,
    images: dict[int, DemoImages],
    onnx_path: Path,
    exported_task: int,
    *,
    device: str = "cpu",
) -> dict[str, Any]:
    """Predictions for the exported task's images with PyTorch and ONNX Runtime (task given),
    and the task inferred for every task's batch of images."""
    from supsup_deploy.runtime import Runner, load_images
    from supsup_deploy.task_inference import TaskInferrer

    batches = {task: load_images(written.files, bundle) for task, written in images.items()}
    exported = images[exported_task]
    names = [str(path) for path in exported.files]
    given = {}
    for runtime, runner in (
        ("torch", Runner(bundle, runtime="torch", device=device)),
        ("onnx", Runner(bundle, runtime="onnx", device=device, onnx_path=onnx_path)),
    ):
        predictions = runner.predict(exported_task, batches[exported_task], names, exported.labels)
        given[runtime] = {
            "provider": runner.provider,
            "predictions": [prediction.to_dict() for prediction in predictions],
        }
    inferrer = TaskInferrer(bundle, device=device)
    inferred = [
        {"true_task": task, "inferred_task": inferrer.infer(batch).task, "images": len(batch)}
        for task, batch in batches.items()
    ]
    return {"task_given": given, "task_inferred": inferred, "method": inferrer.method}


def storage_demo(bundle: Bundle, paths: DemoPaths) -> dict[str, Any]:
    """The storage table for this bundle's own configuration, its files, and the plot."""
    from supsup_deploy.report import (
        bundle_report,
        bundle_storage,
        compare_bundle_bytes,
        plot_storage,
    )

    row = bundle_storage(bundle)
    plot_storage(row, paths.storage_plot, max_tasks=1000)
    return {
        "row": row.to_dict(),
        "bundle": bundle_report(bundle),
        "bytes_check": compare_bundle_bytes(bundle),
        "plot": str(paths.storage_plot),
    }


def plot_accuracy(metrics: list[dict[str, Any]], path: Path) -> Path:
    """Bar chart of test accuracy per task, basis masks and alpha tasks coloured apart."""
    from supsup_deploy.report import headless_pyplot, save_figure

    figure, axes = headless_pyplot().subplots(figsize=(7.5, 3.5), dpi=120)
    colours = {"basis": "tab:blue", "alpha": "tab:orange"}
    for kind, label in (("basis", "basis mask (SupSup)"), ("alpha", "alpha task")):
        rows = [row for row in metrics if row["kind"] == kind]
        if not rows:
            continue
        axes.bar(
            [f"{row['task']}: {'/'.join(row['class_names'])}" for row in rows],
            [row["test_accuracy"] for row in rows],
            color=colours[kind],
            label=label,
        )
    axes.set_ylim(0, 1)
    axes.set_ylabel("test accuracy")
    axes.set_title("Accuracy per task")
    axes.tick_params(axis="x", labelrotation=30, labelsize=7)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(figure, path)


def run_demo(
    root: str | Path = "artifacts/demo",
    *,
    device: str = "cpu",
    reporter=None,
    step=None,
) -> dict[str, Any]:
    """Run the whole demo and write ``summary.json`` (everything but the timings).

    Args:
        root: output folder.
        device: where to train, check the export and infer, PyTorch and ONNX Runtime alike
            (see :func:`supsup_deploy.devices.resolve_device`).
        reporter: training progress events (see :class:`supsup_deploy.train.Reporter`).
        step: optional ``callback(name)`` called as each step starts.

    Returns:
        The summary: metrics, parity, predictions, task inference, storage, paths and timings.
    """
    check_output(root, FOLDER)
    paths = DemoPaths(Path(root))
    device = resolve_device(device)
    seconds: dict[str, float] = {}
    timed = StepTimer(seconds=seconds, announce=step).run

    metrics = timed("train", train_demo, paths, device=device, reporter=reporter)
    bundle = timed("pack", pack_demo, paths)
    parity = timed("export", export_demo, bundle, paths, device=device)
    images = timed("images", write_demo_images, bundle, paths)
    inference = timed(
        "infer", infer_demo, bundle, images, Path(parity["path"]), parity["task"], device=device
    )
    storage = timed("storage", storage_demo, bundle, paths)
    plot_accuracy(metrics, paths.accuracy_plot)
    summary = {
        "config": demo_config().to_dict(),
        "device": device,
        "metrics": metrics,
        "parity": parity,
        "inference": inference,
        "storage": storage,
        "paths": {
            "run": str(paths.run),
            "bundle": str(paths.bundle),
            "onnx": parity["path"],
            "images": str(paths.images),
            "accuracy_plot": str(paths.accuracy_plot),
            "storage_plot": str(paths.storage_plot),
            "summary": str(paths.summary),
        },
    }
    atomic_write_json(paths.summary, summary)
    return {**summary, "seconds": {name: round(value, 2) for name, value in seconds.items()}}
