"""Mask encodings: exact round trips, and malformed input is always the package's own error."""

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supsup_deploy.errors import ConfigError, FormatError
from supsup_deploy.mask_compression import ENCODINGS, decode_mask, encode_mask


@settings(max_examples=150, deadline=None)
@given(
    numel=st.integers(1, 5000),
    density=st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.3, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 2**31 - 1),
    encoding=st.sampled_from(ENCODINGS),
)
def test_round_trip(numel, density, seed, encoding):
    mask = np.random.default_rng(seed).random(numel) < density
    packed = np.packbits(mask, bitorder="little")
    assert np.array_equal(
        decode_mask(encode_mask(packed, numel, encoding), numel, encoding), packed
    )


def test_rice_is_near_entropy_for_sparse_masks():
    numel, density = 200_000, 0.02
    mask = np.random.default_rng(0).random(numel) < density
    encoded = encode_mask(np.packbits(mask, bitorder="little"), numel, "rice")
    entropy = -(density * np.log2(density) + (1 - density) * np.log2(1 - density))
    assert len(encoded) * 8 / numel < 1.05 * entropy


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), numel=st.integers(1, 300), encoding=st.sampled_from(ENCODINGS))
def test_malformed_bytes_raise_format_error(data, numel, encoding):
    try:
        packed = decode_mask(data, numel, encoding)
    except FormatError:
        return
    assert packed.size == (numel + 7) // 8


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), position=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_bit_flipped_rice_stream_decodes_or_raises(seed, position, bit):
    numel = 700
    mask = np.random.default_rng(seed).random(numel) < 0.05
    encoded = bytearray(encode_mask(np.packbits(mask, bitorder="little"), numel, "rice"))
    encoded[position % len(encoded)] ^= 1 << bit
    with contextlib.suppress(FormatError):
        assert decode_mask(bytes(encoded), numel, "rice").size == (numel + 7) // 8


def test_unknown_encoding():
    with pytest.raises(ConfigError, match="encoding"):
        encode_mask(np.zeros(1, np.uint8), 8, "zip")
