"""The vision mixers' shared BatchNorm: contiguous kernels forward and backward, undefined
gradients passed through, an initial weight carried by the module itself."""

from __future__ import annotations

import pytest
import torch

from headwise.layers.vision import SingleHeadAttention, SubspaceAttention
from headwise.layers.vision._common import BatchNorm2d


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_with_undefined_gradients_through_batchnorm(training):
    """``gradcheck`` also backpropagates an undefined (``None``) output gradient; the
    contiguous-gradient hook crashed on it with a TypeError (follow-up of issue 13 item 3)."""
    torch.manual_seed(0)
    layer = SingleHeadAttention(4, partial_dim=2, qk_dim=2).double().train(training)
    with torch.no_grad():
        layer.proj[1].bn.weight.fill_(0.7)  # not the zero init, so every path carries gradient
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True, check_undefined_grad=True)


@pytest.mark.parametrize("weight_init", [0.0, 0.5])
def test_weight_init_is_the_modules_own(weight_init):
    bn = BatchNorm2d(3, weight_init=weight_init, momentum=0.9)
    assert bn.momentum == 0.9 and torch.equal(bn.weight, torch.full((3,), weight_init))
    with torch.no_grad():
        bn.weight.fill_(5.0)
    bn.reset_parameters()
    assert torch.equal(bn.weight, torch.full((3,), weight_init))
    assert torch.equal(bn.bias, torch.zeros(3))


def test_subspace_attention_keeps_its_momentum():
    assert SubspaceAttention(8, 2, bn_momentum=0.3).bn_dw.momentum == 0.3
