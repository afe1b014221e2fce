"""Synthetic bundles for the speed benchmarks (see :mod:`supsup_deploy.synthetic`)."""

from __future__ import annotations

from pathlib import Path

from supsup_deploy.bundles.format import InputSpec
from supsup_deploy.models import get_model_entry
from supsup_deploy.synthetic import write_random_bundle


def write_synthetic_bundle(
    folder: Path,
    arch: str,
    *,
    num_basis: int,
    tasks: int,
    num_classes: int,
    channels: int,
    size: int,
    stem: str,
) -> None:
    """A new bundle folder of ``num_basis`` density-0.5 random masks and ``tasks`` alpha tasks."""
    config = get_model_entry(arch).config(
        num_classes=num_classes, in_channels=channels, stem=stem, seed=0
    )
    spec = InputSpec(size=size, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
    write_random_bundle(
        folder, config, spec, num_basis=num_basis, alpha_tasks=tasks, basis_tasks=False
    )
