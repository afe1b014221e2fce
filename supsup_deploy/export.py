"""ONNX export with a parity check against the PyTorch model, always: the per-task graph
(:class:`TaskExporter`), the shared graph (:func:`export_shared`) and its adapters
(:func:`export_adapter`), each a target in :mod:`supsup_deploy.export_targets` with its tolerance.

The exported network is the task's materialised model with every norm that directly follows a
conv folded into that conv (weight scaled, bias added), so the graph holds only the task's own
tensors as initializers, named after the PyTorch parameters. Exporting more tasks of a bundle then
swaps those initializers in the graph traced once, instead of tracing again. Every graph is checked
(``onnx.checker`` full check, then ONNX Runtime against PyTorch) from a scratch file beside the
output before the same bytes are written into place atomically (fsynced, with the umask's
permissions), so a killed export leaves the earlier file or the new one, never a partial one.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from supsup_deploy.bundles.reader import Bundle
from supsup_deploy.devices import resolve_device
from supsup_deploy.errors import ConfigError, SupsupError
from supsup_deploy.export_targets import export_target
from supsup_deploy.files import atomic_write_bytes
from supsup_deploy.masked_layers import MaskedConv2d, MaskedLinear
from supsup_deploy.models import MaskedModel
from supsup_deploy.normalization import GroupNorm2d, TaskBatchNorm2d
from supsup_deploy.onnx_runtime import onnx_session, run_onnx
from supsup_deploy.outputs import ADAPTER, FOLDER, GRAPH, check_output

DEFAULT_OPSET = 18
PROBE_BATCH = 64
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class ParityError(SupsupError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance."""


@dataclass(frozen=True)
class ParityReport:
    """How closely an exported graph matches the PyTorch model on a probe batch."""

    task: int
    path: str
    max_abs_diff: float
    tolerance: float
    argmax_equal: bool
    probe: str
    batch: int
    provider: str
    precision: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inference_module(model: MaskedModel) -> nn.Module:
    """A plain copy of a bundle model: ``nn.Conv2d``/``nn.Linear`` with the task's weights, each
    conv-following BatchNorm folded into its conv, other norms as standard non-affine modules."""
    plain = copy.deepcopy(model).eval()
    folded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for conv_path, norm_path in plain.conv_norm_pairs():
        norm = plain.get_submodule(norm_path)
        if isinstance(norm, TaskBatchNorm2d):
            scale = torch.rsqrt(norm.running_var[norm.task] + norm.eps)
            folded[conv_path] = (scale, -norm.running_mean[norm.task] * scale)
            _replace(plain, norm_path, nn.Identity())
    for path, module in list(plain.named_modules()):
        if isinstance(module, MaskedConv2d):
            weight = module.effective_weight().detach()
            conv = nn.Conv2d(
                weight.shape[1],
                weight.shape[0],
                weight.shape[2],
                stride=module.stride,
                padding=module.padding,
                bias=path in folded,
            )
            with torch.no_grad():
                if path in folded:
                    scale, bias = folded[path]
                    conv.weight.copy_(weight * scale.view(-1, 1, 1, 1))
                    conv.bias.copy_(bias)
                else:
                    conv.weight.copy_(weight)
            _replace(plain, path, conv)
        elif isinstance(module, MaskedLinear):
            weight = module.effective_weight().detach()
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            with torch.no_grad():
                linear.weight.copy_(weight)
            _replace(plain, path, linear)
        elif isinstance(module, TaskBatchNorm2d):
            norm = nn.BatchNorm2d(module.num_features, eps=module.eps, affine=False)
            with torch.no_grad():
                norm.running_mean.copy_(module.running_mean[module.task])
                norm.running_var.copy_(module.running_var[module.task])
            _replace(plain, path, norm)
        elif isinstance(module, GroupNorm2d):
            _replace(
                plain,
                path,
                nn.GroupNorm(module.groups, module.num_features, module.eps, affine=False),
            )
    return plain.eval()


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


class Tracer(Protocol):
    """Turns a plain module into an ONNX model with a dynamic batch axis."""

    def __call__(self, module: nn.Module, example: torch.Tensor, opset: int): ...


def _trace_dynamo(module: nn.Module, example: torch.Tensor, opset: int):
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        opset_version=opset,
        verbose=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    return program.model_proto


def _trace_legacy(module: nn.Module, example: torch.Tensor, opset: int):
    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        (example,),
        buffer,
        dynamo=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    return onnx.load_from_string(buffer.getvalue())


