"""Prefill speed on a real LLM: SmolLM2-135M-Instruct's whole-model forward on one real-text
sequence, dense vs StreamingLLM's sinks + window and MoA plans through headwise's ``native`` CPU
kernel.

Configurations of the same model, timed in turn round by round (a slow phase of the machine then
hits all of them alike), at each sequence length:

- ``sdpa``: the model's default dense attention (``model.set_attn_implementation("sdpa")``),
  the baseline every ratio is taken against;
- ``headwise dense``: headwise attached, no pattern swapped (dense causal through
  :func:`headwise.attention`, which sends it to the ``sdpa`` backend);
- ``headwise sinks+window``: ``sliding_window(w) | sinks(n)`` swapped into all 30 layers with
  :func:`headwise.hf.swap_pattern` (``auto`` sends it to the ``native`` kernel on CPU);
- ``headwise MoA <name>``: one per ``--plan NAME=PATH`` (an MoA plan saved by ``MoAPlan.save``,
  e.g. ``bench/results/moa-plan-smollm2-0.5.json``), its spans sized for the sequence's length
  (:func:`headwise.evals.sized_swap`).

A forward is a prefill as ``generate`` runs it: ``torch.no_grad()``, ``use_cache=False``, and
logits for the last position only (``logits_to_keep=1``), so the 49152-word output projection is
not paid for every token. Then the attention alone: :func:`headwise.attention` on one layer's
shapes (``B=1, L, H=9, H_kv=3, D=64``, float32) for dense causal (``sdpa`` backend) vs the
sinks + window pattern (``auto``), same rounds.

The longest length runs only if its forward, extrapolated from the two shorter ones, fits
``--max-forward`` seconds; otherwise a note says it was skipped.

    python bench/bench_prefill.py [--lengths 2048 4096 8192] [--rounds 3] [--window 256]
        [--plan moa-0.5=bench/results/moa-plan-smollm2-0.5.json]

Writes ``bench/results/prefill-cpu-<date>.md`` with device, versions, date and every round.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

import headwise.patterns as P
from headwise import attention, explain
from headwise.evals import sized_swap, smollm2_for_eval, token_stream
from headwise.hf import attach, swap_pattern
from headwise.layers import MoAPlan
from headwise.measure import write_results

RESULTS = Path(__file__).parent / "results"
HEADS, KV_HEADS, DIM = 9, 3, 64


def rounds(fns: dict[str, Callable[[], object]], count: int) -> dict[str, list[float]]:
    """Seconds of every call: ``count`` rounds that each call every function once, in turn."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(count):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def prefill_calls(
    model, ids: torch.Tensor, pattern, plans: dict[str, MoAPlan]
) -> dict[str, Callable[[], object]]:
    def forward():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False, logits_to_keep=1)

    def sdpa():
        model.set_attn_implementation("sdpa")
        return forward()

    def dense():
        attach(model)
        return forward()

    def sparse():
        attach(model)
        with swap_pattern(model, pattern):
            return forward()

    def moa(plan: MoAPlan):
        def run():
            attach(model)
            with sized_swap(model, plan, ids.shape[1]):
                return forward()

        return run

    calls = {"sdpa": sdpa, "headwise dense": dense, "headwise sinks+window": sparse}
    return calls | {f"headwise MoA {name}": moa(plan) for name, plan in plans.items()}


def attention_calls(length: int, pattern) -> tuple[dict[str, Callable[[], object]], str]:
    q = torch.randn(1, length, HEADS, DIM)
    k, v = (torch.randn(1, length, KV_HEADS, DIM) for _ in range(2))
    dense = P.causal("top_left")

    def sdpa():
        with torch.no_grad():
            return attention(q, k, v, dense, backend="sdpa")

    def sparse():
        with torch.no_grad():
            return attention(q, k, v, pattern)

    return {"sdpa": sdpa, "sinks+window": sparse}, str(explain(q, k, v, pattern))


