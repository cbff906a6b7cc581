"""Perplexity of a causal LM on held-out real text under an attention configuration, over all
predicted tokens and over the last half, where a sparse pattern hides the most context (MoA,
Fu et al. 2024, and StreamingLLM, Xiao et al. 2024, report perplexity next to retrieval).

For a stream ``x_0..x_{L-1}`` the model predicts ``x_{t+1}`` from ``x_0..x_t``; the token
negative log-likelihood is ``nll_t = -log p(x_{t+1} | x_{<=t})`` for ``t = 0..L-2``, and the
perplexity of a set ``T`` of predictions is ``exp(mean_{t in T} nll_t)``: ``T`` all of them, or
the last half (``t >= (L - 1) // 2``, the later targets). The vocabulary projection runs in row
chunks, so an 8k-token stream never holds its whole ``(L, vocab)`` logits at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from headwise._checks import Unsupported
from headwise.evals.sized import sized_swap
from headwise.hf.swap import SwapPattern

# rows of logits computed at once (1024 x 49152 float32 is 200 MB)
_CHUNK = 1024


@dataclass(frozen=True)
class PerplexityScore:
    """``nll`` ``(streams, L - 1)``: the negative log-likelihood of every predicted token."""

    nll: torch.Tensor

    @property
    def whole(self) -> float:
        """Perplexity over all predicted tokens."""
        return math.exp(float(self.nll.mean()))

    @property
    def last_half(self) -> float:
        """Perplexity over the last half of the predicted tokens."""
        return math.exp(float(self.nll[:, self.nll.shape[1] // 2 :].mean()))


def token_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``(L - 1,)`` negative log-likelihood of token ``t + 1`` given tokens ``0..t`` of ``ids``
    ``(1, L)`` for a transformers causal LM whose logits are its output embedding of the last
    hidden state (no final soft-capping or scaling)."""
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError(f"ids must be (1, L) with L >= 2; got {tuple(ids.shape)}")
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise Unsupported("token_nll computes plain logits; this model scales or caps them")
    head = model.get_output_embeddings()
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state[0, :-1]
        return torch.cat(
            [
                torch.nn.functional.cross_entropy(
                    head(hidden[i : i + _CHUNK]).float(),
                    ids[0, i + 1 : i + 1 + _CHUNK],
                    reduction="none",
                )
                for i in range(0, hidden.shape[0], _CHUNK)
            ]
        )


def perplexity(
    model: nn.Module,
    streams: Sequence[torch.Tensor],
    config: SwapPattern | None = None,
    progress=None,
) -> PerplexityScore:
    """Token NLLs of ``model`` on ``streams`` (each ``(1, L)`` token ids, all of one length)
    under ``config`` (an MoA plan, a pattern, or ``None`` for dense; sized for ``L`` by
    :func:`headwise.evals.sized.sized_swap`). ``progress`` is advanced by one per stream."""
    lengths = {s.shape[-1] for s in streams}
    if len(lengths) != 1:
        raise ValueError(f"streams must all have one length; got lengths {sorted(lengths)}")
    rows = []
    for ids in streams:
        with sized_swap(model, config, ids.shape[-1]):
            rows.append(token_nll(model, ids))
        if progress is not None:
            progress.update()
    return PerplexityScore(torch.stack(rows))
