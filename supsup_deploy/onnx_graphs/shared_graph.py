"""One ONNX graph for every task of a bundle: the basis as a graph, each task as its inputs.

``model.onnx`` holds no task's weights. Per masked layer it holds the backbone signs and basis
masks as one small integer code per weight (:func:`code_planes`), and the layer's weight
constant. Its inputs are the images and, as overridable initializers (graph inputs that carry a
default value), one input per tensor of a task file under the task file's own name and dtype
(``alpha``, and ``norm.running_mean`` / ``norm.running_var`` for BatchNorm bundles). Each
run builds every alpha row's value table exactly as
:func:`supsup_deploy.binary_masks.code_value_table` does (doubling in float32, times the
constant, then the negated half), gathers the weights through the codes, and runs the
network, so the weights are bit-exact to :meth:`Bundle.materialize` while the codes fit one
plane (``|B| <= 15``).

Alpha tables may hold several rows per layer (:mod:`supsup_deploy.alpha_groups`), and tasks of
one bundle may hold different counts ``G``. The graph's ``alpha`` input is ``[L, G*, |B|]`` with
``G*`` the least common multiple of the installed tasks' counts (:func:`task_inputs`); a task is
fed widened to ``G*`` rows (:func:`~supsup_deploy.alpha_groups.expand_groups`, the same
weights). A layer's codes are stored per group of output channels
(:func:`~supsup_deploy.alpha_groups.group_bounds`), each group gathers from its own row's table,
and the groups are concatenated into the weight; with ``G* = 1`` one gather makes the weight. A
task whose ``G`` does not divide ``G*`` (learned after the export) needs the graph exported again.

A task is then either fed as plain inputs (its safetensors tensors) or activated as an ONNX
Runtime adapter (``tasks/<name>.onnx_adapter``, see :mod:`supsup_deploy.onnx_graphs.adapters`).
The graph uses Cast, Split, Add, Concat, Mul, Neg, Gather, Sum and the network's own ops only: no
integer arithmetic at run time, so the CPU and CUDA execution providers run all of it. Its ONNX
Runtime session is :class:`supsup_deploy.onnx_graphs.sessions.SharedGraph`.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from supsup_deploy import backbone
from supsup_deploy.alpha_groups import common_groups, expand_groups, group_bounds
from supsup_deploy.bundles.format import FLOAT_DTYPES
from supsup_deploy.bundles.reader import Bundle
from supsup_deploy.errors import FormatError
from supsup_deploy.masked_layers import WeightSource
from supsup_deploy.models import ModelConfig, build_model, masked_layers
from supsup_deploy.normalization import TaskBatchNorm2d
from supsup_deploy.onnx_graphs.format import (
    DEFAULT_OPSET,
    GRAPH_KIND,
    INPUT_NAME,
    OUTPUT_NAME,
    SHARED_FORMAT_VERSION,
)

MAX_PLANE_BASIS_BITS = 15
"""Basis bits one code plane holds beside the sign bit (a uint16 code)."""


@dataclass(frozen=True)
class CodePlane:
    """Basis masks ``start`` to ``stop - 1`` of every weight plus its sign bit, as one integer.

    Bit ``t - start`` is basis mask ``t``, bit ``stop - start`` the backbone sign, so the plane's
    value table has ``2 ** (stop - start + 1)`` entries; one byte per weight up to 7 basis masks,
    two bytes up to 15.
    """

    start: int
    stop: int

    @property
    def bits(self) -> int:
        return self.stop - self.start + 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.bits <= 8 else np.uint16)


def code_planes(num_basis: int) -> tuple[CodePlane, ...]:
    """How a layer's codes are split: one plane while ``|B| <= 15``, then 15 basis bits a plane.

    Every plane carries the sign bit, so a weight is the sum of one gather per plane; with one
    plane that gather is exactly the materialised weight.

    Args:
        num_basis: ``|B|``.

    Returns:
        The planes, in basis order.
    """
    return tuple(
        CodePlane(start, min(num_basis, start + MAX_PLANE_BASIS_BITS))
        for start in range(0, num_basis, MAX_PLANE_BASIS_BITS)
    )


def plane_codes(codes: torch.Tensor, num_basis: int, plane: CodePlane) -> np.ndarray:
    """One plane of a layer's int32 codes (:func:`supsup_deploy.binary_masks.mask_codes` layout)."""
    width = plane.stop - plane.start
    basis_bits = (codes >> plane.start) & ((1 << width) - 1)
    sign = (codes >> num_basis) & 1
    return (basis_bits | (sign << width)).numpy().astype(plane.dtype)


