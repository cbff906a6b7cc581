"""Named identity points inside headwise's own layers (TransformerLens' ``HookPoint``).

A layer computes ``x = self.hook_q(x)``: an identity, unless someone registered a PyTorch forward
hook on it, whose return value (if not ``None``) replaces ``x``. That is all a hook point is;
reading, caching and patching activations is done from outside the layer, with
``point.register_forward_hook(fn)`` or :func:`headwise.hooks.hook_points`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class HookPoint(nn.Module):
    """Identity module marking a named activation (``hook_q``, ``hook_pattern``, ...)."""

    @property
    def is_hooked(self) -> bool:
        """Whether a forward hook or forward pre-hook is registered on this point.

        A layer may skip forming an activation nobody reads (``hook_scores``, ``hook_pattern``)
        or refuse a path where it cannot form it. Global hooks
        (``torch.nn.modules.module.register_module_forward_hook``) are not counted: they watch
        every module, not this activation.
        """
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def hook_points(model: nn.Module) -> Iterator[tuple[str, HookPoint]]:
    """Every :class:`HookPoint` of ``model`` with its qualified name (``blocks.0.attn.hook_q``)."""
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            yield name, module
