"""An independent numpy reading of docs/FORMAT.md: the sign hash and effective weights.

Imports nothing from supsup_deploy, so the format tests check the page, not the library.
"""

import hashlib
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


def content_sha256(text: str, tensors: dict[str, np.ndarray]) -> str:
    """Format 2's ``supsup_sha256``: the metadata text, length first, then every tensor."""
    data = text.encode("utf-8")
    digest = hashlib.sha256(f"{len(data)}|".encode() + data)
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|torch.{array.dtype}|{list(array.shape)}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def alpha_table(tensors: dict[str, np.ndarray], num_basis: int) -> np.ndarray:
    """A task's float32 alpha table as ``[L, G, |B|]``: a float table converted, or int8 codes
    (format 3) or int4 codes two to a byte (format 4: the ``[L, G, |B|]`` codes in row-major
    order, ``code = nibble - 8``, low nibble first, ``G`` from the scales' shape) times their
    row's scale, each a float32 multiplication; a ``[L, |B|]`` table has ``G = 1``."""
    alpha = tensors["alpha"]
    if alpha.dtype == np.uint8:
        shape = (*tensors["alpha.scale"].shape, num_basis)
        nibbles = np.stack([alpha & 15, alpha >> 4], axis=-1).reshape(-1)[: math.prod(shape)]
        alpha = (nibbles.astype(np.int8) - np.int8(8)).reshape(shape)
    if alpha.dtype == np.int8:
        scale = tensors["alpha.scale"].astype(np.float32)
        alpha = (alpha.astype(np.float32) * scale[..., None]).astype(np.float32)
    alpha = alpha.astype(np.float32)
    return alpha[:, None, :] if alpha.ndim == 2 else alpha


def signature(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """A task's float32 signature ``[2, 64]``: F16 values converted, or (format 4) U8 codes times
    their row's step plus its minimum (``signature.scale[r] = (step, minimum)``), in float32."""
    values = tensors["signature"].astype(np.float32)
    if "signature.scale" in tensors:
        scale = tensors["signature.scale"].astype(np.float32)
        return values * scale[:, :1] + scale[:, 1:]
    return values


def weight_constant(shape) -> np.float32:
    return np.float32(math.sqrt(2.0) / math.sqrt(math.prod(shape[1:])))


def effective_weight(seed, layer, shape, packed_rows: np.ndarray, alpha_rows) -> np.ndarray:
    """Layer ``layer``'s float32 effective weight from its packed basis rows and its ``[G, |B|]``
    alpha rows: output channel ``o`` uses row ``floor(o * G / c_out)``."""
    numel = math.prod(shape)
    masks = np.unpackbits(packed_rows, axis=1, bitorder="little")[:, :numel].astype(bool)
    alpha_rows = np.asarray(alpha_rows, dtype=np.float32)
    outputs = shape[0]
    row_of_weight = np.repeat(np.arange(outputs) * len(alpha_rows) // outputs, numel // outputs)
    coefficients = alpha_rows[row_of_weight]  # [numel, |B|]
    total = np.zeros(numel, dtype=np.float32)
    for t in range(masks.shape[0]):
        total = np.where(masks[t], total + coefficients[:, t], total).astype(np.float32)
    magnitude = weight_constant(shape) * total
    signs = np.where(negative(seed, layer, numel), np.float32(-1), np.float32(1))
    return (signs * magnitude).astype(np.float32).reshape(shape)


def rice_decode(data: bytes, numel: int) -> np.ndarray:
    """A ``"rice"`` encoded mask back to its packed bytes, as the page describes it."""
    ones = int.from_bytes(data[0:8], "little")
    k = data[8]
    unary_bytes = int.from_bytes(data[9:17], "little")
    unary = np.unpackbits(np.frombuffer(data[17 : 17 + unary_bytes], np.uint8), bitorder="little")
    remainders = np.unpackbits(
        np.frombuffer(data[17 + unary_bytes :], np.uint8), bitorder="little"
    )[: ones * k].reshape(ones, k)
    mask = np.zeros(numel, dtype=np.uint8)
    previous = -1
    terminators = np.flatnonzero(unary)
    assert terminators.size == ones
    start = 0
    for code in range(ones):
        quotient = int(terminators[code]) - start
        start = int(terminators[code]) + 1
        remainder = sum(int(bit) << shift for shift, bit in enumerate(remainders[code]))
        previous = previous + (quotient << k) + remainder + 1
        mask[previous] = 1
    return np.packbits(mask, bitorder="little")


def basis_rows(basis: dict, metadata: dict, layer: int) -> np.ndarray:
    """Layer ``layer``'s packed basis rows ``[B, ceil(numel / 8)]`` whatever the encoding."""
    name = f"mask.{layer:03d}"
    if metadata.get("mask_encoding", "packed") == "packed":
        return basis[name]
    numel = math.prod(metadata["layers"][layer]["shape"])
    blob = basis[name].tobytes()
    rows, start = [], 0
    for size in basis[f"mask_sizes.{layer:03d}"].tolist():
        chunk = blob[start : start + size]
        start += size
        if metadata["mask_encoding"] == "rice":
            rows.append(rice_decode(chunk, numel))
        else:
            rows.append(sparse_decode(chunk, numel))
    return np.stack(rows)


def sparse_decode(data: bytes, numel: int) -> np.ndarray:
    """A ``"sparse"`` encoded mask back to its packed bytes, as the page describes it.

    Raises ValueError where the page says a reader must refuse the stream.
    """
    size = math.ceil(numel / 8)
    head = data[0]
    length_bytes = head & 0x0F
    if head & 0xF0 or length_bytes > 8:
        raise ValueError("bad stream header")
    if int.from_bytes(data[1 : 1 + length_bytes], "little") != numel:
        raise ValueError("stream length is not the layer's")
    out = np.zeros(size, dtype=np.uint8)
    position, offset = 1 + length_bytes, 0
    while True:
        if position >= len(data):
            raise ValueError("no stop byte")
        head = data[position]
        position += 1
        if head == 0:
            break
        if head <= 0x9F:
            count = head if head < 32 else 32 * (head - 31)
            if offset + count > size or position + count > len(data):
                raise ValueError("raw block runs past the end")
            out[offset : offset + count] = np.frombuffer(data, np.uint8, count, position)
            position += count
            offset += count
            continue
        if 0xA0 <= head <= 0xBF:
            width, count = 1, head - 0xA0
        elif head in (0xC2, 0xC3, 0xC4):
            if position >= len(data):
                raise ValueError("no count byte")
            width, count = head - 0xC0, data[position]
            position += 1
        else:
            raise ValueError(f"unknown block head {head:#x}")
        if position + width * count > len(data):
            raise ValueError("index block runs past the end")
        for number in range(count):
            start = position + width * number
            bit = 8 * offset + int.from_bytes(data[start : start + width], "little")
            if bit >= numel:
                raise ValueError("an index lies outside the mask")
            out[bit // 8] |= 1 << (bit % 8)
        position += width * count
        offset += (1 << (8 * width)) // 8
    if numel % 8:
        out[-1] &= (1 << (numel % 8)) - 1
    return out
