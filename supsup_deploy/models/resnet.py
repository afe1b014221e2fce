"""The ResNet family with masked conv/linear layers and non-affine normalisation.

Module names and order follow torchvision's ``resnet.py`` (``conv1``, ``layer1.0.conv1``, ...,
``downsample.0``, ``fc``), so the masked weight shapes come out in torchvision's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from supsup_deploy.masked_layers import MaskedConv2d, MaskedLayer, MaskedLinear
from supsup_deploy.models._api import register_model
from supsup_deploy.models.config import ModelConfig
from supsup_deploy.models.interface import MaskedModel, ModelFamily
from supsup_deploy.normalization import NormLayer, make_norm

STEMS = ("imagenet", "cifar")
"""``"imagenet"``: a 7x7 stride-2 conv and a stride-2 max-pool; ``"cifar"``: a 3x3 stride-1 conv."""
SMALL_IMAGE_LIMIT = 64
"""Images narrower than this train with the ``"cifar"`` stem, which keeps their resolution."""


def stem_for_image_size(size: int) -> str:
    """The stem for square images of side ``size``."""
    return "cifar" if size < SMALL_IMAGE_LIMIT else "imagenet"


RESNET = ModelFamily("resnet", STEMS, stem_for_image_size)


@dataclass(frozen=True)
class ResNetLayout:
    """The fixed shape of one ResNet variant."""

    block: str  # "basic", "bottleneck" or "preact_bottleneck"
    blocks: tuple[int, int, int, int]
    base_channels: int = 64
    width_per_group: int = 64
    classifier: str = "linear"  # "linear" (torchvision's fc) or "conv" (a 1x1 conv, as in SupSup)


class _Norms:
    """Builds the configured normalisation layer for a number of channels."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def __call__(self, channels: int) -> NormLayer:
        return make_norm(
            self.config.norm,
            channels,
            num_tasks=self.config.num_tasks,
            groups=self.config.norm_groups,
        )


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: _Norms | None) -> nn.Module:
    conv = MaskedConv2d(in_channels, out_channels, 1, stride=stride)
    return nn.Sequential(conv, norm(out_channels)) if norm else nn.Sequential(conv)


class BasicBlock(nn.Module):
    expansion = 1
    conv_norm_names = (("conv1", "bn1"), ("conv2", "bn2"))
    branch_end = "bn2"

    def __init__(self, in_channels: int, planes: int, stride: int, norm: _Norms, inner: int):
        super().__init__()
        self.conv1 = MaskedConv2d(in_channels, planes, 3, stride=stride, padding=1)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = MaskedConv2d(planes, planes, 3, padding=1)
        self.bn2 = norm(planes)
        self.downsample = None
        if stride != 1 or in_channels != planes:
            self.downsample = _shortcut(in_channels, planes, stride, norm)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(inputs)))
        out = self.bn2(self.conv2(out))
        shortcut = inputs if self.downsample is None else self.downsample(inputs)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4
    conv_norm_names = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    branch_end = "bn3"

    def __init__(self, in_channels: int, planes: int, stride: int, norm: _Norms, inner: int):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = MaskedConv2d(in_channels, inner, 1)
        self.bn1 = norm(inner)
        self.conv2 = MaskedConv2d(inner, inner, 3, stride=stride, padding=1)
        self.bn2 = norm(inner)
        self.conv3 = MaskedConv2d(inner, out_channels, 1)
        self.bn3 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = _shortcut(in_channels, out_channels, stride, norm)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(inputs)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = inputs if self.downsample is None else self.downsample(inputs)
        return self.relu(out + shortcut)


class PreActBottleneck(nn.Module):
    """He et al.'s pre-activation bottleneck: norm-ReLU-conv three times, shortcut without norm."""

    expansion = 4
    conv_norm_names = ()
    branch_end = "conv3"

    def __init__(self, in_channels: int, planes: int, stride: int, norm: _Norms, inner: int):
        super().__init__()
        out_channels = planes * self.expansion
        self.bn1 = norm(in_channels)
        self.conv1 = MaskedConv2d(in_channels, inner, 1)
        self.bn2 = norm(inner)
        self.conv2 = MaskedConv2d(inner, inner, 3, stride=stride, padding=1)
        self.bn3 = norm(inner)
        self.conv3 = MaskedConv2d(inner, out_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = _shortcut(in_channels, out_channels, stride, None)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        activated = self.relu(self.bn1(inputs))
        shortcut = inputs if self.downsample is None else self.downsample(activated)
        out = self.conv1(activated)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck, "preact_bottleneck": PreActBottleneck}


