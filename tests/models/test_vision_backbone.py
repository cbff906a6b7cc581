"""vision_backbone: every mixer builds and runs forward/backward; stage shapes; custom builders;
the built-in mixers are the registered vision layers of the same name."""

from __future__ import annotations

import pytest
import torch

from headwise.layers import list_layers
from headwise.layers.registry import layer_spec
from headwise.layers.vision import ChannelAttention, MultiAxisAttention, WindowAttention
from headwise.models import available_mixers, register_mixer, vision_backbone


@pytest.mark.parametrize("mixer", available_mixers())
def test_every_mixer_forward_backward(mixer):
    torch.manual_seed(0)
    model = vision_backbone(mixer, depths=(1, 2, 1, 1), dims=(16, 32, 32, 64), img_size=(36, 44))
    x = torch.randn(2, 3, 36, 44, requires_grad=True)  # BatchNorm mixers need 2 values
    features = model.forward_features(x)
    assert [tuple(f.shape) for f in features] == [
        (2, 9, 11, 16),
        (2, 4, 5, 32),
        (2, 2, 2, 32),
        (2, 1, 1, 64),
    ]
    y = model(x)
    assert y.shape == (2, 64)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_builtin_mixers_are_the_registered_vision_layers():
    # "dual" alternates two registered layers; names starting "test_" are registered by tests
    builtin = {m for m in available_mixers() if m != "dual" and not m.startswith("test_")}
    vision = set(list_layers("vision"))
    assert builtin <= vision
    assert vision - builtin == {"conv_glu", "neighborhood_3d"}  # a channel mixer; video maps
    for mixer in sorted(builtin):
        model = vision_backbone(mixer, depths=(1,), dims=(32,), img_size=16)
        assert type(model.stages[0][0].mixer) is layer_spec(mixer).cls


def test_alternating_mixers_and_classifier():
    model = vision_backbone("multi_axis", depths=(2,), dims=(32,), img_size=16, num_classes=7)
    first, second = (block.mixer for block in model.stages[0])
    assert isinstance(first, MultiAxisAttention) and first.partition == "block"
    assert isinstance(second, MultiAxisAttention) and second.partition == "grid"
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    dual = vision_backbone("dual", depths=(2,), dims=(32,), img_size=16)
    assert isinstance(dual.stages[0][0].mixer, WindowAttention)
    assert isinstance(dual.stages[0][1].mixer, ChannelAttention)


def test_custom_builder_and_registration():
    def builder(dim, stage, block, resolution, **kwargs):
        return ChannelAttention(dim, 2, **kwargs)

    model = vision_backbone(builder, depths=(1, 1), dims=(8, 16), img_size=16,
                            mixer_kwargs={"qkv_bias": False})  # fmt: skip
    assert model.stages[0][0].mixer.qkv.bias is None
    register_mixer("test_channel_pair", builder)
    assert "test_channel_pair" in available_mixers()
    assert vision_backbone("test_channel_pair", depths=(1,), dims=(8,), img_size=8)


def test_errors():
    with pytest.raises(ValueError, match="mixer must be one of"):
        vision_backbone("nope")
    with pytest.raises(ValueError, match="depths and dims"):
        vision_backbone("hilo", depths=(1, 1), dims=(8,))
    with pytest.raises(ValueError, match="img_size"):
        vision_backbone("hilo", depths=(1, 1, 1), dims=(8, 8, 8), img_size=8)
    with pytest.raises(ValueError, match="images"):
        vision_backbone("hilo", depths=(1,), dims=(32,), img_size=8)(torch.randn(1, 8, 8, 3))
