import math

import pytest
import torch
import torch.nn.functional as F

import headwise.patterns as P
from headwise.layers.multihead import KVCache, MultiHeadAttention, apply_rotary
from headwise.patterns import per_head, sinks, sliding_window

E, H = 16, 4


def _rope_complex(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE written independently: channels (i, i + D/2) as one complex number times e^{i theta}."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    theta = positions.double()[:, None] * base ** (-2 * torch.arange(half).double() / (2 * half))
    z = z * torch.polar(torch.ones_like(theta), theta)[:, None, :]
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def _window_mask(q_len: int, kv_len: int, left: int | None) -> torch.Tensor:
    """Bottom-right aligned causal mask, optionally limited to the ``left`` previous keys."""
    pos = torch.arange(q_len)[:, None] + kv_len - q_len
    j = torch.arange(kv_len)[None, :]
    allowed = j <= pos
    return allowed if left is None else allowed & (j >= pos - left)


def _norm(norm: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    """qk-norm by hand over each head's D channels: RMSNorm, LayerNorm, or none."""
    if isinstance(norm, torch.nn.RMSNorm):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    if isinstance(norm, torch.nn.LayerNorm):
        centred = t - t.mean(-1, keepdim=True)
        scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-6)
        return centred * scale * norm.weight + norm.bias
    return t


def _perturb_norms(mha: MultiHeadAttention) -> None:
    """Move qk-norm parameters off their identity init, so the reference checks their use."""
    with torch.no_grad():
        for name, param in mha.named_parameters():
            if "norm" in name:
                param.add_(0.5 * torch.randn_like(param))


def _reference(mha: MultiHeadAttention, x, context=None, mask=None):
    """Explicit projections, qk-norm, RoPE, repeated KV heads and a softmax over all keys."""
    c = x if context is None else context
    (b, lq, _), lk = x.shape, c.shape[1]
    d, h_kv = mha.head_dim, mha.num_kv_heads
    q = mha.q_proj(x).view(b, lq, H, d)
    k = mha.k_proj(c).view(b, lk, h_kv, d)
    v = mha.v_proj(c).view(b, lk, h_kv, d)
    q, k = _norm(mha.q_norm, q), _norm(mha.k_norm, k)
    if mha.rotary:
        positions = torch.arange(lq)
        q = _rope_complex(q, positions, mha.rope_base)
        k = _rope_complex(k, positions, mha.rope_base)
    k = k.repeat_interleave(H // h_kv, dim=2)
    v = v.repeat_interleave(H // h_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    return mha.out_proj(out.reshape(b, lq, H * d))


REFERENCE_CASES = {
    "plain": ({}, None),
    "gqa": ({"num_kv_heads": 2}, None),
    "mqa-causal": ({"num_kv_heads": 1, "causal": True}, -1),
    "causal": ({"causal": True}, -1),
    "window": ({"pattern": sliding_window(2)}, 2),
    "head_dim": ({"head_dim": 6, "bias": False}, None),
    "rms-rotary": ({"qk_norm": "rms", "rotary": True, "causal": True}, -1),
    "layer-rotary-gqa": ({"qk_norm": "layer", "rotary": True, "num_kv_heads": 2}, None),
}


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_matches_reference(case):
    kwargs, window = REFERENCE_CASES[case]
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, **kwargs)
    _perturb_norms(mha)
    x = torch.randn(2, 7, E)
    mask = None if window is None else _window_mask(7, 7, None if window < 0 else window)
    torch.testing.assert_close(mha(x), _reference(mha, x, mask=mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cross_attention_matches_reference(kv_heads):
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, num_kv_heads=kv_heads, kv_dim=10, qk_norm="rms")
    _perturb_norms(mha)
    x, context = torch.randn(2, 5, E), torch.randn(2, 9, 10)
    torch.testing.assert_close(mha(x, context), _reference(mha, x, context), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["self", "causal", "cross"])
def test_matches_torch_multihead_attention(mode):
    torch.manual_seed(0)
    kv_dim = 10 if mode == "cross" else E
    mha = MultiHeadAttention(E, H, kv_dim=kv_dim, causal=mode == "causal")
    ours = (mha.q_proj, mha.k_proj, mha.v_proj)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True, kdim=kv_dim, vdim=kv_dim)
    with torch.no_grad():
        if mode == "cross":
            for name, proj in zip(("q", "k", "v"), ours):
                getattr(theirs, f"{name}_proj_weight").copy_(proj.weight)
        else:
            theirs.in_proj_weight.copy_(torch.cat([p.weight for p in ours]))
        theirs.in_proj_bias.copy_(torch.cat([p.bias for p in ours]))
        theirs.out_proj.weight.copy_(mha.out_proj.weight)
        theirs.out_proj.bias.copy_(mha.out_proj.bias)
    x = torch.randn(3, 6, E)
    c = torch.randn(3, 8, kv_dim) if mode == "cross" else x
    # torch's boolean attn_mask marks the pairs that may NOT attend.
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1) if mode == "causal" else None
    expected, _ = theirs(x, c, c, attn_mask=mask, need_weights=False)
    got = mha(x, c) if mode == "cross" else mha(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


DECODE_CASES = {
    "causal": {"causal": True},
    "window": {"pattern": sliding_window(2)},
    "gqa": {"causal": True, "num_kv_heads": 2},
    "mqa-rotary": {"causal": True, "num_kv_heads": 1, "rotary": True},
    "rms-rotary": {"causal": True, "qk_norm": "rms", "rotary": True},
    "sinks-window-layer-rotary-gqa": {
        "pattern": sliding_window(2) | sinks(1),
        "qk_norm": "layer",
        "rotary": True,
        "num_kv_heads": 2,
    },
}


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_kv_cache_decode_matches_full_forward(case, chunk):
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, **DECODE_CASES[case])
    x = torch.randn(2, 7, E)
    cache = mha.new_cache(2, 8)
    with torch.no_grad():
        full = mha(x)
        steps = [mha(x[:, i : i + chunk], cache=cache) for i in range(0, 7, chunk)]
    assert cache.length == 7
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_reset_reuses_buffers():
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, causal=True, rotary=True)
    x = torch.randn(1, 4, E)
    cache = mha.new_cache(1, 4)
    with torch.no_grad():
        first = mha(x, cache=cache)
        cache.reset()
        again = mha(x, cache=cache)
    torch.testing.assert_close(first, again)


