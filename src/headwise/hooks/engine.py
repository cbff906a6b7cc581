"""The hook engine: read and steer the attention calls of a model, one named site at a time.

An integration (:mod:`headwise.hf`, context parallelism in :mod:`headwise.distributed`, a future
diffusers one) names the attention modules of a model as sites (:class:`Site`, TransformerLens'
``blocks.3.attn``), installs them with :func:`install`, and routes each module's attention call
through :func:`run_attention`, after turning its own conventions (keyword tables, masks, layouts)
into ``(B, L, H, D)`` tensors, a pattern, a scale, an additive bias and a ``score_mod``.
Hooks (:class:`Hook`), added with :func:`hooked`, then see every call.

A call computes the fast path (:func:`headwise.attention`) for every head and, only for the heads
and query rows some hook asks for (the union of their :class:`Request` objects), recomputes
scores and probabilities from the saved log-sum-exp: ``p = exp(s - lse)``. Hooks see which query
rows are real tokens (:attr:`Call.query_mask`): the padding a self-attention mask hides from
every query, shared with the cross-attention of the same layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from headwise._checks import ArgumentTypeError, Unsupported, check_int
from headwise.ops.attention import attention
from headwise.patterns import Pattern
from headwise.types import ScoreMod

#: an LSE below this marks a row without visible keys (masks add the dtype minimum, ~ -3e38)
_DEAD_ROW = -1e30


@dataclass
class Site:
    """One attention module of a model: its hook-point prefix and the model's hooks.

    ``kind`` is ``"attn"`` or ``"cross_attn"``; a cross-attention's query rows are the tokens of
    the self-attention ``queries_from`` of its layer, whose last query mask it reuses. ``tower``
    is the prefix of multi-tower models (``"vision_model."``, ``""`` for one tower); ``layer``
    the block that holds the module (for pre-hooks on its input).
    """

    name: str
    index: int
    tower: str
    heads: int
    hooks: list = field(repr=False)
    layer: nn.Module = field(repr=False)
    kind: str = "attn"
    queries_from: Site | None = field(default=None, repr=False)
    last_query_mask: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class Request:
    """Heads and query rows whose scores/probabilities a hook needs (``None`` = all)."""

    heads: list[int] | None = None
    rows: list[int] | None = None


class Hook:
    """Base of everything that reads or steers attention inside :func:`run_attention`.

    Subclasses override what they need; each method gets the :class:`Call` of one module call.
    Order inside a call: ``pattern`` -> ``request`` (before the fast path runs: ``call.out`` is
    not set yet) -> fast attention for all heads -> explicit scores of the requested block ->
    ``edit_scores`` -> probabilities -> ``edit_probs`` -> block outputs replace the fast ones
    if anything was edited -> ``edit_output`` -> ``observe``.
    ``edit_*`` return ``True`` when they changed something.
    """

    def pattern(self, site: Site) -> Pattern | None:
        return None

    def attend(self, module, q, k, v, pattern, scale, bias, score_mod) -> torch.Tensor | None:
        """Compute the attention of ``module`` instead of :func:`headwise.attention` (``(B, L,
        H, D)`` tensors; ``bias`` is the model's mask): e.g. ring attention over ranks. ``None``
        leaves the computation as it is."""
        return None

    def request(self, call: Call) -> Request | None:
        return None

    def needs_lse(self, call: Call) -> bool:
        return False

    def edit_scores(self, call: Call) -> bool:
        return False

    def edit_probs(self, call: Call) -> bool:
        return False

    def edit_output(self, call: Call) -> None:
        return None

    def observe(self, call: Call) -> None:
        return None


@dataclass
class Call:
    """Tensors of one attention call, in headwise's ``(B, L, H, D)`` layout.

    ``bias`` is the additive mask ``(B|1, 1|H, Lq, Lk)`` (T5's position bias included) or
    ``None``; ``score_mod`` bends the scaled scores before the bias (a softcap);
    ``out`` ``(B, Lq, H, Dv)`` is the per-head output before the output projection.
    ``heads``/``rows`` index the explicit block; ``scores`` and ``probs`` are ``(B, len(heads),
    len(rows), Lk)`` in float32. ``query_mask`` ``(B, Lq)`` bool marks the real query rows
    (``None``: every row is real, or the call cannot tell, as a cached step's new tokens).
    """

    site: Site
    module: nn.Module
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    bias: torch.Tensor | None
    pattern: Pattern | None
    score_mod: ScoreMod | None
    query_mask: torch.Tensor | None = None
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    probs: torch.Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.q.shape[2]

    def block_scores(self, heads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Pre-softmax scores ``(B, h, r, Lk)`` (float32, mask included) of some heads and rows."""
        group = self.q.shape[2] // self.k.shape[2]
        kv_len = self.k.shape[1]
        q = self.q[:, rows][:, :, heads].float()
        k = self.k[:, :, heads // group].float()
        s = torch.einsum("brhd,bkhd->bhrk", q, k) * self.scale
        if self.score_mod is not None:
            b = torch.arange(s.shape[0], device=s.device)[:, None, None, None]
            keys = torch.arange(kv_len, device=s.device)[None, None, None, :]
            s = self.score_mod(s, b, heads[None, :, None, None], rows[None, None, :, None], keys)
        if self.bias is not None:
            b = self.bias[:, :, rows]
            s = s + (b if b.shape[1] == 1 else b[:, heads]).float()
        if self.pattern is not None:
            allowed = self.pattern.visible(
                rows, torch.arange(kv_len, device=rows.device), self.q.shape[1], kv_len
            )
            allowed = allowed if allowed.shape[0] == 1 else allowed[heads]
            s = s.masked_fill(~allowed[None], float("-inf"))
        return s

    def block_output(self) -> torch.Tensor:
        """``probs @ v`` of the explicit block: ``(B, r, h, Dv)`` in the output dtype."""
        group = self.q.shape[2] // self.k.shape[2]
        v = self.v[:, :, self.heads // group].float()
        return torch.einsum("bhrk,bkhd->brhd", self.probs, v).to(self.out.dtype)


class HeadGate(Hook):
    """Multiply each head's output (before the output projection) by a gate.

    ``gates`` maps site names to tensors broadcastable to ``(B, Lq, H)`` (``(H,)`` for one gate
    per head); gradients flow into them (Michel et al.'s ``xi``).
    """

    def __init__(self, gates: dict[str, torch.Tensor]) -> None:
        self.gates = gates

    def edit_output(self, call: Call) -> None:
        gate = self.gates.get(call.site.name)
        if gate is not None:
            call.out = call.out * gate.to(call.out.dtype)[..., None]


# ----------------------------------------------------------------------------- sites and hooks
def install(model: nn.Module, sites: list[Site], modules: list[nn.Module]) -> list[Site]:
    """Give ``model`` its ``sites`` (one shared hook list) and each attention module its site.

    ``modules[i]`` is the module of ``sites[i]``; its calls of :func:`run_attention` then run the
    model's hooks. Names must be unique. Returns ``sites``.
    """
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise Unsupported(f"{type(model).__name__}: attention modules share site names {names}")
    for site, module in zip(sites, modules, strict=True):
        module._headwise_site = site
    model._headwise_sites = sites
    return sites


def sites_of(model: nn.Module) -> list[Site] | None:
    """The sites :func:`install` gave ``model``, or ``None`` if it has none yet."""
    return getattr(model, "_headwise_sites", None)


def site_of(module: nn.Module) -> Site | None:
    """The site of an attention module, or ``None`` (a module outside any installed model)."""
    return getattr(module, "_headwise_site", None)


def _installed(model: nn.Module) -> list[Site]:
    sites = sites_of(model)
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no attention sites: attach it first "
            "(e.g. headwise.hf.attach(model))"
        )
    return sites


def add_hook(model: nn.Module, hook: Hook) -> None:
    """Run ``hook`` in every attention call of ``model`` (whose sites are installed)."""
    _installed(model)[0].hooks.append(hook)


def remove_hook(model: nn.Module, hook: Hook) -> None:
    _installed(model)[0].hooks.remove(hook)


@contextmanager
def hooked(model: nn.Module, hook: Hook) -> Iterator[Hook]:
    """Install ``hook`` on ``model`` (whose sites are installed) for the duration of the block."""
    add_hook(model, hook)
    try:
        yield hook
    finally:
        remove_hook(model, hook)


Layers = int | str | list[int | str] | None


def choose_sites(sites: list[Site], layers: Layers = None) -> list[Site]:
    """The ``sites`` chosen by ``layers``: ``None`` (all), layer indices (in every tower), or
    names/prefixes such as ``"blocks.3"``, ``"vision_model."`` or ``"language_model.blocks.2"``.
    """
    if layers is None:
        return list(sites)
    single = isinstance(layers, int | str)
    if not single and (isinstance(layers, bytes) or not isinstance(layers, Iterable)):
        raise ArgumentTypeError(f"layers must be an int, a str or a list of them; got {layers!r}")
    wanted = [layers] if single else list(layers)
    for w in wanted:
        if not isinstance(w, str):
            check_int("layers", w)
    chosen = [
        s
        for s in sites
        if any(
            (isinstance(w, int) and s.index == w)
            or (isinstance(w, str) and (s.name == w or s.name.startswith(w.rstrip(".") + ".")))
            for w in wanted
        )
    ]
    if not chosen:
        raise ValueError(f"layers={layers!r} matches none of {[s.name for s in sites]}")
    return chosen


def positions(chosen: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Where each entry of ``wanted`` sits in the sorted index tensor ``chosen``."""
    return torch.searchsorted(chosen, wanted.contiguous())


def normalize(indices: list[int] | None, size: int, device: torch.device) -> torch.Tensor:
    """Sorted unique non-negative indices (negatives count from the end; out of range dropped)."""
    if indices is None:
        return torch.arange(size, device=device)
    chosen = sorted({i % size for i in indices if -size <= i < size})
    return torch.tensor(chosen, dtype=torch.long, device=device)


# ----------------------------------------------------------------------------- the call
def run_attention(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    score_mod: ScoreMod | None = None,
    mask: torch.Tensor | None = None,
    return_probs: bool = False,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention of ``module`` through the hooks of its site (:func:`headwise.attention`
    alone when it has none and no probabilities are asked for).

    ``q`` ``(B, Lq, H, D)``, ``k``/``v`` ``(B, Lk, H_kv, D)``; ``pattern``, ``scale``, ``bias``
    and ``score_mod`` as in :func:`headwise.attention` (the hooks' patterns are intersected with
    ``pattern``). ``mask`` is the model's own mask over ``(Lq, Lk)`` (bool, ``True`` = attend, or
    additive), read only to tell the real query rows of a self-attention. Returns the output
    ``(B, Lq, H, Dv)`` and, with ``return_probs``, the probabilities ``(B, H, Lq, Lk)``
    recomputed from the LSE in the dtype of ``q`` (else ``None``). ``dropout_p``: attention
    dropout (:func:`headwise.attention`), only for a call without hooks or probabilities: those
    see the undropped probabilities, so a call with both is refused.
    """
    site = site_of(module)
    hooks = site.hooks if site is not None else []
    if dropout_p > 0 and (hooks or return_probs):
        wanted = "hooks" if hooks else "attention weights (output_attentions)"
        raise Unsupported(
            f"{type(module).__name__}: attention dropout (dropout_p={dropout_p}) with {wanted} "
            "is not supported: they are computed from the undropped probabilities; run the "
            "model in eval() (no dropout) or without them"
        )
    q_len, kv_len = q.shape[1], k.shape[1]
    if site is not None and site.heads != q.shape[2]:
        raise Unsupported(
            f"{site.name}: {type(module).__name__} runs {q.shape[2]} query heads but the site "
            f"was attached with {site.heads}"
        )
    for hook in hooks:
        swap = hook.pattern(site)
        if swap is not None:
            pattern = swap if pattern is None else pattern & swap
    for hook in hooks:
        out = hook.attend(module, q, k, v, pattern, scale, bias, score_mod)
        if out is not None:
            if return_probs:
                raise Unsupported(
                    f"output_attentions=True: {type(hook).__name__} computes {site.name} itself "
                    "and returns no probabilities"
                )
            return out, None
    if not hooks and not return_probs:
        out = attention(
            q, k, v, pattern, scale=scale, bias=bias, score_mod=score_mod, dropout_p=dropout_p
        )
        return out, None
    if site is not None and site.kind == "cross_attn":
        # its mask hides the other tower's padding keys: the queries are its layer's tokens
        source = site.queries_from
        query_mask = None if source is None else source.last_query_mask
        if query_mask is not None and tuple(query_mask.shape) != (q.shape[0], q_len):
            query_mask = None
    else:
        query_mask = _real_queries(mask, q_len, kv_len)
        if site is not None:
            site.last_query_mask = query_mask
    call = Call(site, module, q, k, v, scale, bias, pattern, score_mod, query_mask)
    requests = [r for r in (h.request(call) for h in hooks) if r is not None]
    if return_probs:
        requests.append(Request())
    # The LSE costs the SDPA fast path (it cannot return it): ask only when a hook needs it.
    need_lse = bool(requests) or any(h.needs_lse(call) for h in hooks)
    result = attention(
        q, k, v, pattern, scale=scale, bias=bias, score_mod=score_mod, return_lse=need_lse
    )
    call.out, call.lse = result if need_lse else (result, None)
    if requests:
        _explicit_block(call, hooks, requests)
    for hook in hooks:
        hook.edit_output(call)
    for hook in hooks:
        hook.observe(call)
    probs = call.probs.to(q.dtype) if return_probs else None
    return call.out.contiguous(), probs


def _real_queries(mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor | None:
    """``(B, L)`` real rows of a self-attention over the same positions: padding keys are hidden
    from every query, while every real key is visible at least to its own query (causal, sliding
    window and bidirectional masks all keep the diagonal). ``None`` when every row is real or the
    call cannot tell (a cached step's keys are not its queries)."""
    if mask is None or q_len != kv_len:
        return None
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    real = visible.any(1).any(1)
    return None if bool(real.all()) else real


def _explicit_block(call: Call, hooks: list[Hook], requests: list[Request]) -> None:
    """Scores and probabilities of the union of the requested heads/rows; edits go to ``out``."""
    q_len, num_heads = call.q.shape[1], call.q.shape[2]
    device = call.q.device
    call.heads = _union([r.heads for r in requests], num_heads, device)
    call.rows = _union([r.rows for r in requests], q_len, device)
    call.scores = call.block_scores(call.heads, call.rows)
    edited_scores = any([h.edit_scores(call) for h in hooks])
    if edited_scores:
        call.probs = torch.softmax(call.scores, -1).nan_to_num(0.0)
    else:
        lse = call.lse[:, call.heads][:, :, call.rows].float()[..., None]
        call.probs = torch.exp(call.scores - lse)
        # Rows that see no key: with a dtype-min mask (transformers' padding) every score and the
        # LSE round to the same huge negative number, so exp(s - lse) gives 1s where eager gives a
        # uniform row; with a -inf pattern the LSE is -inf and the row must be 0.
        dead = lse < _DEAD_ROW
        if dead.any():
            fallback = torch.softmax(call.scores, -1).nan_to_num(0.0)
            call.probs = torch.where(dead, fallback, call.probs)
    edited_probs = any([h.edit_probs(call) for h in hooks])
    if edited_scores or edited_probs:
        out = call.out.clone()
        block = call.block_output()
        rows, heads = call.rows[:, None], call.heads[None, :]
        out[:, rows, heads] = block
        call.out = out


def _union(selections: list[list[int] | None], size: int, device: torch.device) -> torch.Tensor:
    if any(s is None for s in selections):
        return torch.arange(size, device=device)
    return normalize([i for s in selections for i in s], size, device)
