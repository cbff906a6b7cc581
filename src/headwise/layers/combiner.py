"""Combiner: full attention with structured factorization (Ren, Dai, Dai, Yang, Leskovec,
Schuurmans, Dai; NeurIPS 2021, arXiv 2107.05768; official code google-research ``combiner/``).

Shapes: activations ``(B, L, E)``, heads ``(B, L, H, D)``.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from headwise import patterns
from headwise._checks import ArgumentTypeError, check_bool, check_choice, check_int, check_real
from headwise.layers._init import check_input, head_dim_of, reset_submodules
from headwise.ops.attention import attention
from headwise.ops.attention.dropout import Dropout, check_dropout, draw_seed_tensor, keep_mask
from headwise.ops.attention.nonfinite import has_non_finite
from headwise.patterns import Pattern
from headwise.types import Backend

Variant = Literal["fixed", "axial"]

#: ``backend="auto"`` computes Combiner-Fixed's joint softmax explicitly up to this many logits
#: ``B * H * L * (s + L / s)``. Training step (forward + backward, dropout 0.1) vs the attention
#: calls on ``native``, E = 64, H = 4, one thread: 0.83x at 0.25M logits (B=64, L=64, s=8),
#: 0.94x at 0.5M (16, 256, 16), 1.29x at 2M (8, 1024, 32)
EXPLICIT_LIMIT = 1 << 19

# built once, outside any traced forward: a pattern made while torch.compile traces breaks the
# graph at the attention operators' key
_CAUSAL = patterns.causal()


def _merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """One softmax over two disjoint key sets, from each set's output ``(B, L, H, D)`` and LSE
    ``(B, H, L)``. ``lse_a`` is finite everywhere (every query sees at least itself)."""
    total = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - total).transpose(1, 2)[..., None]
    w_b = torch.exp(lse_b - total).transpose(1, 2)[..., None]
    return (w_a * out_a.to(w_a.dtype) + w_b * out_b.to(w_b.dtype)).to(out_a.dtype)


@functools.lru_cache(maxsize=4)
def _seen_entries(
    batch: int, n: int, heads: int, s: int, causal: bool, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The joint logits ``(B, n, H, s, s + n)`` (``s`` wide when ``n = 1``) of
    :meth:`CombinerAttention._fixed_explicit` that their query sees, as (flat position, counter)
    pairs: the direct logits, then (``n > 1``) the region logits. A counter is the logit's flat
    index in its attention call of :meth:`CombinerAttention._fixed`: direct ``(B n, H, s, s)``,
    region ``(B, H, L, n)``. int32 (at most ``EXPLICIT_LIMIT`` logits)."""
    b, g, h, i = (
        torch.arange(size, device=device).view([-1] + [1] * (3 - axis) + [1])
        for axis, size in enumerate((batch, n, heads, s))
    )
    shape = (batch, n, heads, s)
    row = (((b * n + g) * heads + h) * s + i) * (s + n if n > 1 else s)
    j = torch.arange(s, device=device)
    seen = (j <= i) if causal else torch.ones(s, dtype=torch.bool, device=device)
    pairs = [(row + j, (((b * n + g) * heads + h) * s + i) * s + j, seen)]
    if n > 1:
        r = torch.arange(n, device=device)
        seen = (r < g) if causal else (r != g)
        pairs.append((row + s + r, ((b * heads + h) * (n * s) + g * s + i) * n + r, seen))
    out = []
    for where, counter, visible in pairs:
        full = (*shape, where.shape[-1])
        mask = visible.expand(full)
        out.append(tuple(t.expand(full)[mask].to(torch.int32) for t in (where, counter)))
    return tuple(out)


def _joint_keep_mask(
    direct_seed: torch.Tensor,
    region_seed: torch.Tensor,
    p: float,
    batch: int,
    n: int,
    heads: int,
    s: int,
    device: torch.device,
) -> torch.Tensor:
    """The keep mask of the joint logits ``(B, n, H, s, s + n)`` (``s`` wide when ``n = 1``) of
    :meth:`CombinerAttention._fixed_explicit`: each logit takes the
    :func:`~headwise.ops.attention.dropout.keep_mask` entry of its attention call in
    :meth:`CombinerAttention._fixed`, at its flat index there (direct ``(B n, H, s, s)``, region
    ``(B, H, L, n)``). Hidden logits get an entry too (their probability is 0 either way): the
    static-shape form, for torch.compile, of the entries :func:`_seen_entries` picks."""
    b, g, h, i = (
        torch.arange(size, device=device).view([-1] + [1] * (4 - axis))
        for axis, size in enumerate((batch, n, heads, s))
    )
    direct = (((b * n + g) * heads + h) * s + i) * s + torch.arange(s, device=device)
    calls = [(direct_seed, direct, batch * n * heads * s * s)]
    if n > 1:
        region = ((b * heads + h) * (n * s) + g * s + i) * n + torch.arange(n, device=device)
        calls.append((region_seed, region, batch * heads * n * s * n))
    # keep_mask of each call flattened to one row of `size` keys: the counter is the key index
    kept = [
        keep_mask(seed, p, 1, 1, 1, size, keys=counter.flatten(), device=device).view(counter.shape)
        for seed, counter, size in calls
    ]
    return torch.cat(kept, -1)


