"""Scores of attention heads: importance, entropy, distance, sinks, VHD, rollout/flow, VL-SAM.

Model-level scores return ``{site name: tensor}`` dicts keyed like ``"blocks.3.attn"``; the pure
functions take probabilities ``a`` of shape ``(B, H, Lq, Lk)`` (what :func:`headwise.hf.capture`
records as ``pattern``) or per-layer lists of them. Notation: ``a[l,h,i,j]`` probabilities,
``o[l,h,i]`` per-head outputs before the output projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from headwise._checks import ArgumentTypeError
from headwise.hf.capture import capture
from headwise.hf.registry import HeadGate, Layers, hooked, select_sites

LossFn = Callable[[nn.Module, Mapping], torch.Tensor]
MetricFn = Callable[[nn.Module, Mapping], float]


# ----------------------------------------------------------------------------- importance
def head_importance_gradient(
    model: nn.Module,
    batches: Iterable[Mapping],
    loss_fn: LossFn,
    layers: Layers = None,
    mask: Mapping[str, torch.Tensor] | None = None,
    normalize: bool = True,
) -> dict[str, torch.Tensor]:
    """Michel et al. (2019): ``I[l,h] = E_x |dL(x)/d xi[l,h]|`` at the gates ``xi = mask`` (1s).

    A gate ``xi`` multiplies each head's output before the output projection; ``loss_fn(model,
    batch)`` returns a scalar. ``normalize`` divides each layer's scores by their L2 norm
    (Molchanov et al.), as Michel et al. do before pruning. Returns ``(H,)`` per site.
    """
    sites = select_sites(model, layers)
    gates = {
        s.name: (
            torch.ones(s.heads) if mask is None else mask[s.name].detach().float()
        ).requires_grad_(True)
        for s in sites
    }
    total = {name: torch.zeros_like(g) for name, g in gates.items()}
    count = 0
    with hooked(model, HeadGate(gates)):
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(model, batch), list(gates.values()))
            for name, g in zip(gates, grads):
                total[name] += g.abs()
            count += 1
    if not count:
        raise ValueError("batches is empty")
    scores = {name: t / count for name, t in total.items()}
    if normalize:
        scores = {name: s / s.norm().clamp_min(1e-20) for name, s in scores.items()}
    return scores


def head_importance_ablation(
    model: nn.Module,
    batches: Sequence[Mapping],
    metric_fn: MetricFn,
    layers: Layers = None,
) -> dict[str, torch.Tensor]:
    """``I[l,h] = metric(all heads) - metric(head (l,h) zeroed)``, averaged over ``batches``.

    Costs one pass per head and batch. ``metric_fn(model, batch)`` returns a float (accuracy,
    true-class probability, or a label-free similarity to the unablated output).
    """
    sites = select_sites(model, layers)

    def metric() -> float:
        with torch.no_grad():
            return sum(metric_fn(model, b) for b in batches) / len(batches)

    base = metric()
    scores = {}
    for site in sites:
        drops = torch.zeros(site.heads)
        for h in range(site.heads):
            gate = torch.ones(site.heads)
            gate[h] = 0
            with hooked(model, HeadGate({site.name: gate})):
                drops[h] = base - metric()
        scores[site.name] = drops
    return scores


# ----------------------------------------------------------------------------- pattern shape
def _real_rows(probs: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, 1, Lq)`` bool of the real query rows, from a ``(B, Lq)`` 0/1 or bool mask."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ArgumentTypeError(f"attention_mask must be a tensor; got {attention_mask!r}")
    want = (probs.shape[0], probs.shape[-2])
    if probs.dim() != 4 or tuple(attention_mask.shape) != want:
        raise ValueError(
            f"attention_mask must be (B, Lq) = {want} for probabilities (B, H, Lq, Lk) of shape "
            f"{tuple(probs.shape)}; got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool and not bool(
        ((attention_mask == 0) | (attention_mask == 1)).all()
    ):
        raise ValueError("attention_mask must hold 0/1 or bools (1 = real token)")
    return attention_mask.bool().to(probs.device)[:, None, :]


def attention_entropy(
    probs: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``-sum_j a_ij log a_ij`` per query row (nats): ``(..., Lq, Lk) -> (..., Lq)``.

    With ``attention_mask`` ``(B, Lq)`` (1 = real token; ``probs`` ``(B, H, Lq, Lk)``) padding
    rows are NaN, so that a plain mean over rows cannot mix them in silently (``nanmean`` skips
    them).
    """
    p = probs.float()
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    real = _real_rows(probs, attention_mask)
    return entropy if real is None else entropy.masked_fill(~real, math.nan)


