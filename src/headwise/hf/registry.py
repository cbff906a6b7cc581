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

Every keyword a model passes is used or refused, never dropped: ``scaling``, ``softcap`` (as a
``score_mod``), ``position_bias`` (T5's relative bias, added to the mask: gradients flow into it),
``is_causal``, ``sliding_window`` (applied by the mask builder; a call whose window binds but that
arrives without a mask is refused), ``dropout`` (0, or any value outside training, as eager) and
``output_attentions`` (the probabilities are recomputed from the LSE, as capture does). Keywords
that only steer other parts of the model (``position_ids``, ``use_cache``, ...) are accepted as
eager accepts them; anything else (learned sinks ``s_aux``/``sinks``, ``head_mask``, flash-varlen
``cu_seq_lens_*``, keywords of future models) raises :class:`~headwise._checks.Unsupported`
naming the module class and the keyword.

Hooks (capture, scores, interventions) attach to a model with :func:`attach`, which names every
attention module after TransformerLens (``blocks.3.attn``; towers of multi-tower models get a
prefix such as ``vision_model.blocks.1.attn``). A call computes the fast path for every head and,
only for the heads and query rows some hook asks for, recomputes scores and probabilities from the
saved log-sum-exp: ``p = exp(s - lse)``. Hooks see which query rows are real tokens
(:attr:`Call.query_mask`): the padding a self-attention mask hides from every query, shared with the
cross-attention of the same layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from headwise._checks import ArgumentTypeError, Unsupported, check_int, check_real
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
    """One attention module of an attached model: its hook-point prefix and the model's hooks.

    ``kind`` is ``"attn"`` or ``"cross_attn"``; a cross-attention's query rows are the tokens of
    the self-attention ``queries_from`` of its layer, whose last query mask it reuses.
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

    ``bias`` is the additive mask ``(B|1, 1|H, Lq, Lk)`` (T5's position bias included) or
    ``None``; ``out`` ``(B, Lq, H, Dv)`` is the per-head output before the output projection.
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
    softcap: float | None
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

    Every tower (text and vision of CLIP/LLaVA, encoder and decoder of T5) is switched. Returns
    the :class:`Site` of every attention module, in model order; names are unique (a second
    self-attention in one layer would be ``attn_1``). Calling it again is harmless.
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
            own: Site | None = None
            counts: dict[str, int] = {}
            for rel, mod in _attention_modules(layer):
                kind = "cross_attn" if _is_cross(rel, mod) else "attn"
                name = f"{prefixes[path]}blocks.{index}.{kind}"
                if counts.get(kind):
                    name += f"_{counts[kind]}"
                counts[kind] = counts.get(kind, 0) + 1
                site = Site(name, index, prefixes[path], _num_heads(mod), hooks, layer, kind)
                if kind == "attn" and own is None:
                    own = site
                site.queries_from = own if kind == "cross_attn" else None
                mod._headwise_site = site
                sites.append(site)
    if not sites:
        raise ValueError(f"found no attention modules in {type(model).__name__}")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise Unsupported(f"{type(model).__name__}: attention modules share site names {names}")
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


def _attention_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path inside root, module)`` of the attention modules under ``root``."""
    return [(path, m) for path, m in root.named_modules() if _is_attention(m)]


def _is_cross(path: str, mod: nn.Module) -> bool:
    """Cross-attention by class or attribute name (BERT's ``crossattention``, T5's
    ``EncDecAttention``, BART's ``encoder_attn``) or by its own flag."""
    where = f"{path}.{type(mod).__name__}".lower()
    return bool(getattr(mod, "is_cross_attention", False)) or any(
        word in where for word in ("cross", "encdec", "enc_dec", "encoder_attn")
    )


def _num_heads(mod: nn.Module) -> int:
    for attr in ("num_heads", "n_heads", "num_attention_heads"):
        value = getattr(mod, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return mod.config.num_attention_heads


def _layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The lists of layers: ``ModuleList``s holding attention modules, outermost first, except
    that a list whose nested list has attention in every entry is a container of towers (the
    nested lists are the stacks). Lists inside a layer (T5's ``block.0.layer``: self-attention,
    cross-attention, feed-forward) are parts of that layer."""
    found = [
        (path, mod)
        for path, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and _attention_modules(mod)
    ]

    def every_entry_attends(mod: nn.ModuleList) -> bool:
        return all(_attention_modules(child) for child in mod)

    kept: list[str] = []
    for path, _ in sorted(found, key=lambda item: item[0].count(".")):
        inside_kept = any(path.startswith(k + ".") for k in kept)
        holds_towers = any(p.startswith(path + ".") and every_entry_attends(m) for p, m in found)
        if not inside_kept and not holds_towers:
            kept.append(path)
    return [(p, m) for p, m in found if p in kept]


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


#: keywords that steer other parts of the model (positions are already in q/k, caching, which
#: outputs are returned, the states cross-attention keys came from): eager ignores them too
_MODEL_KEYWORDS = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
        "num_items_in_batch",
        "encoder_hidden_states",
        "token_type_ids",
    }
)
_PACKING = "headwise does not read flash-attention varlen packing (pass an attention mask instead)"
#: keywords that ask for something headwise does not compute: refused unless ``None``
_REFUSED = {
    "s_aux": "headwise does not support learned attention sinks",
    "sinks": "headwise does not support learned attention sinks",
    "head_mask": "headwise does not take head masks (use headwise.hf.gate_heads)",
    "cu_seq_lens_q": _PACKING,
    "cu_seq_lens_k": _PACKING,
    "max_length_q": _PACKING,
    "max_length_k": _PACKING,
    "seq_idx": _PACKING,
}


def _show(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def _refuse(module: nn.Module, keyword: str, value, why: str) -> Unsupported:
    model = getattr(getattr(module, "config", None), "model_type", None)
    where = type(module).__name__ + (f" ({model})" if model else "")
    return Unsupported(
        f"{where} passes {keyword}={_show(value)} to the attention function: {why}; "
        f"headwise does not drop keywords silently (use attn_implementation='eager' here)"
    )


def _keywords(module: nn.Module, kwargs: dict) -> dict:
    """The keywords headwise uses, checked; refuses every other keyword that asks for something."""
    used = {}
    for keyword, value in kwargs.items():
        if keyword in _MODEL_KEYWORDS:
            continue
        if keyword == "position_bias":
            if value is not None and not isinstance(value, torch.Tensor):
                raise ArgumentTypeError(f"position_bias must be a tensor; got {value!r}")
            used[keyword] = value
        elif keyword in ("scaling", "softcap", "sliding_window"):
            if value is not None:
                used[keyword] = value
        elif keyword == "dropout":
            p = check_real("dropout", value, minimum=0.0)
            if p > 0 and module.training:
                raise _refuse(module, keyword, value, "headwise attention has no dropout yet")
        elif keyword in ("is_causal", "output_attentions"):
            if value is not None and not isinstance(value, bool):
                raise ArgumentTypeError(f"{keyword} must be True, False or None; got {value!r}")
            used[keyword] = value
        elif keyword in _REFUSED:
            if value is not None:
                raise _refuse(module, keyword, value, _REFUSED[keyword])
        else:
            raise _refuse(module, keyword, value, "a keyword headwise does not know")
    if "scaling" in used:
        used["scaling"] = check_real("scaling", used["scaling"])
    if "softcap" in used:
        used["softcap"] = check_real("softcap", used["softcap"], positive=True)
    if "sliding_window" in used:
        used["sliding_window"] = check_int("sliding_window", used["sliding_window"], minimum=1)
    return used


def _weights_wanted(module: nn.Module, output_attentions: bool | None) -> bool:
    """Whether transformers records this call's attention weights: the keyword, the config, or
    (for models that strip the keyword before the layers, as GPT-2 does) transformers' own
    output collector."""
    if output_attentions is not None:
        return output_attentions
    if getattr(getattr(module, "config", None), "output_attentions", False):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers 5.x before the collector: keyword and config decide
        return False
    collected = _active_collector.get()
    return bool(collected) and any(key.endswith("attentions") for key in collected)


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


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"headwise"`` attention function (transformers' contract).

    ``query`` ``(B, H, Lq, D)``, ``key``/``value`` ``(B, H_kv, Lk, D)``; returns the output
    ``(B, Lq, H, Dv)`` and the weights: ``None``, or ``(B, H, Lq, Lk)`` probabilities recomputed
    from the LSE when transformers records attentions (``output_attentions=True``). Keywords: see
    the module docstring.
    """
    opts = _keywords(module, kwargs)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    q_len, kv_len = q.shape[1], k.shape[1]
    scale = opts.get("scaling", q.shape[-1] ** -0.5)
    softcap = opts.get("softcap")
    window = opts.get("sliding_window")
    if attention_mask is None and window is not None and kv_len > window:
        raise _refuse(
            module,
            "sliding_window",
            window,
            f"the window hides some of the {kv_len} keys but the call has no mask to apply it",
        )

    bias = None
    pattern = None
    if attention_mask is None:
        is_causal = opts.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        if is_causal and q_len > 1:
            pattern = causal("top_left")
    elif attention_mask.dtype == torch.bool:
        bias = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~attention_mask, torch.finfo(q.dtype).min)
    else:
        bias = attention_mask.to(q.dtype)
    position_bias = opts.get("position_bias")
    if position_bias is not None:
        # T5: eager adds it to the scores next to the mask (the mask's dtype minimum absorbs it)
        position_bias = position_bias.to(q.dtype)
        bias = position_bias if bias is None else bias + position_bias

    site: Site | None = getattr(module, "_headwise_site", None)
    hooks = site.hooks if site is not None else []
    if site is not None and site.heads != q.shape[2]:
        raise Unsupported(
            f"{site.name}: {type(module).__name__} runs {q.shape[2]} query heads but the site "
            f"was attached with {site.heads}"
        )
    for hook in hooks:
        swap = hook.pattern(site)
        if swap is not None:
            pattern = swap if pattern is None else pattern & swap

    score_mod = None
    if softcap is not None:

        def score_mod(s, b, h, i, j):
            return softcap * torch.tanh(s / softcap)

    weights = _weights_wanted(module, opts.get("output_attentions"))
    for hook in hooks:
        out = hook.attend(module, q, k, v, pattern, scale, bias, score_mod)
        if out is not None:
            if weights:
                raise Unsupported(
                    f"output_attentions=True: {type(hook).__name__} computes {site.name} itself "
                    "and returns no probabilities"
                )
            return out, None
    if not hooks and not weights:
        return attention(q, k, v, pattern, scale=scale, bias=bias, score_mod=score_mod), None
    if site is not None and site.kind == "cross_attn":
        # its mask hides the other tower's padding keys: the queries are its layer's tokens
        source = site.queries_from
        query_mask = None if source is None else source.last_query_mask
        if query_mask is not None and tuple(query_mask.shape) != (q.shape[0], q_len):
            query_mask = None
    else:
        query_mask = _real_queries(attention_mask, q_len, kv_len)
        if site is not None:
            site.last_query_mask = query_mask
    call = Call(site, module, q, k, v, scale, bias, pattern, softcap, query_mask)
    requests = [r for r in (h.request(call) for h in hooks) if r is not None]
    if weights:
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
    probs = call.probs.to(q.dtype) if weights else None
    return call.out.contiguous(), probs


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
