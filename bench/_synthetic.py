"""Synthetic bundles for the speed benchmarks: random basis masks and plausible tasks."""

from __future__ import annotations

from pathlib import Path

import torch

from supsup_deploy import get_model
from supsup_deploy.bundle import InputSpec, save_basis, save_task
from supsup_deploy.masking import use_alpha
from supsup_deploy.models import masked_layers
from supsup_deploy.normalization import TaskBatchNorm2d, norm_state

STATISTICS_BATCH = 8


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
    """A bundle of ``num_basis`` density-0.5 random masks and ``tasks`` alpha tasks (seeded).

    Each task's alpha is ``1/|B|`` plus small noise, and its norm statistics are those of a random
    batch through its own weights, so its logits are of a realistic size.
    """
    model = get_model(arch, num_classes=num_classes, in_channels=channels, stem=stem, seed=0)
    generator = torch.Generator().manual_seed(0)
    layers = masked_layers(model)
    basis = [
        [torch.rand(layer.weight_shape, generator=generator) < 0.5 for layer in layers]
        for _ in range(num_basis)
    ]
    spec = InputSpec(size=size, channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
    digest = save_basis(folder / "basis.safetensors", model.config, basis, spec)
    for index in range(tasks):
        alpha = 1.0 / num_basis + 0.02 * torch.randn(len(layers), num_basis, generator=generator)
        save_task(
            folder / "tasks" / f"task_{index}.safetensors",
            index=index,
            name=f"task_{index}",
            alpha=alpha,
            norm_state=_batch_statistics(model, basis, alpha, channels, size),
            class_names=[f"class_{i}" for i in range(num_classes)],
            basis_sha256=digest,
        )


@torch.no_grad()
def _batch_statistics(model, basis, alpha, channels: int, size: int) -> dict[str, torch.Tensor]:
    use_alpha(model, basis, alpha)
    for module in model.modules():
        if isinstance(module, TaskBatchNorm2d):
            module.momentum = 1.0
    model.train()
    images = torch.randn(
        STATISTICS_BATCH, channels, size, size, generator=torch.Generator().manual_seed(2)
    )
    model(images)
    return norm_state(model, 0)