def token_distances(
    n: int, grid: tuple[int, int] | None = None, prefix_tokens: int = 0
) -> torch.Tensor:
    """Distances ``d(i, j)`` ``(n, n)`` between tokens: ``|i - j|`` for sequences, Euclidean in
    patch units on a ``grid`` of ``rows x cols`` patches after ``prefix_tokens`` (ViT's CLS).
    """
    if grid is None:
        idx = torch.arange(n, dtype=torch.float32)
        return (idx[:, None] - idx[None]).abs()
    rows, cols = grid
    if prefix_tokens + rows * cols != n:
        raise ValueError(f"grid {grid} + {prefix_tokens} prefix tokens != {n} tokens")
    r = torch.arange(rows * cols) // cols
    c = torch.arange(rows * cols) % cols
    pos = torch.stack([r, c], -1).float()
    d = torch.zeros(n, n)
    d[prefix_tokens:, prefix_tokens:] = torch.cdist(pos, pos)
    return d


def _patch_part(probs, grid, prefix_tokens):
    """Patch-to-patch probabilities renormalised over patch keys (prefix tokens dropped)."""
    if grid is None:
        return probs.float()
    p = probs[..., prefix_tokens:, prefix_tokens:].float()
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)


def _patch_rows(real, grid, prefix_tokens):
    """Real query rows among the rows :func:`_patch_part` keeps."""
    if real is None or grid is None:
        return real
    return real[..., prefix_tokens:]


