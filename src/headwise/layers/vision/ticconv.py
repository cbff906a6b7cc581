"""MSA-Conv (TiC): self-attention inside every convolution window, followed by a convolution.

Zhang et al., "TiC: Exploring Vision Transformer in Convolution" (2023); official operator
zs670980918/MSA-Conv (only the operator is released).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headwise._checks import check_bool
from headwise.layers._init import check_input, reset_submodules
from headwise.layers.vision._common import (
    check_divisible,
    check_pair,
    check_positive,
    from_map,
    to_map,
)
from headwise.layers.vision.windows import neighborhood_windows
from headwise.ops.attention import attention
from headwise.types import Backend


class MSAConv(nn.Module):
    """Multi-head self-attention restricted to each position's ``k_h x k_w`` (dilated) window.

    With ``q, k, v = split(Conv1x1(x, C -> 3C))`` and ``h`` heads of ``d = C/h``, per position
    ``p`` and window slot ``t`` (row-major over the kernel, offsets ``(t - ⌊k/2⌋)·δ``)::

        o_p = Σ_t softmax_t( d^-1/2 · q_pᵀ k_{p+t} ) v_{p+t}
        y   = ReLU( Conv_{k_h x k_w}(o + x) )            ("same" padding, optional stride)

    Out-of-image neighbors are zero vectors and are *not* masked (they get logit 0 and take
    softmax mass), as in the released operator. The release uses one head (``d = C``) and
    attention dropout 0.1; dropout is not included here. ``depthwise=True`` makes the closing
    convolution depthwise (the paper's depthwise variant). The windows are gathered and folded
    into the batch for one :func:`headwise.attention` call (one query per window).

    Args:
        dim: channels ``C``.
        dim_out: output channels (default ``C``; must equal ``C`` when ``depthwise``).
        kernel_size: odd ``k`` or ``(k_h, k_w)`` (e.g. ``(5, 1)``).
        dilation: ``δ`` of the attention window.
        stride: stride of the closing convolution.
        num_heads: ``h`` (1 in the release).
        depthwise: depthwise closing convolution.
        backend: passed to :func:`headwise.attention`.

    Shapes: ``(B, H, W, C) -> (B, H', W', dim_out)`` (``H' = ⌈H / stride⌉``), or ``(B, N, C)``
    with ``size=(H, W)``.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        *,
        kernel_size: int | tuple[int, int] = 3,
        dilation: int = 1,
        stride: int = 1,
        num_heads: int = 1,
        depthwise: bool = False,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("dilation", dilation)
        check_positive("stride", stride)
        check_positive("num_heads", num_heads)
        check_divisible("dim", dim, "num_heads", num_heads)
        dim_out = dim if dim_out is None else check_positive("dim_out", dim_out)
        check_bool("depthwise", depthwise)
        if depthwise and dim_out != dim:
            raise ValueError(f"depthwise needs dim_out == dim; got {dim_out} and {dim}")
        self.kernel = check_pair("kernel_size", kernel_size)
        if any(k % 2 == 0 for k in self.kernel):
            raise ValueError(f"kernel_size must be odd; got {kernel_size!r}")
        self.dim, self.dim_out, self.dilation = dim, dim_out, dilation
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.mlp = nn.Conv2d(
            dim,
            dim_out,
            self.kernel,
            stride=stride,
            padding=(self.kernel[0] // 2, self.kernel[1] // 2),
            groups=dim if depthwise else 1,
        )

    def reset_parameters(self) -> None:
        """PyTorch's default conv init."""
        reset_submodules(self)

    def window_attention(self, image: torch.Tensor) -> torch.Tensor:
        """``o`` for a channels-first ``image: (B, C, H, W)``, channels-last ``(B, H, W, C)``."""
        batch, _, height, width = image.shape
        h, d = self.num_heads, self.dim // self.num_heads
        q, k, v = self.qkv(image).permute(0, 2, 3, 1).chunk(3, dim=-1)
        # (B, H, W, K, C); zeros outside
        keys, _ = neighborhood_windows(k, self.kernel, self.dilation)
        values, _ = neighborhood_windows(v, self.kernel, self.dilation)
        slots = keys.shape[3]
        o = attention(
            q.reshape(-1, 1, h, d),
            keys.reshape(-1, slots, h, d),
            values.reshape(-1, slots, h, d),
            backend=self.backend,
        )
        return o.reshape(batch, height, width, self.dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        feature_map, tokens = to_map(check_input("x", x, self), size, self.dim)
        image = feature_map.permute(0, 3, 1, 2)
        mixed = self.window_attention(image).permute(0, 3, 1, 2) + image
        y = F.relu(self.mlp(mixed)).permute(0, 2, 3, 1)
        return from_map(y, tokens)
