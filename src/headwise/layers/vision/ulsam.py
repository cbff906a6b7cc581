"""ULSAM subspace attention: one spatial attention map per channel group, applied residually.

Saini, Jha, Das, Mittal, Mohan, "ULSAM: Ultra-Lightweight Subspace Attention Module for Compact
Convolutional Neural Networks" (WACV 2020); official code Nandan91/ULSAM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headwise._checks import check_real
from headwise.layers._init import check_input, reset_submodules
from headwise.layers.vision._common import (
    BatchNorm2d,
    check_divisible,
    check_positive,
    from_map,
    to_map,
)


class SubspaceAttention(nn.Module):
    """ULSAM over a feature map split into ``g`` channel subspaces ``F_n`` of ``C/g`` channels::

        a   = ReLU(BN(DWConv1x1(F_n)))                  a per-channel scale + bias
        a   = MaxPool3x3(stride 1, pad 1)(a)
        a   = ReLU(BN(Conv1x1(a, C/g -> 1)))
        A_n = softmax of a over all H·W positions       one spatial distribution per subspace
        y   = concat_n( F_n ⊙ A_n + F_n ) = F·(1 + A)   (A_n broadcast over the subspace)

    Every subspace has its own parameters; they are held as one depthwise conv over ``C``
    channels and one grouped ``C -> g`` 1x1 conv, which is the same computation. The official
    BatchNorms use ``momentum = 0.9`` in PyTorch semantics (running stats move 90 % per step,
    likely a TF-convention slip); kept as the default for fidelity, set ``bn_momentum=0.1`` for
    PyTorch's usual value.

    Args:
        dim: channels ``C``.
        num_splits: ``g`` (``C % g == 0``).
        bn_momentum: BatchNorm momentum, PyTorch convention.

    Shapes: ``(B, H, W, C) -> (B, H, W, C)``, or ``(B, N, C)`` with ``size=(H, W)``.
    """

    def __init__(self, dim: int, num_splits: int = 4, *, bn_momentum: float = 0.9) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("num_splits", num_splits)
        check_divisible("dim", dim, "num_splits", num_splits)
        bn_momentum = check_real("bn_momentum", bn_momentum, minimum=0.0)
        if bn_momentum > 1:
            raise ValueError(f"bn_momentum must be in [0, 1]; got {bn_momentum}")
        self.dim, self.num_splits = dim, num_splits
        self.dwconv = nn.Conv2d(dim, dim, 1, groups=dim)
        self.bn_dw = BatchNorm2d(dim, momentum=bn_momentum)
        self.pwconv = nn.Conv2d(dim, num_splits, 1, groups=num_splits)
        self.bn_pw = BatchNorm2d(num_splits, momentum=bn_momentum)

    def reset_parameters(self) -> None:
        """PyTorch's default conv and BatchNorm init, fresh running statistics."""
        reset_submodules(self)

    def attention_maps(self, image: torch.Tensor) -> torch.Tensor:
        """``A: (B, g, H, W)`` for a channels-first ``image: (B, C, H, W)``; each map sums to 1."""
        a = F.relu(self.bn_dw(self.dwconv(image)))
        a = F.max_pool2d(a, 3, stride=1, padding=1)
        a = F.relu(self.bn_pw(self.pwconv(a)))
        return torch.softmax(a.flatten(2), dim=-1).reshape(a.shape)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(check_input("x", x, self), size, self.dim)
        batch, height, width, _ = feature_map.shape
        image = feature_map.permute(0, 3, 1, 2)
        maps = self.attention_maps(image)
        groups = image.reshape(batch, self.num_splits, -1, height, width)
        y = groups * (1 + maps[:, :, None])
        return from_map(y.reshape(batch, self.dim, height, width).permute(0, 2, 3, 1), tokens)
