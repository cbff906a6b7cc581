"""DaViT: channel attention = the official role assignment, permutation-equivariant over tokens;
window attention = block-masked dense MHSA."""

from __future__ import annotations

import pytest
import torch

from headwise.layers.vision import ChannelAttention, WindowAttention


def _channel_oracle(m: ChannelAttention, x: torch.Tensor) -> torch.Tensor:
    """timm / official form: A = softmax(s kᵀ v) over channels of a group, out = (A qᵀ)ᵀ."""
    b, n, c = x.shape
    qkv = m.qkv(x).reshape(b, n, 3, m.num_heads, m.group_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, h, N, C_g)
    attn = ((k * m.group_dim**-0.5).transpose(-1, -2) @ v).softmax(-1)
    out = (attn @ q.transpose(-1, -2)).transpose(-1, -2)
    return m.proj(out.transpose(1, 2).reshape(b, n, c))


def test_channel_attention_equals_official_form():
    torch.manual_seed(0)
    m = ChannelAttention(16, 4).double()
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), _channel_oracle(m, x.reshape(2, 35, 16)).reshape(x.shape))
    torch.testing.assert_close(m(x.reshape(2, 35, 16)), m(x).reshape(2, 35, 16))


def test_channel_attention_is_permutation_equivariant_over_tokens():
    torch.manual_seed(1)
    m = ChannelAttention(16, 2).double()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    perm = torch.randperm(30)
    torch.testing.assert_close(m(x[:, perm]), m(x)[:, perm])


def _window_oracle(m: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    b, height, width, c = x.shape
    w, h = m.window_size, m.num_heads
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    win = ((ys // w) * width + xs // w).flatten()
    q, k, v = m.qkv(x.reshape(b, -1, c)).reshape(b, -1, 3, h, c // h).unbind(2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * (c // h) ** -0.5
    scores = scores.masked_fill(win[:, None] != win[None, :], float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).flatten(2)
    return m.proj(o).reshape(x.shape)


def test_window_attention_equals_block_masked_mhsa():
    torch.manual_seed(2)
    m = WindowAttention(16, 2, window_size=3).double()
    x = torch.randn(2, 6, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), _window_oracle(m, x))


def test_errors():
    with pytest.raises(ValueError, match="num_heads"):
        ChannelAttention(10, 4)
    with pytest.raises(ValueError, match=r"\(B, N, 16\)"):
        ChannelAttention(16, 4)(torch.randn(2, 16))
