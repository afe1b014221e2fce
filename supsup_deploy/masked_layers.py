"""Masked conv and linear layers: no weight of their own, a regenerated backbone and a source.

A masked layer owns no weight. Its backbone is regenerated from ``(seed, layer_index)``
(:mod:`supsup_deploy.backbone`) and its effective weight comes from the *weight source*
attached to it: a :class:`WeightSource`, whose kinds live in :mod:`supsup_deploy.weight_sources`
(scores to train, an alpha combination of basis masks, or a materialised weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from supsup_deploy import backbone
from supsup_deploy.errors import ConfigError


class WeightSource(nn.Module):
    """Where a masked layer's effective weight comes from."""

    def weight(self, layer: MaskedLayer) -> torch.Tensor:
        raise NotImplementedError


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
                "combination or a fixed weight first (see supsup_deploy.weight_sources)"
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
