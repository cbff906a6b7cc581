"""The hook engine without transformers: a tiny model whose attention calls ``run_attention``."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

from headwise import patterns as P
from headwise.hooks import Call, Hook, Request, Site, hooked, install, run_attention

HEADS, KV_HEADS, DIM, LENGTH = 4, 2, 8, 7
CAP = 2.0


def softcap(s, b, h, i, j):
    return CAP * torch.tanh(s / CAP)


class TinyAttention(nn.Module):
    """Grouped-query causal attention whose call goes through the hooks of its site."""

    def __init__(self, width: int = 16, score_mod=None) -> None:
        super().__init__()
        self.q = nn.Linear(width, HEADS * DIM)
        self.kv = nn.Linear(width, 2 * KV_HEADS * DIM)
        self.score_mod = score_mod
        self.bias = None
        self.seen = None

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, HEADS, DIM)
        k, v = self.kv(x).view(batch, length, 2, KV_HEADS, DIM).unbind(2)
        self.seen = q, k, v
        out, probs = run_attention(
            self,
            q,
            k,
            v,
            P.causal(),
            scale=DIM**-0.5,
            bias=self.bias,
            score_mod=self.score_mod,
            return_probs=return_probs,
        )
        return out, probs


class Tiny(nn.Module):
    def __init__(self, score_mod=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([TinyAttention(score_mod=score_mod) for _ in range(2)])
        hooks: list[Hook] = []
        sites = [
            Site(f"blocks.{i}.attn", i, "", HEADS, hooks, block)
            for i, block in enumerate(self.blocks)
        ]
        install(self, sites, list(self.blocks))

    def forward(self, x: torch.Tensor, return_probs: bool = False):
        outs = [block(x, return_probs) for block in self.blocks]
        return [o for o, _ in outs], [p for _, p in outs]


def explicit(q, k, v, allowed, scale, score_mod=None, bias=None, edit=None):
    """Softmax attention written out: scores, mask, probabilities (optionally edited), output."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, 2).float(), v.repeat_interleave(group, 2).float()
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * scale
    if score_mod is not None:
        s = score_mod(s, None, None, None, None)
    if bias is not None:
        s = s + bias
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    if edit is not None:
        p = edit(p.clone())
    return p, torch.einsum("bhqk,bkhd->bqhd", p, v)


def causal_mask(window: int | None = None) -> torch.Tensor:
    i, j = torch.arange(LENGTH)[:, None], torch.arange(LENGTH)[None]
    allowed = j <= i
    return allowed if window is None else allowed & (j >= i - window)


def test_importing_the_hooks_floor_needs_no_transformers():
    code = "import sys, headwise.hooks; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_swapped_pattern_is_intersected_with_the_module_pattern():
    class Swap(Hook):
        def pattern(self, site: Site):
            return P.sliding_window(2, 2) if site.name == "blocks.0.attn" else None

    model = Tiny()
    x = torch.randn(2, LENGTH, 16)
    with torch.no_grad():
        plain, _ = model(x)
        with hooked(model, Swap()):
            swapped, _ = model(x)
        after, _ = model(x)
    for index, window in ((0, 2), (1, None)):
        q, k, v = model.blocks[index].seen
        _, want = explicit(q, k, v, causal_mask(window), DIM**-0.5)
        assert torch.allclose(swapped[index], want, atol=1e-5)
        _, unswapped = explicit(q, k, v, causal_mask(), DIM**-0.5)
        assert torch.allclose(plain[index], unswapped, atol=1e-5)
    assert torch.equal(after[0], plain[0])  # the hook is gone after the block
    assert not torch.allclose(swapped[0], plain[0], atol=1e-3)


def test_edited_probabilities_replace_the_output_of_their_block_only():
    class Sink(Hook):
        """Head 1's last query row attends only to key 0."""

        def request(self, call: Call):
            return Request([1], [-1]) if call.site.name == "blocks.1.attn" else None

        def edit_probs(self, call: Call) -> bool:
            if call.site.name != "blocks.1.attn":
                return False
            assert call.probs.shape == (2, 1, 1, LENGTH)
            call.probs = torch.zeros_like(call.probs)
            call.probs[..., 0] = 1.0
            return True

    def edit(p):
        p[:, 1, -1] = 0.0
        p[:, 1, -1, 0] = 1.0
        return p

    model = Tiny()
    x = torch.randn(2, LENGTH, 16)
    with torch.no_grad(), hooked(model, Sink()):
        outs, _ = model(x)
    q, k, v = model.blocks[1].seen
    _, want = explicit(q, k, v, causal_mask(), DIM**-0.5, edit=edit)
    assert torch.allclose(outs[1], want, atol=1e-5)
    assert torch.allclose(outs[1][:, -1, 1], v[:, 0, 0], atol=1e-6)  # head 1 reads kv head 0
    q0, k0, v0 = model.blocks[0].seen
    assert torch.allclose(outs[0], explicit(q0, k0, v0, causal_mask(), DIM**-0.5)[1], atol=1e-5)


def test_captured_scores_probabilities_and_outputs_equal_the_explicit_computation():
    class Capture(Hook):
        def __init__(self) -> None:
            self.calls: dict[str, Call] = {}

        def request(self, call: Call):
            return Request()

        def observe(self, call: Call) -> None:
            self.calls[call.site.name] = call

    model = Tiny(score_mod=softcap)
    bias = torch.randn(1, HEADS, LENGTH, LENGTH)
    model.blocks[0].bias = bias
    x = torch.randn(2, LENGTH, 16)
    hook = Capture()
    with torch.no_grad(), hooked(model, hook):
        outs, probs = model(x, return_probs=True)
    call = hook.calls["blocks.0.attn"]
    q, k, v = model.blocks[0].seen
    p, want = explicit(q, k, v, causal_mask(), DIM**-0.5, softcap, bias)
    assert torch.equal(call.heads, torch.arange(HEADS)) and torch.equal(call.rows, torch.arange(7))
    assert torch.allclose(call.probs, p, atol=1e-6)
    assert torch.allclose(probs[0], p, atol=1e-6)  # what return_probs hands back
    assert torch.allclose(call.out, want, atol=1e-5) and torch.equal(call.out, outs[0])
    assert torch.allclose(call.lse, torch.logsumexp(call.scores, -1), atol=1e-5)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2)) * DIM**-0.5
    scores = (softcap(s, None, None, None, None) + bias).masked_fill(~causal_mask(), float("-inf"))
    assert torch.allclose(call.scores, scores, atol=1e-5)
