"""Non-finite values: an inf/NaN in K or V (or Q) reaches exactly the rows that see it.

The rule (README, error policy): a non-finite entry of key/value ``j`` poisons (sets to NaN, out
and LSE) exactly the rows that give key ``j`` a positive weight; a non-finite query row poisons
only itself. Every other row, and its gradients, is what it would be with the bad entries
replaced by any finite value. Checked on every backend against the reference oracle, which obeys
the same rule, and on packed batches (packed == padded with a poisoned sequence).
"""

from __future__ import annotations

import pytest
import torch

import headwise.patterns as P
from headwise.ops.attention import attention, attention_varlen, pack
from headwise.ops.attention.native import available
from headwise.ops.attention.reference import reference_attention

INF, NAN = float("inf"), float("nan")
B, L, H, HKV, D = 2, 24, 4, 2, 8


def inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, L, heads, D, generator=gen).to(dtype) for heads in (H, HKV, HKV))


def key_padding(lengths):
    """A ``(B, 1, 1, L)`` additive key-padding bias (``-inf`` past each length)."""
    hidden = torch.arange(L)[None] >= torch.tensor(lengths)[:, None]
    return torch.zeros(B, 1, 1, L).masked_fill(hidden[:, None, None], float("-inf"))


# name: (pattern, bias lengths or None, [(tensor, b, position, kv head, value)])
CASES = {
    "causal_k_inf": (P.causal(), None, [("k", 0, 10, 0, INF)]),
    "causal_k_nan": (P.causal(), None, [("k", 1, 17, 1, NAN)]),
    "causal_k_neg_inf": (P.causal(), None, [("k", 0, 5, 1, -INF)]),
    "causal_v_inf": (P.causal(), None, [("v", 0, 10, 0, INF)]),
    "documents_k_inf": (P.documents([8, 16]), None, [("k", 0, 20, 0, INF)]),
    "documents_v_nan": (P.documents([8, 16], causal=True), None, [("v", 1, 3, 1, NAN)]),
    "window_v_neg_inf": (P.sliding_window(4), None, [("v", 0, 5, 0, -INF)]),
    "window_sinks_k_inf": (P.sliding_window(3) | P.sinks(2), None, [("k", 0, 12, 1, INF)]),
    "padding_bias": (
        None,
        (20, 15),
        [("k", 1, 21, 0, INF), ("v", 0, 22, 1, NAN), ("v", 1, 3, 1, -INF)],
    ),
    "q_nan_documents": (P.documents([8, 16]), None, [("q", 0, 3, 2, NAN)]),
}
SDPA_CASES = ["causal_k_inf", "causal_k_nan", "causal_v_inf", "padding_bias"]


