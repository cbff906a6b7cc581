"""Steer attention heads of a transformers model: gates, pruning, VHR, VAR, PAINT, pattern swaps.

Every intervention is a context manager (the model is unchanged after the block) built on the
hooks of :mod:`headwise.hf.registry`. Heads are query heads; per-head outputs are scaled before
the output projection, so ``o_proj`` sees ``sum_h g_h W_O^(h) o_h``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from headwise._checks import ArgumentTypeError, check_ints
from headwise.hf.registry import (
    Call,
    HeadGate,
    Hook,
    Layers,
    Request,
    Site,
    hooked,
    positions,
    select_sites,
)
from headwise.hf.scores import (
    LossFn,
    MetricFn,
    head_importance_gradient,
    sink_threshold,
    sink_values,
    vision_head_divergence,
)
from headwise.layers.moa import MoAPlan
from headwise.patterns import Pattern


# ----------------------------------------------------------------------------- gates
@contextmanager
def gate_heads(model: nn.Module, gates: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Multiply head outputs by ``gates[site name]`` (broadcastable to ``(B, Lq, H)``)."""
    if not isinstance(gates, Mapping):
        raise ArgumentTypeError(f"gates must map site names to tensors; got {gates!r}")
    sites = {s.name: s for s in select_sites(model, list(gates))}
    for name, gate in gates.items():
        if not isinstance(gate, torch.Tensor):
            raise ArgumentTypeError(f"gates[{name!r}] must be a tensor; got {gate!r}")
        heads = sites[name].heads
        if gate.dim() == 0 or gate.shape[-1] not in (1, heads):
            raise ValueError(
                f"gates[{name!r}] must broadcast to (B, Lq, {heads}); got shape {tuple(gate.shape)}"
            )
    with hooked(model, HeadGate(dict(gates))):
        yield


