"""The quadratic ("parallel") form of linear attention for short sequences, with its own backward.

For similarities ``S = phi(Q) phi(K)^T`` (or a feature map's closed form, e.g. Based's Taylor
``1 + z + z^2 / 2``; Arora et al., "Simple linear attention language models balance the
recall-throughput tradeoff", 2024) and the decay mask ``M[t, s] = lam^(t - s)`` for ``s <= t``
(causal) or ``lam^|t - s|`` (all ones without decay; Qin et al., Lightning Attention-2, arXiv
2401.04658)::

    A = S * M,    O = A V,    normalize:  O = (A V) / n,   n = A 1 + eps

(Katharopoulos et al. 2020). The backward, with ``G = dO / n`` (``dO`` without normalize)::

    dV = A^T G,    dS = (G V^T - rowsum(G * O) 1^T) * M

and for Taylor's ``z = q . k / sqrt(D)``, ``dz = dS (1 + z)``.

Autograd through the same few operators builds the ones column of the normalizer, copies the
masked scores and hands the feature map's backward permuted gradients; one function with this
rule does neither. :func:`headwise.ops.linear.naive.quadratic_linear_attention` is its reference.
"""

from __future__ import annotations

import torch

from headwise.ops.linear.feature_maps import taylor_of


def _heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, L, H, X) -> (B, H, L, X)``: ``bmm`` takes each matrix with any row stride, but
    copies a batch whose ``(B, H)`` strides do not merge matrix by matrix, so those are made
    contiguous here once."""
    x = x.transpose(1, 2).to(dtype)
    return x if x.shape[1] == 1 and x.stride(-1) == 1 else x.contiguous()


def _mask_(scores: torch.Tensor, weight: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """``scores * M`` in place."""
    if weight is not None:
        return scores.mul_(weight)
    return scores.tril_() if causal else scores


def _attend(ctx, a, v, normalize, eps):
    """``o`` from the masked scores ``a``; saves what :func:`_attend_backward` needs."""
    vh = _heads_first(v, a.dtype)
    o = a @ vh
    norm = a.sum(-1, keepdim=True).add_(eps) if normalize else None
    if normalize:
        o = o.div_(norm)
    ctx.v_dtype = v.dtype
    return o, (a, vh, o if normalize else None, norm)


def _attend_backward(ctx, grad_o, a, vh, o, norm, weight):
    """``(dS, dV)`` for ``dO``; ``dS`` is ``(B, H, L, S)``, ``dV`` ``(B, S, H, E)``."""
    g = _heads_first(grad_o, a.dtype)
    if norm is not None:
        g = g / norm
    grad_a = g @ vh.mT
    if norm is not None:
        grad_a.sub_((g * o).sum(-1, keepdim=True))
    grad_v = (a.mT @ g).transpose(1, 2).to(ctx.v_dtype)
    return _mask_(grad_a, weight, ctx.causal), grad_v


class ParallelLinearAttention(torch.autograd.Function):
    """``o = parallel(scores, v)`` as in the module docstring, from given similarities.

    ``scores: (B, H, L, S)`` in the compute dtype, ``v: (B, S, H, E)``, ``weight``: the decay
    mask ``M`` of shape ``(H, L, S)`` including its causal zeros, or ``None`` (no decay; then
    ``causal`` masks the upper triangle). It must not require a gradient. Returns ``o: (B, L, H,
    E)`` in ``scores``' dtype.
    """

    @staticmethod
    def forward(ctx, scores, v, weight, causal, normalize, eps):
        ctx.causal = causal
        a = scores * weight if weight is not None else scores.tril() if causal else scores
        o, saved = _attend(ctx, a, v, normalize, eps)
        ctx.save_for_backward(*saved, weight)
        return o.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_o):
        grad_scores, grad_v = _attend_backward(ctx, grad_o, *ctx.saved_tensors)
        return grad_scores, grad_v, None, None, None, None


class ParallelFeatureLinearAttention(torch.autograd.Function):
    """``o = parallel(S, v)`` from ``qf, kf: (B, L, H, F)``: ``S = qf kf^T`` (features), or with
    ``taylor`` Based's closed form ``S = 1 + z + z^2 / 2``, ``z = qf kf^T / sqrt(F)`` on the raw
    ``q, k`` (:func:`headwise.ops.linear.feature_maps.taylor_of`, as ``taylor_similarity``
    computes it; ``dz = dS (1 + z)``, ``z`` recomputed in the backward). The other
    arguments as :class:`ParallelLinearAttention`. Backward ``dQf = dz Kf``, ``dKf = dz^T Qf``
    (times ``1 / sqrt(F)`` with ``taylor``), each returned contiguous in ``(B, L, H, F)``."""

    @staticmethod
    def forward(ctx, qf, kf, v, weight, causal, normalize, eps, dtype, taylor):
        ctx.causal, ctx.q_dtype, ctx.taylor = causal, qf.dtype, taylor
        qh, kh = _heads_first(qf, dtype), _heads_first(kf, dtype)
        scores = qh @ kh.mT
        if taylor:
            scores = taylor_of(scores.mul_(qh.shape[-1] ** -0.5))
        a = _mask_(scores, weight, causal)
        o, saved = _attend(ctx, a, v, normalize, eps)
        ctx.save_for_backward(qh, kh, *saved, weight)
        return o.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_o):
        qh, kh, *saved = ctx.saved_tensors
        grad_z, grad_v = _attend_backward(ctx, grad_o, *saved)
        if ctx.taylor:
            scale = qh.shape[-1] ** -0.5
            grad_z.mul_((qh @ kh.mT).mul_(scale).add_(1.0)).mul_(scale)
        grad_q = (grad_z @ kh).transpose(1, 2).to(ctx.q_dtype).contiguous()
        grad_k = (grad_z.mT @ qh).transpose(1, 2).to(ctx.q_dtype).contiguous()
        return grad_q, grad_k, grad_v, None, None, None, None, None, None


def decay_mask(lam: torch.Tensor, length: int, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """``M: (H, L, L)`` with ``M[h, t, s] = lam_h^(t - s)`` for ``s <= t``, 0 above the diagonal
    when ``causal``, else ``lam_h^|t - s|``; ``lam: (H,)`` or ``(1,)``, in ``dtype``."""
    pos = torch.arange(length, device=lam.device, dtype=dtype)
    weight = lam.to(dtype)[:, None, None] ** (pos[:, None] - pos[None, :]).abs()
    return weight.tril() if causal else weight