@dataclass(frozen=True)
class _Regions(Pattern):
    """Combiner-Fixed's region call: query ``i`` sees the summary ``r`` of an earlier segment,
    ``r < i // s`` (``causal``), or of every other segment, ``r != i // s``; the block-sparse
    layout of ``(s, 1)`` blocks, for any length (built once per ``segment_len`` and ``causal``,
    outside the code torch.compile traces)."""

    segment_len: int
    causal: bool

    def __repr__(self) -> str:
        return f"combiner_regions({self.segment_len!r}, causal={self.causal!r})"

    def query_groups(self, q_len, size):
        # the queries of one segment see the same summaries: never split a segment
        rows = max(size, self.segment_len) // self.segment_len * self.segment_len
        return super().query_groups(q_len, rows)

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        segment = q_idx // self.segment_len
        return kv_idx < segment if self.causal else kv_idx != segment

    def _key_ranges(self, q_idx, q_len, kv_len):
        segment = q_idx // self.segment_len
        if self.causal:
            lo, hi = torch.zeros_like(segment)[..., None], segment[..., None]
        else:
            zero = torch.zeros_like(segment)
            lo = torch.stack([zero, segment + 1], -1)
            hi = torch.stack([segment, torch.full_like(segment, kv_len)], -1)
        return lo.clamp(0, kv_len)[None], hi.clamp(0, kv_len)[None]


