"""Tasks as ONNX Runtime adapters of a shared graph (:mod:`.shared_graph`).

An adapter file (``<name>.onnx_adapter``) is ONNX Runtime's own format
(``onnxruntime.AdapterFormat``): one parameter per task tensor, under the task file's tensor
name, in the dtype the shared graph's input takes. Its adapter version is the task id and its
model version the shared graph format version. At run time ``onnxruntime.LoraAdapter`` maps it
and ``RunOptions.add_active_adapter`` overrides the graph's task inputs for one run.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from supsup_deploy.bundles.validation import check_task_tensors
from supsup_deploy.errors import FormatError
from supsup_deploy.onnx_graphs.format import SHARED_FORMAT_VERSION
from supsup_deploy.onnx_graphs.shared_graph import TaskInput


@dataclass(frozen=True)
class TaskAdapter:
    """A checked adapter file, mapped by ONNX Runtime and ready to activate in a run."""

    path: Path
    task: int
    tensors: dict[str, np.ndarray]
    lora: Any

    def run_options(self):
        """``onnxruntime.RunOptions`` with this adapter active."""
        import onnxruntime

        options = onnxruntime.RunOptions()
        options.add_active_adapter(self.lora)
        return options


def adapter_bytes(tensors: dict[str, np.ndarray], *, task: int) -> bytes:
    """An adapter file's bytes for a task's tensors (already in the graph inputs' dtypes).

    Args:
        tensors: task tensor name to array.
        task: the task id, stored as the adapter version.

    Returns:
        The file's bytes.
    """
    import onnxruntime

    adapter = onnxruntime.AdapterFormat()
    adapter.set_adapter_version(task)
    adapter.set_model_version(SHARED_FORMAT_VERSION)
    adapter.set_parameters(
        {
            name: onnxruntime.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(values))
            for name, values in sorted(tensors.items())
        }
    )
    handle, scratch = tempfile.mkstemp(suffix=".onnx_adapter")
    os.close(handle)
    try:
        adapter.export_adapter(scratch)
        return Path(scratch).read_bytes()
    finally:
        Path(scratch).unlink(missing_ok=True)


def load_adapter(path: str | Path, inputs: tuple[TaskInput, ...]) -> TaskAdapter:
    """Read and check an adapter file against a shared graph's task inputs, then map it.

    Args:
        path: the ``.onnx_adapter`` file.
        inputs: the shared graph's task inputs (names, dtypes, shapes).

    Returns:
        A :class:`TaskAdapter`.

    Raises:
        FormatError: the file is missing, not an adapter, or does not fit the graph.
    """
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such adapter file")
    try:
        adapter = onnxruntime.AdapterFormat.read_adapter(str(path))
        # the arrays view memory the AdapterFormat owns: copy them before it is freed
        parameters = {
            name: value.numpy().copy() for name, value in adapter.get_parameters().items()
        }
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1].split(") ")[-1]
        raise FormatError(f"{path}: not an ONNX Runtime adapter ({reason})") from None
    if adapter.get_model_version() != SHARED_FORMAT_VERSION:
        raise FormatError(
            f"{path}: adapter for shared graph format {adapter.get_model_version()}, "
            f"this version runs format {SHARED_FORMAT_VERSION}"
        )
    check_task_tensors(
        path,
        parameters,
        {spec.name: (spec.shape, (spec.dtype,)) for spec in inputs},
        holds="adapter holds",
        wanted="the shared graph takes",
    )
    lora = onnxruntime.LoraAdapter()
    lora.Load(str(path))
    return TaskAdapter(path=path, task=adapter.get_adapter_version(), tensors=parameters, lora=lora)