def table(title: str, times: dict[str, dict[str, list[float]]]) -> list[str]:
    """One row per (length, configuration): every round, the median and the ratio to sdpa."""
    lines = [
        f"## {title}",
        "",
        "| tokens | configuration | rounds (s) | median (s) | vs sdpa |",
        "|---|---|---|---|---|",
    ]
    for length, by_name in times.items():
        base = median(by_name["sdpa"])
        for name, values in by_name.items():
            shown = ", ".join(f"{t:.4g}" for t in values)
            ratio = median(values) / base
            lines.append(f"| {length} | {name} | {shown} | {median(values):.4g} | {ratio:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument(
        "--max-forward",
        type=float,
        default=60.0,
        help="skip a length whose forward would be longer",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plan", action="append", default=[], metavar="NAME=PATH", help="an MoA plan to time"
    )
    args = parser.parse_args()
    plans = {}
    for spec in args.plan:
        name, _, path = spec.partition("=")
        if not path:
            parser.error(f"--plan takes NAME=PATH; got {spec!r}")
        plans[name] = MoAPlan.load(path)
    torch.manual_seed(args.seed)
    begin = time.perf_counter()
    model, tokenizer, env, load = smollm2_for_eval()
    attach(model)
    pattern = P.sliding_window(args.window) | P.sinks(args.sinks)

    warm = token_stream(tokenizer, 128, args.seed)
    for fn in prefill_calls(model, warm, pattern, plans).values():
        fn()  # compiles the native kernel once, warms every path
    whole: dict[int, dict[str, list[float]]] = {}
    notes = []
    lengths = sorted(args.lengths)
    for i, length in enumerate(lengths):
        if i >= 2:  # fit t ~ L^p to the two previous lengths and extrapolate
            l0, l1 = lengths[i - 2 : i]
            a, b = median(whole[l0]["sdpa"]), median(whole[l1]["sdpa"])
            expected = b * (length / l1) ** (math.log(b / a) / math.log(l1 / l0))
            if expected > args.max_forward:
                note = (
                    f"{length} tokens skipped: one forward extrapolated to ~{expected:.0f} s "
                    f"(> --max-forward {args.max_forward:.0f} s) on this machine"
                )
                print(note)
                notes.append(note)
                continue
        ids = token_stream(tokenizer, length, args.seed)
        whole[length] = rounds(prefill_calls(model, ids, pattern, plans), args.rounds)
        print(f"{length}: " + ", ".join(f"{n} {median(t):.2f} s" for n, t in whole[length].items()))
    model.set_attn_implementation("sdpa")

    alone: dict[int, dict[str, list[float]]] = {}
    explained = ""
    for length in lengths:
        calls, why = attention_calls(length, pattern)
        explained = explained or why
        for fn in calls.values():
            fn()
        alone[length] = rounds(calls, args.rounds)
    total = time.perf_counter() - begin

    lines = [
        "# Prefill speed of SmolLM2-135M-Instruct (CPU)",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        f"- text: Python's pydoc help topics, one seeded sequence per length (seed {args.seed})",
        "- forward: torch.no_grad(), use_cache=False, logits_to_keep=1 (prefill as generate "
        "runs it), float32, batch 1",
        f"- pattern: sliding_window({args.window}) | sinks({args.sinks}) in all 30 layers",
        *(f"- MoA {name}: {spec.partition('=')[2]}" for name, spec in zip(plans, args.plan)),
        f"- {args.rounds} rounds, configurations timed in turn within each round; one warm-up "
        "forward of 128 tokens per configuration before the first",
        f"- model load {load:.1f} s; whole run {total:.0f} s",
        *(f"- {note}" for note in notes),
        "",
        *table("Whole-model forward (prefill)", whole),
        "",
        f"`explain` for one layer's shapes (B=1, L={lengths[0]}, H={HEADS}, H_kv={KV_HEADS}, "
        f"D={DIM}) and the sinks + window pattern:",
        "",
        "```",
        explained,
        "```",
        "",
        *table(
            f"Attention alone (headwise.attention, B=1, H={HEADS}, H_kv={KV_HEADS}, D={DIM}, "
            "float32, no grad; sdpa = dense causal on the sdpa backend)",
            alone,
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(RESULTS, "prefill-cpu", env, text)


if __name__ == "__main__":
    main()
