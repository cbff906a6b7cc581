"""StreamingLLM on a real LLM: perplexity along a stream 4x longer than the window, and where
SmolLM2-135M-Instruct's attention sinks are.

Xiao et al. ("Efficient Streaming Language Models with Attention Sinks", ICLR 2024) find that a
model attending only to a window of recent tokens breaks down once the first tokens leave the
window, while keeping the first few tokens (the "attention sinks") beside the window keeps
perplexity flat. This script swaps three patterns into every layer of SmolLM2 with
:func:`headwise.hf.swap_pattern` and measures per-token perplexity on real English
(:func:`headwise.evals.token_stream`: Python's own help topics), bucketed by position:

- dense (the baseline, through headwise with no pattern),
- window only: ``sliding_window(w)`` (the ``w`` previous keys plus the query itself),
- sinks + window: ``sliding_window(w) | sinks(n)``.

It then locates the sinks per layer with headwise's detection: VAR's massive-activation sink
tokens (:func:`headwise.hf.find_sinks`) and the attention share each layer gives the first
``n`` tokens (:func:`headwise.hf.sink_share`).

**Difference from StreamingLLM.** A pattern swapped in only masks scores: every token keeps its
absolute position (RoPE angle), so a query at position 1000 sees its window keys at distances
0..w as usual but the sinks at distance ~1000. StreamingLLM's rolling cache instead re-assigns
positions inside the cache (sinks at 0..n-1, the window right after them), so the model never
sees a distance beyond the cache size. Both hide the same keys; the positions differ.

    python bench/bench_streaming.py [--window 256] [--sinks 4] [--streams 8] [--seed 0]

Writes ``bench/results/streaming-cpu-<date>.md`` with device, versions and date.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import headwise.patterns as P
from headwise.evals import perplexity, smollm2_for_eval, token_stream
from headwise.hf import (
    attach,
    capture,
    find_sinks,
    massive_dimensions,
    sink_share,
)
from headwise.measure import progress, write_results

RESULTS = Path(__file__).parent / "results"


def sink_table(model, tokenizer, sinks: int, length: int, seed: int) -> tuple[list, list[int]]:
    """Per layer: VAR sink-token positions (first stream), the largest head share on them, and
    the mean attention share on the first ``sinks`` tokens (queries after them)."""
    ids = torch.cat([token_stream(tokenizer, length, seed + 100 + i) for i in range(2)])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    # massive activations form after the first layers: take the dimensions from the middle one
    found = find_sinks(model, inputs, dims=massive_dimensions(hidden[len(hidden) // 2]))
    first = torch.zeros_like(ids, dtype=torch.bool)
    first[:, :sinks] = True
    with torch.no_grad(), capture(model, what=("pattern",)) as cache:
        model(**inputs)
    rows = []
    for layer, name in enumerate(found.tokens):
        share = sink_share(cache[f"{name}.pattern"], first)[:, :, sinks:]  # (B, H, L - n)
        positions = found.tokens[name][0].nonzero().flatten().tolist()
        words = [repr(tokenizer.decode(ids[0, p : p + 1])) for p in positions]
        rows.append(
            (
                layer,
                list(zip(positions, words)),
                float(found.share[name].max()),
                float(share.mean()),
            )
        )
    return rows, found.dims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--ratio", type=int, default=4, help="stream length / window")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--bucket", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, tokenizer, env, load = smollm2_for_eval()
    attach(model)
    length = args.ratio * args.window
    streams = [token_stream(tokenizer, length, args.seed + i) for i in range(args.streams)]
    w, n = args.window, args.sinks
    configs = [
        ("dense", None),
        (f"window {w}", P.sliding_window(w)),
        (f"sinks {n} + window {w}", P.sliding_window(w) | P.sinks(n)),
    ]
    bar = progress(len(configs) * len(streams), "perplexity")
    start = time.perf_counter()
    nll = {name: perplexity(model, streams, pattern, bar).nll for name, pattern in configs}
    if bar is not None:
        bar.close()
    ppl_time = time.perf_counter() - start
    sinks, dims = sink_table(model, tokenizer, n, w, args.seed)

    edges = list(range(0, length - 1, args.bucket))
    lines = [
        "# StreamingLLM on SmolLM2-135M-Instruct (CPU)",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        f"- text: Python's pydoc help topics, {len(streams)} seeded streams of {length} tokens "
        f"(seed {args.seed}); window {w} (the {w} previous keys plus the query), {n} sinks",
        f"- model load {load:.1f} s; perplexity passes {ppl_time:.1f} s",
        "- the swapped patterns only mask scores: positions stay absolute (StreamingLLM's cache "
        "re-assigns positions inside the cache; see the script's docstring)",
        "",
        "## Perplexity per position bucket (ratio to dense in parentheses)",
        "",
        "| positions | " + " | ".join(name for name, _ in configs) + " |",
        "|---" * (len(configs) + 1) + "|",
    ]
    beyond = slice(w + n, None)  # predictions whose context no longer fits the window
    for lo in edges:
        hi = min(lo + args.bucket, length - 1)
        dense = math.exp(float(nll["dense"][:, lo:hi].mean()))
        cells = []
        for name, _ in configs:
            ppl = math.exp(float(nll[name][:, lo:hi].mean()))
            cells.append(f"{ppl:.2f}" + ("" if name == "dense" else f" ({ppl / dense:.3f}x)"))
        lines.append(f"| {lo + 1}-{hi} | " + " | ".join(cells) + " |")
    dense = math.exp(float(nll["dense"][:, beyond].mean()))
    summary = []
    for name, _ in configs:
        ppl = math.exp(float(nll[name][:, beyond].mean()))
        summary.append(f"- {name}: {ppl:.2f} ({ppl / dense:.3f}x dense)")
    lines += ["", f"Beyond the window (predicted tokens {w + n + 1}-{length - 1}):", "", *summary]
    lines += [
        "",
        f"## Sinks per layer ({2} streams of {w} tokens)",
        "",
        f"VAR sink dimensions {dims}: sink tokens are those with a massive activation there "
        "(position and token in the first stream); the head share is the largest mean "
        "attention share of one head on them; the last column is the mean share (all heads, "
        f"queries after them) on the first {n} tokens.",
        "",
        f"| layer | sink-token positions | max head share on them | mean share on first {n} |",
        "|---|---|---|---|",
    ]
    for layer, positions, head, first in sinks:
        shown = ", ".join(f"{p} {word}" for p, word in positions[:6])
        shown += f" ... ({len(positions)} in all)" if len(positions) > 6 else ""
        lines.append(f"| {layer} | {shown or '-'} | {head:.3f} | {first:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(RESULTS, "streaming-cpu", env, text)


if __name__ == "__main__":
    main()
