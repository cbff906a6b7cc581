"""Hook points of the sequence attention layers: each one read and patched against the layer's
computation written out (projections, qk-norm, rotary, scores, softmax, heads, output)."""

from __future__ import annotations

import math

import pytest
import torch

from headwise import patterns
from headwise.hooks import HookPoint, hook_points
from headwise.layers import (
    CrossAttention,
    MoAAttention,
    MoHAttention,
    MultiHeadAttention,
    apply_rotary,
)

B, L, E, H, H_KV, D = 2, 7, 16, 4, 2, 4
POINTS = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_pattern", "hook_z", "hook_result")


def _layer() -> MultiHeadAttention:
    torch.manual_seed(0)
    return MultiHeadAttention(
        E, H, num_kv_heads=H_KV, qk_norm="rms", rotary=True, pattern=patterns.sliding_window(3),
        causal=True,
    ).double()  # fmt: skip


def _explicit(layer, x, **patch) -> dict[str, torch.Tensor]:
    """Every activation of ``layer(x)`` computed by hand; ``patch[name]`` replaces one."""
    acts = {}

    def keep(name, value):
        acts[name] = patch[name](value) if name in patch else value
        return acts[name]

    q = keep("hook_q", layer.q_norm(layer.q_proj(x).view(B, L, H, D)))
    k = keep("hook_k", layer.k_norm(layer.k_proj(x).view(B, L, H_KV, D)))
    v = keep("hook_v", layer.v_proj(x).view(B, L, H_KV, D))
    q, k = apply_rotary(q, torch.arange(L)), apply_rotary(k, torch.arange(L))
    k, v = k.repeat_interleave(H // H_KV, 2), v.repeat_interleave(H // H_KV, 2)
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    visible = (j <= i) & (i - j <= 3)  # sliding_window(3): itself and 3 previous keys
    scores = (q.transpose(1, 2) @ k.transpose(1, 2).mT) / math.sqrt(D)
    scores = keep("hook_scores", scores.masked_fill(~visible, float("-inf")))
    probs = keep("hook_pattern", torch.softmax(scores, -1))
    z = keep("hook_z", (probs @ v.transpose(1, 2)).transpose(1, 2))
    keep("hook_result", layer.out_proj(z.flatten(-2)))
    return acts


def _run(layer, x, name, fn, **kwargs):
    seen = []

    def hook(point, args, out):
        seen.append(out)
        return fn(out)

    handle = getattr(layer, name).register_forward_hook(hook)
    try:
        y = layer(x, **kwargs)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0], y


def test_every_layer_of_the_family_has_the_points():
    layer = _layer()
    assert [n for n, _ in hook_points(layer)] == list(POINTS)
    assert all(isinstance(getattr(layer, n), HookPoint) for n in POINTS)
    assert not any(n.startswith("hook_") for n in layer.state_dict())


def test_is_hooked_counts_forward_hooks_and_pre_hooks_of_the_point():
    point = HookPoint()
    assert not point.is_hooked
    handle = point.register_forward_hook(lambda module, args, out: None)
    assert point.is_hooked
    handle.remove()
    assert not point.is_hooked
    handle = point.register_forward_pre_hook(lambda module, args: None)
    assert point.is_hooked
    handle.remove()
    point.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    assert not point.is_hooked  # a backward hook does not read the forward activation


@pytest.mark.parametrize("name", POINTS)
def test_read_equals_the_explicit_activation_and_leaves_the_output(name):
    layer = _layer()
    x = torch.randn(B, L, E, dtype=torch.float64)
    before = layer(x)
    seen, y = _run(layer, x, name, lambda out: None)
    torch.testing.assert_close(seen, _explicit(layer, x)[name])
    assert torch.equal(y, before)  # reading does not change a bit of the output


_PATCHES = {
    "hook_q": lambda t: t * 2.0,
    "hook_k": lambda t: t.flip(1),
    "hook_v": lambda t: t.square(),
    "hook_scores": lambda t: t * 0.5,
    # uniform attention over the visible keys
    "hook_pattern": lambda t: (t > 0).to(t.dtype) / (t > 0).sum(-1, keepdim=True),
    "hook_z": lambda t: -t,
    "hook_result": lambda t: t + 1.0,
}


