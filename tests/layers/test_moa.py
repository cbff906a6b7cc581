"""MoA: the cache rounding rule, prefill/decode masks, plans (JSON, apply), profiler, search."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import headwise
from headwise import patterns
from headwise.hooks import hook_points
from headwise.layers.moa import MoAAttention, MoAPlan, MoASpan, moa_cache_size
from headwise.layers.multihead import MultiHeadAttention
from headwise.moa import attention_influence, candidate_grid, profile_influence, search_plan

RULE = {"block": 4, "sink_size": 4, "min_cache": 8}


@pytest.mark.parametrize(
    "alpha, beta, length, expected",
    [
        (0, 0.5, 4096, (64, 1984)),  # 2048 tokens: already a multiple of 64
        (1000, 0.0, 4096, (64, 960)),  # 1000 -> 1024 (rounded up)
        (-1024, 0.25, 2048, (64, 64)),  # -512 -> min cache 128
        (100.9, 0.0, 4096, (64, 64)),  # int(100.9) = 100 -> 128
        (130.7, 0.0, 4096, (64, 128)),  # int 130 -> 192
        (0, 1.0, 1000, (64, 960)),  # = N = 1000 -> 1024 >= N
        (math.inf, 0.0, 300, (64, 256)),  # clamp to N = 300 -> 320
        (5000, 0.5, 3000, (64, 2944)),  # 6500 clamped to 3000 -> 3008
        (-3.5, 0.0, 100, (64, 64)),
        (0, 0.0, 10, (64, 64)),  # N below the minimum cache: the cache exceeds N
    ],
)
def test_cache_size_follows_the_official_rounding(alpha, beta, length, expected):
    assert moa_cache_size(alpha, beta, length) == expected


def test_cache_size_small_rule():
    assert moa_cache_size(7, 0.25, 40, **RULE) == (4, 16)  # 17 -> 20
    assert moa_cache_size(0, 0.0, 40, block=4, sink_size=8, min_cache=4) == (4, 0)


def _explicit_prefill(sink, local, block, length):
    mask = torch.zeros(length, length, dtype=torch.bool)
    for t in range(length):
        for j in range(t + 1):
            qb, kb = t // block, j // block
            mask[t, j] = kb < sink // block or kb >= qb + 1 - local // block
    return mask


@pytest.mark.parametrize("alpha, beta", [(7, 0.25), (0, 0.5), (-8, 0.5), (12, 0.0)])
def test_prefill_mask_is_the_explicit_block_rule(alpha, beta):
    span = MoASpan(alpha, beta, **RULE)
    for length in (9, 23, 40):
        sink, local = moa_cache_size(alpha, beta, length, **RULE)
        expected = _explicit_prefill(sink, local, 4, length)
        assert torch.equal(span.dense_mask(length, length)[0], expected)
        # Chunked prefill (bottom-right): the last rows of the full mask.
        assert torch.equal(span.dense_mask(5, length)[0], expected[-5:])


@pytest.mark.parametrize("alpha, beta", [(math.inf, 0.0), (0, 1.0), (50, 0.0)])
def test_plan_with_full_span_is_dense_causal(alpha, beta):
    plan = MoAPlan.uniform(1, 3, alpha, beta, max_new_tokens=0, **RULE)
    pattern = plan.pattern(3)
    causal = torch.ones(37, 37).tril().bool()
    assert torch.equal(pattern.dense_mask(37, 37), causal.expand(3, -1, -1))
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(
        headwise.attention(q, k, v, pattern), headwise.attention(q, k, v, patterns.causal())
    )


def test_spans_are_elastic_with_the_length():
    span = MoASpan(4, 0.25, extra_tokens=8, **RULE)
    widths = set()
    for kv_len in (8, 24, 56, 120):
        sink, local = moa_cache_size(4, 0.25, kv_len + 8, **RULE)
        widths.add(local)
        expected = _explicit_prefill(sink, local, 4, kv_len)
        assert torch.equal(span.dense_mask(kv_len, kv_len)[0], expected)
    assert len(widths) == 4


def test_plan_round_trips_through_json(tmp_path):
    plan = MoAPlan(
        ((math.inf, 1024.0, -512.0), (0.0, 0.0, 8.5)),
        ((0.0, 0.5, 0.875), (1.0, 0.125, 0.25)),
        block=32,
        sink_size=64,
        min_cache=96,
        max_new_tokens=7,
    )
    assert "Infinity" not in plan.to_json()
    assert MoAPlan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "plan.json")
    loaded = MoAPlan.load(tmp_path / "plan.json")
    assert loaded == plan and loaded.pattern(3, layer=1) == plan.pattern(3, layer=1)
    assert len(plan.layer_patterns()) == 2


def test_apply_sets_the_per_head_pattern():
    plan = MoAPlan(((4.0, 0.0),), ((0.0, 0.5),), max_new_tokens=0, **RULE)
    mha = MultiHeadAttention(16, 2)
    assert plan.apply(mha) is mha
    assert mha.pattern == patterns.per_head(plan.spans(0))
    x = torch.randn(1, 30, 16)
    q = mha.q_proj(x).view(1, 30, 2, 8)
    k = mha.k_proj(x).view(1, 30, 2, 8)
    v = mha.v_proj(x).view(1, 30, 2, 8)
    masks = torch.stack([_explicit_prefill(*plan.cache_sizes(30)[h], 4, 30) for h in range(2)])
    probs = torch.softmax(
        (q.transpose(1, 2) @ k.transpose(1, 2).mT / math.sqrt(8)).masked_fill(
            ~masks, float("-inf")
        ),
        -1,
    )
    expected = mha.out_proj((probs @ v.transpose(1, 2)).transpose(1, 2).flatten(-2))
    torch.testing.assert_close(mha(x), expected)
    with pytest.raises(ValueError, match="n_heads=3"):
        plan.pattern(3)


def _layer(**kw) -> MoAAttention:
    torch.manual_seed(0)
    return MoAAttention(
        24, 3, alphas=[3.0, 0.0, 9.0], betas=[0.0, 0.25, 0.0], max_new_tokens=0, **RULE, **kw
    ).double()


@pytest.mark.parametrize("kw", [{}, {"num_kv_heads": 1, "rotary": True}])
def test_decode_ring_buffer_equals_explicit_token_mask(kw):
    layer = _layer(**kw).eval()
    prompt, total = 10, 40
    x = torch.randn(2, total, 24, dtype=torch.float64)
    cache = layer.new_cache(2, total)
    sizes = [span.cache_size(total) for span in layer.pattern.patterns]
    assert sizes == [(4, 4), (4, 8), (4, 8)]
    with torch.no_grad():
        pre = layer(x[:, :prompt], cache=cache)
        steps = [layer(x[:, t : t + 1], cache=cache) for t in range(prompt, total - 3)]
        steps.append(layer(x[:, total - 3 :], cache=cache))  # several tokens in one call
    got = torch.cat([pre, *steps], 1)
    # The oracle: the full-sequence projections with the explicit masks of each phase.
    batch, heads = 2, 3
    q = layer.q_proj(x).view(batch, total, heads, 8)
    k = layer.k_proj(x).view(batch, total, layer.num_kv_heads, 8)
    v = layer.v_proj(x).view(batch, total, layer.num_kv_heads, 8)
    if layer.rotary:
        from headwise.layers.multihead import apply_rotary

        q, k = apply_rotary(q, torch.arange(total)), apply_rotary(k, torch.arange(total))
    group = heads // layer.num_kv_heads
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    mask = torch.zeros(heads, total, total, dtype=torch.bool)
    for h, (sink, local) in enumerate(sizes):
        mask[h, :prompt, :prompt] = _explicit_prefill(sink, local, 4, prompt)
        for t in range(prompt, total):  # after the ring wrapped several times
            j = torch.arange(total)
            mask[h, t] = (j < sink) | ((j > t - local) & (j <= t))
    scores = q.transpose(1, 2) @ k.transpose(1, 2).mT / math.sqrt(8)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    expected = layer.out_proj((probs @ v.transpose(1, 2)).transpose(1, 2).flatten(-2))
    torch.testing.assert_close(got, expected)


def test_layer_backends_agree_forward_and_backward():
    layer = _layer(num_kv_heads=1)
    x = torch.randn(2, 27, 24, dtype=torch.float64, requires_grad=True)
    params = [x, *layer.parameters()]
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), params)
    layer.backend = "reference"
    y_ref = layer(x)
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, torch.autograd.grad(y_ref.square().sum(), params)):
        torch.testing.assert_close(g, g_ref)


def test_influence_is_the_first_order_formula():
    torch.manual_seed(0)
    scores = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    causal = torch.ones(5, 5).tril().bool()
    a = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1).requires_grad_()
    target = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    ((a * target).sum() + (a**2).sum()).backward()
    g = a.grad
    tiles = attention_influence(a, g, block=2, absolute=False)
    assert tiles.shape == (1, 3, 3)
    expected = torch.zeros(5, 5, dtype=torch.float64)
    for b in range(2):
        for i in range(5):
            row = sum(a[b, 0, i, n] * g[b, 0, i, n] for n in range(5))
            for j in range(i + 1):
                aij, gij = a[b, 0, i, j], g[b, 0, i, j]
                delta = torch.finfo(torch.float64).eps
                e = -aij * gij if i == 0 else -aij * (gij - row) / (1 - aij + delta)
                expected[i, j] += e / 2
    pad = nn.functional.pad(expected, (0, 1, 0, 1))
    torch.testing.assert_close(tiles[0], pad.view(3, 2, 3, 2).sum((1, 3)).detach())


def _official_effect(mat_a, grad_a, block, delta):
    """thu-nics/MoA ``LlamaModel_get_attention_matrix_log`` (``modify_llama_profile.py``) for
    one layer, take_abs=False, rewritten: ``(B, H, n, n)`` summed block tiles. ``delta`` is the
    machine epsilon of the model's dtype (the official ``torch.finfo(grad_A.dtype).eps``)."""
    multiply = grad_a * mat_a
    effect = mat_a * (grad_a - multiply.sum(-1, keepdim=True)) / (delta + 1 - mat_a)
    effect[..., 0, :] = multiply[..., 0, :]
    effect = -effect
    length = effect.shape[-1]
    effect = effect * torch.ones(length, length, dtype=torch.bool).tril()
    return nn.functional.avg_pool2d(effect.double(), block) * block * block


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_signed_influence_matches_the_official_profiler(dtype):
    """Issue 13: with absolute=False the A = 1 entries (first causal row) had the sign flipped
    and the denominator had no eps; both now follow the official profiler."""
    torch.manual_seed(7)
    causal = torch.ones(8, 8).tril().bool()
    scores = torch.randn(3, 2, 8, 8, dtype=dtype) * 3
    a = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1).requires_grad_()
    ((a * torch.randn(3, 2, 8, 8, dtype=dtype)).sum() + (a**2).sum()).backward()
    # The official math in float64 (headwise computes in float64), delta of the input dtype.
    delta = torch.finfo(dtype).eps
    expected = _official_effect(a.detach().double(), a.grad.double(), 2, delta).mean(0)
    got = attention_influence(a, a.grad, block=2, absolute=False)
    torch.testing.assert_close(got, expected)
    assert (got[:, 0, 0] != 0).all()  # the first row's own tile is the sign-sensitive one


