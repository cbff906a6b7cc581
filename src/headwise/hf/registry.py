"""Run Hugging Face transformers models through :func:`headwise.attention`.

transformers (5.x) looks attention up by name in two registries: ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (the mask builder). Both are registered under
``"headwise"``: a name known only to the first makes transformers skip mask creation, and causal
and padding masks then silently vanish.

The mask builder is transformers' own ``sdpa_mask``: a boolean mask (``True`` = attend), or ``None``
where a plain causal or unpadded bidirectional mask can be implied. The attention function turns a
boolean mask into an additive bias with the dtype's minimum (what eager attention adds, so that even
fully padded rows match eager), and an implied causal mask into the ``causal`` pattern with the
alignment transformers' SDPA path uses (top-left for ``Lq > 1``, none for a single query).

HF hands attention functions ``(B, H, L, D)`` tensors; they are viewed as ``(B, L, H, D)`` for
:func:`headwise.attention`, and the output goes back as ``(B, Lq, H, D)``, as transformers expects.

Hooks (capture, scores, interventions) attach to a model with :func:`attach`, which names every
attention module after TransformerLens (``blocks.3.attn``; towers of multi-tower models get a
prefix such as ``vision_model.blocks.1.attn``). A call computes the fast path for every head and,
only for the heads and query rows some hook asks for, recomputes scores and probabilities from the
saved log-sum-exp: ``p = exp(s - lse)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from headwise.ops.attention import attention
from headwise.patterns import Pattern, causal

NAME = "headwise"
#: an LSE below this marks a row without visible keys (masks add the dtype minimum, ~ -3e38)
_DEAD_ROW = -1e30


def register() -> None:
    """Register the ``"headwise"`` attention function and its mask builder with transformers.

    Idempotent. Raises ``ImportError`` for transformers older than 5.0 (BERT and the mask
    registry are not pluggable there).
    """
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise ImportError(f"headwise.hf needs transformers>=5.0; got {transformers.__version__}")
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@dataclass
class Site:
    """One attention module of an attached model: its hook-point prefix and the model's hooks."""

    name: str
    index: int
    tower: str
    heads: int
    hooks: list = field(repr=False)
    layer: nn.Module = field(repr=False)


@dataclass
class Request:
    """Heads and query rows whose scores/probabilities a hook needs (``None`` = all)."""

    heads: list[int] | None = None
    rows: list[int] | None = None


