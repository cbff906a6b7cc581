"""A ``score_mod`` on ``blockwise`` (an autograd Function with a hand-written backward): the
tensors requiring grad that it names as globals, alone or inside a global ``nn.Module``, get
their gradients, as through the reference (they were silently left without one)."""

from __future__ import annotations

import torch
from torch import nn

import headwise.patterns as P
from headwise.ops.attention import attention

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
