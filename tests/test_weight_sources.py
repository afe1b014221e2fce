"""Masked layers: alpha gradients against the naive formula, straight-through, norms."""

import pytest
import torch
import torch.nn.functional as F

from supsup_deploy import get_model
from supsup_deploy.errors import ConfigError
from supsup_deploy.masked_layers import MaskedConv2d
from supsup_deploy.models import assign_layer_indices, masked_layers
from supsup_deploy.normalization import GroupNorm2d, TaskBatchNorm2d, set_task
from supsup_deploy.weight_sources import (
    AlphaMask,
    alpha_table,
    current_masks,
    effective_weights,
    load_alpha_table,
    use_alpha,
    use_fixed,
    use_scores,
)


def _indexed_conv(in_channels=3, out_channels=4, kernel=3, seed=1):
    conv = MaskedConv2d(in_channels, out_channels, kernel, padding=1)
    assign_layer_indices(conv, seed)
    return conv


@pytest.mark.parametrize(("num_basis", "groups"), [(1, 1), (3, 1), (7, 1), (3, 2), (7, 4)])
def test_alpha_forward_and_gradient_match_naive_formula(num_basis, groups):
    torch.manual_seed(0)
    conv = _indexed_conv(out_channels=5)
    masks = [torch.rand(conv.weight_shape) < 0.4 for _ in range(num_basis)]
    alpha = torch.randn(groups, num_basis, dtype=torch.float64)
    source = AlphaMask.from_masks(conv, masks, alpha)
    conv.set_source(source)
    inputs = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    target = torch.randn(2, 5, 6, 6, dtype=torch.float64)

    loss = ((conv(inputs) - target) ** 2).sum()
    loss.backward()

    naive_alpha = alpha.clone().requires_grad_(True)
    backbone = conv.backbone_weight().double()
    # channel o mixes with row floor(o * groups / 5)
    rows = naive_alpha[torch.arange(5) * groups // 5].view(5, 1, 1, 1, num_basis)
    mixed = sum(rows[..., t] * masks[t].double() for t in range(num_basis))
    naive_loss = ((F.conv2d(inputs, backbone * mixed, padding=1) - target) ** 2).sum()
    naive_loss.backward()

    torch.testing.assert_close(loss, naive_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(source.alpha.grad, naive_alpha.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [1, 3])
def test_alpha_gradcheck(groups):
    conv = _indexed_conv(2, 3, 3)
    masks = [torch.rand(conv.weight_shape) < 0.5 for _ in range(3)]
    alpha = torch.randn(groups, 3, dtype=torch.float64)
    source = AlphaMask.from_masks(conv, masks, alpha)
    conv.set_source(source)
    inputs = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    torch.autograd.gradcheck(lambda alpha: F.conv2d(inputs, _weight_for(conv, alpha)), source.alpha)


def test_alpha_groups_are_refused_beyond_the_smallest_layer():
    conv = _indexed_conv(out_channels=4)
    masks = [torch.rand(conv.weight_shape) < 0.5 for _ in range(2)]
    with pytest.raises(ConfigError, match="1 to 4 groups"):
        AlphaMask.from_masks(conv, masks, torch.zeros(5, 2))
    model = get_model("gem_resnet18", num_classes=3, in_channels=1)
    with pytest.raises(ConfigError, match="from 1 to 3"):
        use_alpha(
            model,
            [[torch.ones(layer.weight_shape, dtype=torch.bool) for layer in masked_layers(model)]],
            groups=4,
        )


def _weight_for(conv, alpha):
    from supsup_deploy.weight_sources import _AlphaWeight

    indices = conv.source.indices
    return _AlphaWeight.apply(alpha, indices, conv.weight_constant).view(conv.weight_shape)


def test_scores_straight_through_gradient():
    conv = _indexed_conv()
    use_scores(conv, 0.5, generator=torch.Generator().manual_seed(0))
    source = conv.source
    inputs = torch.randn(2, 3, 5, 5)
    conv(inputs).sum().backward()
    backbone = conv.backbone_weight().requires_grad_(True)
    mask = source.mask().float().requires_grad_(True)
    F.conv2d(inputs, backbone * mask, padding=1).sum().backward()
    expected = mask.grad * torch.sign(source.scores.detach())
    torch.testing.assert_close(source.scores.grad, expected)
    assert int(source.mask().sum()) == round(0.5 * conv.numel)


def test_score_init_is_seeded():
    first = _indexed_conv()
    second = _indexed_conv()
    use_scores(first, 0.5, generator=torch.Generator().manual_seed(4))
    use_scores(second, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first.source.scores, second.source.scores)


def test_layer_without_source_names_the_problem():
    conv = _indexed_conv()
    with pytest.raises(ConfigError, match="no weight source"):
        conv(torch.randn(1, 3, 4, 4))


def test_alpha_table_switching_in_place():
    model = get_model("gem_resnet18", num_classes=3, in_channels=1)
    basis = []
    for seed in range(3):
        use_scores(model, 0.5, generator=torch.Generator().manual_seed(seed))
        basis.append(current_masks(model))
    sources = use_alpha(model, basis)
    table = torch.randn(21, 3)
    load_alpha_table(model, table)
    assert torch.equal(alpha_table(model), table.unsqueeze(1))
    layers = masked_layers(model)
    assert all(layer.source is source for layer, source in zip(layers, sources, strict=True))
    weights = effective_weights(model)
    layer = masked_layers(model)[4]
    expected = layer.backbone_weight() * sum(table[4, t] * basis[t][4].float() for t in range(3))
    torch.testing.assert_close(weights[4], expected)
    with pytest.raises(ConfigError, match="shape"):
        load_alpha_table(model, torch.zeros(21, 4))
    with pytest.raises(ConfigError, match="shape"):
        load_alpha_table(model, torch.zeros(21, 2, 3))


def test_fixed_weights_round_trip():
    model = get_model("gem_resnet18", num_classes=2, in_channels=1).eval()
    use_scores(model, 0.3, generator=torch.Generator().manual_seed(0))
    inputs = torch.randn(2, 1, 12, 12)
    expected = model(inputs)
    use_fixed(model, effective_weights(model))
    torch.testing.assert_close(model(inputs), expected)
    with pytest.raises(ConfigError, match="shape"):
        use_fixed(model, [torch.zeros(1)] * 21)


def test_per_task_batchnorm_statistics():
    norm = TaskBatchNorm2d(3, num_tasks=2)
    norm.train()
    norm.set_task(0)
    norm(torch.randn(8, 3, 4, 4) + 5)
    norm.set_task(1)
    norm(torch.randn(8, 3, 4, 4) - 5)
    assert (norm.running_mean[0] > 0.4).all() and (norm.running_mean[1] < -0.4).all()
    with pytest.raises(ConfigError, match="task slot 2 out of range: this layer has 2"):
        norm.set_task(2)


def test_set_task_selects_statistics_in_eval():
    model = get_model("gem_resnet18", num_classes=2, in_channels=1, num_tasks=2)
    use_scores(model, 0.5, generator=torch.Generator().manual_seed(0))
    model.train()
    for task, shift in ((0, 3.0), (1, -3.0)):
        set_task(model, task)
        with torch.no_grad():
            model(torch.randn(16, 1, 8, 8) + shift)
    model.eval()
    inputs = torch.randn(4, 1, 8, 8)
    set_task(model, 0)
    first = model(inputs)
    set_task(model, 1)
    assert not torch.allclose(first, model(inputs))


def test_group_norm_is_statistic_free():
    norm = GroupNorm2d(20, groups=4)
    assert norm.groups == 4 and not list(norm.buffers())
    assert GroupNorm2d(10, groups=4).groups == 2
    model = get_model("gem_resnet18", num_classes=2, in_channels=1, norm="group")
    assert not any(isinstance(module, TaskBatchNorm2d) for module in model.modules())
