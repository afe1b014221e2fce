"""ONNX export with a parity check against the PyTorch model, always: the per-task graph
(:class:`TaskExporter`), the shared graph (:func:`export_shared`) and its adapters
(:func:`export_adapter`), each a target in :mod:`supsup_deploy.onnx_graphs.targets` with its
tolerance.

Every graph is checked (``onnx.checker`` full check, then ONNX Runtime against PyTorch) from a
scratch file beside the output before the same bytes are written into place atomically (fsynced,
with the umask's permissions), so a killed export leaves the earlier file or the new one, never a
partial one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from supsup_deploy.bundles.reader import Bundle
from supsup_deploy.devices import resolve_device
from supsup_deploy.errors import SupsupError
from supsup_deploy.files import atomic_write_bytes
from supsup_deploy.models import MaskedModel
from supsup_deploy.onnx_graphs.adapters import adapter_bytes
from supsup_deploy.onnx_graphs.format import (
    ADAPTER,
    ADAPTER_SUFFIX,
    ADAPTERS_FOLDER,
    DEFAULT_OPSET,
    GRAPH,
    MODEL_FILE,
)
from supsup_deploy.onnx_graphs.parity import (
    ParityReport,
    SharedParityReport,
    check_parity,
    check_shared_parity,
    probe_batch,
)
from supsup_deploy.onnx_graphs.sessions import SharedGraph
from supsup_deploy.onnx_graphs.shared_graph import build_shared_graph
from supsup_deploy.onnx_graphs.targets import export_target
from supsup_deploy.onnx_graphs.task_graph import TaskGraphs
from supsup_deploy.outputs import FOLDER, check_output


class TaskExporter:
    """Exports a bundle's tasks to ONNX, tracing the network once and swapping weights after.

    Args:
        bundle: a loaded bundle.
        device: where the parity check runs, PyTorch and ONNX Runtime alike (see
            :func:`supsup_deploy.devices.resolve_device`); the graph is the same on every device.
        opset, exporter, fp16: the graphs' settings, as
            :class:`~supsup_deploy.onnx_graphs.task_graph.TaskGraphs` takes them.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "cpu",
        opset: int = DEFAULT_OPSET,
        exporter: str = "dynamo",
        fp16: bool = False,
    ) -> None:
        self.graphs = TaskGraphs(bundle, opset=opset, exporter=exporter, fp16=fp16)
        export_target("task").validate(precision="float16" if fp16 else "float32")
        self.bundle = bundle
        self.fp16 = fp16
        self.device = resolve_device(device)
        self._model: MaskedModel | None = None

    @property
    def traces(self) -> int:
        """How often the network was traced (once, unless a task's tensors could not be swapped
        into the first graph)."""
        return self.graphs.traces

    def export(
        self,
        task: int | str,
        path: str | Path,
        *,
        probe: torch.Tensor | None = None,
        probe_name: str = "seeded random batch",
        force: bool = False,
    ) -> ParityReport:
        """Write ``task``'s ONNX graph to ``path`` after proving parity; nothing on failure.

        An existing file at ``path`` is replaced only when it is a graph this package wrote, or
        with ``force`` (:func:`supsup_deploy.outputs.check_output`).
        """
        import onnx

        info = self.bundle.task(task)
        path = Path(path)
        check_output(path, GRAPH, force=force)
        if self._model is None:
            self._model = self.bundle.model(info.index, device=self.device)
        else:
            self.bundle.switch(self._model, info.index)
        graph = self.graphs.graph(self._model, info)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = graph.SerializeToString()
        handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            onnx.checker.check_model(scratch, full_check=True)
            if probe is None:
                probe, probe_name = probe_batch(self.bundle)
            report = check_parity(
                self._model,
                scratch,
                probe,
                task=info.index,
                fp16=self.fp16,
                probe_name=probe_name,
                device=self.device,
            )
        except onnx.checker.ValidationError as error:
            raise SupsupError(f"{path}: the exported graph fails onnx.checker ({error})") from None
        finally:
            Path(scratch).unlink(missing_ok=True)
        atomic_write_bytes(path, data)
        return ParityReport(**{**report.to_dict(), "path": str(path)})


