"""MoA vs the uniform baseline vs dense on a real LLM: long-context retrieval and perplexity of
SmolLM2-135M-Instruct at equal KV density.

Fu et al. ("MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression",
2024) report that their heterogeneous per-head spans retrieve 1.5-7.1x better than the uniform
plan (the same sinks + window for every head, StreamingLLM's) at the same average KV density,
with a relative accuracy drop within 5% of dense. This script measures, on real English
(Python's own help topics), in one run:

- retrieval (:func:`headwise.evals.retrieval_accuracy`): passkey needles at evenly spread
  depths in real filler text, ``--contexts`` contexts x ``--questions`` needles per length
  (each context prefilled once, each needle asked once, scored by teacher-forced exact match);
  a dense check on LongEval's "lines" task (MoA's own) says whether that one is at floor;
- perplexity (:func:`headwise.evals.perplexity`) on held-out streams at 1k-8k tokens, over all
  predicted tokens and over the last half;

for dense, each MoA plan (``--plan NAME=PATH``; by default the plans written by
``bench/bench_moa_plan.py`` when present) and ``MoAPlan.uniform(30, 9, alpha=0, beta=d,
max_new_tokens=0)`` for each density ``d`` (MoA's "StreamingLLM" baseline plan). Every plan is
sized for the evaluated length (:func:`headwise.evals.sized_swap`) and applied by masking
(:func:`headwise.hf.swap_pattern`: what the sparse model computes).

    python bench/bench_moa_eval.py [--plan moa-0.5=bench/results/moa-plan-smollm2-0.5.json]
        [--only NAME ...] [--reuse bench/results/moa-eval-cpu-<date>.json]

``--only`` runs some configurations and ``--reuse`` takes the others from an earlier run's
JSON with the same settings (a run in parts, merged). Writes
``bench/results/moa-eval-cpu-<date>.md``, ``.json`` and ``.png`` (device, versions, date).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from headwise.evals import (
    perplexity,
    retrieval_accuracy,
    retrieval_contexts,
    smollm2_for_eval,
    token_stream,
)
from headwise.hf import attach
from headwise.layers import MoAPlan
from headwise.measure import progress, write_results

RESULTS = Path(__file__).parent / "results"
DEFAULT_PLANS = {f"moa-{d}": RESULTS / f"moa-plan-smollm2-{d}.json" for d in ("0.5", "0.25")}


def kv_density(plan: MoAPlan | None, length: int) -> float:
    """Mean over heads of the kept keys (sink + local, at most ``length``) over ``length``."""
    if plan is None:
        return 1.0
    kept = [
        min(sink + local, length) / length
        for layer in range(plan.num_layers)
        for sink, local in plan.cache_sizes(length, layer)
    ]
    return sum(kept) / len(kept)


def configurations(args) -> tuple[dict[str, MoAPlan | None], dict[str, Path]]:
    """Dense, the uniform plan at each density, then the MoA plans (name: plan), and the file
    each loaded plan came from."""
    plans = {"dense": None}
    for d in args.densities:
        plans[f"uniform-{d}"] = MoAPlan.uniform(30, 9, alpha=0, beta=float(d), max_new_tokens=0)
    paths = {name: path for name, path in DEFAULT_PLANS.items() if path.exists()}
    for item in args.plan:
        name, _, path = item.partition("=")
        if not name or not path:
            raise SystemExit(f"--plan must be NAME=PATH; got {item!r}")
        paths[name] = Path(path)
    for name, path in paths.items():
        plans[name] = MoAPlan.load(path)
    return plans, paths


def evaluate(model, plan, contexts, streams, bar) -> dict:
    start = time.perf_counter()
    retrieval = {}
    for length, items in contexts.items():
        score = retrieval_accuracy(model, items, plan, progress=bar)
        retrieval[str(length)] = {"correct": list(score.correct), "depths": list(score.depths)}
    ppl = {}
    for length, items in streams.items():
        score = perplexity(model, items, plan, progress=bar)
        ppl[str(length)] = {"whole": score.whole, "last_half": score.last_half}
    return {"retrieval": retrieval, "perplexity": ppl, "seconds": time.perf_counter() - start}


def lines_check(model, tokenizer, lengths, seed) -> dict[str, float]:
    """Dense accuracy on LongEval's lines task (1 context x 10 questions per length)."""
    out = {}
    for length in lengths:
        items = retrieval_contexts(tokenizer, length, task="lines", contexts=1, seed=seed)
        out[str(length)] = retrieval_accuracy(model, items).accuracy
    return out


