"""What the graphs this package writes are called and how they are laid out.

The image input and logits output names and the default opset of every graph; the shared
graph's format version, kind and files (``DIR/model.onnx``, ``DIR/tasks/<name>.onnx_adapter``);
and the output kinds :func:`~supsup_deploy.outputs.check_output` knows them by (:data:`GRAPH`,
:data:`ADAPTER`: what supsup-deploy wrote is replaced, anything else only with ``--force``).
"""

from __future__ import annotations

from pathlib import Path

from supsup_deploy.outputs import Output

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
SHARED_FORMAT_VERSION = 2
GRAPH_KIND = "shared"
MODEL_FILE = "model.onnx"
ADAPTERS_FOLDER = "tasks"
ADAPTER_SUFFIX = ".onnx_adapter"


def _our_graph(path: Path) -> bool:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf and onnx raise several unexported types for foreign bytes
        return False
    properties = {entry.key: entry.value for entry in graph.metadata_props}
    task_graph = {"supsup.task_id", "supsup.basis_sha256"} <= set(properties)
    return task_graph or "supsup.graph" in properties


def _our_adapter(path: Path) -> bool:
    import onnxruntime

    try:
        adapter = onnxruntime.AdapterFormat.read_adapter(str(path))
        names = set(adapter.get_parameters())
    except RuntimeError:
        return False
    # an adapter of an earlier shared graph format is still ours: a new export replaces it
    return 1 <= adapter.get_model_version() <= SHARED_FORMAT_VERSION and "alpha" in names


GRAPH = Output("an ONNX graph", _our_graph)
"""A per-task or shared graph, as :func:`~supsup_deploy.outputs.check_output` writes it."""
ADAPTER = Output("an ONNX Runtime adapter", _our_adapter)
"""A task's adapter of a shared graph, as :func:`~supsup_deploy.outputs.check_output` writes it."""


def is_shared_graph(path: str | Path) -> bool:
    """Whether an ONNX file is a shared graph (its ``supsup.graph`` metadata)."""
    import onnx

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # onnx raises protobuf's and its own errors; ONNX Runtime reports them
        return False
    return any(p.key == "supsup.graph" and p.value == GRAPH_KIND for p in model.metadata_props)
