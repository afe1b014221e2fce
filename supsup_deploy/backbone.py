"""The fixed random backbone, regenerated from (seed, layer index) and never stored.

Every masked layer's backbone weight is a *signed constant*:
``W[e] = s[e] * sqrt(2) / sqrt(fan_in)`` with ``s[e] in {-1, +1}`` and ``fan_in = c_in * kh * kw``
(the constant is computed in float64 and rounded to the nearest float32).

The sign of element ``e`` (flat row-major index into the weight's PyTorch shape,
``[c_out, c_in, kh, kw]`` or ``[c_out, c_in]``) comes from a counter-based 32-bit integer hash,
so any element is computable on its own, on any device, and independent of how many tasks or
masks exist. All arithmetic is on unsigned 32-bit values (``& 0xFFFFFFFF`` after every ``*`` and
``+``; ``>>`` is a logical shift)::

    mix32(x):  x ^= x >> 16;  x *= 0x7FEB352D;  x ^= x >> 15;  x *= 0x31848BAB;  x ^= x >> 16
    key1 = mix32(mix32(seed ^ 0x9E3779B9) ^ layer_index)
    key2 = mix32(key1 + 0x9E3779B9)
    hash(e) = mix32(mix32(e ^ key1) + key2)
    negative(e) = hash(e) >> 31          # 1: s[e] = -1, 0: s[e] = +1

Both multipliers are below 2**31, so the products of 32-bit values fit in int64 without
overflow: the torch path computes in int64, the numpy path in uint32, with identical results.
``seed``, ``layer_index`` and ``e`` are each in ``[0, 2**32)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from supsup_deploy.errors import ConfigError

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9
MIX_MULTIPLIERS = (0x7FEB352D, 0x31848BAB)
GAIN = math.sqrt(2.0)

# Elements hashed per torch call on the CPU: small enough to stay in cache.
_CPU_CHUNK = 1 << 18


def mix32(value: int) -> int:
    """The hash's 32-bit mixing function on one Python integer.

    Args:
        value: an integer in ``[0, 2**32)``.

    Returns:
        The mixed 32-bit value.

    Example:
        >>> mix32(1) != mix32(2)
        True
    """
    first, second = MIX_MULTIPLIERS
    value &= MASK32
    value ^= value >> 16
    value = (value * first) & MASK32
    value ^= value >> 15
    value = (value * second) & MASK32
    value ^= value >> 16
    return value


def layer_keys(seed: int, layer_index: int) -> tuple[int, int]:
    """The two 32-bit keys of one layer's sign hash.

    Args:
        seed: the backbone seed, in ``[0, 2**32)``.
        layer_index: the masked layer's position in the model, from 0.

    Returns:
        ``(key1, key2)`` as defined in the module docstring.
    """
    _check_uint32("seed", seed)
    _check_uint32("layer_index", layer_index)
    key1 = mix32(mix32(seed ^ GOLDEN32) ^ layer_index)
    key2 = mix32((key1 + GOLDEN32) & MASK32)
    return key1, key2


def _mix32_int64_(values: torch.Tensor) -> torch.Tensor:
    # torch.bitwise_right_shift: the ``>>`` operator with a Python int takes a far slower path.
    first, second = MIX_MULTIPLIERS
    values ^= torch.bitwise_right_shift(values, 16)
    values.mul_(first).bitwise_and_(MASK32)
    values ^= torch.bitwise_right_shift(values, 15)
    values.mul_(second).bitwise_and_(MASK32)
    values ^= torch.bitwise_right_shift(values, 16)
    return values


def sign_bits(
    seed: int, layer_index: int, numel: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Which of a layer's backbone weights are negative.

    Args:
        seed: the backbone seed.
        layer_index: the masked layer's position in the model.
        numel: number of weights in the layer.
        device: where to compute and return the bits (CPU by default).

    Returns:
        A flat ``torch.bool`` tensor of length ``numel``; True where the weight is negative.

    Example:
        >>> sign_bits(0, 3, 5).shape
        torch.Size([5])
    """
    _check_uint32("numel", numel)
    key1, key2 = layer_keys(seed, layer_index)
    device = torch.device(device or "cpu")
    out = torch.empty(numel, dtype=torch.bool, device=device)
    chunk = _CPU_CHUNK if device.type == "cpu" else max(numel, 1)
    for start in range(0, numel, chunk):
        stop = min(numel, start + chunk)
        values = torch.arange(start, stop, dtype=torch.int64, device=device)
        values ^= key1
        _mix32_int64_(values)
        values.add_(key2).bitwise_and_(MASK32)
        _mix32_int64_(values)
        out[start:stop] = torch.bitwise_right_shift(values, 31).bool()
    return out


def weight_constant(fan_in: int) -> float:
    """The magnitude ``sqrt(2) / sqrt(fan_in)`` of every weight in a layer, rounded to float32.

    Args:
        fan_in: ``c_in * kh * kw`` of the layer.

    Returns:
        The float32 value as a Python float.
    """
    if fan_in <= 0:
        raise ConfigError(f"fan_in must be positive, got {fan_in}")
    return float(np.float32(GAIN / math.sqrt(fan_in)))


def fan_in(shape: Sequence[int]) -> int:
    """``c_in * kh * kw`` of a weight of PyTorch shape ``[c_out, c_in, *kernel]``."""
    return math.prod(shape[1:])


def signed_constant_weight(
    seed: int,
    layer_index: int,
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Regenerate one layer's backbone weight bit-exactly.

    Args:
        seed: the backbone seed.
        layer_index: the masked layer's position in the model.
        shape: the weight's PyTorch shape, ``[c_out, c_in, kh, kw]`` or ``[c_out, c_in]``.
        device: where to build it.
        dtype: floating dtype of the result.

    Returns:
        The weight tensor: ``+c`` or ``-c`` everywhere, ``c = weight_constant(fan_in)``.

    Example:
        >>> signed_constant_weight(0, 0, (20, 3, 3, 3)).unique().numel()
        2
    """
    constant = weight_constant(fan_in(shape))
    negative = sign_bits(seed, layer_index, math.prod(shape), device=device)
    positive = torch.tensor(constant, dtype=dtype, device=negative.device)
    return torch.where(negative, -positive, positive).view(*shape)


def _check_uint32(name: str, value: int) -> None:
    if not 0 <= int(value) <= MASK32:
        raise ConfigError(f"{name} must be in [0, 2**32), got {value}")
