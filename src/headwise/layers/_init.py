"""Helpers every layer shares: input checks against the parameters, recursive re-init, and
submodules that carry their own init.

A layer validates its tensor inputs with :func:`check_input` (after its shape checks), so a
dtype or device mismatch is one clear error naming the input instead of a failure deep inside a
projection. Its ``reset_parameters`` calls :func:`reset_submodules` and then re-initializes its
own parameters and buffers in construction order, so that a layer built on the meta device,
materialized with ``to_empty`` and reset under a seed equals a fresh layer built under that seed.

The init of a tensor lives in the module that owns it, never in a parent: FSDP1 materializes a
meta model module by module (parents first, ``to_empty(recurse=False)`` + ``reset_parameters()``
on each module owning tensors directly, PyTorch's convention that a reset touches only the
module's own tensors), so an init a parent writes into a child's weight would be overwritten by
the child's default. A child with a custom init is therefore its own class
(:class:`TruncNormalLinear`, :class:`FanOutConv2d`, or a layer-private one), and any order of
per-module resets, or one whole-layer reset, gives the documented init.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from headwise._checks import ArgumentTypeError, check_int


def head_dim_of(width_name: str, width: int, num_heads: int, head_dim: int | None) -> int:
    """``head_dim``, or ``width // num_heads`` when it is not given (``num_heads`` must divide
    ``width`` then); ``width_name`` names the layer's width argument in the error."""
    if head_dim is None:
        if width % num_heads:
            raise ValueError(
                f"num_heads must divide {width_name} when head_dim is not given; got "
                f"{width_name}={width}, num_heads={num_heads}"
            )
        head_dim = width // num_heads
    return check_int("head_dim", head_dim, minimum=1)


def check_input(name: str, x: object, like: nn.Module | torch.Tensor) -> torch.Tensor:
    """``x`` if it is a tensor with the device and dtype of ``like`` (a module's first floating
    parameter, or a tensor); a module without floating parameters accepts any tensor.

    Under :func:`torch.autocast` for ``x``'s device the dtype is not checked: autocast casts the
    operands of each op itself.
    """
    if not isinstance(x, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if isinstance(like, torch.Tensor):
        ref, source = like, "the other inputs"
    else:
        ref = next((p for p in like.parameters() if p.is_floating_point()), None)
        source = "the layer's parameters"
        if ref is None:
            return x
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} ({source}); got {x.dtype} on {x.device}")
    if x.dtype != ref.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ArgumentTypeError(
            f"{name} must be {ref.dtype} ({source}: cast with .to()); got {x.dtype}"
        )
    return x


def reset_submodules(module: nn.Module) -> None:
    """Call ``reset_parameters()`` of every submodule of ``module`` in registration order.

    Containers (``nn.ModuleList``, helper modules without ``reset_parameters``) are walked
    recursively; one that owns parameters or buffers itself but cannot reset them is an error,
    so no tensor is left with the garbage of ``to_empty``.
    """
    for name, child in module.named_children():
        if hasattr(child, "reset_parameters"):
            child.reset_parameters()
            continue
        own = [n for n, _ in child.named_parameters(recurse=False)]
        own += [n for n, _ in child.named_buffers(recurse=False)]
        if own:
            raise TypeError(
                f"{type(module).__name__}.{name} ({type(child).__name__}) owns {own} but has no "
                "reset_parameters()"
            )
        reset_submodules(child)


class TruncNormalLinear(nn.Linear):
    """``nn.Linear`` initialized as timm's vision transformers: weight trunc-normal(``std``) on
    ``[-2, 2]``, bias 0 (instead of PyTorch's Kaiming-uniform weight and uniform bias)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, std: float = 0.02
    ) -> None:
        self.std = std  # read by the reset that nn.Linear.__init__ runs
        super().__init__(in_features, out_features, bias)

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, std={self.std}"


class FanOutConv2d(nn.Conv2d):
    """``nn.Conv2d`` with the fan-out normal init of PVT, SMT and TransNeXt: weight
    ``N(0, 2 / fan_out)`` with ``fan_out = k_h k_w C_out / groups`` (He init for the backward
    pass), bias 0."""

    def reset_parameters(self) -> None:
        fan_out = math.prod(self.kernel_size) * self.out_channels / self.groups
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / fan_out))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
