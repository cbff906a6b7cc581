"""ACMIL: Attention-Challenging Multiple Instance Learning (Zhang, Li, Sun, Zheng, Zhu, Yang;
ECCV 2024, arXiv 2311.07125; official code dazhangyu123/ACMIL), gated-attention variant.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from headwise._checks import check_int, check_real
from headwise.layers._init import check_input, reset_submodules


class MBAOutput(NamedTuple):
    """``bag`` ``(B, C)``; ``branches`` ``(B, M, C)``; ``attention`` ``(B, M, N)`` (each row sums
    to 1; masked instances exactly 0); ``diversity_loss`` (scalar)."""

    bag: torch.Tensor
    branches: torch.Tensor
    attention: torch.Tensor
    diversity_loss: torch.Tensor


class MultiBranchAttentionPooling(nn.Module):
    """Multiple-branch attention (MBA) MIL pooling with stochastic top-K instance masking (STKIM).

    For instance features ``h`` ``(B, N, C)`` (a bag of ``N`` instances, e.g. slide patches) and
    ``M`` branches sharing the gated attention network::

        e[m, n] = w_m^T (tanh(V h_n) ⊙ sigmoid(U h_n))                 (B, M, N) logits
        STKIM (training only): per branch, among its top-K logits pick floor(K r) uniformly at
            random and hide them (-inf): softmax hands their mass to the other instances
        a[m] = softmax_n(e[m]);   z_m = sum_n a[m, n] h_n                 (branch embeddings)
        a_bar = mean_m a[m];      z = sum_n a_bar_n h_n                    (bag embedding)
        L_div = mean_{m < m'} cos(a[m], a[m'])                             (diversity loss)

    The classifiers (one per branch, ``f_m(z_m)``, and one for the bag, ``f(z)``) and the
    instance dimension reduction are the caller's; the ACMIL loss is
    ``sum_m CE(f_m(z_m), y) + CE(f(z), y) + L_div``.

    Args:
        in_dim: ``C``, instance feature width.
        hidden_dim: width of the gated attention network (``V``, ``U``).
        num_branches: ``M`` (official 5).
        top_k: ``K`` (official 10; capped at ``N``).
        mask_ratio: ``r`` in ``[0, 1)`` (official 0.6; 0 disables STKIM).

    ``forward(h, mask=None, generator=None)``: ``mask`` ``(B, N)`` bool marks real instances
    (padding gets zero weight and is never among the top-K); ``generator`` seeds STKIM.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 128,
        *,
        num_branches: int = 5,
        top_k: int = 10,
        mask_ratio: float = 0.6,
    ) -> None:
        super().__init__()
        in_dim = check_int("in_dim", in_dim, minimum=1)
        hidden_dim = check_int("hidden_dim", hidden_dim, minimum=1)
        num_branches = check_int("num_branches", num_branches, minimum=1)
        top_k = check_int("top_k", top_k, minimum=1)
        # r = 1 would hide every real instance of a small bag and leave nothing to attend to.
        if not 0.0 <= check_real("mask_ratio", mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio!r}")
        self.in_dim, self.num_branches = in_dim, num_branches
        self.top_k, self.mask_ratio = top_k, mask_ratio
        self.attention_v = nn.Linear(in_dim, hidden_dim)
        self.attention_u = nn.Linear(in_dim, hidden_dim)
        self.attention_w = nn.Linear(hidden_dim, num_branches)

    def reset_parameters(self) -> None:
        """Re-initialize the gated attention network (PyTorch's ``nn.Linear`` default)."""
        reset_submodules(self)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, num_branches={self.num_branches}, top_k={self.top_k}, "
            f"mask_ratio={self.mask_ratio}"
        )

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Gated-attention logits ``e`` ``(B, M, N)``, before any masking."""
        gated = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        return self.attention_w(gated).transpose(1, 2)

    def forward(
        self,
        h: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> MBAOutput:
        """``h`` ``(B, N, C)`` → :class:`MBAOutput`."""
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[-1] != self.in_dim:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"h must be (B, N, C={self.in_dim}); got {got}")
        check_input("h", h, self)
        if mask is not None and (
            not isinstance(mask, torch.Tensor)
            or mask.dtype != torch.bool
            or mask.shape != h.shape[:2]
        ):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be bool (B, N) = {tuple(h.shape[:2])}; got {got}")
        e = self.logits(h)
        hidden = torch.zeros_like(e, dtype=torch.bool)
        if mask is not None:
            hidden |= ~mask[:, None, :]
        if self.training and self.mask_ratio > 0:
            hidden |= self._stkim(e.detach().masked_fill(hidden, float("-inf")), generator)
        a = torch.softmax(e.masked_fill(hidden, float("-inf")), -1)
        branches = a @ h
        bag = a.mean(1, keepdim=True) @ h
        return MBAOutput(bag[:, 0], branches, a, _diversity(a))

    def _stkim(self, e: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Per (bag, branch): hide floor(K r) instances drawn uniformly from its top-K, with K
        capped at the bag's real instances (so a branch never loses all of them)."""
        k = min(self.top_k, e.shape[-1])
        top = e.topk(k, -1).indices  # (B, M, K), real instances first
        real = torch.isfinite(e).sum(-1, keepdim=True).clamp(max=k)
        count = (real * self.mask_ratio).floor()
        eligible = torch.arange(k, device=e.device) < real
        draw = torch.rand(top.shape, generator=generator, device=e.device)
        rank = draw.masked_fill(~eligible, 2.0).argsort(-1).argsort(-1)
        return torch.zeros_like(e, dtype=torch.bool).scatter_(-1, top, rank < count)


def _diversity(a: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of the branch attention maps over pairs ``m < m'``."""
    m = a.shape[1]
    if m < 2:
        return a.new_zeros(())
    unit = nn.functional.normalize(a, dim=-1)
    cos = unit @ unit.transpose(1, 2)
    pairs = torch.triu_indices(m, m, 1, device=a.device)
    return cos[:, pairs[0], pairs[1]].mean()


__all__ = ["MBAOutput", "MultiBranchAttentionPooling"]
