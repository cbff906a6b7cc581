"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020):
how much each input token feeds each output through all layers, from the layers' attention
probabilities with the residual stream added as ``r I``. DCAL (Zhu et al., CVPR 2022) ranks
tokens for its global-local cross-attention by the CLS row of the same rollout with ``r = 1/2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from headwise._checks import ArgumentTypeError, check_choice, check_real

_FUSIONS = ("mean", "max", "min")


def residual_attention(
    probs: torch.Tensor, residual: float = 0.5, head_fusion: str = "mean"
) -> torch.Tensor:
    """One layer's ``A = (1 - r) fuse_h(a) + r I`` with rows renormalized (``(B, N, N)``).

    ``probs``: ``(B, H, N, N)`` (heads fused by ``head_fusion``: mean, max or min) or ``(B, N,
    N)``; computed in at least float32. Renormalizing changes nothing for row-stochastic maps
    fused by the mean and makes max/min fusions stochastic again.
    """
    if not isinstance(probs, torch.Tensor):
        raise ArgumentTypeError(f"probs must be a tensor; got {type(probs).__name__}")
    if probs.dim() not in (3, 4) or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"probs must be (B, H, N, N) or (B, N, N); got {tuple(probs.shape)}")
    check_choice("head_fusion", head_fusion, _FUSIONS)
    residual = check_real("residual", residual, minimum=0.0)
    a = probs.to(torch.promote_types(probs.dtype, torch.float32))
    if a.dim() == 4:
        a = {"mean": a.mean, "max": a.amax, "min": a.amin}[head_fusion](1)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a = (1 - residual) * a + residual * eye
    return a / a.sum(-1, keepdim=True)


def attention_rollout(
    maps: Sequence[torch.Tensor], residual: float = 0.5, head_fusion: str = "mean"
) -> torch.Tensor:
    """``R = A^L ... A^1`` with ``A^l`` = :func:`residual_attention` of layer ``l``'s
    probabilities (``maps``, first layer first, each ``(B, H, N, N)`` or ``(B, N, N)``).

    ``R[b, i, j]`` is the relevance of input ``j`` for output ``i``; row 0 is the CLS token's
    accumulated attention (what DCAL's GLCA ranks tokens by). Returns ``(B, N, N)``.
    """
    if isinstance(maps, torch.Tensor) or not isinstance(maps, Sequence):
        raise ArgumentTypeError(f"maps must be a sequence of tensors; got {type(maps).__name__}")
    if not maps:
        raise ValueError("maps must hold at least one attention map; got an empty sequence")
    result = None
    for i, probs in enumerate(maps):
        try:
            a = residual_attention(probs, residual, head_fusion)
        except ValueError as error:
            raise type(error)(f"maps[{i}]: {error}") from None
        if result is not None and result.shape != a.shape:
            raise ValueError(
                f"maps[{i}] must match the earlier maps' (B, N, N) = {tuple(result.shape)}; got "
                f"{tuple(probs.shape)}"
            )
        result = a if result is None else a @ result
    return result
