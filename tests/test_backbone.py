"""Backbone regeneration: an independent numpy reference of the documented hash, bit for bit."""

import numpy as np
import pytest
import spec_reference
import torch

from supsup_deploy import backbone, get_model
from supsup_deploy.models import masked_layers
from supsup_deploy.weight_sources import use_alpha, use_scores


def reference_negative(seed: int, layer_index: int, numel: int) -> np.ndarray:
    return spec_reference.negative(seed, layer_index, numel)


@pytest.mark.parametrize(
    ("seed", "layer_index", "numel"),
    [(0, 0, 1), (0, 1, 1000), (7, 3, 300_001), (2**32 - 1, 2**32 - 1, 4097), (123456789, 20, 1)],
)
def test_sign_bits_match_numpy_reference(seed, layer_index, numel):
    torch_bits = backbone.sign_bits(seed, layer_index, numel).numpy()
    np.testing.assert_array_equal(torch_bits, reference_negative(seed, layer_index, numel))


@pytest.mark.gpu
def test_sign_bits_cuda_match_cpu():
    cpu = backbone.sign_bits(5, 2, 1_000_003)
    cuda = backbone.sign_bits(5, 2, 1_000_003, device="cuda").cpu()
    assert torch.equal(cpu, cuda)


def test_any_element_is_computable_on_its_own():
    whole = reference_negative(11, 4, 300_000)
    for element in (0, 1, 2**18 - 1, 2**18, 299_999):
        alone = backbone.sign_bits(11, 4, element + 1)[element].item()
        assert alone == whole[element]


def test_signs_are_balanced_and_layers_differ():
    first = backbone.sign_bits(0, 0, 200_000).float()
    second = backbone.sign_bits(0, 1, 200_000).float()
    other_seed = backbone.sign_bits(1, 0, 200_000).float()
    assert abs(first.mean().item() - 0.5) < 0.01
    for other in (second, other_seed):
        agreement = (first == other).float().mean().item()
        assert abs(agreement - 0.5) < 0.01


def test_weight_values_are_signed_constants():
    weight = backbone.signed_constant_weight(3, 0, (20, 3, 3, 3))
    constant = np.float32(np.sqrt(2.0) / np.sqrt(27))
    assert weight.dtype == torch.float32
    assert set(weight.unique().tolist()) == {float(-constant), float(constant)}
    negative = reference_negative(3, 0, weight.numel())
    np.testing.assert_array_equal(weight.flatten().numpy() < 0, negative)


def test_out_of_range_seed_is_refused():
    from supsup_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="seed"):
        backbone.sign_bits(2**32, 0, 10)


def test_backbone_independent_of_tasks_and_masks():
    model = get_model("gem_resnet18", num_classes=5, seed=9)
    before = [layer.backbone_weight() for layer in masked_layers(model)]
    sources = [use_scores(model, 0.3, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    use_alpha(model, [[source.mask() for source in sources[0]], [s.mask() for s in sources[1]]])
    bigger = get_model("gem_resnet18", num_classes=5, seed=9, num_tasks=20)
    for layer, other, weight in zip(
        masked_layers(model), masked_layers(bigger), before, strict=True
    ):
        assert torch.equal(layer.backbone_weight(), weight)
        assert torch.equal(other.backbone_weight(), weight)


def test_seed_changes_backbone():
    first = masked_layers(get_model("gem_resnet18", seed=1))[5].backbone_weight()
    second = masked_layers(get_model("gem_resnet18", seed=2))[5].backbone_weight()
    assert not torch.equal(first, second)