def _accuracy(result: dict, length: int) -> float:
    correct = result["retrieval"][str(length)]["correct"]
    return sum(correct) / len(correct)


def _depth_table(results: dict, length: int, bins: int = 5) -> list[str]:
    rows = []
    for name, result in results.items():
        r = result["retrieval"][str(length)]
        cells = []
        for b in range(bins):
            hits = [c for c, d in zip(r["correct"], r["depths"]) if b / bins <= d < (b + 1) / bins]
            cells.append(f"{sum(hits) / len(hits):.2f}" if hits else "-")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def report(results, densities, settings, env, load, lines) -> str:
    names = list(results)
    lengths, ppl_lengths = settings["lengths"], settings["ppl_lengths"]
    lines_out = [
        "# MoA vs uniform (StreamingLLM) vs dense on SmolLM2-135M-Instruct (CPU)",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        f"- model load {load:.1f} s; seconds per configuration: "
        + ", ".join(f"{n} {r['seconds']:.0f}" for n, r in results.items()),
        f"- retrieval: passkey, {settings['contexts']} contexts x {settings['questions']} "
        f"needles per length = {settings['contexts'] * settings['questions']} questions per "
        "length and configuration; each needle `The pass key for <word-word> is <5 digits>. "
        "Remember it.` on its own line in real filler (pydoc help topics), depths spread "
        f"evenly; chat template; filler seeds {settings['seed']}+j; the last "
        f"{settings['reserve']} tokens of each length are left for the question and answer; "
        "exact match of the greedy answer, scored by teacher forcing",
        f"- perplexity: held-out pydoc streams (seeds {settings['seed'] + 100}+k), "
        + ", ".join(f"{n} x {L}" for L, n in zip(ppl_lengths, settings["ppl_streams"]))
        + " tokens; 'last half': the last half of the predicted tokens",
        "- every plan is sized for the evaluated length and applied by masking "
        "(headwise.hf.swap_pattern); uniform-d is `MoAPlan.uniform(30, 9, alpha=0, beta=d, "
        "max_new_tokens=0)` (64 sink tokens + a block-aligned window, MoA's StreamingLLM "
        "baseline); KV density: mean over heads of kept keys / length",
        *(
            f"- plan {name}: {result['plan_file']}"
            for name, result in results.items()
            if "plan_file" in result
        ),
        "",
        "## Why passkey",
        "",
        "Dense SmolLM2 on LongEval's lines task (MoA's retrieval task; 1 context x 10 "
        "questions per length): "
        + ", ".join(f"{L} tokens {acc:.0%}" for L, acc in lines.items())
        + ". A five-digit number is five digit tokens, so guessing scores about 0.001%; the "
        "task is near the floor for this 135M model even dense, so the comparison uses passkey "
        "retrieval (sequence.md §3.7: the simpler task when the harder one is at floor for "
        "dense; dense passkey accuracy below).",
        "",
        "## KV density per length",
        "",
        "| configuration | " + " | ".join(str(L) for L in sorted({*lengths, *ppl_lengths})) + " |",
        "|---" * (1 + len({*lengths, *ppl_lengths})) + "|",
    ]
    for name in names:
        cells = [
            f"{results[name]['kv_density'][str(L)]:.3f}" for L in sorted({*lengths, *ppl_lengths})
        ]
        lines_out.append(f"| {name} | " + " | ".join(cells) + " |")
    lines_out += [
        "",
        "## Retrieval accuracy (passkey)",
        "",
        "| configuration | " + " | ".join(f"{L} tokens" for L in lengths) + " | mean |",
        "|---" * (len(lengths) + 2) + "|",
    ]
    for name in names:
        accs = [_accuracy(results[name], L) for L in lengths]
        cells = [f"{a:.2f}" for a in accs] + [f"{sum(accs) / len(accs):.3f}"]
        lines_out.append(f"| {name} | " + " | ".join(cells) + " |")
    lines_out += [
        "",
        "Each plan named `<name>-<d>` vs uniform-d (equal density), and its relative drop from "
        "dense:",
        "",
    ]
    compared = [
        (d, n)
        for d in densities
        for n in names
        if not n.startswith(("dense", "uniform")) and n.endswith(f"-{d}")
    ]
    if not compared:
        lines_out.append("(no plan at a uniform baseline's density in this run)")
    for d, name in compared:
        for L in lengths:
            m, u = _accuracy(results[name], L), _accuracy(results[f"uniform-{d}"], L)
            dense = _accuracy(results["dense"], L)
            ratio = f"{m / u:.2f}x" if u else ("inf" if m else "-")
            drop = f"{(dense - m) / dense:+.0%}" if dense else "-"
            lines_out.append(
                f"- density {d}, {L} tokens: {name} {m:.2f} vs uniform {u:.2f} ({ratio}); "
                f"relative drop from dense {dense:.2f}: {drop}"
            )
    for L in lengths:
        lines_out += [
            "",
            f"Accuracy by needle depth at {L} tokens (fifths of the context, start to end):",
            "",
            "| configuration | 0-0.2 | 0.2-0.4 | 0.4-0.6 | 0.6-0.8 | 0.8-1 |",
            "|---|---|---|---|---|---|",
            *_depth_table(results, L),
        ]
    lines_out += [
        "",
        "## Perplexity (ratio to dense in parentheses)",
        "",
        "| configuration | " + " | ".join(f"{L} all | {L} last half" for L in ppl_lengths) + " |",
        "|---" * (1 + 2 * len(ppl_lengths)) + "|",
    ]
    dense = results["dense"]["perplexity"]
    for name in names:
        cells = []
        for L in ppl_lengths:
            for part in ("whole", "last_half"):
                p, base = results[name]["perplexity"][str(L)][part], dense[str(L)][part]
                cells.append(f"{p:.2f}" + ("" if name == "dense" else f" ({p / base:.3f}x)"))
        lines_out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines_out) + "\n"


