import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supsup_deploy.binary_masks import (
    code_bit_matrix,
    codes_from_packed,
    er_density,
    kept_count,
    mask_codes,
    pack_bits,
    resolve_densities,
    topk_mask,
    unpack_bits,
)
from supsup_deploy.errors import ConfigError


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 5000),
    density=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_mask_has_exact_density(numel, density, seed):
    scores = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    mask = topk_mask(scores, density)
    assert mask.dtype == torch.bool
    expected = min(numel, max(1, round(density * numel)))
    assert int(mask.sum()) == kept_count(numel, density) == expected
    if not mask.all():
        assert scores.abs()[mask].min() >= scores.abs()[~mask].max()


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_impossible_density_is_refused(density):
    with pytest.raises(ConfigError, match="density"):
        topk_mask(torch.randn(10), density)


def test_er_rule():
    assert er_density((20, 3, 3, 3), 1.0) == pytest.approx(23 / 540)
    assert er_density((20, 3, 3, 3), 32.0) == 0.5
    expected = 4 * (160 + 160) / (160 * 160 * 9)
    assert er_density((160, 160, 3, 3), 4.0) == pytest.approx(expected)
    assert resolve_densities([(160, 160, 3, 3)], "er:4") == [pytest.approx(expected)]
    assert resolve_densities([(2, 2), (3, 3)], 0.25) == [0.25, 0.25]
    for bad in ("er:x", "half", "er:-1"):
        with pytest.raises(ConfigError):
            resolve_densities([(2, 2)], bad)


@settings(max_examples=80, deadline=None)
@given(bits=st.lists(st.booleans(), min_size=0, max_size=300))
def test_pack_round_trip_and_numpy_little_bit_order(bits):
    mask = torch.tensor(bits, dtype=torch.bool)
    packed = pack_bits(mask)
    assert packed.numel() == (len(bits) + 7) // 8
    expected = np.packbits(np.array(bits, dtype=bool), bitorder="little")
    np.testing.assert_array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_bits(packed, len(bits)), mask)


def test_unpack_refuses_short_input():
    with pytest.raises(ConfigError):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 9)


def test_mask_codes_layout():
    negative = torch.tensor([False, True, False, True])
    basis = [torch.tensor([True, True, False, False]), torch.tensor([False, True, True, False])]
    codes = mask_codes(negative, basis)
    assert codes.dtype == torch.int32
    assert codes.tolist() == [0b001, 0b111, 0b010, 0b100]
    matrix = code_bit_matrix(2, torch.float32, torch.device("cpu"))
    assert matrix.tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]


def test_too_many_basis_masks_refused():
    with pytest.raises(ConfigError, match="basis"):
        mask_codes(torch.zeros(3, dtype=torch.bool), [torch.zeros(3, dtype=torch.bool)] * 17)


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 3000), num_basis=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
def test_codes_from_packed_masks_equal_codes_from_masks(numel, num_basis, seed):
    generator = torch.Generator().manual_seed(seed)
    masks = [torch.rand(numel, generator=generator) < 0.5 for _ in range(num_basis)]
    negative = torch.rand(numel, generator=generator) < 0.5
    packed = torch.stack([pack_bits(mask) for mask in masks])
    assert torch.equal(codes_from_packed(packed, negative, numel), mask_codes(negative, masks))
