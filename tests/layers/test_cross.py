"""Cross-attention family: CrossAttention (+ modality_mutual), ADEM-VL, DCAL GLCA/PWCA,
conditional cross-attention."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.layers.cross import (
    ConditionalCrossAttention,
    CrossAttention,
    GlobalLocalCrossAttention,
    PairwiseCrossAttention,
    ParameterFreeCrossAttention,
    attention_rollout,
)
from headwise.patterns import causal, modality_mutual

E, H = 8, 2


def _explicit(m, x, c, mask=None):
    """softmax(Q K^T / sqrt(D) + mask) V W_o with the module's weights, heads written out."""
    d = m.head_dim
    q = (x @ m.q_proj.weight.T + m.q_proj.bias).unflatten(-1, (m.num_heads, d)).transpose(1, 2)
    k = (c @ m.k_proj.weight.T + m.k_proj.bias).unflatten(-1, (m.num_heads, d)).transpose(1, 2)
    v = (c @ m.v_proj.weight.T + m.v_proj.bias).unflatten(-1, (m.num_heads, d)).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    o = (torch.softmax(s, -1) @ v).transpose(1, 2).flatten(-2)
    return o @ m.out_proj.weight.T + m.out_proj.bias


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_cross_attention_context_mask(backend):
    torch.manual_seed(0)
    m = CrossAttention(E, H, kv_dim=5, backend=backend).double()
    x = torch.randn(2, 3, E, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = m(x, c, context_mask=keep)
    torch.testing.assert_close(out, _explicit(m, x, c, keep[:, None, None]))
    out.sum().backward()
    assert (c.grad[1, 4:] == 0).all() and c.grad[1, :4].abs().sum() > 0


def test_cross_attention_modality_mutual_joint_sequence():
    """AKI: image tokens 1..3 also see the question 4..5, never the answer 6..8."""
    torch.manual_seed(1)
    pattern = modality_mutual([((1, 4), (4, 6))])
    mma = CrossAttention(E, H, pattern=pattern).double()
    plain = CrossAttention(E, H, pattern=causal()).double()
    plain.load_state_dict(mma.state_dict())
    x = torch.randn(1, 9, E, dtype=torch.float64)
    out, ref = mma(x), plain(x)
    text = [0, 4, 5, 6, 7, 8]
    torch.testing.assert_close(out[:, text], ref[:, text])
    assert (out[:, 1:4] - ref[:, 1:4]).abs().amax() > 1e-6
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    mask[1:4, 4:6] = True
    torch.testing.assert_close(out, _explicit(mma, x, x, mask))
    answer_changed = x.clone()
    answer_changed[:, 6:] += 1
    torch.testing.assert_close(mma(answer_changed)[:, 1:4], out[:, 1:4])


def test_adem_formula_and_dropped_tokens_never_influence():
    torch.manual_seed(2)
    m = ParameterFreeCrossAttention(E, drop_ratio=0.5, scale=0.3, num_visual_tokens=9).double()
    with torch.no_grad():
        m.value_offset.normal_()
    x = torch.randn(2, 5, E, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 9, E, dtype=torch.float64, requires_grad=True)
    out = m(x, v)
    silu = torch.nn.functional.silu
    a = silu(x) @ silu(v + m.key_offset).transpose(-1, -2)
    keep = a >= a.sort(-1).values[..., 4:5]  # int(0.5 * 9) = 4 lowest dropped per text token
    assert (keep.sum(-1) == 5).all()
    torch.testing.assert_close(out, 0.3 * (a * keep) @ (v + m.value_offset))
    # d out[b, t] / d v[b, j] is exactly 0 for every dropped pair (t, j).
    for b in range(2):
        for t in range(5):
            (g,) = torch.autograd.grad(out[b, t].sum(), v, retain_graph=True)
            dropped = ~keep[b, t]
            assert (g[b, dropped] == 0).all() and (g[b, ~dropped].abs().sum(-1) > 0).all()
            assert (g[1 - b] == 0).all()
    # Dropping nothing is the plain parameter-free attention; no parameters without offsets.
    plain = ParameterFreeCrossAttention(E)
    assert not list(plain.parameters())
    x32, v32 = x.detach().float(), v.detach().float()
    torch.testing.assert_close(plain(x32, v32), (silu(x32) @ silu(v32).transpose(-1, -2)) @ v32)


def test_attention_rollout_and_glca():
    torch.manual_seed(3)
    maps = [torch.softmax(torch.randn(2, H, 6, 6, dtype=torch.float64), -1) for _ in range(3)]
    eye = torch.eye(6, dtype=torch.float64)
    bars = [(s.mean(1) + eye) / 2 for s in maps]
    rollout = attention_rollout(maps)
    torch.testing.assert_close(rollout, bars[2] @ bars[1] @ bars[0])
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 6, dtype=torch.float64))

    for backend in ("auto", "reference"):
        torch.manual_seed(4)
        m = GlobalLocalCrossAttention(E, H, top_ratio=0.3, backend=backend).double()
        x = torch.randn(2, 6, E, dtype=torch.float64, requires_grad=True)
        scores = rollout[:, 0].clone()
        scores[:, 0] = float("-inf")  # keep CLS out of the local queries
        out, idx = m(x, scores)
        assert idx.shape == (2, 2) and (idx[:, 1:] > idx[:, :1]).all()
        expected_idx = scores.topk(2, -1).indices.sort(-1).values
        assert torch.equal(idx, expected_idx)
        local = x.gather(1, idx[..., None].expand(-1, -1, E))
        torch.testing.assert_close(out, _explicit(m, local, x))
        out.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_pwca_training_only():
    torch.manual_seed(5)
    m = PairwiseCrossAttention(E, H, backend="reference").double()
    x = torch.randn(2, 5, E, dtype=torch.float64, requires_grad=True)
    other = torch.randn(2, 4, E, dtype=torch.float64, requires_grad=True)
    out = m(x, other)
    joint = torch.cat((x, other), 1)
    torch.testing.assert_close(out, _explicit(m, x, joint))
    out.sum().backward()
    assert other.grad.abs().sum() > 0
    m.eval()
    torch.testing.assert_close(m(x, other), _explicit(m, x, x))
    torch.testing.assert_close(m(x, other), m(x))


