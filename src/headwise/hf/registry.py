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
arrives without a mask is refused), ``dropout`` (attention dropout, applied in training mode only,
as eager: :func:`headwise.attention`'s ``dropout_p``, refused with hooks or attention weights,
which would see the undropped probabilities) and ``output_attentions`` (the probabilities are
recomputed from the LSE, as capture does). Keywords that only steer other parts of the model
(``position_ids``, ``use_cache``, ...) are accepted as eager accepts them; anything else
(learned sinks ``s_aux``/``sinks``, ``head_mask``, flash-varlen ``cu_seq_lens_*``, keywords of
future models) raises :class:`~headwise._checks.Unsupported` naming the module class and the
keyword.

A call whose ``key``/``value`` are the tensors a :class:`headwise.hf.cache.PatternCache` update
just returned (its kept slots, told apart by identity through :data:`pending_update`) attends
with that cache's pattern at the slots' absolute positions, and the model's mask gathered at
those positions.

Hooks (capture, scores, interventions) attach to a model with :func:`attach`, which names every
attention module after TransformerLens (``blocks.3.attn``; towers of multi-tower models get a
prefix such as ``vision_model.blocks.1.attn``) and installs these sites for the hook engine of
:mod:`headwise.hooks`; the attention function hands each call, in headwise's terms, to
:func:`headwise.hooks.run_attention`.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
from torch import nn

from headwise._checks import ArgumentTypeError, Unsupported, check_int, check_real
from headwise._deprecated import moved
from headwise.hooks import (
    Hook,
    Layers,
    Site,
    choose_sites,
    install,
    run_attention,
    site_of,
    sites_of,
)
from headwise.ops.attention import mods
from headwise.ops.attention.dropout import check_dropout
from headwise.patterns import causal

NAME = "headwise"

#: the last update of a :class:`headwise.hf.cache.PatternCache` layer, set by the cache and taken
#: by the attention call it feeds: an object with ``length`` (cache positions seen) and
#: ``attention(module, key, value, mask, q_len) -> (mask, pattern, hidden)``
pending_update: ContextVar = ContextVar("headwise_pending_update", default=None)


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


def attach(model: nn.Module) -> list[Site]:
    """Switch ``model`` to the ``"headwise"`` implementation and name its attention modules.

    Every tower (text and vision of CLIP/LLaVA, encoder and decoder of T5) is switched. Returns
    the :class:`Site` of every attention module, in model order; names are unique (a second
    self-attention in one layer would be ``attn_1``). Calling it again is harmless.
    """
    register()
    _check_pluggable(model)
    model.set_attn_implementation(NAME)
    sites = sites_of(model)
    if sites is not None:
        return sites
    hooks: list[Hook] = []
    lists = _layer_stacks(model)
    prefixes = _tower_prefixes([path for path, _ in lists])
    sites, modules = [], []
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
                sites.append(site)
                modules.append(mod)
    if not sites:
        raise ValueError(f"found no attention modules in {type(model).__name__}")
    for mod in modules:
        mod.register_forward_pre_hook(_remember_output_attentions, with_kwargs=True)
    return install(model, sites, modules)


def _check_pluggable(model: nn.Module) -> None:
    """Refuse a model some of whose parts do not call attention through transformers'
    ``AttentionInterface``: their own attention code would keep running, and every hook on
    them would silently do nothing (transformers only logs a warning)."""
    from transformers import PreTrainedModel

    for part in model.modules():
        if isinstance(part, PreTrainedModel) and not part._can_set_attn_implementation():
            raise Unsupported(
                f"{type(part).__name__} ({part.config.model_type}) does not call attention "
                "through transformers' AttentionInterface, so headwise can neither run nor hook "
                "it; attach a model that supports attn_implementation"
            )


