"""Alpha tables stored as int8 codes with one scale per row (format 3).

A row's scale is its largest magnitude over 127, rounded to float16; its codes are the row over
that scale, rounded and clipped to ``-127 .. 127``. Reading gives back ``float32(code) *
float32(scale)``, one float32 multiplication per coefficient, so every reader gets the same bits.
"""

from __future__ import annotations

import torch

ALPHA_DTYPES = ("float32", "float16", "int8")
"""The dtypes an alpha table may be stored in, by name."""
CODE_LIMIT = 127
"""Largest code magnitude (the codes are symmetric: -128 is never written)."""


def quantize_alpha(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An alpha table as int8 codes and one float16 scale per row.

    Args:
        alpha: ``[rows, |B|]`` float table.

    Returns:
        ``codes`` (int8, ``alpha``'s shape) and ``scale`` (float16 ``[rows]``); an all-zero row
        gets the smallest normal float16 scale and zero codes.

    Example:
        >>> codes, scale = quantize_alpha(torch.tensor([[0.5, -0.25]]))
        >>> dequantize_alpha(codes, scale)
        tensor([[ 0.5000, -0.2500]])
    """
    rows = alpha.detach().float()
    tiny = torch.finfo(torch.float16).tiny
    scale = (rows.abs().amax(dim=1) / CODE_LIMIT).clamp_min(tiny).half()
    codes = (rows / scale.float().unsqueeze(1)).round().clamp(-CODE_LIMIT, CODE_LIMIT)
    return codes.to(torch.int8), scale


def dequantize_alpha(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 table int8 ``codes`` and per-row ``scale`` stand for (bit-exact anywhere).

    Args:
        codes: int8 ``[rows, |B|]``.
        scale: float16 or float32 ``[rows]``.

    Returns:
        float32 ``[rows, |B|]``: ``float32(code) * float32(scale[row])``.
    """
    return codes.float() * scale.float().unsqueeze(1)
