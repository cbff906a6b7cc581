"""Arguments of the softmax-attention entry points: bad ones raise a ValueError/TypeError that
names them; zero and negative scales give the same answer on every backend."""

from __future__ import annotations

import pytest
import torch

import headwise.patterns as P
from headwise.ops.attention import Packed, attention, attention_varlen, explain, pack, unpack

BACKENDS = ["reference", "sdpa", "blockwise", "native"]


def inputs(q_len=12, kv_len=12, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, q_len, 4, 8, generator=gen, dtype=dtype).requires_grad_(),
        torch.randn(2, kv_len, 2, 8, generator=gen, dtype=dtype).requires_grad_(),
        torch.randn(2, kv_len, 2, 8, generator=gen, dtype=dtype).requires_grad_(),
    )


# ----------------------------------------------------------------- scale (item 9)
@pytest.mark.parametrize("scale", [-0.5, 0.0, -3.0, 1e-30])
@pytest.mark.parametrize("pattern", [None, P.causal(), P.causal("top_left"), P.sliding_window(4)])
@pytest.mark.parametrize("q_len", [12, 5])
def test_every_backend_agrees_for_zero_and_negative_scale(scale, pattern, q_len):
    q, k, v = inputs(q_len=q_len)
    want = attention(q, k, v, pattern, scale=scale, backend="reference")
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    for backend in ["auto", *BACKENDS]:
        if backend == "sdpa" and explain(q, k, v, pattern, backend=("sdpa",)).backend is None:
            continue
        out = attention(q, k, v, pattern, scale=scale, backend=backend)
        assert not torch.isnan(out).any(), backend
        torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5, msg=backend)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, atol=2e-4, rtol=1e-4, msg=backend)


def test_sdpa_with_bias_and_negative_scale():
    q, k, v = inputs()
    bias = torch.randn(4, 12, 12)
    for pattern in (None, P.causal()):
        want = attention(q, k, v, pattern, bias=bias, scale=-1.0, backend="reference")
        out = attention(q, k, v, pattern, bias=bias, scale=-1.0, backend="sdpa")
        torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "scale,error,match",
    [
        ("0.5", TypeError, "scale must be a real number; got '0.5'"),
        (True, TypeError, "scale must be a real number; got True"),
        (torch.ones(2), TypeError, r"scale must be a real number; got a tensor of shape \(2,\)"),
        (float("nan"), ValueError, "scale must be finite; got nan"),
        (float("inf"), ValueError, "scale must be finite; got inf"),
        (-float("inf"), ValueError, "scale must be finite; got -inf"),
        (1 + 2j, TypeError, "scale must be a real number"),
    ],
)
def test_bad_scale_is_refused(scale, error, match):
    q, k, v = inputs()
    with pytest.raises(error, match=match):
        attention(q, k, v, P.causal(), scale=scale)
    with pytest.raises(error, match=match):
        attention_varlen(q[0], k[0], v[0], torch.tensor([0, 12]), scale=scale)


def test_one_element_tensor_scale_is_a_number():
    q, k, v = inputs()
    out = attention(q, k, v, P.causal(), scale=torch.tensor(0.25))
    torch.testing.assert_close(out, attention(q, k, v, P.causal(), scale=0.25))


# ----------------------------------------------------------------- backend (item 12)
@pytest.mark.parametrize("backend", [None, 3, ["sdpa"], ("sdpa", None), b"sdpa"])
def test_backend_of_the_wrong_type_is_refused(backend):
    q, k, v = inputs()
    with pytest.raises(TypeError, match="backend must be"):
        attention(q, k, v, backend=backend)
    with pytest.raises(TypeError, match="backend must be"):
        explain(q, k, v, backend=backend)


@pytest.mark.parametrize("backend", [(), "magic", ("sdpa", "magic")])
def test_unknown_backend_names_are_refused(backend):
    q, k, v = inputs()
    with pytest.raises(ValueError, match="backend must be"):
        attention(q, k, v, backend=backend)


def test_flex_agrees_for_negative_and_zero_scale():
    q, k, v = (t.detach() for t in inputs())
    with torch.no_grad():
        for scale in (-0.5, 0.0):
            out = attention(q, k, v, P.causal(), scale=scale, backend="flex")
            want = attention(q, k, v, P.causal(), scale=scale, backend="reference")
            torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------- pack / unpack (item 12)
def test_pack_refuses_what_is_not_a_tensor():
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match=r"attention_mask must be a \(B, L\) tensor; got list"):
        pack(x, [[1, 1, 0], [1, 0, 0]])
    with pytest.raises(TypeError, match=r"x must be a \(B, L, ...\) tensor; got list"):
        pack([[1.0]], torch.ones(1, 1, dtype=torch.bool))


@pytest.mark.parametrize(
    "mask,match",
    [
        (torch.tensor([[1, 1, -1], [1, 0, 0]]), r"0/1.*got values \[-1, 0, 1\]"),
        (torch.tensor([[1, 2, 0], [1, 0, 0]]), r"0/1.*got values \[0, 1, 2\]"),
        (torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]]), "bool or integer.*float32"),
        # a Hugging Face additive mask (0 = keep, -inf = hide) would be silently inverted
        (torch.tensor([[0.0, 0.0, float("-inf")], [0.0, float("-inf"), float("-inf")]]), "float"),
    ],
)
def test_pack_takes_only_0_1_or_bool_masks(mask, match):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=match):
        pack(x, mask)


def test_pack_takes_0_1_integer_and_bool_masks():
    x = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for m in (mask, mask.bool(), mask.to(torch.int32), mask.to(torch.uint8)):
        assert pack(x, m).cu_seqlens.tolist() == [0, 2, 3]


def test_unpack_refuses_what_is_not_packed():
    x = torch.randn(2, 3, 4)
    packed = pack(x, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"packed must be a Packed .*; got tuple"):
        unpack(packed.tokens, (packed.cu_seqlens, packed.indices))
    with pytest.raises(TypeError, match="tokens must be a tensor; got list"):
        unpack([1.0], packed)
    assert isinstance(packed, Packed)


# ----------------------------------------------------------------- score_mod (item 12)
def wrong_shape(score, b, h, q_idx, kv_idx):
    return score.mean(-1, keepdim=True)  # broadcasts back on a dense reference


def python_if(score, b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:
        return score
    return score - 1.0


def returns_a_number(score, b, h, q_idx, kv_idx):
    return 0.0


@pytest.mark.parametrize("backend", ["auto", "reference", "blockwise", "flex", "native", "sdpa"])
@pytest.mark.parametrize(
    "score_mod,match",
    [
        (wrong_shape, r"score_mod must return a tensor shaped like its score argument"),
        (returns_a_number, r"score_mod must return a tensor .*; got float"),
        (python_if, r"use|torch\.where"),
    ],
)
def test_a_broken_score_mod_gives_one_clear_error_on_every_backend(backend, score_mod, match):
    q, k, v = inputs()
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        attention(q, k, v, P.causal(), score_mod=score_mod, backend=backend)


def test_python_if_message_says_to_use_torch_where():
    q, k, v = inputs()
    with pytest.raises(ValueError, match=r"torch\.where") as info:
        attention(q, k, v, P.causal(), score_mod=python_if, backend="blockwise")
    assert "Python control flow" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_score_mod_errors_of_its_own_pass_through():
    def broken(score, b, h, q_idx, kv_idx):
        raise RuntimeError("my own bug")

    q, k, v = inputs()
    with pytest.raises(RuntimeError, match="my own bug"):
        attention(q, k, v, P.causal(), score_mod=broken)