TRACERS: dict[str, Tracer] = {"dynamo": _trace_dynamo, "legacy": _trace_legacy}
"""PyTorch's ONNX exporters by name: ``dynamo`` (the default) and ``legacy`` (TorchScript)."""
EXPORTERS = tuple(TRACERS)


def _tracer(exporter: str) -> Tracer:
    if exporter not in TRACERS:
        raise ConfigError(f"unknown exporter {exporter!r}: use {' or '.join(EXPORTERS)}")
    return TRACERS[exporter]


class TaskExporter:
    """Exports a bundle's tasks to ONNX, tracing the network once and swapping weights after.

    Args:
        bundle: a loaded bundle.
        opset: ONNX opset.
        exporter: ``"dynamo"`` (default PyTorch exporter) or ``"legacy"`` (TorchScript-based).
        fp16: store weights in float16 (inputs and outputs stay float32).
        device: where the parity check runs, PyTorch and ONNX Runtime alike (see
            :func:`supsup_deploy.devices.resolve_device`); the graph is the same on every device.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        opset: int = DEFAULT_OPSET,
        exporter: str = "dynamo",
        fp16: bool = False,
        device: str = "cpu",
    ) -> None:
        self.tracer = _tracer(exporter)
        export_target("task").validate(precision="float16" if fp16 else "float32")
        self.bundle = bundle
        self.opset = opset
        self.exporter = exporter
        self.fp16 = fp16
        self.device = resolve_device(device)
        self._template = None
        self._model: MaskedModel | None = None
        self.traces = 0

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
        plain = inference_module(self._model).cpu()
        graph = self._graph_for(plain)
        self._add_metadata(graph, info)
        if self.fp16:
            graph = _weights_to_fp16(graph)
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

    def _graph_for(self, plain: nn.Module):
        import onnx

        state = {name: tensor.detach().cpu().numpy() for name, tensor in plain.state_dict().items()}
        if self._template is not None and _swappable(self._template, state):
            graph = copy.deepcopy(self._template)
            for initializer in graph.graph.initializer:
                if initializer.name in state:
                    values = onnx.numpy_helper.from_array(state[initializer.name], initializer.name)
                    initializer.CopyFrom(values)
            return graph
        example = torch.zeros(
            2, self.bundle.input.channels, self.bundle.input.size, self.bundle.input.size
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = self.tracer(plain, example, self.opset)
        self.traces += 1
        if _swappable(graph, state):
            self._template = graph
        return copy.deepcopy(graph)

    def _add_metadata(self, graph, info) -> None:
        spec = self.bundle.input
        values = {
            "supsup.task_id": str(info.index),
            "supsup.task_name": info.name,
            "supsup.class_names": json.dumps(list(info.class_names)),
            "supsup.basis_sha256": self.bundle.basis_sha256,
            "supsup.bundle_format_version": str(self.bundle.format_version),
            "supsup.arch": self.bundle.config.arch,
            "supsup.input": json.dumps(spec.to_dict(), sort_keys=True),
            "supsup.precision": "float16" if self.fp16 else "float32",
        }
        del graph.metadata_props[:]
        for key, value in values.items():
            graph.metadata_props.add(key=key, value=value)


def _swappable(graph, state: dict[str, np.ndarray]) -> bool:
    """Whether the task's tensors are exactly the graph's float initializers (by name and shape);
    other initializers must be integer constants such as shapes, which no task changes."""
    from onnx import TensorProto

    weights = {name for name in state if not name.endswith("num_batches_tracked")}
    initializers = {initializer.name: initializer for initializer in graph.graph.initializer}
    if not weights <= set(initializers):
        return False
    for name, initializer in initializers.items():
        if name in weights:
            if tuple(initializer.dims) != state[name].shape:
                return False
        elif initializer.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            return False
    return True


def _weights_to_fp16(graph):
    """Store float initializers as float16 with a Cast back to float32 where they are used."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = copy.deepcopy(graph)
    casts = []
    for initializer in graph.graph.initializer:
        if initializer.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(initializer).astype(np.float16)
        name = initializer.name
        initializer.CopyFrom(numpy_helper.from_array(values, f"{name}.fp16"))
        casts.append(helper.make_node("Cast", [f"{name}.fp16"], [name], to=TensorProto.FLOAT))
    nodes = list(graph.graph.node)
    del graph.graph.node[:]
    graph.graph.node.extend(casts + nodes)
    onnx.checker.check_model(graph)
    return graph


