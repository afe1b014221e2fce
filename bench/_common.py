"""Shared benchmark plumbing: machine description, timing, peak memory, result files."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where and with what a benchmark ran."""
    import numpy

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def median_seconds(step: Callable[[], Any], *, repeats: int, warmup: int = 1, device: str = "cpu"):
    """Median wall time of ``step`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    """Start a new peak-memory window (CUDA allocator, or the process's peak RSS on Linux)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    _release_free_heap()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _release_free_heap() -> None:
    """Give memory that glibc's malloc keeps after frees back to the system (no-op elsewhere)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory_bytes(device: str) -> int:
    """Peak memory since the last :func:`reset_peak_memory` (CUDA allocator, or peak RSS)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return _process_status_bytes("VmHWM")


def resident_bytes() -> int:
    """The process's resident set size now."""
    return _process_status_bytes("VmRSS")


def _process_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def tensor_state_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def print_table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> None:
    """Print right-aligned rows of already formatted cells under ``columns``."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=150).print(table)
