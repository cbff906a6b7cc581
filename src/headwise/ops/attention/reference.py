"""The oracle: softmax attention in plain PyTorch, float32 (or float64) accumulation, L x L scores.

    S = score_mod(scale * Q K^T) + bias,   S[h, i, j] = -inf where the pattern hides key j
    lse_i = log sum_j exp(S_ij),            O_i = sum_j exp(S_ij - lse_i) V_j

With attention dropout (:mod:`.dropout`) ``O_i = sum_j exp(S_ij - lse_i) Z_ij / (1 - p) V_j``
with the whole keep mask ``Z`` of :func:`~.dropout.keep_mask`; ``lse`` is the undropped one.

A row with no visible key returns O_i = 0 and lse_i = -inf (never NaN). Gradients come from
autograd. Every fast backend is tested against this function.

Non-finite inputs, when some key can be hidden from some row (a pattern other than full, a bias or
a ``score_mod``): the scores are computed with every non-finite entry of Q, K, V replaced by 0,
then the rows whose weights on non-finite keys or values add up to at least 2^-126 (float32's
smallest normal number: every backend computes that alike, see :mod:`.api`), and the rows whose
own query is non-finite, are set to NaN (out and lse). A key a row does not see never reaches it,
forward or backward; :func:`headwise.ops.attention.attention` gives every backend this rule.
"""

from __future__ import annotations

import torch

from headwise.ops.attention.dropout import Dropout
from headwise.ops.attention.problem import apply_score_mod, bias_4d, hides_keys, score_indices
from headwise.patterns import Pattern
from headwise.types import ScoreMod


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_softmax_av(
    scores: torch.Tensor, values: torch.Tensor, dropped: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scores) @ values`` and the row log-sum-exp, safe for rows that are all ``-inf``.

    ``scores`` is ``(..., Lq, n)``, ``values`` is ``(..., n, Dv)`` (broadcastable batch dims).
    ``dropped`` (shaped like ``scores``), when given, multiplies the probabilities before
    ``values`` (dropout's ``Z / (1 - p)``); the log-sum-exp is the undropped one.
    """
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(-1, keepdim=True)
    visible = total > 0
    probs = weights / torch.where(visible, total, torch.ones_like(total))
    out = (probs if dropped is None else probs * dropped) @ values
    lse = torch.where(
        visible,
        row_max + torch.log(torch.where(visible, total, torch.ones_like(total))),
        torch.full_like(total, float("-inf")),
    )
    return out, lse.squeeze(-1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    score_mod: ScoreMod | None = None,
    dropout: Dropout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out (B, Lq, H, Dv) in q.dtype, lse (B, H, Lq))``; inputs ``(B, L, H, D)``.

    ``lse`` is float32 (float64 for float64 inputs). ``dropout``: attention dropout's rate and
    seed (``None``: none).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    dtype = compute_dtype(q.dtype)
    group = heads // kv_heads
    bad_q = bad_kv = None
    if hides_keys(pattern, bias, score_mod):
        bad_q = ~torch.isfinite(q).all(-1)  # (B, Lq, H)
        bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Lk, H_kv)
        if bad_q.any() or bad_kv.any():
            q, k, v = (torch.where(torch.isfinite(t), t, 0) for t in (q, k, v))
        else:
            bad_q = bad_kv = None
    qh = q.transpose(1, 2).to(dtype)
    kh = k.transpose(1, 2).to(dtype).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).to(dtype).repeat_interleave(group, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    if score_mod is not None:
        q_idx = torch.arange(q_len, device=q.device)
        kv_idx = torch.arange(kv_len, device=q.device)
        scores = apply_score_mod(score_mod, scores, *score_indices(batch, heads, q_idx, kv_idx))
    if bias is not None:
        scores = scores + bias_4d(bias).to(dtype)
    if pattern is not None:
        visible = pattern.dense_mask(q_len, kv_len, device=q.device)
        scores = scores.masked_fill(~visible[None], float("-inf"))
    dropped = None
    if dropout is not None:
        dropped = dropout.weights(batch, heads, q_len, kv_len, device=q.device, dtype=dtype)
    out, lse = masked_softmax_av(scores, vh, dropped)
    if bad_q is not None:
        weights = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse)[..., None])
        bad_keys = bad_kv.transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, Lk)
        on_bad = (weights * bad_keys[:, :, None]).sum(-1)
        sees_bad = (on_bad >= torch.finfo(torch.float32).tiny) | bad_q.transpose(1, 2)
        out = out.masked_fill(sees_bad[..., None], float("nan"))
        lse = lse.masked_fill(sees_bad, float("nan"))
    return out.transpose(1, 2).to(q.dtype), lse
