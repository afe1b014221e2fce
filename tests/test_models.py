"""The registry: shapes against torchvision, counts without allocation, forward everywhere."""

import math

import pytest
import torch
import torchvision

from supsup_deploy import ModelConfig, get_model, list_models, summarize_model
from supsup_deploy.errors import ConfigError
from supsup_deploy.masked_layers import MaskedConv2d, MaskedLayer
from supsup_deploy.models import (
    MaskedModel,
    build_model,
    get_model_entry,
    masked_layers,
    task_norms,
)
from supsup_deploy.normalization import GroupNorm2d, TaskBatchNorm2d
from supsup_deploy.weight_sources import effective_weights, use_scores

ALL_MODELS = list_models()
TORCHVISION_MODELS = [name for name in ALL_MODELS if get_model_entry(name).torchvision_name]
SMALL_MODELS = ["gem_resnet18", "resnet18", "resnet34"]
LARGE_WEIGHTS = 50_000_000
"""Architectures with more masked weights than this run full-width forwards in the slow suite."""


def test_registry_holds_the_family():
    expected = {
        "gem_resnet18",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "wide_resnet50_2",
        "wide_resnet101_2",
        "preact_resnet200",
    }
    assert expected <= set(ALL_MODELS)


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_masked_shapes_equal_torchvision(name):
    reference = getattr(torchvision.models, get_model_entry(name).torchvision_name)(weights=None)
    expected = [
        tuple(module.weight.shape)
        for module in reference.modules()
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    assert list(summarize_model(name).weight_shapes) == expected


def test_gem_resnet18_is_supsups_network():
    summary = summarize_model("gem_resnet18", num_classes=5)
    assert summary.config.stem == "cifar"
    assert summary.masked_layers == 21
    assert summary.masked_weights == 1_090_940
    assert summary.norm_layers == 20
    assert summary.norm_channels == 1_500
    assert summary.weight_shapes[0] == (20, 3, 3, 3)
    assert summary.weight_shapes[-1] == (5, 160, 1, 1)


def test_preact_resnet200_size():
    summary = summarize_model("preact_resnet200")
    assert summary.masked_layers == 204
    assert 64.4e6 < summary.masked_weights < 64.7e6
    resnet18 = summarize_model("resnet18")
    assert (resnet18.masked_layers, resnet18.masked_weights) == (21, 11_678_912)


def test_summary_allocates_nothing():
    summary = summarize_model("wide_resnet101_2", num_classes=7)
    assert summary.weight_shapes[-1] == (7, 2048)
    assert summary.masked_weights == sum(math.prod(shape) for shape in summary.weight_shapes)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=pytest.mark.slow)
        if summarize_model(name).masked_weights > LARGE_WEIGHTS
        else name
        for name in ALL_MODELS
    ],
)
def test_forward_at_small_input(name):
    model = get_model(name, num_classes=3, in_channels=1, stem="cifar", seed=2).eval()
    if name in SMALL_MODELS:
        use_scores(model, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 16, 16))
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_architecture_implements_the_interface(name):
    """timm style: each registered builder returns a MaskedModel whose methods describe it."""
    model = get_model(name, num_classes=3, stem="cifar", width=1 / 16, seed=1).eval()
    assert isinstance(model, MaskedModel)
    assert model.config == get_model_entry(name).config(
        num_classes=3, stem="cifar", width=1 / 16, seed=1
    )
    summary = summarize_model(name, num_classes=3, stem="cifar", width=1 / 16, seed=1)
    layers = model.masked_layers()
    assert [layer.layer_index for layer in layers] == list(range(summary.masked_layers))
    assert [layer.weight_shape for layer in layers] == list(summary.weight_shapes)
    assert model.norm_layers() == model.task_norms() == task_norms(model)
    assert len(model.task_norms()) == summary.norm_layers
    group = get_model(name, weights=None, width=1 / 16, norm="group")
    assert group.task_norms() == [] and len(group.norm_layers()) == summary.norm_layers
    assert all(isinstance(norm, GroupNorm2d) for norm in group.norm_layers())

    inputs_of, outputs_of = {}, {}

    def record(module, inputs, output):
        inputs_of[module], outputs_of[module] = inputs[0], output

    for module in [*layers, *model.task_norms()]:
        module.register_forward_hook(record)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    pairs = model.conv_norm_pairs()
    for conv_path, norm_path in pairs:
        conv, norm = model.get_submodule(conv_path), model.get_submodule(norm_path)
        assert isinstance(conv, MaskedConv2d) and isinstance(norm, TaskBatchNorm2d)
        assert inputs_of[norm] is outputs_of[conv], f"{norm_path} does not normalise {conv_path}"
    ends = model.residual_branch_ends()
    assert ends and all(isinstance(end, MaskedLayer | TaskBatchNorm2d) for end in ends)
    assert set(ends) <= set(model.modules())


