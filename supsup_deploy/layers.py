"""Masked conv and linear layers and the sources their effective weight comes from.

A masked layer owns no weight. Its backbone is regenerated from ``(seed, layer_index)``
(:mod:`supsup_deploy.backbone`) and its effective weight comes from a *weight source*:

- :class:`ScoreMask`: edge-popup training, ``W * topk(|scores|)`` with a straight-through gradient.
- :class:`AlphaMask`: ``W * sum_t alpha[t] * M_t``, computed from per-weight codes
  (:func:`supsup_deploy.masks.mask_codes`) with one gather forward and one scatter-add backward,
  so training keeps one int32 code per weight instead of ``|B|`` float masks.
- :class:`FixedWeight`: a materialised weight tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from supsup_deploy import backbone
from supsup_deploy.errors import ConfigError
from supsup_deploy.masks import (
    check_density,
    check_num_basis,
    code_bit_matrix,
    code_value_table,
    mask_codes,
    topk_mask,
)


class _TopKStraightThrough(torch.autograd.Function):
    """Forward: the 0/1 top-k mask of ``|scores|``. Backward: the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, magnitudes: torch.Tensor, density: float) -> torch.Tensor:
        return topk_mask(magnitudes, density).to(magnitudes.dtype)

    @staticmethod
    def backward(ctx, grad_mask: torch.Tensor):
        return grad_mask, None


class _AlphaWeight(torch.autograd.Function):
    """``W_eff[j] = c * s_j * sum_t alpha[t] * M_t[j]`` from codes, differentiable in alpha."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, codes: torch.Tensor, constant: float) -> torch.Tensor:
        ctx.save_for_backward(codes)
        ctx.constant = constant
        ctx.num_basis = alpha.numel()
        return code_value_table(alpha, constant).index_select(0, codes)

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor):
        (codes,) = ctx.saved_tensors
        bit_matrix = code_bit_matrix(ctx.num_basis, grad_weight.dtype, grad_weight.device)
        sums = grad_weight.new_zeros(2 * bit_matrix.shape[0]).index_add_(0, codes, grad_weight)
        positive, negative = sums.chunk(2)
        return bit_matrix.t() @ ((positive - negative) * ctx.constant), None, None


class WeightSource(nn.Module):
    """Where a masked layer's effective weight comes from."""

    def weight(self, layer: MaskedLayer) -> torch.Tensor:
        raise NotImplementedError


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
    """A real-valued combination of fixed basis masks: ``W * sum_t alpha[t] * M_t``.

    Only one int32 code per weight is kept (sign bit and one bit per basis mask); the alpha
    gradient is a scatter-add of the weight gradient over codes.

    Args:
        layer: the masked layer this source serves.
        codes: the layer's flat int32 codes (:func:`supsup_deploy.masks.mask_codes`).
        num_basis: ``|B|``.
        alpha: initial coefficients, shape ``[|B|]``; default ``1 / |B|`` each.
    """

    def __init__(
        self,
        layer: MaskedLayer,
        codes: torch.Tensor,
        num_basis: int,
        alpha: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check_num_basis(num_basis)
        if codes.dtype != torch.int32 or codes.numel() != layer.numel:
            raise ConfigError(f"codes must be {layer.numel} int32 values for this layer")
        self.register_buffer("codes", codes, persistent=False)
        self.constant = layer.weight_constant
        if alpha is None:
            alpha = torch.full((num_basis,), 1.0 / num_basis, dtype=torch.float32)
        if alpha.shape != (num_basis,):
            raise ConfigError(f"alpha must have shape [{num_basis}], got {tuple(alpha.shape)}")
        self.alpha = nn.Parameter(alpha.detach().to(codes.device).clone())

    @classmethod
    def from_masks(
        cls,
        layer: MaskedLayer,
        basis_masks: Sequence[torch.Tensor],
        alpha: torch.Tensor | None = None,
    ) -> AlphaMask:
        """Build from the layer's ``|B|`` bool basis masks (its shape, or flat)."""
        check_num_basis(len(basis_masks))
        negative = layer.sign_bits(device=basis_masks[0].device)
        return cls(layer, mask_codes(negative, basis_masks), len(basis_masks), alpha)

    @property
    def num_basis(self) -> int:
        return self.alpha.numel()

    def weight(self, layer: MaskedLayer) -> torch.Tensor:
        flat = _AlphaWeight.apply(self.alpha, self.codes, self.constant)
        return flat.view(layer.weight_shape)


class FixedWeight(WeightSource):
    """A materialised weight tensor (inference, export)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("fixed", weight.detach())

    def weight(self, layer: MaskedLayer) -> torch.Tensor:
        return self.fixed


class MaskedLayer(nn.Module):
    """Common part of masked conv and linear layers: shape, backbone and weight source.

    ``seed`` and ``layer_index`` are assigned by the model once it is built
    (:func:`supsup_deploy.models.assign_layer_indices`).
    """

    def __init__(self, weight_shape: Sequence[int]) -> None:
        super().__init__()
        self.weight_shape = tuple(int(size) for size in weight_shape)
        self.seed = 0
        self.layer_index = -1
        self.source: WeightSource | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def fan_in(self) -> int:
        return backbone.fan_in(self.weight_shape)

    @property
    def weight_constant(self) -> float:
        return backbone.weight_constant(self.fan_in)

    def sign_bits(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Flat bool, True where this layer's backbone weight is negative."""
        self._check_indexed()
        return backbone.sign_bits(self.seed, self.layer_index, self.numel, device=device)

    def backbone_weight(self, device: torch.device | str | None = None) -> torch.Tensor:
        """This layer's signed-constant backbone weight, regenerated bit-exactly."""
        self._check_indexed()
        return backbone.signed_constant_weight(
            self.seed, self.layer_index, self.weight_shape, device=device
        )

    def set_source(self, source: WeightSource | None) -> None:
        """Attach the source of the effective weight (replacing any previous one)."""
        self.source = source

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses, from the attached source."""
        if self.source is None:
            raise ConfigError(
                f"masked layer {self.layer_index} has no weight source: attach scores, an alpha "
                "combination or a fixed weight first (see supsup_deploy.masking)"
            )
        return self.source.weight(self)

    def _check_indexed(self) -> None:
        if self.layer_index < 0:
            raise ConfigError("this masked layer has no layer index: build it through get_model")

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, layer_index={self.layer_index}"


class MaskedConv2d(MaskedLayer):
    """A bias-free conv whose weight is the backbone times a mask from its source."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__((out_channels, in_channels, kernel_size, kernel_size))
        self.stride = stride
        self.padding = padding

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.conv2d(inputs, self.effective_weight(), None, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stride={self.stride}, padding={self.padding}"


class MaskedLinear(MaskedLayer):
    """A bias-free linear layer whose weight is the backbone times a mask from its source."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__((out_features, in_features))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.effective_weight())


def masked_layers(model: nn.Module) -> list[MaskedLayer]:
    """The model's masked layers in module order (the order of ``layer_index``)."""
    return [module for module in model.modules() if isinstance(module, MaskedLayer)]
