"""Alpha tables stored as integer codes with one scale per row (int8: format 3; int4: format 4).

A row is the last dimension (``|B|`` coefficients). Its scale is its largest magnitude over the
code limit (127 for int8, 7 for int4), rounded to float16; its codes are the row over that scale,
rounded and clipped to ``-limit .. limit``. Reading gives back ``float32(code) * float32(scale)``,
one float32 multiplication per coefficient, so every reader gets the same bits. int4 codes are
stored two to a byte, the whole table in one run (:func:`pack_nibbles`).

:class:`FakeQuantized` trains a table against its coded form (quantisation-aware training).
"""

from __future__ import annotations

import math

import torch
from torch import nn

ALPHA_DTYPES = ("float32", "float16", "int8", "int4")
"""The dtypes an alpha table may be stored in, by name."""
CODE_LIMITS = {"int8": 127, "int4": 7}
"""Largest code magnitude of each coded dtype (the codes are symmetric)."""
CODE_LIMIT = CODE_LIMITS["int8"]
"""Largest int8 code magnitude (-128 is never written)."""
NIBBLE_OFFSET = 8
"""An int4 code is stored as the nibble ``code + 8`` (``0 .. 15`` holds codes ``-8 .. 7``)."""
TRAINED_FOR = ("int4",)
"""Coded dtypes a table is trained against (:class:`FakeQuantized`) when it will be stored so;
an int8 table is trained as float and coded after (its codes lose too little to matter)."""


def trained_for(dtype: str) -> str | None:
    """The coded dtype a table stored as ``dtype`` trains against, or None to train it as float."""
    return dtype if dtype in TRAINED_FOR else None


def quantize_alpha(alpha: torch.Tensor, dtype: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """An alpha table as integer codes and one float16 scale per row.

    Args:
        alpha: float table, rows along the last dimension (``[rows, |B|]`` or
            ``[num_layers, G, |B|]``).
        dtype: ``"int8"`` (codes ``-127 .. 127``) or ``"int4"`` (codes ``-7 .. 7``).

    Returns:
        ``codes`` (int8, ``alpha``'s shape, unpacked) and ``scale`` (float16, ``alpha``'s shape
        without the last dimension); an all-zero row gets the smallest normal float16 scale and
        zero codes.

    Example:
        >>> codes, scale = quantize_alpha(torch.tensor([[0.5, -0.25]]))
        >>> dequantize_alpha(codes, scale)
        tensor([[ 0.5000, -0.2500]])
    """
    limit = CODE_LIMITS[dtype]
    rows = alpha.detach().float()
    tiny = torch.finfo(torch.float16).tiny
    scale = (rows.abs().amax(dim=-1) / limit).clamp_min(tiny).half()
    codes = (rows / scale.float().unsqueeze(-1)).round().clamp(-limit, limit)
    return codes.to(torch.int8), scale


def dequantize_alpha(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 table integer ``codes`` and per-row ``scale`` stand for (bit-exact anywhere).

    Args:
        codes: int8, rows along the last dimension (int4 codes unpacked by
            :func:`unpack_nibbles`).
        scale: float16 or float32, ``codes``' shape without the last dimension.

    Returns:
        float32, ``codes``' shape: ``float32(code) * float32(scale[row])``.
    """
    return codes.float() * scale.float().unsqueeze(-1)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes two to a byte, as a task file stores them: the whole table in row-major order.

    Args:
        codes: int8 codes in ``-8 .. 7``, any shape (``n`` of them).

    Returns:
        uint8 ``[ceil(n / 2)]``: byte ``i`` holds code ``2i`` in its low nibble and code
        ``2i + 1`` in its high nibble, each as ``code + 8``; with ``n`` odd the last high
        nibble is 0.

    Example:
        >>> pack_nibbles(torch.tensor([[-7, 7, 1]], dtype=torch.int8))
        tensor([241,   9], dtype=torch.uint8)
    """
    nibbles = (codes.flatten().to(torch.int16) + NIBBLE_OFFSET).to(torch.uint8)
    if len(nibbles) % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The int8 codes :func:`pack_nibbles` stored, in their table's ``shape``."""
    count = math.prod(shape)
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).flatten()[:count]
    return (nibbles.to(torch.int16) - NIBBLE_OFFSET).to(torch.int8).view(*shape)


class FakeQuantized(nn.Module):
    """A parametrisation (``torch.nn.utils.parametrize``): the forward pass sees an alpha table
    as it will be stored (codes times their scales, recomputed every step) while the gradient
    passes straight through to the float table.

    Args:
        dtype: ``"int8"`` or ``"int4"``.

    Example:
        >>> parametrize.register_parametrization(source, "alpha", FakeQuantized("int4"))
    """

    def __init__(self, dtype: str) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        served = dequantize_alpha(*quantize_alpha(alpha.detach(), self.dtype))
        return alpha + (served - alpha).detach()


def encode_alpha(alpha: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An alpha table in the form a task file stores it.

    Args:
        alpha: float table, rows along the last dimension.
        dtype: one of :data:`ALPHA_DTYPES`.

    Returns:
        ``(alpha, scale)``: a float32 or float16 table and None; int8 codes and their float16
        scales; or int4 codes packed two to a byte (uint8) and their float16 scales.
    """
    if dtype not in ALPHA_DTYPES:
        raise ValueError(f"unknown alpha dtype {dtype!r}: {ALPHA_DTYPES}")
    if dtype not in CODE_LIMITS:
        return alpha.detach().float().to(getattr(torch, dtype)), None
    codes, scale = quantize_alpha(alpha, dtype)
    return (pack_nibbles(codes) if dtype == "int4" else codes), scale


def served_alpha(alpha: torch.Tensor, dtype: str) -> torch.Tensor:
    """The float32 table a task stored as ``dtype`` serves (what :func:`encode_alpha` keeps)."""
    if dtype in CODE_LIMITS:
        return dequantize_alpha(*quantize_alpha(alpha, dtype))
    return alpha.detach().float().to(getattr(torch, dtype)).float()


def alpha_dtype_name(alpha: torch.Tensor) -> str:
    """A stored alpha table's dtype as :data:`ALPHA_DTYPES` names it (uint8 holds int4 codes)."""
    return "int4" if alpha.dtype == torch.uint8 else str(alpha.dtype).removeprefix("torch.")
