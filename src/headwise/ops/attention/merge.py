"""The log-sum-exp merge: exact softmax attention over a union of disjoint key sets.

Attention of one query over key sets ``A`` and ``B`` computed apart, ``(out_a, lse_a)`` and
``(out_b, lse_b)``, combines exactly (as NATTEN's ``merge_attentions``; ring attention merges
its shards' partial results this way)::

    lse = logaddexp(lse_a, lse_b)
    out = out_a exp(lse_a - lse) + out_b exp(lse_b - lse)        (empty rows: 0 and -inf)
"""

from __future__ import annotations

import torch


def merge_partials(
    out_a: torch.Tensor | None,
    lse_a: torch.Tensor | None,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax merge of attention over two disjoint key sets.

    ``out`` ``(B, L, H, Dv)``, ``lse`` ``(B, H, L)``; ``out_a = None`` starts a merge. Rows that
    see no key on either side stay 0 with LSE -inf (no NaN). Accumulates in ``lse``'s dtype.
    """
    out_b = out_b.to(lse_b.dtype)
    if out_a is None or lse_a is None:
        return out_b, lse_b
    lse = torch.logaddexp(lse_a, lse_b)
    # exp(-inf - (-inf)) would be NaN for rows empty on both sides; their weights are 0.
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(lse_a - safe).transpose(1, 2).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).transpose(1, 2).unsqueeze(-1)
    return out_a * weight_a + out_b * weight_b, lse
