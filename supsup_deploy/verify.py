"""End-to-end verification per architecture: basis, tasks, pack, load, materialise, export, parity.

Each step checks something a user depends on: materialised weights equal the alpha formula, the
per-task ONNX graphs and the shared graph (every task fed as inputs and as an adapter) match
PyTorch within the exporter's tolerance, the shared graph specialised to each task matches the
task's per-task graph, the bytes on disk are exactly what the storage
accounting predicts, and (for a bundle from a trained run) PyTorch, the per-task graphs and the
shared graph give identical predictions on every task's test split.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from supsup_deploy import backbone
from supsup_deploy.alpha_groups import rows_per_output
from supsup_deploy.binary_masks import unpack_bits
from supsup_deploy.bundles.format import InputSpec
from supsup_deploy.bundles.reader import Bundle, load_bundle
from supsup_deploy.errors import SupsupError
from supsup_deploy.models import get_model_entry
from supsup_deploy.onnx_graphs.export import TaskExporter, export_shared
from supsup_deploy.onnx_graphs.parity import ParityError, probe_batch
from supsup_deploy.onnx_graphs.sessions import onnx_session, run_onnx
from supsup_deploy.onnx_graphs.targets import export_target
from supsup_deploy.report import compare_bundle_bytes
from supsup_deploy.steps import StepTimer

QUICK_ARCHS = ("gem_resnet18", "resnet18")
VERIFY_INPUT_SIZE = 32
VERIFY_BASIS = 2
VERIFY_ALPHA_TASKS = 2
VERIFY_PROBE_BATCH = 8
MATERIALIZE_RELATIVE_TOLERANCE = 1e-5


@dataclass
class VerifyResult:
    """What one architecture's verification found; ``error`` is None when every check passed."""

    arch: str
    source: str
    masked_layers: int = 0
    masked_weights: int = 0
    tasks: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    max_abs_diff: float | None = None
    shared_max_abs_diff: float | None = None
    specialized_max_abs_diff: float | None = None
    bytes_checked: int = 0
    bytes_ok: bool = False
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    device: str = "cpu"

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "source": self.source,
            "ok": self.ok,
            "masked_layers": self.masked_layers,
            "masked_weights": self.masked_weights,
            "tasks": self.tasks,
            "seconds": {key: round(value, 3) for key, value in self.seconds.items()},
            "max_abs_diff": self.max_abs_diff,
            "shared_max_abs_diff": self.shared_max_abs_diff,
            "specialized_max_abs_diff": self.specialized_max_abs_diff,
            "bytes_checked": self.bytes_checked,
            "bytes_ok": self.bytes_ok,
            "accuracy": self.accuracy,
            "error": self.error,
            "device": self.device,
        }


def verify_architecture(
    arch: str,
    work_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    progress=None,
    device: str = "cpu",
) -> VerifyResult:
    """Build (or pack from ``run_dir``) a bundle for ``arch`` and verify it end to end.

    Without a run, the basis is :data:`VERIFY_BASIS` seeded random masks with
    :data:`VERIFY_ALPHA_TASKS` alpha tasks, in the architecture's standard configuration at
    :data:`VERIFY_INPUT_SIZE` x :data:`VERIFY_INPUT_SIZE` inputs.

    Args:
        arch: a registered architecture (ignored with ``run_dir``: the run's is used).
        work_dir: folder for the bundle and its ONNX graphs (created).
        run_dir: a finished training run to pack instead of random masks.
        progress: optional ``callback(arch, step)`` called as each step starts.
        device: where the parity and accuracy checks run (PyTorch and ONNX Runtime).

    Returns:
        A :class:`VerifyResult`; a failed check sets its ``error``, never raises SupsupError.
    """
    from supsup_deploy.synthetic import write_random_bundle

    work_dir = Path(work_dir)
    result = VerifyResult(
        arch=arch, source="trained run" if run_dir else "seeded random masks", device=device
    )
    steps = _steps(result, progress)
    try:
        if run_dir is not None:
            from supsup_deploy.pack import pack_run

            steps.run("pack", pack_run, run_dir, work_dir / "bundle")
        else:
            config = get_model_entry(arch).config()
            spec = InputSpec(
                size=VERIFY_INPUT_SIZE,
                channels=config.in_channels,
                mean=(0.5,) * config.in_channels,
                std=(0.25,) * config.in_channels,
            )
            steps.run(
                "pack",
                write_random_bundle,
                work_dir / "bundle",
                config,
                spec,
                num_basis=VERIFY_BASIS,
                alpha_tasks=VERIFY_ALPHA_TASKS,
            )
        bundle = steps.run("load", load_bundle, work_dir / "bundle")
        result.arch = bundle.config.arch
        _check_bundle(bundle, result, steps, work_dir, accuracy=run_dir is not None, device=device)
    except SupsupError as error:
        result.error = str(error)
    return result


