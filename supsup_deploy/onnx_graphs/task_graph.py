"""One task's ONNX graph: the task's materialised model as plain PyTorch modules, traced.

The exported network is the task's materialised model with every norm that directly follows a
conv folded into that conv (weight scaled, bias added), so the graph holds only the task's own
tensors as initializers, named after the PyTorch parameters. More tasks of a bundle then swap
those initializers in the graph traced once (:class:`TaskGraphs`), instead of tracing again.
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from typing import Protocol

import numpy as np
import torch
from torch import nn

from supsup_deploy.bundles.format import TaskInfo
from supsup_deploy.bundles.reader import Bundle
from supsup_deploy.errors import ConfigError
from supsup_deploy.masked_layers import MaskedConv2d, MaskedLinear
from supsup_deploy.models import MaskedModel
from supsup_deploy.normalization import GroupNorm2d, TaskBatchNorm2d
from supsup_deploy.onnx_graphs.format import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME


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


class TaskGraphs:
    """A bundle's per-task graphs: the network traced once, the weights swapped in after.

    Args:
        bundle: a loaded bundle.
        opset: ONNX opset.
        exporter: ``"dynamo"`` (default PyTorch exporter) or ``"legacy"`` (TorchScript-based).
        fp16: store weights in float16 (inputs and outputs stay float32).
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        opset: int = DEFAULT_OPSET,
        exporter: str = "dynamo",
        fp16: bool = False,
    ) -> None:
        self.tracer = _tracer(exporter)
        self.bundle = bundle
        self.opset = opset
        self.exporter = exporter
        self.fp16 = fp16
        self._template = None
        self.traces = 0

    def graph(self, model: MaskedModel, info: TaskInfo):
        """The graph (an ``onnx.ModelProto``) of ``model``, the bundle's model running ``info``'s
        task, with the task's metadata; not yet checked."""
        plain = inference_module(model).cpu()
        graph = self._graph_for(plain)
        self._add_metadata(graph, info)
        if self.fp16:
            graph = _weights_to_fp16(graph)
        return graph

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
