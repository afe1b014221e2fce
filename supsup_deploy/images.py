"""Decoding one image file into the model's pixel format: uint8 ``[channels, size, size]``.

Every Pillow mode is converted to ``L`` (1 channel) or ``RGB`` (3 channels):

- alpha is dropped: the stored colour of each pixel is kept whatever its opacity, as Pillow's
  ``convert("RGB")`` does, and so as :meth:`~supsup_deploy.bundles.weights.ImageTransform.pixels`
  (``supsup infer``) and torchvision's default ``ImageFolder`` loader do;
- 16-bit and 32-bit integer greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, ``I``) keep
  their top byte (``value >> 8``, values clipped to 0..65535 first), so a 16-bit image spans
  0..255 instead of saturating as Pillow's ``convert("L")`` would;
- 32-bit float greyscale (``F``) is clipped to 0..255 (Pillow's ``convert("L")``);
- palette images with transparency go through ``RGBA`` (Pillow's advice for them), the rest
  through Pillow's own conversions.

The converted image is resized so that its shorter side is ``size`` (bilinear, antialiased:
torchvision's ``Resize(size)`` on a PIL image), then centre-cropped to ``size x size``
(``CenterCrop``). A square image therefore becomes exactly
``image.convert(mode).resize((size, size), Image.BILINEAR)``, as before.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from supsup_deploy.errors import ConfigError, FormatError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""Suffixes (lower case) of the image files read from folders."""

CHANNEL_MODES = {1: "L", 3: "RGB"}
"""The Pillow mode pixels are converted to, by channel count."""

INTEGER_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""Integer greyscale modes wider than 8 bits, reduced to their top byte."""

_CONVERT_VIA = {"La": "LA", "LAB": "RGB"}
"""Modes Pillow cannot convert to L or RGB directly, and the mode that bridges them."""

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error)
"""What Pillow's decoders raise on truncated or corrupt data."""


def _one_line(error: BaseException) -> str:
    """An exception's message with its whitespace (newlines included) collapsed."""
    return " ".join(str(error).split()) or type(error).__name__


def open_image(path: str | Path) -> Image.Image:
    """Opens an image file, reading its header only (Pillow's lazy ``Image.open``).

    Images with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` are refused (Pillow's
    ``DecompressionBombWarning`` is treated as an error, like its ``DecompressionBombError``);
    Pillow's global limit is left as it is.

    Args:
        path: the image file.

    Returns:
        The opened image, its pixels not yet decoded; close it (or use it in a ``with``).

    Raises:
        FormatError: the file cannot be read, is not an image Pillow identifies, or is a
            decompression bomb; the one-line message names the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise FormatError(
            f"{path}: refused as a possible decompression bomb ({_one_line(error)})"
        ) from None
    except UnidentifiedImageError:
        raise FormatError(f"{path}: not an image (Pillow cannot identify it)") from None
    except _DECODE_ERRORS as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise FormatError(f"{path}: cannot read ({error.strerror})") from None
        raise FormatError(f"{path}: not a readable image ({_one_line(error)})") from None


def _eight_bit(image: Image.Image, mode: str) -> Image.Image:
    """``image`` converted to the 8-bit ``mode`` (``L`` or ``RGB``) by the rules above."""
    if image.mode in INTEGER_GREY_MODES:
        values = np.asarray(image).astype(np.int64)
        top_byte = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(top_byte, "L").convert(mode)
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert(mode)
    if image.mode in _CONVERT_VIA:
        return image.convert(_CONVERT_VIA[image.mode]).convert(mode)
    return image.convert(mode)


def to_pixels(image: Image.Image, *, channels: int, size: int) -> torch.Tensor:
    """Converts a PIL image to the model's pixel format.

    Args:
        image: a PIL image of any mode; one opened lazily is decoded here.
        channels: 1 (greyscale) or 3 (RGB).
        size: the side of the square output, at least 1.

    Returns:
        uint8 ``[channels, size, size]``: converted as the module docstring says, the shorter
        side resized to ``size`` (bilinear, antialiased) and the centre ``size x size`` kept.

    Raises:
        ConfigError: ``channels`` is not 1 or 3, or ``size`` is below 1.
        FormatError: the image's data is truncated or corrupt, or Pillow cannot convert its
            mode; the one-line message names the image's file when it has one.
    """
    if channels not in CHANNEL_MODES:
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ConfigError(f"size must be at least 1, got {size}")
    name = getattr(image, "filename", "") or "image"
    try:
        image.load()
    except _DECODE_ERRORS as error:
        raise FormatError(f"{name}: truncated or corrupt image ({_one_line(error)})") from None
    try:
        converted = _eight_bit(image, CHANNEL_MODES[channels])
    except ValueError as error:
        raise FormatError(
            f"{name}: cannot convert image mode {image.mode} ({_one_line(error)})"
        ) from None
    # torchvision takes seconds to import; a process that reads no image files never pays it
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as transforms

    resized = transforms.resize(
        converted, [size], interpolation=InterpolationMode.BILINEAR, antialias=True
    )
    cropped = transforms.center_crop(resized, [size, size])
    array = np.array(cropped, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def read_pixels(path: str | Path, *, channels: int, size: int) -> torch.Tensor:
    """Opens, fully decodes and converts one image file (:func:`open_image`, :func:`to_pixels`).

    Truncated images are refused (Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is not enabled).

    Args:
        path: the image file.
        channels: 1 (greyscale) or 3 (RGB).
        size: the side of the square output, at least 1.

    Returns:
        uint8 ``[channels, size, size]``.

    Raises:
        ConfigError: ``channels`` is not 1 or 3, or ``size`` is below 1.
        FormatError: the file is not a readable image, is a decompression bomb, or is truncated
            or corrupt; the one-line message names the file.
    """
    with open_image(path) as image:
        return to_pixels(image, channels=channels, size=size)
