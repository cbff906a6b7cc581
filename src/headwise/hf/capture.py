"""Record attention probabilities, scores and per-head outputs of chosen heads and query rows.

Names follow TransformerLens: ``blocks.3.attn.pattern`` (post-softmax probabilities),
``blocks.3.attn.scores`` (pre-softmax scores, mask included), ``blocks.3.attn.z`` (each head's
output before the output projection), ``blocks.3.attn.lse`` (log-sum-exp); multi-tower models
prefix the tower (``vision_model.blocks.1.attn.pattern``).

Only the requested heads and rows are recomputed, from the log-sum-exp the fast path saved: the
rest of the model stays on the fast backends and nothing ``L x L`` is built for other heads.

Rows count the real tokens of each sequence (padding skipped): ``rows=[-1]`` is the last real
token of every sequence, whether the batch is padded on the left or the right.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from headwise._checks import ArgumentTypeError, check_bool, check_ints
from headwise.hf.registry import select_sites
from headwise.hooks import Call, Hook, Layers, Request, hooked, normalize, positions

WHAT = ("pattern", "scores", "z", "lse")


class ActivationCache:
    """Captured tensors by hook-point name; ``cache[name]`` is the latest call's tensor.

    Shapes: ``pattern``/``scores`` ``(B, h, r, Lk)``, ``z`` ``(B, r, h, Dv)``, ``lse``
    ``(B, h, r)``, where ``h``/``r`` are the captured heads and rows: ``cache.heads[name]``
    ``(h,)`` gives the head indices and ``cache.rows[name]`` ``(B, r)`` the query positions of each
    sequence (they differ between sequences of a padded batch). Every call is kept in
    ``cache.steps(name)`` (``generate`` calls each layer once per step).
    """

    def __init__(self) -> None:
        self._steps: dict[str, list[torch.Tensor]] = {}
        self.heads: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._steps:
            raise KeyError(f"{name!r} was not captured; captured: {sorted(self._steps)}")
        return self._steps[name][-1]

    def __contains__(self, name: object) -> bool:
        return name in self._steps

    def keys(self) -> list[str]:
        return list(self._steps)

    def steps(self, name: str) -> list[torch.Tensor]:
        return list(self._steps[name])

    def _add(self, name: str, value: torch.Tensor, heads: torch.Tensor, rows: torch.Tensor):
        self._steps.setdefault(name, []).append(value)
        self.heads[name] = heads
        self.rows[name] = rows


class _Capture(Hook):
    def __init__(self, sites, heads, rows, what, detach, cache):
        self.names = {s.name for s in sites}
        self.heads, self.rows, self.what = heads, rows, what
        self.detach, self.cache = detach, cache

    def _positions(self, call: Call) -> torch.Tensor:
        """``(B, r)`` query positions of ``rows`` in each sequence, counting its real tokens."""
        batch, q_len = call.q.shape[:2]
        device = call.q.device
        if self.rows is None:
            return torch.arange(q_len, device=device).expand(batch, q_len)
        real = call.query_mask
        tokens = [
            torch.arange(q_len, device=device) if real is None else torch.nonzero(real[b])[:, 0]
            for b in range(batch)
        ]
        picked = [t[normalize(self.rows, len(t), device)] for t in tokens]
        counts = [len(p) for p in picked]
        if len(set(counts)) > 1 or not counts[0]:
            raise ValueError(
                f"rows={self.rows} select {counts} rows of the sequences at {call.site.name}, "
                f"which have {[len(t) for t in tokens]} real tokens: choose rows that every "
                "sequence has (negative rows count from each sequence's last real token)"
            )
        return torch.stack(picked)

    def request(self, call: Call) -> Request | None:
        if call.site.name in self.names and {"pattern", "scores"} & set(self.what):
            return Request(self.heads, self._positions(call).unique().tolist())
        return None

    def needs_lse(self, call: Call) -> bool:
        return call.site.name in self.names and "lse" in self.what

    def observe(self, call: Call) -> None:
        name = call.site.name
        if name not in self.names:
            return
        heads = normalize(self.heads, call.num_heads, call.q.device)
        rows = self._positions(call)  # (B, r)
        values = {}
        if {"pattern", "scores"} & set(self.what):
            hi = positions(call.heads, heads)
            at = positions(call.rows, rows)[:, None, :, None]  # (B, 1, r, 1)
            for key, block in (("pattern", call.probs), ("scores", call.scores)):
                values[key] = block[:, hi].take_along_dim(at, 2)
        values["z"] = call.out.take_along_dim(rows[:, :, None, None], 1)[:, :, heads]
        if "lse" in self.what:
            values["lse"] = call.lse[:, heads].take_along_dim(rows[:, None, :], 2)
        for key in self.what:
            value = values[key].detach() if self.detach else values[key]
            self.cache._add(f"{name}.{key}", value, heads, rows)


@contextmanager
def capture(
    model: nn.Module,
    layers: Layers = None,
    heads: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
    what: Sequence[str] = ("pattern", "z"),
    detach: bool = True,
) -> Iterator[ActivationCache]:
    """Capture attention internals of ``model`` while the block runs.

    Args:
        model: a transformers model (attached to headwise on first use).
        layers: which attention modules (see :func:`headwise.hf.select_sites`); ``None`` = all.
        heads: query-head indices to keep (negative = from the end); ``None`` = all. Each must
            exist in every chosen module.
        rows: query rows, counted over each sequence's real tokens (negative = from the end,
            ``[-1]`` = the last real token); ``None`` = every position, padding included. A call
            where the sequences would keep different numbers of rows raises ``ValueError``.
        what: a sequence of ``"pattern"``, ``"scores"``, ``"z"``, ``"lse"``.
        detach: store detached tensors (``False`` keeps the graph, e.g. for gradients).

    Example::

        with capture(model, layers=[3], heads=[0, 5], rows=[-1]) as cache:
            model(**inputs)
        cache["blocks.3.attn.pattern"]   # (B, 2, 1, Lk)
    """
    if isinstance(what, str) or not isinstance(what, Sequence):
        raise ArgumentTypeError(f"what must be a sequence of names from {WHAT}; got {what!r}")
    unknown = set(what) - set(WHAT)
    if unknown or not what:
        raise ValueError(f"what must be a non-empty subset of {WHAT}; got {tuple(what)}")
    check_bool("detach", detach)
    sites = select_sites(model, layers)
    if heads is not None:
        heads = check_ints("heads", heads)
        for site in sites:
            bad = [h for h in heads if not -site.heads <= h < site.heads]
            if bad:
                raise ValueError(
                    f"heads {bad} out of range for {site.name} with {site.heads} heads"
                )
    if rows is not None:
        rows = check_ints("rows", rows)
    cache = ActivationCache()
    hook = _Capture(
        sites,
        None if heads is None else list(heads),
        None if rows is None else list(rows),
        tuple(what),
        detach,
        cache,
    )
    with hooked(model, hook):
        yield cache
