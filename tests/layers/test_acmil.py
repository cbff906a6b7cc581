"""MultiBranchAttentionPooling (ACMIL): STKIM masks exactly floor(K r) top instances per branch,
masked instances get zero weight, eval has no masking, diversity loss."""

from __future__ import annotations

import pytest
import torch

from headwise.layers import MultiBranchAttentionPooling

C = 6


def test_stkim_masks_topk_instances_with_zero_weight():
    torch.manual_seed(0)
    m = MultiBranchAttentionPooling(C, 8, num_branches=3, top_k=5, mask_ratio=0.6).double()
    h = torch.randn(2, 13, C, dtype=torch.float64, requires_grad=True)
    e = m.logits(h).detach()
    out = m(h, generator=torch.Generator().manual_seed(1))
    zero = out.attention == 0
    assert (zero.sum(-1) == 3).all()  # floor(5 * 0.6) per branch
    top5 = torch.zeros_like(zero).scatter_(-1, e.topk(5, -1).indices, True)
    assert not (zero & ~top5).any()
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    # Masked instances never influence the branch embedding: zero gradient through that branch.
    (g,) = torch.autograd.grad(out.branches[0, 1].sum(), h, retain_graph=True)
    hidden = zero[0, 1]
    assert (g[0, hidden] == 0).all() and (g[0, ~hidden].abs().sum(-1) > 0).all()
    # Formula: softmax of the logits with the masked ones removed; bag = mean attention pooling.
    expected = torch.softmax(m.logits(h).masked_fill(zero, float("-inf")), -1)
    torch.testing.assert_close(out.attention, expected)
    torch.testing.assert_close(out.branches, expected @ h)
    torch.testing.assert_close(out.bag, (expected.mean(1, keepdim=True) @ h)[:, 0])
    out.bag.sum().backward()
    assert torch.isfinite(h.grad).all()


def test_eval_no_masking_and_padding():
    torch.manual_seed(1)
    m = MultiBranchAttentionPooling(C, 8, num_branches=2, top_k=4).double().eval()
    h = torch.randn(2, 7, C, dtype=torch.float64)
    out = m(h)
    assert (out.attention > 0).all()
    torch.testing.assert_close(out.attention, torch.softmax(m.logits(h), -1))
    mask = torch.tensor([[True] * 7, [True] * 2 + [False] * 5])
    m.train()
    padded = m(h, mask, generator=torch.Generator().manual_seed(0))
    assert (padded.attention[1, :, 2:] == 0).all()
    # 2 real instances: K is capped at 2, floor(2 * 0.6) = 1 hidden, 1 keeps all the weight
    assert ((padded.attention[1] > 0).sum(-1) == 1).all()
    assert torch.isfinite(padded.bag).all()


def test_diversity_loss():
    m = MultiBranchAttentionPooling(C, 8, num_branches=3, top_k=1, mask_ratio=0.0).double()
    with torch.no_grad():
        m.attention_w.weight.copy_(m.attention_w.weight[:1].expand(3, -1))
        m.attention_w.bias.zero_()
    h = torch.randn(1, 5, C, dtype=torch.float64)
    assert m(h).diversity_loss.item() == pytest.approx(1.0)


def test_diversity_loss_is_zero_for_disjoint_branches():
    # instance n switches on hidden unit n only; branch m reads unit m with a huge weight, so
    # a[m] is the one-hot of instance m (exp(-1000) = 0 in float64): orthogonal maps
    m = MultiBranchAttentionPooling(C, 2, num_branches=2, top_k=1, mask_ratio=0.0).double()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.attention_v.weight[0, 0] = m.attention_v.weight[1, 1] = 10.0
        m.attention_w.weight.copy_(torch.eye(2) * 2000.0)
    h = torch.eye(2, C, dtype=torch.float64)[None]
    out = m(h)
    assert torch.equal(out.attention[0], torch.eye(2, dtype=torch.float64))
    assert out.diversity_loss.item() == 0.0


def test_diversity_loss_is_the_mean_pairwise_cosine_of_the_branch_maps():
    torch.manual_seed(0)
    m = MultiBranchAttentionPooling(C, 8, num_branches=4, top_k=2).double().eval()
    out = m(torch.randn(3, 5, C, dtype=torch.float64))
    a = out.attention
    cos = [
        torch.nn.functional.cosine_similarity(a[:, i], a[:, j], dim=-1)
        for i in range(4)
        for j in range(i + 1, 4)
    ]
    torch.testing.assert_close(out.diversity_loss, torch.stack(cos).mean())


def test_errors():
    m = MultiBranchAttentionPooling(C)
    with pytest.raises(ValueError, match=r"h must be \(B, N, C=6\); got \(5, 6\)"):
        m(torch.randn(5, C))
    with pytest.raises(ValueError, match=r"mask must be bool \(B, N\) = \(1, 5\)"):
        m(torch.randn(1, 5, C), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_ratio"):
        MultiBranchAttentionPooling(C, mask_ratio=1.0)
