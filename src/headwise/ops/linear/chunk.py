"""Lightning Attention-2 chunked algorithm in PyTorch, and the autograd rule shared with Triton.

Split the sequence into chunks of ``C`` tokens. For a chunk with local index ``j = 0..m-1`` and
the state ``S`` left by the previous chunks (Qin et al., "Lightning Attention-2", arXiv
2401.04658)::

    O_intra = [(Q K^T) * Dg] V,          Dg[j, j'] = lam^(j - j')  for j >= j', else 0
    O_inter = diag(lam^(j + 1)) Q S
    S      <- lam^m S + (diag(lam^(m - 1 - j)) K)^T V

This is the ``a_j = j + 1`` index convention of the TransNormerLLM prefill (the query factor
``lam^(j+1)`` pairs with the key factor ``lam^(m-1-j)`` and the true chunk length ``m``); no
cumulative sum runs over the whole sequence and no decay power is ever divided by.

Backward needs no kernel of its own: every gradient of causal decayed linear attention is again
causal decayed linear attention, forward or reversed in time (``rev`` flips the length axis)::

    dQ = LA(dO, V, K; S_0^T)
    dK = rev LA(rev V, rev dO, rev Q) + lam^(L-1-s) V dS_L^T
    dV = rev LA(rev K, rev Q, rev dO) + lam^(L-1-s) K dS_L
    dS_0 = lam * final_state(LA(rev K, rev Q, rev dO)) + lam^L dS_L

and, with ``gamma = log lam`` and every weight ``lam^(read time - write time)``, the decay gradient
is ``sum_t t (q_t . dq_t) + (L-1) <dS_L, S_L> - sum_s s (k_s . dk_s) + <dS_0, S_0>``.
So :class:`DecayedLinearAttention` runs any forward routine three more times for the backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

#: ``(q, k, v, gamma, initial_state, chunk_size, return_state) -> (o, final_state | None)``;
#: ``o`` is returned in the compute dtype (float32, or float64 for float64 inputs).
ForwardFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int, bool],
    tuple[torch.Tensor, torch.Tensor | None],
]

#: Chunks per segment of :func:`chunk_forward` (1024 tokens at the default chunk of 64).
SEGMENT_CHUNKS = 16


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    initial_state: torch.Tensor | None,
    chunk_size: int,
    return_state: bool,
    *,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal decayed linear attention by chunks (see the module docstring).

    ``q, k: (B, L, H, D)``, ``v: (B, L, H, E)``, ``gamma = log(lam): (H,)``, state ``(B, H, D, E)``.
    The sequence is walked in segments of ``G =`` :data:`SEGMENT_CHUNKS` chunks: every temporary
    (padded blocks, scores, per-chunk states) has the size of one segment, ``O(B H G C (C + D + E)
    + B H G D E)`` whatever ``L``, so the time per token does not grow with the length (states
    for the whole sequence, ``B H (L/C) D E`` floats, 128 MiB at 64k tokens with ``H = 8`` and
    ``D = E = 64``, fall out of cache and made the per-token time 2.9x that at 1k). Within a
    segment the states entering the chunks come from one matrix product instead of a loop::

        S_c  = lam^(c C) S + sum_{c' < c} lam^((c - 1 - c') C) KV_c'
        KV_c = (diag(lam^(m - 1 - j)) K_c)^T V_c          (m: the chunk's true length)

    Output and state are in the compute dtype; each segment converts only its own slice.
    ``reverse=True`` runs on the time-reversed sequence and returns the output in the original
    order (``rev chunk_forward(rev q, rev k, rev v)``, as the backward needs) by flipping one
    segment at a time, never the whole sequence.
    """
    dtype = compute_dtype(q.dtype)
    batch, length, heads, dim = q.shape
    dim_v = v.shape[-1]
    g = gamma.to(dtype)
    c = chunk_size
    n_chunks = max(1, math.ceil(length / c))
    groups = min(SEGMENT_CHUNKS, n_chunks)
    j = torch.arange(c, device=q.device, dtype=dtype)
    diff = j[:, None] - j[None, :]
    intra = (torch.exp(g[:, None, None] * diff.clamp(min=0)) * (diff >= 0))[:, None]  # (H,1,C,C)
    query_decay = torch.exp(g[:, None] * (j + 1))[:, None, :, None]  # (H, 1, C, 1)
    key_decay = torch.exp(g[:, None] * (c - 1 - j))[:, None, :, None]  # full chunks
    # carry[h, a, b] = lam^((a - 1 - b) C) for b < a: what chunk b's KV weighs entering chunk a.
    a = torch.arange(groups, device=q.device, dtype=dtype)
    steps = a[:, None] - 1 - a[None, :]
    carry = torch.exp(g[:, None, None] * c * steps.clamp(min=0)) * (steps >= 0)  # (H, G, G)
    enter = torch.exp(g[:, None] * c * a)[..., None]  # (H, G, 1): lam^(a C) on the carried S

    # Padded to whole chunks, so that every segment writes its blocks with one strided copy.
    o = q.new_empty(batch, n_chunks * c, heads, dim_v, dtype=dtype)
    state = q.new_zeros(batch, heads, dim * dim_v, dtype=dtype)
    if initial_state is not None:
        state = state + initial_state.to(dtype).flatten(-2)
    for first in range(0, n_chunks, groups):
        n = min(groups, n_chunks - first)
        start, stop = first * c, min(length, (first + n) * c)
        last = stop - start - (n - 1) * c  # true length of the segment's last chunk
        window = slice(length - stop, length - start) if reverse else slice(start, stop)
        qb, kb, vb = (
            _blocks(x[:, window].flip(1) if reverse else x[:, window], n, c, dtype)
            for x in (q, k, v)
        )
        out = (qb @ kb.transpose(-1, -2)).mul_(intra) @ vb  # (B, H, n, C, E)
        if last == c:
            kd = key_decay
        else:  # only the sequence's last chunk is short; its padded keys are 0
            lengths = torch.full((n, 1), c, device=q.device, dtype=dtype)
            lengths[-1] = last
            kd = torch.exp(g[:, None, None] * (lengths - 1 - j).clamp(min=0))[..., None]
        chunk_kv = (kb * kd).transpose(-1, -2) @ vb  # (B, H, n, D, E)
        entering = carry[:, :n, :n] @ chunk_kv.flatten(-2)
        entering.addcmul_(enter[:, :n], state[:, :, None])  # (B, H, n, D E)
        out.add_((qb * query_decay) @ entering.view(batch, heads, n, dim, dim_v))
        if reverse:
            out = out.permute(0, 2, 3, 1, 4).reshape(batch, n * c, heads, dim_v)
            o[:, window] = out[:, : stop - start].flip(1)
        else:
            o[:, start : start + n * c].view(batch, n, c, heads, dim_v).copy_(
                out.permute(0, 2, 3, 1, 4)
            )
        state = entering[:, :, -1] * torch.exp(g * last)[:, None] + chunk_kv[:, :, -1].flatten(-2)
    final = state.view(batch, heads, dim, dim_v) if return_state else None
    return o[:, :length], final


