"""Where a masked layer's effective weight comes from, and attaching sources to a whole model.

- :class:`ScoreMask`: edge-popup training, ``W * topk(|scores|)`` with a straight-through gradient.
- :class:`AlphaMask`: ``W * sum_t alpha[g, t] * M_t``, one alpha row ``g`` per group of output
  channels (:mod:`supsup_deploy.alpha_groups`), computed from per-weight codes
  (:func:`supsup_deploy.binary_masks.mask_codes`) with one gather forward and one scatter-add
  backward, so training keeps one int32 code per weight instead of ``|B|`` float masks.
- :class:`FixedWeight`: a materialised weight tensor.

``use_scores``, ``use_alpha`` and ``use_fixed`` give every masked layer of a model one of them;
``current_masks`` and ``alpha_table`` read back what training learned. A *mask set* is one bool
mask per masked layer, in model order (one SupSup task, or one basis mask). An *alpha table* is
a ``[num_layers, G, num_basis]`` tensor: row ``[d, g]`` mixes group ``g`` of layer ``d``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from supsup_deploy.alpha_groups import as_grouped, check_groups, output_groups
from supsup_deploy.binary_masks import (
    check_density,
    check_num_basis,
    code_bit_matrix,
    code_value_table,
    mask_codes,
    resolve_densities,
    topk_mask,
)
from supsup_deploy.errors import ConfigError
from supsup_deploy.masked_layers import MaskedLayer, WeightSource, masked_layers

MaskSet = Sequence[torch.Tensor]


class _TopKStraightThrough(torch.autograd.Function):
    """Forward: the 0/1 top-k mask of ``|scores|``. Backward: the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, magnitudes: torch.Tensor, density: float) -> torch.Tensor:
        return topk_mask(magnitudes, density).to(magnitudes.dtype)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor):
        return grad_mask, None


class _AlphaWeight(torch.autograd.Function):
    """``W_eff[j] = c * s_j * sum_t alpha[g(j), t] * M_t[j]`` from indices into the ``[G, 2T]``
    value tables (a weight's code plus ``2T`` times its group), differentiable in alpha."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, indices: torch.Tensor, constant: float) -> torch.Tensor:
        ctx.save_for_backward(indices)
        ctx.constant = constant
        ctx.groups, ctx.num_basis = alpha.shape
        return code_value_table(alpha, constant).flatten().index_select(0, indices)

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor):
        (indices,) = ctx.saved_tensors
        bit_matrix = code_bit_matrix(ctx.num_basis, grad_weight.dtype, grad_weight.device)
        size = 2 * bit_matrix.shape[0]
        sums = grad_weight.new_zeros(ctx.groups * size).index_add_(0, indices, grad_weight)
        positive, negative = sums.view(ctx.groups, 2, -1).unbind(1)
        return ((positive - negative) * ctx.constant) @ bit_matrix, None, None


class ScoreMask(WeightSource):
    """Edge-popup: a trainable score per weight, forward ``W * topk(|scores|, density)``.

    Args:
        layer: the masked layer this source serves (for its shape and backbone).
        density: fraction of weights kept.
        generator: seeds the Kaiming-uniform score initialisation.
    """

    def __init__(
        self, layer: MaskedLayer, density: float, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.density = float(density)
        check_density(self.density)
        bound = 1.0 / math.sqrt(layer.fan_in)
        scores = torch.rand(layer.weight_shape, generator=generator) * (2 * bound) - bound
        self.scores = nn.Parameter(scores)
        self.register_buffer("backbone", layer.backbone_weight(), persistent=False)

    def mask(self) -> torch.Tensor:
        """The current binary mask (bool), exactly ``kept`` ones."""
        return topk_mask(self.scores, self.density)

    def weight(self, layer: MaskedLayer) -> torch.Tensor:
        return self.backbone * _TopKStraightThrough.apply(self.scores.abs(), self.density)


class AlphaMask(WeightSource):
    """A real-valued combination of fixed basis masks: ``W * sum_t alpha[g, t] * M_t``, alpha
    row ``g`` serving group ``g`` of the layer's output channels.

    Only one int32 code per weight is kept (sign bit and one bit per basis mask); the alpha
    gradient is a scatter-add of the weight gradient over codes.

    Args:
        layer: the masked layer this source serves.
        codes: the layer's flat int32 codes (:func:`supsup_deploy.binary_masks.mask_codes`).
        num_basis: ``|B|``.
        alpha: initial coefficients, ``[groups, |B|]`` (or ``[|B|]`` for one group); default
            ``1 / |B|`` each.
        groups: rows when ``alpha`` is not given.
    """

    def __init__(
        self,
        layer: MaskedLayer,
        codes: torch.Tensor,
        num_basis: int,
        alpha: torch.Tensor | None = None,
        *,
        groups: int = 1,
    ) -> None:
        super().__init__()
        check_num_basis(num_basis)
        if codes.dtype != torch.int32 or codes.numel() != layer.numel:
            raise ConfigError(f"codes must be {layer.numel} int32 values for this layer")
        if alpha is None:
            alpha = torch.full((groups, num_basis), 1.0 / num_basis, dtype=torch.float32)
        alpha = alpha.reshape(-1, num_basis) if alpha.shape[-1:] == (num_basis,) else alpha
        outputs = layer.weight_shape[0]
        if alpha.dim() != 2 or alpha.shape[-1] != num_basis or not 1 <= len(alpha) <= outputs:
            raise ConfigError(
                f"alpha must have shape [groups, {num_basis}] with 1 to {outputs} groups, "
                f"got {tuple(alpha.shape)}"
            )
        indices = _group_indices(codes, layer, len(alpha), num_basis)
        self.register_buffer("indices", indices, persistent=False)
        self.constant = layer.weight_constant
        self.alpha = nn.Parameter(alpha.detach().to(codes.device).clone())

    @classmethod
    def from_masks(
        cls,
        layer: MaskedLayer,
        basis_masks: Sequence[torch.Tensor],
        alpha: torch.Tensor | None = None,
        *,
        groups: int = 1,
    ) -> AlphaMask:
        """Build from the layer's ``|B|`` bool basis masks (its shape, or flat)."""
        check_num_basis(len(basis_masks))
        negative = layer.sign_bits(device=basis_masks[0].device)
        codes = mask_codes(negative, basis_masks)
        return cls(layer, codes, len(basis_masks), alpha, groups=groups)

    @property
    def num_basis(self) -> int:
        return self.alpha.shape[-1]

    def weight(self, layer: MaskedLayer) -> torch.Tensor:
        flat = _AlphaWeight.apply(self.alpha, self.indices, self.constant)
        return flat.view(layer.weight_shape)


