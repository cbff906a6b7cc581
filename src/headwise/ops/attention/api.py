"""Softmax-attention entry points: :func:`attention`, :func:`attention_varlen`, :func:`explain`.

Non-finite inputs follow one rule on every backend (the reference obeys it too): when some key
can be hidden from some row (a pattern other than full, a bias or a ``score_mod``), a non-finite
entry of key/value ``j`` sets to NaN (out and lse) exactly the rows that give the bad keys a
weight (softmax probability, summed over them, computed in float32, float64 for float64 inputs)
of at least ``POISON_WEIGHT`` = 2^-126, float32's smallest normal number (about e^-87.3), and a
non-finite query row only itself; every other row, and every gradient reaching it, is what it
would be with the bad entries replaced by any finite value (up to that weight times the value).
The threshold, not ``weight > 0``, is what every backend can compute alike: a kernel may flush
subnormal weights to 0 (``native`` does), and half-precision outputs round tiny weights away. A
bias of ``-inf`` or ``finfo(dtype).min`` (Hugging Face's padding) gives weight 0: never
poisoned. Poisoned rows pass no gradient. With full attention and no bias or ``score_mod``
every row sees every key: nothing is checked (decoding pays nothing) and a bad entry reaches
every row by IEEE arithmetic.
"""

from __future__ import annotations

import torch

from headwise._checks import check_bool
from headwise.ops.attention.autotune import Call
from headwise.ops.attention.backends import BACKENDS
from headwise.ops.attention.dispatch import Explanation, choose
from headwise.ops.attention.problem import check_problem, check_scale, hides_keys
from headwise.ops.attention.varlen import seqlens_from_cu
from headwise.patterns import Pattern, documents
from headwise.types import Backend, ScoreMod


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    score_mod: ScoreMod | None = None,
    return_lse: bool = False,
    backend: Backend = "auto",
):
    """Softmax attention of ``q`` over ``k``/``v`` under ``pattern``.

    Args:
        q, k, v: ``(B, Lq, H, D)``, ``(B, Lk, H_kv, D)``, ``(B, Lk, H_kv, Dv)``.
        pattern: a :mod:`headwise.patterns` object (``None`` = full attention).
        scale: score scale, default ``1 / sqrt(D)``.
        bias: additive scores broadcastable to ``(B, H, Lq, Lk)`` (relative-position tables,
            ALiBi; ``-inf`` allowed). Gradients flow into it.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` applied to the scaled scores before
            ``bias`` (e.g. softcap). It must broadcast over index tensors (FlexAttention style).
        return_lse: also return the log-sum-exp ``(B, H, Lq)``.
        backend: ``"auto"``, one of ``"sdpa"``, ``"flex"``, ``"native"``, ``"blockwise"``,
            ``"reference"``, or a tuple of names to restrict ``auto`` to. ``auto`` takes the
            backend measured fastest for the call's class of problem (timed once per class and
            machine; ``HEADWISE_AUTOTUNE=0``: a fixed priority). :func:`explain` tells what
            ``auto`` picks and why.

    Returns:
        ``out`` ``(B, Lq, H, Dv)``, or ``(out, lse)`` when ``return_lse``.
    """
    scale = check_scale(scale)
    problem = check_problem(q, k, v, pattern, bias, score_mod, return_lse)
    choice = choose(problem, backend, Call(q, k, v, pattern, scale, bias, score_mod))
    if choice.backend is None:
        raise ValueError(f"no attention backend can serve this call:\n{choice}")
    run = BACKENDS[choice.backend].run
    if hides_keys(pattern, bias, score_mod) and has_non_finite(q, k, v):
        out, lse = run_poisoned(run, q, k, v, pattern, scale, bias, score_mod)
    else:
        out, lse = run(q, k, v, pattern, scale, bias, score_mod)
    return (out, lse) if return_lse else out


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


#: a row giving bad keys at least this weight is poisoned (module docstring): 2^-126
POISON_WEIGHT = torch.finfo(torch.float32).tiny