def poison(case, dtype=torch.float32):
    """Clean inputs, the poisoned ones, and the rows ``(B, L, H)`` the rule says turn NaN."""
    pattern, lengths, entries = CASES[case]
    clean = inputs(dtype)
    dirty = {name: t.clone() for name, t in zip("qkv", clean)}
    for name, b, pos, head, value in entries:
        dirty[name][b, pos, head, 1] = value
    bias = key_padding(lengths).to(dtype) if lengths is not None else None
    visible = torch.ones(1, L, L, dtype=torch.bool)
    if pattern is not None:
        visible = pattern.dense_mask(L, L)
    visible = visible[None].expand(B, H, L, L)
    if bias is not None:
        visible = visible & ~torch.isneginf(bias)
    bad_kv = ~(torch.isfinite(dirty["k"]) & torch.isfinite(dirty["v"])).all(-1)  # (B, L, Hkv)
    bad_kv = bad_kv.repeat_interleave(H // HKV, 2).permute(0, 2, 1)  # (B, H, Lk)
    rows = (visible & bad_kv[:, :, None]).any(-1).transpose(1, 2)  # (B, Lq, H)
    rows |= ~torch.isfinite(dirty["q"]).all(-1)
    return pattern, bias, clean, (dirty["q"], dirty["k"], dirty["v"]), rows


def backends_for(case):
    names = ["reference", "blockwise", "native"]
    return [*names, "sdpa"] if case in SDPA_CASES else names


PAIRS = [(case, backend) for case in CASES for backend in backends_for(case)]


@pytest.mark.parametrize("case,backend", PAIRS)
def test_non_finite_entries_reach_only_the_rows_that_see_them(case, backend):
    pattern, bias, clean, dirty, rows = poison(case)
    assert rows.any() and not rows.all()
    out = attention(*dirty, pattern, bias=bias, backend=backend)
    wanted = attention(*clean, pattern, bias=bias, backend=backend)
    assert torch.equal(torch.isnan(out).all(-1), rows), "NaN exactly in the rows that see it"
    assert torch.isfinite(out[~rows]).all()
    torch.testing.assert_close(out[~rows], wanted[~rows], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case,backend", PAIRS)
def test_gradients_of_clean_rows_stay_clean(case, backend):
    pattern, bias, clean, dirty, rows = poison(case)
    dirty = [t.requires_grad_() for t in dirty]
    clean = [t.requires_grad_() for t in clean]
    grad = torch.randn(B, L, H, D, generator=torch.Generator().manual_seed(1))
    grad[rows] = 0  # the loss reads only the clean rows
    out = attention(*dirty, pattern, bias=bias, backend=backend)
    got = torch.autograd.grad(out[~rows], dirty, grad[~rows])
    # the same loss with every bad entry replaced by a finite value (here: the clean inputs)
    ref = attention(*clean, pattern, bias=bias, backend=backend)
    wanted = torch.autograd.grad(ref[~rows], clean, grad[~rows])
    for name, g, w, t in zip("qkv", got, wanted, dirty):
        assert torch.isfinite(g).all(), f"d{name} has non-finite entries"
        fine = torch.isfinite(t)  # gradients at the bad entries themselves are zero
        assert torch.all(g[~fine] == 0)
        torch.testing.assert_close(g[fine], w[fine], atol=1e-5, rtol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("case", list(CASES))
def test_reference_oracle_obeys_the_rule(case):
    pattern, bias, _, dirty, rows = poison(case, torch.float64)
    out, lse = reference_attention(*dirty, pattern, bias=bias)
    assert torch.equal(torch.isnan(out).all(-1), rows)
    assert torch.equal(torch.isnan(lse), rows.transpose(1, 2))
    assert torch.isfinite(out[~rows]).all()


@pytest.mark.parametrize("case", ["causal_k_inf", "documents_v_nan", "padding_bias"])
@pytest.mark.parametrize("backend", ["blockwise", "native"])
def test_lse_is_nan_exactly_in_poisoned_rows(case, backend):
    pattern, bias, _, dirty, rows = poison(case)
    assert rows.any()
    out, lse = attention(*dirty, pattern, bias=bias, backend=backend, return_lse=True)
    ref_out, ref_lse = reference_attention(*dirty, pattern, bias=bias)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_float64_through_auto_and_flex_forward():
    pattern, _, _, dirty, rows = poison("documents_k_inf", torch.float64)
    out = attention(*dirty, pattern, backend="auto")
    assert torch.equal(torch.isnan(out).all(-1), rows)
    pattern, _, clean, dirty, rows = poison("window_v_neg_inf")
    with torch.no_grad():
        out = attention(*dirty, pattern, backend="flex")
        wanted = attention(*clean, pattern, backend="reference")
    assert torch.equal(torch.isnan(out).all(-1), rows)
    torch.testing.assert_close(out[~rows], wanted[~rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "blockwise", "native"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_a_bias_entry_at_a_hidden_key_never_matters(backend, value):
    q, k, v = inputs()
    bias = torch.randn(H, L, L, generator=torch.Generator().manual_seed(2))
    dirty = bias.clone()
    dirty[0, 3, 7] = value  # causal: query 3 never sees key 7
    dirty[2, 10, 20] = value
    for b in (bias, dirty):
        b.requires_grad_(backend != "native")  # native computes no bias gradient
    out = attention(q, k, v, P.causal(), bias=dirty, backend=backend)
    wanted = attention(q, k, v, P.causal(), bias=bias, backend=backend)
    torch.testing.assert_close(out, wanted, atol=1e-6, rtol=1e-6)
    if backend != "native":
        grad = torch.autograd.grad(out.sum(), dirty)[0]
        assert torch.equal(grad, torch.autograd.grad(wanted.sum(), bias)[0])


@pytest.mark.parametrize("backend", ["blockwise", "native", "reference"])
def test_one_bad_sequence_does_not_poison_a_packed_batch(backend):
    lengths, max_len = [5, 7, 4], 7
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, max_len, 2, 8, generator=gen) for _ in range(3))
    mask = torch.arange(max_len)[None] < torch.tensor(lengths)[:, None]
    k[1, 6, 0, 0] = INF  # the last token of sequence 2
    v[1, 6, 1, 3] = NAN
    for t in (q, k, v):
        t.requires_grad_()
    for causal in (False, True):
        bias = torch.zeros(3, 1, 1, max_len).masked_fill(~mask[:, None, None], -INF)
        padded = attention(
            q, k, v, P.causal("top_left") if causal else None, bias=bias, backend=backend
        )
        packs = [pack(t, mask) for t in (q, k, v)]
        cu = packs[0].cu_seqlens
        packed = attention_varlen(*(p.tokens for p in packs), cu, causal=causal, backend=backend)
        torch.testing.assert_close(packed, padded[mask], atol=1e-5, rtol=1e-5, equal_nan=True)
        seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
        clean = seq != 1
        assert torch.isfinite(packed[clean]).all()
        # sequence 2 sees its bad last token: every row without causal, only the last with it
        bad_rows = packed[~clean].isnan().all(-1).any(-1)
        assert bad_rows.tolist() == ([False] * 6 + [True] if causal else [True] * 7)
        grad = torch.randn_like(packed)
        grad[~clean] = 0
        g_packed = torch.autograd.grad(packed[clean], (q, k, v), grad[clean])
        g_padded = torch.autograd.grad(padded[mask][clean], (q, k, v), grad[clean])
        for a, b in zip(g_packed, g_padded):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-5)


def test_full_attention_pays_no_check(monkeypatch):
    # Nothing can be hidden: every row sees every key, no isfinite pass is made.
    import headwise.ops.attention.api as api
    import headwise.ops.attention.sdpa as sdpa  # sdpa looks in its own operators

    calls = []
    real = api.has_non_finite
    for module in (api, sdpa):
        monkeypatch.setattr(module, "has_non_finite", lambda *t: calls.append(1) or real(*t))
    q, k, v = inputs()
    attention(q, k, v)
    attention(q, k, v, P.full())
    assert calls == []
    attention(q, k, v, P.causal())
    assert calls == [1]


def test_gathered_attention_keeps_bad_keys_to_the_rows_that_use_them():
    from headwise.ops.attention.gather import gathered_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 4, generator=gen) for _ in range(3))
    index = torch.tensor([0, 1, 2]).expand(1, 2, 6, 3).contiguous()
    valid = torch.ones(1, 2, 6, 3, dtype=torch.bool)
    valid[:, :, :3, 2] = False  # rows 0-2 do not use key 2
    bad_v, bad_k = v.clone(), k.clone()
    bad_v[0, 2, 0, 0] = INF
    bad_k[0, 2, 1, 0] = NAN
    for kk, vv, head in ((k, bad_v, 0), (bad_k, v, 1)):
        kk, vv, qq = (t.clone().requires_grad_() for t in (kk, vv, q))
        out = gathered_attention(qq, kk, vv, index, valid=valid)
        wanted = gathered_attention(q, k, v, index, valid=valid)
        poisoned = torch.zeros(1, 6, 2, dtype=torch.bool)
        poisoned[0, 3:, head] = True
        assert torch.equal(out.isnan().all(-1), poisoned)
        torch.testing.assert_close(out[~poisoned], wanted[~poisoned])
        grads = torch.autograd.grad(out[~poisoned].sum(), (qq, kk, vv))
        assert all(torch.isfinite(g).all() for g in grads)


