"""The ``sdpa`` backend's call of PyTorch's scaled dot-product attention (Vaswani et al., 2017,
"Attention Is All You Need": ``softmax(scale * q k^T + bias) v``) under headwise's non-finite
rule (:mod:`headwise.ops.attention.api`): :func:`sdpa_attention`.

When keys can be hidden (causal, or a bias) on CPU without dropout, the call runs as the custom
operators ``headwise::sdpa_attention_fwd`` / ``headwise::sdpa_attention_bwd`` (``torch.library``,
fake implementations, ``register_autograd``; PyTorch's custom-operator guide), on the kernel
SDPA itself picks there, the fused CPU flash kernel (``aten._scaled_dot_product_flash_attention_
for_cpu`` and its backward, after Dao et al., 2022, "FlashAttention"). The rule's look for
non-finite entries and its poisoned-row pass (:mod:`.nonfinite`) run inside the operators, so
``torch.compile`` traces one opaque node and no data-dependent branch (0 graph breaks), and eager
calls give the same bits as SDPA's own autograd: out = SDPA of the inputs with bad entries set to
0, NaN in poisoned rows; the backward is the kernel's on those inputs with the poisoned rows'
output gradients set to 0, and 0 at the bad entries. Other calls (full attention without bias,
which checks nothing; dropout, whose mask torch draws and a separate backward cannot redraw; a
bias that needs a gradient, which only SDPA's math path gives; other devices) call
``torch.nn.functional.scaled_dot_product_attention`` as it is, the rule applied around it (a
graph break under ``torch.compile`` where keys can be hidden).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from headwise.ops.attention.nonfinite import has_non_finite, poisoned_rows, run_poisoned
from headwise.ops.attention.problem import bias_4d, refuse_double_backward


def _mask(q_len, kv_len, device, dtype, bias, diagonal, scale):
    """``(attn_mask, is_causal)`` for SDPA: ``diagonal`` is the causal mask's (``kv_len - q_len``
    bottom-right, 0 top-left; ``None``: no causal mask)."""
    mask = None
    is_causal = False
    if diagonal is not None:
        # is_causal only where it is plain top-left causal and the scale positive: SDPA's CPU
        # kernel scales its -inf causal fill, and -inf * scale is NaN or +inf for scale <= 0
        if diagonal == 0 and bias is None and scale > 0:
            is_causal = True
        else:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal)
    if bias is not None:
        attn_bias = bias_4d(bias).to(dtype)
        mask = attn_bias if mask is None else attn_bias.masked_fill(~mask, float("-inf"))
    return mask, is_causal


def _plain(q, k, v, bias, diagonal, scale, dropout_p):
    """``F.scaled_dot_product_attention`` on ``(B, L, H, D)`` inputs: ``out`` ``(B, Lq, H, D)``."""
    mask, is_causal = _mask(q.shape[1], k.shape[1], q.device, q.dtype, bias, diagonal, scale)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _flash_inputs(q, k, v, bias, diagonal, scale):
    mask, is_causal = _mask(q.shape[1], k.shape[1], q.device, q.dtype, bias, diagonal, scale)
    if mask is not None and mask.dtype == torch.bool:
        # what SDPA does to a boolean mask before its flash kernel
        zeros = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        mask = zeros.masked_fill(~mask, float("-inf"))
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, is_causal


def _flash(q, k, v, bias, diagonal, scale):
    """``(out (B, Lq, H, D), lse (B, H, Lq))`` of SDPA's CPU flash kernel, contiguous."""
    qt, kt, vt, mask, is_causal = _flash_inputs(q, k, v, bias, diagonal, scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qt, kt, vt, 0.0, is_causal, attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2).contiguous(), lse.contiguous()


def _runner(diagonal, scale):
    """:func:`_flash` as a backend's ``run`` for :mod:`.nonfinite` (bias from the call: its
    weight pass widens it)."""

    def run(q, k, v, _pattern, _scale, bias, _mod, _dropout):
        return _flash(q, k, v, bias, diagonal, scale)

    return run