def test_imagenet_stem_forward():
    model = get_model("resnet18", num_classes=4).eval()
    use_scores(model, "er:2", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_same_seed_same_model():
    def build():
        model = get_model("gem_resnet18", seed=3)
        use_scores(model, 0.5, generator=torch.Generator().manual_seed(1))
        return effective_weights(model)

    for first, second in zip(build(), build(), strict=True):
        assert torch.equal(first, second)


def test_config_round_trip_and_validation():
    model = get_model("resnet50", num_classes=10, width=0.5, seed=4, norm="group")
    config = model.config
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.arch == "resnet50" and config.width == 0.5
    with pytest.raises(ConfigError, match="did you mean"):
        get_model("resnet-18")
    with pytest.raises(ConfigError, match="unknown stem 'tiny' for resnet18"):
        get_model("resnet18", stem="tiny")
    with pytest.raises(ConfigError, match="unknown stem 'tiny' for resnet18"):
        build_model(ModelConfig.from_dict({**config.to_dict(), "arch": "resnet18", "stem": "tiny"}))
    with pytest.raises(ConfigError, match="seed"):
        get_model("resnet18", seed=-1)
    with pytest.raises(ConfigError, match="bad option"):
        get_model("resnet18", colour="red")
    with pytest.raises(ConfigError, match="unknown model config"):
        ModelConfig.from_dict({"arch": "resnet18", "depth": 3})


def test_get_model_runs_as_built():
    """Like torchvision's and timm's, the model runs at once: the dense signed backbone."""
    model = get_model("gem_resnet18", num_classes=3, in_channels=1, seed=5).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 1, 16, 16))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    for layer, weight in zip(masked_layers(model), effective_weights(model), strict=True):
        assert torch.equal(weight, layer.backbone_weight())
    use_scores(model, 0.5, generator=torch.Generator().manual_seed(0))
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)

    bare = get_model("gem_resnet18", weights=None, num_classes=3, in_channels=1).eval()
    with pytest.raises(ConfigError, match="no weight source"):
        bare(torch.randn(2, 1, 16, 16))
    with pytest.raises(ConfigError, match="unknown weights"):
        get_model("gem_resnet18", weights="imagenet")


def test_the_interface_is_enforced(monkeypatch):
    from supsup_deploy.models import _api, resnet

    class NoPairs(MaskedModel):
        def residual_branch_ends(self):
            return []

    with pytest.raises(TypeError, match="conv_norm_pairs"):
        NoPairs(get_model_entry("resnet18").config())
    plain = _api.ModelEntry("plain_net", lambda config: torch.nn.Linear(1, 1), resnet.RESNET)
    monkeypatch.setitem(_api._MODELS, "plain_net", plain)
    with pytest.raises(TypeError, match="must return a MaskedModel"):
        get_model("plain_net")


@pytest.mark.parametrize(("size", "stem"), [(28, "cifar"), (32, "cifar"), (64, "imagenet")])
def test_runs_pick_the_resnet_stem_for_their_image_size(size, stem):
    from supsup_deploy.models import resnet

    entry = get_model_entry("gem_resnet18")
    assert entry.family is resnet.RESNET and entry.family.stem_for_image_size(size) == stem
