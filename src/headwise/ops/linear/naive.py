"""Reference implementations of decayed linear attention: the spec the fast paths are tested on.

Both functions take already feature-mapped ``q, k`` of shape ``(B, L, H, D)``, ``v`` of shape
``(B, L, H, E)``, an optional per-head decay ``lam`` of shape ``(H,)`` with values in ``(0, 1]``
and an optional state ``(B, H, D, E)``. With ``S_{-1}`` the initial state (zeros if absent)::

    S_t = lam * S_{t-1} + k_t^T v_t,        o_t = q_t S_t                       (causal)
    o_i = sum_j lam^|i - j| (q_i . k_j) v_j                                     (non-causal)

There is no softmax, no ``1/sqrt(D)`` scale and no denominator (Lightning Attention and
TransNormerLLM, Qin et al., arXiv 2307.14995 and 2401.04658). Both compute in the dtype they are
given, so the same code serves as the low-precision baseline and, in float64, as the oracle.
"""

from __future__ import annotations

import torch


def _powers(lam: torch.Tensor | None, exponents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``lam_h ** exponents`` with a leading head axis; exponents must be non-negative."""
    if lam is None:
        return torch.ones((1, *exponents.shape), dtype=dtype, device=exponents.device)
    lam = lam.to(dtype).reshape(-1, *([1] * exponents.dim()))
    return lam ** exponents.to(dtype)


def quadratic_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor | None = None,
    *,
    causal: bool = True,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked quadratic form ``O = [(Q K^T) * M] V``; returns ``(o, final_state)``.

    ``M[t, s] = lam^(t - s)`` for ``s <= t`` (causal) or ``lam^|t - s|`` (non-causal). The initial
    state adds ``lam^(t + 1) q_t S_{-1}`` to ``o_t``. The final state is ``None`` when non-causal.
    """
    length = q.shape[1]
    pos = torch.arange(length, device=q.device)
    diff = pos[:, None] - pos[None, :]
    mask = _powers(lam, diff.abs(), q.dtype)
    if causal:
        mask = mask * (diff >= 0)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * mask
    o = torch.einsum("bhts,bshe->bthe", scores, v)
    if not causal:
        return o, None
    write = _powers(lam, length - 1 - pos, q.dtype)  # (H, L): how much of token s survives
    state = torch.einsum("bshd,bshe,hs->bhde", k, v, write.expand(q.shape[2], -1))
    if initial_state is not None:
        s0 = initial_state.to(q.dtype)
        read = _powers(lam, pos + 1, q.dtype)  # (H, L)
        o = o + torch.einsum("bthd,bhde,ht->bthe", q, s0, read.expand(q.shape[2], -1))
        survive = _powers(lam, torch.tensor(length, device=q.device), q.dtype)
        state = state + survive.reshape(-1, 1, 1) * s0
    return o, state


def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam: torch.Tensor | None = None,
    *,
    causal: bool = True,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence; returns ``(o, final_state)`` (state ``None`` if non-causal).

    Non-causal adds a right-to-left sweep ``R_i = lam (R_{i+1} + k_{i+1}^T v_{i+1})``, so that
    ``o_i = q_i (S_i + R_i)``.
    """
    batch, length, heads, dim = q.shape
    decay = 1.0 if lam is None else lam.to(q.dtype)[:, None, None]
    state = q.new_zeros(batch, heads, dim, v.shape[-1])
    if initial_state is not None:
        state = state + initial_state.to(q.dtype)
    outs = []
    for t in range(length):
        state = decay * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, t], state))
    if not causal:
        right = torch.zeros_like(state)
        for t in range(length - 1, -1, -1):
            outs[t] = outs[t] + torch.einsum("bhd,bhde->bhe", q[:, t], right)
            right = decay * (right + k[:, t, :, :, None] * v[:, t, :, None, :])
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(batch, 0, heads, v.shape[-1])
    return o, (state if causal else None)
