"""Attention dropout in the layers (issue 16): every registered layer that takes ``dropout`` is
exactly its dropout-free self in ``eval()``, drops in training mode (reproducibly under
``torch.manual_seed``), refuses bad rates, and applies the core's definition."""

from __future__ import annotations

import pytest
import torch

from headwise.layers import MultiHeadAttention
from headwise.layers.registry import layer_spec, list_layers
from headwise.ops.attention.dropout import draw_seed, keep_mask

DROPPING = [name for name in list_layers() if layer_spec(name).has_dropout]


def _pair(name: str, p: float):
    """The layer with dropout ``p`` (weights perturbed off the init) and the same layer (same
    weights) without dropout."""
    spec = layer_spec(name)
    torch.manual_seed(0)
    dropping = spec.build(dropout=p)
    with torch.no_grad():  # off the init: some layers start as the identity (zero output BN)
        for parameter in dropping.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    plain = spec.build()
    plain.load_state_dict(dropping.state_dict())
    return spec, dropping, plain


def _output(spec, layer, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return spec.output(layer(**spec.example_inputs(batch=2)))


def test_the_listed_layers_take_dropout():
    assert {
        "multihead", "moh", "moa", "s2", "cross", "conditional_cross", "global_local_cross",
        "pairwise_cross", "selective", "combiner", "relative_conv", "neighborhood",
        "neighborhood_1d", "neighborhood_3d", "agent", "agent_2d", "window", "multi_axis", "hilo",
        "halo", "single_head",
    } <= set(DROPPING)  # fmt: skip


@pytest.mark.parametrize("name", DROPPING)
def test_eval_is_exactly_the_layer_without_dropout(name):
    spec, dropping, plain = _pair(name, 0.5)
    dropping.eval(), plain.eval()
    assert torch.equal(_output(spec, dropping), _output(spec, plain))


@pytest.mark.parametrize("name", DROPPING)
def test_training_drops_reproducibly(name):
    spec, dropping, plain = _pair(name, 0.5)
    dropping.train(), plain.train()
    out = _output(spec, dropping)
    assert not torch.allclose(out, _output(spec, plain))
    assert torch.equal(out, _output(spec, dropping))
    assert not torch.equal(out, _output(spec, dropping, seed=1))
    out.square().sum().backward()
    grads = [p.grad for p in dropping.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["multihead", "selective", "agent", "neighborhood", "hilo"])
@pytest.mark.parametrize(
    ("value", "error"), [(1.0, ValueError), (-0.1, ValueError), ("x", TypeError)]
)
def test_bad_rates_are_refused(name, value, error):
    with pytest.raises(error, match="dropout"):
        layer_spec(name).build(dropout=value)


def _explicit(layer, x, seed, p):
    """MultiHeadAttention's causal forward written out with the keep mask of ``seed``."""
    batch, length, _ = x.shape
    q, k, v = (
        proj(x).view(batch, length, layer.num_heads, layer.head_dim).transpose(1, 2)
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj)
    )
    scores = q @ k.transpose(-1, -2) * layer.head_dim**-0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    keep = keep_mask(seed, p, batch, layer.num_heads, length, length)
    z = (probs * keep / (1 - p)) @ v
    return layer.out_proj(z.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_multihead_applies_the_cores_definition(backend):
    """In training the layer's mask is keep_mask with the seed drawn from torch's generator."""
    p = 0.3
    layer = MultiHeadAttention(16, 4, causal=True, dropout=p, backend=backend).train()
    x = torch.randn(2, 9, 16)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    want = _explicit(layer, x, draw_seed(), p)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), list(layer.parameters()))
    wants = torch.autograd.grad(want.sum(), list(layer.parameters()))
    for got, expected in zip(grads, wants):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_packed_input_drops_in_training_only():
    layer = MultiHeadAttention(16, 4, causal=True, dropout=0.5)
    x, cu = torch.randn(9, 16), torch.tensor([0, 4, 9])
    torch.manual_seed(0)
    trained = layer(x, cu_seqlens=cu)
    layer.eval()
    evaluated = layer(x, cu_seqlens=cu)
    plain = MultiHeadAttention(16, 4, causal=True)
    plain.load_state_dict(layer.state_dict())
    assert torch.equal(evaluated, plain.eval()(x, cu_seqlens=cu))
    assert not torch.allclose(trained, evaluated)


def test_a_patched_pattern_takes_the_same_dropout():
    """A hook that replaces the probabilities by an equal tensor: the explicit path drops them
    with the mask the core would have used (the same seed from torch's generator)."""
    layer = MultiHeadAttention(16, 4, causal=True, dropout=0.4, backend="reference").train()
    x = torch.randn(2, 7, 16)
    torch.manual_seed(3)
    plain = layer(x)
    handle = layer.hook_pattern.register_forward_hook(lambda point, args, out: out.clone())
    try:
        torch.manual_seed(3)
        patched = layer(x)
    finally:
        handle.remove()
    torch.testing.assert_close(patched, plain, atol=1e-6, rtol=1e-5)
