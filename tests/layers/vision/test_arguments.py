"""Bad arguments to neighborhood attention raise a TypeError/ValueError naming the argument and
what it got (issue 13 item 12): no float truncated, no bool taken for an int or a string for a
bool. The vision mixers' argument tables and every layer's input checks are in
``tests/layers/test_conformance.py``."""

from __future__ import annotations

import pytest
import torch

from headwise.layers.neighborhood import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from headwise.ops.attention import neighborhood_attention

NA = (NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D)


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
