"""Bad arguments to the vision layers and neighborhood attention raise a TypeError/ValueError
naming the argument and what it got (issue 13 item 12): no float truncated, no bool taken for
an int or a string for a bool, no dtype mismatch failing deep inside a projection."""

from __future__ import annotations

import pytest
import torch
from vision_layer_cases import LAYERS

from headwise.layers.neighborhood import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from headwise.layers.vision import (
    AggregatedAttention,
    ChannelAttention,
    GatedPositionalSelfAttention,
    HaloAttention,
    HiLoAttention,
    MSAConv,
    MultiAxisAttention,
    ScaleAwareModulation,
    SingleHeadAttention,
    SpectralGating,
    SubspaceAttention,
    WindowAttention,
)
from headwise.models import vision_backbone
from headwise.ops.attention import neighborhood_attention

NA = (NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D)


def _backbone(**kwargs):
    return vision_backbone("hilo", **{"depths": (1,), "dims": (32,), "img_size": 8, **kwargs})


@pytest.mark.parametrize("cls", NA)
@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"kernel_size": 3.0}, "kernel_size"),
        ({"kernel_size": True}, "kernel_size"),
        ({"kernel_size": "3"}, "kernel_size"),
        ({"dilation": 1.5}, "dilation"),
        ({"stride": True}, "stride"),
        ({"causal": "no"}, "causal"),
        ({"causal": 0}, "causal"),
        ({"rel_pos_bias": 1}, "rel_pos_bias"),
        ({"qkv_bias": "yes"}, "qkv_bias"),
        ({"scale": "0.5"}, "scale"),
        ({"dim": 8.0}, "dim"),
        ({"num_heads": True}, "num_heads"),
    ],
)
def test_neighborhood_layer_argument_types(cls, kwargs, name):
    args = {"dim": 8, "num_heads": 2, "kernel_size": 3, **kwargs}
    with pytest.raises(TypeError, match=name):
        cls(**args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kernel_size": (3, 3, 3)}, "kernel_size must have 2 entries"),
        ({"causal": (True,)}, "causal must have 2 entries"),
        ({"kernel_size": 0}, "kernel_size must be an integer >= 1"),
        ({"dilation": (1, 0)}, r"dilation\[1\] must be an integer >= 1"),
    ],
)
def test_neighborhood_layer_argument_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeighborhoodAttention2D(**{"dim": 8, "num_heads": 2, "kernel_size": 3, **kwargs})


def test_neighborhood_layer_per_axis_arguments():
    m = NeighborhoodAttention2D(8, 2, [3, 5], dilation=(1, 2), causal=(True, False))
    assert (m.kernel_size, m.dilation, m.causal) == ((3, 5), (1, 2), (True, False))
    assert m(torch.randn(1, 4, 11, 8)).shape == (1, 4, 11, 8)


@pytest.mark.parametrize("rpb", [[[0.0] * 5] * 2, 0.5, torch.zeros(2, 5, dtype=torch.long)])
def test_rpb_must_be_a_float_tensor(rpb):
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(TypeError, match="rpb must be a floating-point tensor"):
        neighborhood_attention(q, q, q, 3, rpb=rpb)


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: GatedPositionalSelfAttention(8, 2, qkv_bias=1), "qkv_bias"),
        (lambda: GatedPositionalSelfAttention(8, 2, locality_strength="1"), "locality_strength"),
        (lambda: GatedPositionalSelfAttention(8, 2.0), "num_heads"),
        (lambda: ChannelAttention(8, 2, qkv_bias=None), "qkv_bias"),
        (lambda: WindowAttention(8, 2, window_size=2.0), "window_size"),
        (lambda: HaloAttention(8, 2, halo_size=True), "halo_size"),
        (lambda: HaloAttention(8, 2, dim_head=4.0), "dim_head"),
        (lambda: HiLoAttention(8, 2, alpha="0.5"), "alpha"),
        (lambda: HiLoAttention(8, 2, qkv_bias=0), "qkv_bias"),
        (lambda: MultiAxisAttention(8, dim_head=4, partition_size=True), "partition_size"),
        (lambda: MultiAxisAttention(8, dim_head=4, qkv_bias="no"), "qkv_bias"),
        (lambda: SingleHeadAttention(8, partial_dim=2.5), "partial_dim"),
        (lambda: ScaleAwareModulation(8, 2, expand_ratio=2.0), "expand_ratio"),
        (lambda: ScaleAwareModulation(8, 2, qkv_bias=1), "qkv_bias"),
        (lambda: SpectralGating(8, (3.7, 5)), "size"),
        (lambda: SpectralGating(8, (True, 5)), "size"),
        (lambda: MSAConv(8, kernel_size=True), "kernel_size"),
        (lambda: MSAConv(8, kernel_size=3.0), "kernel_size"),
        (lambda: MSAConv(8, depthwise=1), "depthwise"),
        (lambda: AggregatedAttention(8, 2, pretrain_size=(16.5, 16)), "pretrain_size"),
        (lambda: AggregatedAttention(8, 2, qkv_bias="True"), "qkv_bias"),
        (lambda: SubspaceAttention(8, 2, bn_momentum="0.1"), "bn_momentum"),
        (lambda: _backbone(depths=(1.0,)), "depths"),
        (lambda: _backbone(img_size=8.0), "img_size"),
        (lambda: _backbone(in_chans=3.0), "in_chans"),
        (lambda: _backbone(mlp_ratio=True), "mlp_ratio"),
        (lambda: _backbone(mixer_kwargs=[("qkv_bias", False)]), "mixer_kwargs"),
    ],
)
def test_vision_argument_types(make, name):
    with pytest.raises(TypeError, match=name):
        make()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: HiLoAttention(8, 2, alpha=1.5), "alpha must be in"),
        (lambda: SubspaceAttention(8, 2, bn_momentum=2.0), "bn_momentum must be in"),
        (lambda: MultiAxisAttention(8, dim_head=4, partition="row"), "partition must be one of"),
        (lambda: MSAConv(8, kernel_size=(3, 4)), "kernel_size must be odd"),
        (lambda: SpectralGating(8, (3, 5, 7)), "size must be an int or a pair"),
        (lambda: _backbone(num_classes=-1), "num_classes"),
    ],
)
def test_vision_argument_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("case", sorted(c for c in LAYERS if c != "spectral"))
def test_input_dtype_mismatch_names_both_dtypes(case):
    build, shape = LAYERS[case]
    layer = build()
    name = "images" if case.startswith("backbone_") else "x"
    with pytest.raises(TypeError, match=rf"{name} must be torch.float32.*got torch.float64"):
        layer(torch.randn(2, *shape, dtype=torch.float64))


def test_spectral_gating_computes_in_the_wider_dtype():
    # by design (AMP safety): the FFT runs in the promoted dtype, the output keeps the input's
    layer = SpectralGating(8, (3, 5))
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    assert layer(x).dtype == torch.float64
    torch.testing.assert_close(layer(x).float(), layer(x.float()), atol=1e-6, rtol=1e-5)
