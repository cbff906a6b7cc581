"""AgentAttention: equals the explicit two-stage softmax formula; reduces to softmax attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headwise.layers.agent import AgentAttention, AgentAttention2d, agent_attention
from headwise.ops.attention import attention


def _two_stage(q, k, v, agents, b1, b2, scale):
    """Per head (B, H, ., D): softmax(s A K^T + B1) V, then softmax(s Q A^T + B2) V_A."""
    agent_values = torch.softmax(scale * agents @ k.transpose(-1, -2) + b1, -1) @ v
    return torch.softmax(scale * q @ agents.transpose(-1, -2) + b2, -1) @ agent_values


def _randomise(module):
    # make every bias and the conv visibly non-zero, so each term is exercised
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def test_2d_equals_explicit_formula():
    torch.manual_seed(0)
    height, width, c, h, n = 6, 5, 8, 2, 4
    m = AgentAttention2d(c, h, (height, width), agent_num=n).double()
    _randomise(m)
    x = torch.randn(2, height * width, c, dtype=torch.float64)
    q, k, v = (x @ m.qkv.weight.T + m.qkv.bias).chunk(3, -1)
    img = q.transpose(1, 2).reshape(2, c, height, width)
    agents = F.adaptive_avg_pool2d(img, 2).flatten(2).transpose(1, 2)

    def heads(t):
        return t.reshape(2, -1, h, c // h).transpose(1, 2)

    b1 = F.interpolate(m.an_bias, size=(height, width), mode="bilinear").reshape(h, n, -1)
    b1 = b1 + (m.ah_bias + m.aw_bias).reshape(h, n, -1)
    b2 = F.interpolate(m.na_bias, size=(height, width), mode="bilinear").reshape(h, n, -1)
    b2 = b2.transpose(-1, -2) + (m.ha_bias + m.wa_bias).reshape(h, -1, n)
    o = _two_stage(heads(q), heads(k), heads(v), heads(agents), b1, b2, (c // h) ** -0.5)
    local = F.conv2d(
        v.transpose(1, 2).reshape(2, c, height, width), m.dwc.weight, m.dwc.bias, padding=1,
        groups=c,
    )  # fmt: skip
    expected = m.proj(o.transpose(1, 2).reshape(2, -1, c) + local.flatten(2).transpose(1, 2))
    torch.testing.assert_close(m(x), expected)


def test_sequence_equals_explicit_formula():
    torch.manual_seed(1)
    c, h, n, length = 8, 2, 3, 10
    m = AgentAttention(c, h, agent_num=n).double()
    _randomise(m)
    x = torch.randn(2, length, c, dtype=torch.float64)
    q, k, v = m.qkv(x).chunk(3, -1)
    agents = F.adaptive_avg_pool1d(q.transpose(1, 2), n).transpose(1, 2)

    def heads(t):
        return t.reshape(2, -1, h, c // h).transpose(1, 2)

    b1 = F.interpolate(m.an_bias, size=length, mode="linear")
    b2 = F.interpolate(m.na_bias, size=length, mode="linear").transpose(-1, -2)
    o = _two_stage(heads(q), heads(k), heads(v), heads(agents), b1, b2, (c // h) ** -0.5)
    local = F.conv1d(v.transpose(1, 2), m.dwc.weight, m.dwc.bias, padding=1, groups=c)
    expected = m.proj(o.transpose(1, 2).reshape(2, -1, c) + local.transpose(1, 2))
    torch.testing.assert_close(m(x), expected)


def test_agents_equal_to_queries_reduce_to_softmax_attention():
    # n = N agents equal to the queries, and a broadcast stage that sends each query to its own
    # agent (B_2 = 0 on the diagonal, -inf elsewhere): the output is softmax attention.
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 7, 3, 4, dtype=torch.float64) for _ in range(3))
    own_agent = torch.full((7, 7), float("-inf"), dtype=torch.float64).fill_diagonal_(0.0)
    out = agent_attention(q, k, v, agents=q, query_bias=own_agent)
    torch.testing.assert_close(out, attention(q, k, v))


def test_output_depends_on_v_only_through_agent_values_without_dwc():
    torch.manual_seed(3)
    m = AgentAttention(8, 2, agent_num=2).double()
    with torch.no_grad():
        m.dwc.weight.zero_()
        m.dwc.bias.zero_()
    x = torch.randn(1, 9, 8, dtype=torch.float64, requires_grad=True)
    y = m(x)
    # with two agents, every output row is a convex mix of two agent values: rank <= 2 per head
    # before the projection
    o = torch.linalg.solve(m.proj.weight, (y - m.proj.bias).squeeze(0).T).T
    for head in o.reshape(9, 2, 4).unbind(1):
        assert torch.linalg.matrix_rank(head) <= 2


def test_bad_input():
    with pytest.raises(ValueError, match="agent_num must be a perfect square"):
        AgentAttention2d(8, 2, (4, 4), agent_num=5)
    with pytest.raises(ValueError, match="divisible"):
        AgentAttention(9, 2)
    m = AgentAttention2d(8, 2, (4, 4), agent_num=4)
    with pytest.raises(ValueError, match=r"x must be \(B, 4\*4, 8\)"):
        m(torch.randn(1, 15, 8))
    with pytest.raises(ValueError, match=r"x must be \(B, N >= 1, 8\)"):
        AgentAttention(8, 2)(torch.randn(1, 0, 8))
