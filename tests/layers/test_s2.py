"""S2Attention: dkernel's local-stride rule, shard union, per-head density, KV-cache predicate."""

from __future__ import annotations

import pytest
import torch

from headwise import patterns
from headwise.layers.s2 import S2Attention, S2Pattern, is_kv_cache_efficient


def _pattern(heads=4, kv_heads=None, block=2, n_local=2, v=4, **kw) -> S2Pattern:
    kv_heads = heads if kv_heads is None else kv_heads
    step = kw.pop("head_step", max(1, v // heads))
    return S2Pattern(heads, kv_heads, block, n_local, v, step, **kw)


def _explicit(heads, kv_heads, block, n_local, v, step, offset, dense, length):
    """dkernel's block mask, expanded to tokens, intersected with the token causal mask."""
    n = -(-length // block)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    masks = []
    for h in range(heads):
        g = h // (heads // kv_heads)
        if g >= kv_heads - dense:
            blocks = j <= i
        else:
            blocks = (j <= i) & ((i - j < n_local) | ((j + g * step + offset) % v == 0))
        tokens = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
        masks.append(tokens[:length, :length] & torch.ones(length, length).tril().bool())
    return torch.stack(masks)


@pytest.mark.parametrize(
    "heads, kv_heads, offset, dense, length",
    [(4, 4, 0, 0, 16), (8, 2, 1, 0, 15), (4, 2, 0, 1, 13), (6, 6, 3, 2, 24)],
)
def test_pattern_is_the_explicit_block_rule(heads, kv_heads, offset, dense, length):
    p = _pattern(
        heads, kv_heads, block=2, n_local=2, v=4, head_offset=offset, num_dense_heads=dense
    )
    expected = _explicit(heads, kv_heads, 2, 2, 4, p.head_step, offset, dense, length)
    assert torch.equal(p.dense_mask(length, length), expected)
    # Bottom-right alignment: a suffix of queries sees what those rows see in the full mask.
    assert torch.equal(p.dense_mask(3, length), expected[:, -3:])


def test_union_covers_every_key_only_with_enough_heads():
    causal = torch.ones(32, 32).tril().bool()
    enough = _pattern(heads=4, v=4, block=2, n_local=1)
    assert enough.head_step == 1
    assert torch.equal(enough.dense_mask(32, 32).any(0), causal)
    few = _pattern(heads=2, v=4, block=2, n_local=1)  # residues {0, 2}: blocks 1, 3 mod 4 lost
    assert few.head_step == 2
    union = few.dense_mask(32, 32).any(0)
    assert not torch.equal(union, causal)
    missed_blocks = {int(j) // 2 % 4 for j in torch.nonzero(causal & ~union)[:, 1]}
    assert missed_blocks == {1, 3}


@pytest.mark.parametrize("heads, v, n_local, offset", [(4, 4, 2, 0), (2, 4, 1, 1), (3, 5, 3, 2)])
def test_each_head_density_is_as_specified(heads, v, n_local, offset):
    block, n_blocks = 4, 9
    length = block * n_blocks
    p = _pattern(heads, block=block, n_local=n_local, v=v, head_offset=offset)
    got = p.dense_mask(length, length).sum((1, 2))
    for h in range(heads):
        # Query block i keeps min(i + 1, n_local) local blocks and the older stripe blocks; every
        # kept block is full (b^2 pairs) except the diagonal one (b (b + 1) / 2).
        pairs = 0
        for i in range(n_blocks):
            older = sum((j + h * p.head_step + offset) % v == 0 for j in range(i - n_local + 1))
            kept = min(i + 1, n_local) + older
            pairs += (kept - 1) * block * block + block * (block + 1) // 2
        assert int(got[h]) == pairs
    assert p.density(length, length) == pytest.approx(float(got.sum()) / (heads * length**2))


@pytest.mark.parametrize("kw", [{"v": 1}, {"n_local": 8}, {"num_dense_heads": 4}])
def test_reduces_to_dense_causal(kw):
    p = _pattern(heads=4, block=2, **{"n_local": 2, "v": 4, **kw})
    causal = torch.ones(15, 15).tril().bool().expand(4, -1, -1)
    assert torch.equal(p.dense_mask(15, 15), causal)


def test_kv_cache_fraction_and_efficiency():
    p = _pattern(heads=4, block=2, n_local=2, v=4)
    # Last query (block 7): its 2 local blocks + the stripe blocks of blocks 0..5.
    assert p.kv_cache_fraction(16).tolist() == [0.5, 0.375, 0.375, 0.5]
    assert is_kv_cache_efficient(p.block_layout(64, 64, 2))
    assert is_kv_cache_efficient(p.dense_mask(64, 64))  # token granularity too
    # Relative stripes ((i - j) mod v, as the bidirectional rule) revisit dropped blocks.
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    relative = (j <= i) & ((i - j < 2) | ((i - j) % 4 == 0))
    assert not is_kv_cache_efficient(relative)
    assert is_kv_cache_efficient(patterns.sliding_window(5).block_layout(32, 32, 4))
    with pytest.raises(ValueError, match="layout must be"):
        is_kv_cache_efficient(torch.ones(2, 2, 2, 2))


def test_bidirectional_relative_stripes():
    p = _pattern(heads=2, block=1, n_local=2, v=3, causal=False, n_right=2, head_step=1)
    mask = p.dense_mask(12, 12)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    d = (i - j - 1).clamp_min(0) + (j - i - 1).clamp_min(0)
    assert torch.equal(mask[0], (d == 0) | (d % 3 == 0))
    assert torch.equal(mask[1], (d == 0) | ((d + 1) % 3 == 0))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_layer_backends_agree_forward_and_backward(kv_heads):
    torch.manual_seed(0)
    layer = S2Attention(32, 4, num_kv_heads=kv_heads, block_size=4, local_blocks=2, vert_stride=4)
    layer = layer.double()
    x = torch.randn(2, 21, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    layer.backend = "reference"
    y_ref = layer(x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_layer_decode_matches_full_forward():
    torch.manual_seed(0)
    layer = S2Attention(16, 2, block_size=2, local_blocks=1, vert_stride=2).double().eval()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache(1, 9)
    with torch.no_grad():
        steps = torch.cat([layer(x[:, t : t + 1], cache=cache) for t in range(9)], 1)
    torch.testing.assert_close(steps, full)


def test_bad_arguments():
    with pytest.raises(ValueError, match="vert_stride"):
        S2Attention(16, 2, vert_stride=0)
    with pytest.raises(ValueError, match="num_dense_heads"):
        S2Attention(16, 2, num_dense_heads=3)
    with pytest.raises(ValueError, match="S2Attention sets pattern"):
        S2Attention(16, 2, pattern=patterns.causal())
    with pytest.raises(ValueError, match="num_kv_heads must divide"):
        _pattern(heads=4, kv_heads=3)
