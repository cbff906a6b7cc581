"""The fused CPU path: each query group is one call of PyTorch's fused attention kernel.

The kernel (what SDPA runs on CPU) takes a group's keys with the pattern as an additive mask and
returns the log-sum-exp too: several times faster than the step-by-step softmax
(:mod:`.stepwise`), which remains for ``score_mod``, bias gradients, LSE gradients and other
devices. It takes ``(B, H, L, D)`` views with any strides, so groups read slices of K, V (or of a
panel gathered once into a reused buffer) in place; only index-selected keys are copied. In the
forward pass a batched :class:`~.plan.Run` of groups is one call over strided views; the backward
kernel is faster called group by group (measured), so the backward pass does that.

On this path out, lse, dQ, dK and dV are bitwise the same for any number of threads: the kernel
splits work by batch, head and query block and sums each row in one order, and groups are added
in plan order.
"""

from __future__ import annotations

import torch

from headwise.ops.attention.blockwise.plan import (
    Panel,
    Run,
    add_rows,
    bias_block,
    count,
    pattern_mask,
    put_rows,
)
from headwise.ops.attention.problem import bias_4d
from headwise.ops.attention.reference import compute_dtype
from headwise.types import ScoreMod

#: PyTorch's fused CPU attention kernel with its log-sum-exp (what SDPA runs on CPU), and its
#: backward; ``None`` where this torch build lacks them (then :func:`use_fused` is false)
FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FUSED_BACKWARD = getattr(
    torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None
)


def use_fused(q: torch.Tensor, v: torch.Tensor, score_mod: ScoreMod | None) -> bool:
    return (
        FUSED is not None
        and FUSED_BACKWARD is not None
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and q.shape[-1] == v.shape[-1]  # the kernel takes one head dim for q, k and v
        and score_mod is None
    )


