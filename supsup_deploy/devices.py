"""Where computation runs: one parser for ``--device`` (auto, cpu, cuda, cuda:N) shared by every
command, and the matching ONNX Runtime providers."""

from __future__ import annotations

import re
from typing import Any

import torch

from supsup_deploy.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(name: str) -> str:
    """The PyTorch device a ``--device`` value names, checked against this machine.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (``"auto"`` becomes ``"cuda"`` or ``"cpu"``).

    Raises:
        ConfigError: an unknown name, no CUDA on this machine, or no GPU with that index.
    """
    name = name.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    match = _CUDA.fullmatch(name)
    if match is None:
        raise ConfigError(f"unknown device {name!r}: use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use cpu)")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise ConfigError(f"--device {name}: this machine has {count} GPU(s), cuda:0..{count - 1}")
    return name


def cuda_index(device: str) -> int:
    """The GPU index of a resolved CUDA device (``"cuda"`` is the current one)."""
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def onnx_providers(device: str) -> list[Any]:
    """ONNX Runtime providers for a resolved device: CPU, or CUDA on that GPU index first.

    Raises:
        ConfigError: CUDA asked for but this ONNX Runtime has no CUDA provider.
    """
    import onnxruntime

    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise ConfigError(
            f"--device {device}: ONNX Runtime has no CUDA provider here: pip install "
            "'supsup-deploy[gpu]' (onnxruntime-gpu) on a machine with a GPU"
        )
    return [("CUDAExecutionProvider", {"device_id": cuda_index(device)}), "CPUExecutionProvider"]
