"""MoHAttention: zero routers with all heads == MHA; only top-k routed heads contribute."""

from __future__ import annotations

import pytest
import torch

from headwise.layers.moh import MoHAttention
from headwise.layers.multihead import MultiHeadAttention
from headwise.patterns import sliding_window

E, H = 12, 6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"causal": True},
        {"num_kv_heads": 2, "qk_norm": "rms", "rotary": True, "causal": True},
        {"pattern": sliding_window(2, 1), "qk_norm": "layer"},
    ],
)
@pytest.mark.parametrize("router", ["learned", "query_norm"])
def test_converter_all_heads_equals_mha(kwargs, router):
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, **kwargs).double()
    moh = MoHAttention.from_mha(mha, num_shared=2, top_k=4, router=router)
    x = torch.randn(2, 7, E, dtype=torch.float64, requires_grad=True)
    out = moh(x)
    assert (out.gates == 1).all()
    torch.testing.assert_close(out.output, mha(x))
    (g_moh,) = torch.autograd.grad(out.output.sum(), x)
    (g_mha,) = torch.autograd.grad(mha(x).sum(), x)
    torch.testing.assert_close(g_moh, g_mha)


def _routed_by_hand(moh, x):
    """The learned gate rule written out for one token at a time (official ViT/DiT code)."""
    rows = []
    for token in x.reshape(-1, E):
        p = torch.softmax(moh.routed_router.weight @ token, -1)
        top = set(p.argsort(descending=True)[: moh.top_k].tolist())
        kept = torch.stack([p[i] if i in top else p[i] * 0 for i in range(len(p))])
        routed = kept / kept.sum() * moh.top_k
        shared = torch.softmax(moh.shared_router.weight @ token, -1) * moh.num_shared
        w = torch.softmax(moh.group_router.weight @ token, -1) * 2
        rows.append(torch.cat((shared * w[0], routed * w[1])))
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


def test_learned_gates_and_only_topk_contribute():
    torch.manual_seed(1)
    moh = MoHAttention(E, H, num_shared=2, top_k=2, causal=True).double()
    x = torch.randn(2, 9, E, dtype=torch.float64)
    out = moh(x)
    torch.testing.assert_close(out.gates, _routed_by_hand(moh, x))
    assert ((out.gates[..., 2:] > 0).sum(-1) == 2).all()
    # Perturb head 4's query weights: tokens that did not route to head 4 must not move.
    with torch.no_grad():
        moh.q_proj.weight[4 * 2 : 5 * 2] += torch.randn(2, E, dtype=torch.float64)
    moved = (moh(x).output - out.output).abs().amax(-1) > 1e-12
    # Position 0 sees one key, so its attention output does not depend on the query at all.
    assert torch.equal(moved[:, 1:], out.gates[:, 1:, 4] > 0) and not moved[:, 0].any()


def test_query_norm_router_matches_hand_computation():
    torch.manual_seed(2)
    moh = MoHAttention(E, H, num_shared=2, top_k=2, router="query_norm", causal=True).double()
    mha = MultiHeadAttention(E, H, causal=True).double()
    mha.load_state_dict(moh.state_dict())
    x = torch.randn(1, 8, E, dtype=torch.float64)
    q = (x @ moh.q_proj.weight.T + moh.q_proj.bias).view(1, 8, H, 2)
    scores = q[..., 2:, :].norm(dim=-1)
    probs = torch.softmax(scores / scores.std(-1, keepdim=True), -1)
    top = probs.argsort(-1, descending=True)[..., :2]
    expected = torch.zeros(1, 8, H, dtype=torch.float64)
    expected[..., :2] = 1
    expected.scatter_(-1, top + 2, 1.0)
    out = moh(x)
    assert torch.equal(out.gates, expected)
    # Output == the dense layer with the unselected heads' outputs zeroed before out_proj.
    heads = []
    handle = mha.out_proj.register_forward_pre_hook(lambda m, a: heads.append(a[0]))
    mha(x)
    handle.remove()
    gated = (heads[0].view(1, 8, H, 2) * expected[..., None]).flatten(-2)
    torch.testing.assert_close(out.output, mha.out_proj(gated))


def test_load_balance_loss():
    moh = MoHAttention(E, 4, num_shared=0, top_k=1)
    balanced = torch.eye(4).mul(5.0)  # token i routes to head i with the same confidence
    with torch.no_grad():
        moh.routed_router.weight.zero_()
        moh.routed_router.weight[:, :4] = balanced
    x = torch.zeros(1, 4, E)
    x[0, :, :4] = torch.eye(4)
    # f_i = P_i = 1/4 for every head, so L_b = 4 * sum_i 1/16 = 1 = top_k
    assert moh(x).load_balance_loss.item() == pytest.approx(1.0)
    collapsed = torch.zeros(1, 4, E)
    collapsed[0, :, 0] = 1
    assert moh(collapsed).load_balance_loss > moh(x).load_balance_loss
    uniform = MoHAttention(E, 4, num_shared=0, top_k=4)
    with torch.no_grad():
        uniform.routed_router.weight.zero_()
    assert uniform(torch.randn(1, 5, E)).load_balance_loss.item() == pytest.approx(4.0)