def test_profile_influence_records_each_layer():
    torch.manual_seed(0)
    model = nn.Sequential(
        MultiHeadAttention(16, 2, causal=True), MultiHeadAttention(16, 2, causal=True)
    ).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    target = torch.randn(2, 12, 16, dtype=torch.float64)
    tiles = profile_influence(model, lambda m: (m(x) - target).square().mean(), block=4)
    assert [t.shape for t in tiles] == [(2, 3, 3)] * 2
    assert all((t >= 0).all() and (t.triu(1) == 0).all() for t in tiles)
    assert not any(point.is_hooked for _, point in hook_points(model))  # recording is gone
    assert all(p.grad is None for p in model.parameters())
    # Explicit recomputation for the last layer: A from its q, k; G from autograd.
    last = model[1]
    h1 = model[0](x)
    q = last.q_proj(h1).view(2, 12, 2, 8).transpose(1, 2)
    k = last.k_proj(h1).view(2, 12, 2, 8).transpose(1, 2)
    v = last.v_proj(h1).view(2, 12, 2, 8).transpose(1, 2)
    causal = torch.ones(12, 12).tril().bool()
    a = torch.softmax((q @ k.mT / math.sqrt(8)).masked_fill(~causal, float("-inf")), -1)
    y = last.out_proj((a @ v).transpose(1, 2).flatten(-2))
    (g,) = torch.autograd.grad((y - target).square().mean(), a)
    torch.testing.assert_close(tiles[1], attention_influence(a, g, block=4))


