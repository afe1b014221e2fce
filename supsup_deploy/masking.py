"""Attach weight sources to a whole model and read back what they learned.

A *mask set* is one bool mask per masked layer, in model order (one SupSup task, or one basis
mask). An *alpha table* is a ``[num_layers, num_basis]`` tensor: row ``d`` mixes layer ``d``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from supsup_deploy.errors import ConfigError
from supsup_deploy.layers import AlphaMask, FixedWeight, ScoreMask
from supsup_deploy.masks import resolve_densities
from supsup_deploy.models import masked_layers
from supsup_deploy.normalization import task_norms

MaskSet = Sequence[torch.Tensor]


def use_scores(
    model: nn.Module, density: float | str = 0.5, *, generator: torch.Generator | None = None
) -> list[ScoreMask]:
    """Give every masked layer fresh edge-popup scores (a new SupSup mask to train).

    Args:
        model: a model from :func:`supsup_deploy.get_model`.
        density: fraction kept per layer, or ``"er:SCALE"`` for the ER rule.
        generator: seeds the score initialisation (layers draw from it in model order).

    Returns:
        The new sources, one per layer; their ``scores`` are the trainable parameters.

    Example:
        >>> model = get_model("gem_resnet18", num_classes=2)
        >>> sources = use_scores(model, 0.5)
    """
    layers = masked_layers(model)
    densities = resolve_densities([layer.weight_shape for layer in layers], density)
    device = model_device(model)
    sources = []
    for layer, layer_density in zip(layers, densities, strict=True):
        source = ScoreMask(layer, layer_density, generator=generator).to(device)
        layer.set_source(source)
        sources.append(source)
    return sources


def current_masks(model: nn.Module) -> list[torch.Tensor]:
    """The binary masks the model's score sources select now, one per layer."""
    masks = []
    for layer in masked_layers(model):
        if not isinstance(layer.source, ScoreMask):
            raise ConfigError(f"masked layer {layer.layer_index} is not using scores")
        masks.append(layer.source.mask())
    return masks


def use_alpha(
    model: nn.Module, basis: Sequence[MaskSet], alpha: torch.Tensor | None = None
) -> list[AlphaMask]:
    """Make every layer a trainable alpha combination of the basis masks.

    Args:
        model: a model from :func:`supsup_deploy.get_model`.
        basis: ``|B|`` mask sets.
        alpha: initial ``[num_layers, |B|]`` table; default ``1 / |B|`` everywhere.

    Returns:
        The new sources, one per layer; their ``alpha`` are the trainable parameters.
    """
    layers = masked_layers(model)
    for number, mask_set in enumerate(basis):
        if len(mask_set) != len(layers):
            raise ConfigError(
                f"basis mask {number} has {len(mask_set)} layers, the model has {len(layers)}"
            )
    if alpha is not None and alpha.shape != (len(layers), len(basis)):
        raise ConfigError(
            f"alpha table must have shape [{len(layers)}, {len(basis)}], got {tuple(alpha.shape)}"
        )
    device = model_device(model)
    sources = []
    for index, layer in enumerate(layers):
        layer_masks = [mask_set[index].to(device) for mask_set in basis]
        row = None if alpha is None else alpha[index]
        source = AlphaMask.from_masks(layer, layer_masks, row)
        layer.set_source(source)
        sources.append(source)
    return sources


def alpha_table(model: nn.Module) -> torch.Tensor:
    """The model's current ``[num_layers, |B|]`` alpha table (detached copy)."""
    rows = []
    for layer in masked_layers(model):
        if not isinstance(layer.source, AlphaMask):
            raise ConfigError(f"masked layer {layer.layer_index} is not using an alpha combination")
        rows.append(layer.source.alpha.detach())
    return torch.stack(rows)


@torch.no_grad()
def load_alpha_table(model: nn.Module, table: torch.Tensor) -> None:
    """Switch an alpha model to another task's table in place (no rebuild)."""
    layers = masked_layers(model)
    current = alpha_table(model)
    if table.shape != current.shape:
        raise ConfigError(
            f"alpha table must have shape {list(current.shape)}, got {list(table.shape)}"
        )
    for layer, row in zip(layers, table, strict=True):
        layer.source.alpha.copy_(row)


def use_fixed(model: nn.Module, weights: Sequence[torch.Tensor]) -> None:
    """Give every layer a fixed materialised weight (one per layer, in model order)."""
    layers = masked_layers(model)
    if len(weights) != len(layers):
        raise ConfigError(f"got {len(weights)} weights for {len(layers)} masked layers")
    for layer, weight in zip(layers, weights, strict=True):
        if tuple(weight.shape) != layer.weight_shape:
            raise ConfigError(
                f"weight for layer {layer.layer_index} has shape {tuple(weight.shape)}, "
                f"expected {layer.weight_shape}"
            )
        layer.set_source(FixedWeight(weight))


@torch.no_grad()
def effective_weights(model: nn.Module) -> list[torch.Tensor]:
    """Every masked layer's current effective weight, materialised."""
    return [layer.effective_weight().detach().clone() for layer in masked_layers(model)]


def set_task(model: nn.Module, task: int) -> None:
    """Select the normalisation statistics slot of every per-task norm layer."""
    for norm in task_norms(model):
        norm.set_task(task)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has none)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")
