"""One attention rollout (Abnar & Zuidema 2020) for the whole library: DCAL's layers and the
HF head tools use the same op."""

from __future__ import annotations

import pytest
import torch

from headwise import hf
from headwise.layers import cross
from headwise.ops.attention.rollout import attention_rollout, residual_attention


def test_the_layers_and_hf_share_one_rollout():
    assert cross.attention_rollout is attention_rollout is hf.attention_rollout


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_is_the_product_of_residual_maps(fusion):
    torch.manual_seed(0)
    maps = [torch.softmax(torch.randn(2, 3, 5, 5, dtype=torch.float64), -1) for _ in range(3)]
    fused = [getattr(m, {"mean": "mean", "max": "amax", "min": "amin"}[fusion])(1) for m in maps]
    eye = torch.eye(5, dtype=torch.float64)
    bars = [0.7 * f + 0.3 * eye for f in fused]
    bars = [b / b.sum(-1, keepdim=True) for b in bars]
    got = attention_rollout(maps, residual=0.3, head_fusion=fusion)
    torch.testing.assert_close(got, bars[2] @ bars[1] @ bars[0])
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 5, dtype=torch.float64))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="head_fusion must be one of"):
        residual_attention(torch.rand(1, 2, 3, 3), head_fusion="sum")
    with pytest.raises(TypeError, match="maps must be a sequence"):
        attention_rollout(torch.rand(1, 3, 3))
    with pytest.raises(ValueError, match=r"maps\[0\]: probs must be"):
        attention_rollout([torch.rand(1, 3, 4)])
