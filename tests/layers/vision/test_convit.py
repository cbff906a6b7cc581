"""GatedPositionalSelfAttention: local at init; equals its positional attention when the gate is
saturated (checks the separable evaluation against the dense N x N map)."""

from __future__ import annotations

import pytest
import torch

from headwise.layers.vision import GatedPositionalSelfAttention
from headwise.layers.vision.convit import relative_indices


def _content(m, x):
    b, c = x.shape[0], x.shape[-1]
    q, k = m.qk(x.reshape(b, -1, c)).reshape(b, -1, 2, m.num_heads, m.head_dim).unbind(2)
    v = m.v(x.reshape(b, -1, c)).reshape(b, -1, m.num_heads, m.head_dim)
    attn = (torch.einsum("bihd,bjhd->bhij", q, k) * m.head_dim**-0.5).softmax(-1)
    return attn, v


@pytest.mark.parametrize(("gate", "which"), [(40.0, "positional"), (-40.0, "content")])
def test_saturated_gate_selects_one_map(gate, which):
    torch.manual_seed(0)
    m = GatedPositionalSelfAttention(16, 4).double()
    with torch.no_grad():
        m.pos_proj.weight.normal_()
        m.pos_proj.bias.normal_()
        m.gating_param.fill_(gate)
    x = torch.randn(2, 5, 7, 16, dtype=torch.float64)
    content, v = _content(m, x)
    attn = m.positional_attention(5, 7)[None] if which == "positional" else content
    expected = m.proj(torch.einsum("bhij,bjhd->bihd", attn, v).flatten(2))
    torch.testing.assert_close(m(x), expected.reshape(x.shape))


def test_gate_mixes_two_softmaxed_maps():
    torch.manual_seed(1)
    m = GatedPositionalSelfAttention(16, 4).double()
    with torch.no_grad():
        m.gating_param.normal_()
    x = torch.randn(1, 4, 6, 16, dtype=torch.float64)
    content, v = _content(m, x)
    g = torch.sigmoid(m.gating_param)[None, :, None, None]
    attn = (1 - g) * content + g * m.positional_attention(4, 6)[None]
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
    expected = m.proj(torch.einsum("bhij,bjhd->bihd", attn, v).flatten(2))
    torch.testing.assert_close(m(x), expected.reshape(x.shape))


def test_locality_init_heads_are_convolution_taps():
    m = GatedPositionalSelfAttention(18, 9, locality_strength=2.0)
    assert torch.equal(m.v.weight, torch.eye(18))
    assert torch.allclose(torch.sigmoid(m.gating_param), torch.full((9,), 0.7311), atol=1e-4)
    height, width = 7, 7
    attn = m.positional_attention(height, width)
    centre = 3 * width + 3
    for p in range(9):
        h1, h2 = p % 3, p // 3
        dx, dy = h2 - 1, h1 - 1
        assert attn[p, centre].argmax() == (3 + dy) * width + 3 + dx
        # local: nearly all the mass lies within one step of the preferred tap
        rel = relative_indices(height, width)[centre]
        near = ((rel[:, 0] - dx).abs() <= 1) & ((rel[:, 1] - dy).abs() <= 1)
        assert attn[p, centre, near].sum() > 0.9


def test_relative_indices_order_and_sign():
    rel = relative_indices(2, 3)
    # query token 0 = (y 0, x 0), key token 5 = (y 1, x 2): [Δx, Δy, Δx² + Δy²]
    assert rel[0, 5].tolist() == [2.0, 1.0, 5.0]
    assert rel[5, 0].tolist() == [-2.0, -1.0, 5.0]


def test_locality_survives_module_by_module_materialisation():
    """FSDP1 resets each module with its own tensors, parents first: the locality init must be
    the children's own (it was written by GPSA's reset and then overwritten by nn.Linear's)."""
    expected = GatedPositionalSelfAttention(18, 9, locality_strength=2.0)
    with torch.device("meta"):
        m = GatedPositionalSelfAttention(18, 9, locality_strength=2.0)
    with torch.no_grad():
        for module in [m, *m.children()]:  # parents first
            if next(module.parameters(recurse=False), None) is not None:
                module.to_empty(device="cpu", recurse=False)
                module.reset_parameters()
    assert torch.equal(m.v.weight, torch.eye(18))
    assert torch.equal(m.pos_proj.weight, expected.pos_proj.weight)
    assert torch.equal(m.pos_proj.bias, torch.zeros(9))


def test_local_init_strength_is_kept_by_later_resets():
    m = GatedPositionalSelfAttention(8, 4)
    m.local_init(3.0)
    m.reset_parameters()
    expected = GatedPositionalSelfAttention(8, 4, locality_strength=3.0).pos_proj.weight
    assert m.locality_strength == 3.0 and torch.equal(m.pos_proj.weight, expected)