def _blocks(x: torch.Tensor, n: int, c: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, T, H, .)`` zero-padded to ``n`` chunks of ``c`` tokens: contiguous ``(B, H, n, C, .)``
    in ``dtype``, made by one copy (the layout change and the cast together)."""
    if x.shape[1] < n * c:
        x = F.pad(x, (0, 0, 0, 0, 0, n * c - x.shape[1]))
    x = x.reshape(x.shape[0], n, c, x.shape[2], -1).permute(0, 3, 1, 2, 4)
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def _time_reversed(
    fwd: ForwardFn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gamma: torch.Tensor,
    chunk_size: int,
    return_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rev fwd(rev q, rev k, rev v)`` from a zero state; the chunked path flips by segments."""
    if fwd is chunk_forward:
        return chunk_forward(q, k, v, gamma, None, chunk_size, return_state, reverse=True)
    o, state = fwd(q.flip(1), k.flip(1), v.flip(1), gamma, None, chunk_size, return_state)
    return o.flip(1), state


class DecayedLinearAttention(torch.autograd.Function):
    """Causal decayed linear attention with the backward of the module docstring.

    ``apply(q, k, v, gamma, initial_state, forward_fn, chunk_size, return_state)`` returns
    ``(o, final_state)``; ``o`` has the dtype of ``v``, the state the compute dtype (``final_state``
    is an empty tensor when ``return_state`` is False, as autograd Functions return tensors).
    """

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gamma: torch.Tensor,
        initial_state: torch.Tensor | None,
        forward_fn: ForwardFn,
        chunk_size: int,
        return_state: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        need_final = return_state or ctx.needs_input_grad[3]
        o, final = forward_fn(q, k, v, gamma, initial_state, chunk_size, need_final)
        ctx.forward_fn, ctx.chunk_size = forward_fn, chunk_size
        ctx.save_for_backward(q, k, v, gamma, initial_state, final)
        if final is None or not return_state:
            final_out = o.new_empty(0)
        else:
            final_out = final
        ctx.mark_non_differentiable(*(() if return_state else (final_out,)))
        return o.to(v.dtype), final_out

    @staticmethod
    def backward(ctx, grad_o: torch.Tensor, grad_final: torch.Tensor):
        q, k, v, gamma, s0, final = ctx.saved_tensors
        fwd, chunk = ctx.forward_fn, ctx.chunk_size
        dtype = compute_dtype(q.dtype)
        length = q.shape[1]
        grad_o = torch.zeros_like(v, dtype=dtype) if grad_o is None else grad_o.to(dtype)
        d_final = grad_final.to(dtype) if grad_final is not None and grad_final.numel() else None
        lam = torch.exp(gamma.to(dtype))

        s0_t = None if s0 is None else s0.transpose(-1, -2)
        dq, _ = fwd(grad_o, v, k, gamma, s0_t, chunk, False)
        dk, _ = _time_reversed(fwd, v, grad_o, q, gamma, chunk, False)
        dv, q_do = _time_reversed(fwd, k, q, grad_o, gamma, chunk, True)
        ds0 = q_do * lam[:, None, None]
        if d_final is not None:
            pos = torch.arange(length, device=q.device, dtype=dtype)
            survive = torch.exp(gamma.to(dtype)[None, :] * (length - 1 - pos)[:, None])  # (L, H)
            dk = dk + torch.einsum("blhe,bhde->blhd", v.to(dtype), d_final) * survive[..., None]
            dv = dv + torch.einsum("blhd,bhde->blhe", k.to(dtype), d_final) * survive[..., None]
            ds0 = ds0 + torch.exp(gamma.to(dtype) * length)[:, None, None] * d_final

        dgamma = None
        if ctx.needs_input_grad[3]:
            pos = torch.arange(length, device=q.device, dtype=dtype)[None, :, None, None]
            dgamma = (pos * (q.to(dtype) * dq - k.to(dtype) * dk)).sum(dim=(0, 1, 3))
            if d_final is not None:
                dgamma = dgamma + (length - 1) * (d_final * final).sum(dim=(0, 2, 3))
            if s0 is not None:
                dgamma = dgamma + (ds0 * s0.to(dtype)).sum(dim=(0, 2, 3))
            dgamma = dgamma.to(gamma.dtype)
        ds0_out = None if s0 is None else ds0.to(s0.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dgamma, ds0_out, None, None, None