PACKED_CASES = {
    "full": {},
    "causal-rotary-gqa": {"causal": True, "rotary": True, "num_kv_heads": 2},
    "window-rms-rotary": {"pattern": sliding_window(2), "qk_norm": "rms", "rotary": True},
}


@pytest.mark.parametrize("case", PACKED_CASES)
def test_packed_matches_per_sequence_calls(case):
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, **PACKED_CASES[case])
    lengths = [4, 1, 0, 6]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(sum(lengths), E)
    out = mha(x, cu_seqlens=cu)
    assert out.shape == x.shape
    for start, stop in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if stop > start:
            expected = mha(x[None, start:stop])[0]
            torch.testing.assert_close(out[start:stop], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_matches_padded_batch_with_key_padding_bias(causal):
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, causal=causal, rotary=True, num_kv_heads=2)
    lengths = torch.tensor([5, 1, 3])
    real = torch.arange(5)[None, :] < lengths[:, None]
    padded = torch.randn(3, 5, E)
    bias = torch.zeros(3, 1, 1, 5).masked_fill(~real[:, None, None, :], float("-inf"))
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    packed = mha(padded[real], cu_seqlens=cu)
    torch.testing.assert_close(packed, mha(padded, bias=bias)[real], atol=1e-5, rtol=1e-5)


def test_rotary_matches_complex_rotation_and_is_relative():
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 3, 8, dtype=torch.float64).unbind(0)
    positions = torch.arange(6)
    rotated = apply_rotary(q, positions, 500.0)
    torch.testing.assert_close(rotated, _rope_complex(q, positions, 500.0))
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1))

    def scores(shift):
        p = positions + shift
        return torch.einsum("qhd,khd->hqk", apply_rotary(q, p), apply_rotary(k, p))

    for shift in (3, 1000, -7):
        torch.testing.assert_close(scores(shift), scores(0))
    assert not torch.allclose(scores(0), torch.einsum("qhd,khd->hqk", q, k))


def test_causal_shortcut_equals_causal_pattern_and_backend_passes_through():
    torch.manual_seed(0)
    x = torch.randn(2, 6, E)
    shortcut = MultiHeadAttention(E, H, causal=True)
    by_pattern = MultiHeadAttention(E, H, pattern=sliding_window(None), backend="reference")
    by_pattern.load_state_dict(shortcut.state_dict())
    torch.testing.assert_close(shortcut(x), by_pattern(x), atol=1e-5, rtol=1e-5)
    windowed = MultiHeadAttention(E, H, pattern=sliding_window(2), backend="sdpa")
    with pytest.raises(ValueError, match="backend='sdpa' cannot serve"):
        windowed(x)


