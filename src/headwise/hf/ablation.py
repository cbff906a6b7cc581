"""Gate or ablate attention heads (Michel, Levy & Neubig, "Are Sixteen Heads Really Better than
One?", NeurIPS 2019): each head's output, before the output projection, is multiplied by a gate,
so ``o_proj`` sees ``sum_h g_h W_O^(h) o_h``; a head gated to zero contributes nothing.

Both are context managers: the model is unchanged after the block.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from headwise._checks import ArgumentTypeError, check_ints
from headwise.hf.registry import select_sites
from headwise.hooks import HeadGate, hooked


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
