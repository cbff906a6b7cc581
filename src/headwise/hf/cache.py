"""A KV cache that follows an attention pattern inside Hugging Face ``generate``: each KV head
keeps only the keys that some later query can still see, so the cache really shrinks.

A pattern swapped into a model (:func:`headwise.hf.swap_pattern`) only masks scores while the KV
cache keeps every key. :class:`PatternCache` is a transformers ``Cache`` that applies the pattern
itself and evicts the keys no later query sees: StreamingLLM's sinks + window (Xiao et al.,
"Efficient Streaming Language Models with Attention Sinks", ICLR 2024), MoA's per-head spans
with its decode rule (Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language
Model Compression", 2024: the first ``sink_h`` tokens plus a ring of the last ``local_h``),
S2-Attention's strided shards + window (Lin et al., "S2-Attention: Hardware-Aware Context
Sharding Among Attention Heads", 2024), sliding windows and per-head stacks of them.

Semantics (the masked-dense reference ``with swap_pattern(model, pattern): model.generate(...)``):
query ``i`` of a call over ``T`` cache positions (padding included, as the model's mask counts
them) sits at position ``p = T - Lq + i`` (bottom-right) and head ``h`` attends key ``j`` iff
``pattern(h, p, j)`` and the model's own causal/padding mask allows ``(p, j)``.

Eviction: after an update whose last position is ``t``, KV head ``g`` keeps key ``j`` iff some
query head ``h`` of its GQA group sees it from the next single-token query,
``pattern(h, t + 1, j)`` (over ``t + 2`` keys). That is exact for patterns whose visibility never
comes back once lost (``not P(h, p, j)`` implies ``not P(h, p', j)`` for every ``p' > p``), and
those alone are accepted: ``causal``, ``sliding_window``, ``sinks`` (bottom-right aligned),
``strided``, ``full``, :class:`~headwise.layers.moa.MoASpan` of a fixed ``length``, and ``&``,
``|``, ``per_head`` of them. Everything else (``documents``, ``block_sparse``, ``neighborhood``,
``modality_mutual``, elastic MoA spans, top-left alignment) raises ``ValueError``.

An :class:`~headwise.layers.moa.MoAPlan` fixes ``N = prompt + plan.max_new_tokens`` at the first
(prefill) update: the prefill attends with each head's block-granular ``MoASpan(length=N)``,
and decoding and eviction follow MoA's token-granular decode rule, ``sinks(sink_h) |
sliding_window(local_h - 1)`` with ``(sink_h, local_h) = plan.cache_sizes(N, layer)``.

Storage: KV heads whose query heads follow identical rules form a group, stored as one
``(B, heads_in_group, n_kept, D)`` tensor with its kept positions. ``update`` returns
``(B, H_kv, n, D)``: the kept keys and the new ones, groups padded to the longest (pad slots
marked invalid). The attention function (:func:`headwise.hf.registry.attention_forward`) knows
these tensors by identity and attends with the pattern at their absolute positions and slot
validity (hidden = ``-inf``, as absent keys) plus the model's mask gathered at those positions
(transformers' dtype minimum, as the model's own). Until a key is dropped (the prefill) the
slots are the positions themselves and the pattern goes to the kernel as such, with no dense mask.

Positions stay absolute: keys are cached after RoPE, exactly as the masked-dense reference (a
query at position 5000 sees a sink 5000 positions away). StreamingLLM's renumbering of positions
inside the cache is not done.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from headwise._checks import ArgumentTypeError, Unsupported, check_int
from headwise.hf.registry import NAME, language_sites, pending_update
from headwise.hf.swap import SwapPattern, _site_patterns, plan_sites
from headwise.hooks import Layers, Site, site_of
from headwise.layers import MoAPlan
from headwise.layers.moa import MoASpan
from headwise.patterns import Pattern, causal, per_head, sinks, sliding_window
from headwise.patterns.base import _Intersection, check_pattern
from headwise.patterns.library import Causal, Full, PerHead, Sinks, SlidingWindow, Strided

#: ``(prefill pattern, decode pattern)`` of a layer, given the length of its first update
_Rule = Callable[[int], tuple[Pattern, Pattern]]


def _followable(pattern: Pattern) -> str | None:
    """Why the cache cannot follow ``pattern`` exactly (``None``: it can): the reason names the
    first part whose visibility may come back after the cache dropped a key."""
    if isinstance(pattern, _Intersection):  # ``&`` and ``|`` both
        return next(filter(None, map(_followable, pattern.parts)), None)
    if isinstance(pattern, PerHead):
        return next(filter(None, map(_followable, pattern.patterns)), None)
    if isinstance(pattern, Full | Strided):
        return None
    aligned = isinstance(pattern, Causal | SlidingWindow)
    if aligned or (isinstance(pattern, Sinks) and pattern.causal):
        if pattern.align != "bottom_right":
            return f"{pattern!r} is top-left aligned: a query's position ignores the cached keys"
        return None
    if isinstance(pattern, Sinks):
        return None
    if isinstance(pattern, MoASpan):
        if pattern.length is None:
            return (
                f"{pattern!r} is elastic (length=None): its span grows with the length, so a "
                "dropped key could become visible again; give it a length, or pass the MoAPlan"
            )
        return None
    return (
        f"{pattern!r} may show a key to a later query after hiding it from an earlier one "
        "(only causal, sliding_window, sinks, strided, full, fixed-length MoASpan and their "
        "&, |, per_head are followed)"
    )


def _checked(pattern: Pattern, where: str, heads: int) -> Pattern:
    why = _followable(pattern)
    if why is not None:
        raise ValueError(f"PatternCache cannot follow the pattern of {where}: {why}")
    if pattern.num_heads is not None and pattern.head_patterns() is None:
        raise ValueError(f"PatternCache cannot split the pattern of {where} per head: {pattern!r}")
    return check_pattern(pattern, heads, "query heads", f"the pattern of {where}")


def _head_rules(pattern: Pattern, heads: int) -> list[object]:
    """A key per query head, equal for heads that follow the same rule."""
    return [None] * heads if pattern.num_heads is None else list(pattern.head_patterns())


def _moa_rule(plan: MoAPlan, layer: int) -> _Rule:
    def rule(prompt: int) -> tuple[Pattern, Pattern]:
        total = prompt + plan.max_new_tokens
        prefill = per_head(plan.spans(layer, total))
        decode = [
            sinks(sink) | sliding_window(local - 1) if local else sinks(sink)
            for sink, local in plan.cache_sizes(total, layer)
        ]
        return prefill, per_head(decode)

    return rule


def _fixed_rule(pattern: Pattern) -> _Rule:
    return lambda prompt: (pattern, pattern)


#: per group of KV heads: ``(query heads, head-agnostic pattern)`` for each distinct pattern
_GroupRules = list[list[tuple[torch.Tensor, Pattern]]]


class _Visibility:
    """``pattern.visible`` of queries ``0..Lq-1`` over given key positions, remembered for the
    layers of one step: layers that follow equal patterns over equal positions (a uniform
    pattern in every layer) evaluate it once."""

    def __init__(self) -> None:
        self.memo: dict[tuple[Pattern, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(
        self, pattern: Pattern, q_len: int, kv_len: int, positions: torch.Tensor
    ) -> torch.Tensor:
        """``(Lq, n)``: may query ``i`` (bottom-right over ``kv_len`` keys) see ``positions``."""
        key = (pattern, q_len, kv_len)
        hit = self.memo.get(key)
        if hit is not None and hit[0].shape == positions.shape and torch.equal(hit[0], positions):
            return hit[1]
        q_idx = torch.arange(q_len, device=positions.device)
        rows = pattern.visible(q_idx, positions, q_len, kv_len)[0]
        if len(self.memo) >= 64:  # entries of earlier steps
            self.memo.clear()
        self.memo[key] = (positions, rows)
        return rows


@dataclass
class _Update:
    """One layer's ``update``, waiting for its attention call (see
    :data:`headwise.hf.registry.pending_update`)."""

    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    #: the layer's pattern in this call, whole and split per group of KV heads
    pattern: Pattern
    rules: _GroupRules
    #: per group, the cache position of each of its first ``n_g`` slots
    positions: list[torch.Tensor]
    #: ``(H_kv, n)`` positions of every slot (pad slots: 0), for gathering the model's mask
    slots: torch.Tensor
    #: cache positions seen, the new ones included: the call's queries end at ``length - 1``
    length: int
    heads: int
    #: every head returns every position ``0..length-1`` in order (nothing dropped yet)
    complete: bool
    visible: _Visibility

    def attention(
        self,
        module: nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        q_len: int,
    ) -> tuple[torch.Tensor | None, Pattern | None, torch.Tensor | None]:
        """``(model's mask over the returned slots, pattern, hidden)`` of this call: either the
        whole pattern (nothing dropped yet: the slots are the positions), or ``hidden`` ``(1, H,
        Lq, n)``, 0 where the pattern shows a filled slot and ``-inf`` elsewhere (``None`` when
        every query head sees every slot)."""
        if key is not self.keys or value is not self.values:
            raise Unsupported(
                f"{type(module).__name__} hands the attention function other key/value tensors "
                "than PatternCache.update returned (the model changes them after the cache), so "
                "headwise cannot tell which positions they hold"
            )
        if getattr(module, "layer_idx", None) != self.layer:
            raise Unsupported(
                f"PatternCache updated layer {self.layer} but {type(module).__name__} with "
                f"layer_idx={getattr(module, 'layer_idx', None)!r} attends"
            )
        if attention_mask is not None and attention_mask.shape[-1] != self.length:
            raise Unsupported(
                f"the model's mask spans {attention_mask.shape[-1]} keys; PatternCache has seen "
                f"{self.length} positions"
            )
        # without a mask transformers implies the causal one; a single query sees no later key
        implied = attention_mask is None and q_len > 1
        if self.complete:
            return attention_mask, self.pattern & causal() if implied else self.pattern, None
        n = self.keys.shape[2]
        seen = []
        for rules, positions in zip(self.rules, self.positions):
            for heads, pattern in rules:
                pattern = pattern & causal() if implied else pattern
                seen.append((heads, self.visible(pattern, q_len, self.length, positions)))
        hidden = None
        if any(rows.shape[-1] < n or not bool(rows.all()) for _, rows in seen):
            allowed = torch.zeros(self.heads, q_len, n, dtype=torch.bool, device=self.slots.device)
            for heads, rows in seen:
                allowed[heads, :, : rows.shape[-1]] = rows
            hidden = torch.zeros(allowed.shape, dtype=self.keys.dtype, device=allowed.device)
            hidden = hidden.masked_fill(~allowed, -math.inf)[None]
        if attention_mask is not None:
            if len(self.positions) == 1:
                attention_mask = attention_mask[..., self.positions[0]]
            else:
                picked = attention_mask[:, 0][..., self.slots]  # (B, Lq, H_kv, n)
                group = self.heads // self.slots.shape[0]
                attention_mask = picked.permute(0, 2, 1, 3).repeat_interleave(group, 1)
        return attention_mask, None, hidden


class _PatternLayer(CacheLayerMixin):
    """One decoder layer's cache: groups of KV heads, each with its kept keys and positions;
    ``rule is None`` keeps every key (a layer the pattern does not choose)."""

    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        layer: int,
        config,
        heads: int,
        kv_heads: int,
        rule: _Rule | None,
        keys: list,
        visible: _Visibility,
    ):
        super().__init__()
        self.layer, self.config, self.heads, self.kv_heads = layer, config, heads, kv_heads
        self.rule, self.visible = rule, visible
        #: the patterns of the first call and of every later one, split per group
        self.prefill: tuple[Pattern, _GroupRules] | None = None
        self.decode: tuple[Pattern, _GroupRules] | None = None
        self.seen = 0
        group = heads // kv_heads
        members: dict[tuple, list[int]] = {}
        for g in range(kv_heads):
            members.setdefault(tuple(keys[g * group : (g + 1) * group]), []).append(g)
        #: KV head indices of every group
        self.groups = [torch.tensor(kv) for kv in members.values()]
        self.group_keys: list[torch.Tensor] = []
        self.group_values: list[torch.Tensor] = []
        self.group_positions: list[torch.Tensor] = []

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.groups = [g.to(self.device) for g in self.groups]
        batch, dk, dv = key_states.shape[0], key_states.shape[-1], value_states.shape[-1]
        self.group_keys = [key_states.new_zeros(batch, len(g), 0, dk) for g in self.groups]
        self.group_values = [value_states.new_zeros(batch, len(g), 0, dv) for g in self.groups]
        none = torch.zeros(0, dtype=torch.long, device=self.device)
        self.group_positions = [none] * len(self.groups)
        self.is_initialized = True

    def _split(self, pattern: Pattern) -> tuple[Pattern, _GroupRules]:
        """``pattern`` and, per group, its distinct head patterns with the query heads of each."""
        per_head = pattern.head_patterns() if pattern.num_heads else (pattern,) * self.heads
        group = self.heads // self.kv_heads
        rules = []
        for kv in self.groups:
            distinct: dict[Pattern, list[int]] = {}
            for g in kv.tolist():
                for h in range(g * group, (g + 1) * group):
                    distinct.setdefault(per_head[h], []).append(h)
            rules.append([(torch.tensor(h, device=self.device), p) for p, h in distinct.items()])
        return pattern, rules

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` ``(B, H_kv, L, D)`` at the next ``L`` cache
        positions, return the kept keys plus the new ones, then drop what no later query sees."""
        if key_states.dim() != 4 or key_states.shape[1] != self.kv_heads:
            raise Unsupported(
                f"PatternCache layer {self.layer} holds {self.kv_heads} KV heads; got key states "
                f"of shape {tuple(key_states.shape)}"
            )
        if self.config._attn_implementation != NAME:
            raise Unsupported(
                f"PatternCache needs the model to run headwise attention (it attends with the "
                f"pattern over the kept slots); the model runs "
                f"{self.config._attn_implementation!r}: call headwise.hf.attach(model)"
            )
        if pending_update.get() is not None:
            stale = pending_update.get()
            pending_update.set(None)  # refused once: the next call starts afresh
            raise Unsupported(
                f"the previous PatternCache update (layer {stale.layer}) never "
                "reached headwise's attention function (an earlier error, or attention that "
                "bypasses headwise): this update is refused, and the next one starts afresh"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        sized = self.decode is not None and self.prefill[0] != self.decode[0]
        if sized and key_states.shape[2] > 1:
            # an MoA plan sizes its spans for prompt + max_new_tokens at the first call
            raise Unsupported(
                f"PatternCache follows an MoA plan sized at its first call ({self.seen} tokens); "
                f"a later call of {key_states.shape[2]} tokens would be a chunked prefill the "
                "plan was not sized for: pass the whole prompt in one call"
            )
        start, self.seen = self.seen, self.seen + key_states.shape[2]
        new = torch.arange(start, self.seen, device=self.device)
        if self.rule is not None and self.decode is None:
            prefill, decode = self.rule(key_states.shape[2])
            self.prefill, self.decode = self._split(prefill), self._split(decode)
        parts = []
        for g, heads in enumerate(self.groups):
            new_k, new_v = key_states, value_states
            if len(self.groups) > 1:
                new_k, new_v = key_states[:, heads], value_states[:, heads]
            parts.append(
                (
                    torch.cat([self.group_keys[g], new_k], 2),
                    torch.cat([self.group_values[g], new_v], 2),
                    torch.cat([self.group_positions[g], new]),
                )
            )
        keys, values, slots = self._assemble(parts, key_states)
        if self.rule is not None:
            pattern, rules = self.prefill if start == 0 else self.decode
            positions = [p for _, _, p in parts]
            complete = all(len(p) == self.seen for p in positions)
            pending_update.set(
                _Update(
                    self.layer,
                    keys,
                    values,
                    pattern,
                    rules,
                    positions,
                    slots,
                    self.seen,
                    self.heads,
                    complete,
                    self.visible,
                )
            )
            self._evict(parts)
        self._store(parts)
        return keys, values

    def _assemble(self, parts, key_states):
        """The groups as ``(B, H_kv, n, D)`` keys and values, padded to the longest group, and
        the ``(H_kv, n)`` position of every slot (pad slots: 0)."""
        if len(parts) == 1:
            keys, values, positions = parts[0]
            return keys, values, positions.expand(self.kv_heads, -1)
        n = max(len(p) for _, _, p in parts)
        batch, _, _, dim = key_states.shape
        keys = key_states.new_zeros(batch, self.kv_heads, n, dim)
        values = key_states.new_zeros(batch, self.kv_heads, n, parts[0][1].shape[-1])
        slots = torch.zeros(self.kv_heads, n, dtype=torch.long, device=self.device)
        for heads, (k, v, p) in zip(self.groups, parts):
            keys[:, heads, : len(p)] = k
            values[:, heads, : len(p)] = v
            slots[heads, : len(p)] = p
        return keys, values, slots

    def _evict(self, parts: list) -> None:
        """Keep per group only the keys the next single-token query sees for some query head of
        the group."""
        for g, (rules, (k, v, p)) in enumerate(zip(self.decode[1], parts)):
            keep = torch.zeros(len(p), dtype=torch.bool, device=self.device)
            for _, pattern in rules:
                keep |= self.visible(pattern, 1, self.seen + 1, p)[0]
            if not bool(keep.all()):
                parts[g] = k[:, :, keep], v[:, :, keep], p[keep]

    def _store(self, parts: list) -> None:
        for g, (k, v, p) in enumerate(parts):
            self.group_keys[g], self.group_values[g], self.group_positions[g] = k, v, p

    def kept(self) -> list[torch.Tensor]:
        """Kept cache positions per KV head."""
        out: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * self.kv_heads
        for heads, p in zip(self.groups, self.group_positions):
            for h in heads.tolist():
                out[h] = p.clone()
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.group_keys, *self.group_values))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.group_keys, self.group_values, self.group_positions = [], [], []
        self.prefill = self.decode = None
        self.seen = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise Unsupported(
            "PatternCache cannot crop: it has dropped keys that the positions before the crop "
            "would see again (assisted decoding and rollbacks need a DynamicCache)"
        )

    def _batch(self, index: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.group_keys = [index(k) for k in self.group_keys]
        self.group_values = [index(v) for v in self.group_values]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch(lambda t: t[indices])


class PatternCache(Cache):
    """A transformers ``Cache`` whose attention follows ``pattern`` and whose KV heads keep only
    the keys a later query still sees (rules and exactness: module docstring).

    ``pattern``: one :class:`~headwise.patterns.Pattern` for every chosen site, a mapping of
    site names to patterns, or an :class:`~headwise.layers.moa.MoAPlan` (layer ``l`` of the plan
    for the ``l``-th chosen site), resolved as :func:`headwise.hf.swap_pattern` resolves it;
    ``layers`` chooses the sites (default: all). Sites not chosen keep every key. The model is
    attached (:func:`headwise.hf.attach`) and its attention modules must carry ``layer_idx``.
    For a plan the reference is not ``swap_pattern(model, plan)`` (elastic spans, one rule): it
    is the prefill under ``plan.pattern(heads, N, layer=l)`` and decoding under MoA's decode
    rule, with ``N`` fixed at the first call (module docstring); a later multi-token call
    (a chunked prefill) is refused.

    Use: ``model.generate(**inputs, cache=PatternCache(model, pattern))`` (``past_key_values=``
    in older spellings) or ``model(ids, cache=cache, use_cache=True)``: no swap is needed, every
    call made with this cache attends with the pattern. ``kept(layer)`` lists the kept cache
    positions per KV head, ``nbytes()`` the bytes of stored keys and values. A cache cannot be
    cropped (assisted decoding); beam search reorders it.
    """

    def __init__(self, model: nn.Module, pattern: SwapPattern, layers: Layers = None) -> None:
        pending_update.set(None)  # an update an interrupted call left behind is void
        stack = language_sites(model)
        modules = {id(site_of(m)): m for m in model.modules() if site_of(m) is not None}
        if isinstance(pattern, MoAPlan):
            chosen = plan_sites(model, pattern, layers)
            rules: dict[str, tuple[_Rule, list]] = {}
            for i, site in enumerate(chosen):
                spans = pattern.spans(i)
                if len(spans) != site.heads:
                    raise ValueError(
                        f"MoA plan layer {i} has {len(spans)} heads; {site.name} has {site.heads}"
                    )
                rules[site.name] = (_moa_rule(pattern, i), [(s.alpha, s.beta) for s in spans])
        else:
            by_site = {s.name: s for s in stack}
            rules = {}
            for name, p in _site_patterns(model, pattern, layers).items():
                if name in by_site:
                    heads = by_site[name].heads
                    rules[name] = (_fixed_rule(_checked(p, name, heads)), _head_rules(p, heads))
                else:
                    rules[name] = (None, [])
        cache_layers: dict[int, _PatternLayer] = {}
        visible = _Visibility()
        for site in stack:
            rule, keys = rules.pop(site.name, (None, [None] * site.heads))
            cache_layers[site.index] = _layer(site, modules[id(site)], rule, keys, visible)
        if rules:
            raise ValueError(
                "PatternCache follows the language model's self-attention "
                f"{[s.name for s in stack]}; it cannot hold {sorted(rules)}"
            )
        if sorted(cache_layers) != list(range(len(cache_layers))):
            raise Unsupported(f"layer indices {sorted(cache_layers)} do not number 0..n-1")
        super().__init__(layers=[cache_layers[i] for i in range(len(cache_layers))])

    def kept(self, layer: int) -> list[torch.Tensor]:
        """The cache positions KV head ``g`` of decoder layer ``layer`` keeps, one 1-D tensor
        per KV head (ascending)."""
        check_int("layer", layer, minimum=0)
        if layer >= len(self.layers):
            raise ValueError(f"layer must be in [0, {len(self.layers)}); got {layer}")
        return self.layers[layer].kept()

    def nbytes(self) -> int:
        """Bytes of the stored keys and values, summed over layers (the KV memory)."""
        return sum(layer.nbytes() for layer in self.layers)

    def crop(self, tokens_to_remove: int) -> None:
        self.layers[0].crop(tokens_to_remove)


def _layer(
    site: Site, module: nn.Module, rule: _Rule | None, keys: list, visible: _Visibility
) -> _PatternLayer:
    index = getattr(module, "layer_idx", None)
    if isinstance(index, bool) or not isinstance(index, int):
        raise Unsupported(
            f"{site.name}: {type(module).__name__} has no layer_idx, so PatternCache cannot tell "
            "which cache layer its keys belong to"
        )
    if index != site.index:
        raise Unsupported(f"{site.name}: layer_idx={index} differs from the site's {site.index}")
    groups = getattr(module, "num_key_value_groups", None)
    if groups is None:
        kv = getattr(module.config, "num_key_value_heads", None) or site.heads
        groups = site.heads // kv
    if not isinstance(groups, int) or groups < 1 or site.heads % groups:
        raise ArgumentTypeError(f"{site.name}: cannot read its GQA groups; got {groups!r}")
    kv_heads = site.heads // groups
    return _PatternLayer(index, module.config, site.heads, kv_heads, rule, keys, visible)
