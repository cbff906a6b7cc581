"""MoA: Mixture of Sparse Attention (heterogeneous elastic sliding windows with an attention sink).

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
(arXiv 2406.14909; CoLM 2025 as "Mixture of Attention Spans: Optimizing LLM Inference Efficiency
with Heterogeneous Sliding-Window Lengths"); official code thu-nics/MoA.

Every head ``h`` attends an attention sink plus a causal sliding window whose total span grows with
the length ``N``: ``span_h(N) = alpha_h + beta_h * N``. This module holds the rule
(:func:`moa_cache_size`), the prefill pattern (:class:`MoASpan`), the decode cache
(:class:`MoACache`), the layer (:class:`MoAAttention`), and the tooling that finds a plan for a
model: :func:`attention_influence` / :func:`profile_influence` (per-head loss influence of every
attention block on a calibration batch), :func:`candidate_grid` and :func:`search_plan`
(per-head ``(alpha, beta)`` under a density budget), and :class:`MoAPlan` (JSON, ``apply``).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from headwise import patterns
from headwise._checks import ArgumentTypeError, check_bool, check_int, check_real
from headwise.layers import multihead
from headwise.layers._init import check_input
from headwise.layers.multihead import MultiHeadAttention, _shape, apply_rotary
from headwise.ops.attention import attention
from headwise.patterns import Pattern
from headwise.patterns.library import _query_positions

# thu-nics/MoA ``moa_config_to_cache_config`` defaults.
BLOCK, SINK_SIZE, MIN_CACHE, MAX_NEW_TOKENS = 64, 64, 128, 1024


def _check_rule(block: int, sink_size: int, min_cache: int) -> None:
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
        _check_rule(self.block, self.sink_size, self.min_cache)
        check_int("extra_tokens", self.extra_tokens, minimum=0)
        if self.length is not None:
            check_int("length", self.length, minimum=0)

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
        pos = _query_positions(q_idx, q_len, kv_len, "bottom_right")
        q_block, kv_block = pos // self.block, kv_idx // self.block
        window = (kv_block < sink // self.block) | (kv_block >= q_block + 1 - local // self.block)
        return (kv_idx <= pos) & window


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
        _check_rule(self.block, self.sink_size, self.min_cache)
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
    may see slightly different keys at the same position, as in the official code.

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
        batch, q_len, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, q_len, self.num_heads, self.head_dim))
        k, v = self._project_kv(x)
        if self.rotary:
            positions = torch.arange(cache.length, cache.length + q_len, device=x.device)
            q = apply_rotary(q, positions, self.rope_base)
            k = apply_rotary(k, positions, self.rope_base)
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        if cache.length == 0:
            # Prefill: the block-granular pattern, spans sized for the whole generation.
            spans = [
                MoASpan(s.alpha, s.beta, s.block, s.sink_size, s.min_cache, length=cache.max_len)
                for s in self._spans()
            ]
            out = attention(
                q, k, v, patterns.per_head(spans), scale=self.scale, backend=self.backend
            )
            cache.write(k, v)
        else:
            steps = []
            for t in range(q_len):
                cache.write(k[:, t : t + 1], v[:, t : t + 1])
                steps.append(
                    attention(
                        q[:, t : t + 1],
                        cache.k,
                        cache.v,
                        scale=self.scale,
                        bias=cache.bias(),
                        backend=self.backend,
                    )
                )
            out = torch.cat(steps, 1)
        return self.out_proj(out.reshape(batch, q_len, self.num_heads * self.head_dim))


# --------------------------------------------------------------------------- profiling
def attention_influence(
    probs: torch.Tensor,
    grad: torch.Tensor,
    *,
    block: int = BLOCK,
    absolute: bool = True,
    causal: bool = True,
) -> torch.Tensor:
    """Per-head loss influence of each ``block x block`` tile of attention (MoA §3.3).

    ``probs`` ``A`` and ``grad`` ``G = dLoss/dA``, both ``(B, H, Lq, Lk)``. Masking entry
    ``(i, j)`` and renormalising its row changes the loss, to first order, by::

        E_ij = -A_ij (G_ij - sum_n A_in G_in) / (1 - A_ij + delta)
        E_ij = -A_ij G_ij                                 where A_ij = 1

    as thu-nics/MoA's profiler (``modify_llama_profile.py``): ``delta`` is the machine epsilon of
    ``grad``'s dtype, and an entry holding its whole row (the first row of a causal profile)
    cannot be renormalised away, so its removal costs ``-A_ij G_ij``.

    ``E`` is made absolute (``absolute``), restricted to causal entries (bottom-right aligned,
    ``causal``), averaged over the batch and summed into tiles: returns ``(H, nQ, nK)`` float64
    with ``nQ = ceil(Lq / block)``, ``nK = ceil(Lk / block)``.
    """
    if (
        not isinstance(probs, torch.Tensor)
        or not isinstance(grad, torch.Tensor)
        or probs.dim() != 4
        or grad.shape != probs.shape
    ):
        raise ValueError(
            f"probs and grad must both be (B, H, Lq, Lk) tensors; got {_shape(probs)} and "
            f"{_shape(grad)}"
        )
    check_int("block", block, minimum=1)
    absolute = check_bool("absolute", absolute)
    causal = check_bool("causal", causal)
    delta = torch.finfo(grad.dtype if grad.is_floating_point() else torch.float64).eps
    a, g = probs.detach().double(), grad.detach().double()
    row = (a * g).sum(-1, keepdim=True)
    influence = torch.where(a >= 1, -a * g, -a * (g - row) / (1 - a + delta))
    if absolute:
        influence = influence.abs()
    q_len, kv_len = a.shape[-2:]
    if causal:
        visible = patterns.causal().dense_mask(q_len, kv_len, device=a.device)
        influence = influence * visible
    influence = influence.mean(0)
    n_q, n_k = -(-q_len // block), -(-kv_len // block)
    padded = nn.functional.pad(influence, (0, n_k * block - kv_len, 0, n_q * block - q_len))
    return padded.view(-1, n_q, block, n_k, block).sum((2, 4))


def _probabilities(q, k, pattern, scale, bias):
    """Dense attention probabilities ``(B, H, Lq, Lk)`` of the reference formula, with grad."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, 1)
    scores = (qh @ kh.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if bias is not None:
        scores = scores + bias
    if pattern is not None:
        visible = pattern.dense_mask(q.shape[1], k.shape[1], device=q.device)
        scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0)


