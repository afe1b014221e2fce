"""Storage accounting: what a bundle holds, component by component."""

from __future__ import annotations

from typing import Any

from supsup_deploy.bundle import FORMAT_VERSION, Bundle


def bundle_report(bundle: Bundle) -> dict[str, Any]:
    """A JSON-ready description of a loaded (hence validated) bundle and its bytes.

    Args:
        bundle: from :func:`supsup_deploy.load_bundle`.

    Returns:
        Backbone, basis and per-task facts, with bytes on disk for every file.
    """
    basis_bytes = bundle.basis_path.stat().st_size
    tasks = [
        {
            "index": info.index,
            "name": info.name,
            "kind": info.kind,
            "class_names": list(info.class_names),
            "file": str(info.path.relative_to(bundle.path)),
            "file_bytes": info.file_bytes,
            "state_bytes": info.state_bytes,
            "test_accuracy": info.metrics.get("test_accuracy"),
        }
        for info in bundle.tasks
    ]
    return {
        "path": str(bundle.path),
        "format_version": FORMAT_VERSION,
        "integrity": "ok",
        "model": bundle.config.to_dict(),
        "input": bundle.input.to_dict(),
        "masked_layers": bundle.summary.masked_layers,
        "masked_weights": bundle.summary.masked_weights,
        "norm_channels": bundle.summary.norm_channels,
        "num_basis": bundle.num_basis,
        "basis_sha256": bundle.basis_sha256,
        "basis_file_bytes": basis_bytes,
        "basis_bits_per_weight": 8 * basis_bytes / bundle.summary.masked_weights,
        "tasks": tasks,
        "total_bytes": basis_bytes + sum(task["file_bytes"] for task in tasks),
    }