@dataclass(frozen=True)
class TaskInput:
    """One task tensor as a graph input: the task file's name, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def task_inputs(bundle: Bundle) -> tuple[TaskInput, ...]:
    """The graph's task inputs: every task tensor of the bundle, float16 only where every
    installed task stores it in float16 (a float16 task feeds a float32 input exactly), and
    ``alpha`` as ``[L, G*, |B|]`` with ``G*`` the installed tasks' common row count
    (:func:`~supsup_deploy.alpha_groups.common_groups`)."""
    expected = bundle.task_tensor_shapes
    tensors = [bundle.task_tensors(info.index) for info in bundle.tasks]
    inputs = []
    for name in sorted(expected):
        dtypes = {task[name].dtype for task in tensors}
        dtype = "float16" if dtypes == {torch.float16} else "float32"
        shape = tuple(expected[name])
        if name == "alpha":
            groups = common_groups(int(task[name].shape[1]) for task in tensors)
            shape = (shape[0], groups, shape[-1])
        inputs.append(TaskInput(name, dtype, shape))
    return tuple(inputs)


def task_feed(bundle: Bundle, task: int | str, inputs: tuple[TaskInput, ...]) -> dict[str, Any]:
    """A task's tensors as numpy arrays in the graph inputs' dtypes, its alpha table widened to
    the graph's rows per layer (raises on a lossy cast or a row count the graph cannot take)."""
    tensors = bundle.task_tensors(task)
    feed = {}
    for spec in inputs:
        tensor = tensors[spec.name]
        if tensor.dtype == torch.float32 and spec.dtype == "float16":
            info = bundle.task(task)
            raise FormatError(
                f"{info.path}: {spec.name} is float32 but the shared graph takes float16; "
                "export the shared graph again to include this task"
            )
        if spec.name == "alpha":
            groups, graph_groups = int(tensor.shape[1]), int(spec.shape[1])
            if graph_groups % groups:
                info = bundle.task(task)
                raise FormatError(
                    f"{info.path}: alpha has {groups} rows per layer but the shared graph takes "
                    f"{graph_groups}, not a multiple; export the shared graph again to include "
                    "this task"
                )
            tensor = expand_groups(tensor, graph_groups)
        feed[spec.name] = tensor.to(FLOAT_DTYPES[spec.dtype]).numpy()
    return feed


class _FedWeight(WeightSource):
    """A weight given to the network's forward call (a graph input while tracing)."""

    def __init__(self) -> None:
        super().__init__()
        self.current: torch.Tensor | None = None

    def weight(self, layer) -> torch.Tensor:
        return self.current


class _FedBatchNorm(nn.Module):
    """Inference BatchNorm whose statistics are given to the forward call."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(inputs, self.mean, self.var, None, None, False, 0.0, self.eps)


class _FedNetwork(nn.Module):
    """The bundle's network taking its weights and norm statistics as forward arguments."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.network = build_model(ModelConfig.from_dict({**config.to_dict(), "num_tasks": 1}))
        self.sources = []
        for layer in masked_layers(self.network):
            source = _FedWeight()
            layer.set_source(source)
            self.sources.append(source)
        self.norms = []
        self.norm_sizes = []
        for path, module in list(self.network.named_modules()):
            if isinstance(module, TaskBatchNorm2d):
                fed = _FedBatchNorm(module.eps)
                parent_path, _, name = path.rpartition(".")
                parent = self.network.get_submodule(parent_path) if parent_path else self.network
                setattr(parent, name, fed)
                self.norms.append(fed)
                self.norm_sizes.append(module.num_features)
        self.network.eval()

    def forward(self, images: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        weights, statistics = tensors[: len(self.sources)], tensors[len(self.sources) :]
        for source, weight in zip(self.sources, weights, strict=True):
            source.current = weight
        for index, norm in enumerate(self.norms):
            norm.mean, norm.var = statistics[2 * index], statistics[2 * index + 1]
        return self.network(images)


def _network_graph(bundle: Bundle, opset: int):
    """The network traced with every weight and norm statistic as a graph input."""
    import onnx

    network = _FedNetwork(bundle.config)
    spec = bundle.input
    example = [torch.zeros(2, spec.channels, spec.size, spec.size)]
    names = [INPUT_NAME]
    for layer, shape in enumerate(bundle.summary.weight_shapes):
        example.append(torch.zeros(shape))
        names.append(_weight_name(layer))
    for index, norm in enumerate(network.norm_sizes):
        example += [torch.zeros(norm), torch.ones(norm)]
        names += [_statistic_name("mean", index), _statistic_name("var", index)]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network,
            tuple(example),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=False,
        )
    return onnx.load_from_string(buffer.getvalue()), network


