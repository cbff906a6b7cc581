"""KV memory and decode speed on a real LLM: SmolLM2-135M-Instruct decoding with a cache that
follows an MoA plan (:class:`headwise.hf.cache.PatternCache`) vs the dense cache.

MoA (Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression", 2024) and StreamingLLM (Xiao et al., ICLR 2024) promise a smaller KV cache and
faster decoding; this script measures both on one prompt of real English (Python's pydoc help
topics) per length, followed by greedy decoding:

- ``dense``: the model's default ``sdpa`` attention with transformers' ``DynamicCache`` (every
  key kept), the baseline every ratio is taken against;
- ``streamingllm``: ``PatternCache`` with the uniform plan ``MoAPlan.uniform(30, 9, alpha=0,
  beta=0.25, max_new_tokens=steps)`` (the same sinks + window in every head, KV density ~0.25);
- one configuration per ``--plan PATH`` (a plan saved by ``MoAPlan.save``, e.g.
  ``bench/results/moa-plan-smollm2-0.25.json``), named after the file.

Per prompt length and configuration: the KV bytes after the prefill and after decoding (keys and
values stored over all layers), and the decode speed: only the ``--steps`` single-token steps after
the prefill are timed (``torch.no_grad()``, batch 1, float32, logits of the last position). The
configurations run in turn within each round (a slow phase of a shared machine then hits all of
them alike); the median over rounds is reported. ``agree`` is the fraction of greedy tokens equal
to the dense model's (a quick quality hint, not a quality measure).

    python bench/bench_decode.py [--lengths 1024 2048 4096 8192] [--steps 32] [--rounds 3]
        [--plan bench/results/moa-plan-smollm2-0.25.json]

Writes ``bench/results/decode-cpu-<date>.md`` and ``.json`` with device, versions and date.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from headwise.evals import smollm2_for_eval, token_stream
from headwise.hf import attach
from headwise.hf.cache import PatternCache
from headwise.layers import MoAPlan
from headwise.measure import progress, write_results

RESULTS = Path(__file__).parent / "results"


def kv_bytes(cache) -> int:
    """Bytes of the keys and values a cache stores, over all layers."""
    if isinstance(cache, PatternCache):
        return cache.nbytes()
    return sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )


def decode(model, ids: torch.Tensor, plan: MoAPlan | None, steps: int) -> dict:
    """Prefill ``ids`` then ``steps`` greedy single-token steps; only the steps are timed."""
    if plan is None:
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    else:
        attach(model)
        cache = PatternCache(model, plan)
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        prefill = kv_bytes(cache)
        tokens = [int(out.logits[0, -1].argmax())]
        start = time.perf_counter()
        for _ in range(steps):
            token = torch.tensor([[tokens[-1]]])
            out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            tokens.append(int(out.logits[0, -1].argmax()))
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "prefill_bytes": prefill,
        "bytes": kv_bytes(cache),
        "tokens": tokens,
    }


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plan", type=Path, action="append", default=[], help="MoAPlan JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    begin = time.perf_counter()
    model, tokenizer, env, load = smollm2_for_eval()
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    plans: dict[str, MoAPlan | None] = {
        "dense": None,
        "streamingllm": MoAPlan.uniform(
            layers, heads, alpha=0, beta=0.25, max_new_tokens=args.steps
        ),
    }
    for path in args.plan:
        plans[path.stem] = MoAPlan.load(path)

    warm = token_stream(tokenizer, 128, args.seed)
    for plan in plans.values():
        decode(model, warm, plan, 2)  # compiles the native kernel once, warms every path
    bar = progress(len(args.lengths) * args.rounds * len(plans), "decode")
    runs: dict[int, dict[str, list[dict]]] = {}
    for length in args.lengths:
        ids = token_stream(tokenizer, length, args.seed)
        runs[length] = {name: [] for name in plans}
        for _ in range(args.rounds):
            for name, plan in plans.items():
                runs[length][name].append(decode(model, ids, plan, args.steps))
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    model.set_attn_implementation("sdpa")
    total = time.perf_counter() - begin

    rows, data = [], {"env": env, "steps": args.steps, "rounds": args.rounds, "results": []}
    for length, by_name in runs.items():
        base = by_name["dense"]
        base_speed = args.steps / median([r["seconds"] for r in base])
        for name, results in by_name.items():
            speed = args.steps / median([r["seconds"] for r in results])
            first = results[0]
            agree = sum(a == b for a, b in zip(first["tokens"], base[0]["tokens"])) / len(
                first["tokens"]
            )
            kv = {
                "prefill_bytes": first["prefill_bytes"],
                "bytes": first["bytes"],
                "prefill_ratio": first["prefill_bytes"] / base[0]["prefill_bytes"],
                "ratio": first["bytes"] / base[0]["bytes"],
            }
            rounds = [args.steps / r["seconds"] for r in results]
            data["results"].append(
                {
                    "tokens": length,
                    "configuration": name,
                    **kv,
                    "tokens_per_s": speed,
                    "rounds_tokens_per_s": rounds,
                    "speedup": speed / base_speed,
                    "agree": agree,
                }
            )
            rows.append(
                f"| {length} | {name} | {kv['prefill_bytes'] / 2**20:.2f} "
                f"({kv['prefill_ratio']:.3f}) | {kv['bytes'] / 2**20:.2f} ({kv['ratio']:.3f}) | "
                f"{', '.join(f'{r:.1f}' for r in rounds)} | {speed:.1f} | "
                f"{speed / base_speed:.2f}x | {agree:.2f} |"
            )

    lines = [
        "# Decode with a pattern-following KV cache: SmolLM2-135M-Instruct (CPU)",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        f"- text: Python's pydoc help topics, one seeded prompt per length (seed {args.seed}); "
        f"batch 1, float32, torch.no_grad(); {args.steps} greedy single-token steps timed after "
        "the prefill",
        "- dense: the model's sdpa attention and transformers' DynamicCache (the baseline); the "
        "other rows: headwise.hf.cache.PatternCache with the named MoA plan (streamingllm = "
        f"MoAPlan.uniform(alpha=0, beta=0.25, max_new_tokens={args.steps}), MoA's default rule: "
        "64-token sink, cache rounded up to 64, at least 128)",
        f"- {args.rounds} rounds, configurations in turn within each round, median reported; one "
        "warm-up of 128 tokens per configuration before the first",
        f"- model load {load:.1f} s; whole run {total:.0f} s",
        "",
        "| prompt tokens | configuration | KV MiB after prefill (vs dense) | KV MiB after decode "
        "(vs dense) | rounds (tokens/s) | decode tokens/s | vs dense | agree |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    path = write_results(RESULTS, "decode-cpu", env, text)
    path.with_suffix(".json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