class Hook:
    """Base of everything that reads or steers attention inside the ``"headwise"`` function.

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

    ``bias`` is the additive mask ``(B|1, 1, Lq, Lk)`` or ``None``; ``out`` ``(B, Lq, H, Dv)`` is
    the per-head output before the output projection. ``heads``/``rows`` index the explicit block;
    ``scores`` and ``probs`` are ``(B, len(heads), len(rows), Lk)`` in float32.
    """

    site: Site
    module: nn.Module
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    bias: torch.Tensor | None
    pattern: Pattern | None
    softcap: float | None
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
        q = self.q[:, rows][:, :, heads].float()
        k = self.k[:, :, heads // group].float()
        s = torch.einsum("brhd,bkhd->bhrk", q, k) * self.scale
        if self.softcap is not None:
            s = self.softcap * torch.tanh(s / self.softcap)
        if self.bias is not None:
            b = self.bias[:, :, rows]
            s = s + (b if b.shape[1] == 1 else b[:, heads]).float()
        if self.pattern is not None:
            kv_len = self.k.shape[1]
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


def attach(model: nn.Module) -> list[Site]:
    """Switch ``model`` to the ``"headwise"`` implementation and name its attention modules.

    Every tower (text and vision of CLIP/LLaVA) is switched. Returns the :class:`Site` of every
    attention module, in model order. Calling it again is harmless.
    """
    register()
    model.set_attn_implementation(NAME)
    sites = getattr(model, "_headwise_sites", None)
    if sites is not None:
        return sites
    hooks: list[Hook] = []
    lists = _layer_stacks(model)
    prefixes = _tower_prefixes([path for path, _ in lists])
    sites = []
    for path, layers in lists:
        for index, layer in enumerate(layers):
            for mod in _attention_modules(layer):
                kind = "cross_attn" if "cross" in type(mod).__name__.lower() else "attn"
                name = f"{prefixes[path]}blocks.{index}.{kind}"
                heads = mod.config.num_attention_heads
                site = Site(name, index, prefixes[path], heads, hooks, layer)
                mod._headwise_site = site
                sites.append(site)
    if not sites:
        raise ValueError(f"found no attention modules in {type(model).__name__}")
    model._headwise_sites = sites
    return sites


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


def add_hook(model: nn.Module, hook: Hook) -> None:
    sites = getattr(model, "_headwise_sites", None) or attach(model)
    sites[0].hooks.append(hook)


def remove_hook(model: nn.Module, hook: Hook) -> None:
    model._headwise_sites[0].hooks.remove(hook)


@contextmanager
def hooked(model: nn.Module, hook: Hook) -> Iterator[Hook]:
    """Install ``hook`` on ``model`` for the duration of the block."""
    add_hook(model, hook)
    try:
        yield hook
    finally:
        remove_hook(model, hook)


Layers = int | str | list[int | str] | None


def select_sites(model: nn.Module, layers: Layers = None) -> list[Site]:
    """Attached sites chosen by ``layers``: ``None`` (all), layer indices (in every tower), or
    names/prefixes such as ``"blocks.3"``, ``"vision_model."`` or ``"language_model.blocks.2"``.
    """
    sites = getattr(model, "_headwise_sites", None) or attach(model)
    if layers is None:
        return list(sites)
    wanted = [layers] if isinstance(layers, int | str) else list(layers)
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
    return torch.searchsorted(chosen, wanted)


def normalise(indices: list[int] | None, size: int, device: torch.device) -> torch.Tensor:
    """Sorted unique non-negative indices (negatives count from the end; out of range dropped)."""
    if indices is None:
        return torch.arange(size, device=device)
    chosen = sorted({i % size for i in indices if -size <= i < size})
    return torch.tensor(chosen, dtype=torch.long, device=device)


def _is_attention(mod: nn.Module) -> bool:
    # The refactored attention modules of transformers 5.x all carry these two attributes; the
    # layers and models around them do not carry ``is_causal``.
    return isinstance(getattr(mod, "is_causal", None), bool) and hasattr(mod, "config")


def _attention_modules(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if _is_attention(m)]


def _layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    found = [
        (path, mod)
        for path, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and _attention_modules(mod)
    ]
    # keep the innermost stacks: a list holding another one is a container of towers
    return [(p, m) for p, m in found if not any(o.startswith(p + ".") for o, _ in found)]


def _tower_prefixes(paths: list[str]) -> dict[str, str]:
    """``""`` for a single layer stack; otherwise the first path component that tells them apart."""
    if len(paths) == 1:
        return {paths[0]: ""}
    parts = [p.split(".") for p in paths]
    prefixes = {}
    for path, comps in zip(paths, parts):
        others = [o for o in parts if o is not comps]
        depth = next(
            (i for i in range(len(comps)) if all(i >= len(o) or o[i] != comps[i] for o in others)),
            len(comps) - 1,
        )
        prefixes[path] = comps[depth] + "."
    return prefixes


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``"headwise"`` attention function (transformers' contract).

    ``query`` ``(B, H, Lq, D)``, ``key``/``value`` ``(B, H_kv, Lk, D)``; returns the output
    ``(B, Lq, H, Dv)`` and ``None`` for the weights (read probabilities with
    :func:`headwise.hf.capture` instead: they are recomputed only where asked for).
    """
    if dropout and module.training:
        raise NotImplementedError(
            f"headwise attention has no dropout; got dropout={dropout} in training mode "
            "(call model.eval() or set the config's attention dropout to 0)"
        )
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks as learned logits (s_aux) are not supported")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    q_len = q.shape[1]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")

    bias = None
    pattern = None
    if attention_mask is None:
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        if is_causal and q_len > 1:
            pattern = causal("top_left")
    elif attention_mask.dtype == torch.bool:
        bias = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~attention_mask, torch.finfo(q.dtype).min)
    else:
        bias = attention_mask.to(q.dtype)

    site: Site | None = getattr(module, "_headwise_site", None)
    hooks = site.hooks if site is not None else []
    for hook in hooks:
        swap = hook.pattern(site)
        if swap is not None:
            pattern = swap if pattern is None else pattern & swap

    score_mod = None
    if softcap is not None:

        def score_mod(s, b, h, i, j):
            return softcap * torch.tanh(s / softcap)

    for hook in hooks:
        out = hook.attend(module, q, k, v, pattern, scale, bias, score_mod)
        if out is not None:
            return out, None
    if not hooks:
        return attention(q, k, v, pattern, scale=scale, bias=bias, score_mod=score_mod), None
    call = Call(site, module, q, k, v, scale, bias, pattern, softcap)
    requests = [r for r in (h.request(call) for h in hooks) if r is not None]
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
    return call.out.contiguous(), None


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
    return normalise([i for s in selections for i in s], size, device)
