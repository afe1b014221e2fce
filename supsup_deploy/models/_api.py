"""The architecture registry: ``register_model``, ``get_model``, ``list_models``, summaries.

Every entry is a builder taking a :class:`ModelConfig` and returning a :class:`MaskedModel`
(the interface in ``interface.py``). Summaries (masked
layers, weights, normalisation channels) are computed on the meta device: nothing is allocated.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from supsup_deploy.errors import ConfigError
from supsup_deploy.masked_layers import MaskedLayer, masked_layers
from supsup_deploy.models.config import ModelConfig
from supsup_deploy.models.interface import MaskedModel, ModelFamily
from supsup_deploy.weight_sources import FixedWeight


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture."""

    name: str
    builder: Callable[[ModelConfig], MaskedModel]
    family: ModelFamily
    defaults: dict[str, Any] = field(default_factory=dict)
    torchvision_name: str | None = None
    description: str = ""

    def config(self, **overrides: Any) -> ModelConfig:
        """This entry's default configuration with ``overrides`` applied."""
        values = {"stem": self.family.default_stem, **self.defaults, **overrides}
        return _make_config(self, values)

    @property
    def summary(self) -> ModelSummary:
        """Counts for the default configuration (computed once, without allocating weights)."""
        return summarize_model(self.name)


@dataclass(frozen=True)
class ModelSummary:
    """Sizes of one configured architecture."""

    config: ModelConfig
    layer_names: tuple[str, ...]
    weight_shapes: tuple[tuple[int, ...], ...]
    norm_layers: int
    norm_channels: int

    @property
    def masked_layers(self) -> int:
        return len(self.weight_shapes)

    @property
    def masked_weights(self) -> int:
        total = 0
        for shape in self.weight_shapes:
            count = 1
            for size in shape:
                count *= size
            total += count
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.config.arch,
            "config": self.config.to_dict(),
            "masked_layers": self.masked_layers,
            "masked_weights": self.masked_weights,
            "norm_layers": self.norm_layers,
            "norm_channels": self.norm_channels,
        }


_MODELS: dict[str, ModelEntry] = {}


def register_model(
    *,
    family: ModelFamily,
    torchvision_name: str | None = None,
    **defaults: Any,
) -> Callable[[Callable[[ModelConfig], MaskedModel]], Callable[[ModelConfig], MaskedModel]]:
    """Register a builder under its function name.

    Args:
        family: the architecture's family (its stems).
        torchvision_name: the torchvision model with the same weight shapes, if any.
        **defaults: ModelConfig fields that differ from the dataclass defaults for this entry.

    Returns:
        A decorator that registers and returns the builder unchanged.
    """

    def decorator(builder: Callable[[ModelConfig], MaskedModel]):
        name = builder.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        description = (builder.__doc__ or "").strip().splitlines()[0] if builder.__doc__ else ""
        _MODELS[name] = ModelEntry(
            name, builder, family, dict(defaults), torchvision_name, description
        )
        return builder

    return decorator


def list_models(family: str | None = None) -> list[str]:
    """Registered architecture names, sorted, optionally of one family."""
    return sorted(name for name, entry in _MODELS.items() if family in (None, entry.family.name))


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; ConfigError naming close matches if there is none."""
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_MODELS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"unknown architecture {name!r}{hint}; available: {', '.join(list_models())}"
        ) from None


WEIGHT_CHOICES = ("backbone", None)


def get_model(name: str, *, weights: str | None = "backbone", **options: Any) -> MaskedModel:
    """Build a registered architecture, ready to run.

    Args:
        name: a name from :func:`list_models`.
        weights: ``"backbone"`` (default): every masked layer runs the dense signed-constant
            backbone (every weight kept), so the model runs as built; None: no weight source
            (nothing allocated for the weights; the forward pass refuses until one is attached).
            Either way :mod:`supsup_deploy.weight_sources` attaches another (scores to train,
            an alpha combination, a task's materialised weights).
        **options: ModelConfig fields (``num_classes``, ``in_channels``, ``stem``, ``width``,
            ``seed``, ``norm``, ``norm_groups``, ``num_tasks``); the entry's defaults fill the rest.

    Returns:
        The model (a :class:`MaskedModel`), every masked layer indexed.

    Example:
        >>> model = get_model("gem_resnet18", num_classes=5, seed=0)
        >>> model.config.stem
        'cifar'
        >>> model.eval()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 5])
    """
    if weights not in WEIGHT_CHOICES:
        raise ConfigError(f"unknown weights {weights!r}: use 'backbone' or None")
    model = build_model(get_model_entry(name).config(**options))
    if weights == "backbone":
        for layer in masked_layers(model):
            layer.set_source(FixedWeight(layer.backbone_weight()))
    return model


def build_model(config: ModelConfig) -> MaskedModel:
    """Build the model a :class:`ModelConfig` describes.

    Raises:
        ConfigError: the architecture is not registered, or its family has no such stem.
        TypeError: its builder does not return a :class:`MaskedModel` of this config.
    """
    entry = get_model_entry(config.arch)
    _check_stem(entry, config)
    model = entry.builder(config)
    if not isinstance(model, MaskedModel) or model.config != config:
        raise TypeError(f"the builder of {config.arch} must return a MaskedModel of its config")
    assign_layer_indices(model, config.seed)
    return model


def assign_layer_indices(model: nn.Module, seed: int) -> None:
    """Number the masked layers in module order and give each the backbone seed."""
    for index, layer in enumerate(masked_layers(model)):
        layer.layer_index = index
        layer.seed = seed


def summarize_model(name: str, **options: Any) -> ModelSummary:
    """Counts for one configuration, computed on the meta device.

    Args:
        name: registered architecture.
        **options: ModelConfig fields.

    Returns:
        A :class:`ModelSummary`.

    Example:
        >>> summarize_model("gem_resnet18").masked_weights
        1090940
    """
    return _summarize(get_model_entry(name).config(**options))


@functools.lru_cache(maxsize=128)
def _summarize(config: ModelConfig) -> ModelSummary:
    with torch.device("meta"):
        model = build_model(config)
    names, shapes = [], []
    for module_name, module in model.named_modules():
        if isinstance(module, MaskedLayer):
            names.append(module_name)
            shapes.append(module.weight_shape)
    norms = model.norm_layers()
    return ModelSummary(
        config=config,
        layer_names=tuple(names),
        weight_shapes=tuple(shapes),
        norm_layers=len(norms),
        norm_channels=sum(norm.num_features for norm in norms),
    )


def _make_config(entry: ModelEntry, values: dict[str, Any]) -> ModelConfig:
    try:
        config = ModelConfig(arch=entry.name, **values)
    except TypeError as error:
        raise ConfigError(f"bad option for {entry.name}: {error}") from None
    _check_stem(entry, config)
    return config


def _check_stem(entry: ModelEntry, config: ModelConfig) -> None:
    stems = entry.family.stems
    if config.stem not in stems:
        raise ConfigError(f"unknown stem {config.stem!r} for {entry.name}: expected one of {stems}")
