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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal decayed linear attention by chunks (see the module docstring).

    ``q, k: (B, L, H, D)``, ``v: (B, L, H, E)``, ``gamma = log(lam): (H,)``, state ``(B, H, D, E)``.
    Memory is ``O(B H L C)`` for the intra-chunk scores plus ``O(B H D E L / C)`` for the states.
    """
    dtype = compute_dtype(q.dtype)
    batch, length, heads, dim = q.shape
    dim_v = v.shape[-1]
    n_chunks = max(1, math.ceil(length / chunk_size))
    pad = n_chunks * chunk_size - length

    def blocks(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
        return x.view(batch, n_chunks, chunk_size, heads, -1).permute(0, 3, 1, 2, 4)

    qb, kb, vb = blocks(q), blocks(k), blocks(v)  # (B, H, n, C, .)
    g = gamma.to(dtype)
    j = torch.arange(chunk_size, device=q.device, dtype=dtype)
    lengths = torch.full((n_chunks,), chunk_size, device=q.device, dtype=dtype)
    lengths[-1] = length - (n_chunks - 1) * chunk_size

    diff = j[:, None] - j[None, :]
    intra = torch.exp(g[:, None, None] * diff.clamp(min=0)) * (diff >= 0)  # (H, C, C)
    scores = (qb @ kb.transpose(-1, -2)) * intra[:, None]
    o = scores @ vb

    # Padded tokens have k = 0, so clamping their (negative) exponents changes nothing.
    key_decay = torch.exp(g[:, None, None] * (lengths[:, None] - 1 - j).clamp(min=0))  # (H, n, C)
    chunk_kv = (kb * key_decay[..., None]).transpose(-1, -2) @ vb  # (B, H, n, D, E)
    chunk_decay = torch.exp(g[:, None] * lengths)[..., None, None]  # (H, n, 1, 1)

    state = q.new_zeros(batch, heads, dim, dim_v, dtype=dtype)
    if initial_state is not None:
        state = state + initial_state.to(dtype)
    entering = []
    for c in range(n_chunks):
        entering.append(state)
        state = state * chunk_decay[:, c] + chunk_kv[:, :, c]
    query_decay = torch.exp(g[:, None] * (j + 1))[:, None, :, None]  # (H, 1, C, 1)
    o = o + (qb * query_decay) @ torch.stack(entering, dim=2)

    o = o.permute(0, 2, 3, 1, 4).reshape(batch, n_chunks * chunk_size, heads, dim_v)
    return o[:, :length], (state if return_state else None)


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

        def rev(x: torch.Tensor) -> torch.Tensor:
            return x.flip(1)

        dk, _ = fwd(rev(v), rev(grad_o), rev(q), gamma, None, chunk, False)
        dv, q_do = fwd(rev(k), rev(q), rev(grad_o), gamma, None, chunk, True)
        dk, dv = rev(dk), rev(dv)
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
