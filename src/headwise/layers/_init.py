"""Helpers every layer shares: input checks against the parameters, and recursive re-init.

A layer validates its tensor inputs with :func:`check_input` (after its shape checks), so a
dtype or device mismatch is one clear error naming the input instead of a failure deep inside a
projection. Its ``reset_parameters`` calls :func:`reset_submodules` and then re-initialises its
own parameters and buffers in construction order, so that a layer built on the meta device,
materialised with ``to_empty`` and reset under a seed equals a fresh layer built under that seed.
"""

from __future__ import annotations

import torch
from torch import nn

from headwise._checks import ArgumentTypeError


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
