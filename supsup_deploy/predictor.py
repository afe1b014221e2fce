"""A long-lived predictor: any task of a bundle, from several threads, hot tasks at dense speed.

With ONNX Runtime and a shared graph (an exported ``model.onnx``, or one built in memory), the
predictor holds one shared session, which runs any task at once, and the specialised sessions of
its hot tasks (:mod:`supsup_deploy.hot_tasks`), which run at a dense graph's speed. Otherwise
(PyTorch, a per-task graph, or ONNX Runtime without hot tasks) it serves through a
:class:`~supsup_deploy.runtime.Runner`, one request at a time.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supsup_deploy.bundles.reader import Bundle
from supsup_deploy.devices import resolve_device
from supsup_deploy.errors import ConfigError
from supsup_deploy.export import ParityError, seeded_probe
from supsup_deploy.export_targets import export_target
from supsup_deploy.hot_tasks import DEFAULT_HOT_AFTER, DEFAULT_WINDOW, HotRule, HotTasks
from supsup_deploy.onnx_runtime import run_onnx
from supsup_deploy.runtime import RUNTIMES, Predicts, Runner, shared_task_source
from supsup_deploy.shared_graph import GRAPH_KIND, SharedGraph


def is_shared_graph(path: str | Path) -> bool:
    """Whether an ONNX file is a shared graph (its ``supsup.graph`` metadata)."""
    import onnx

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # onnx raises protobuf's and its own errors; ONNX Runtime reports them
        return False
    return any(p.key == "supsup.graph" and p.value == GRAPH_KIND for p in model.metadata_props)


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
