"""VL-SAM's attention map (Lin et al., "Training-free Open-Ended Object Detection and
Segmentation via Attention as Prompts", NeurIPS 2024): heads weighted by how peaked they are,
aggregated and rolled out over layers with a regularization of causal columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from headwise.hf.scores import real_rows


def vlsam_head_weights(
    probs: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """VL-SAM's head weights ``W[h] = mean_i max_j a[h, i, j]`` (peaked heads weigh more):
    ``(B, H, N, N) -> (B, H)``; with ``attention_mask`` ``(B, N)`` the mean runs over real
    query rows only."""
    peak = probs.float().amax(-1)
    real = real_rows(probs, attention_mask)
    if real is None:
        return peak.mean(-1)
    return (peak * real).sum(-1) / real.sum(-1).clamp_min(1)


def vlsam_map(attentions: Sequence[torch.Tensor], causal: bool = True) -> torch.Tensor:
    """VL-SAM's regularized attention flow (Lin et al., 2024): heads aggregated with
    :func:`vlsam_head_weights`, ``S'^l = mean_h(W[h] a^l[h])``, each column ``j`` damped by
    ``1 - (L0_j - 1) / N`` (``L0_j`` = unmasked entries of column ``j``: ``N - j`` if causal),
    rolled out as ``S~^l = (I + S'^l)(I + S~^{l-1})``. Returns ``(B, N, N)``; read the row of
    the token of interest over the image columns.
    """
    result = None
    for probs in attentions:
        n = probs.shape[-1]
        w = vlsam_head_weights(probs)[..., None, None]
        agg = (probs.float() * w).mean(1)
        unmasked = (n - torch.arange(n)) if causal else torch.full((n,), n)
        agg = agg * (1 - (unmasked.float() - 1) / n).to(agg.device)
        eye = torch.eye(n, device=agg.device)
        result = eye + agg if result is None else (eye + agg) @ (eye + result)
    if result is None:
        raise ValueError("attentions is empty")
    return result