@pytest.mark.parametrize(
    "kwargs, cross, packed",
    [
        # Rotary or qk-norm so that key biases matter: a bias shared by all keys of a query
        # shifts its scores uniformly and would get an exactly zero gradient through softmax.
        ({"qk_norm": "layer", "rotary": True, "num_kv_heads": 2, "causal": True}, False, False),
        ({"qk_norm": "rms", "kv_dim": 10}, True, False),
        ({"qk_norm": "rms", "rotary": True, "causal": True}, False, True),
    ],
)
def test_gradients_reach_every_parameter(kwargs, cross, packed):
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, **kwargs)
    if packed:
        y = mha(torch.randn(7, E), cu_seqlens=torch.tensor([0, 3, 4, 7]))
    else:
        x = torch.randn(2, 5, E)
        y = mha(x, torch.randn(2, 6, 10)) if cross else mha(x)
    (y * torch.randn_like(y)).sum().backward()
    for name, param in mha.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def _layer(**kwargs):
    return MultiHeadAttention(E, H, **kwargs)


def _call(x, layer=None, **kwargs):
    return lambda: _layer(**(layer or {}))(x, **kwargs)


BAD_INPUTS = [
    (
        lambda: MultiHeadAttention(16, 3),
        r"num_heads must divide embed_dim.*embed_dim=16, num_heads=3",
    ),
    (lambda: MultiHeadAttention(16, 0), r"num_heads must be an integer >= 1; got 0"),
    (lambda: _layer(num_kv_heads=3), r"num_kv_heads must divide num_heads.*=4.*=3"),
    (lambda: _layer(qk_norm="batch"), r"qk_norm must be one of \(None, 'rms', .*got 'batch'"),
    (lambda: _layer(rotary=True, head_dim=5), r"rotary needs an even head_dim; got head_dim=5"),
    (lambda: _layer(pattern="causal"), r"pattern must be a headwise Pattern; got str"),
    (lambda: _layer(pattern=per_head([sliding_window(1)] * 2)), r"per-head for 2 heads.*=4"),
    (_call(torch.randn(5, E)), r"x must be \(B, L, E=16\); got \(5, 16\); packed .* cu_seqlens"),
    (_call(torch.randn(2, 5, 8)), r"x must be \(B, L, E=16\); got \(2, 5, 8\)"),
    (_call(torch.randn(2, 5, E), context=torch.randn(2, 3, 8)), r"context must be .*\(2, 3, 8\)"),
    (_call(torch.randn(2, 5, E), context=torch.randn(3, 3, E)), r"context must be \(B=2.*\(3, 3"),
    (
        _call(torch.randn(2, 5, E), cu_seqlens=torch.tensor([0, 5])),
        r"with cu_seqlens, x must be packed \(T, E=16\); got \(2, 5, 16\)",
    ),
    (_call(torch.randn(5, E), cu_seqlens=torch.tensor([0, 4])), r"cu_seqlens must .* end at T=5"),
    (
        _call(torch.randn(5, E), cu_seqlens=torch.tensor([0, 5]), context=torch.randn(5, E)),
        r"takes no context",
    ),
    (
        _call(torch.randn(2, 5, E), layer={"rotary": True}, context=torch.randn(2, 3, E)),
        r"rotary .* self-attention only",
    ),
    (_call(torch.randn(2, 5, E), cache=KVCache(3, 8, H, 4)), r"KVCache for batch B=2; got batch 3"),
    (_call(torch.randn(2, 5, E), cache=KVCache(2, 4, H, 4)), r"max_len=4.*0 cached \+ 5 new = 5"),
    (_call(torch.randn(2, 5, E), cache=KVCache(2, 8, 2, 4)), r"k must be \(B, L_new, H_kv, D\)"),
    (
        _call(torch.randn(2, 5, E), cache=KVCache(2, 8, H, 4, dtype=torch.float64)),
        r"k must match the cache's torch.float64",
    ),
    (lambda: KVCache(0, 8, H, 4), r"batch must be an integer >= 1; got 0"),
]


@pytest.mark.parametrize("make, match", BAD_INPUTS)
def test_bad_inputs_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_effective_pattern_follows_assignments():
    # built once per assignment of pattern or causal (the constructor builds the first): the
    # same object while nothing changes, a new one after a swap
    window = P.sliding_window(3)
    layer = MultiHeadAttention(8, 2, causal=True)
    first = layer.effective_pattern()
    assert first == P.causal() and layer.effective_pattern() is first
    layer.pattern = window
    assert layer.effective_pattern() == window & P.causal()
    layer.causal = False
    assert layer.effective_pattern() is window
    layer.causal = True
    assert layer.effective_pattern() == window & P.causal()
    layer.pattern = None
    assert layer.effective_pattern() == P.causal()
