"""MaxViT multi-axis attention: block (local windows) and grid (strided, global) partitions.

Tu et al., "MaxViT: Multi-Axis Vision Transformer" (ECCV 2022); official code
google-research/maxvit, ported in timm ``maxxvit.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from headwise._checks import check_bool, check_choice
from headwise.layers._init import check_input, reset_submodules
from headwise.layers.vision._common import (
    check_divisible,
    check_positive,
    from_map,
    pad_map,
    to_map,
    window_partition,
    window_reverse,
)
from headwise.ops.attention import attention

PARTITIONS = ("block", "grid")


def block_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B·(H/P)·(W/P), P², C)``: contiguous ``P x P`` windows."""
    return window_partition(x, size, size)


def block_reverse(windows: torch.Tensor, size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`block_partition`."""
    return window_reverse(windows, size, size, height, width)


def grid_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B·(H/G)·(W/G), G², C)``: window ``(a, b)`` holds the tokens
    ``(i·H/G + a, j·W/G + b)`` for ``i, j < G``, ordered by ``(i, j)`` (strided, not contiguous).
    """
    batch, height, width, channels = x.shape
    x = x.reshape(batch, size, height // size, size, width // size, channels)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, size * size, channels)


def grid_reverse(windows: torch.Tensor, size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`grid_partition`."""
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // size, width // size, size, size, channels)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, height, width, channels)


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
    Windows are folded into the batch for one :func:`headwise.attention` call.

    Args:
        dim: channels ``C``.
        partition: ``"block"`` or ``"grid"``.
        partition_size: ``P`` (= ``G``; 7 in MaxViT at 224²).
        dim_head: channels per head (32 in MaxViT); ``C % dim_head == 0``.
        qkv_bias: bias in the qkv projection.
        backend: passed to :func:`headwise.attention`.

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
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("partition_size", partition_size)
        check_positive("dim_head", dim_head)
        check_divisible("dim", dim, "dim_head", dim_head)
        check_choice("partition", partition, PARTITIONS)
        check_bool("qkv_bias", qkv_bias)
        self.dim, self.partition, self.size, self.backend = dim, partition, partition_size, backend
        self.num_heads, self.dim_head = dim // dim_head, dim_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        span = 2 * partition_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.empty(self.num_heads, span, span))
        length = partition_size * partition_size
        self.register_buffer(
            "relative_index", torch.empty(length, length, dtype=torch.long), persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default Linear init, ``T`` normal(0.02), and the ``(P², P²)`` index into ``T``."""
        reset_submodules(self)
        nn.init.normal_(self.relative_position_bias_table, std=0.02)
        axis = torch.arange(self.size, device=self.relative_index.device)
        coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij")).flatten(1)
        delta = coords[:, None, :] - coords[:, :, None] + self.size - 1  # key - query
        with torch.no_grad():
            self.relative_index.copy_(delta[0] * (2 * self.size - 1) + delta[1])

    def relative_bias(self) -> torch.Tensor:
        """``(h, P², P²)``: the bias added to the scores of every window."""
        return self.relative_position_bias_table.flatten(1)[:, self.relative_index]

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        if self.partition == "block":
            return block_partition(x, self.size)
        return grid_partition(x, self.size)

    def _merge(self, windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self.partition == "block":
            return block_reverse(windows, self.size, height, width)
        return grid_reverse(windows, self.size, height, width)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(check_input("x", x, self), size, self.dim)
        batch, height, width, _ = feature_map.shape
        padded = pad_map(feature_map, self.size, self.size)
        padded_h, padded_w = padded.shape[1:3]
        windows = self._split(padded)
        length = self.size * self.size
        q, k, v = self.qkv(windows).reshape(-1, length, 3, self.num_heads, self.dim_head).unbind(2)
        bias = self.relative_bias().to(x.dtype)[None]
        if (padded_h, padded_w) != (height, width):
            real = torch.zeros(1, padded_h, padded_w, 1, dtype=x.dtype, device=x.device)
            real[:, :height, :width] = 1
            hidden = self._split(real).reshape(1, -1, 1, 1, length) == 0
            mask = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(hidden, float("-inf")).expand(batch, -1, -1, -1, -1)
            bias = bias + mask.reshape(-1, 1, 1, length)
        o = attention(q, k, v, bias=bias, backend=self.backend).flatten(2)
        y = self._merge(self.proj(o), padded_h, padded_w)[:, :height, :width]
        return from_map(y, tokens)