@contextmanager
def ablate_heads(model: nn.Module, heads: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Zero the outputs of ``heads[site name]`` (a head gated to zero contributes nothing)."""
    if not isinstance(heads, Mapping):
        raise ArgumentTypeError(f"heads must map site names to head indices; got {heads!r}")
    sites = {s.name: s for s in select_sites(model, list(heads))}
    gates = {}
    for name, chosen in heads.items():
        chosen = check_ints(f"heads[{name!r}]", chosen)
        count = sites[name].heads
        bad = [h for h in chosen if not -count <= h < count]
        if bad:
            raise ValueError(f"heads[{name!r}] has {bad}, out of range for {count} heads")
        gate = torch.ones(count)
        gate[list(chosen)] = 0
        gates[name] = gate
    with gate_heads(model, gates):
        yield


@dataclass
class Pruning:
    """Result of :func:`prune_heads`: the kept-head ``mask`` (1 = keep) per site and the
    ``history`` of ``(heads pruned, metric)`` steps; the first entry is the unpruned model."""

    mask: dict[str, torch.Tensor]
    history: list[tuple[int, float]]


def prune_heads(
    model: nn.Module,
    batches: Sequence[Mapping],
    loss_fn: LossFn,
    metric_fn: MetricFn,
    threshold: float = 0.9,
    step: float = 0.1,
    layers: Layers = None,
) -> Pruning:
    """Michel et al.'s iterative pruning: repeatedly mask the ``step`` fraction (of all heads)
    least important by :func:`head_importance_gradient` (per-layer normalised, recomputed under
    the current mask) while ``metric >= threshold * metric(unpruned)``. Masked heads stay masked;
    the returned mask is the last one that met the threshold.
    """
    sites = select_sites(model, layers)
    mask = {s.name: torch.ones(s.heads) for s in sites}
    total = sum(s.heads for s in sites)
    per_step = max(1, math.ceil(step * total))

    def metric(m):
        with torch.no_grad(), gate_heads(model, m):
            return sum(metric_fn(model, b) for b in batches) / len(batches)

    base = metric(mask)
    history = [(0, base)]
    while True:
        kept = int(sum(m.sum() for m in mask.values()))
        if kept <= per_step:
            break
        scores = head_importance_gradient(model, batches, loss_fn, layers, mask=mask)
        flat = torch.cat([torch.where(mask[n] > 0, scores[n], math.inf) for n in mask])
        order = flat.argsort()[:per_step]
        trial = {n: m.clone() for n, m in mask.items()}
        offsets = torch.tensor([0, *[s.heads for s in sites]]).cumsum(0)
        for idx in order.tolist():
            site = int(torch.searchsorted(offsets, idx, right=True)) - 1
            trial[sites[site].name][idx - int(offsets[site])] = 0
        value = metric(trial)
        if value < threshold * base:
            break
        mask = trial
        history.append((total - kept + per_step, value))
    return Pruning(mask, history)


# ----------------------------------------------------------------------------- VHR
def vhr_select(vhd: torch.Tensor, ta: torch.Tensor) -> list[int]:
    """VHR's head choice in one layer: drop outliers (``VHD > mu + sigma`` and ``TA > mu +
    sigma``: heads that surge without the image), then keep heads with ``VHD > median``."""
    vhd = vhd.clone().float()
    ta = ta.float()
    outlier = (vhd > vhd.mean() + vhd.std()) & (ta > ta.mean() + ta.std())
    vhd[outlier] = 0
    return torch.nonzero(vhd > vhd.median()).flatten().tolist()


@contextmanager
def reinforce_heads(
    model: nn.Module,
    inputs: Mapping,
    text_only_inputs: Mapping,
    alpha: float = 2.0,
    layers: Layers = None,
) -> Iterator[dict[str, list[int]]]:
    """VHR, **two-pass approximation** (third-party ports): heads are chosen per layer from
    VHD/TA of one pass with and one without the image (:func:`vision_head_divergence`), both
    unreinforced, then scaled by ``alpha`` (default 2) at every position while the block runs;
    yields the chosen heads.

    Not the paper's algorithm: there, the VHD of layer ``l`` is measured on states that layers
    ``< l`` have already reinforced (see :func:`vhr_generate` and
    :func:`vision_head_reinforcement`, the faithful version). This one costs two calibration
    passes and then steers any later call with fixed heads.
    """
    vhd, ta = vision_head_divergence(model, inputs, text_only_inputs, layers)
    chosen = {name: vhr_select(vhd[name], ta[name]) for name in vhd}
    sites = {s.name: s for s in select_sites(model, list(chosen))}
    gates = {}
    for name, heads in chosen.items():
        gate = torch.ones(sites[name].heads)
        gate[heads] = alpha
        gates[name] = gate
    with gate_heads(model, gates):
        yield chosen


class VHRReinforcement(Hook):
    """VHR (He et al., ACL 2025, Algorithm 1), layer-synchronous: the hook behind
    :func:`vision_head_reinforcement` and :func:`vhr_generate`.

    Expects at step 0 a batch of 2 rows, row 0 the image branch and row 1 the text-only branch,
    ending on the same token (see :func:`vhr_inputs`). The first call of each chosen site is
    step 0: from both rows' head outputs ``o[l,h,last]`` (before ``o_proj``) it computes

        VHD[l,h] = ||o_img[l,h,last] - o_txt[l,h,last]||_2,   TA[l,h] = ||o_txt[l,h,last]||^2,

    keeps ``H_l = vhr_select(VHD, TA)`` (outliers zeroed, then ``VHD > median``) and scales
    ``o[l,h] <- alpha * o[l,h]`` for ``h in H_l`` in both rows before the layer goes on, so
    layer ``l + 1`` is measured on reinforced states. Later calls (decode steps) reuse ``H_l``
    unchanged (the KV cache holds keys computed with it) and scale every row and position.
    ``scale_prompt=False`` scales only the last position at step 0 (the paper does not say;
    third-party code scales the whole pass, the default).

    ``chosen``/``vhd``/``ta`` map site names to the heads, ``(H,)`` VHD and ``(H,)`` TA of step
    0; :meth:`reset` forgets them so that the next call is a step 0 again.
    """

    def __init__(self, names: Sequence[str], alpha: float = 2.0, scale_prompt: bool = True):
        self.names = set(names)
        self.alpha, self.scale_prompt = alpha, scale_prompt
        self.chosen: dict[str, list[int]] = {}
        self.vhd: dict[str, torch.Tensor] = {}
        self.ta: dict[str, torch.Tensor] = {}

    def reset(self) -> None:
        self.chosen, self.vhd, self.ta = {}, {}, {}

    def edit_output(self, call: Call) -> None:
        name = call.site.name
        if name not in self.names:
            return
        out = call.out
        first = name not in self.chosen
        if first:
            if out.shape[0] != 2:
                raise ValueError(
                    f"VHR's step 0 needs a batch of 2 rows (image, text only) at {name}; "
                    f"got batch {out.shape[0]} (build it with vhr_inputs)"
                )
            last = out[:, -1].detach().float()  # (2, H, D)
            self.vhd[name] = (last[0] - last[1]).norm(dim=-1)
            self.ta[name] = last[1].pow(2).sum(-1)
            self.chosen[name] = vhr_select(self.vhd[name], self.ta[name])
        gate = torch.ones(out.shape[2], dtype=out.dtype, device=out.device)
        gate[self.chosen[name]] = self.alpha
        if first and not self.scale_prompt:
            call.out = torch.cat([out[:, :-1], out[:, -1:] * gate[:, None]], 1)
        else:
            call.out = out * gate[:, None]


@contextmanager
def vision_head_reinforcement(
    model: nn.Module,
    alpha: float = 2.0,
    layers: Layers = None,
    scale_prompt: bool = True,
) -> Iterator[VHRReinforcement]:
    """Install VHR's layer-synchronous hook (:class:`VHRReinforcement`) for the block; yields it.

    Run the model on :func:`vhr_inputs` (batch of 2: image branch, text-only branch) for step 0,
    then decode with the KV cache (both rows, or row 0 only after
    ``cache.batch_select_indices``): the heads chosen at step 0 stay reinforced. ``layers``
    (default: every layer of the language model) picks sites as in
    :func:`~headwise.hf.registry.select_sites`; sites outside the language model (the vision
    tower, which the text-only branch never runs) are left out. Paper: ``alpha=2``; LLaVA-1.5-7B
    and LLaVA-NeXT-7B layers ``[1, 18..31]`` (layer 1 and the last 14), InstructBLIP-7B the
    last 18.
    """
    language = _language_sites(model)
    sites = language
    if layers is not None:
        sites = [s for s in select_sites(model, layers) if s.tower == language[0].tower]
        if not sites:
            raise ValueError(f"layers={layers!r} selects no layer of the language model")
    with hooked(model, VHRReinforcement([s.name for s in sites], alpha, scale_prompt)) as hook:
        yield hook


def vhr_inputs(inputs: Mapping, text_only_inputs: Mapping, pad_token_id: int = 0) -> dict:
    """VHR's step-0 batch: row 0 ``inputs`` (image branch), row 1 ``text_only_inputs``.

    Both must hold one sequence (``input_ids`` ``(1, L)``, optional ``attention_mask``) ending
    on the same token; the shorter is left-padded with ``pad_token_id`` and
    ``position_ids = cumsum(attention_mask) - 1`` (0 on padding) give each row the positions it
    has alone. Every other entry of ``inputs`` (``pixel_values``, ...) is passed on as is: the
    one image belongs to row 0, the only row with image tokens.
    """
    ids = [inputs["input_ids"], text_only_inputs["input_ids"]]
    if any(t.dim() != 2 or t.shape[0] != 1 for t in ids):
        shapes = [tuple(t.shape) for t in ids]
        raise ValueError(f"input_ids must be (1, L) in both inputs; got {shapes}")
    masks = [
        b.get("attention_mask", torch.ones_like(t)) for b, t in zip((inputs, text_only_inputs), ids)
    ]
    length = max(t.shape[1] for t in ids)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(t, (length - t.shape[1], 0), value=value)

    mask = torch.cat([pad(m, 0) for m in masks])
    batch = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    batch["input_ids"] = torch.cat([pad(t, pad_token_id) for t in ids])
    batch["attention_mask"] = mask
    batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return batch


@dataclass
class VHRResult:
    """Result of :func:`vhr_generate`: the new ``tokens`` ``(1, T)``, each step's ``logits``
    ``(T, V)`` (image branch), and step 0's ``heads``/``vhd``/``ta`` per site name."""

    tokens: torch.Tensor
    logits: torch.Tensor
    heads: dict[str, list[int]]
    vhd: dict[str, torch.Tensor]
    ta: dict[str, torch.Tensor]


