"""Shared helpers of the vision token mixers: argument checks, map and token forms, layout-safe
BatchNorm. Windows are :mod:`headwise.layers.vision.windows`'; input checks and
``reset_submodules`` are :mod:`headwise.layers._init`'s.

Feature maps are channels-last ``(B, H, W, C)``; token form is ``(B, N = H*W, C)`` with the grid
``size = (H, W)`` given, flattened row-major (token ``n = y*W + x``).
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
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


def _contiguous_gradient(grad: torch.Tensor | None) -> torch.Tensor | None:
    # None is an undefined gradient (gradcheck's check_undefined_grad hands one): passed on
    return None if grad is None else grad.contiguous()


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose kernels see contiguous tensors, forward and backward, with an
    initial scale ``weight_init`` (1 as PyTorch's; 0 makes a residual branch start at zero).

    torch 2.13's CPU batch-norm backward silently miscomputes the input gradient when the input
    or the incoming gradient is channels-last with a size-1 batch axis of stride ``C`` (not
    ``C·H·W``): at batch 1 a permuted or transposed view downstream is enough (SHViT's gradients
    were ~100 % off, issue 13 item 3). Contiguous input and gradient avoid the broken path
    whatever the surrounding code does with the layout.
    """

    def __init__(self, num_features: int, *, weight_init: float = 1.0, **kwargs: Any) -> None:
        self.weight_init = weight_init  # read by the reset that nn.BatchNorm2d.__init__ runs
        super().__init__(num_features, **kwargs)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.affine:
            nn.init.constant_(self.weight, self.weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x.contiguous())
        if y.requires_grad:
            y.register_hook(_contiguous_gradient)
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
