"""Inference from a bundle: images in, per-task predictions out, with PyTorch or ONNX Runtime."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supsup_deploy import data as datasets
from supsup_deploy.bundles.reader import Bundle
from supsup_deploy.bundles.weights import ImageTransform
from supsup_deploy.devices import resolve_device
from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.images import IMAGE_SUFFIXES, read_pixels
from supsup_deploy.onnx_graphs.adapters import load_adapter
from supsup_deploy.onnx_graphs.format import ADAPTER_SUFFIX, ADAPTERS_FOLDER, GRAPH_KIND
from supsup_deploy.onnx_graphs.sessions import SharedGraph, onnx_session, run_onnx

RUNTIMES = ("torch", "onnx")


@dataclass(frozen=True)
class Prediction:
    """One input's prediction under one task."""

    input: str
    task: int
    class_index: int
    class_name: str
    probability: float
    label: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def collect_image_paths(paths: list[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the named folders."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            images = sorted(
                path
                for path in item.rglob("*")
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
            )
            if not images:
                raise ConfigError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found += images
        elif item.is_file():
            found.append(item)
        else:
            raise ConfigError(f"{item}: no such file or folder")
    if not found:
        raise ConfigError("no input images given")
    return found


def load_images(paths: list[Path], bundle: Bundle) -> torch.Tensor:
    """Read images and preprocess them for the bundle's models
    (:class:`~supsup_deploy.bundles.weights.ImageTransform`: channels, size, normalisation).

    Raises:
        FormatError: a file is not a readable image (the message names it).
    """
    spec = bundle.input
    images = [read_pixels(path, channels=spec.channels, size=spec.size) for path in paths]
    return ImageTransform(spec)(torch.stack(images))


def dataset_split(
    bundle: Bundle,
    task: int,
    *,
    split: str = "test",
    limit: int | None = None,
    data_root: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's images and labels (0..k-1) from the dataset the bundle was trained on."""
    info = bundle.task(task)
    name = bundle.dataset
    classes = info.metrics.get("classes")
    if not name or not classes or name == datasets.FOLDER_DATASET:
        raise ConfigError(
            f"{info.path}: no built-in dataset or classes recorded for task {info.index} (an "
            "image folder's task); pass image files"
        )
    dataset = datasets.load_dataset(name, split=split, data_root=data_root)
    if not all(isinstance(c, int) and 0 <= c < dataset.spec.num_classes for c in classes):
        raise FormatError(
            f"{info.path}: task {info.index} records classes {list(classes)[:10]}, but {name} "
            f"has classes 0..{dataset.spec.num_classes - 1}; the task file is not for this dataset"
        )
    lookup = torch.full((dataset.spec.num_classes,), -1, dtype=torch.int64)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    labels = lookup[dataset.labels]
    rows = torch.nonzero(labels >= 0).flatten()[:limit]
    return datasets.preprocess_images(dataset.images[rows], bundle.input), labels[rows]


def shared_task_source(shared: SharedGraph, bundle: Bundle, task: int) -> dict[str, Any]:
    """How a shared graph gets ``task`` (the keyword arguments of :meth:`SharedGraph.run`): its
    adapter beside the graph (``tasks/<name>.onnx_adapter``) when there is one, else the bundle's
    tensors as inputs.

    Raises:
        FormatError: the adapter is bad, for another task, or differs from the task file.
    """
    info = bundle.task(task)
    path = shared.path.parent / ADAPTERS_FOLDER / f"{info.name}{ADAPTER_SUFFIX}"
    feed = shared.feed(bundle, task)
    if shared.model is not None or not os.path.lexists(path):
        return {"feed": feed}
    adapter = load_adapter(path, shared.inputs)
    if adapter.task != info.index:
        raise FormatError(f"{path}: holds task {adapter.task}, not task {info.index}")
    if any(not np.array_equal(adapter.tensors[name], feed[name]) for name in feed):
        raise FormatError(f"{path}: its tensors differ from {info.path}; export the adapter again")
    return {"adapter": adapter}


class Predicts:
    """:meth:`predict` for a class that has ``bundle`` and ``logits(task, images, batch_size)``."""

    bundle: Bundle

    def logits(self, task: int | str, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        raise NotImplementedError

    def predict(
        self,
        task: int | str,
        images: torch.Tensor,
        names: list[str],
        labels: torch.Tensor | None = None,
        batch_size: int = 256,
    ) -> list[Prediction]:
        """Class, class name and probability for every image under ``task`` (over the task's
        own classes: a task with k class names uses the first k outputs)."""
        info = self.bundle.task(task)
        logits = self.logits(info.index, images, batch_size)[:, : len(info.class_names)]
        best, classes = logits.softmax(dim=1).max(dim=1)
        return [
            Prediction(
                input=name,
                task=info.index,
                class_index=int(index),
                class_name=info.class_names[int(index)],
                probability=float(probability),
                label=None if labels is None else int(labels[row]),
            )
            for row, (name, index, probability) in enumerate(zip(names, classes, best, strict=True))
        ]


class Runner(Predicts):
    """Runs a bundle's tasks on images with PyTorch (materialised weights) or ONNX Runtime.

    Args:
        bundle: a loaded bundle.
        runtime: ``"torch"`` or ``"onnx"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (for both runtimes).
        onnx_path: for ``"onnx"``, an exported graph to use (else tasks are exported on demand to
            a temporary folder, with the usual parity check). A shared graph
            (:mod:`supsup_deploy.onnx_graphs.shared_graph`) runs every task, each from its adapter
            in the graph's ``tasks`` folder when there is one, else from the bundle's task tensors.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        runtime: str = "torch",
        device: str = "cpu",
        onnx_path: str | Path | None = None,
    ) -> None:
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {runtime!r}: use torch or onnx")
        self.bundle = bundle
        self.runtime = runtime
        self.device = resolve_device(device)
        self.onnx_path = Path(onnx_path) if onnx_path else None
        self._model: torch.nn.Module | None = None
        self._sessions: dict[int, Any] = {}
        self._shared: SharedGraph | None = None
        self._shared_tasks: dict[int, dict[str, Any]] = {}
        self._scratch: Any = None
        self._exporter: Any = None
        self.provider = "torch:" + self.device if runtime == "torch" else ""

    def logits(self, task: int | str, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Logits of ``task`` for normalised images, batch by batch."""
        info = self.bundle.task(task)
        outputs = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            outputs.append(self._run(info.index, batch))
        return torch.cat(outputs) if outputs else torch.empty(0, self.bundle.config.num_classes)

    def _run(self, task: int, batch: torch.Tensor) -> torch.Tensor:
        if self.runtime == "torch":
            if self._model is None:
                self._model = self.bundle.model(task, device=self.device)
            elif self._model.bundle_task != task:
                self.bundle.switch(self._model, task)
            with torch.no_grad():
                return self._model(batch.to(self.device)).float().cpu()
        session = self._session(task)
        if isinstance(session, SharedGraph):
            return torch.from_numpy(session.run(batch, **self._shared_task(task)))
        return torch.from_numpy(run_onnx(session, batch))

    def _session(self, task: int):
        if self._shared is not None:
            return self._shared
        if task not in self._sessions:
            path = self.onnx_path or self._export(task)
            session = onnx_session(path, device=self.device)
            self.provider = "onnxruntime:" + session.get_providers()[0]
            if session.get_modelmeta().custom_metadata_map.get("supsup.graph") == GRAPH_KIND:
                self._shared = SharedGraph(path, session=session)
                self._shared.check_bundle(self.bundle)
                return self._shared
            self._check_graph(session, path, task)
            self._sessions[task] = session
        return self._sessions[task]

    def _shared_task(self, task: int) -> dict[str, Any]:
        if task not in self._shared_tasks:
            self._shared_tasks[task] = shared_task_source(self._shared, self.bundle, task)
        return self._shared_tasks[task]

    def _check_graph(self, session, path: Path, task: int) -> None:
        metadata = session.get_modelmeta().custom_metadata_map
        if metadata.get("supsup.basis_sha256") != self.bundle.basis_sha256:
            raise FormatError(f"{path}: exported from another bundle (basis hash differs)")
        if metadata.get("supsup.task_id") != str(task):
            raise ConfigError(
                f"{path}: holds task {metadata.get('supsup.task_id')}, not task {task}; "
                "export this task or leave out --onnx"
            )

    def _export(self, task: int) -> Path:
        import tempfile

        from supsup_deploy.onnx_graphs.export import TaskExporter

        if self._exporter is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="supsup-onnx-")
            self._exporter = TaskExporter(self.bundle)
        path = Path(self._scratch.name) / f"task_{task}.onnx"
        self._exporter.export(task, path)
        return path
