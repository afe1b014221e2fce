"""One task of a bundle as a torchvision-``Weights``-like object: class names, input transform,
model.

``bundle.weights(task)`` gives a :class:`TaskWeights`; its :meth:`~TaskWeights.transforms` turn
images into what the model takes, exactly as ``supsup infer`` and
:func:`supsup_deploy.predictor.predict` convert image files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from supsup_deploy import data as datasets
from supsup_deploy.bundles.format import InputSpec
from supsup_deploy.errors import ConfigError
from supsup_deploy.images import to_pixels

if TYPE_CHECKING:
    from PIL.Image import Image

    from supsup_deploy.models import MaskedModel

PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
"""PIL image modes of uint8 tensors by channel count (tensors to resize go through PIL)."""


@dataclass(frozen=True)
class ImageTransform:
    """A bundle's input preprocessing as a callable: images in, the model's float input out.

    PIL images are converted to the bundle's channels (``L`` or ``RGB``, from any mode), resized
    so the shorter side is the bundle's size (bilinear) and centre-cropped
    (:mod:`supsup_deploy.images`), then scaled to ``(pixel / 255 - mean) / std`` per channel.

    Attributes:
        input: the bundle's input spec.
    """

    input: InputSpec

    def __call__(self, images: Image | Sequence[Image] | torch.Tensor) -> torch.Tensor:
        """Preprocess one image or a batch.

        Args:
            images: a PIL image or a uint8 tensor ``[C, H, W]``; or a batch: a sequence of PIL
                images or a uint8 tensor ``[N, C, H, W]``. Tensors of another size or channel
                count (1, 3 or 4) are converted through PIL like image files.

        Returns:
            float32 ``[C, size, size]`` for one image, ``[N, C, size, size]`` for a batch.

        Raises:
            ConfigError: a tensor that is not uint8 images.
        """
        from PIL import Image

        if isinstance(images, Image.Image):
            return self(self.pixels(images))
        if not isinstance(images, torch.Tensor):
            return self(torch.stack([self.pixels(image) for image in images]))
        if images.dtype != torch.uint8 or images.dim() not in (3, 4):
            raise ConfigError(
                f"images must be uint8 [C, H, W] or [N, C, H, W], got {images.dtype} "
                f"{list(images.shape)}"
            )
        batch = images if images.dim() == 4 else images[None]
        spec = self.input
        if tuple(batch.shape[1:]) != (spec.channels, spec.size, spec.size):
            batch = torch.stack([self.pixels(_tensor_image(image)) for image in batch])
        normalised = datasets.preprocess_images(batch, spec)
        return normalised if images.dim() == 4 else normalised[0]

    def pixels(self, image: Image) -> torch.Tensor:
        """A PIL image converted to the bundle's channels and size: uint8 ``[C, size, size]``
        (:func:`supsup_deploy.images.to_pixels`: any mode, shorter side resized, centre crop)."""
        return to_pixels(image, channels=self.input.channels, size=self.input.size)


NORMALISED_SLACK = 1e-3
"""How far past what normalisation can give a float input may lie (rounding, resampling)."""


def model_input(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """A tensor of images as the model input ``[N, C, size, size]``, checked.

    uint8 images (``[N, C, H, W]`` or one ``[C, H, W]``, any size, 1, 3 or 4 channels) are
    converted by :class:`ImageTransform`. A float tensor must already be normalised,
    ``(pixel / 255 - mean) / std`` at the bundle's size and channels: one holding values that
    normalisation cannot give is refused, and so is one whose values all lie in ``[0, 1]``
    (pixels scaled but not normalised).

    Raises:
        ConfigError: one line saying what the tensor is and what to pass instead.
    """
    if images.dtype == torch.uint8:
        return ImageTransform(spec)(images if images.dim() == 4 else images[None])
    shape = (spec.channels, spec.size, spec.size)
    if not images.is_floating_point() or images.dim() != 4 or tuple(images.shape[1:]) != shape:
        expected = ", ".join(map(str, shape))
        raise ConfigError(
            f"images must be uint8 [N, C, H, W] or normalised float [N, {expected}], got "
            f"{images.dtype} {list(images.shape)}"
        )
    values = images.detach().float()
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    low, high = (0 - mean) / std - NORMALISED_SLACK, (1 - mean) / std + NORMALISED_SLACK
    if not bool(((values >= low) & (values <= high)).all()):
        raise ConfigError(
            f"images hold values from {values.min():.4g} to {values.max():.4g}, outside what "
            "normalisation gives: pass uint8 images, or normalise them with "
            "bundle.weights(task).transforms()"
        )
    if bool(((values >= 0) & (values <= 1)).all()):
        raise ConfigError(
            "images hold values in [0, 1] only: they look scaled but not normalised; pass uint8 "
            "images, or normalise them with bundle.weights(task).transforms()"
        )
    return images


def _tensor_image(image: torch.Tensor) -> Image:
    """A uint8 ``[C, H, W]`` tensor as a PIL image."""
    from PIL import Image

    channels = image.shape[0]
    if channels not in PIL_MODES:
        raise ConfigError(f"images with {channels} channels: use 1, 3 or 4")
    array = image.numpy()
    array = array[0] if channels == 1 else array.transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(array), PIL_MODES[channels])


class TaskModels(Protocol):
    """What builds a task's model: an opened :class:`~supsup_deploy.bundles.reader.Bundle`."""

    def model(self, task: int | str, *, device: torch.device | str = "cpu") -> MaskedModel: ...


@dataclass(frozen=True, kw_only=True)
class TaskWeights:
    """One installed task: what it predicts, what input it takes and how to build its model.

    The bundle's answer to torchvision's ``Weights``: ``class_names`` is torchvision's
    ``meta["categories"]``, :meth:`transforms` its ``transforms()``, :meth:`model` the builder.
    Get one from :meth:`~supsup_deploy.bundles.reader.Bundle.weights`.

    Attributes:
        bundle: the opened bundle the task belongs to.
        task: task id.
        name: task name.
        class_names: one per classifier output.
        input: the input spec the task was trained with.
    """

    bundle: TaskModels = field(repr=False, compare=False)
    task: int
    name: str
    class_names: tuple[str, ...]
    input: InputSpec

    def transforms(self) -> ImageTransform:
        """The callable that turns uint8 or PIL images into this task's model input."""
        return ImageTransform(self.input)

    def model(self, *, device: torch.device | str = "cpu") -> MaskedModel:
        """The task's eval-mode model, its weights materialised (:meth:`Bundle.model`)."""
        return self.bundle.model(self.task, device=device)
