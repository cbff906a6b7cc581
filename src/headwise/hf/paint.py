"""PAINT-style token emphasis (Arif et al., "PAINT: Paying Attention to INformed Tokens to
Mitigate Hallucination in Large Vision-Language Model", 2025): on the last query row, the
pre-softmax scores of chosen key tokens are raised in proportion to their magnitude.

The intervention is a context manager: the model is unchanged after the block.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from headwise.hf.registry import select_sites
from headwise.hooks import Call, Hook, Layers, Request, hooked, positions


class _Paint(Hook):
    def __init__(self, names, local, summary, alpha, beta, head_scale):
        self.names, self.local, self.summary = names, local, summary
        self.alpha, self.beta, self.head_scale = alpha, beta, head_scale

    def request(self, call: Call) -> Request | None:
        return Request(None, [-1]) if call.site.name in self.names else None

    def edit_scores(self, call: Call) -> bool:
        if call.site.name not in self.names:
            return False
        last = positions(call.rows, torch.tensor([call.q.shape[1] - 1], device=call.rows.device))
        z = call.scores[:, :, last]  # (B, h, 1, Lk)
        scale = torch.ones(call.num_heads, device=z.device)
        if self.head_scale is not None and call.site.name in self.head_scale:
            scale = self.head_scale[call.site.name].to(z.device).float()
        scale = scale[call.heads][None, :, None, None]
        boost = torch.zeros(z.shape[-1], device=z.device)
        for tokens, factor in ((self.local, self.alpha), (self.summary, self.beta)):
            boost[[t for t in tokens if t < z.shape[-1]]] = factor
        call.scores[:, :, last] = z + scale * boost * z.abs()
        return bool(boost.any())


@contextmanager
def emphasize_tokens(
    model: nn.Module,
    local_tokens: Sequence[int],
    summary_tokens: Sequence[int] = (),
    alpha: float = 0.7,
    beta: float = 0.3,
    head_scale: Mapping[str, torch.Tensor] | None = None,
    layers: Layers = None,
) -> Iterator[None]:
    """PAINT-style emphasis (Arif et al., 2025): on the last query row, before the softmax,
    ``z_j += alpha * s_h * |z_j|`` for local tokens and ``beta * s_h * |z_j|`` for summary
    tokens (key positions), with a head-specific scale ``s_h`` in ``[0, 1]``
    (``head_scale[name]``, ``(H,)``; default 1: PAINT's released, head-agnostic rule).
    Paper defaults: ``alpha=0.7``, ``beta=0.3``, LLM layers ``[2, L)``.
    """
    names = {s.name for s in select_sites(model, layers)}
    local = list(local_tokens)
    summary = [t for t in summary_tokens if t not in set(local)]
    with hooked(model, _Paint(names, local, summary, alpha, beta, head_scale)):
        yield
