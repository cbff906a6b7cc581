"""InLine attention: injective linear attention plus a dynamic local convolution.

Han et al., "Bridging the Divide: Reconsidering Softmax and Linear Attention" (NeurIPS 2024);
official code LeapLabTHU/InLine (``inline_swin.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headwise._checks import check_bool, check_int
from headwise.layers._init import check_input, reset_submodules
from headwise.ops.linear import InLineFeatureMap, linear_attention
from headwise.types import Backend


class InLineAttention(nn.Module):
    """InLine attention over a ``(H, W)`` feature map (whole map as window, as in InLine-Swin).

    Per head with ``N = H*W`` tokens, kernel ``phi`` (identity in the released configs) and
    ``s = d^-1/2``::

        w_ij = 1/N + (s/N) phi(q_i) . (phi(k_j) - mean_t phi(k_t))       (rows sum to exactly 1)
        o_i  = sum_j w_ij v_j                    computed in O(N d^2) by linear_attention
        W    = Conv1d(C, 9C, 1, groups=h)(GELU(Conv1d(C, C, 1, groups=h)(mean_tokens(x))))
        y    = W_o (concat_heads(o) + DWConv3x3_W(V))    (a per-sample depthwise 3x3 kernel)

    The weights are injective in ``q`` (``q`` and ``2q`` attend differently), unlike normalized
    linear attention. Identity ``phi`` gives sign-indefinite weights by design.

    Args:
        dim: channels ``C``; num_heads: ``h``.
        kernel: ``phi``, a token-wise feature map name (``identity``, ``relu``, ``elu+1``).
        qkv_bias: bias in the qkv projection (True in the official configs).
        backend: passed to :func:`headwise.ops.linear.linear_attention`.

    Shapes: ``forward(x: (B, H*W, C), size=(H, W)) -> (B, H*W, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kernel: str = "identity",
        qkv_bias: bool = True,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            check_int(name, value, minimum=1)
        check_bool("qkv_bias", qkv_bias)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads; got {dim} and {num_heads}")
        self.dim, self.num_heads, self.backend = dim, num_heads, backend
        self.feature_map = InLineFeatureMap(kernel)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.kernel_hidden = nn.Conv1d(dim, dim, 1, groups=num_heads)
        self.kernel_out = nn.Conv1d(dim, 9 * dim, 1, groups=num_heads)

    def reset_parameters(self) -> None:
        """Re-initialize the projections and the kernel generator (PyTorch's defaults)."""
        reset_submodules(self)

    def local_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample depthwise 3x3 kernels ``(B*C, 1, 3, 3)`` from the mean token of ``x``."""
        hidden = F.gelu(self.kernel_hidden(x.mean(1)[..., None]))
        return self.kernel_out(hidden).reshape(-1, 1, 3, 3)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        height, width = size
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] != height * width:
            raise ValueError(
                f"x must be (B, H*W, {self.dim}) with (H, W) = {tuple(size)}; got {tuple(x.shape)}"
            )
        check_input("x", x, self)
        batch, tokens, channels = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        heads = (batch, tokens, self.num_heads, channels // self.num_heads)
        o = linear_attention(
            q.reshape(heads),
            k.reshape(heads),
            v.reshape(heads),
            feature_map=self.feature_map,
            causal=False,
            backend=self.backend,
        )
        image = v.transpose(1, 2).reshape(1, batch * channels, height, width)
        local = F.conv2d(image, self.local_kernels(x), padding=1, groups=batch * channels)
        local = local.reshape(batch, channels, tokens).transpose(1, 2)
        return self.proj(o.reshape(batch, tokens, channels) + local)
