"""Attention flow (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020):
how much each input token feeds each output through all layers, as max-flow through the layered
graph of per-layer probabilities ``(B, H, N, N)`` with the residual stream added as ``r I``.
Attention rollout, the same paper's product form, is the op
:func:`headwise.ops.attention.rollout.attention_rollout` (also used by DCAL's layers) and is
re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from headwise.ops.attention.rollout import attention_rollout, residual_attention

__all__ = ["attention_flow", "attention_rollout"]


def attention_flow(
    attentions: Sequence[torch.Tensor], residual: float = 0.5, head_fusion: str = "mean"
) -> torch.Tensor:
    """Abnar & Zuidema's attention flow: max-flow from input ``j`` to output ``i`` through the
    layered graph whose edge ``(l-1, j) -> (l, i)`` has capacity ``A^l[i, j]`` (as in rollout).

    One max-flow per (input, output) pair: an offline tool for short sequences. Returns
    ``(B, N, N)``.
    """
    mats = [residual_attention(p, residual, head_fusion) for p in attentions]
    if not mats:
        raise ValueError("attentions must hold at least one attention map; got none")
    batch, n = mats[0].shape[0], mats[0].shape[-1]
    result = torch.zeros(batch, n, n)
    for b in range(batch):
        cap = torch.zeros((len(mats) + 1) * n, (len(mats) + 1) * n, dtype=torch.float64)
        for layer, a in enumerate(mats):
            # node (layer, j) -> (layer + 1, i) with capacity a[i, j]
            cap[layer * n : (layer + 1) * n, (layer + 1) * n : (layer + 2) * n] = a[b].T.double()
        top = len(mats) * n
        for j in range(n):
            for i in range(n):
                result[b, i, j] = _max_flow(cap, j, top + i)
    return result


def _max_flow(capacity: torch.Tensor, source: int, sink: int) -> float:
    """Edmonds-Karp on a dense capacity matrix (small graphs only)."""
    residual = capacity.clone()
    total = 0.0
    while True:
        parent = torch.full((residual.shape[0],), -1, dtype=torch.long)
        parent[source] = source
        frontier = [source]
        while frontier and parent[sink] < 0:
            nxt = []
            for u in frontier:
                for v in torch.nonzero((residual[u] > 1e-12) & (parent < 0)).flatten().tolist():
                    parent[v] = u
                    nxt.append(v)
            frontier = nxt
        if parent[sink] < 0:
            return total
        path, v = [], sink
        while v != source:
            path.append((int(parent[v]), v))
            v = int(parent[v])
        push = min(float(residual[u, v]) for u, v in path)
        for u, v in path:
            residual[u, v] -= push
            residual[v, u] += push
        total += push
