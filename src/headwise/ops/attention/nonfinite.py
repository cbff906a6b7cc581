"""Attention's non-finite rule (stated in :mod:`headwise.ops.attention.api`), in one place for
every backend: :func:`has_non_finite` looks, :func:`poisoned_rows` finds the rows a bad key or
value reaches, :func:`run_poisoned` runs a backend under the rule. The ``native`` and ``sdpa``
custom operators apply it inside their own implementations (:mod:`.native.autograd`,
:mod:`.sdpa`), where ``torch.compile`` does not trace the data-dependent branch.
"""

from __future__ import annotations

import torch

#: a row giving bad keys at least this weight is poisoned (the rule): 2^-126, float32's smallest
#: normal number
POISON_WEIGHT = torch.finfo(torch.float32).tiny


def has_non_finite(*tensors: torch.Tensor) -> bool:
    """Whether some entry may be inf or NaN: one reduction per tensor, no copy (about 0.3% of a
    causal or windowed prefill; as much as one more read of the KV cache when decoding). A sum is
    non-finite if an entry is (inf + x = inf, inf - inf = NaN) or if it overflows (rare in
    float32: then :func:`run_poisoned` finds no bad entry and runs the backend as usual). Meta
    tensors hold no values: nothing to check."""
    if any(t.is_meta for t in tensors):
        return False
    return not all(
        torch.isfinite(t.detach().sum(dtype=torch.promote_types(t.dtype, torch.float32)))
        for t in tensors
    )


def poisoned_rows(run, q, k, v, pattern, scale, bias, score_mod):
    """``(q, k, v, poisoned)``: copies of the inputs with every non-finite entry replaced by 0,
    and the rows ``(B, Lq, H)`` the rule makes NaN: those whose query is bad or that give bad
    keys at least :data:`POISON_WEIGHT` (a gradient-free pass of ``run``, in float32 at least,
    with ``v`` = 1 at bad keys and 0 elsewhere); ``None`` when no entry is non-finite."""
    bad_q = ~torch.isfinite(q).all(-1)  # (B, Lq, H)
    bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Lk, H_kv)
    if not (bad_q.any() or bad_kv.any()):
        return None
    q, k, v = (torch.where(torch.isfinite(t), t, 0) for t in (q, k, v))
    with torch.no_grad():
        wide = torch.promote_types(q.dtype, torch.float32)
        marks = bad_kv[..., None].to(wide).expand(v.shape).contiguous()
        qw, kw = q.detach().to(wide), k.detach().to(wide)
        fixed_bias = None
        if bias is not None:
            fixed_bias = bias.detach().to(torch.promote_types(bias.dtype, wide))
        weight_on_bad, _ = run(qw, kw, marks, pattern, scale, fixed_bias, score_mod, None)
        poisoned = (weight_on_bad[..., 0] >= POISON_WEIGHT) | bad_q
    return q, k, v, poisoned


def run_poisoned(run, q, k, v, pattern, scale, bias, score_mod, dropout=None):
    """``run`` (a backend's ``run``) under the rule: the backend sees the inputs of
    :func:`poisoned_rows`, and the poisoned rows of its ``out`` and ``lse`` become NaN.
    ``dropout`` applies to the backend's pass, never to the weight pass: the weights that poison
    a row are the undropped ones."""
    found = poisoned_rows(run, q, k, v, pattern, scale, bias, score_mod)
    if found is None:
        return run(q, k, v, pattern, scale, bias, score_mod, dropout)
    q, k, v, poisoned = found
    out, lse = run(q, k, v, pattern, scale, bias, score_mod, dropout)
    out = out.masked_fill(poisoned[..., None], float("nan"))
    if lse is not None:
        lse = lse.masked_fill(poisoned.transpose(1, 2), float("nan"))
    return out, lse
