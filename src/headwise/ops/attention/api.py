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
every row by IEEE arithmetic. Attention dropout does not change which rows are poisoned: the
weights are the undropped ones, so a row is NaN whether or not its bad keys were dropped.

Attention dropout (``dropout_p``) follows :mod:`headwise.ops.attention.dropout`: the softmax
probabilities are multiplied by a keep mask ``Z / (1 - p)`` (the LSE stays the undropped one).
``native``, ``blockwise`` and ``reference`` draw ``Z`` from
:func:`~headwise.ops.attention.dropout.keep_mask` with the call's seed (``dropout_seed``, else
one drawn from torch's default generator, so ``torch.manual_seed`` fixes it: a 0-d tensor,
:func:`~headwise.ops.attention.dropout.draw_seed_tensor`, never read here, so that
``torch.compile`` keeps the draw in its graph and draws a fresh seed every run); ``sdpa`` draws its
own mask from torch's generator (another mask than ``keep_mask``'s, with the same keep rate; on
CPU the very mask eager attention's ``F.dropout`` draws from the same generator state) and so
serves no call with a
``dropout_seed``; ``flex`` serves no call with dropout.
"""

from __future__ import annotations

import torch

from headwise._checks import check_bool
from headwise.ops.attention.autotune import Call
from headwise.ops.attention.backends import BACKENDS
from headwise.ops.attention.dispatch import Explanation, choose
from headwise.ops.attention.dropout import Dropout, draw_seed_tensor
from headwise.ops.attention.nonfinite import has_non_finite, run_poisoned
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
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
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
        dropout_p: attention dropout rate in ``[0, 1)``, applied whenever it is above 0 (as
            SDPA's ``dropout_p``: the caller passes 0 outside training). 0 runs exactly the
            no-dropout path.
        dropout_seed: the seed of the keep mask (an int in ``[0, 2^64)``; module docstring);
            ``None`` draws one from torch's default generator. ``sdpa`` cannot follow it.

    Returns:
        ``out`` ``(B, Lq, H, Dv)``, or ``(out, lse)`` when ``return_lse``.
    """
    scale = check_scale(scale)
    problem = check_problem(q, k, v, pattern, bias, score_mod, return_lse, dropout_p, dropout_seed)
    call = _call(q, k, v, pattern, scale, bias, score_mod, problem, dropout_seed)
    choice = choose(problem, backend, call)
    if choice.backend is None:
        raise ValueError(f"no attention backend can serve this call:\n{choice}")
    chosen = BACKENDS[choice.backend]
    run = chosen.run
    dropout = None
    if problem.dropout_p > 0:
        seed = dropout_seed
        if seed is None and not chosen.draws_own_mask:
            seed = draw_seed_tensor()
        dropout = Dropout(problem.dropout_p, seed)
    if (
        not chosen.screens_non_finite
        and hides_keys(pattern, bias, score_mod)
        and has_non_finite(q, k, v)
    ):
        out, lse = run_poisoned(run, q, k, v, pattern, scale, bias, score_mod, dropout)
    else:
        out, lse = run(q, k, v, pattern, scale, bias, score_mod, dropout)
    return (out, lse) if return_lse else out


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
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
) -> Explanation:
    """Which backend :func:`attention` would use for these arguments, why not the others, and
    the times the choice rests on. Like :func:`attention`, it times the candidates on these
    tensors when their class of problem was never timed (:mod:`headwise.ops.attention.autotune`),
    so the call that follows takes the same backend."""
    problem = check_problem(q, k, v, pattern, bias, score_mod, return_lse, dropout_p, dropout_seed)
    call = _call(q, k, v, pattern, None, bias, score_mod, problem, dropout_seed)
    return choose(problem, backend, call)


def _call(q, k, v, pattern, scale, bias, score_mod, problem, dropout_seed) -> Call:
    """The backend call that timing makes: with dropout, the call's own seed or a fixed one (no
    seed is drawn for timing; ``sdpa``, which takes no seed, is timed under a forked generator)."""
    dropout = None
    if problem.dropout_p > 0:
        dropout = Dropout(problem.dropout_p, 0 if dropout_seed is None else dropout_seed)
    return Call(q, k, v, pattern, scale, bias, score_mod, dropout)


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
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
):
    """Attention over packed sequences: ``q`` ``(Tq, H, D)``, ``k``/``v`` ``(Tk, H_kv, D)``.

    Sequence ``i`` owns rows ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only to its own keys
    (``cu_seqlens_k``, default ``cu_seqlens``); ``causal`` is bottom-right aligned per sequence.
    An extra ``pattern`` (e.g. a sliding window) is intersected, in packed positions.
    ``dropout_p``/``dropout_seed`` as in :func:`attention`; the keep mask is that of the packed
    call (batch 1, packed positions).
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
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
    )
    if return_lse:
        return result[0][0], result[1][0]
    return result[0]