def verify_bundle(
    bundle_path: str | Path, work_dir: str | Path, *, progress=None, device: str = "cpu"
) -> VerifyResult:
    """Verify an existing bundle (from a trained run): parity, bytes, and accuracy parity.

    Args:
        bundle_path: the bundle folder (only read).
        work_dir: folder for the ONNX graphs.
        progress: optional ``callback(arch, step)``.
        device: where the parity and accuracy checks run (PyTorch and ONNX Runtime).

    Returns:
        A :class:`VerifyResult`; accuracy parity is measured when the dataset is available.

    Raises:
        SupsupError: the bundle cannot be loaded.
    """
    started = time.perf_counter()
    bundle = load_bundle(bundle_path)
    result = VerifyResult(arch=bundle.config.arch, source=str(bundle_path), device=device)
    result.seconds["load"] = time.perf_counter() - started
    steps = _steps(result, progress)
    try:
        _check_bundle(bundle, result, steps, Path(work_dir), accuracy=True, device=device)
    except SupsupError as error:
        result.error = str(error)
    return result


def _steps(result: VerifyResult, progress) -> StepTimer:
    """Steps timed into ``result.seconds``, each announced to ``progress(arch, step)``."""
    announce = (lambda name: progress(result.arch, name)) if progress else None
    return StepTimer(seconds=result.seconds, announce=announce)


def _check_bundle(
    bundle: Bundle,
    result: VerifyResult,
    steps: StepTimer,
    work_dir: Path,
    *,
    accuracy: bool,
    device: str,
) -> None:
    result.masked_layers = bundle.summary.masked_layers
    result.masked_weights = bundle.summary.masked_weights
    result.tasks = len(bundle.tasks)
    if not bundle.tasks:
        raise SupsupError(f"{bundle.path}: the bundle has no tasks to verify")
    steps.run("materialize", _check_materialized, bundle)
    steps.run("bytes", _check_bytes, bundle, result)
    probe, probe_name = probe_batch(bundle, VERIFY_PROBE_BATCH)
    exporter = TaskExporter(bundle, device=device)
    reports = steps.run(
        "export",
        lambda: [
            exporter.export(
                info.index,
                work_dir / "onnx" / f"{info.name}.onnx",
                probe=probe,
                probe_name=probe_name,
            )
            for info in bundle.tasks
        ],
    )
    result.max_abs_diff = max(report.max_abs_diff for report in reports)
    shared = steps.run(
        "shared",
        export_shared,
        bundle,
        work_dir / "shared",
        probe=probe,
        probe_name=probe_name,
    )
    result.shared_max_abs_diff = max(
        max(report.max_abs_diff_inputs, report.max_abs_diff_adapter) for report in shared
    )
    result.specialized_max_abs_diff = steps.run(
        "specialized", _check_specialized, bundle, work_dir, probe, probe_name, device
    )
    if accuracy:
        result.accuracy = steps.run("accuracy", _accuracy_parity, bundle, work_dir, device)


def _check_specialized(
    bundle: Bundle, work_dir: Path, probe: torch.Tensor, probe_name: str, device: str
) -> float:
    """The shared graph specialised to each task against the task's per-task graph: the largest
    logit difference; ParityError beyond the fp32 tolerance or on a differing argmax."""
    from supsup_deploy.onnx_graphs.format import MODEL_FILE
    from supsup_deploy.onnx_graphs.sessions import SharedGraph

    shared = SharedGraph(work_dir / "shared" / MODEL_FILE, device=device)
    tolerance = export_target("shared").tolerance()
    worst = 0.0
    for info in bundle.tasks:
        dense = run_onnx(
            onnx_session(work_dir / "onnx" / f"{info.name}.onnx", device=device), probe
        )
        got = run_onnx(shared.specialize(bundle, info.index), probe)
        difference = float(np.abs(got - dense).max())
        if difference > tolerance or not (got.argmax(1) == dense.argmax(1)).all():
            raise ParityError(
                f"the shared graph specialised to task {info.index} differs from its per-task "
                f"graph: max |logit difference| {difference:.3g} (tolerance {tolerance:g}), "
                f"argmax equal: {bool((got.argmax(1) == dense.argmax(1)).all())}, on "
                f"{len(probe)} {probe_name}"
            )
        worst = max(worst, difference)
    return worst


