"""A ``score_mod`` on ``blockwise`` (an autograd Function with a hand-written backward): the
tensors requiring grad that it names as globals, alone or inside a global ``nn.Module``, get
their gradients, as through the reference (they were silently left without one); one it reaches
only through another function is refused by ``blockwise`` (its gradient was silently missing),
and ``auto`` takes the reference instead."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import headwise.patterns as P
from headwise._checks import Unsupported
from headwise.ops.attention import attention
from headwise.ops.attention.blockwise import blockwise_attention

SLOPES = torch.tensor([0.5, 0.25], requires_grad=True)
TABLE = nn.Embedding(2 * 21 - 1, 2)  # a global module: its weight is the learnable table


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * (q_idx - kv_idx).abs()


def table_bias(score, b, h, q_idx, kv_idx):
    return score + TABLE.weight[kv_idx - q_idx + 20, h]


def test_global_tensors_of_a_score_mod_get_their_gradients():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 21, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    for mod, leaf in ((alibi, SLOPES), (table_bias, TABLE.weight)):
        grads = {}
        for backend in ("blockwise", "reference"):
            out = attention(q, k, v, P.sliding_window(4), score_mod=mod, backend=backend)
            grads[backend] = torch.autograd.grad(out.square().sum(), (leaf, q))
        assert grads["reference"][0].abs().sum() > 0
        for fast, ref in zip(grads["blockwise"], grads["reference"]):
            torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


WEIGHT = torch.tensor(0.5, requires_grad=True)
RAW = torch.tensor([0.1, -0.3], requires_grad=True)


def _scaled(score):
    return score * WEIGHT


def through_a_helper(score, b, h, q_idx, kv_idx):
    return _scaled(score)


def test_a_tensor_reached_through_a_helper_is_refused_by_blockwise_and_routed_by_auto():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 13, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    pattern = P.causal()
    with pytest.raises(ValueError, match="cannot see"):
        attention(q, k, v, pattern, score_mod=through_a_helper, backend="blockwise")
    with pytest.raises(Unsupported, match="cannot see"):
        blockwise_attention(q, k, v, pattern, score_mod=through_a_helper)
    grads = {}
    for backend in ("auto", "reference"):
        out = attention(q, k, v, pattern, score_mod=through_a_helper, backend=backend)
        grads[backend] = torch.autograd.grad(out.square().sum(), (WEIGHT, q))
    assert grads["reference"][0].abs() > 0
    for got, wanted in zip(grads["auto"], grads["reference"]):
        torch.testing.assert_close(got, wanted)
    with torch.no_grad():  # no gradient to lose: blockwise serves it
        out = attention(q, k, v, pattern, score_mod=through_a_helper, backend="blockwise")
        ref = attention(q, k, v, pattern, score_mod=through_a_helper, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_a_captured_tensor_computed_from_a_leaf_passes_its_gradient_on():
    # a global computed from a parameter (not a leaf): captured, so not refused, and the
    # gradient reaches the parameter through it, as through the reference
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 13, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    slopes = RAW.exp()

    def decayed(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    grads = {}
    for backend in ("blockwise", "reference"):
        out = attention(q, k, v, P.causal(), score_mod=decayed, backend=backend)
        grads[backend] = torch.autograd.grad(out.square().sum(), (RAW, q), retain_graph=True)
    for got, wanted in zip(grads["blockwise"], grads["reference"]):
        torch.testing.assert_close(got, wanted, atol=1e-5, rtol=1e-5)
