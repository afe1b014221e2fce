"""Encodings of bit-packed basis masks for shipping; decoded once when a bundle is loaded.

- ``"packed"``: the packed bytes as they are (1 bit per weight).
- ``"rice"``: Golomb-Rice codes of the gaps between kept weights, with the unary quotients and
  the ``k``-bit remainders in two separate bit streams so that both directions are vectorised
  numpy. Close to the entropy of a sparse mask with scattered ones (SupSup's 0.3-7.5% densities).
- ``"sparse"``: bitarray's ``sc_encode`` (needs the ``bitarray`` package).

An encoded mask is a self-describing byte string; see ``docs/FORMAT.md``.
"""

from __future__ import annotations

import math

import numpy as np

from supsup_deploy.errors import ConfigError, FormatError

ENCODINGS = ("packed", "rice", "sparse")
_RICE_HEADER = np.dtype([("ones", "<u8"), ("k", "u1"), ("quotient_bytes", "<u8")])


def encode_mask(packed: np.ndarray, numel: int, encoding: str) -> bytes:
    """Encode one packed mask (``ceil(numel / 8)`` uint8, little bit order).

    Args:
        packed: the mask's packed bytes.
        numel: number of mask elements.
        encoding: one of ``ENCODINGS``.

    Returns:
        The encoded bytes.

    Example:
        >>> packed = np.packbits([1, 0, 1], bitorder="little")
        >>> decode_mask(encode_mask(packed, 3, "rice"), 3, "rice")
        array([5], dtype=uint8)
    """
    if encoding == "packed":
        return packed.tobytes()
    if encoding == "rice":
        return _rice_encode(packed, numel)
    if encoding == "sparse":
        from bitarray import bitarray
        from bitarray.util import sc_encode

        bits = bitarray(endian="little")
        bits.frombytes(packed.tobytes())
        del bits[numel:]
        return sc_encode(bits)
    raise ConfigError(f"unknown mask encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")


def decode_mask(data: bytes, numel: int, encoding: str) -> np.ndarray:
    """Inverse of :func:`encode_mask`; raises FormatError on malformed input.

    Returns:
        ``ceil(numel / 8)`` packed uint8 bytes.
    """
    size = math.ceil(numel / 8)
    try:
        if encoding == "packed":
            packed = np.frombuffer(data, dtype=np.uint8)
        elif encoding == "rice":
            packed = _rice_decode(data, numel)
        elif encoding == "sparse":
            from bitarray.util import sc_decode

            _check_sparse_header(data, numel)
            bits = sc_decode(data)
            if len(bits) != numel or bits.endian != "little":
                raise ValueError(f"decodes to {len(bits)} {bits.endian}-endian bits")
            packed = np.frombuffer(bits.tobytes(), dtype=np.uint8)
        else:
            raise FormatError(f"unknown mask encoding {encoding!r}")
    except (ValueError, TypeError, IndexError, OverflowError, StopIteration) as error:
        raise FormatError(f"malformed {encoding} mask ({error})") from None
    if packed.size != size:
        raise FormatError(f"{encoding} mask decodes to {packed.size} bytes, expected {size}")
    if numel % 8 and packed[-1] >> (numel % 8):
        raise FormatError(f"{encoding} mask has bits set past its {numel} elements")
    return packed


def _check_sparse_header(data: bytes, numel: int) -> None:
    # sc_encode's header: the low nibble of byte 0 counts the little-endian length bytes after it.
    if not data:
        raise ValueError("empty stream")
    length_bytes = data[0] & 0x0F
    length = int.from_bytes(data[1 : 1 + length_bytes], "little")
    if length_bytes > 8 or len(data) < 1 + length_bytes or length != numel:
        raise ValueError(f"header declares {length} bits, the layer has {numel}")


def _rice_parameter(numel: int, ones: int) -> int:
    if ones == 0:
        return 0
    mean_gap = numel / ones
    return max(0, math.floor(math.log2(max(mean_gap * math.log(2), 1.0))))


def _rice_encode(packed: np.ndarray, numel: int) -> bytes:
    positions = np.flatnonzero(np.unpackbits(packed, bitorder="little", count=numel))
    gaps = np.diff(positions, prepend=-1) - 1
    k = _rice_parameter(numel, positions.size)
    quotients = gaps >> k
    # Unary stream: each quotient q is q zeros then a one.
    terminators = np.cumsum(quotients + 1) - 1
    unary = np.zeros(int(terminators[-1]) + 1 if positions.size else 0, dtype=np.uint8)
    unary[terminators] = 1
    unary_bytes = np.packbits(unary, bitorder="little")
    remainders = gaps & ((1 << k) - 1)
    remainder_bits = ((remainders[:, None] >> np.arange(k)) & 1).astype(np.uint8).ravel()
    header = np.array([(positions.size, k, unary_bytes.size)], dtype=_RICE_HEADER)
    return (
        header.tobytes()
        + unary_bytes.tobytes()
        + np.packbits(remainder_bits, bitorder="little").tobytes()
    )


def _rice_decode(data: bytes, numel: int) -> np.ndarray:
    if len(data) < _RICE_HEADER.itemsize:
        raise ValueError("shorter than its header")
    header = np.frombuffer(data[: _RICE_HEADER.itemsize], dtype=_RICE_HEADER)[0]
    ones, k, unary_size = int(header["ones"]), int(header["k"]), int(header["quotient_bytes"])
    remainder_size = math.ceil(ones * k / 8)
    if ones > numel or k > 40 or _RICE_HEADER.itemsize + unary_size + remainder_size != len(data):
        raise ValueError("header does not match the data")
    body = np.frombuffer(data, dtype=np.uint8, offset=_RICE_HEADER.itemsize)
    unary = np.unpackbits(body[:unary_size], bitorder="little")
    terminators = np.flatnonzero(unary)
    if terminators.size != ones:
        raise ValueError(f"holds {terminators.size} codes, header says {ones}")
    quotients = np.diff(terminators, prepend=-1) - 1
    # Checking every gap before summing keeps the int64 arithmetic exact (numel < 2**31).
    if ones and int(quotients.max()) > numel >> k:
        raise ValueError("a gap runs past the end of the mask")
    bits = np.unpackbits(body[unary_size:], bitorder="little", count=ones * k).reshape(ones, k)
    gaps = (quotients << k) + (bits.astype(np.int64) << np.arange(k)).sum(axis=1)
    if ones and int(gaps.max()) >= numel:
        raise ValueError("a gap runs past the end of the mask")
    positions = np.cumsum(gaps + 1) - 1
    if ones and positions[-1] >= numel:
        raise ValueError("a kept position lies outside the mask")
    mask = np.zeros(numel, dtype=np.uint8)
    mask[positions] = 1
    return np.packbits(mask, bitorder="little")
