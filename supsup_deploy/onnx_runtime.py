"""ONNX Runtime sessions: open a graph on a device and run float32 images through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from supsup_deploy.devices import onnx_providers, resolve_device
from supsup_deploy.errors import SupsupError


def onnx_session(
    source: str | Path | bytes,
    *,
    device: str = "cpu",
    name: str | Path | None = None,
    disabled_optimizers: tuple[str, ...] = (),
    memory_arena: bool = True,
):
    """An ONNX Runtime session on ``device`` (see :func:`supsup_deploy.devices.resolve_device`;
    CUDA runs on that GPU index and needs onnxruntime-gpu).

    Args:
        source: the graph's file, or its bytes.
        device: where it runs.
        name: what the error message calls the graph (default ``source`` when it is a path).
        disabled_optimizers: ONNX Runtime graph optimizers to leave out.
        memory_arena: keep the buffers of a run for the next (ONNX Runtime's CPU memory arena)
            instead of freeing them.
    """
    import onnxruntime

    providers = onnx_providers(resolve_device(device))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = memory_arena
    graph = source if isinstance(source, bytes) else str(source)
    try:
        return onnxruntime.InferenceSession(
            graph, options, providers=providers, disabled_optimizers=list(disabled_optimizers)
        )
    except Exception as error:  # onnxruntime raises its own unexported exception types
        label = name or ("the graph" if isinstance(source, bytes) else source)
        raise SupsupError(f"{label}: ONNX Runtime cannot load it ({error})") from None


def run_onnx(session, images: torch.Tensor) -> np.ndarray:
    """Logits from an ONNX Runtime session for float32 images."""
    name = session.get_inputs()[0].name
    return session.run(None, {name: images.detach().cpu().numpy().astype(np.float32)})[0]