def export_shared(
    bundle: Bundle,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    probe: torch.Tensor | None = None,
    probe_name: str = "seeded random batch",
    device: str = "cpu",
    force: bool = False,
) -> list[SharedParityReport]:
    """Write ``out_dir/model.onnx`` and one ``out_dir/tasks/<name>.onnx_adapter`` per task.

    Every path is checked first (:func:`supsup_deploy.outputs.check_output`: an existing graph or
    adapter is replaced only when this package wrote it, or with ``force``). The graph passes
    ``onnx.checker``'s full check, and for every task, fed as plain inputs and as an adapter, must
    match the PyTorch model within the fp32 tolerance with identical argmax, before any file is
    written (each atomically).

    Args:
        bundle: a loaded bundle with at least one task.
        out_dir: the folder to write (created).
        opset: ONNX opset.
        probe: the parity batch (default: real test images when available, else seeded).
        probe_name: what ``probe`` is, for the reports.
        device: ``"cpu"`` or ``"cuda"`` for the parity runs.
        force: replace graph and adapter files this package did not write.

    Returns:
        One :class:`SharedParityReport` per task.
    """
    import onnx

    out_dir = Path(out_dir)
    check_output(out_dir, FOLDER)
    check_output(out_dir / MODEL_FILE, GRAPH, force=force)
    check_output(out_dir / ADAPTERS_FOLDER, FOLDER)
    for info in bundle.tasks:
        check_output(
            out_dir / ADAPTERS_FOLDER / f"{info.name}{ADAPTER_SUFFIX}", ADAPTER, force=force
        )
    data = build_shared_graph(bundle, opset=opset).SerializeToString()
    if probe is None:
        probe, probe_name = probe_batch(bundle)
    adapters, reports = {}, []
    with tempfile.TemporaryDirectory(prefix="supsup-shared-") as scratch:
        scratch_model = Path(scratch) / MODEL_FILE
        scratch_model.write_bytes(data)
        try:
            onnx.checker.check_model(str(scratch_model), full_check=True)
        except onnx.checker.ValidationError as error:
            raise SupsupError(f"{out_dir}: the shared graph fails onnx.checker ({error})") from None
        shared = SharedGraph(scratch_model, device=device)
        model = None
        for info in bundle.tasks:
            if model is None:
                model = bundle.model(info.index)
            else:
                bundle.switch(model, info.index)
            adapter = adapter_bytes(shared.feed(bundle, info.index), task=info.index)
            scratch_adapter = Path(scratch) / f"{info.name}{ADAPTER_SUFFIX}"
            scratch_adapter.write_bytes(adapter)
            report = check_shared_parity(
                model, shared, bundle, info.index, scratch_adapter, probe, probe_name=probe_name
            )
            adapter_path = out_dir / ADAPTERS_FOLDER / scratch_adapter.name
            adapters[adapter_path] = adapter
            reports.append(
                SharedParityReport(
                    **{
                        **report.to_dict(),
                        "path": str(out_dir / MODEL_FILE),
                        "adapter": str(adapter_path),
                    }
                )
            )
    atomic_write_bytes(out_dir / MODEL_FILE, data)
    for path, adapter in adapters.items():
        atomic_write_bytes(path, adapter)
    return reports


def export_adapter(
    bundle: Bundle,
    task: int | str,
    path: str | Path,
    *,
    graph: str | Path,
    probe: torch.Tensor | None = None,
    probe_name: str = "seeded random batch",
    device: str = "cpu",
    force: bool = False,
) -> SharedParityReport:
    """Write one task's adapter for an exported shared graph, after proving parity on it.

    Args:
        bundle: the bundle holding the task (its basis must be the graph's).
        task: task id or name; it may have been added after the graph was exported.
        path: the ``.onnx_adapter`` file to write (atomically).
        graph: the shared graph (``model.onnx``) the adapter is for.
        probe: the parity batch (default as :func:`export_shared`).
        probe_name: what ``probe`` is.
        device: ``"cpu"`` or ``"cuda"`` for the parity run.
        force: replace a file at ``path`` that is not an adapter this package wrote.

    Returns:
        The task's :class:`SharedParityReport`.
    """
    info = bundle.task(task)
    path = Path(path)
    check_output(path, ADAPTER, force=force)
    shared = SharedGraph(graph, device=device)
    shared.check_bundle(bundle)
    adapter = adapter_bytes(shared.feed(bundle, info.index), task=info.index)
    if probe is None:
        probe, probe_name = probe_batch(bundle)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(adapter)
        report = check_shared_parity(
            bundle.model(info.index),
            shared,
            bundle,
            info.index,
            scratch,
            probe,
            probe_name=probe_name,
        )
    finally:
        Path(scratch).unlink(missing_ok=True)
    atomic_write_bytes(path, adapter)
    return SharedParityReport(**{**report.to_dict(), "path": str(graph), "adapter": str(path)})
