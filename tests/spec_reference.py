"""An independent numpy reading of docs/FORMAT.md: the sign hash and effective weights.

Imports nothing from supsup_deploy, so the format tests check the page, not the library.
"""

import math

import numpy as np


def mix32(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.uint32).copy()
    with np.errstate(over="ignore"):
        values ^= values >> np.uint32(16)
        values *= np.uint32(0x7FEB352D)
        values ^= values >> np.uint32(15)
        values *= np.uint32(0x31848BAB)
        values ^= values >> np.uint32(16)
    return values


def _scalar_mix32(value: int) -> int:
    return int(mix32(np.array([value & 0xFFFFFFFF], dtype=np.uint32))[0])


def negative(seed: int, layer: int, numel: int) -> np.ndarray:
    key1 = _scalar_mix32(_scalar_mix32(seed ^ 0x9E3779B9) ^ layer)
    key2 = _scalar_mix32(key1 + 0x9E3779B9)
    hashes = mix32(np.arange(numel, dtype=np.uint32) ^ np.uint32(key1))
    with np.errstate(over="ignore"):
        hashes = mix32(hashes + np.uint32(key2))
    return (hashes >> np.uint32(31)).astype(bool)


def weight_constant(shape) -> np.float32:
    return np.float32(math.sqrt(2.0) / math.sqrt(math.prod(shape[1:])))


def effective_weight(seed, layer, shape, packed_rows: np.ndarray, alpha_row) -> np.ndarray:
    """Layer ``layer``'s float32 effective weight from its packed basis rows and alpha row."""
    numel = math.prod(shape)
    masks = np.unpackbits(packed_rows, axis=1, bitorder="little")[:, :numel].astype(bool)
    alpha_row = np.asarray(alpha_row, dtype=np.float32)
    total = np.zeros(numel, dtype=np.float32)
    for t in range(masks.shape[0]):
        total = np.where(masks[t], total + alpha_row[t], total).astype(np.float32)
    magnitude = weight_constant(shape) * total
    signs = np.where(negative(seed, layer, numel), np.float32(-1), np.float32(1))
    return (signs * magnitude).astype(np.float32).reshape(shape)