def test_conditional_cross_attention():
    torch.manual_seed(6)
    m = ConditionalCrossAttention(E, H, num_conditions=3, queries_per_condition=2, kv_dim=6)
    m.double()
    image = torch.randn(3, 7, 6, dtype=torch.float64)
    condition = torch.tensor([2, 0, 2])
    out = m(image, condition)
    assert out.shape == (3, 2, E)
    for b, c in enumerate(condition.tolist()):
        q = m.condition_queries[c][None]
        torch.testing.assert_close(out[b : b + 1], _explicit(m.attn, q, image[b : b + 1]))
    assert (out[0] - m(image, torch.tensor([1, 0, 2]))[0]).abs().amax() > 1e-6
    out.sum().backward()
    grad = m.condition_queries.grad
    assert (grad[1] == 0).all() and grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0


def test_errors():
    with pytest.raises(ValueError, match=r"context_mask must be a bool \(B, Lk\) = \(1, 4\)"):
        CrossAttention(E, H)(
            torch.randn(1, 2, E), torch.randn(1, 4, E), context_mask=torch.ones(1, 3)
        )
    with pytest.raises(ValueError, match=r"visual must be \(B=1, L, 8\); got \(2, 3, 8\)"):
        ParameterFreeCrossAttention(E)(torch.randn(1, 2, E), torch.randn(2, 3, E))
    with pytest.raises(ValueError, match="drop_ratio"):
        ParameterFreeCrossAttention(E, drop_ratio=1.0)
    with pytest.raises(ValueError, match=r"scores must be \(B, L\) = \(1, 4\)"):
        GlobalLocalCrossAttention(E, H)(torch.randn(1, 4, E), torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"maps\[1\] must match"):
        attention_rollout([torch.rand(1, 3, 3), torch.rand(1, 4, 4)])
    with pytest.raises(ValueError, match=r"condition ids must be in \[0, 2\)"):
        ConditionalCrossAttention(E, H, 2)(torch.randn(1, 3, E), torch.tensor([2]))