def test_candidate_grid():
    grid = candidate_grid(16, alpha_step=8, num_betas=3)
    assert grid == [(8.0, 0.0), (16.0, 0.0), (0.0, 0.5), (8.0, 0.5), (-8.0, 1.0), (0.0, 1.0)]


def test_search_is_optimal_under_the_budget():
    torch.manual_seed(0)
    length, block = 32, 4
    influence = [torch.rand(2, 8, 8, dtype=torch.float64).tril() for _ in range(2)]
    candidates = [(8.0, 0.0), (0.0, 0.5), (16.0, 0.0), (math.inf, 0.0), (4.0, 0.25)]
    budget = 0.55
    plan = search_plan(influence, length, budget, candidates=candidates, **RULE)
    assert plan.alphas.__len__() == 2 and len(plan.alphas[0]) == 2

    flat = [tiles for layer in influence for tiles in layer]
    cost = {}  # (candidate, head) -> (dropped influence, kept key blocks of the widest row)
    for c, (alpha, beta) in enumerate(candidates):
        sink, local = moa_cache_size(alpha, beta, length, **RULE)
        kept = _explicit_prefill(sink // block, local // block, 1, 8)  # on block indices
        for h, tiles in enumerate(flat):
            cost[c, h] = float(tiles[~kept].sum()), int(kept.sum(-1).max())
    best = math.inf
    for combo in itertools.product(range(len(candidates)), repeat=4):
        costs = [cost[c, h] for h, c in enumerate(combo)]
        if sum(w for _, w in costs) / (4 * 8) <= budget:
            best = min(best, sum(loss for loss, _ in costs))
    picks = [(a, b) for la, lb in zip(plan.alphas, plan.betas) for a, b in zip(la, lb)]
    chosen = [cost[candidates.index(pick), h] for h, pick in enumerate(picks)]
    assert sum(w for _, w in chosen) / 32 <= budget
    assert sum(loss for loss, _ in chosen) == pytest.approx(best)


def test_profile_search_apply_end_to_end():
    torch.manual_seed(0)
    model = nn.Sequential(MultiHeadAttention(16, 2, causal=True)).double()
    x = torch.randn(1, 32, 16, dtype=torch.float64)
    tiles = profile_influence(model, lambda m: m(x).square().mean(), block=4)
    plan = search_plan(tiles, 32, 0.5, candidates=candidate_grid(32, alpha_step=8), **RULE)
    plan.apply(model[0])
    assert model[0](x).shape == (1, 32, 16)
    kept_blocks = [
        int((span.block_layout(32, 32, 4)[0] != 0).sum(-1).max()) for span in plan.spans(0, 32)
    ]
    assert sum(kept_blocks) / (2 * 8) <= 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha must be"):
        moa_cache_size(float("nan"), 0.0, 10)
    with pytest.raises(ValueError, match="sink_size must be a multiple"):
        MoASpan(0.0, 0.5, block=64, sink_size=32)
    with pytest.raises(ValueError, match="same shape"):
        MoAPlan(((1.0, 2.0),), ((0.5,),))
    with pytest.raises(ValueError, match=r"influence\[0\] must be \(H, 8, 8\)"):
        search_plan([torch.zeros(2, 4, 4)], 32, 0.5, **RULE)
    with pytest.raises(ValueError, match="budget"):
        search_plan([torch.zeros(2, 8, 8)], 32, 0.01, candidates=[(8.0, 0.0)], **RULE)
    with pytest.raises(ValueError, match="MoAAttention sets pattern"):
        MoAAttention(16, 2, alphas=[0, 0], betas=[1, 1], pattern=patterns.causal())
    with pytest.raises(ValueError, match="probs and grad"):
        attention_influence(torch.zeros(2, 3, 3), torch.zeros(2, 3, 3))


@pytest.mark.parametrize(
    "name", ["attention_influence", "candidate_grid", "profile_influence", "search_plan"]
)
def test_tooling_moved_to_headwise_moa_with_a_deprecated_alias(name):
    import headwise.layers.moa as old
    import headwise.moa as new

    with pytest.warns(DeprecationWarning, match=f"headwise.moa.{name}"):
        assert getattr(old, name) is getattr(new, name)
