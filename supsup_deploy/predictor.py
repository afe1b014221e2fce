"""A long-lived predictor: any task of a bundle, from several threads, hot tasks at dense speed.

With ONNX Runtime and a shared graph (an exported ``model.onnx``, or one built in memory), the
predictor holds one shared session, which runs any task at once, and the specialised sessions of
its hot tasks (:mod:`supsup_deploy.hot_tasks`), which run at a dense graph's speed. Otherwise
(PyTorch, a per-task graph, or ONNX Runtime without hot tasks) it serves through a
:class:`~supsup_deploy.runtime.Runner`, one request at a time. :func:`predict` is the one-call
spelling: images in, predictions out.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supsup_deploy.bundles.reader import Bundle
from supsup_deploy.bundles.weights import model_input
from supsup_deploy.devices import resolve_device
from supsup_deploy.errors import ConfigError
from supsup_deploy.hot_tasks import DEFAULT_HOT_AFTER, DEFAULT_WINDOW, HotRule, HotTasks
from supsup_deploy.onnx_graphs.format import is_shared_graph
from supsup_deploy.onnx_graphs.parity import ParityError, seeded_probe
from supsup_deploy.onnx_graphs.sessions import SharedGraph, run_onnx
from supsup_deploy.onnx_graphs.targets import export_target
from supsup_deploy.runtime import (
    RUNTIMES,
    Prediction,
    Predicts,
    Runner,
    collect_image_paths,
    load_images,
    shared_task_source,
)


class Predictor(Predicts):
    """Serves a bundle's tasks; safe to call from several threads at once.

    Args:
        bundle: a loaded bundle.
        runtime: ``"torch"`` or ``"onnx"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        onnx_path: for ``"onnx"``, an exported graph: a shared graph gets the hot-task cache, a
            per-task graph runs as :class:`~supsup_deploy.runtime.Runner` runs it. Without one,
            ``hot_tasks > 0`` builds the shared graph in memory (checked against PyTorch on
            the first task), and ``hot_tasks = 0`` exports each task on demand.
        hot_tasks: specialised sessions kept (0: none, every request on the shared session).
        hot_after: a task becomes hot on this many requests among the last ``window``.
        window: requests the rule looks back over.
        background: specialise in a background thread (else in the request that promotes).
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        runtime: str = "onnx",
        device: str = "cpu",
        onnx_path: str | Path | None = None,
        hot_tasks: int = 0,
        hot_after: int = DEFAULT_HOT_AFTER,
        window: int = DEFAULT_WINDOW,
        background: bool = True,
    ) -> None:
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {runtime!r}: use torch or onnx")
        rule = HotRule(hot_tasks, hot_after, window)
        if runtime == "torch" and hot_tasks:
            raise ConfigError("hot tasks are ONNX Runtime sessions: use the onnx runtime")
        self.bundle = bundle
        self.device = resolve_device(device)
        self.shared: SharedGraph | None = None
        self.hot: HotTasks | None = None
        self._runner: Runner | None = None
        self._lock = threading.Lock()
        self._sources: dict[int, dict[str, Any]] = {}
        self._provider = ""
        shared_file = onnx_path is not None and is_shared_graph(onnx_path)
        if onnx_path is not None and hot_tasks and not shared_file:
            raise ConfigError(
                f"{onnx_path}: hot tasks are specialised from a shared graph (export --shared), "
                "not a per-task graph"
            )
        if runtime == "onnx" and (shared_file or (onnx_path is None and hot_tasks)):
            if shared_file:
                self.shared = SharedGraph(onnx_path, device=self.device)
                self.shared.check_bundle(bundle)
            else:
                self.shared = SharedGraph.from_bundle(bundle, device=self.device)
                _check_first_task(self.shared, bundle)
            self.hot = HotTasks(self._specialize, rule, background=background)
            self._provider = "onnxruntime:" + self.shared.provider
        else:
            self._runner = Runner(bundle, runtime=runtime, device=self.device, onnx_path=onnx_path)

    @property
    def provider(self) -> str:
        """What runs the requests (``torch:cpu``, ``onnxruntime:CPUExecutionProvider``, ...)."""
        return self._runner.provider if self._runner is not None else self._provider

    def _source(self, task: int) -> dict[str, Any]:
        source = self._sources.get(task)
        if source is None:
            source = self._sources[task] = shared_task_source(self.shared, self.bundle, task)
        return source

    def _specialize(self, task: int):
        source = self._source(task)
        if "adapter" in source:
            return self.shared.specialize(source["adapter"])
        return self.shared.specialize_tensors(source["feed"])

    def run(self, task: int | str, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """One request: logits of ``task`` for one batch of normalised float32 images."""
        info = self.bundle.task(task)
        if self.shared is None:
            with self._lock:
                return self._runner.logits(info.index, torch.as_tensor(images)).numpy()
        session = self.hot.session(info.index)
        if session is not None:
            return run_onnx(session, torch.as_tensor(images))
        return self.shared.run(images, **self._source(info.index))

    def logits(self, task: int | str, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Logits of ``task`` for normalised images, one request per batch."""
        outputs = [
            torch.from_numpy(self.run(task, images[start : start + batch_size]))
            for start in range(0, len(images), batch_size)
        ]
        return torch.cat(outputs) if outputs else torch.empty(0, self.bundle.config.num_classes)

    def wait(self) -> None:
        """Block until every task promoted so far is hot (or failed to specialise)."""
        if self.hot is not None:
            self.hot.wait()

    def close(self) -> None:
        """Stop the background specialisation and drop the hot sessions."""
        if self.hot is not None:
            self.hot.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@torch.no_grad()
def _check_first_task(shared: SharedGraph, bundle: Bundle) -> None:
    """Raise ParityError unless an in-memory shared graph matches PyTorch on the first task."""
    info = bundle.tasks[0]
    probe = seeded_probe(bundle)
    expected = bundle.model(info.index)(probe).numpy()
    got = shared.run(probe, feed=shared.feed(bundle, info.index))
    difference = float(np.abs(got - expected).max())
    tolerance = export_target("shared").tolerance()
    if difference > tolerance or not (got.argmax(1) == expected.argmax(1)).all():
        raise ParityError(
            f"{bundle.path}: the shared graph built in memory differs from PyTorch on task "
            f"{info.index} (max |logit difference| {difference:.3g}, tolerance {tolerance:g})"
        )


def predict(
    bundle: Bundle,
    images: torch.Tensor | list[str | Path],
    *,
    task: int | str,
    runtime: str = "torch",
    device: str = "cpu",
    batch_size: int = 256,
    hot_tasks: int = 0,
) -> list[Prediction]:
    """Predict classes with one task's model (the Python side of ``supsup infer``).

    Args:
        bundle: a loaded bundle.
        images: image files or folders, or a uint8 tensor of images, converted by the task's
            :meth:`~supsup_deploy.bundles.weights.TaskWeights.transforms`; or a float tensor
            already so converted (checked by :func:`~supsup_deploy.bundles.weights.model_input`).
        task: task id or name.
        runtime: ``"torch"`` or ``"onnx"`` (the task exported on the fly, parity checked).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: images per forward pass.
        hot_tasks: with ``"onnx"``, run the shared graph built in memory, the task specialised
            in the background once hot (see :class:`Predictor`).

    Returns:
        One :class:`supsup_deploy.runtime.Prediction` per image (class index, class name,
        probability), in input order.
    """
    if isinstance(images, torch.Tensor):
        images = model_input(images, bundle.input)
        names = [f"image[{row}]" for row in range(len(images))]
    else:
        files = collect_image_paths(images)
        images, names = load_images(files, bundle), [str(path) for path in files]
    with Predictor(bundle, runtime=runtime, device=device, hot_tasks=hot_tasks) as predictor:
        return predictor.predict(task, images, names, batch_size=batch_size)