@pytest.mark.parametrize("router", ["learned", "query_norm"])
def test_packed_fast_path_vs_reference_and_backward(router):
    torch.manual_seed(3)
    moh = MoHAttention(E, H, num_shared=1, top_k=3, router=router, causal=True, rotary=True)
    ref = MoHAttention(E, H, num_shared=1, top_k=3, router=router, causal=True, rotary=True,
                       backend="reference")  # fmt: skip
    ref.load_state_dict(moh.state_dict())
    x = torch.randn(11, E, requires_grad=True)
    cu = torch.tensor([0, 1, 6, 11])
    out, expected = moh(x, cu_seqlens=cu), ref(x, cu_seqlens=cu)
    torch.testing.assert_close(out.output, expected.output, atol=1e-5, rtol=1e-5)
    (out.output.sum() + out.load_balance_loss).backward()
    assert torch.isfinite(x.grad).all()
    if router == "learned":
        assert moh.routed_router.weight.grad.abs().sum() > 0
    # packed == each sequence alone
    alone = moh(x[1:6][None].detach()).output[0]
    torch.testing.assert_close(out.output[1:6], alone, atol=1e-5, rtol=1e-5)


def test_all_shared_and_errors():
    moh = MoHAttention(E, H, num_shared=H, top_k=0)
    out = moh(torch.randn(1, 3, E))
    # Every head shared: gates h_s * softmax(W_s x) (official code), summing to H per token.
    torch.testing.assert_close(out.gates.sum(-1), torch.full((1, 3), float(H)))
    assert out.load_balance_loss == 0
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_heads - num_shared = 4\]"):
        MoHAttention(E, H, num_shared=2, top_k=5)
    with pytest.raises(ValueError, match="num_shared must be in"):
        MoHAttention(E, H, num_shared=7, top_k=1)
    with pytest.raises(ValueError, match="needs at least 2"):
        MoHAttention(E, H, num_shared=5, top_k=1, router="query_norm")
    with pytest.raises(ValueError, match=r"x must be \(B, L, E=12\); got \(3, 12\)"):
        moh(torch.randn(3, E))
    with pytest.raises(ValueError, match="MoH is self-attention"):
        MoHAttention.from_mha(MultiHeadAttention(E, H, kv_dim=5), num_shared=2, top_k=4)


def _official_dit(moh, x):
    """SkyworkAI/MoH ``MoH-DiT/models.py`` ``MoHAttention.forward`` (non-fused path), rewritten
    on this layer's weights: ``routed_head`` there is our ``top_k`` (0 = every head shared)."""
    b, n, c = x.shape
    heads, d, shared_head = moh.num_heads, moh.head_dim, moh.num_shared
    routed_head = moh.top_k
    flat = x.reshape(b * n, c)
    if routed_head > 0:
        gates = torch.softmax(flat @ moh.routed_router.weight.T, dim=1)
        indices = gates.topk(routed_head, dim=1).indices
        mask = torch.nn.functional.one_hot(indices, gates.shape[1]).sum(1)
        routed_gates = gates * mask
        denom = routed_gates.sum(1, keepdim=True).clamp(min=torch.finfo(x.dtype).eps)
        routed_gates = (routed_gates / denom).reshape(b, n, -1) * routed_head
    q, k, v = (
        p(x).reshape(b, n, heads, d).transpose(1, 2) for p in (moh.q_proj, moh.k_proj, moh.v_proj)
    )
    out = torch.softmax((q * d**-0.5) @ k.transpose(-2, -1), -1) @ v
    out = out.transpose(1, 2)
    if routed_head > 0:
        shared_gates = torch.softmax(flat @ moh.shared_router.weight.T, 1).reshape(b, n, -1)
        weight_0 = torch.softmax(flat @ moh.group_router.weight.T, 1).reshape(b, n, 2) * 2
        shared_gates = weight_0[:, :, :1] * shared_gates * shared_head
        routed_gates = weight_0[:, :, 1:] * routed_gates
        gate = torch.cat([shared_gates, routed_gates], 2)
    else:
        gate = torch.softmax(flat @ moh.shared_router.weight.T, 1).reshape(b, n, -1) * shared_head
    return moh.out_proj((gate[..., None] * out).reshape(b, n, heads * d)), gate


@pytest.mark.parametrize("num_shared, top_k", [(H, 0), (2, 2)])
def test_learned_gates_match_the_official_dit_code(num_shared, top_k):
    """Issue 13: with every head shared (h_s = H) the official code gates the heads with
    ``h_s * softmax(W_s x)``; headwise used gates of 1 (plain MHA) and left W_s unused."""
    torch.manual_seed(3)
    moh = MoHAttention(E, H, num_shared=num_shared, top_k=top_k).double()
    x = torch.randn(2, 5, E, dtype=torch.float64)
    expected, gate = _official_dit(moh, x)
    out = moh(x)
    torch.testing.assert_close(out.gates, gate)
    torch.testing.assert_close(out.output, expected)
    assert not torch.allclose(out.gates, torch.ones_like(out.gates))


@pytest.mark.parametrize(
    "num_shared, top_k, router",
    [(H, 0, "learned"), (2, 2, "learned"), (1, 2, "learned"), (0, 3, "learned"),
     (2, 2, "query_norm"), (H, 0, "query_norm")],
)  # fmt: skip
def test_every_parameter_gets_a_gradient(num_shared, top_k, router):
    """No parameter is built and left unused (DDP would need find_unused_parameters)."""
    torch.manual_seed(4)
    moh = MoHAttention(E, H, num_shared=num_shared, top_k=top_k, router=router, causal=True)
    out = moh(torch.randn(2, 5, E))
    (out.output.square().sum() + out.load_balance_loss).backward()
    for name, p in moh.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