class MaskedResNet(MaskedModel):
    """A ResNet whose every conv and linear layer is masked; see :class:`ResNetLayout`."""

    def __init__(self, layout: ResNetLayout, config: ModelConfig) -> None:
        super().__init__(config)
        norm = _Norms(config)
        block = _BLOCKS[layout.block]
        self.preactivation = layout.block == "preact_bottleneck"
        channels = [max(1, round(layout.base_channels * config.width * 2**i)) for i in range(4)]
        stem_channels = channels[0]
        if config.stem == "imagenet":
            self.conv1 = MaskedConv2d(config.in_channels, stem_channels, 7, stride=2, padding=3)
        else:
            self.conv1 = MaskedConv2d(config.in_channels, stem_channels, 3, padding=1)
        self.bn1 = norm(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        use_pool = config.stem == "imagenet"
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if use_pool else nn.Identity()
        in_channels = stem_channels
        for stage, (planes, count) in enumerate(zip(channels, layout.blocks, strict=True)):
            inner = int(planes * layout.width_per_group / 64)
            blocks = []
            for position in range(count):
                stride = 2 if stage > 0 and position == 0 else 1
                blocks.append(block(in_channels, planes, stride, norm, inner))
                in_channels = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.final_norm = norm(in_channels) if self.preactivation else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier_is_conv = layout.classifier == "conv"
        if self.classifier_is_conv:
            self.fc = MaskedConv2d(in_channels, config.num_classes, 1)
        else:
            self.fc = MaskedLinear(in_channels, config.num_classes)

    def conv_norm_pairs(self) -> list[tuple[str, str]]:
        """Module paths of each norm that directly normalises a conv's output (foldable pairs)."""
        pairs = [("conv1", "bn1")]
        for stage in range(1, 5):
            for position, block in enumerate(getattr(self, f"layer{stage}")):
                prefix = f"layer{stage}.{position}"
                pairs += [
                    (f"{prefix}.{conv}", f"{prefix}.{norm}") for conv, norm in block.conv_norm_names
                ]
                if block.downsample is not None and len(block.downsample) == 2:
                    pairs.append((f"{prefix}.downsample.0", f"{prefix}.downsample.1"))
        return pairs

    def residual_branch_ends(self) -> list[MaskedLayer | NormLayer]:
        """The last module of every residual branch: its final norm, or its final conv (pre-act)."""
        return [
            getattr(block, block.branch_end)
            for stage in range(1, 5)
            for block in getattr(self, f"layer{stage}")
        ]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(self.relu(self.bn1(self.conv1(inputs))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.final_norm is not None:
            out = self.relu(self.final_norm(out))
        out = self.avgpool(out)
        if self.classifier_is_conv:
            return self.fc(out).flatten(1)
        return self.fc(out.flatten(1))


@register_model(family=RESNET, stem="cifar", num_classes=5)
def gem_resnet18(config: ModelConfig) -> MaskedResNet:
    """SupSup's narrow CIFAR ResNet-18: channels 20/40/80/160, masked 1x1-conv classifier."""
    layout = ResNetLayout("basic", (2, 2, 2, 2), base_channels=20, classifier="conv")
    return MaskedResNet(layout, config)


@register_model(family=RESNET, torchvision_name="resnet18")
def resnet18(config: ModelConfig) -> MaskedResNet:
    """ResNet-18 (BasicBlock [2, 2, 2, 2])."""
    return MaskedResNet(ResNetLayout("basic", (2, 2, 2, 2)), config)


@register_model(family=RESNET, torchvision_name="resnet34")
def resnet34(config: ModelConfig) -> MaskedResNet:
    """ResNet-34 (BasicBlock [3, 4, 6, 3])."""
    return MaskedResNet(ResNetLayout("basic", (3, 4, 6, 3)), config)


@register_model(family=RESNET, torchvision_name="resnet50")
def resnet50(config: ModelConfig) -> MaskedResNet:
    """ResNet-50 (Bottleneck [3, 4, 6, 3])."""
    return MaskedResNet(ResNetLayout("bottleneck", (3, 4, 6, 3)), config)


@register_model(family=RESNET, torchvision_name="resnet101")
def resnet101(config: ModelConfig) -> MaskedResNet:
    """ResNet-101 (Bottleneck [3, 4, 23, 3])."""
    return MaskedResNet(ResNetLayout("bottleneck", (3, 4, 23, 3)), config)


@register_model(family=RESNET, torchvision_name="resnet152")
def resnet152(config: ModelConfig) -> MaskedResNet:
    """ResNet-152 (Bottleneck [3, 8, 36, 3])."""
    return MaskedResNet(ResNetLayout("bottleneck", (3, 8, 36, 3)), config)


@register_model(family=RESNET, torchvision_name="wide_resnet50_2")
def wide_resnet50_2(config: ModelConfig) -> MaskedResNet:
    """Wide ResNet-50-2 (Bottleneck [3, 4, 6, 3], inner width doubled)."""
    return MaskedResNet(ResNetLayout("bottleneck", (3, 4, 6, 3), width_per_group=128), config)


@register_model(family=RESNET, torchvision_name="wide_resnet101_2")
def wide_resnet101_2(config: ModelConfig) -> MaskedResNet:
    """Wide ResNet-101-2 (Bottleneck [3, 4, 23, 3], inner width doubled)."""
    return MaskedResNet(ResNetLayout("bottleneck", (3, 4, 23, 3), width_per_group=128), config)


@register_model(family=RESNET)
def preact_resnet200(config: ModelConfig) -> MaskedResNet:
    """Pre-activation ResNet-200 (pre-activation Bottleneck [3, 24, 36, 3])."""
    return MaskedResNet(ResNetLayout("preact_bottleneck", (3, 24, 36, 3)), config)
