"""Agent attention: a few agent tokens pooled from the queries mediate between queries and keys.

Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention" (ECCV 2024);
official code LeapLabTHU/Agent-Attention (``agent_swin.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from headwise._checks import check_bool, check_int, check_ints
from headwise.layers._init import check_input, reset_submodules
from headwise.ops.attention import attention
from headwise.ops.attention.dropout import check_dropout


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    agent_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The two softmax stages of agent attention, per head; ``dropout_p``: attention dropout on
    the probabilities of both (:func:`headwise.attention`).

    ``q: (B, N, H, D)``, ``k, v: (B, M, H, D)``, ``agents: (B, n, H, D)``; biases broadcastable to
    ``(B, H, n, M)`` (agent -> key) and ``(B, H, N, n)`` (query -> agent); ``s = scale``::

        V_A = softmax(s A K^T + B_1) V          agent aggregation  (B, n, H, D)
        O   = softmax(s Q A^T + B_2) V_A        agent broadcast    (B, N, H, D)
    """
    agent_values = attention(agents, k, v, bias=agent_bias, scale=scale, dropout_p=dropout_p)
    return attention(q, agents, agent_values, bias=query_bias, scale=scale, dropout_p=dropout_p)


def _check_common(dim: int, num_heads: int, agent_num: int, qkv_bias: bool) -> None:
    for name, value in (("dim", dim), ("num_heads", num_heads), ("agent_num", agent_num)):
        check_int(name, value, minimum=1)
    check_bool("qkv_bias", qkv_bias)
    if dim % num_heads:
        raise ValueError(f"dim must be divisible by num_heads; got {dim} and {num_heads}")