def _group_indices(
    codes: torch.Tensor, layer: MaskedLayer, groups: int, num_basis: int
) -> torch.Tensor:
    """Each weight's index into its layer's flattened ``[groups, 2 ** (|B| + 1)]`` value tables."""
    if groups == 1:
        return codes
    outputs = layer.weight_shape[0]
    offsets = (output_groups(outputs, groups, codes.device) << (num_basis + 1)).int()
    return (codes.view(outputs, -1) + offsets.unsqueeze(1)).flatten()


class FixedWeight(WeightSource):
    """A materialised weight tensor (inference, export)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("fixed", weight.detach())

    def weight(self, layer: MaskedLayer) -> torch.Tensor:
        return self.fixed


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
    model: nn.Module,
    basis: Sequence[MaskSet],
    alpha: torch.Tensor | None = None,
    *,
    groups: int = 1,
) -> list[AlphaMask]:
    """Make every layer a trainable alpha combination of the basis masks.

    Args:
        model: a model from :func:`supsup_deploy.get_model`.
        basis: ``|B|`` mask sets.
        alpha: initial ``[num_layers, G, |B|]`` (or ``[num_layers, |B|]``) table; default
            ``1 / |B|`` everywhere.
        groups: alpha rows per layer when ``alpha`` is not given
            (:mod:`supsup_deploy.alpha_groups`).

    Returns:
        The new sources, one per layer; their ``alpha`` are the trainable parameters.
    """
    layers = masked_layers(model)
    for number, mask_set in enumerate(basis):
        if len(mask_set) != len(layers):
            raise ConfigError(
                f"basis mask {number} has {len(mask_set)} layers, the model has {len(layers)}"
            )
    if alpha is not None:
        alpha = as_grouped(alpha)
        if alpha.dim() != 3 or alpha.shape[::2] != (len(layers), len(basis)):
            raise ConfigError(
                f"alpha table must have shape [{len(layers)}, groups, {len(basis)}], "
                f"got {tuple(alpha.shape)}"
            )
        groups = alpha.shape[1]
    check_groups(groups, [layer.weight_shape for layer in layers])
    device = model_device(model)
    sources = []
    for index, layer in enumerate(layers):
        layer_masks = [mask_set[index].to(device) for mask_set in basis]
        row = None if alpha is None else alpha[index]
        source = AlphaMask.from_masks(layer, layer_masks, row, groups=groups)
        layer.set_source(source)
        sources.append(source)
    return sources


def alpha_table(model: nn.Module) -> torch.Tensor:
    """The model's current ``[num_layers, G, |B|]`` alpha table (detached copy)."""
    rows = []
    for layer in masked_layers(model):
        if not isinstance(layer.source, AlphaMask):
            raise ConfigError(f"masked layer {layer.layer_index} is not using an alpha combination")
        rows.append(layer.source.alpha.detach())
    return torch.stack(rows)


@torch.no_grad()
def load_alpha_table(model: nn.Module, table: torch.Tensor) -> None:
    """Switch an alpha model to another task's table in place (no rebuild); a
    ``[num_layers, |B|]`` table counts as one row per layer."""
    layers = masked_layers(model)
    current = alpha_table(model)
    table = as_grouped(table)
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


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU when it has none)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")