def probe_batch(bundle: Bundle, batch: int = PROBE_BATCH) -> tuple[torch.Tensor, str]:
    """Real test images of the bundle's dataset when it is available, else a seeded batch."""
    from supsup_deploy import data as datasets

    name = bundle.dataset
    if name:
        try:
            test = datasets.load_dataset(name, split="test")
        except SupsupError:
            pass
        else:
            images = test.images[:batch]
            if images.shape[1:] == (bundle.input.channels, bundle.input.size, bundle.input.size):
                return datasets.preprocess_images(images, bundle.input), f"{name} test images"
    return seeded_probe(bundle, batch), "seeded random batch"


def seeded_probe(bundle: Bundle, batch: int = PROBE_BATCH) -> torch.Tensor:
    """A reproducible normal batch of the bundle's input shape (used when no images are given)."""
    generator = torch.Generator().manual_seed(0)
    spec = bundle.input
    return torch.randn(batch, spec.channels, spec.size, spec.size, generator=generator)


@torch.no_grad()
def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    probe: torch.Tensor,
    *,
    task: int,
    fp16: bool = False,
    probe_name: str = "probe",
    device: str = "cpu",
) -> ParityReport:
    """Compare ONNX Runtime with the PyTorch model; raise ParityError beyond the tolerance."""
    session = onnx_session(onnx_path, device=device)
    expected = model(probe.to(next(iter(model.buffers())).device)).cpu().numpy()
    got = run_onnx(session, probe)
    difference = float(np.abs(got - expected).max())
    argmax_equal = bool((got.argmax(1) == expected.argmax(1)).all())
    tolerance = export_target("task").tolerance("float16" if fp16 else "float32")
    report = ParityReport(
        task=task,
        path=str(onnx_path),
        max_abs_diff=difference,
        tolerance=tolerance,
        argmax_equal=argmax_equal,
        probe=probe_name,
        batch=len(probe),
        provider=session.get_providers()[0],
        precision="float16" if fp16 else "float32",
    )
    if difference > tolerance or not argmax_equal:
        raise ParityError(
            f"parity failed for task {task}: max |logit difference| {difference:.3g} "
            f"(tolerance {tolerance:g}), argmax equal: {argmax_equal}, on {len(probe)} {probe_name}"
        )
    return report


@dataclass(frozen=True)
class SharedParityReport:
    """How closely the shared graph, fed one task, matches that task's PyTorch model."""

    task: int
    name: str
    path: str
    adapter: str
    max_abs_diff_inputs: float
    max_abs_diff_adapter: float
    tolerance: float
    argmax_equal: bool
    probe: str
    batch: int
    provider: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    from supsup_deploy.adapters import adapter_bytes
    from supsup_deploy.shared_graph import (
        ADAPTER_SUFFIX,
        ADAPTERS_FOLDER,
        MODEL_FILE,
        SharedGraph,
        build_shared_graph,
    )

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
    from supsup_deploy.adapters import adapter_bytes
    from supsup_deploy.shared_graph import SharedGraph

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


@torch.no_grad()
def check_shared_parity(
    model: nn.Module,
    shared,
    bundle: Bundle,
    task: int,
    adapter_path: str | Path,
    probe: torch.Tensor,
    *,
    probe_name: str = "probe",
) -> SharedParityReport:
    """The shared graph fed ``task`` as plain inputs and as its adapter against the PyTorch
    model; raise ParityError beyond the fp32 tolerance or on any differing argmax."""
    from supsup_deploy.adapters import load_adapter

    info = bundle.task(task)
    tolerance = export_target("shared").tolerance()
    adapter_tolerance = export_target("adapter").tolerance()
    expected = model(probe.to(next(iter(model.buffers())).device)).cpu().numpy()
    fed = shared.run(probe, feed=shared.feed(bundle, task))
    adapted = shared.run(probe, adapter=load_adapter(adapter_path, shared.inputs))
    differences = [float(np.abs(got - expected).max()) for got in (fed, adapted)]
    argmax_equal = all(bool((got.argmax(1) == expected.argmax(1)).all()) for got in (fed, adapted))
    within = differences[0] <= tolerance and differences[1] <= adapter_tolerance
    if not within or not argmax_equal:
        raise ParityError(
            f"shared graph parity failed for task {task}: max |logit difference| "
            f"{max(differences):.3g} (plain inputs {differences[0]:.3g}, adapter "
            f"{differences[1]:.3g}; tolerance {tolerance:g}), argmax equal: {argmax_equal}, "
            f"on {len(probe)} {probe_name}"
        )
    return SharedParityReport(
        task=task,
        name=info.name,
        path=str(shared.path),
        adapter=str(adapter_path),
        max_abs_diff_inputs=differences[0],
        max_abs_diff_adapter=differences[1],
        tolerance=tolerance,
        argmax_equal=argmax_equal,
        probe=probe_name,
        batch=len(probe),
        provider=shared.provider,
    )
