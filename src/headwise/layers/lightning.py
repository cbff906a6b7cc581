"""TransNormerLLM token mixer built on Lightning Attention (decayed causal linear attention).

Qin et al., "TransNormerLLM: A Faster and Better Large Language Model with Improved
TransNormer" (arXiv 2307.14995) and "Lightning Attention-2" (arXiv 2401.04658).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from headwise._checks import check_bool, check_int
from headwise.layers._init import check_input, reset_submodules
from headwise.ops.linear import linear_attention, linear_attention_step, tnl_decay
from headwise.types import Backend


def srms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Simple RMSNorm of TransNormerLLM: ``x / sqrt(mean(x^2) + eps)`` over the last axis.

    No learnable gain; computed in float32 and returned in the input dtype.
    """
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class LightningAttention(nn.Module):
    """TransNormerLLM's ``NormLinearAttention`` token mixer.

    For input ``x: (B, L, d)`` with ``H`` heads of size ``d / H``::

        q, k, v, u = split(x W_qkvu)                 (bias-free, 4d outputs)
        q, k       = SiLU(q), SiLU(k)
        o_t        = q_t S_t,   S_t = lam_h S_{t-1} + k_t^T v_t      (per head, causal)
        y          = W_o (u * SRMSNorm(concat_heads(o)))

    ``lam_h = exp(-s_h (1 - l / (N_layers - 1) + 1e-5))`` with ALiBi slopes ``s_h``
    (:func:`headwise.ops.linear.tnl_decay`): a fixed buffer, not learned. There is no softmax and
    no ``1/sqrt(d)`` scale; SRMSNorm (no gain, eps 1e-6) normalizes after the operator. The
    optional LRPE of the paper is not included.

    Args:
        embed_dim: model width ``d`` (divisible by ``num_heads``).
        num_heads: ``H``.
        layer_idx, num_layers: position in the stack, for the decay schedule.
        chunk_size, backend: passed to :func:`headwise.ops.linear.linear_attention`.

    Shapes: ``forward(x: (B, L, d)) -> (B, L, d)``; with ``return_state`` also the recurrent
    state ``(B, H, d/H, d/H)``. :meth:`step` decodes one token ``(B, d)`` from that state.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        layer_idx: int = 0,
        num_layers: int = 1,
        chunk_size: int | None = None,
        backend: Backend = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            check_int(name, value, minimum=1)
        num_layers = check_int("num_layers", num_layers, minimum=1)
        layer_idx = check_int("layer_idx", layer_idx, minimum=0)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, minimum=1)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads; got {embed_dim} and {num_heads}"
            )
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.chunk_size, self.backend = chunk_size, backend
        factory = {"device": device, "dtype": dtype}
        self.qkvu_proj = nn.Linear(embed_dim, 4 * embed_dim, bias=False, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False, **factory)
        self._schedule = (num_heads, layer_idx, num_layers)
        self.register_buffer("decay", tnl_decay(*self._schedule).to(device), persistent=False)

    def reset_parameters(self) -> None:
        """Re-initialize the projections (PyTorch's ``nn.Linear`` default) and recompute the
        decay buffer."""
        reset_submodules(self)
        self.decay = tnl_decay(*self._schedule).to(self.decay.device)

    def _apply(self, fn, recurse=True):
        # Late layers decay by ~1 - 1e-5, which half precision rounds to exactly 1: keep the
        # buffer float32 whatever dtype the module is cast to.
        module = super()._apply(fn, recurse)
        self.decay = tnl_decay(*self._schedule).to(self.decay.device)
        return module

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
        heads = (*x.shape[:-1], self.num_heads, self.head_dim)
        return F.silu(q).view(heads), F.silu(k).view(heads), v.view(heads), u

    def _finish(self, o: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.out_proj(u * srms_norm(o.flatten(-2)))

    def forward(
        self,
        x: torch.Tensor,
        *,
        initial_state: torch.Tensor | None = None,
        return_state: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, {self.embed_dim}); got {tuple(x.shape)}")
        check_input("x", x, self)
        return_state = check_bool("return_state", return_state)
        q, k, v, u = self._project(x)
        out = linear_attention(
            q,
            k,
            v,
            decay=self.decay,
            initial_state=initial_state,
            return_state=return_state,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        o, state = out if return_state else (out, None)
        y = self._finish(o, u)
        return (y, state) if return_state else y

    def step(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: ``x: (B, d)`` and the state from earlier tokens -> ``(y, state)``."""
        if x.dim() != 2 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, {self.embed_dim}); got {tuple(x.shape)}")
        check_input("x", x, self)
        q, k, v, u = self._project(x)
        o, state = linear_attention_step(q, k, v, state, decay=self.decay)
        return self._finish(o, u), state