def _remember_output_attentions(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Some models (Falcon) hand ``output_attentions`` to the attention module, not to the
    attention function: keep it for the call that follows."""
    module._headwise_output_attentions = kwargs.get("output_attentions")


def select_sites(model: nn.Module, layers: Layers = None) -> list[Site]:
    """Sites of ``model`` (attached on first use) chosen by ``layers``: ``None`` (all), layer
    indices (in every tower), or names/prefixes such as ``"blocks.3"``, ``"vision_model."`` or
    ``"language_model.blocks.2"`` (see :func:`headwise.hooks.choose_sites`).
    """
    return choose_sites(sites_of(model) or attach(model), layers)


def language_sites(model: nn.Module) -> list[Site]:
    """The language model's sites: the longest layer stack whose tower is not named vision."""
    stacks: dict[str, list[Site]] = {}
    for s in select_sites(model):
        stacks.setdefault(s.tower, []).append(s)
    text = [t for t in stacks if "vision" not in t and "visual" not in t] or list(stacks)
    return stacks[max(text, key=lambda t: len(stacks[t]))]


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
                used[keyword] = check_dropout(p, "dropout")
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
    """Whether transformers records this call's attention weights: the keyword, the module's
    own ``output_attentions`` argument (Falcon), the config, or (for models that strip the
    keyword before the layers, as GPT-2 does) transformers' own output collector."""
    if output_attentions is not None:
        return output_attentions
    if getattr(module, "_headwise_output_attentions", None):
        return True
    if getattr(getattr(module, "config", None), "output_attentions", False):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers 5.x before the collector: keyword and config decide
        return False
    collected = _active_collector.get()
    return bool(collected) and any(key.endswith("attentions") for key in collected)


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
    cached = pending_update.get()
    if cached is not None:  # taken before anything can raise: the next update starts afresh
        pending_update.set(None)
    opts = _keywords(module, kwargs)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    q_len, kv_len = q.shape[1], k.shape[1]
    scale = opts.get("scaling", q.shape[-1] ** -0.5)
    softcap = opts.get("softcap")
    window = opts.get("sliding_window")
    span = kv_len if cached is None else cached.length
    if attention_mask is None and window is not None and span > window:
        raise _refuse(
            module,
            "sliding_window",
            window,
            f"the window hides some of the {span} keys but the call has no mask to apply it",
        )

    bias = None
    pattern = None
    hidden = None
    if cached is not None:
        attention_mask, pattern, hidden = cached.attention(
            module, key, value, attention_mask, q_len
        )
    if attention_mask is None:
        is_causal = opts.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        if is_causal and q_len > 1 and cached is None:
            pattern = causal("top_left")
    elif attention_mask.dtype == torch.bool:
        bias = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~attention_mask, torch.finfo(q.dtype).min)
    else:
        bias = attention_mask.to(q.dtype)
    if hidden is not None:
        # the cache's pattern and empty slots: -inf, as keys that are not there
        bias = hidden.to(q.dtype) if bias is None else bias + hidden.to(q.dtype)
    position_bias = opts.get("position_bias")
    if position_bias is not None:
        # T5: eager adds it to the scores next to the mask (the mask's dtype minimum absorbs it)
        position_bias = position_bias.to(q.dtype)
        bias = position_bias if bias is None else bias + position_bias

    score_mod = None if softcap is None else mods.softcap(softcap)
    weights = _weights_wanted(module, opts.get("output_attentions"))
    if cached is not None and not cached.complete:
        site = site_of(module)
        if weights or (site is not None and site.hooks):
            # hooks and attention weights index keys by position; these are kept slots
            wanted = "attention weights (output_attentions)" if weights else "hooks"
            raise Unsupported(
                f"{type(module).__name__}: a PatternCache that has dropped keys attends over its "
                f"kept slots, not over the key positions that {wanted} are indexed by; use "
                "swap_pattern with the default cache for them"
            )
    return run_attention(
        module,
        q,
        k,
        v,
        pattern,
        scale=scale,
        bias=bias,
        score_mod=score_mod,
        mask=attention_mask,
        return_probs=weights,
        dropout_p=opts.get("dropout", 0.0),
    )


#: names that moved to :mod:`headwise.hooks` (the engine) or were renamed there
_MOVED = {
    "Call": "Call",
    "HeadGate": "HeadGate",
    "Request": "Request",
    "add_hook": "add_hook",
    "remove_hook": "remove_hook",
    "hooked": "hooked",
    "positions": "positions",
    "normalise": "normalize",
}


__getattr__ = moved(__name__, {old: f"headwise.hooks:{new}" for old, new in _MOVED.items()})
