"""Seeded random bundles: random basis masks and plausible alpha tasks, without training.

`supsup verify` and the benchmarks use them on architectures too large to train here. A random
deep BatchNorm ResNet is numerically chaotic (a 1e-7 relative change of the input moves the
logits of a random ResNet-50 by ~1e-4), which no trained network we measured is; trained ResNets
keep their residual branches small. So each task here scales the output of every residual branch
by :data:`RESIDUAL_BRANCH_SCALE` (through the stored variance of the branch's last batch norm,
or the alpha row of its last conv when no norm follows it), which makes the logits as
well-conditioned as a trained network's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from supsup_deploy.binary_masks import check_density, check_num_basis
from supsup_deploy.bundles.format import InputSpec
from supsup_deploy.bundles.writer import TaskData, save_bundle
from supsup_deploy.masked_layers import MaskedLayer
from supsup_deploy.models import MaskedModel, ModelConfig, build_model, masked_layers
from supsup_deploy.normalization import TaskBatchNorm2d, norm_state
from supsup_deploy.weight_sources import load_alpha_table, use_alpha

RESIDUAL_BRANCH_SCALE = 0.2
STATISTICS_BATCH = 16
ALPHA_NOISE = 0.02


def write_random_bundle(
    out: str | Path,
    config: ModelConfig,
    input_spec: InputSpec,
    *,
    num_basis: int,
    alpha_tasks: int,
    basis_tasks: bool = True,
    density: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write a bundle of seeded random basis masks and alpha tasks (atomically, by folder rename).

    Args:
        out: the bundle folder to create; it must not exist.
        config: architecture and backbone seed (``num_tasks`` is ignored).
        input_spec: input size, channels and normalisation recorded in the bundle.
        num_basis: random basis masks ``|B|``, each keeping about ``density`` of every layer.
        alpha_tasks: alpha tasks, each ``1/|B|`` plus seeded noise per layer and mask.
        basis_tasks: also install every basis mask as a task (one-hot alpha), as ``pack`` does;
            kind ``"alpha"`` where scaling the residual branches changed its table.
        density: fraction of weights each basis mask keeps.
        seed: seeds masks, alpha tables and the batch the norm statistics come from.

    Returns:
        ``out``.

    Example:
        >>> write_random_bundle("artifacts/r18", get_model_entry("resnet18").config(),
        ...                     InputSpec(32, 3, (0.5,) * 3, (0.25,) * 3), num_basis=2,
        ...                     alpha_tasks=2)
    """
    out = Path(out)
    check_density(density)
    check_num_basis(num_basis)
    model = build_model(ModelConfig.from_dict({**config.to_dict(), "num_tasks": 1}))
    generator = torch.Generator().manual_seed(seed)
    layers = masked_layers(model)
    basis = [
        [torch.rand(layer.weight_shape, generator=generator) < density for layer in layers]
        for _ in range(num_basis)
    ]
    tables = [torch.eye(num_basis)[index].repeat(len(layers), 1) for index in range(num_basis)]
    if not basis_tasks:
        tables = []
    noise = [torch.randn(len(layers), num_basis, generator=generator) for _ in range(alpha_tasks)]
    tables += [1.0 / num_basis + ALPHA_NOISE * table for table in noise]
    use_alpha(model, basis)
    for norm in model.task_norms():
        norm.momentum = 1.0  # the statistics of one batch, replacing the slot's

    def tasks():
        for index, alpha in enumerate(tables):
            scaled, statistics = _plausible_task(model, alpha, input_spec, seed)
            # A basis task must run its basis mask exactly: one whose residual branches had to
            # be scaled through its alpha table (no norm after them) is an alpha task.
            one_hot = basis_tasks and index < num_basis and torch.equal(scaled, alpha)
            yield TaskData(
                index=index,
                name=f"task_{index}",
                alpha=scaled,
                norm_state=statistics,
                class_names=[f"class_{i}" for i in range(config.num_classes)],
                kind="basis" if one_hot else "alpha",
            )

    save_bundle(
        out, model_config=model.config, basis_masks=basis, input_spec=input_spec, tasks=tasks()
    )
    return out


@torch.no_grad()
def _plausible_task(
    model: MaskedModel, alpha: torch.Tensor, spec: InputSpec, seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scale the residual branches, then take norm statistics from one seeded random batch."""
    alpha = alpha.clone()
    ends = model.residual_branch_ends()
    for end in ends:
        if isinstance(end, MaskedLayer):
            alpha[end.layer_index] *= RESIDUAL_BRANCH_SCALE
    load_alpha_table(model, alpha)
    model.train()
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (STATISTICS_BATCH, spec.channels, spec.size, spec.size)
    model(torch.randn(shape, generator=generator))
    for end in ends:
        if isinstance(end, TaskBatchNorm2d):
            end.running_var[0] /= RESIDUAL_BRANCH_SCALE**2
    model.eval()
    return alpha, norm_state(model, 0)
