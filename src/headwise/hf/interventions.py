"""Steer attention heads of a transformers model: gates, pruning, VHR, VAR, PAINT, pattern swaps.

Every intervention is a context manager (the model is unchanged after the block) built on the
hooks of :mod:`headwise.hf.registry`. Heads are query heads; per-head outputs are scaled before
the output projection, so ``o_proj`` sees ``sum_h g_h W_O^(h) o_h``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

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
from headwise.patterns import Pattern


# ----------------------------------------------------------------------------- gates
@contextmanager
def gate_heads(model: nn.Module, gates: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Multiply head outputs by ``gates[site name]`` (broadcastable to ``(B, Lq, H)``)."""
    select_sites(model, list(gates))
    with hooked(model, HeadGate(dict(gates))):
        yield


@contextmanager
def ablate_heads(model: nn.Module, heads: Mapping[str, Sequence[int]]) -> Iterator[None]:
    """Zero the outputs of ``heads[site name]`` (a head gated to zero contributes nothing)."""
    sites = {s.name: s for s in select_sites(model, list(heads))}
    gates = {}
    for name, chosen in heads.items():
        gate = torch.ones(sites[name].heads)
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
    """VHR (He et al., 2025), calibrated variant: heads are chosen per layer from VHD/TA of one
    pass with and one without the image (:func:`vision_head_divergence`), then scaled by
    ``alpha`` (default 2) at every position while the block runs; yields the chosen heads.

    The paper selects layer by layer on already reinforced states; this two-pass calibration is
    the cheaper form used by third-party ports. Paper layers for LLaVA-1.5-7B: ``[1, 18..31]``.
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
        stacks: dict[str, list[Site]] = {}
        for s in select_sites(model):
            stacks.setdefault(s.tower, []).append(s)
        tower = max(stacks, key=lambda t: len(stacks[t]))  # the language model's stack
        layers = [s.name for s in stacks[tower][2:-1]]
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


@contextmanager
def swap_pattern(
    model: nn.Module, pattern: Pattern | Mapping[str, Pattern], layers: Layers = None
) -> Iterator[None]:
    """Run chosen attention modules under a :mod:`headwise.patterns` pattern (intersected with
    the model's own causal/padding mask), e.g. ``per_head([...])`` of sliding windows and
    strided shards, or an MoA plan: one pattern for all chosen sites, or one per site name."""
    if isinstance(pattern, Pattern):
        patterns = {s.name: pattern for s in select_sites(model, layers)}
    else:
        select_sites(model, list(pattern))
        patterns = dict(pattern)
    with hooked(model, _Swap(patterns)):
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
    pattern: Pattern | Mapping[str, Pattern],
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