def run_poisoned(run, q, k, v, pattern, scale, bias, score_mod):
    """``run`` under the non-finite rule (module docstring): the backend sees copies with every
    non-finite entry replaced by 0, then a second, gradient-free pass of the same backend, in
    float32 at least, with ``v`` = 1 at bad keys and 0 elsewhere gives each row the weight it
    puts on bad keys, and the rows where that weight is at least :data:`POISON_WEIGHT` (or whose
    query is bad) become NaN."""
    bad_q = ~torch.isfinite(q).all(-1)  # (B, Lq, H)
    bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # (B, Lk, H_kv)
    if not (bad_q.any() or bad_kv.any()):
        return run(q, k, v, pattern, scale, bias, score_mod)
    q, k, v = (torch.where(torch.isfinite(t), t, 0) for t in (q, k, v))
    out, lse = run(q, k, v, pattern, scale, bias, score_mod)
    with torch.no_grad():
        wide = torch.promote_types(q.dtype, torch.float32)
        marks = bad_kv[..., None].to(wide).expand(v.shape).contiguous()
        qw, kw = q.detach().to(wide), k.detach().to(wide)
        fixed_bias = None
        if bias is not None:
            fixed_bias = bias.detach().to(torch.promote_types(bias.dtype, wide))
        weight_on_bad, _ = run(qw, kw, marks, pattern, scale, fixed_bias, score_mod)
        poisoned = (weight_on_bad[..., 0] >= POISON_WEIGHT) | bad_q  # (B, Lq, H)
    out = out.masked_fill(poisoned[..., None], float("nan"))
    if lse is not None:
        lse = lse.masked_fill(poisoned.transpose(1, 2), float("nan"))
    return out, lse


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    bias: torch.Tensor | None = None,
    score_mod: ScoreMod | None = None,
    return_lse: bool = False,
    backend: Backend = "auto",
) -> Explanation:
    """Which backend :func:`attention` would use for these arguments, why not the others, and
    the times the choice rests on. Like :func:`attention`, it times the candidates on these
    tensors when their class of problem was never timed (:mod:`headwise.ops.attention.autotune`),
    so the call that follows takes the same backend."""
    problem = check_problem(q, k, v, pattern, bias, score_mod, return_lse)
    return choose(problem, backend, Call(q, k, v, pattern, None, bias, score_mod))


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    pattern: Pattern | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    score_mod: ScoreMod | None = None,
    return_lse: bool = False,
    backend: Backend = "auto",
):
    """Attention over packed sequences: ``q`` ``(Tq, H, D)``, ``k``/``v`` ``(Tk, H_kv, D)``.

    Sequence ``i`` owns rows ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only to its own keys
    (``cu_seqlens_k``, default ``cu_seqlens``); ``causal`` is bottom-right aligned per sequence.
    An extra ``pattern`` (e.g. a sliding window) is intersected, in packed positions.
    Empty sequences are allowed. Returns ``(Tq, H, Dv)`` (and LSE ``(H, Tq)``).
    """
    check_bool("causal", causal)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be packed (T, H, D); got {shape}")
    q_lengths = seqlens_from_cu("cu_seqlens", cu_seqlens, q.shape[0])
    kv_lengths = seqlens_from_cu(
        "cu_seqlens_k", cu_seqlens if cu_seqlens_k is None else cu_seqlens_k, k.shape[0]
    )
    if len(q_lengths) != len(kv_lengths):
        raise ValueError(
            f"cu_seqlens and cu_seqlens_k must describe the same number of sequences; got "
            f"{len(q_lengths)} and {len(kv_lengths)}"
        )
    docs = documents(q_lengths, kv_lengths, causal=causal)
    result = attention(
        q[None],
        k[None],
        v[None],
        docs if pattern is None else docs & pattern,
        scale=scale,
        score_mod=score_mod,
        return_lse=return_lse,
        backend=backend,
    )
    if return_lse:
        return result[0][0], result[1][0]
    return result[0]