def _weight_name(layer: int) -> str:
    return f"shared.weight.{layer:03d}"


def _statistic_name(kind: str, index: int) -> str:
    return f"shared.norm_{kind}.{index:03d}"


def build_shared_graph(bundle: Bundle, *, opset: int = DEFAULT_OPSET):
    """The bundle's shared graph (an ``onnx.ModelProto``), its defaults the first task's tensors.

    Args:
        bundle: a loaded bundle with at least one task.
        opset: ONNX opset.

    Returns:
        The model, not yet checked against PyTorch (:func:`export_shared_graph` does that).
    """
    from onnx import TensorProto, helper, numpy_helper

    if not bundle.tasks:
        raise FormatError(f"{bundle.path}: the bundle has no tasks to build a shared graph for")
    model, network = _network_graph(bundle, opset)
    graph = model.graph
    inputs = task_inputs(bundle)
    images = [value for value in graph.input if value.name == INPUT_NAME]
    del graph.input[:]
    graph.input.extend(images)
    defaults = task_feed(bundle, bundle.tasks[0].index, inputs)
    initializers, nodes = [], []
    float_names = {}
    for spec in inputs:
        graph.input.append(
            helper.make_tensor_value_info(
                spec.name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)), spec.shape
            )
        )
        initializers.append(numpy_helper.from_array(defaults[spec.name], spec.name))
        float_names[spec.name] = spec.name
        if spec.dtype != "float32":
            float_names[spec.name] = f"shared.{spec.name}.float32"
            nodes.append(
                helper.make_node(
                    "Cast", [spec.name], [float_names[spec.name]], to=TensorProto.FLOAT
                )
            )
    num_layers, num_basis = bundle.summary.masked_layers, bundle.num_basis
    groups = {spec.name: spec for spec in inputs}["alpha"].shape[1]
    columns = [f"shared.alpha.column.{basis:02d}" for basis in range(num_basis)]
    nodes.append(
        helper.make_node("Split", [float_names["alpha"]], columns, axis=2, num_outputs=num_basis)
    )
    shapes = bundle.summary.weight_shapes
    constants = [backbone.weight_constant(backbone.fan_in(shape)) for shape in shapes]
    initializers += [
        numpy_helper.from_array(np.array(constants, np.float32)[:, None, None], "shared.constant"),
        numpy_helper.from_array(np.zeros((num_layers, groups, 1), np.float32), "shared.zeros"),
    ]
    planes = code_planes(num_basis)
    for number, plane in enumerate(planes):
        sums = "shared.zeros"
        for basis in range(plane.start, plane.stop):
            added, doubled = (
                f"shared.table.{number}.{kind}.{basis:02d}" for kind in ("add", "sums")
            )
            nodes.append(helper.make_node("Add", [sums, columns[basis]], [added]))
            nodes.append(helper.make_node("Concat", [sums, added], [doubled], axis=2))
            sums = doubled
        values, negated = f"shared.table.{number}.values", f"shared.table.{number}.negated"
        nodes.append(helper.make_node("Mul", [sums, "shared.constant"], [values]))
        nodes.append(helper.make_node("Neg", [values], [negated]))
        nodes.append(
            helper.make_node("Concat", [values, negated], [f"shared.table.{number}"], axis=2)
        )
    used_groups = set()
    codes = bundle.codes()
    for layer, shape in enumerate(shapes):
        position = f"shared.layer.{layer:03d}"
        initializers.append(numpy_helper.from_array(np.array(layer, np.int64), position))
        bounds = [
            (group, start, stop)
            for group, (start, stop) in enumerate(group_bounds(shape[0], groups))
            if stop > start
        ]
        used_groups.update(group for group, _, _ in bounds)
        planes_out = []
        for number, plane in enumerate(planes):
            layer_suffix = f"{layer:03d}" if len(planes) == 1 else f"{layer:03d}.{number}"
            rows = f"shared.rows.{layer_suffix}"
            nodes.append(
                helper.make_node("Gather", [f"shared.table.{number}", position], [rows], axis=0)
            )
            values = plane_codes(codes[layer], num_basis, plane).reshape(shape)
            plane_out = _weight_name(layer) if len(planes) == 1 else f"shared.part.{layer_suffix}"
            parts = []
            for group, start, stop in bounds:
                suffix = layer_suffix if groups == 1 else f"{layer_suffix}.g{group:03d}"
                code_name, row, index = (
                    f"shared.{kind}.{suffix}" for kind in ("codes", "row", "index")
                )
                initializers.append(
                    numpy_helper.from_array(np.ascontiguousarray(values[start:stop]), code_name)
                )
                part = plane_out if len(bounds) == 1 else f"shared.group_part.{suffix}"
                nodes += [
                    helper.make_node("Gather", [rows, f"shared.group.{group:03d}"], [row], axis=0),
                    helper.make_node("Cast", [code_name], [index], to=TensorProto.INT32),
                    helper.make_node("Gather", [row, index], [part], axis=0),
                ]
                parts.append(part)
            if len(parts) > 1:
                nodes.append(helper.make_node("Concat", parts, [plane_out], axis=0))
            planes_out.append(plane_out)
        if len(planes_out) > 1:
            nodes.append(helper.make_node("Sum", planes_out, [_weight_name(layer)]))
    initializers += [
        numpy_helper.from_array(np.array(group, np.int64), f"shared.group.{group:03d}")
        for group in sorted(used_groups)
    ]
    if network.norm_sizes:
        sizes = "shared.norm_sizes"
        initializers.append(numpy_helper.from_array(np.array(network.norm_sizes, np.int64), sizes))
        for kind, name in (("mean", "norm.running_mean"), ("var", "norm.running_var")):
            outputs = [_statistic_name(kind, index) for index in range(len(network.norm_sizes))]
            nodes.append(helper.make_node("Split", [float_names[name], sizes], outputs, axis=0))
    network_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + network_nodes)
    graph.initializer.extend(initializers)
    _set_metadata(model, bundle, inputs)
    return model


def _set_metadata(model, bundle: Bundle, inputs: tuple[TaskInput, ...]) -> None:
    values = {
        "supsup.graph": GRAPH_KIND,
        "supsup.shared_format_version": str(SHARED_FORMAT_VERSION),
        "supsup.basis_sha256": bundle.basis_sha256,
        "supsup.bundle_format_version": str(bundle.format_version),
        "supsup.arch": bundle.config.arch,
        "supsup.input": json.dumps(bundle.input.to_dict(), sort_keys=True),
        "supsup.num_basis": str(bundle.num_basis),
        "supsup.task_inputs": json.dumps([spec.to_dict() for spec in inputs]),
        "supsup.default_task": str(bundle.tasks[0].index),
        "supsup.tasks": json.dumps(
            [
                {"index": info.index, "name": info.name, "class_names": list(info.class_names)}
                for info in bundle.tasks
            ]
        ),
    }
    del model.metadata_props[:]
    for key, value in values.items():
        model.metadata_props.add(key=key, value=value)


def code_bytes_per_weight(num_basis: int) -> int:
    """Bytes per masked weight the codes take for ``|B|`` basis masks."""
    return sum(plane.dtype.itemsize for plane in code_planes(num_basis))
