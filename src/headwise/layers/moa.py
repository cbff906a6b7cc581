"""MoA: Mixture of Sparse Attention (heterogeneous elastic sliding windows with an attention sink).

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
(arXiv 2406.14909; CoLM 2025 as "Mixture of Attention Spans: Optimizing LLM Inference Efficiency
with Heterogeneous Sliding-Window Lengths"); official code thu-nics/MoA.

Every head ``h`` attends an attention sink plus a causal sliding window whose total span grows with
the length ``N``: ``span_h(N) = alpha_h + beta_h * N``. This module holds the rule
(:func:`moa_cache_size`), the prefill pattern (:class:`MoASpan`), the decode cache
(:class:`MoACache`), the layer (:class:`MoAAttention`) and :class:`MoAPlan` (per-head
``(alpha, beta)``, JSON, ``apply``). The tooling that finds a plan for a model (the influence
profiler and the plan search) acts on whole models and lives above the layers, in
:mod:`headwise.moa`.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from headwise import patterns
from headwise._checks import ArgumentTypeError, check_int
from headwise._deprecated import moved
from headwise.layers._init import check_input
from headwise.layers.multihead import MultiHeadAttention
from headwise.patterns import Pattern, query_positions

# thu-nics/MoA ``moa_config_to_cache_config`` defaults.
BLOCK, SINK_SIZE, MIN_CACHE, MAX_NEW_TOKENS = 64, 64, 128, 1024


def check_rule(block: int, sink_size: int, min_cache: int) -> None:
    """Check the cache rounding parameters of :func:`moa_cache_size`."""
    check_int("block", block, minimum=1)
    check_int("sink_size", sink_size, minimum=0)
    check_int("min_cache", min_cache, minimum=1)
    if sink_size % block:
        raise ValueError(f"sink_size must be a multiple of block={block}; got {sink_size}")


def _check_alpha_beta(alpha: float, beta: float) -> None:
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ArgumentTypeError(f"{name} must be a real number; got {value!r}")
    if math.isnan(alpha) or alpha == -math.inf:
        raise ValueError(f"alpha must be finite or +inf; got {alpha!r}")
    if not (0 <= beta < math.inf):
        raise ValueError(f"beta must be a finite number >= 0; got {beta!r}")


def moa_cache_size(
    alpha: float,
    beta: float,
    length: int,
    *,
    block: int = BLOCK,
    sink_size: int = SINK_SIZE,
    min_cache: int = MIN_CACHE,
) -> tuple[int, int]:
    """``(sink, local)`` token counts of one head for total length ``N = length`` (MoA §3.1).

    The official rounding: ``cache = int(alpha + beta * N)`` (truncation toward zero), clamped to
    ``<= N``, then to ``>= min_cache``, then rounded **up** to a multiple of ``block``;
    ``sink = min(cache, sink_size)`` and ``local = cache - sink``. ``alpha = inf`` gives
    ``cache >= N`` (dense). ``N`` is the whole generation, prompt plus new tokens.
    """
    _check_alpha_beta(alpha, beta)
    check_int("length", length, minimum=0)
    cache = int(min(alpha + beta * length, length))
    cache = max(cache, min_cache)
    cache = -(-cache // block) * block
    sink = min(cache, sink_size)
    return sink, cache - sink


@dataclass(frozen=True)
class MoASpan(Pattern):
    """One MoA head at prefill: block-granular sink + causal local window (thu-nics/MoA Triton).

    With ``(sink, local) = moa_cache_size(alpha, beta, N)``, query block ``qb`` (of the query's
    bottom-right-aligned position) sees key block ``kb <= qb`` iff ``kb < sink / block`` or
    ``kb >= qb + 1 - local / block``; inside visible blocks the token causal mask applies. The
    window is block aligned, so a query sees between ``local - block + 1`` and ``local`` local
    keys. ``N`` is ``length`` if given, else ``kv_len + extra_tokens`` (elastic: the spans follow
    the length of each call). Keys up to ``block`` long are plain causal, as the official
    SDPA fallback (one block, always visible).
    """

    alpha: float
    beta: float
    block: int = BLOCK
    sink_size: int = SINK_SIZE
    min_cache: int = MIN_CACHE
    extra_tokens: int = 0
    length: int | None = None

    def __post_init__(self) -> None:
        _check_alpha_beta(self.alpha, self.beta)
        check_rule(self.block, self.sink_size, self.min_cache)
        check_int("extra_tokens", self.extra_tokens, minimum=0)
        if self.length is not None:
            check_int("length", self.length, minimum=0)

    def __repr__(self) -> str:
        # the dataclass's text, written out: torch.compile traces it (auto's reasons name the
        # pattern), where the generated one is skipped and breaks the graph
        return (
            f"MoASpan(alpha={self.alpha!r}, beta={self.beta!r}, block={self.block!r}, "
            f"sink_size={self.sink_size!r}, min_cache={self.min_cache!r}, "
            f"extra_tokens={self.extra_tokens!r}, length={self.length!r})"
        )

    def cache_size(self, total: int) -> tuple[int, int]:
        """``(sink, local)`` of this head for total length ``N = total``."""
        return moa_cache_size(
            self.alpha,
            self.beta,
            total,
            block=self.block,
            sink_size=self.sink_size,
            min_cache=self.min_cache,
        )

    def _allowed(self, h, q_idx, kv_idx, q_len, kv_len):
        total = self.length if self.length is not None else kv_len + self.extra_tokens
        sink, local = self.cache_size(total)
        pos = query_positions(q_idx, q_len, kv_len, "bottom_right")
        q_block, kv_block = pos // self.block, kv_idx // self.block
        window = (kv_block < sink // self.block) | (kv_block >= q_block + 1 - local // self.block)
        return (kv_idx <= pos) & window

    def _key_ranges(self, q_idx, q_len, kv_len):
        # the sink blocks and the local window, each cut at the query (plans in O(rows))
        total = self.length if self.length is not None else kv_len + self.extra_tokens
        sink, local = self.cache_size(total)
        pos = query_positions(q_idx, q_len, kv_len, "bottom_right")
        first = (pos // self.block + 1 - local // self.block) * self.block
        sink_stop = torch.full_like(pos, sink // self.block * self.block).minimum(pos + 1)
        lo = torch.stack([torch.zeros_like(pos), first], -1).clamp(0, kv_len)
        hi = torch.stack([sink_stop, pos + 1], -1).clamp(0, kv_len)
        return lo[None], hi[None]


def _encode(value: float) -> float | str:
    # Strict JSON has no Infinity; a dense head (alpha = inf) is written as the string "inf".
    return "inf" if value == math.inf else value


@dataclass(frozen=True)
class MoAPlan:
    """Per-layer, per-head ``(alpha, beta)`` and the cache rule they are applied with.

    ``alphas[l][h]`` in tokens (``math.inf`` = dense), ``betas[l][h]`` >= 0 a fraction of the
    total length ``N``. ``block``, ``sink_size``, ``min_cache`` and ``max_new_tokens`` are the
    official rounding parameters (:func:`moa_cache_size`); at runtime ``N = kv_len +
    max_new_tokens`` as the official prefill sizes the cache for the whole generation.
    """

    alphas: tuple[tuple[float, ...], ...]
    betas: tuple[tuple[float, ...], ...]
    block: int = BLOCK
    sink_size: int = SINK_SIZE
    min_cache: int = MIN_CACHE
    max_new_tokens: int = MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        for layer_a, layer_b in zip(self.alphas, self.betas):
            for a, b in zip(layer_a, layer_b):
                _check_alpha_beta(a, b)
        alphas = tuple(tuple(float(a) for a in layer) for layer in self.alphas)
        betas = tuple(tuple(float(b) for b in layer) for layer in self.betas)
        object.__setattr__(self, "alphas", alphas)
        object.__setattr__(self, "betas", betas)
        shape_a, shape_b = [len(layer) for layer in alphas], [len(layer) for layer in betas]
        if shape_a != shape_b or not shape_a or min(shape_a) < 1:
            raise ValueError(
                "alphas and betas must be non-empty per-layer lists of per-head values of the "
                f"same shape; got heads per layer {shape_a} and {shape_b}"
            )
        check_rule(self.block, self.sink_size, self.min_cache)
        check_int("max_new_tokens", self.max_new_tokens, minimum=0)

    @classmethod
    def uniform(
        cls, num_layers: int, num_heads: int, alpha: float, beta: float, **rule: int
    ) -> MoAPlan:
        """Every head the same: e.g. ``alpha=0, beta=0.5`` (the official StreamingLLM baseline)
        or ``alpha=math.inf`` (dense)."""
        check_int("num_layers", num_layers, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        return cls(
            ((alpha,) * num_heads,) * num_layers, ((beta,) * num_heads,) * num_layers, **rule
        )

    @property
    def num_layers(self) -> int:
        return len(self.alphas)

    def _layer(self, layer: int) -> int:
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not 0 <= layer < len(self.alphas)
        ):
            raise ValueError(f"layer must be in [0, {len(self.alphas)}); got {layer!r}")
        return layer

    def spans(self, layer: int = 0, length: int | None = None) -> list[MoASpan]:
        """The heads of ``layer`` as :class:`MoASpan` patterns (elastic unless ``length``)."""
        layer = self._layer(layer)
        return [
            MoASpan(
                a,
                b,
                self.block,
                self.sink_size,
                self.min_cache,
                extra_tokens=self.max_new_tokens,
                length=length,
            )
            for a, b in zip(self.alphas[layer], self.betas[layer])
        ]

    def pattern(self, n_heads: int, length: int | None = None, *, layer: int = 0) -> Pattern:
        """``patterns.per_head`` of ``layer``'s heads for a layer of ``n_heads`` query heads.

        ``length`` fixes the total length ``N`` the spans are sized for (prompt plus new
        tokens); ``None`` keeps them elastic (``N = kv_len + max_new_tokens`` per call).
        """
        spans = self.spans(layer, length)
        if n_heads != len(spans):
            raise ValueError(f"plan layer {layer} has {len(spans)} heads; got n_heads={n_heads}")
        return patterns.per_head(spans)

    def layer_patterns(self, length: int | None = None) -> list[Pattern]:
        """One per-head pattern per layer (for models other than headwise layers)."""
        return [
            self.pattern(len(heads), length, layer=layer) for layer, heads in enumerate(self.alphas)
        ]

    def apply(self, mha: MultiHeadAttention, *, layer: int = 0) -> MultiHeadAttention:
        """Set ``mha.pattern`` to ``layer``'s elastic per-head pattern; returns ``mha``."""
        if not isinstance(mha, MultiHeadAttention):
            raise ValueError(f"mha must be a headwise MultiHeadAttention; got {type(mha).__name__}")
        mha.pattern = self.pattern(mha.num_heads, layer=layer)
        return mha

    def cache_sizes(self, length: int, layer: int = 0) -> list[tuple[int, int]]:
        """``(sink, local)`` per head of ``layer`` for total length ``length``."""
        return [span.cache_size(length) for span in self.spans(self._layer(layer), length)]

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        data = asdict(self)
        data["alphas"] = [[_encode(a) for a in layer] for layer in self.alphas]
        data["betas"] = [list(layer) for layer in self.betas]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> MoAPlan:
        data = dict(data)
        data["alphas"] = [[float(a) for a in layer] for layer in data["alphas"]]
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> MoAPlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> MoAPlan:
        return cls.from_json(Path(path).read_text())