class AgentAttention2d(nn.Module):
    """Agent attention over a ``(H, W)`` feature map (the Agent-Swin form, whole map as window).

    For tokens ``x: (B, N = H*W, C)``, ``h`` heads of ``d = C/h``, ``n`` agents (a perfect square)::

        Q, K, V = split(x W_qkv)
        A       = AdaptiveAvgPool2d(sqrt(n))(Q in image layout)                  (B, n, C)
        O       = agent_attention(Q, K, V, A, B_1, B_2, scale = d^-1/2)          per head
        y       = W_o (concat_heads(O) + DWConv3x3(V))

    ``B_1 (h, n, N) = bilinear(an_bias: h x n x 7 x 7 -> H x W) + ah_bias (rows) + aw_bias (cols)``,
    ``B_2 (h, N, n) = bilinear(na_bias -> H x W)^T + ha_bias (rows) + wa_bias (cols)``; all biases
    trunc-normal(std 0.02); ``align_corners=False``.

    Args:
        dim: channels ``C``.
        num_heads: ``h``.
        resolution: ``(H, W)`` of the feature map (the row/column biases are sized by it).
        agent_num: ``n``, a perfect square (49 in Agent-Swin stages 3-4).
        qkv_bias: bias in the qkv projection (True in the official configs).
        dropout: attention dropout in ``[0, 1)`` on both stages' probabilities, in training mode
            only (the official code's ``attn_drop``, applied to both).

    Shapes: ``forward(x: (B, H*W, C)) -> (B, H*W, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        resolution: tuple[int, int],
        *,
        agent_num: int = 49,
        qkv_bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_common(dim, num_heads, agent_num, qkv_bias)
        self.dropout = check_dropout(dropout, "dropout")
        pool = math.isqrt(agent_num)
        if pool * pool != agent_num:
            raise ValueError(f"agent_num must be a perfect square; got {agent_num}")
        resolution = check_ints("resolution", resolution, minimum=1)
        if len(resolution) != 2:
            raise ValueError(f"resolution must be (H, W) with positive sides; got {resolution}")
        self.dim, self.num_heads, self.agent_num = dim, num_heads, agent_num
        self.resolution, self.pool = resolution, pool
        height, width = self.resolution
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        h, n = num_heads, agent_num
        self.an_bias = nn.Parameter(torch.empty(h, n, 7, 7))
        self.na_bias = nn.Parameter(torch.empty(h, n, 7, 7))
        self.ah_bias = nn.Parameter(torch.empty(1, h, n, height, 1))
        self.aw_bias = nn.Parameter(torch.empty(1, h, n, 1, width))
        self.ha_bias = nn.Parameter(torch.empty(1, h, height, 1, n))
        self.wa_bias = nn.Parameter(torch.empty(1, h, 1, width, n))
        self._reset_biases()

    def _reset_biases(self) -> None:
        for p in (
            self.an_bias,
            self.na_bias,
            self.ah_bias,
            self.aw_bias,
            self.ha_bias,
            self.wa_bias,
        ):
            nn.init.trunc_normal_(p, std=0.02)

    def reset_parameters(self) -> None:
        """Projections and convolution with PyTorch's defaults, agent biases trunc-normal
        (std 0.02), as the official code."""
        reset_submodules(self)
        self._reset_biases()

    def biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``B_1: (h, n, N)`` (agent -> key) and ``B_2: (h, N, n)`` (query -> agent)."""
        height, width = self.resolution
        h, n, tokens = self.num_heads, self.agent_num, height * width
        size = (height, width)
        b1 = F.interpolate(self.an_bias, size=size, mode="bilinear").reshape(h, n, tokens)
        b1 = b1 + (self.ah_bias + self.aw_bias).reshape(h, n, tokens)
        b2 = F.interpolate(self.na_bias, size=size, mode="bilinear").reshape(h, n, tokens)
        b2 = b2.transpose(-1, -2) + (self.ha_bias + self.wa_bias).reshape(h, tokens, n)
        return b1, b2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.resolution
        if x.dim() != 3 or x.shape[1:] != (height * width, self.dim):
            raise ValueError(
                f"x must be (B, {height}*{width}, {self.dim}) for resolution {self.resolution}; "
                f"got {tuple(x.shape)}"
            )
        check_input("x", x, self)
        batch, tokens, channels = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        image = q.transpose(1, 2).reshape(batch, channels, height, width)
        agents = F.adaptive_avg_pool2d(image, self.pool).flatten(2).transpose(1, 2)
        heads = (batch, -1, self.num_heads, channels // self.num_heads)
        b1, b2 = self.biases()
        o = agent_attention(
            q.reshape(heads), k.reshape(heads), v.reshape(heads), agents.reshape(heads),
            b1[None].to(x.dtype), b2[None].to(x.dtype),
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        local = self.dwc(v.transpose(1, 2).reshape(batch, channels, height, width))
        return self.proj(o.reshape(batch, tokens, channels) + local.flatten(2).transpose(1, 2))


class AgentAttention(nn.Module):
    """Agent attention over a 1-D token sequence (non-causal): our sequence adaptation.

    Same two stages as :class:`AgentAttention2d` with 1-D counterparts: agents are
    ``AdaptiveAvgPool1d(n)`` of the projected queries, the biases are learned ``(h, n, 7)``
    profiles linearly interpolated to the sequence length
    (``B_1 = interp(an_bias)``, ``B_2 = interp(na_bias)^T``), and the local term is a depthwise
    1-D convolution of width 3 on V::

        y = W_o (concat_heads(agent_attention(Q, K, V, A, B_1, B_2, d^-1/2)) + DWConv1d(V))

    Args:
        dim: channels ``C``; num_heads: ``h``; agent_num: ``n``; qkv_bias: as in the paper.
        dropout: attention dropout in ``[0, 1)`` on both stages' probabilities, in training mode
            only (the official code's ``attn_drop``, applied to both).

    Shapes: ``forward(x: (B, N, C)) -> (B, N, C)`` for any ``N >= 1``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        agent_num: int = 16,
        qkv_bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_common(dim, num_heads, agent_num, qkv_bias)
        self.dropout = check_dropout(dropout, "dropout")
        self.dim, self.num_heads, self.agent_num = dim, num_heads, agent_num
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv1d(dim, dim, 3, padding=1, groups=dim)
        self.an_bias = nn.Parameter(torch.empty(num_heads, agent_num, 7))
        self.na_bias = nn.Parameter(torch.empty(num_heads, agent_num, 7))
        self._reset_biases()

    def _reset_biases(self) -> None:
        nn.init.trunc_normal_(self.an_bias, std=0.02)
        nn.init.trunc_normal_(self.na_bias, std=0.02)

    def reset_parameters(self) -> None:
        """Projections and convolution with PyTorch's defaults, agent biases trunc-normal
        (std 0.02)."""
        reset_submodules(self)
        self._reset_biases()

    def biases(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``B_1: (h, n, N)`` and ``B_2: (h, N, n)`` for a sequence of ``tokens``."""
        b1 = F.interpolate(self.an_bias, size=tokens, mode="linear")
        b2 = F.interpolate(self.na_bias, size=tokens, mode="linear").transpose(-1, -2)
        return b1, b2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] < 1:
            raise ValueError(f"x must be (B, N >= 1, {self.dim}); got {tuple(x.shape)}")
        check_input("x", x, self)
        batch, tokens, channels = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        agents = F.adaptive_avg_pool1d(q.transpose(1, 2), self.agent_num).transpose(1, 2)
        heads = (batch, -1, self.num_heads, channels // self.num_heads)
        b1, b2 = self.biases(tokens)
        o = agent_attention(
            q.reshape(heads), k.reshape(heads), v.reshape(heads), agents.reshape(heads),
            b1[None].to(x.dtype), b2[None].to(x.dtype),
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        local = self.dwc(v.transpose(1, 2)).transpose(1, 2)
        return self.proj(o.reshape(batch, tokens, channels) + local)
