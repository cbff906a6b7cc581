"""Perplexity harness mechanics on a tiny random Llama: chunked token NLLs equal the cross-entropy
of the model's own logits, the two perplexities are exp of the right means, and a plan is sized
for the stream's length."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from headwise.evals import PerplexityScore, perplexity, sized_swap, token_nll
from headwise.layers import MoAPlan

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_llama  # noqa: E402  (needs transformers)

# the module, not the function of the same name that headwise.evals exports
perplexity_module = importlib.import_module("headwise.evals.perplexity")


def test_token_nll_equals_cross_entropy_of_logits(monkeypatch):
    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 50))
    monkeypatch.setattr(perplexity_module, "_CHUNK", 16)  # 49 rows in 4 chunks
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    got = token_nll(model, ids)
    assert got.shape == (49,)
    assert torch.allclose(got, expected, atol=1e-5)


def test_perplexity_whole_and_last_half():
    nll = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 4.0, 5.0]])
    score = PerplexityScore(nll)
    assert math.isclose(score.whole, math.exp(21 / 8))
    assert math.isclose(score.last_half, math.exp(15 / 4))


def test_perplexity_sizes_the_plan_for_the_stream():
    model = tiny_llama()
    streams = [torch.randint(0, 64, (1, 96)) for _ in range(2)]
    plan = MoAPlan.uniform(2, 4, alpha=0, beta=0.25, block=8, sink_size=8, min_cache=8)
    dense = perplexity(model, streams)
    assert torch.allclose(dense.nll, torch.stack([token_nll(model, s) for s in streams]))
    sparse = perplexity(model, streams, plan)
    with sized_swap(model, plan, 96):
        expected = torch.stack([token_nll(model, s) for s in streams])
    assert torch.allclose(sparse.nll, expected)
    assert not torch.allclose(sparse.nll, dense.nll, atol=1e-3)


def test_perplexity_refuses_bad_streams():
    model = tiny_llama()
    with pytest.raises(ValueError, match="one length"):
        perplexity(model, [torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 9))])
    with pytest.raises(ValueError, match=r"\(1, L\)"):
        token_nll(model, torch.randint(0, 64, (2, 8)))