TINY_BACKENDS = ["reference", "sdpa", "blockwise", "flex"] + (["native"] if available() else [])
#: weights e^-gap / n of rows seeing n = 3..8 keys: all above float32's smallest normal number
#: 2^-126 = e^-87.3 (poisoned), all below it though normal, subnormal (native's exp flushes those
#: to 0, the others kept them), zero in float32; and HF's finfo.min padding bias (never poisons)
TINY_GAPS = {"e^-20": 20.0, "e^-85": 85.0, "e^-88": 88.0, "e^-100": 100.0, "e^-110": 110.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gap", [*TINY_GAPS, "finfo.min"])
def test_every_backend_poisons_the_same_rows_when_a_bad_key_gets_a_tiny_weight(gap, dtype):
    # rows 2.. see a NaN value at key 2 under a bias of -gap, all other scores 0
    q = k = torch.zeros(1, 8, 1, 8, dtype=dtype)
    v = torch.randn(1, 8, 1, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    v[0, 2, 0, 0] = NAN
    bias = torch.zeros(1, 1, 8, 8, dtype=dtype)
    bias[..., 2] = torch.finfo(dtype).min if gap == "finfo.min" else -TINY_GAPS[gap]
    wanted = [False, False] + [gap in ("e^-20", "e^-85")] * 6
    rows = {}
    for backend in TINY_BACKENDS:
        out = attention(q, k, v, P.causal(), bias=bias, backend=backend)
        rows[backend] = torch.isnan(out[0, :, 0]).all(-1).tolist()
    rows["oracle"] = torch.isnan(reference_attention(q, k, v, P.causal(), bias=bias)[0][0, :, 0])
    rows["oracle"] = rows["oracle"].all(-1).tolist()
    assert all(r == wanted for r in rows.values()), (wanted, rows)
