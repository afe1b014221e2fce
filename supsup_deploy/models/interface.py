"""``MaskedModel``: the interface every registered architecture implements; ``ModelFamily``:
what the architectures of one family share.

Masks, exports and synthetic bundles reach a model only through these methods, so a new
architecture (a builder registered with :func:`supsup_deploy.models.register_model`) works
everywhere once it subclasses :class:`MaskedModel` and implements the two abstract methods.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from supsup_deploy.masked_layers import MaskedLayer, masked_layers
from supsup_deploy.models.config import ModelConfig
from supsup_deploy.normalization import NormLayer, TaskBatchNorm2d, norm_layers, task_norms


@dataclass(frozen=True)
class ModelFamily:
    """The input stems a family's builders accept (``ModelConfig.stem`` names one of them).

    Attributes:
        name: the family's name (e.g. ``"resnet"``), as ``list_models(family=...)`` takes it.
        stems: the stem names its builders know; the first is the default.
        stem_for_image_size: the stem a run on square images of this side trains with.
    """

    name: str
    stems: tuple[str, ...]
    stem_for_image_size: Callable[[int], str]

    @property
    def default_stem(self) -> str:
        return self.stems[0]


class MaskedModel(nn.Module, metaclass=abc.ABCMeta):
    """A network whose conv and linear layers are :class:`MaskedLayer` s over a seeded backbone.

    Args:
        config: the configuration the model was built from, kept as ``model.config``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def masked_layers(self) -> list[MaskedLayer]:
        """The masked layers in module order (the order of ``layer_index``)."""
        return masked_layers(self)

    def norm_layers(self) -> list[NormLayer]:
        """Every normalisation layer, in module order."""
        return norm_layers(self)

    def task_norms(self) -> list[TaskBatchNorm2d]:
        """The normalisation layers that keep per-task statistics, in module order."""
        return task_norms(self)

    @abc.abstractmethod
    def conv_norm_pairs(self) -> list[tuple[str, str]]:
        """Module paths ``(conv, norm)`` of each norm that directly normalises a masked conv's
        output: the pairs an export folds into one convolution. Empty when there are none."""

    @abc.abstractmethod
    def residual_branch_ends(self) -> list[MaskedLayer | NormLayer]:
        """The last module of every residual branch (its final norm, or its final masked layer
        where the branch ends in one). Empty for a network without residual branches."""