@pytest.mark.parametrize("name", POINTS)
def test_patching_changes_the_output_as_the_explicit_computation(name):
    layer = _layer()
    x = torch.randn(B, L, E, dtype=torch.float64)
    patch = _PATCHES[name]
    _, y = _run(layer, x, name, patch)
    expected = _explicit(layer, x, **{name: patch})["hook_result"]
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, layer(x))


def test_patched_pattern_carries_gradients():
    layer = _layer()
    x = torch.randn(B, L, E, dtype=torch.float64)
    kept = []

    def hook(point, args, probs):
        kept.append(probs.view_as(probs))
        return kept[-1]

    handle = layer.hook_pattern.register_forward_hook(hook)
    y = layer(x)
    handle.remove()
    (grad,) = torch.autograd.grad(y.sum(), kept)
    v = layer.v_proj(x).view(B, L, H_KV, D).repeat_interleave(H // H_KV, 2)
    # d sum(y) / dA = (1^T W_o)_h . v_j per head
    w = layer.out_proj.weight.sum(0).view(H, D)
    expected = torch.einsum("hd,bjhd->bhj", w, v)[:, :, None, :].expand(B, H, L, L)
    torch.testing.assert_close(grad, expected)


def test_scores_hook_sees_the_cached_keys():
    layer = _layer().eval()
    x = torch.randn(B, L, E, dtype=torch.float64)
    cache = layer.new_cache(B, L)
    with torch.no_grad():
        layer(x[:, :5], cache=cache)
        seen, _ = _run(layer, x[:, 5:6], "hook_scores", lambda out: None, cache=cache)
    assert seen.shape == (B, H, 1, 6)
    torch.testing.assert_close(seen, _explicit(layer, x)["hook_scores"][:, :, 5:6, :6])


def test_packed_input_refuses_the_score_points():
    layer = _layer()
    packed, cu = torch.randn(L, E, dtype=torch.float64), torch.tensor([0, 3, L])
    handle = layer.hook_pattern.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="packed input"):
        layer(packed, cu_seqlens=cu)
    handle.remove()
    seen = []
    layer.hook_z.register_forward_hook(lambda point, args, out: seen.append(out))
    layer(packed, cu_seqlens=cu)
    assert [tuple(z.shape) for z in seen] == [(L, H, D)]


def test_moh_z_is_before_the_gates():
    torch.manual_seed(0)
    moh = MoHAttention(E, H, num_shared=1, top_k=1).double()
    x = torch.randn(B, L, E, dtype=torch.float64)
    seen, out = _run(moh, x, "hook_z", lambda z: None)
    expected = moh.out_proj((seen * out.gates[..., None]).flatten(-2))
    torch.testing.assert_close(out.output, expected)


def test_moa_decode_passes_each_token_through_the_pattern_point():
    torch.manual_seed(0)
    rule = {"block": 4, "sink_size": 4, "min_cache": 8, "max_new_tokens": 0}
    layer = MoAAttention(E, H, alphas=[4.0] * H, betas=[0.0] * H, **rule).double().eval()
    x = torch.randn(B, 12, E, dtype=torch.float64)
    cache = layer.new_cache(B, 12)
    seen = []
    layer.hook_pattern.register_forward_hook(lambda point, args, out: seen.append(out))
    with torch.no_grad():
        layer(x[:, :9], cache=cache)
        layer(x[:, 9:], cache=cache)
    assert [tuple(p.shape) for p in seen] == [(B, H, 9, 9)] + [(B, H, 1, 8)] * 3
    assert all(torch.allclose(p.sum(-1), torch.ones((), dtype=p.dtype)) for p in seen)


def test_cross_attention_scores_carry_the_padding_mask():
    torch.manual_seed(0)
    layer = CrossAttention(E, H, kv_dim=8).double()
    x, c = torch.randn(B, 3, E, dtype=torch.float64), torch.randn(B, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, False, True, False]])
    seen, _ = _run(layer, x, "hook_scores", lambda out: None, context=c, context_mask=mask)
    q = layer.q_proj(x).view(B, 3, H, D).transpose(1, 2)
    k = layer.k_proj(c).view(B, 5, H, D).transpose(1, 2)
    expected = (q @ k.mT / math.sqrt(D)).masked_fill(~mask[:, None, None], float("-inf"))
    torch.testing.assert_close(seen, expected)
    _, y = _run(layer, x, "hook_pattern", torch.zeros_like, context=c, context_mask=mask)
    torch.testing.assert_close(y, layer.out_proj.bias.expand(B, 3, E))