class PanelGather:
    """Gathers each panel's keys of ``k`` and ``v`` (``(B, L, H, D)``) into one buffer reused
    by every panel: fresh multi-megabyte allocations each cost a round of page faults."""

    def __init__(self, plan: tuple[Panel, ...], k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        longest = max((len(p.keys) for p in plan if p.keys is not None), default=0)
        self.k_buf = k.new_empty(k.shape[0], longest, *k.shape[2:])
        self.v_buf = v.new_empty(v.shape[0], longest, *v.shape[2:])

    def __call__(self, panel: Panel) -> tuple[torch.Tensor, torch.Tensor]:
        if panel.keys is None:
            return self.k, self.v
        n = len(panel.keys)
        k_panel, v_panel = self.k_buf[:, :n], self.v_buf[:, :n]
        torch.index_select(self.k, 1, panel.keys, out=k_panel)
        torch.index_select(self.v, 1, panel.keys, out=v_panel)
        return k_panel, v_panel

    def zeros(self, panel: Panel) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed panel-shaped buffers (gradient accumulators); ``k``, ``v`` themselves for an
        ungathered panel."""
        if panel.keys is None:
            return self.k, self.v
        n = len(panel.keys)
        return self.k_buf[:, :n].zero_(), self.v_buf[:, :n].zero_()


def take(t: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    """Positions ``index`` of a ``(B, L, H, D)`` tensor as a ``(B, H, n, D)`` view (a slice) or
    copy (an index)."""
    part = t[:, index] if isinstance(index, slice) else t.index_select(1, index)
    return part.transpose(1, 2)


def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    group = heads // t.shape[2]
    return t.repeat_interleave(group, 2) if group > 1 else t


def run_rows(run: Run, t: torch.Tensor, b: int) -> torch.Tensor:
    """The run's query rows of batch element ``b`` of a ``(B, L, H, D)`` tensor as
    ``(G, H, n, D)``."""
    part = t[b, run.rows] if isinstance(run.rows, slice) else t[b].index_select(0, run.rows)
    return part.unflatten(0, (len(run.groups), -1)).transpose(1, 2)


def run_keys(run: Run, panel: torch.Tensor, b: int) -> torch.Tensor:
    """The run's keys of batch element ``b`` of a ``(B, P, H, D)`` panel as a strided
    ``(G, H, n, D)`` view: group ``i`` reads positions ``key_start + i * key_step`` onwards."""
    t = panel[b]
    n_keys = count(run.groups[0].keys)
    size = (len(run.groups), n_keys, *t.shape[1:])
    stride = (run.key_step * t.stride(0), *t.stride())
    offset = t.storage_offset() + run.key_start * t.stride(0)
    return t.as_strided(size, stride, offset).transpose(1, 2)


def run_mask(run: Run, dtype: torch.dtype) -> torch.Tensor | None:
    first = run.groups[0]
    return first.mask.to(dtype)[None] if first.needs_mask else None


def _additive_mask(bias, pattern, row, q_len, kv_len, dtype, device):
    """The pattern (as 0 / -inf) plus the bias for one query group, ``(B|1, H|1, rows, keys)``."""
    mask = None
    if pattern is not None and row.needs_mask:
        mask = pattern_mask(pattern, row, q_len, kv_len, device).to(dtype)[None]
    if bias is not None:
        block = bias_block(bias_4d(bias), row).to(dtype)
        # where, not +: a NaN or +inf bias entry at a hidden key must stay hidden
        mask = block if mask is None else torch.where(torch.isneginf(mask), float("-inf"), block)
    return mask


def _run_forward(run, q, k_panel, v_panel, scale, out, lse):
    mask = run_mask(run, q.dtype)
    for b in range(q.shape[0]):
        block_out, block_lse = FUSED(
            run_rows(run, q, b),
            run_keys(run, k_panel, b),
            run_keys(run, v_panel, b),
            0.0,
            False,
            attn_mask=mask,
            scale=scale,
        )
        if mask is not None and any(row.has_empty_rows for row in run.groups):
            block_lse = block_lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))
        put_rows(out[b], run.rows, block_out.transpose(1, 2).flatten(0, 1), 0)
        put_rows(lse[b], run.rows, block_lse.transpose(0, 1).flatten(1), 1)


def fused_forward(q, k, v, bias, pattern, scale, plan):
    batch, q_len, heads, _ = q.shape
    kv_len = k.shape[1]
    # index_select copies a strided source whole on every call: make each contiguous once
    q = q.contiguous()
    k, v = _repeat_kv(k, heads).contiguous(), _repeat_kv(v, heads).contiguous()
    out = q.new_zeros(batch, q_len, heads, v.shape[3])
    lse = torch.full((batch, heads, q_len), float("-inf"), device=q.device, dtype=torch.float32)
    gather = PanelGather(plan, k, v)
    for panel in plan:
        k_panel, v_panel = gather(panel)
        # a bias differs from group to group: no batched runs then
        for row in panel.runs if bias is None else panel.groups:
            if isinstance(row, Run):
                _run_forward(row, q, k_panel, v_panel, scale, out, lse)
                continue
            if count(row.keys) == 0:
                continue
            mask = _additive_mask(bias, pattern, row, q_len, kv_len, q.dtype, q.device)
            block_out, block_lse = FUSED(
                take(q, row.rows),
                take(k_panel, row.panel_keys),
                take(v_panel, row.panel_keys),
                0.0,
                False,
                attn_mask=mask,
                scale=scale,
            )
            if mask is not None and (row.has_empty_rows or bias is not None):
                # the kernel reports 0, not -inf, for rows that see no key
                block_lse = block_lse.masked_fill(torch.isneginf(mask).all(-1), float("-inf"))
            put_rows(out, row.rows, block_out.transpose(1, 2), 1)
            put_rows(lse, row.rows, block_lse, 2)
    return out, lse


def fused_backward(grad_out, q, k, v, bias, pattern, scale, plan, out, lse):
    batch, q_len, heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    dtype = compute_dtype(q.dtype)
    # index_select copies a strided source whole on every call: make each contiguous once
    k_rep = _repeat_kv(k, heads).contiguous()
    v_rep = _repeat_kv(v, heads).contiguous()
    d_out = grad_out.to(q.dtype).contiguous()
    out = out.to(q.dtype).contiguous()
    q = q.contiguous()
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k_rep.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(v_rep.shape, dtype=dtype, device=q.device)
    gather = PanelGather(plan, k_rep, v_rep)
    grads = PanelGather(plan, dk, dv)
    for panel in plan:
        k_panel, v_panel = gather(panel)
        dk_panel, dv_panel = grads.zeros(panel)
        for row in panel.groups:
            if count(row.keys) == 0:
                continue
            mask = _additive_mask(bias, pattern, row, q_len, kv_len, q.dtype, q.device)
            rows = row.rows
            dq_b, dk_b, dv_b = FUSED_BACKWARD(
                take(d_out, rows),
                take(q, rows),
                take(k_panel, row.panel_keys),
                take(v_panel, row.panel_keys),
                take(out, rows),
                safe_lse[:, :, rows],
                0.0,
                False,
                attn_mask=mask,
                scale=scale,
            )
            put_rows(dq, rows, dq_b.transpose(1, 2), 1)
            add_rows(dk_panel, row.panel_keys, dk_b.transpose(1, 2), 1)
            add_rows(dv_panel, row.panel_keys, dv_b.transpose(1, 2), 1)
        if panel.keys is not None:
            dk.index_add_(1, panel.keys, dk_panel)
            dv.index_add_(1, panel.keys, dv_panel)

    def per_kv_head(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return grad.view(batch, kv_len, kv_heads, heads // kv_heads, -1).sum(3).to(like.dtype)

    return dq.to(q.dtype), per_kv_head(dk, k), per_kv_head(dv, v)