def plot(results, settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    lengths, ppl_lengths = settings["lengths"], settings["ppl_lengths"]
    dense = results["dense"]["perplexity"]
    for name, result in results.items():
        line = left.plot(lengths, [_accuracy(result, L) for L in lengths], "o-", label=name)[0]
        ratios = [
            result["perplexity"][str(L)]["whole"] / dense[str(L)]["whole"] for L in ppl_lengths
        ]
        half = [
            result["perplexity"][str(L)]["last_half"] / dense[str(L)]["last_half"]
            for L in ppl_lengths
        ]
        if name != "dense":  # the ratio's baseline: 1 at every length
            color = line.get_color()
            right.plot(ppl_lengths, ratios, "o-", color=color, label=f"{name} (all)")
            right.plot(ppl_lengths, half, "x--", color=color, label=f"{name} (last half)")
    left.set(
        xscale="log",
        xlabel="length (tokens)",
        ylabel="passkey exact match",
        ylim=(-0.02, 1.02),
        title=f"retrieval ({settings['contexts'] * settings['questions']} needles per point)",
    )
    right.set(
        xscale="log",
        xlabel="length (tokens)",
        ylabel="perplexity / dense",
        title="held-out perplexity ratio to dense",
    )
    for ax, ticks in ((left, lengths), (right, ppl_lengths)):
        ax.minorticks_off()
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.axhline(1.0, color="gray", lw=0.8)
    right.legend(fontsize=7, ncol=2)
    fig.suptitle("SmolLM2-135M-Instruct: MoA vs uniform (StreamingLLM) vs dense, equal KV density")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--ppl-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--ppl-streams", type=int, nargs="+", default=[2, 2, 1, 1])
    parser.add_argument("--contexts", type=int, default=5)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--reserve", type=int, default=64)
    parser.add_argument("--densities", nargs="+", default=["0.5", "0.25"])
    parser.add_argument("--plan", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--only", action="append", default=[], metavar="NAME")
    parser.add_argument("--reuse", type=Path, help="an earlier run's JSON with the same settings")
    parser.add_argument("--seed", type=int, default=1400)
    args = parser.parse_args()
    if len(args.ppl_streams) != len(args.ppl_lengths):
        raise SystemExit("--ppl-streams needs one count per --ppl-lengths")
    for d in args.densities:
        if not 0 < float(d) <= 1:
            raise SystemExit(f"--densities must be in (0, 1]; got {d}")
    torch.manual_seed(args.seed)
    settings = {
        key: getattr(args, key)
        for key in ("lengths", "ppl_lengths", "ppl_streams", "contexts", "questions", "reserve")
    } | {"seed": args.seed, "task": "passkey"}
    plans, paths = configurations(args)
    previous, lines = {}, None
    if args.reuse is not None:
        data = json.loads(args.reuse.read_text())
        if data["settings"] != settings:
            raise SystemExit(f"--reuse has settings {data['settings']}, not {settings}")
        previous, lines = data["results"], data["lines_check"]
    unknown = [n for n in args.only if n not in plans]
    if unknown:
        raise SystemExit(f"--only names {unknown} are not among {list(plans)}")
    todo = [n for n in plans if (n in args.only if args.only else n not in previous)]
    missing = [n for n in plans if n not in todo and n not in previous]
    if missing:
        raise SystemExit(f"{missing} are neither run (--only) nor in --reuse")

    model, tokenizer, env, load = smollm2_for_eval()
    attach(model)
    seed = args.seed
    contexts = {
        L: retrieval_contexts(
            tokenizer,
            L,
            contexts=args.contexts,
            questions=args.questions,
            seed=seed,
            reserve=args.reserve,
        )
        for L in args.lengths
    }
    streams = {
        L: [token_stream(tokenizer, L, seed + 100 + k) for k in range(n)]
        for L, n in zip(args.ppl_lengths, args.ppl_streams)
    }
    if lines is None:
        lines = lines_check(model, tokenizer, args.lengths, seed + 200)
        print("dense on LongEval lines:", lines)
    per_config = len(args.lengths) * args.contexts + sum(args.ppl_streams)
    bar = progress(per_config * len(todo), "configurations x (contexts + streams)")
    results = {}
    for name in plans:
        if name in todo:
            results[name] = evaluate(model, plans[name], contexts, streams, bar)
        else:
            results[name] = previous[name]
        if name in paths:
            digest = hashlib.sha256(paths[name].read_bytes()).hexdigest()[:12]
            shown = os.path.relpath(paths[name])
            results[name]["plan_file"] = f"{shown} (sha256 {digest})"
        results[name]["kv_density"] = {
            str(L): kv_density(plans[name], L) for L in {*args.lengths, *args.ppl_lengths}
        }
        if name in todo:
            print(name, {L: _accuracy(results[name], L) for L in args.lengths})
    if bar is not None:
        bar.close()
    densities = [d for d in args.densities if f"uniform-{d}" in results]
    text = report(results, densities, settings, env, load, lines)
    print(text)
    path = write_results(RESULTS, "moa-eval-cpu", env, text)
    data = {"env": env, "settings": settings, "lines_check": lines, "results": results}
    path.with_suffix(".json").write_text(json.dumps(data, indent=1))
    plot(results, settings, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
