"""``ModelConfig``: everything that defines an architecture and its backbone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from supsup_deploy.errors import ConfigError
from supsup_deploy.normalization import NORM_KINDS


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything that defines an architecture and its backbone; a bundle stores exactly this.

    Attributes:
        arch: registered architecture name.
        num_classes: classifier outputs.
        in_channels: input image channels.
        stem: the input stem, one of the architecture family's ``stems`` (the ResNets':
            ``supsup_deploy.models.resnet.STEMS``); the registry checks it.
        width: channel multiplier.
        seed: backbone seed, in ``[0, 2**32)``.
        norm: ``"batch"`` (per-task running statistics) or ``"group"`` (statistic-free).
        norm_groups: groups of the ``"group"`` norm.
        num_tasks: statistic slots of the ``"batch"`` norm.
    """

    arch: str
    num_classes: int = 1000
    in_channels: int = 3
    stem: str
    width: float = 1.0
    seed: int = 0
    norm: str = "batch"
    norm_groups: int = 4
    num_tasks: int = 1

    def __post_init__(self) -> None:
        checks = [
            (self.num_classes >= 1, f"num_classes must be at least 1, got {self.num_classes}"),
            (self.in_channels >= 1, f"in_channels must be at least 1, got {self.in_channels}"),
            (0 < self.width <= 64, f"width must be in (0, 64], got {self.width}"),
            (0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}"),
            (self.norm in NORM_KINDS, f"unknown norm {self.norm!r}: expected one of {NORM_KINDS}"),
            (self.norm_groups >= 1, f"norm_groups must be at least 1, got {self.norm_groups}"),
            (self.num_tasks >= 1, f"num_tasks must be at least 1, got {self.num_tasks}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**values)
