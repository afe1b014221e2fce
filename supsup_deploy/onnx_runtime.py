"""ONNX Runtime sessions: open a graph on a device and run float32 images through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from supsup_deploy.devices import onnx_providers, resolve_device
from supsup_deploy.errors import SupsupError

SERVING_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}
"""For sessions that share a process with many others (the shared session, specialised ones):
threads that spin for work after a run take the cores from the next run on another session
(a mixed stream over 34 open gem_resnet18 sessions: 0.086 s per request spinning, 0.025 s not)."""


def onnx_session(
    source: str | Path | bytes,
    *,
    device: str = "cpu",
    name: str | Path | None = None,
    disabled_optimizers: tuple[str, ...] = (),
    spinning: bool = True,
):
    """An ONNX Runtime session on ``device`` (see :func:`supsup_deploy.devices.resolve_device`;
    CUDA runs on that GPU index and needs onnxruntime-gpu).

    Args:
        source: the graph's file, or its bytes.
        device: where it runs.
        name: what the error message calls the graph (default ``source`` when it is a path).
        disabled_optimizers: ONNX Runtime graph optimizers to leave out.
        spinning: let the session's threads spin for work after a run (see
            :data:`SERVING_SESSION_CONFIG`).
    """
    import onnxruntime

    providers = onnx_providers(resolve_device(device))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if not spinning:
        for key, value in SERVING_SESSION_CONFIG.items():
            options.add_session_config_entry(key, value)
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
