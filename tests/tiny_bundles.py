"""The small seeded random bundle most tests open (see :mod:`supsup_deploy.synthetic`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from supsup_deploy.bundles.format import InputSpec
from supsup_deploy.models import ModelConfig
from supsup_deploy.synthetic import write_random_bundle

TINY_CONFIG = ModelConfig(
    arch="gem_resnet18", num_classes=3, in_channels=1, stem="imagenet", width=0.25
)
TINY_INPUT = InputSpec(size=12, channels=1, mean=(0.5,), std=(0.25,))


def write_tiny_bundle(
    path: Path,
    *,
    config: ModelConfig = TINY_CONFIG,
    num_basis: int = 2,
    alpha_tasks: int = 1,
    **options: Any,
) -> Path:
    """A quarter-width ``gem_resnet18`` bundle on 12x12 grey images, written to ``path``.

    Args:
        path: the bundle folder to create.
        config: the model config (``TINY_CONFIG`` unless a test varies it).
        num_basis: basis masks.
        alpha_tasks: alpha tasks after the basis tasks.
        **options: the other options of :func:`write_random_bundle` (``density``, ...).

    Returns:
        ``path``.
    """
    return write_random_bundle(
        path, config, TINY_INPUT, num_basis=num_basis, alpha_tasks=alpha_tasks, **options
    )
