"""Proof that a graph computes what the PyTorch model computes: probe batches, the per-task
graph's check (:func:`check_parity`) and the shared graph's, fed a task as plain inputs and as its
adapter (:func:`check_shared_parity`), each against its target's tolerance
(:mod:`supsup_deploy.onnx_graphs.targets`) and with identical argmax."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from supsup_deploy.bundles.reader import Bundle
from supsup_deploy.errors import SupsupError
from supsup_deploy.onnx_graphs.adapters import load_adapter
from supsup_deploy.onnx_graphs.sessions import onnx_session, run_onnx
from supsup_deploy.onnx_graphs.targets import export_target

PROBE_BATCH = 64


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
