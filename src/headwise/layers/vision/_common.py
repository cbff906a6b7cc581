"""Shared helpers of the vision token mixers: argument checks, padding, windows, layout-safe
BatchNorm. Input checks and ``reset_submodules`` are :mod:`headwise.layers._init`'s.

Feature maps are channels-last ``(B, H, W, C)``; token form is ``(B, N = H*W, C)`` with the grid
``size = (H, W)`` given, flattened row-major (token ``n = y*W + x``).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from headwise._checks import ArgumentTypeError, check_int, check_ints


def check_positive(name: str, value: object) -> int:
    return check_int(name, value, minimum=1)


def check_pair(name: str, value: Any, *, minimum: int = 1) -> tuple[int, int]:
    """An int ``k`` as ``(k, k)``, or a pair of ints, each ``>= minimum``."""
    if isinstance(value, numbers.Integral):
        return (check_int(name, value, minimum=minimum),) * 2
    if not isinstance(value, tuple | list):
        raise ArgumentTypeError(f"{name} must be an int or a pair of ints; got {value!r}")
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints; got {value!r}")
    return check_ints(name, value, minimum=minimum)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose kernels see contiguous tensors, forward and backward.

    torch 2.13's CPU batch-norm backward silently miscomputes the input gradient when the input
    or the incoming gradient is channels-last with a size-1 batch axis of stride ``C`` (not
    ``C·H·W``): at batch 1 a permuted or transposed view downstream is enough (SHViT's gradients
    were ~100 % off, issue 13 item 3). Contiguous input and gradient avoid the broken path
    whatever the surrounding code does with the layout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x.contiguous())
        if y.requires_grad:
            y.register_hook(torch.Tensor.contiguous)
        return y


def check_divisible(name: str, value: int, by_name: str, by: int) -> None:
    if value % by:
        raise ValueError(f"{name} must be divisible by {by_name}; got {value} and {by}")


def to_map(x: torch.Tensor, size: tuple[int, int] | None, dim: int) -> tuple[torch.Tensor, bool]:
    """``x`` as ``(B, H, W, C)``, and whether it came as tokens ``(B, N, C)``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor; got {type(x).__name__}")
    if x.dim() == 4 and x.shape[-1] == dim and size is None:
        return x, False
    if x.dim() == 3 and x.shape[-1] == dim and size is not None:
        height, width = size
        if height * width != x.shape[1]:
            raise ValueError(
                f"x has {x.shape[1]} tokens but size={tuple(size)} gives {height * width}"
            )
        return x.reshape(x.shape[0], height, width, dim), True
    raise ValueError(
        f"x must be (B, H, W, {dim}), or (B, N, {dim}) with size=(H, W); "
        f"got {tuple(x.shape)} with size={size}"
    )


def from_map(y: torch.Tensor, tokens: bool) -> torch.Tensor:
    return y.flatten(1, 2) if tokens else y


def pad_map(x: torch.Tensor, multiple_h: int, multiple_w: int) -> torch.Tensor:
    """Zero-pad a ``(B, H, W, C)`` map at the bottom/right to multiples of the given sizes."""
    pad_h = -x.shape[1] % multiple_h
    pad_w = -x.shape[2] % multiple_w
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * H/wh * W/ww, wh * ww, C)``: contiguous windows, batch-major."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // wh, wh, width // ww, ww, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, channels)


def window_reverse(w: torch.Tensor, wh: int, ww: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition` for a ``height x width`` map."""
    channels = w.shape[-1]
    x = w.reshape(-1, height // wh, width // ww, wh, ww, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def neighbourhood(
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
