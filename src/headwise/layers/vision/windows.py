"""Windows of channels-last maps and attention inside them: the building block of the windowed
vision mixers.

A map ``(B, H, W, C)`` splits into ``P x P`` windows two ways: ``"block"`` windows are contiguous
patches (Swin, DaViT, HaloNet's query blocks, LITv2's Hi-Fi), ``"grid"`` windows take every
``(H/P)``-th row and ``(W/P)``-th column (MaxViT's sparse global axis). Windows are folded into
the batch, batch-major, as ``(B·n_windows, P², C)`` with tokens row-major inside a window.
:func:`windowed_attention` is the whole step qkv -> windows -> :func:`headwise.attention` ->
output projection -> map; :func:`neighborhood_windows` gathers the ``k x k`` window centred on
every position instead (one window per query, overlapping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from headwise.ops.attention import Backend, attention

Partition = Literal["block", "grid"]
PARTITIONS = ("block", "grid")


def pad_map(x: torch.Tensor, multiple_h: int, multiple_w: int) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` map at the bottom/right to multiples of the given sizes."""
    pad_h = -x.shape[1] % multiple_h
    pad_w = -x.shape[2] % multiple_w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def block_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B·(H/P)·(W/P), P², C)``: contiguous ``P x P`` windows."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // size, size, width // size, size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, size * size, channels)


def block_reverse(windows: torch.Tensor, size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`block_partition` for a ``height x width`` map."""
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // size, width // size, size, size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


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


def partition_windows(x: torch.Tensor, size: int, partition: Partition = "block") -> torch.Tensor:
    """:func:`block_partition` or :func:`grid_partition` by name."""
    return block_partition(x, size) if partition == "block" else grid_partition(x, size)


def reverse_windows(
    windows: torch.Tensor, size: int, height: int, width: int, partition: Partition = "block"
) -> torch.Tensor:
    """Inverse of :func:`partition_windows`."""
    if partition == "block":
        return block_reverse(windows, size, height, width)
    return grid_reverse(windows, size, height, width)


def windowed_attention(
    x: torch.Tensor,
    size: int,
    qkv: Callable[[torch.Tensor], torch.Tensor],
    proj: Callable[[torch.Tensor], torch.Tensor],
    num_heads: int,
    *,
    partition: Partition = "block",
    bias: torch.Tensor | None = None,
    mask_padding: bool = False,
    backend: Backend = "auto",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head attention inside the ``P x P`` windows of a map ``x: (B, H, W, C)``.

    Sides that are not multiples of ``P`` are zero-padded at the bottom/right; per window of
    ``P²`` tokens::

        Q, K, V = split(qkv(window))        (P², 3·h·d): channels [q (all heads) | k | v]
        y       = proj( softmax(d^-1/2 Q Kᵀ + bias [+ padding mask]) V )

    then the windows go back to the map, cropped to ``(H, W)``. ``bias`` (broadcastable to
    ``(n_windows·B, h, P², P²)``, e.g. a relative position bias ``(1, h, P², P²)``) is added to
    the scores of every window; ``mask_padding`` masks the padded keys out (``-inf``; otherwise
    they take part as zero inputs, as DaViT and LITv2 do). All windows go through one
    :func:`headwise.attention` call (with attention dropout ``dropout_p``).

    Returns ``(B, H, W, C_out)`` with ``C_out`` the width of ``proj``'s output.
    """
    batch, height, width, _ = x.shape
    padded = pad_map(x, size, size)
    padded_h, padded_w = padded.shape[1:3]
    windows = partition_windows(padded, size, partition)
    length = size * size
    projected = qkv(windows)
    head_dim = projected.shape[-1] // (3 * num_heads)
    q, k, v = projected.reshape(-1, length, 3, num_heads, head_dim).unbind(2)
    if mask_padding and (padded_h, padded_w) != (height, width):
        real = torch.zeros(1, padded_h, padded_w, 1, dtype=x.dtype, device=x.device)
        real[:, :height, :width] = 1
        hidden = partition_windows(real, size, partition).reshape(1, -1, 1, 1, length) == 0
        mask = torch.zeros(hidden.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(hidden, float("-inf")).expand(batch, -1, -1, -1, -1)
        mask = mask.reshape(-1, 1, 1, length)
        bias = mask if bias is None else bias + mask
    o = attention(q, k, v, bias=bias, backend=backend, dropout_p=dropout_p).flatten(2)
    y = reverse_windows(proj(o), size, padded_h, padded_w, partition)
    return y[:, :height, :width]


def neighborhood_windows(
    x: torch.Tensor, kernel: tuple[int, int], dilation: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kh x kw`` window centred on every position of ``(B, H, W, C)``, zero-padded.

    Returns ``(B, H, W, kh*kw, C)`` (slots row-major over the kernel, as ``nn.Unfold``) and a
    ``(H, W, kh*kw)`` bool map of which slots lie inside the image.
    """
    kh, kw = kernel
    height, width = x.shape[1], x.shape[2]
    ph, pw = dilation * (kh // 2), dilation * (kw // 2)
    padded = F.pad(x, (0, 0, pw, pw, ph, ph))
    inside = F.pad(x.new_ones(height, width, dtype=torch.bool), (pw, pw, ph, ph))
    slots, valid = [], []
    for ty in range(kh):
        for tx in range(kw):
            oy, ox = ty * dilation, tx * dilation
            slots.append(padded[:, oy : oy + height, ox : ox + width])
            valid.append(inside[oy : oy + height, ox : ox + width])
    return torch.stack(slots, dim=3), torch.stack(valid, dim=-1)
