"""Every tensor the native kernel's wrapper hands to C: any strides in (q, k, v, out, lse,
grad_out, grad_lse, bias) and any strides of the buffers it writes (out, lse, dq, dk, dv) give
the oracle's result; what C cannot take (dtype, device, shape, overlapping output memory) is a
ValueError that says which of them is wrong."""

from __future__ import annotations

import pytest
import torch
from test_attention import make_inputs

import headwise.patterns as P
from headwise.ops.attention import attention
from headwise.ops.attention.native import available, tiles_backward, tiles_forward
from headwise.ops.attention.reference import reference_attention

pytestmark = pytest.mark.skipif(not available(), reason="native tile kernel not built")

PATTERN = P.neighborhood((6, 7), 3) | P.sinks(1)
SCALE = 16**-0.5


def _last_dim_strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, stored with the last dim outermost (its stride is not 1)."""
    return t.detach().movedim(-1, 0).contiguous().movedim(0, -1)


def _oracle(q, k, v, grad_out, grad_lse):
    d64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*d64, PATTERN, scale=SCALE)
    grads = torch.autograd.grad((out, lse), d64, (grad_out.double(), grad_lse.double()))
    return out, lse, *grads


def _close(actual, expected, name):
    torch.testing.assert_close(actual.double(), expected, atol=2e-5, rtol=2e-5, msg=name)


def test_channel_attention_views_run_natively_forward_and_backward():
    # SHViT / DaViT channel attention: q, k, v are transposed views of one projection, the
    # head dim is not the innermost in memory; the backward's dq buffer keeps q's strides
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 42, generator=gen)  # (B, H, D, L) stored, used as (B, L, H, D)
    q, k, v = (torch.randn_like(x).permute(0, 3, 1, 2).requires_grad_() for _ in range(3))
    assert q.stride(-1) != 1
    out = attention(q, k, v, PATTERN, backend="native")
    grad = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    d64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*d64, PATTERN)[0]
    ref_grads = torch.autograd.grad(ref, d64, grad.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        _close(a, b, name)


@pytest.mark.parametrize(
    "strided",
    [
        "q",
        "k",
        "v",
        "grad_out",
        "grad_lse",
        "saved_out",
        "saved_lse",
        "out_buffer",
        "lse_buffer",
        "dq",
        "dk",
        "dv",
    ],
)
def test_any_strides_in_and_out_match_the_oracle(strided):
    q, k, v = (t.detach() for t in make_inputs(2, 42, 42, 4, 2, 16))
    gen = torch.Generator().manual_seed(2)
    grad_out = torch.randn(2, 42, 4, 16, generator=gen)
    grad_lse = torch.randn(2, 4, 42, generator=gen)
    ref_out, ref_lse, *ref_grads = _oracle(q, k, v, grad_out, grad_lse)
    tensors = {"q": q, "k": k, "v": v, "grad_out": grad_out, "grad_lse": grad_lse}
    if strided in tensors:
        tensors[strided] = _last_dim_strided(tensors[strided])
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    buffers = {"out_buffer": torch.empty(2, 42, 4, 16), "lse_buffer": torch.empty(2, 4, 42)}
    if strided in buffers:
        buffers[strided] = _last_dim_strided(buffers[strided])
    out, lse = tiles_forward(q, k, v, PATTERN, SCALE, out=tuple(buffers.values()))
    assert out is buffers["out_buffer"] and lse is buffers["lse_buffer"]
    _close(out, ref_out, "out")
    _close(lse, ref_lse, "lse")
    saved = {"saved_out": out.clone(), "saved_lse": lse.clone()}
    if strided in saved:
        saved[strided] = _last_dim_strided(saved[strided])
    grads = {"dq": torch.empty_like(q), "dk": torch.zeros_like(k), "dv": torch.zeros_like(v)}
    if strided in grads:
        grads[strided] = _last_dim_strided(grads[strided])
    parts = (tensors["grad_out"], tensors["grad_lse"], q, k, v, *saved.values())
    tiles_backward(*parts, PATTERN, SCALE, tuple(grads.values()))
    for name, grad, ref in zip(grads, grads.values(), ref_grads):
        _close(grad, ref, name)


def test_backward_adds_into_strided_dk_dv_and_leaves_other_heads_of_dq():
    # dK, dV are added to (head groups accumulate), dQ is written only in the call's heads
    q, k, v = (t.detach() for t in make_inputs(1, 42, 42, 4, 2, 8))
    out, lse = tiles_forward(q, k, v, PATTERN, SCALE)
    grad_out = torch.randn_like(out)
    plain = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    tiles_backward(grad_out, None, q, k, v, out, lse, [(PATTERN, [0, 1])], SCALE, plain)
    start = torch.full_like(q, 7.0), torch.ones_like(k), torch.ones_like(v)
    strided = tuple(_last_dim_strided(t) for t in start)
    tiles_backward(grad_out, None, q, k, v, out, lse, [(PATTERN, [0, 1])], SCALE, strided)
    assert torch.equal(strided[0][:, :, :2], plain[0][:, :, :2])
    assert torch.all(strided[0][:, :, 2:] == 7.0)
    torch.testing.assert_close(strided[1], plain[1] + 1)
    torch.testing.assert_close(strided[2], plain[2] + 1)


def test_what_c_cannot_take_is_named():
    q, k, v = (t.detach() for t in make_inputs(1, 42, 42, 4, 2, 8))
    out, lse = tiles_forward(q, k, v, PATTERN, SCALE)
    grad_out = torch.randn_like(out)
    grads = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def forward(match, q=q, k=k, v=v, **options):
        with pytest.raises(ValueError, match=match):
            tiles_forward(q, k, v, PATTERN, SCALE, **options)

    def backward(match, grads=grads, **changes):
        parts = {"grad_out": grad_out, "grad_lse": None, "q": q, "k": k, "v": v, "out": out}
        parts |= {"lse": lse} | changes
        with pytest.raises(ValueError, match=match):
            tiles_backward(*parts.values(), PATTERN, SCALE, grads)

    forward(r"q must be a float32, bfloat16 or float16 CPU tensor; got torch.float64", q=q.double())
    forward(r"q must be a float32, bfloat16 or float16 CPU tensor; got torch.float32 on meta",
            q=q.to("meta"))  # fmt: skip
    forward(r"q must be \(B, Lq, H, D\) = \(\*, \*, \*, \*\); got \(1, 42, 32\)", q=q.flatten(2))
    forward(r"k must be \(B, Lk, Hkv, D\) = \(1, \*, \*, 8\); got \(1, 42, 2, 4\)", k=k[..., :4])
    forward(r"v must be \(B, Lk, Hkv, Dv\) = \(1, 42, 2, \*\); got \(1, 41, 2, 8\)", v=v[:, :41])
    three = [torch.cat([t, t[:, :, :1]], 2) for t in (k, v)]
    forward(r"the heads of q \(4\) must be a multiple of the heads of k \(3\)", k=three[0],
            v=three[1])  # fmt: skip
    forward(r"needs q_len = kv_len = 42; got q_len=30", q=q[:, :30], k=k[:, :30], v=v[:, :30])
    forward(r"out must be \(B, Lq, H, Dv\) = \(1, 42, 4, 8\); got \(1, 42, 4, 7\)",
            out=(out[..., :7], lse))  # fmt: skip
    forward(r"lse must be a float32 CPU tensor; got torch.float64 on cpu", out=(out, lse.double()))
    forward(r"out must not overlap itself.*strides \(0, 0, 0, 1\)",
            out=(torch.empty(8).expand(out.shape), lse))  # fmt: skip
    forward(r"bias must broadcast to \(1, 4, 42, 42\); got \(3, 42\)", bias=torch.zeros(3, 42))
    forward(r"bias must be a floating-point CPU tensor; got torch.float32 on meta",
            bias=torch.zeros(42, 42, device="meta"))  # fmt: skip
    backward(r"lse must be \(B, H, Lq\) = \(1, 4, 42\); got \(1, 42, 4\)", lse=lse.transpose(1, 2))
    backward(r"grad_out must be \(B, Lq, H, Dv\) = \(1, 42, 4, 8\); got \(1, 42, 4, 4\)",
             grad_out=grad_out[..., :4])  # fmt: skip
    backward(r"grad_lse must be \(B, H, Lq\) = \(1, 4, 42\); got \(1, 4, 41\)",
             grad_lse=lse[..., :41])  # fmt: skip
    backward(r"dk must be a float32 CPU tensor; got torch.float64 on cpu",
             grads=(grads[0], grads[1].double(), grads[2]))  # fmt: skip
    backward(r"dv must not overlap itself", grads=(*grads[:2], torch.zeros(8).expand(v.shape)))


def test_a_plan_never_names_rows_beyond_the_tensors(monkeypatch):
    # the kernel indexes q, k, v with the plan's positions: a pattern whose own length check
    # lets a wrong length through still cannot make it read past the tensors
    from headwise.ops.attention.native import tile_plan
    from headwise.patterns.neighborhood import Neighborhood

    grid = P.neighborhood((6, 7), 3)
    monkeypatch.setattr(Neighborhood, "check_lengths", lambda self, q_len, kv_len: None)
    with pytest.raises(ValueError, match=r"names positions beyond q_len=30, kv_len=30"):
        tile_plan(grid, 30, 30)