@contextmanager
def _recording(modules: Sequence[MultiHeadAttention]) -> Iterator[dict]:
    """Route the attention of ``modules`` through the explicit formula, keeping ``A``.

    :class:`MultiHeadAttention` calls :func:`headwise.attention`, which never materialises the
    probabilities; for profiling (small calibration batches) the module-level ``attention`` of
    :mod:`headwise.layers.multihead` is swapped, for the duration of the block only, for the
    dense formula, and forward hooks tell which module is calling.
    """
    records: dict = {}
    running: list = []
    original = multihead.attention

    def recording_attention(q, k, v, pattern=None, *, scale=None, bias=None, **_):
        if not running:
            return original(q, k, v, pattern, scale=scale, bias=bias)
        probs = _probabilities(q, k, pattern, scale, bias)
        records.setdefault(running[-1], []).append(probs)
        vh = v.transpose(1, 2).repeat_interleave(q.shape[2] // v.shape[2], 1)
        return (probs.to(v.dtype) @ vh).transpose(1, 2)

    def enter(module, args) -> None:
        running.append(module)

    def leave(module, args, output) -> None:
        running.pop()

    hooks = []
    for module in modules:
        hooks.append(module.register_forward_pre_hook(enter))
        hooks.append(module.register_forward_hook(leave))
    multihead.attention = recording_attention
    try:
        yield records
    finally:
        multihead.attention = original
        for hook in hooks:
            hook.remove()


def profile_influence(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    *,
    block: int = BLOCK,
    absolute: bool = True,
) -> list[torch.Tensor]:
    """Influence tiles ``(H, nQ, nK)`` of every :class:`MultiHeadAttention` in ``model``.

    ``loss_fn(model)`` runs the calibration batch (self-attention, one call per layer; the
    official recipe takes the loss on response tokens regenerated by the dense model) and
    returns a scalar loss. Attention probabilities are computed densely with the explicit
    softmax, so keep the batch small. Layers are returned in ``model.modules()`` order,
    matching :class:`MoAPlan` layer indices.
    """
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not layers:
        raise ValueError(f"model has no headwise MultiHeadAttention; got {type(model).__name__}")
    with _recording(layers) as records:
        loss = loss_fn(model)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar tensor; got {loss!r}")
    calls = [records.get(layer, []) for layer in layers]
    if any(len(c) != 1 for c in calls):
        raise ValueError(
            f"each attention layer must run once in loss_fn; got {[len(c) for c in calls]} calls"
        )
    probs = [c[0] for c in calls]
    # Gradients with respect to the probabilities only: the model's .grad stay untouched.
    grads = torch.autograd.grad(loss, probs, allow_unused=True, materialize_grads=True)
    return [attention_influence(a, g, block=block, absolute=absolute) for a, g in zip(probs, grads)]


# --------------------------------------------------------------------------- plan search
def candidate_grid(
    length: int, *, alpha_step: int = 1024, num_betas: int = 9
) -> list[tuple[float, float]]:
    """Official candidate ``(alpha, beta)`` grid for profile length ``N``.

    ``beta`` in ``linspace(0, 1, num_betas)``, ``alpha`` multiples of ``alpha_step`` in
    ``[-N, N]``, keeping pairs with ``0 < alpha + beta * N <= N``.
    """
    check_int("length", length, minimum=1)
    check_int("alpha_step", alpha_step, minimum=1)
    check_int("num_betas", num_betas, minimum=2)
    betas = [i / (num_betas - 1) for i in range(num_betas)]
    alphas = range(-(length // alpha_step) * alpha_step, length + 1, alpha_step)
    return [(float(a), b) for b in betas for a in alphas if 0 < a + b * length <= length]


def _candidate_layout(
    alpha: float, beta: float, length: int, block: int, sink_size: int, min_cache: int
) -> torch.Tensor:
    """Block layout ``(n, n)`` of a candidate at length ``N`` (the runtime prefill rule)."""
    sink, local = moa_cache_size(
        alpha, beta, length, block=block, sink_size=sink_size, min_cache=min_cache
    )
    n = -(-length // block)
    q_block, kv_block = torch.arange(n)[:, None], torch.arange(n)[None, :]
    window = (kv_block < sink // block) | (kv_block >= q_block + 1 - local // block)
    return (kv_block <= q_block) & window


def search_plan(
    influence: Sequence[torch.Tensor],
    length: int,
    budget: float,
    *,
    candidates: Sequence[tuple[float, float]] | None = None,
    block: int = BLOCK,
    sink_size: int = SINK_SIZE,
    min_cache: int = MIN_CACHE,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> MoAPlan:
    """Pick ``(alpha_h, beta_h)`` per head minimising the summed influence loss under a budget.

    ``influence[l]`` ``(H_l, n, n)`` tiles from :func:`profile_influence` at profile length
    ``N = length`` (``n = ceil(N / block)``). For each candidate (default
    :func:`candidate_grid`) its **loss** is the influence outside its block layout and its
    **density** ("kv" mode of the official code) the most key blocks any query block keeps,
    over ``n``. The constraint is ``mean over all heads of density <= budget``.

    Solved exactly as a multiple-choice knapsack by dynamic programming over the integer total
    of kept key blocks (capacity ``floor(budget * heads * n)``), ``O(heads * capacity * n)``.
    Differences from the official search (a Gurobi MIP): one profile length (no multi-length
    epsilon-constraint Pareto sweep), no lower bound on density and no limit of 2 distinct
    spans per layer, and candidates are scored with the exact runtime layout (cache rounding
    included) instead of the approximate band of ``int(alpha/64 + beta * n)`` blocks.
    """
    check_int("length", length, minimum=1)
    _check_rule(block, sink_size, min_cache)
    if not 0 < check_real("budget", budget) <= 1:
        raise ValueError(f"budget must be in (0, 1]; got {budget!r}")
    n = -(-length // block)
    for layer, tiles in enumerate(influence):
        if not isinstance(tiles, torch.Tensor) or tiles.dim() != 3 or tiles.shape[1:] != (n, n):
            got = tuple(tiles.shape) if isinstance(tiles, torch.Tensor) else type(tiles).__name__
            raise ValueError(
                f"influence[{layer}] must be (H, {n}, {n}) tiles of block {block} at length "
                f"{length}; got {got}"
            )
    candidates = list(candidate_grid(length) if candidates is None else candidates)
    if not influence or not candidates:
        raise ValueError("search_plan needs at least one layer of influence and one candidate")
    rule = (block, sink_size, min_cache)
    layouts = torch.stack([_candidate_layout(a, b, length, *rule) for a, b in candidates])
    weights = layouts.sum(-1).amax(-1).tolist()  # kept key blocks of the widest row
    tiles = torch.cat([t.double().cpu() for t in influence])  # (heads, n, n)
    dropped = (~layouts).double().flatten(1)  # (K, n*n)
    losses = tiles.flatten(1) @ dropped.t()  # (heads, K)
    heads = tiles.shape[0]
    capacity = math.floor(budget * heads * n + 1e-9)
    if min(weights) * heads > capacity:
        raise ValueError(
            f"budget={budget} is below the sparsest candidate ({min(weights)}/{n} blocks per head)"
        )
    # best[c] = least loss of the heads so far within c kept blocks; choice[h, c] its pick.
    best = torch.zeros(capacity + 1, dtype=torch.float64)
    choice = torch.empty(heads, capacity + 1, dtype=torch.long)
    for h in range(heads):
        options = torch.full((len(candidates), capacity + 1), math.inf, dtype=torch.float64)
        for c, w in enumerate(weights):
            if w <= capacity:
                options[c, w:] = best[: capacity + 1 - w] + losses[h, c]
        best, choice[h] = options.min(0)
    picks, left = [], capacity
    for h in range(heads - 1, -1, -1):
        c = int(choice[h, left])
        picks.append(c)
        left -= weights[c]
    picks.reverse()
    alphas, betas, start = [], [], 0
    for tiles_l in influence:
        chosen = [candidates[c] for c in picks[start : start + tiles_l.shape[0]]]
        alphas.append(tuple(a for a, _ in chosen))
        betas.append(tuple(b for _, b in chosen))
        start += tiles_l.shape[0]
    return MoAPlan(tuple(alphas), tuple(betas), block, sink_size, min_cache, max_new_tokens)


__all__ = [
    "MoAAttention",
    "MoACache",
    "MoAPlan",
    "MoASpan",
    "attention_influence",
    "candidate_grid",
    "moa_cache_size",
    "profile_influence",
    "search_plan",
]