@torch.library.custom_op("headwise::sdpa_attention_fwd", mutates_args=())
def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 (torch.library reads the annotation)
    diagonal: Optional[int],  # noqa: UP045
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out (B, Lq, H, D), lse (B, H, Lq), dirty)`` of CPU ``(B, L, H, D)`` inputs (one head
    dim; ``lse`` in float32, float64 for float64 inputs) under the non-finite rule; ``dirty``: a
    bool scalar, whether the rule's screen found a non-finite entry (the backward pass then
    looks again instead of paying the screen on every call)."""
    dirty = (diagonal is not None or bias is not None) and has_non_finite(q, k, v)
    if dirty:
        out, lse = run_poisoned(_runner(diagonal, scale), q, k, v, None, None, bias, None)
    else:
        out, lse = _flash(q, k, v, bias, diagonal, scale)
    return out, lse, torch.tensor(dirty)


@_forward.register_fake
def _(q, k, v, bias, diagonal, scale):
    batch, q_len, heads = q.shape[:3]
    lse = q.new_empty(batch, heads, q_len, dtype=torch.promote_types(q.dtype, torch.float32))
    dirty = torch.empty((), dtype=torch.bool, device=q.device)
    return q.new_empty(batch, q_len, heads, v.shape[3]), lse, dirty


@torch.library.custom_op("headwise::sdpa_attention_bwd", mutates_args=())
def _backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045
    out: torch.Tensor,
    lse: torch.Tensor,
    dirty: torch.Tensor,
    diagonal: Optional[int],  # noqa: UP045
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`_forward` (``lse`` takes no gradient). Where the forward pass
    found a non-finite entry (``dirty``): the kernel's backward on the clean inputs (its outputs
    recomputed) with the poisoned rows' output gradients 0, and 0 at the bad entries, as autograd
    gives through :func:`.nonfinite.run_poisoned`."""
    found = None
    if dirty.item():
        found = poisoned_rows(_runner(diagonal, scale), q, k, v, None, None, bias, None)
    inputs = q, k, v
    if found is not None:
        q, k, v, poisoned = found
        out, lse = _flash(q, k, v, bias, diagonal, scale)
        grad_out = grad_out.masked_fill(poisoned[..., None], 0)
    qt, kt, vt, mask, is_causal = _flash_inputs(q, k, v, bias, diagonal, scale)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out.transpose(1, 2), qt, kt, vt, out.transpose(1, 2), lse, 0.0, is_causal,
        attn_mask=mask, scale=scale,
    )  # fmt: skip
    grads = [g.transpose(1, 2) for g in grads]
    if found is not None:
        grads = [torch.where(torch.isfinite(t), g, 0) for t, g in zip(inputs, grads)]
    return tuple(g.contiguous() for g in grads)


@_backward.register_fake
def _(grad_out, q, k, v, bias, out, lse, dirty, diagonal, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, bias, diagonal, scale = inputs
    ctx.save_for_backward(q, k, v, bias, *output)
    ctx.diagonal, ctx.scale = diagonal, scale


def _gradients(ctx, grad_out, grad_lse, grad_dirty):
    refuse_double_backward("the 'sdpa' backend's fused CPU kernel")
    q, k, v, bias, out, lse, dirty = ctx.saved_tensors
    bias = None if bias is None else bias.detach()
    dq, dk, dv = torch.ops.headwise.sdpa_attention_bwd(
        grad_out, q, k, v, bias, out, lse, dirty, ctx.diagonal, ctx.scale
    )
    return dq, dk, dv, None, None, None


_forward.register_autograd(_gradients, setup_context=_setup_context)


def _operator_serves(q, k, v, bias, dropout_p) -> bool:
    """Whether the call is one for the operators: CPU, no dropout, a bias without gradient, and
    inputs SDPA sends to its flash kernel (non-empty, unit stride in the head dim)."""
    return (
        q.device.type == "cpu"
        and dropout_p == 0
        and not (bias is not None and bias.requires_grad and torch.is_grad_enabled())
        and all(t.numel() > 0 and t.stride(-1) == 1 for t in (q, k, v))
    )


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    diagonal: int | None,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SDPA of ``(B, L, H, D)`` inputs (``k``/``v`` with ``H_kv`` dividing ``H``; ``Dv`` may
    differ from ``D``) under the non-finite rule: ``out`` ``(B, Lq, H, Dv)``. ``diagonal``: the
    causal mask ``tril(diagonal)`` (``None``: none); ``bias`` broadcastable to ``(B, H, Lq,
    Lk)``."""
    value_dim = v.shape[-1]
    if q.shape[-1] != value_dim:
        # SDPA's fused kernels need one head dim for q, k and v, and otherwise fall back to the
        # L x L math path; zero padding changes neither the scores nor the kept output.
        width = max(q.shape[-1], value_dim)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
    if diagonal is None and bias is None:
        # every row sees every key: nothing to look for
        out = _plain(q, k, v, bias, diagonal, scale, dropout_p)
    elif _operator_serves(q, k, v, bias, dropout_p):
        out = torch.ops.headwise.sdpa_attention_fwd(q, k, v, bias, diagonal, scale)[0]
    elif has_non_finite(q, k, v):
        # run_poisoned passes dropout_p to the pass that makes out, None to its weight pass
        def run(q, k, v, _pattern, _scale, bias, _mod, dropout):
            return _plain(q, k, v, bias, diagonal, scale, dropout or 0.0), None

        out, _ = run_poisoned(run, q, k, v, None, None, bias, None, dropout_p)
    else:
        out = _plain(q, k, v, bias, diagonal, scale, dropout_p)
    return out[..., :value_dim]