def _check_materialized(bundle: Bundle) -> None:
    """Every task's materialised weights against sign x scale x sum_b alpha_gb mask_b (``g`` the
    weight's channel group), computed
    independently of the code table, on the first and the last layer."""
    summary = bundle.summary
    layers = sorted({0, summary.masked_layers - 1})
    expected_parts = {}
    for layer in layers:
        shape = summary.weight_shapes[layer]
        numel = math.prod(shape)
        weight = backbone.signed_constant_weight(bundle.config.seed, layer, shape).reshape(-1)
        masks = torch.stack([unpack_bits(row, numel) for row in bundle.packed_basis(layer)])
        expected_parts[layer] = (weight.double(), masks.double())
    for info in bundle.tasks:
        weights = bundle.materialize(info.index)
        for layer in layers:
            weight, masks = expected_parts[layer]
            rows = bundle.task_tensors(info.index)["alpha"][layer].double()
            outputs = summary.weight_shapes[layer][0]
            per_output = rows_per_output(rows, outputs)  # [outputs, |B|]
            mixed = torch.einsum("ob,bor->or", per_output, masks.view(len(masks), outputs, -1))
            expected = weight * mixed.reshape(-1)
            got = weights[layer].reshape(-1).double()
            limit = MATERIALIZE_RELATIVE_TOLERANCE * float(expected.abs().max())
            if float((got - expected).abs().max()) > limit:
                raise SupsupError(
                    f"task {info.index} layer {layer}: materialised weights differ from the "
                    "alpha formula"
                )


def _check_bytes(bundle: Bundle, result: VerifyResult) -> None:
    checks = compare_bundle_bytes(bundle)
    result.bytes_checked = len(checks)
    wrong = [check for check in checks if not check["ok"]]
    result.bytes_ok = not wrong
    if wrong:
        first = wrong[0]
        raise SupsupError(
            f"{bundle.path}: {first['component']} holds {first['measured']} bytes, the storage "
            f"report predicts {first['predicted']} ({len(wrong)} component(s) differ)"
        )


def _accuracy_parity(bundle: Bundle, work_dir: Path, device: str) -> list[dict[str, Any]]:
    """Test accuracy of every task with PyTorch, its per-task graph and the shared graph (with
    the task's adapter); predictions must agree."""
    from supsup_deploy.onnx_graphs.format import MODEL_FILE
    from supsup_deploy.runtime import Runner, dataset_split

    rows = []
    onnx_folder = work_dir / "onnx"
    torch_runner = Runner(bundle, runtime="torch", device=device)
    shared_runner = Runner(
        bundle, runtime="onnx", device=device, onnx_path=work_dir / "shared" / MODEL_FILE
    )
    for info in bundle.tasks:
        try:
            images, labels = dataset_split(bundle, info.index, split="test")
        except SupsupError as error:
            rows.append({"task": info.index, "name": info.name, "skipped": str(error)})
            continue
        onnx_runner = Runner(
            bundle, runtime="onnx", device=device, onnx_path=onnx_folder / f"{info.name}.onnx"
        )
        torch_predictions = torch_runner.logits(info.index, images).argmax(1)
        onnx_predictions = onnx_runner.logits(info.index, images).argmax(1)
        shared_predictions = shared_runner.logits(info.index, images).argmax(1)
        differing = int((torch_predictions != onnx_predictions).sum())
        shared_differing = int((torch_predictions != shared_predictions).sum())
        rows.append(
            {
                "task": info.index,
                "name": info.name,
                "images": len(labels),
                "torch_accuracy": float((torch_predictions == labels).float().mean()),
                "onnx_accuracy": float((onnx_predictions == labels).float().mean()),
                "differing_predictions": differing,
                "shared_accuracy": float((shared_predictions == labels).float().mean()),
                "shared_differing_predictions": shared_differing,
            }
        )
        if differing or shared_differing:
            raise SupsupError(
                f"task {info.index}: PyTorch and ONNX Runtime disagree on {differing} of "
                f"{len(labels)} test images (the shared graph on {shared_differing})"
            )
    return rows


def verify_all(
    archs: list[str],
    *,
    run_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    progress=None,
    device: str = "cpu",
) -> list[VerifyResult]:
    """:func:`verify_architecture` for each name, in a temporary folder unless ``work_dir``."""
    results = []
    for arch in archs:
        with tempfile.TemporaryDirectory(prefix=f"supsup-verify-{arch}-") as scratch:
            folder = Path(work_dir) / arch if work_dir is not None else Path(scratch)
            results.append(
                verify_architecture(arch, folder, run_dir=run_dir, progress=progress, device=device)
            )
    return results