@torch.no_grad()
def vhr_generate(
    model: nn.Module,
    inputs: Mapping,
    text_only_inputs: Mapping,
    max_new_tokens: int = 32,
    alpha: float = 2.0,
    layers: Layers = None,
    scale_prompt: bool = True,
    pad_token_id: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
) -> VHRResult:
    """VHR (He et al., ACL 2025), the paper's Algorithm 1, with greedy decoding (the paper's).

    Step 0 runs the image branch and the text-only branch as one batch of 2
    (:func:`vhr_inputs`) under :class:`VHRReinforcement`: at each chosen layer, in order, VHD/TA
    of the last position pick the heads, which are scaled by ``alpha`` in both rows before the
    next layer runs. The text-only row is then dropped from the KV cache and decoding goes on
    with the image branch alone, the step-0 heads reinforced at every step. Stops after
    ``max_new_tokens`` or on ``eos_token_id`` (default: never early). One extra row at step 0
    is all VHR costs. For a model with 1-D positions (LLaVA, Llama); ``layers``, ``alpha`` and
    ``scale_prompt`` as in :func:`vision_head_reinforcement`.
    """
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    batch = vhr_inputs(inputs, text_only_inputs, pad_token_id)
    tokens, logits = [], []
    cache = {_cache_name(model): DynamicCache()}
    with vision_head_reinforcement(model, alpha, layers, scale_prompt) as hook:
        out = model(**batch, **cache, use_cache=True)
        for c in cache.values():  # the text-only row has done its job
            c.batch_select_indices(torch.tensor([0], device=batch["input_ids"].device))
        mask = batch["attention_mask"][:1]
        position = batch["position_ids"][:1, -1:]
        step_logits = out.logits[:1, -1]
        for step in range(max_new_tokens):
            token = step_logits.argmax(-1, keepdim=True)
            tokens.append(token)
            logits.append(step_logits[0])
            if int(token) in stops or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            position = position + 1
            out = model(
                input_ids=token,
                attention_mask=mask,
                position_ids=position,
                **cache,
                use_cache=True,
            )
            step_logits = out.logits[:, -1]
    return VHRResult(torch.cat(tokens, 1), torch.stack(logits), hook.chosen, hook.vhd, hook.ta)


