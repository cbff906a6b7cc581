"""VAR, Visual Attention Redistribution (Kang et al., "See What You Are Told: Visual Attention
Sink in Large Multimodal Models", ICLR 2025): in image-centric heads, attention that sink tokens
receive is moved to the image's other tokens. Sink tokens: :mod:`headwise.hf.sinks`.

The intervention is a context manager: the model is unchanged after the block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from headwise.hf.registry import language_sites, select_sites
from headwise.hf.sinks import sink_threshold, sink_values
from headwise.hooks import Call, Hook, Layers, Request, hooked


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
    :func:`~headwise.hf.sinks.sink_threshold` for narrow models). Only queries after the image
    change.
    Defaults follow the released code: ``tau=20``, ``keep=0.6`` (fraction of the sink weight
    kept), ``rho=0.5``, image mass ``>= 0.2``, sink layers ``[2, L)`` excluding the last layer.
    Yields the hook; ``hook.selected[name]`` is the last pass's ``(B, H, Lq)`` bool of the
    rewritten (head, query) rows.
    """
    if layers is None:
        layers = [s.name for s in language_sites(model)[2:-1]]
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
