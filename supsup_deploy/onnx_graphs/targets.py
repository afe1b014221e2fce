"""The registry of ONNX export targets: what each writes, the precisions it takes and the parity
tolerance its graphs must meet against the PyTorch model.

A target is a small frozen config; the code that writes it lives in
:mod:`supsup_deploy.onnx_graphs.export`
(``TaskExporter`` for ``task``, ``export_shared`` for ``shared``, ``export_adapter`` for
``adapter``) and looks its tolerance up here when it checks parity. A new target is one
:class:`ExportTarget` added to :data:`EXPORT_TARGETS` and one exporting function beside the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from supsup_deploy.errors import ConfigError

FP32_TOLERANCE = 1e-4
"""Largest |logit difference| allowed between a float32 graph and the PyTorch model."""
FP16_TOLERANCE = 5e-2
"""Largest |logit difference| allowed for a graph whose weights are stored in float16."""


@dataclass(frozen=True)
class ExportTarget:
    """One kind of ONNX output and the parity it must prove before anything is written.

    Attributes:
        name: the registry key.
        writes: what it writes, in words.
        tolerances: the largest |logit difference| allowed, by weight precision (``"float32"``,
            ``"float16"``); a precision missing here is not supported by the target. Every
            target also requires identical argmax on the probe batch.
        precision_refusal: the one-line error for a precision the target does not take.
    """

    name: str
    writes: str
    tolerances: Mapping[str, float]
    precision_refusal: str = ""

    def validate(self, *, precision: str) -> None:
        """Refuse a precision this target does not export.

        Raises:
            ConfigError: ``precision`` has no tolerance here.
        """
        if precision not in self.tolerances:
            raise ConfigError(
                self.precision_refusal
                or f"the {self.name} export target takes {', '.join(self.tolerances)}, "
                f"not {precision}"
            )

    def tolerance(self, precision: str = "float32") -> float:
        """The parity tolerance for weights stored in ``precision`` (validated first)."""
        self.validate(precision=precision)
        return self.tolerances[precision]


_FLOAT32_ONLY = "--fp16 applies to per-task graphs; the shared graph computes in float32"

EXPORT_TARGETS: dict[str, ExportTarget] = {
    target.name: target
    for target in (
        ExportTarget(
            name="task",
            writes="one ONNX graph per task, its weights (norms folded) as initializers",
            tolerances={"float32": FP32_TOLERANCE, "float16": FP16_TOLERANCE},
        ),
        ExportTarget(
            name="shared",
            writes="one ONNX graph for every task, fed each task's alpha rows and statistics",
            tolerances={"float32": FP32_TOLERANCE},
            precision_refusal=_FLOAT32_ONLY,
        ),
        ExportTarget(
            name="adapter",
            writes="one task's inputs of the shared graph as an ONNX Runtime adapter file",
            tolerances={"float32": FP32_TOLERANCE},
            precision_refusal=_FLOAT32_ONLY,
        ),
    )
}


def export_target(name: str) -> ExportTarget:
    """The registered export target called ``name``.

    Raises:
        ConfigError: no target has that name.
    """
    try:
        return EXPORT_TARGETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown export target {name!r}: use {', '.join(EXPORT_TARGETS)}"
        ) from None