# --------------------------------------------------------------------------- decoding
class MoACache:
    """Per-head decode cache: the first ``sink_h`` tokens plus a ring of the last ``local_h``.

    ``k``, ``v`` ``(B, S, H, D)`` with ``S = max_h(sink_h + local_h)``, one slot row per query
    head (GQA keys are repeated per query head, as the official code converts GQA to MHA). Token
    ``p`` of head ``h`` lives in slot ``p`` if ``p < sink_h + local_h`` at first, later at
    ``sink_h + (p - sink_h) mod local_h`` (overwriting the oldest local token), so after token
    ``t`` the head holds exactly ``{0..sink_h-1} U {t-local_h+1..t}`` (token granular, unlike the
    block-aligned prefill window). Inference only: buffers are written in place.
    """

    def __init__(
        self,
        batch: int,
        sizes: Sequence[tuple[int, int]],
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_int("batch", batch, minimum=1)
        check_int("max_len", max_len, minimum=1)
        self.sink = torch.tensor([s for s, _ in sizes], device=device)
        self.local = torch.tensor([loc for _, loc in sizes], device=device)
        slots = int((self.sink + self.local).max())
        shape = (batch, slots, len(sizes), head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        """``(n, H)`` slot of each position per head (ring position for tokens past the sink)."""
        p = positions[:, None]
        ring = self.sink + (p - self.sink) % self.local.clamp_min(1)
        return torch.where(p < self.sink, p.expand(-1, len(self.sink)), ring)

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k``, ``v`` ``(B, n, H, D)`` (per query head) at positions ``length..``."""
        n = k.shape[1]
        if self.length + n > self.max_len:
            raise ValueError(
                f"cache holds max_len={self.max_len} tokens; {self.length} cached + {n} new"
            )
        positions = torch.arange(self.length, self.length + n, device=self.k.device)
        end = self.length + n
        # Only the tokens a head keeps after this write, so no two share a slot.
        keep = (positions[:, None] < self.sink) | (positions[:, None] >= end - self.local)
        token, head = keep.nonzero(as_tuple=True)
        slot = self._slots(positions)[token, head]
        self.k[:, slot, head] = k[:, token, head]
        self.v[:, slot, head] = v[:, token, head]
        self.length = end

    def bias(self) -> torch.Tensor:
        """``(1, H, 1, S)`` additive mask: 0 on filled slots, ``-inf`` on empty ones."""
        filled = torch.clamp(self.sink + self.local, max=self.length)
        slots = torch.arange(self.k.shape[1], device=self.k.device)
        empty = slots[None, :] >= filled[:, None]
        bias = torch.zeros(empty.shape, dtype=self.k.dtype, device=self.k.device)
        return bias.masked_fill(empty, float("-inf"))[None, :, None, :]


class MoAAttention(MultiHeadAttention):
    """Multi-head attention where head ``h`` sees a sink plus a local window of elastic span.

    ``span_h(N) = alpha_h + beta_h * N`` tokens (sink included), rounded by
    :func:`moa_cache_size` with ``N = kv_len + max_new_tokens``. Prefill (no cache, or the
    first call on an empty :class:`MoACache`) uses the block-granular :class:`MoASpan` mask;
    decoding with ``cache = layer.new_cache(B, max_len)`` keeps per head exactly the first
    ``sink_h`` and last ``local_h`` tokens (sizes from ``N = max_len``), so prefill and decode
    may see slightly different keys at the same position, as in the official code. Decoding
    attends one token at a time over the cache's slots: ``hook_scores`` and ``hook_pattern`` see
    ``(B, H, 1, S)`` per token, in slot order; ``hook_z`` sees the whole call's ``(B, L, H, D)``.

    Args:
        embed_dim, num_heads, **kwargs: as :class:`MultiHeadAttention` (``pattern`` and
            ``causal`` are set by this layer).
        alphas, betas: one ``alpha_h`` (tokens, ``math.inf`` = dense) and ``beta_h`` (>= 0) per
            query head, e.g. one layer of a :class:`MoAPlan` (or use ``plan.apply(layer)``).
        block, sink_size, min_cache, max_new_tokens: the rounding rule (official 64, 64, 128,
            1024).

    Shapes: ``forward(x: (B, L, E)) -> (B, L, E)``; heads ``(B, L, H, D)`` inside.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        alphas: Sequence[float],
        betas: Sequence[float],
        block: int = BLOCK,
        sink_size: int = SINK_SIZE,
        min_cache: int = MIN_CACHE,
        max_new_tokens: int = MAX_NEW_TOKENS,
        **kwargs,
    ) -> None:
        for name in ("pattern", "causal"):
            if name in kwargs:
                raise ValueError(f"MoAAttention sets {name} itself; got {name}={kwargs[name]!r}")
        plan = MoAPlan(
            (tuple(alphas),), (tuple(betas),), block, sink_size, min_cache, max_new_tokens
        )
        super().__init__(embed_dim, num_heads, pattern=plan.pattern(num_heads), **kwargs)

    def _spans(self) -> tuple[MoASpan, ...]:
        heads = getattr(self.pattern, "patterns", ())
        if not heads or not all(isinstance(p, MoASpan) for p in heads):
            raise ValueError(f"MoAAttention needs a per-head MoASpan pattern; got {self.pattern}")
        return heads

    def new_cache(
        self,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> MoACache:
        """An empty :class:`MoACache` sized for ``max_len`` tokens (prompt + generation)."""
        check_int("max_len", max_len, minimum=1)
        weight = self.k_proj.weight
        sizes = [span.cache_size(max_len) for span in self._spans()]
        return MoACache(
            batch,
            sizes,
            self.head_dim,
            max_len,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        cache: MoACache | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`MultiHeadAttention.forward`; ``cache`` is a :class:`MoACache`."""
        if cache is None:
            return super().forward(x, context, cu_seqlens=cu_seqlens, bias=bias)
        if not isinstance(cache, MoACache):
            raise ValueError(f"cache must be a MoACache (layer.new_cache); got {type(cache)}")
        if context is not None or cu_seqlens is not None or bias is not None:
            raise ValueError("decoding with a MoACache takes no context, cu_seqlens or bias")
        if x.dim() != 3 or x.shape[0] != cache.batch or x.shape[-1] != self.embed_dim:
            raise ValueError(
                f"x must be (B={cache.batch}, L, E={self.embed_dim}); got {tuple(x.shape)}"
            )
        check_input("x", x, self)
        q, k, v = self.project(x)
        q, k = self.position(q, k, cache.length)
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        if cache.length == 0:
            # Prefill: the block-granular pattern, spans sized for the whole generation.
            spans = [
                MoASpan(s.alpha, s.beta, s.block, s.sink_size, s.min_cache, length=cache.max_len)
                for s in self._spans()
            ]
            z = self._attention(q, k, v, patterns.per_head(spans), None)
            cache.write(k, v)
        else:
            steps = []
            for t in range(q.shape[1]):
                cache.write(k[:, t : t + 1], v[:, t : t + 1])
                steps.append(self._attention(q[:, t : t + 1], cache.k, cache.v, None, cache.bias()))
            z = torch.cat(steps, 1)
        return self.merge(self.hook_z(z))


_MOVED = ("attention_influence", "candidate_grid", "profile_influence", "search_plan")


__getattr__ = moved(__name__, {name: "headwise.moa" for name in _MOVED})


__all__ = ["MoAAttention", "MoACache", "MoAPlan", "MoASpan", "moa_cache_size"]