def mean_attention_distance(
    probs: torch.Tensor,
    grid: tuple[int, int] | None = None,
    prefix_tokens: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``D[h] = mean_i sum_j a_ij d(i, j)`` per batch and head: ``(B, H, L, L) -> (B, H)``.

    With a ``grid`` (ViT), only patch queries and keys count (CLS rows are a separate story).
    With ``attention_mask`` ``(B, L)`` the mean runs over real query rows only.
    """
    n = probs.shape[-1]
    real = _patch_rows(_real_rows(probs, attention_mask), grid, prefix_tokens)
    d = token_distances(n, grid, prefix_tokens).to(probs.device)
    if grid is not None:
        d = d[prefix_tokens:, prefix_tokens:]
    per_row = (_patch_part(probs, grid, prefix_tokens) * d).sum(-1)
    if real is None:
        return per_row.mean(-1)
    return (per_row * real).sum(-1) / real.sum(-1).clamp_min(1)


def distance_profile(
    probs: torch.Tensor,
    grid: tuple[int, int] | None = None,
    prefix_tokens: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``S[h](d)``: mean attention over (query, key) pairs with ``round(d(i, j)) = d``.

    The mean (not the sum) per distance bin, because far bins hold fewer pairs. ``(B, H, L, L)``
    -> ``(H, max_distance + 1)``, averaged over the batch; with ``attention_mask`` ``(B, L)``
    only pairs of two real tokens count.
    """
    n = probs.shape[-1]
    real = _patch_rows(_real_rows(probs, attention_mask), grid, prefix_tokens)
    d = token_distances(n, grid, prefix_tokens).to(probs.device)
    if grid is not None:
        d = d[prefix_tokens:, prefix_tokens:]
    bins = d.round().long().flatten()
    p = _patch_part(probs, grid, prefix_tokens)
    if real is None:
        pairs = torch.ones(p.shape[0], *d.shape, device=p.device)
    else:
        r = real[:, 0].float()
        pairs = r[:, :, None] * r[:, None, :]  # (B, L, L)
    p = (p * pairs[:, None]).sum(0).flatten(1)  # (H, pairs)
    sums = torch.zeros(p.shape[0], int(bins.max()) + 1, device=p.device)
    sums.index_add_(1, bins, p)
    counts = torch.zeros(sums.shape[1], device=p.device)
    counts.index_add_(0, bins, pairs.sum(0).flatten())
    return sums / counts.clamp_min(1)


# ----------------------------------------------------------------------------- sinks (VAR)
def sink_values(hidden: torch.Tensor, dims: Sequence[int], eps: float = 1e-6) -> torch.Tensor:
    """VAR's sink-dimension value ``phi(x) = max_{d in dims} |x_d / rms(x)|``: ``(B, L, D) ->
    (B, L)`` (RMS normalisation without a learned weight)."""
    x = hidden.float()
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x[..., list(dims)].abs().amax(-1)


def massive_dimensions(hidden: torch.Tensor, top: int = 2, eps: float = 1e-6) -> list[int]:
    """The ``top`` hidden dimensions with the largest normalised activation over all tokens.

    For models without published sink dimensions (VAR lists them for LLaVA/LLaMA): massive
    activations stand out by orders of magnitude in those dimensions.
    """
    x = hidden.float()
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x.abs().flatten(0, -2).amax(0).topk(top).indices.tolist()


def sink_share(probs: torch.Tensor, sink_mask: torch.Tensor) -> torch.Tensor:
    """Attention mass on sink keys, ``sum_{j in sinks} a_ij``: ``(B, H, Lq, Lk)`` with
    ``sink_mask`` ``(B, Lk)`` bool -> ``(B, H, Lq)``."""
    return (probs.float() * sink_mask[:, None, None, :].to(probs.device)).sum(-1)


def sink_threshold(tau: float, hidden_size: int) -> float:
    """``min(tau, 0.8 sqrt(D))``: ``|x_d / rms(x)| <= sqrt(D)``, so VAR's ``tau = 20`` (set for
    D = 4096) can never be reached by models narrower than 400 dimensions."""
    return min(tau, 0.8 * math.sqrt(hidden_size))


@dataclass
class Sinks:
    """Result of :func:`find_sinks`.

    ``dims``: the sink dimensions used; ``tokens[name]``: ``(B, L)`` sink tokens seen by that
    attention module (from its layer's input); ``share[name]``: ``(H,)`` mean attention share of
    each head on those tokens; ``ranking``: ``(name, head, share)`` strongest first.
    """

    dims: list[int]
    tau: float
    tokens: dict[str, torch.Tensor]
    share: dict[str, torch.Tensor]
    ranking: list[tuple[str, int, float]]


def find_sinks(
    model: nn.Module,
    inputs: Mapping,
    dims: Sequence[int] | None = None,
    tau: float = 20.0,
    layers: Layers = None,
) -> Sinks:
    """Attention sinks as VAR defines them, and the heads that attend to them most.

    Sink tokens of layer ``l``: ``phi(x^{l-1}_j) >= tau`` on the layer's input hidden states
    (``dims`` default: :func:`massive_dimensions` of the first chosen layer's input; ``tau``
    capped by :func:`sink_threshold`). Head share: mean over real query rows of
    ``sum_{j in sinks} a_ij``.
    """
    sites = select_sites(model, layers)
    hidden: dict[str, torch.Tensor] = {}
    handles = []
    for site in sites:

        def keep(mod, args, kwargs, name=site.name):
            hidden[name] = (args[0] if args else kwargs["hidden_states"]).detach()

        handles.append(site.layer.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad(), capture(model, layers=layers, what=("pattern",)) as cache:
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    real = inputs.get("attention_mask")
    first = hidden[sites[0].name]
    dims = list(dims) if dims is not None else massive_dimensions(first)
    tau = sink_threshold(tau, first.shape[-1])
    tokens, share, ranking = {}, {}, []
    for site in sites:
        x = hidden[site.name]
        sinks = sink_values(x, dims) >= tau
        rows = torch.ones(x.shape[:2]) if real is None else real.float()
        sinks = sinks & rows.bool()
        per_row = sink_share(cache[f"{site.name}.pattern"], sinks)  # (B, H, L)
        weights = rows[:, None, :]
        head_share = (per_row * weights).sum((0, 2)) / weights.sum((0, 2))
        tokens[site.name], share[site.name] = sinks, head_share
        ranking += [(site.name, h, float(v)) for h, v in enumerate(head_share)]
    ranking.sort(key=lambda t: -t[2])
    return Sinks(dims, tau, tokens, share, ranking)


# ----------------------------------------------------------------------------- VHD
def vision_head_divergence(
    model: nn.Module,
    inputs: Mapping,
    text_only_inputs: Mapping,
    layers: Layers = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """VHD (He et al., 2025) of every head at the last position, and the text-only norm ``TA``.

    ``VHD[l,h] = ||o[l,h,last](image + text) - o[l,h,last](text only)||_2`` and
    ``TA[l,h] = ||o[l,h,last](text only)||^2``, averaged over the batch. Both inputs must end on
    the same token. Returns ``(vhd, ta)``, ``(H,)`` per site.
    """
    outs = []
    for batch in (inputs, text_only_inputs):
        with torch.no_grad(), capture(model, layers=layers, rows=[-1], what=("z",)) as cache:
            model(**batch)
        outs.append(cache)
    vhd, ta = {}, {}
    for site in select_sites(model, layers):
        name = f"{site.name}.z"
        if name not in outs[0]:
            continue  # a tower the text-only input never runs (the vision tower)
        with_img, text = outs[0][name][:, 0].float(), outs[1][name][:, 0].float()  # (B, H, D)
        vhd[site.name] = (with_img - text).norm(dim=-1).mean(0)
        ta[site.name] = text.pow(2).sum(-1).mean(0)
    return vhd, ta


# ----------------------------------------------------------------------------- rollout / flow
def _fuse(probs: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion == "mean":
        return probs.float().mean(1)
    if head_fusion == "max":
        return probs.float().amax(1)
    if head_fusion == "min":
        return probs.float().amin(1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min'; got {head_fusion!r}")


def _with_residual(a: torch.Tensor, residual: float) -> torch.Tensor:
    eye = torch.eye(a.shape[-1], device=a.device)
    a = (1 - residual) * a + residual * eye
    return a / a.sum(-1, keepdim=True)


def attention_rollout(
    attentions: Sequence[torch.Tensor], residual: float = 0.5, head_fusion: str = "mean"
) -> torch.Tensor:
    """Abnar & Zuidema (2020): ``A^l = (1-r) fuse_h(a^l) + r I`` (rows renormalised),
    ``R = A^L ... A^1``; ``R[b, i, j]`` = relevance of input ``j`` for output ``i``.

    ``attentions``: one ``(B, H, N, N)`` tensor per layer, first layer first.
    """
    result = None
    for probs in attentions:
        a = _with_residual(_fuse(probs, head_fusion), residual)
        result = a if result is None else a @ result
    if result is None:
        raise ValueError("attentions is empty")
    return result


def attention_flow(
    attentions: Sequence[torch.Tensor], residual: float = 0.5, head_fusion: str = "mean"
) -> torch.Tensor:
    """Abnar & Zuidema's attention flow: max-flow from input ``j`` to output ``i`` through the
    layered graph whose edge ``(l-1, j) -> (l, i)`` has capacity ``A^l[i, j]`` (as in rollout).

    One max-flow per (input, output) pair: an offline tool for short sequences. Returns
    ``(B, N, N)``.
    """
    mats = [_with_residual(_fuse(p, head_fusion), residual) for p in attentions]
    if not mats:
        raise ValueError("attentions is empty")
    batch, n = mats[0].shape[0], mats[0].shape[-1]
    result = torch.zeros(batch, n, n)
    for b in range(batch):
        cap = torch.zeros((len(mats) + 1) * n, (len(mats) + 1) * n, dtype=torch.float64)
        for layer, a in enumerate(mats):
            # node (layer, j) -> (layer + 1, i) with capacity a[i, j]
            cap[layer * n : (layer + 1) * n, (layer + 1) * n : (layer + 2) * n] = a[b].T.double()
        top = len(mats) * n
        for j in range(n):
            for i in range(n):
                result[b, i, j] = _max_flow(cap, j, top + i)
    return result


def _max_flow(capacity: torch.Tensor, source: int, sink: int) -> float:
    """Edmonds-Karp on a dense capacity matrix (small graphs only)."""
    residual = capacity.clone()
    total = 0.0
    while True:
        parent = torch.full((residual.shape[0],), -1, dtype=torch.long)
        parent[source] = source
        frontier = [source]
        while frontier and parent[sink] < 0:
            nxt = []
            for u in frontier:
                for v in torch.nonzero((residual[u] > 1e-12) & (parent < 0)).flatten().tolist():
                    parent[v] = u
                    nxt.append(v)
            frontier = nxt
        if parent[sink] < 0:
            return total
        path, v = [], sink
        while v != source:
            path.append((int(parent[v]), v))
            v = int(parent[v])
        push = min(float(residual[u, v]) for u, v in path)
        for u, v in path:
            residual[u, v] -= push
            residual[v, u] += push
        total += push


# ----------------------------------------------------------------------------- VL-SAM
def vlsam_head_weights(
    probs: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """VL-SAM's head weights ``W[h] = mean_i max_j a[h, i, j]`` (peaked heads weigh more):
    ``(B, H, N, N) -> (B, H)``; with ``attention_mask`` ``(B, N)`` the mean runs over real
    query rows only."""
    peak = probs.float().amax(-1)
    real = _real_rows(probs, attention_mask)
    if real is None:
        return peak.mean(-1)
    return (peak * real).sum(-1) / real.sum(-1).clamp_min(1)


def vlsam_map(attentions: Sequence[torch.Tensor], causal: bool = True) -> torch.Tensor:
    """VL-SAM's regularised attention flow (Lin et al., 2024): heads aggregated with
    :func:`vlsam_head_weights`, ``S'^l = mean_h(W[h] a^l[h])``, each column ``j`` damped by
    ``1 - (L0_j - 1) / N`` (``L0_j`` = unmasked entries of column ``j``: ``N - j`` if causal),
    rolled out as ``S~^l = (I + S'^l)(I + S~^{l-1})``. Returns ``(B, N, N)``; read the row of
    the token of interest over the image columns.
    """
    result = None
    for probs in attentions:
        n = probs.shape[-1]
        w = vlsam_head_weights(probs)[..., None, None]
        agg = (probs.float() * w).mean(1)
        unmasked = (n - torch.arange(n)) if causal else torch.full((n,), n)
        agg = agg * (1 - (unmasked.float() - 1) / n).to(agg.device)
        eye = torch.eye(n, device=agg.device)
        result = eye + agg if result is None else (eye + agg) @ (eye + result)
    if result is None:
        raise ValueError("attentions is empty")
    return result