# ----------------------------------------------------------------------------- VAR
def redistribute(
    probs: torch.Tensor,
    sink: torch.Tensor,
    image: torch.Tensor,
    rho: float = 0.5,
    keep: float = 0.6,
    min_image_mass: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR (Kang et al., 2025) on probabilities ``(B, H, R, Lk)``: rows of image-centric heads
    move ``1 - keep`` of every sink key's weight to the image's non-sink keys, in proportion to
    their weight. A row is image-centric iff its image mass ``>= min_image_mass`` and its
    non-sink share of that mass ``>= rho`` (the paper's form). Rows keep their sum.

    ``sink``/``image``: ``(B, Lk)`` bool key masks. Returns ``(new probs, selected (B, H, R))``.
    """
    p = probs.float()
    sink, image = sink[:, None, None, :], image[:, None, None, :]
    visual_non_sink = image & ~sink
    image_mass = (p * image).sum(-1)
    non_sink_mass = (p * visual_non_sink).sum(-1)
    selected = (image_mass >= min_image_mass) & (non_sink_mass >= rho * image_mass.clamp_min(1e-30))
    selected = selected & (non_sink_mass > 0) & (sink & image).any(-1)
    budget = (1 - keep) * (p * sink).sum(-1, keepdim=True)
    moved = torch.where(sink, keep * p, p)
    moved = moved + visual_non_sink * budget * p / non_sink_mass.clamp_min(1e-30)[..., None]
    return torch.where(selected[..., None], moved, p).to(probs.dtype), selected


class _VAR(Hook):
    def __init__(self, image, dims, tau, rho, keep, min_image_mass, heads):
        # the chosen sites are those whose layer pre-hook fills ``sinks``
        self.image, self.dims, self.tau = image, dims, tau
        self.rho, self.keep, self.min_mass, self.heads = rho, keep, min_image_mass, heads
        self.sinks: dict[str, torch.Tensor] = {}
        self.selected: dict[str, torch.Tensor] = {}

    def _rows(self, call: Call) -> list[int]:
        """Query rows after the image, for calls of chosen layers whose keys the image spans
        (a decode step's longer keys are skipped: the image mask describes the prompt)."""
        kv_len, q_len = call.k.shape[1], call.q.shape[1]
        if call.site.name not in self.sinks or self.image.shape[1] != kv_len:
            return []
        last_image = int(torch.nonzero(self.image.any(0)).max())
        return [i for i in range(q_len) if i + kv_len - q_len > last_image]

    def request(self, call: Call) -> Request | None:
        rows = self._rows(call)
        return Request(self.heads, rows) if rows else None

    def edit_probs(self, call: Call) -> bool:
        rows = self._rows(call)
        if not rows:
            return False
        sink = self.sinks[call.site.name]
        new, selected = redistribute(
            call.probs, sink, self.image, self.rho, self.keep, self.min_mass
        )
        allowed = torch.isin(call.rows, torch.tensor(rows, device=call.rows.device))
        allowed = allowed[None, None, :]
        if self.heads is not None:
            wanted = torch.tensor(self.heads, device=call.heads.device)
            allowed = allowed & torch.isin(call.heads, wanted)[None, :, None]
        selected = selected & allowed
        call.probs = torch.where(selected[..., None], new, call.probs)
        full = torch.zeros(call.q.shape[0], call.num_heads, call.q.shape[1], dtype=torch.bool)
        full[:, call.heads[:, None], call.rows[None, :]] = selected.cpu()
        self.selected[call.site.name] = full
        return bool(selected.any())


@contextmanager
def visual_attention_redistribution(
    model: nn.Module,
    image: torch.Tensor,
    sink_dims: Sequence[int],
    tau: float = 20.0,
    rho: float = 0.5,
    keep: float = 0.6,
    min_image_mass: float = 0.2,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
) -> Iterator[_VAR]:
    """VAR: in image-centric heads, move sink attention to the image's non-sink tokens.

    ``image``: ``(B, L)`` bool, the image-token positions of the prompt. Sink tokens of layer
    ``l`` are ``phi(x^{l-1}) >= tau`` over ``sink_dims`` (LLaVA-1.5-7B: ``[1415, 2533]``),
    computed from each layer's input during the pass (``tau`` capped by
    :func:`~headwise.hf.scores.sink_threshold` for narrow models). Only queries after the image
    change.
    Defaults follow the released code: ``tau=20``, ``keep=0.6`` (fraction of the sink weight
    kept), ``rho=0.5``, image mass ``>= 0.2``, sink layers ``[2, L)`` excluding the last layer.
    Yields the hook; ``hook.selected[name]`` is the last pass's ``(B, H, Lq)`` bool of the
    rewritten (head, query) rows.
    """
    if layers is None:
        layers = [s.name for s in _language_sites(model)[2:-1]]
    sites = select_sites(model, layers)
    hook = _VAR(image.bool(), list(sink_dims), tau, rho, keep, min_image_mass, heads)
    handles = []
    for site in sites:

        def detect(mod, args, kwargs, name=site.name):
            x = args[0] if args else kwargs["hidden_states"]
            if x.shape[1] == image.shape[1]:
                threshold = sink_threshold(tau, x.shape[-1])
                hook.sinks[name] = sink_values(x.detach(), hook.dims) >= threshold

        handles.append(site.layer.register_forward_pre_hook(detect, with_kwargs=True))
    try:
        with hooked(model, hook):
            yield hook
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- PAINT
class _Paint(Hook):
    def __init__(self, names, local, summary, alpha, beta, head_scale):
        self.names, self.local, self.summary = names, local, summary
        self.alpha, self.beta, self.head_scale = alpha, beta, head_scale

    def request(self, call: Call) -> Request | None:
        return Request(None, [-1]) if call.site.name in self.names else None

    def edit_scores(self, call: Call) -> bool:
        if call.site.name not in self.names:
            return False
        last = positions(call.rows, torch.tensor([call.q.shape[1] - 1], device=call.rows.device))
        z = call.scores[:, :, last]  # (B, h, 1, Lk)
        scale = torch.ones(call.num_heads, device=z.device)
        if self.head_scale is not None and call.site.name in self.head_scale:
            scale = self.head_scale[call.site.name].to(z.device).float()
        scale = scale[call.heads][None, :, None, None]
        boost = torch.zeros(z.shape[-1], device=z.device)
        for tokens, factor in ((self.local, self.alpha), (self.summary, self.beta)):
            boost[[t for t in tokens if t < z.shape[-1]]] = factor
        call.scores[:, :, last] = z + scale * boost * z.abs()
        return bool(boost.any())


@contextmanager
def emphasize_tokens(
    model: nn.Module,
    local_tokens: Sequence[int],
    summary_tokens: Sequence[int] = (),
    alpha: float = 0.7,
    beta: float = 0.3,
    head_scale: Mapping[str, torch.Tensor] | None = None,
    layers: Layers = None,
) -> Iterator[None]:
    """PAINT-style emphasis (Arif et al., 2025): on the last query row, before the softmax,
    ``z_j += alpha * s_h * |z_j|`` for local tokens and ``beta * s_h * |z_j|`` for summary
    tokens (key positions), with a head-specific scale ``s_h`` in ``[0, 1]``
    (``head_scale[name]``, ``(H,)``; default 1: PAINT's released, head-agnostic rule).
    Paper defaults: ``alpha=0.7``, ``beta=0.3``, LLM layers ``[2, L)``.
    """
    names = {s.name for s in select_sites(model, layers)}
    local = list(local_tokens)
    summary = [t for t in summary_tokens if t not in set(local)]
    with hooked(model, _Paint(names, local, summary, alpha, beta, head_scale)):
        yield


# ----------------------------------------------------------------------------- pattern swap
class _Swap(Hook):
    def __init__(self, patterns: dict[str, Pattern]):
        self.patterns = patterns

    def pattern(self, site: Site) -> Pattern | None:
        return self.patterns.get(site.name)


SwapPattern = Pattern | Mapping[str, Pattern] | MoAPlan


def _site_patterns(model: nn.Module, pattern: SwapPattern, layers: Layers) -> dict[str, Pattern]:
    """One pattern per site name: the same for every chosen site, the mapping's, or layer ``l``
    of an MoA plan for the ``l``-th chosen site (elastic spans, sized per call)."""
    if isinstance(pattern, Pattern):
        return {s.name: pattern for s in select_sites(model, layers)}
    if isinstance(pattern, MoAPlan):
        sites = select_sites(model, layers)
        if len(sites) != pattern.num_layers:
            raise ValueError(
                f"the MoA plan has {pattern.num_layers} layers but layers={layers!r} chooses "
                f"{len(sites)} sites {[s.name for s in sites]}: pass layers= naming one per plan "
                "layer (e.g. layers='language_model')"
            )
        return {s.name: pattern.pattern(s.heads, layer=i) for i, s in enumerate(sites)}
    if not isinstance(pattern, Mapping):
        raise ArgumentTypeError(
            "pattern must be a Pattern, a mapping of site names to Patterns or an MoAPlan; "
            f"got {pattern!r}"
        )
    select_sites(model, list(pattern))
    for name, value in pattern.items():
        if not isinstance(value, Pattern):
            raise ArgumentTypeError(f"pattern[{name!r}] must be a Pattern; got {value!r}")
    return dict(pattern)


@contextmanager
def swap_pattern(model: nn.Module, pattern: SwapPattern, layers: Layers = None) -> Iterator[None]:
    """Run chosen attention modules under a :mod:`headwise.patterns` pattern (intersected with
    the model's own causal/padding mask), e.g. ``per_head([...])`` of sliding windows and
    strided shards: one pattern for all chosen sites, one per site name, or an MoA plan
    (:class:`~headwise.layers.moa.MoAPlan`), whose layer ``l`` goes to the ``l``-th chosen
    site (``layers`` must choose as many sites as the plan has layers)."""
    with hooked(model, _Swap(_site_patterns(model, pattern, layers))):
        yield


@dataclass
class Drift:
    """Output drift of a pattern swap: ``max_abs``/``mean_abs`` of ``swapped - original`` and
    ``relative = ||swapped - original|| / ||original||`` on the compared output."""

    max_abs: float
    mean_abs: float
    relative: float


def pattern_drift(
    model: nn.Module,
    inputs: Mapping,
    pattern: SwapPattern,
    layers: Layers = None,
    output: str = "auto",
) -> Drift:
    """How much the model's output moves when ``pattern`` is swapped in (see
    :func:`swap_pattern`), on the real tokens (``attention_mask == 1``) when the inputs have an
    attention mask. ``output``: the output field compared (``"auto"``: ``logits``, else
    ``last_hidden_state``)."""
    with torch.no_grad():
        base = _output(model(**inputs), output)
        with swap_pattern(model, pattern, layers):
            swapped = _output(model(**inputs), output)
    mask = inputs.get("attention_mask")
    if mask is not None and base.dim() >= 2 and tuple(base.shape[:2]) == tuple(mask.shape):
        # Padding rows are not outputs anyone reads, and eager fills their fully masked rows
        # with a uniform softmax that a swapped pattern changes: compare real tokens only.
        real = mask.bool()
        base, swapped = base[real], swapped[real]
    diff = (swapped - base).float()
    return Drift(
        float(diff.abs().max()),
        float(diff.abs().mean()),
        float(diff.norm() / base.float().norm().clamp_min(1e-30)),
    )


def _output(result, field: str) -> torch.Tensor:
    if field == "auto":
        field = "logits" if getattr(result, "logits", None) is not None else "last_hidden_state"
    return getattr(result, field)


def _language_sites(model: nn.Module) -> list[Site]:
    """The language model's sites: the longest layer stack whose tower is not named vision."""
    stacks: dict[str, list[Site]] = {}
    for s in select_sites(model):
        stacks.setdefault(s.tower, []).append(s)
    text = [t for t in stacks if "vision" not in t and "visual" not in t] or list(stacks)
    return stacks[max(text, key=lambda t: len(stacks[t]))]


def _cache_name(model: nn.Module) -> str:
    """The KV-cache argument of ``model.forward``: ``cache`` in recent transformers 5.x,
    ``past_key_values`` before (now a deprecated alias)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
