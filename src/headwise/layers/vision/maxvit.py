"""MaxViT multi-axis attention: block (local windows) and grid (strided, global) partitions.

Tu et al., "MaxViT: Multi-Axis Vision Transformer" (ECCV 2022); official code
google-research/maxvit, ported in timm ``maxxvit.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from headwise._checks import check_bool, check_choice
from headwise._deprecated import moved
from headwise.layers._init import check_input, reset_submodules
from headwise.layers.vision._common import check_divisible, check_positive, from_map, to_map
from headwise.layers.vision.windows import PARTITIONS, windowed_attention
from headwise.ops.attention.dropout import check_dropout
from headwise.types import Backend


class MultiAxisAttention(nn.Module):
    """MaxViT partition attention: MHSA inside ``P x P`` blocks or ``G x G`` strided grids.

    For each window of ``P²`` tokens, ``h = C / dim_head`` heads, scale ``dim_head^-1/2``::

        Q, K, V = split(x W_qkv)                       channels [q (all heads) | k | v]
        S_ij    = s·q_i·k_j + T[head, y_j - y_i + P - 1, x_j - x_i + P - 1]    (key - query)
        y       = W_o softmax(S) V

    ``T: (h, 2P-1, 2P-1)``, normal(std 0.02) (MaxViT's TF bias layout, timm ``RelPosBiasTf``).
    ``partition="block"`` windows are contiguous ``P x P`` patches (local); ``"grid"`` windows
    take every ``(H/P)``-th row and ``(W/P)``-th column (sparse, global). A MaxViT block is an
    MBConv, then block attention (+FFN), then grid attention (+FFN), each attention with its own
    parameters: use two modules. Sides that are not multiples of ``P`` are zero-padded at the
    bottom/right and the padded keys masked out (an extension: MaxViT requires ``P | H, W``).
    Windows are folded into the batch for one :func:`headwise.attention` call
    (:func:`~headwise.layers.vision.windows.windowed_attention`).

    Args:
        dim: channels ``C``.
        partition: ``"block"`` or ``"grid"``.
        partition_size: ``P`` (= ``G``; 7 in MaxViT at 224²).
        dim_head: channels per head (32 in MaxViT); ``C % dim_head == 0``.
        qkv_bias: bias in the qkv projection.
        backend: passed to :func:`headwise.attention`.
        dropout: attention dropout on the probabilities in ``[0, 1)``, in training mode only
            (:func:`headwise.attention`'s ``dropout_p``).

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, or ``(B, N, C)`` with ``size=(H, W)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        partition: str = "block",
        partition_size: int = 7,
        dim_head: int = 32,
        qkv_bias: bool = True,
        backend: Backend = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("partition_size", partition_size)
        check_positive("dim_head", dim_head)
        check_divisible("dim", dim, "dim_head", dim_head)
        check_choice("partition", partition, PARTITIONS)
        check_bool("qkv_bias", qkv_bias)
        self.dim, self.partition, self.size, self.backend = dim, partition, partition_size, backend
        self.dropout = check_dropout(dropout, "dropout")
        self.num_heads, self.dim_head = dim // dim_head, dim_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        span = 2 * partition_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.empty(self.num_heads, span, span))
        length = partition_size * partition_size
        self.register_buffer(
            "relative_index", torch.empty(length, length, dtype=torch.long), persistent=False
        )
        self._reset_own()

    def reset_parameters(self) -> None:
        """Default Linear init, ``T`` normal(0.02), and the ``(P², P²)`` index into ``T``."""
        reset_submodules(self)
        self._reset_own()

    def _reset_own(self) -> None:
        # the tensors this module owns (the Linears hold their own init)
        nn.init.normal_(self.relative_position_bias_table, std=0.02)
        axis = torch.arange(self.size, device=self.relative_index.device)
        coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij")).flatten(1)
        delta = coords[:, None, :] - coords[:, :, None] + self.size - 1  # key - query
        with torch.no_grad():
            self.relative_index.copy_(delta[0] * (2 * self.size - 1) + delta[1])

    def relative_bias(self) -> torch.Tensor:
        """``(h, P², P²)``: the bias added to the scores of every window."""
        return self.relative_position_bias_table.flatten(1)[:, self.relative_index]

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(check_input("x", x, self), size, self.dim)
        y = windowed_attention(
            feature_map,
            self.size,
            self.qkv,
            self.proj,
            self.num_heads,
            partition=self.partition,
            bias=self.relative_bias().to(x.dtype)[None],
            mask_padding=True,
            backend=self.backend,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return from_map(y, tokens)


_MOVED = ("block_partition", "block_reverse", "grid_partition", "grid_reverse")


__getattr__ = moved(__name__, {name: "headwise.layers.vision.windows" for name in _MOVED})