class _SegmentMax(torch.autograd.Function):
    """``t.amax(2)`` with amax's gradient (split evenly among tied maxima), the tie mask kept
    from the forward: one pass fewer than autograd's amax backward, which rebuilds it."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        top = t.amax(2, keepdim=True)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(t == top)
        return top.squeeze(2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (ties,) = ctx.saved_tensors
        return ties * (grad.unsqueeze(2) / ties.sum(2, keepdim=True))


class CombinerAttention(nn.Module):
    """Combiner attention: direct attention inside a region plus indirect attention to region
    summaries, normalized by **one** softmax, so every token of the support gets weight.

    For query ``i`` with direct set ``Ω_i^0`` and regions ``Ω^r``::

        A(x_i) = sum_{j in Ω_i^0} p(j|i) v_j + sum_r p(Ω^r|i) vbar_r
        p ∝ exp(q_i·k_j / sqrt(D)) over direct keys and exp(q_i·kbar_r / sqrt(D)) over regions

    ``variant="fixed"`` (Combiner-Fixed, sqrt decomposition): segments of ``segment_len = s``
    tokens. Direct: the query's own segment (causal inside it when ``causal``). Regions: every
    earlier segment (``causal``) or every other segment (bidirectional), summarised as in the
    official "identity-max" rule: ``kbar_r = max_{j in r} k_j``, ``qbar_r = max_{j in r} q_j``,
    ``vbar_r = softmax(qbar_r K_r^T / sqrt(D)) V_r``. Cost ``O(L s + L^2 / s)``.

    ``variant="axial"`` (Combiner-Axial, row-major): ``L = R x C`` with ``C = segment_len``.
    Direct: the query's own row (causal inside it when ``causal``). Regions: for each earlier row
    ``r'`` (every other row if bidirectional), one region at the query's column ``c`` with value
    ``vbar_{r',c} = softmax(q_{r',c} K_{r'}^T / sqrt(D)) V_{r'}`` (non-causal over the whole row)
    and key ``kbar_{r',c} = k_proj(LayerNorm(x_{r',c} + W_s vbar_{r',c}))`` (the official
    ``row_summary='proj'``). Cost ``O(L (R + C))``.

    Both parts run on :func:`headwise.attention` (own-segment attention on ``(B·n, s)``
    reshapes, region attention with a block-sparse or per-column causal pattern) and are merged
    exactly through their log-sum-exps; no ``L x L`` score matrix is formed. With
    ``backend="auto"``, Combiner-Fixed at most ``EXPLICIT_LIMIT`` joint logits
    ``B·H·L·(s + L/s)`` (and finite ``q``, ``k``, ``v``) instead writes the one softmax out over
    ``(B, n, H, s, s + n)`` logits: the same values up to rounding and the same dropout masks
    (the attention calls' seeds and keep masks on ``native``, ``blockwise`` or ``reference``),
    in fewer, larger passes than three calls and their merge (MQAR's CPU preset, B=64, L=64,
    s=8: the 2-layer model's training step in 0.67x the time).

    Args:
        dim: ``E`` (``embed_dim=`` is its deprecated name, still accepted with a warning; the
            ``embed_dim`` attribute reads ``dim``).
        num_heads: ``H``.
        segment_len: ``s`` (fixed) or the row length ``C`` (axial); must divide ``L``.
        variant: ``"fixed"`` or ``"axial"``.
        causal: autoregressive (default) or bidirectional.
        head_dim: ``D`` (default ``E // H``).
        bias: biases in the projections.
        scale: logit scale (default ``1 / sqrt(D)``), the same for direct and region logits.
        backend: passed to :func:`headwise.attention` (``"auto"`` may take the explicit path
            above instead; a named backend always runs the calls).
        dropout: attention dropout in ``[0, 1)``, in training mode only, on the probabilities
            of every softmax (local, summary and direct attention): their LSE merge keeps the
            undropped normalizer, so the combined probabilities are dropped entry by entry.

    ``s = 1`` (fixed) and ``s = L`` (either variant) reduce exactly to softmax attention.
    """

    def __init__(
        self,
        dim: int | None = None,
        num_heads: int | None = None,
        *,
        segment_len: int,
        variant: Variant = "fixed",
        causal: bool = True,
        head_dim: int | None = None,
        bias: bool = True,
        scale: float | None = None,
        backend: Backend = "auto",
        dropout: float = 0.0,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        if embed_dim is not None:
            if dim is not None:
                raise ArgumentTypeError(
                    f"give dim only (embed_dim is its deprecated name); got dim={dim!r} and "
                    f"embed_dim={embed_dim!r}"
                )
            warnings.warn(
                "CombinerAttention(embed_dim=...) is deprecated; use dim=",
                DeprecationWarning,
                stacklevel=2,
            )
            dim = embed_dim
        for name, value in (
            ("dim", dim),
            ("num_heads", num_heads),
            ("segment_len", segment_len),
        ):
            check_int(name, value, minimum=1)
        check_choice("variant", variant, ("fixed", "axial"))
        causal, bias = check_bool("causal", causal), check_bool("bias", bias)
        scale = None if scale is None else check_real("scale", scale)
        head_dim = head_dim_of("dim", dim, num_heads, head_dim)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.segment_len, self.variant, self.causal = segment_len, variant, causal
        self.scale, self.backend = scale, backend
        self.dropout = check_dropout(dropout, "dropout")
        self._regions = _Regions(segment_len, causal)
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(dim, inner, bias=bias)
        self.v_proj = nn.Linear(dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, dim, bias=bias)
        if variant == "axial":
            self.summary_proj = nn.Linear(inner, dim, bias=bias)
            self.summary_norm = nn.LayerNorm(dim)

    @property
    def embed_dim(self) -> int:
        """``dim`` under its former name."""
        return self.dim

    def reset_parameters(self) -> None:
        """Re-initialize the projections (and the axial summary's projection and LayerNorm)
        with PyTorch's defaults."""
        reset_submodules(self)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, variant={self.variant!r}, "
            f"segment_len={self.segment_len}, causal={self.causal}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, L, E)`` with ``L`` a multiple of ``segment_len`` → ``(B, L, E)``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, L, E={self.dim}); got {got}")
        if x.shape[1] % self.segment_len:
            raise ValueError(
                f"x's length must be a multiple of segment_len={self.segment_len}; got "
                f"{tuple(x.shape)}"
            )
        check_input("x", x, self)
        heads = (*x.shape[:2], self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.variant == "fixed" and self._explicit(q, k, v):
            out = self._fixed_explicit(q, k, v)
        elif self.variant == "fixed":
            out = self._fixed(q, k, v)
        else:
            out = self._axial(x, q, k, v)
        return self.out_proj(out.flatten(-2))

    def _attend(self, q, k, v, pattern=None, bias=None, lse=True):
        return attention(
            q,
            k,
            v,
            pattern,
            scale=self.scale,
            bias=bias,
            return_lse=lse,
            backend=self.backend,
            dropout_p=self.dropout if self.training else 0.0,
        )

    def _local(self, q, k, v, width):
        """Attention inside consecutive groups of ``width`` tokens: ``(B, L, H, D)`` and LSE."""
        b, length, h, d = q.shape
        groups = (b * (length // width), width, h, d)
        out, lse = self._attend(
            q.reshape(groups),
            k.reshape(groups),
            v.reshape(groups),
            _CAUSAL if self.causal else None,
        )
        return out.reshape(b, length, h, d), lse.reshape(b, -1, h, width).permute(
            0, 2, 1, 3
        ).flatten(2)

    def _fixed(self, q, k, v):
        s = self.segment_len
        b, length, h, d = q.shape
        n = length // s
        direct, direct_lse = self._local(q, k, v, s)
        if n == 1:
            return direct
        segments = (b, n, s, h, d)
        k_seg, v_seg = k.view(segments), v.view(segments)
        k_bar = k_seg.amax(2)
        q_bar = q.view(segments).amax(2)
        v_bar = self._attend(
            q_bar.reshape(b * n, 1, h, d),
            k_seg.reshape(b * n, s, h, d),
            v_seg.reshape(b * n, s, h, d),
            lse=False,
        ).reshape(b, n, h, d)
        region, region_lse = self._attend(q, k_bar, v_bar, self._region_pattern())
        return _merge(direct, direct_lse, region, region_lse)

    def _region_pattern(self) -> _Regions:
        """The region call's pattern, rebuilt only when ``segment_len`` or ``causal`` changed
        (the constructor builds the first)."""
        if (self._regions.segment_len, self._regions.causal) != (self.segment_len, self.causal):
            self._regions = _Regions(self.segment_len, self.causal)
        return self._regions

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether the fixed variant takes :meth:`_fixed_explicit`: ``backend="auto"``, at most
        ``EXPLICIT_LIMIT`` joint logits, and finite ``q``, ``k``, ``v`` (a non-finite entry takes
        the attention calls, which apply headwise's non-finite rule).

        While ``torch.compile`` traces, the graph cannot branch on values: the explicit path is
        taken, and a non-finite ``q``, ``k`` or ``v`` raises a ``RuntimeError`` when the compiled
        code runs instead of taking the calls."""
        b, length, h, _ = q.shape
        logits = b * h * length * (self.segment_len + length // self.segment_len)
        if self.backend != "auto" or logits > EXPLICIT_LIMIT:
            return False
        if torch.compiler.is_compiling():
            finite = torch.isfinite(q).all() & torch.isfinite(k).all() & torch.isfinite(v).all()
            torch._assert_async(
                finite,
                "CombinerAttention compiled: q, k and v must be finite (eager calls apply the "
                "non-finite rule of headwise.attention)",
            )
            return True
        return not has_non_finite(q, k, v)  # (a false alarm only costs the fast path)

    def _fixed_explicit(self, q, k, v):
        """Combiner-Fixed as one explicit softmax per query over its ``s`` direct and ``n``
        region logits ``(B, n, H, s, s + n)``, in float32 (float64 for float64 inputs).

        It equals :meth:`_fixed` (two softmaxes merged through their LSEs) up to rounding, and
        draws the same dropout: the seeds in the same order (direct, summary, region) and each
        call's :func:`~headwise.ops.attention.dropout.keep_mask` on its own indices."""
        s = self.segment_len
        b, length, h, d = q.shape
        n = length // s
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        scale = d**-0.5 if self.scale is None else self.scale
        p = self.dropout if self.training else 0.0
        # 0-d tensors (the same draws as ints): torch.compile keeps the draws in its graph
        seeds = [draw_seed_tensor() for _ in range(1 if n == 1 else 3)] if p > 0 else []
        segments = [t.view(b, n, s, h, d).to(dtype) for t in (q, k, v)]
        # (B, n, H, s, D): segment, head, position in the segment
        q_s, keys, values = (t.transpose(2, 3) for t in segments)
        if n > 1:
            q_bar, k_bar = (_SegmentMax.apply(t) for t in segments[:2])  # (B, n, H, D)
            # one query per segment: products and sums beat s-by-1 matrix products here
            summary = torch.softmax((q_bar[:, :, :, None] * scale * keys).sum(-1), -1)
            if p > 0:
                summary = summary * Dropout(p, seeds[1]).weights(
                    b * n, h, 1, s, device=q.device, dtype=dtype
                ).view(b, n, h, s)
            v_bar = (summary[..., None] * values).sum(3)  # (B, n, H, D)

            def every_segment(t: torch.Tensor) -> torch.Tensor:
                return t.transpose(1, 2)[:, None].expand(b, n, h, n, d)

            keys = torch.cat((keys, every_segment(k_bar)), 3)
            values = torch.cat((values, every_segment(v_bar)), 3)
        # scaling q_s is the contiguous copy the product needs anyway
        logits = (q_s * scale) @ keys.transpose(-1, -2)  # (B, n, H, s, s + n)
        # an additive -inf mask: its backward passes the gradient through (a masked_fill's masks
        # it, at the cost of a pass over the logits; the softmax's is already 0 there)
        hidden = torch.zeros((), dtype=dtype, device=q.device).masked_fill(
            ~self._visible(n, q.device), float("-inf")
        )
        probs = torch.softmax(logits + hidden, -1)
        if p > 0 and torch.compiler.is_compiling():
            # static shapes for the graph: an entry for every logit (about twice the hashing)
            keep = _joint_keep_mask(seeds[0], seeds[-1], p, b, n, h, s, q.device)
            probs = probs * (keep.to(dtype) * (1 / (1 - p)))
        elif p > 0:
            # the keep mask only where a query sees the logit (elsewhere its probability is 0)
            keep = probs.new_zeros(probs.numel())
            sizes = (b * n * h * s * s, b * h * length * n)  # direct call, region call
            entries = _seen_entries(b, n, h, s, self.causal, q.device)
            for seed, size, (where, counter) in zip((seeds[0], seeds[-1]), sizes, entries):
                # keep_mask of the call flattened to one row of `size` keys: counter = index
                kept = keep_mask(seed, p, 1, 1, 1, size, keys=counter, device=q.device)
                keep[where] = kept.flatten().to(dtype) * (1 / (1 - p))
            probs = probs * keep.view(probs.shape)
        out = probs @ values  # (B, n, H, s, D)
        return out.transpose(2, 3).reshape(b, length, h, d).to(q.dtype)

    def _visible(self, n: int, device: torch.device) -> torch.Tensor:
        """Which of the joint logits ``(n, 1, s, s + n)`` a query sees: causal (or all) direct
        keys of its own segment, then the earlier (or other) segments' summaries."""
        s = self.segment_len
        direct = torch.ones(s, s, dtype=torch.bool, device=device)
        direct = direct.tril() if self.causal else direct
        segment = torch.arange(n, device=device)
        if self.causal:
            region = segment[None, :] < segment[:, None]
        else:
            region = segment[None, :] != segment[:, None]
        direct = direct.expand(n, s, s)
        if n == 1:
            return direct[:, None]
        return torch.cat((direct, region[:, None, :].expand(n, s, n)), -1)[:, None]

    def _axial(self, x, q, k, v):
        cols = self.segment_len
        b, length, h, d = q.shape
        rows = length // cols
        direct, direct_lse = self._local(q, k, v, cols)
        if rows == 1:
            return direct
        if self.causal:
            groups = (b * rows, cols, h, d)
            row_out = self._attend(
                q.reshape(groups), k.reshape(groups), v.reshape(groups), lse=False
            ).reshape(b, length, h, d)
        else:
            row_out = direct
        summary = self.summary_norm(x + self.summary_proj(row_out.flatten(-2)))
        k_bar = self.k_proj(summary).reshape(b, length, h, d)

        def by_column(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, rows, cols, h, d).transpose(1, 2).reshape(b * cols, rows, h, d)

        q_c, k_c, v_c = by_column(q), by_column(k_bar), by_column(row_out)
        if self.causal:
            # Rows 0..R-2 as keys with bottom-right causal alignment: query row r sees r' < r.
            region, region_lse = self._attend(q_c, k_c[:, :-1], v_c[:, :-1], _CAUSAL)
        else:
            diagonal = torch.eye(rows, dtype=torch.bool, device=q.device)
            hide = torch.zeros(rows, rows, dtype=q.dtype, device=q.device)
            region, region_lse = self._attend(
                q_c, k_c, v_c, bias=hide.masked_fill(diagonal, float("-inf"))
            )
        region = region.reshape(b, cols, rows, h, d).transpose(1, 2).reshape(b, length, h, d)
        region_lse = region_lse.reshape(b, cols, h, rows).permute(0, 2, 3, 1).reshape(b, h, length)
        return _merge(direct, direct_lse, region, region_lse)


__all__ = ["CombinerAttention"]
