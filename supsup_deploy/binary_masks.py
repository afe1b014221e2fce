"""Binary masks: exact top-k selection, per-layer densities, bit packing and per-weight codes."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from supsup_deploy.errors import ConfigError

# A weight's code holds one bit per basis mask plus its sign bit, and indexes a table of
# 2 ** (num_basis + 1) entries, so the number of basis masks is capped.
MAX_BASIS = 16
ER_MAX_DENSITY = 0.5
_BIT_WEIGHTS = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8)


def kept_count(numel: int, density: float) -> int:
    """How many weights a mask of the given density keeps: ``round(density * numel)``, at least 1.

    Args:
        numel: number of weights in the layer.
        density: fraction kept, in ``(0, 1]``.

    Returns:
        The exact number of ones in the layer's mask.
    """
    check_density(density)
    return min(numel, max(1, round(density * numel)))


def check_density(density: float) -> None:
    """Raise ConfigError unless ``0 < density <= 1``."""
    if not 0.0 < density <= 1.0 or math.isnan(density):
        raise ConfigError(f"density must be in (0, 1], got {density}")


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """The edge-popup mask: True for the ``kept_count`` entries of largest ``|score|``.

    Args:
        scores: a layer's real-valued scores, any shape.
        density: fraction of weights kept.

    Returns:
        A bool tensor shaped like ``scores`` with exactly ``kept_count(scores.numel(), density)``
        True entries.
    """
    flat = scores.detach().abs().flatten()
    kept = kept_count(flat.numel(), density)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[flat.topk(kept, sorted=False).indices] = True
    return mask.view_as(scores)


def er_density(shape: Sequence[int], scale: float) -> float:
    """The ER rule ``min(0.5, scale * (c_in + c_out) / (c_in * c_out * kh * kw))`` for one layer.

    Args:
        shape: the weight's shape ``[c_out, c_in, *kernel]``.
        scale: the global multiplier ``s`` (SupSup swept 1..32).

    Returns:
        The layer's density.
    """
    if scale <= 0:
        raise ConfigError(f"the ER scale must be positive, got {scale}")
    c_out, c_in = shape[0], shape[1]
    return min(ER_MAX_DENSITY, scale * (c_in + c_out) / math.prod(shape))


def resolve_densities(shapes: Sequence[Sequence[int]], density: float | str) -> list[float]:
    """Per-layer densities from one setting: a fraction (``0.5``) or the ER rule (``"er:4"``).

    Args:
        shapes: the masked layers' weight shapes, in model order.
        density: a float in ``(0, 1]``, its string form, or ``"er:SCALE"``.

    Returns:
        One density per layer.

    Example:
        >>> resolve_densities([(20, 3, 3, 3)], "er:1")
        [0.5]
    """
    text = str(density).strip().lower()
    if text.startswith("er:"):
        try:
            scale = float(text[3:])
        except ValueError:
            raise ConfigError(f"bad ER density {density!r}: expected 'er:SCALE'") from None
        return [er_density(shape, scale) for shape in shapes]
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"bad density {density!r}: expected a fraction or 'er:SCALE'") from None
    check_density(value)
    return [value] * len(shapes)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask into bytes, least significant bit first.

    Element ``i`` of the flattened mask is bit ``i % 8`` (value ``1 << (i % 8)``) of byte
    ``i // 8``; the last byte is zero-padded. This is numpy's ``packbits(..., bitorder="little")``.

    Args:
        mask: a bool tensor of any shape.

    Returns:
        A flat uint8 tensor of ``ceil(mask.numel() / 8)`` bytes on the mask's device.

    Example:
        >>> pack_bits(torch.tensor([True, False, True])).tolist()
        [5]
    """
    flat = mask.flatten().to(torch.uint8)
    padding = (-flat.numel()) % 8
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    weights = _BIT_WEIGHTS.to(flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: flat uint8 bytes.
        numel: number of mask elements to return.

    Returns:
        A flat bool tensor of length ``numel``.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() * 8 < numel:
        shape = tuple(packed.shape)
        raise ConfigError(f"cannot unpack {numel} bits from a {packed.dtype} tensor shaped {shape}")
    weights = _BIT_WEIGHTS.to(packed.device)
    bits = (packed.view(-1, 1) & weights) != 0
    return bits.flatten()[:numel]


def mask_codes(negative: torch.Tensor, basis_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-weight codes: bit ``t`` is basis mask ``t``, bit ``len(basis_masks)`` is the sign.

    A weight's effective value under any alpha table depends only on its code, so a per-layer
    table of ``2 ** (num_basis + 1)`` values turns materialisation into one gather.

    Args:
        negative: flat bool, True where the backbone weight is negative.
        basis_masks: the basis masks of the same layer, each flat or shaped, same numel.

    Returns:
        A flat int32 tensor of codes.
    """
    num_basis = len(basis_masks)
    check_num_basis(num_basis)
    codes = negative.flatten().to(torch.int32) << num_basis
    for bit, mask in enumerate(basis_masks):
        if mask.numel() != codes.numel():
            raise ConfigError(
                f"basis mask {bit} has {mask.numel()} elements, the layer has {codes.numel()}"
            )
        codes |= mask.flatten().to(torch.int32) << bit
    return codes


# Delta swaps transposing an 8 x 8 bit matrix held in an int64 (row r = byte r, column j = bit j).
_TRANSPOSE_STEPS = ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC), (28, 0x00000000F0F0F0F0))


def codes_from_packed(packed: torch.Tensor, negative: torch.Tensor, numel: int) -> torch.Tensor:
    """:func:`mask_codes` straight from bit-packed masks, eight basis masks at a time.

    Each byte position of eight masks is an 8 x 8 bit matrix (mask by element); transposing it
    gives the eight elements' codes at once, without unpacking the masks.

    Args:
        packed: uint8 ``[|B|, ceil(numel / 8)]``, row ``t`` = basis mask ``t`` as :func:`pack_bits`.
        negative: flat bool ``[numel]``, True where the backbone weight is negative.
        numel: number of weights in the layer.

    Returns:
        A flat int32 tensor of codes, equal to ``mask_codes(negative, unpacked masks)``.
    """
    num_basis, num_bytes = packed.shape
    check_num_basis(num_basis)
    codes = negative.flatten().to(torch.int32) << num_basis
    for group_start in range(0, num_basis, 8):
        rows = packed[group_start : group_start + 8]
        block = packed.new_zeros(num_bytes, 8)
        block[:, : rows.shape[0]] = rows.t()
        words = block.view(torch.int64).flatten()
        for shift, mask in _TRANSPOSE_STEPS:
            swapped = (words ^ torch.bitwise_right_shift(words, shift)) & mask
            words ^= swapped ^ (swapped << shift)
        group = words.view(torch.uint8)[:numel].to(torch.int32)
        codes |= group << group_start
    return codes


def check_num_basis(num_basis: int, *, name: str = "the number of basis masks") -> None:
    """Raise ConfigError unless ``1 <= num_basis <= MAX_BASIS``; ``name`` opens the message."""
    if not 1 <= num_basis <= MAX_BASIS:
        raise ConfigError(f"{name} must be in 1..{MAX_BASIS}, got {num_basis}")


def code_value_table(alpha: torch.Tensor, constant: float) -> torch.Tensor:
    """Every code's effective weight for one layer: the lookup table materialisation gathers from.

    Entry ``code`` is ``±constant * S`` where ``S`` adds ``alpha[t]`` over the basis bits set in
    the code in increasing ``t`` (left to right, in ``alpha``'s dtype) and the sign bit (bit
    ``len(alpha)``) selects minus. Built by doubling, so every entry is one addition away from a
    smaller one and the result is bit-exact on any device and in numpy.

    Args:
        alpha: the layer's ``[|B|]`` coefficients, or ``[G, |B|]`` rows (one table each).
        constant: the layer's weight magnitude ``sqrt(2) / sqrt(fan_in)``.

    Returns:
        A ``[2 ** (|B| + 1)]`` tensor (``[G, 2 ** (|B| + 1)]`` for rows).
    """
    sums = alpha.new_zeros(*alpha.shape[:-1], 1)
    for coefficient in alpha.unbind(-1):
        sums = torch.cat([sums, sums + coefficient.unsqueeze(-1)], dim=-1)
    values = sums * constant
    return torch.cat([values, -values], dim=-1)


@functools.lru_cache(maxsize=32)
def code_bit_matrix(num_basis: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``[2 ** num_basis, num_basis]`` 0/1 matrix whose row ``c`` holds the bits of ``c``."""
    codes = torch.arange(1 << num_basis, device=device).unsqueeze(1)
    bits = torch.arange(num_basis, device=device)
    return ((codes >> bits) & 1).to(dtype)
