"""Unpadded (packed) batches, after "Boosting Distributed Training Performance of the Unpadded BERT
Model" (Zeng et al., 2022): token-wise work runs on the ``(T, ...)`` packed real tokens only, and
attention sees a block-diagonal pattern given by ``cu_seqlens``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from headwise._checks import ArgumentTypeError


@dataclass(frozen=True)
class Packed:
    """Real tokens of a padded batch: ``tokens`` ``(T, ...)``, ``cu_seqlens`` ``(B + 1,)`` int32,
    ``indices`` ``(T,)`` flat positions in the ``(B * L)`` padded layout, and the padded size."""

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    indices: torch.Tensor
    max_seqlen: int
    batch: int
    seq_len: int


def pack(x: torch.Tensor, attention_mask: torch.Tensor) -> Packed:
    """Drop padding: ``x`` ``(B, L, ...)`` with ``attention_mask`` ``(B, L)`` (True/1 = real token).

    Real tokens keep their order inside each sequence; they need not be a prefix. The mask must
    be bool or hold only integers 0 and 1: an additive float mask (0 = keep, -inf = hide, as
    Hugging Face builds internally) would otherwise be read the other way round.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ArgumentTypeError(f"x must be a (B, L, ...) tensor; got {got}")
    if not isinstance(attention_mask, torch.Tensor):
        raise ArgumentTypeError(
            f"attention_mask must be a (B, L) tensor; got {type(attention_mask).__name__}"
        )
    if attention_mask.shape != x.shape[:2]:
        raise ValueError(
            f"attention_mask must be (B, L) = {tuple(x.shape[:2])}; "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ArgumentTypeError(
            f"attention_mask must be a bool or integer 0/1 mask (1 = real token); got a "
            f"{attention_mask.dtype} tensor (an additive float mask would be read inverted)"
        )
    if attention_mask.dtype != torch.bool:
        values = torch.unique(attention_mask)
        if ((values != 0) & (values != 1)).any():
            raise ValueError(
                f"attention_mask must hold only 0/1 (1 = real token); got values {values.tolist()}"
            )
    mask = attention_mask.to(device=x.device, dtype=torch.bool)
    seqlens = mask.sum(1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    indices = torch.nonzero(mask.flatten()).flatten()
    tokens = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])[indices]
    max_seqlen = int(seqlens.max()) if len(seqlens) else 0
    return Packed(tokens, cu_seqlens, indices, max_seqlen, x.shape[0], x.shape[1])


def unpack(tokens: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Scatter packed ``tokens`` ``(T, ...)`` back to ``(B, L, ...)``, zeros at padding."""
    if not isinstance(packed, Packed):
        raise ArgumentTypeError(
            f"packed must be a Packed (what pack() returns); got {type(packed).__name__}"
        )
    if not isinstance(tokens, torch.Tensor):
        raise ArgumentTypeError(f"tokens must be a tensor; got {type(tokens).__name__}")
    if tokens.dim() < 1 or tokens.shape[0] != packed.indices.shape[0]:
        raise ValueError(
            f"tokens must have T = {packed.indices.shape[0]} rows; got {tuple(tokens.shape)}"
        )
    out = tokens.new_zeros(packed.batch * packed.seq_len, *tokens.shape[1:])
    out = out.index_copy(0, packed.indices, tokens)
    return out.view(packed.batch, packed.seq_len, *tokens.shape[1:])


def seqlens_from_cu(name: str, cu_seqlens: torch.Tensor, total: int) -> tuple[int, ...]:
    """Validate ``cu_seqlens`` against ``total`` packed tokens and return the lengths."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or len(cu_seqlens) < 1:
        shape = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor [0, ..., T]; got {shape}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64; got {cu_seqlens.dtype}")
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at T={total}; got {values}")
    lengths = tuple(b - a for a, b in itertools.pairwise(values))
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing; got {values}")
    return lengths
