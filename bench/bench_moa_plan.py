"""MoA plans for SmolLM2-135M-Instruct at KV density 0.5 and 0.25, end to end on real text.

Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
(arXiv 2406.14909). This script:

1. calibrates on Debian's license texts (:func:`headwise.evals.text.licenses`, disjoint from the
   Python-docs evaluation text): chat prompts of ``L`` tokens of text plus "Summarize the text
   above", answered greedily by the dense model (:func:`headwise.hf.moa.moa_calibration`),
2. profiles the attention influence of every head at ``L`` = 1024 and 2048 tokens through the
   hook engine (:func:`headwise.hf.moa.moa_profile`), timing it and its peak memory,
3. searches one plan per budget with :func:`headwise.moa.search_plan` (scipy's MILP / HiGHS):
   one span per GQA group of 3 query heads (one KV head), at most 2 distinct spans per layer,
   mean KV density in ``[0.9 * budget, budget]`` at 1024, 2048 and 4096 tokens, candidates of
   MoA's grid with a 128-token alpha step (the official 1024 is too coarse below 4k tokens),
4. saves ``bench/results/moa-plan-smollm2-<budget>.json`` (``MoAPlan.save``, as soon as each
   plan exists) with ``max_new_tokens=0``: the runtime then sizes the spans for the evaluated
   length itself, so the density holds there, and writes ``bench/results/moa-plan-cpu-<date>.md``
   (device, versions, date) with the spans per layer, the influence each plan and the uniform
   baseline (StreamingLLM's ``alpha=0, beta=budget`` for every head) leave out, the densities
   at every length, the solver's time and status and the profiling cost.

    python bench/bench_moa_plan.py [--samples 2] [--answer-tokens 64] [--seed 0] [--profiles F]
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings
from pathlib import Path

import torch
import transformers

from headwise.evals.text import licenses
from headwise.hf.moa import moa_calibration, moa_profile
from headwise.hf.pretrained import smollm2
from headwise.layers.moa import MoAPlan
from headwise.measure import environment, peak_memory, progress, write_results
from headwise.moa import candidate_grid, plan_density, plan_loss, search_plan

RESULTS = Path(__file__).parent / "results"
PROFILE_LENGTHS = (1024, 2048)
CONSTRAINT_LENGTHS = (1024, 2048, 4096)
BUDGETS = (0.5, 0.25)
GROUP, MAX_SPANS, LOWER, ALPHA_STEP = 3, 2, 0.9, 128


def _spans(plan: MoAPlan) -> list[str]:
    rows = []
    for layer, (alphas, betas) in enumerate(zip(plan.alphas, plan.betas)):
        groups = list(zip(alphas[::GROUP], betas[::GROUP]))
        used = sorted(set(groups), key=groups.index)
        text = ", ".join(f"{groups.count(s)}x ({s[0]:g}, {s[1]:g})" for s in used)
        rows.append(f"| {layer} | {text} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2, help="calibration samples per length")
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=300.0, help="MILP seconds per plan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profiles", type=Path, help="keep the profiles in this file and reuse them if it exists"
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    env = environment(torch.device("cpu"))
    env["transformers"] = transformers.__version__
    import scipy

    env["scipy"] = scipy.__version__
    model, tokenizer = smollm2()
    texts = list(licenses().values())

    profiles, cost = {}, {}
    if args.profiles is not None and args.profiles.exists():
        profiles, cost = torch.load(args.profiles)
    bar = progress(2 * len(PROFILE_LENGTHS), "calibrate + profile")
    for length in [n for n in PROFILE_LENGTHS if n not in profiles]:
        start = time.perf_counter()
        batches = moa_calibration(
            model,
            tokenizer,
            texts,
            length,
            samples=args.samples,
            answer_tokens=args.answer_tokens,
            seed=args.seed,
        )
        calibrate_s = time.perf_counter() - start
        if bar is not None:
            bar.update()
        start = time.perf_counter()
        peak = peak_memory(
            lambda b=batches, n=length: profiles.update({n: moa_profile(model, b)}),
            torch.device("cpu"),
        )
        cost[length] = (calibrate_s, time.perf_counter() - start, peak)
        if bar is not None:
            bar.update()
        print(
            f"L={length}: calibration {calibrate_s:.0f} s, profile {cost[length][1]:.0f} s, "
            f"peak {peak / 2**30:.2f} GiB"
        )
    if bar is not None:
        bar.close()
    if args.profiles is not None:
        torch.save((profiles, cost), args.profiles)

    lengths = list(PROFILE_LENGTHS)
    grid = candidate_grid(
        max(CONSTRAINT_LENGTHS), alpha_step=ALPHA_STEP, min_length=min(CONSTRAINT_LENGTHS)
    )
    plans, solve = {}, {}
    for budget in BUDGETS:
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            plan = search_plan(
                [profiles[n] for n in lengths],
                lengths,
                budget,
                candidates=grid,
                max_new_tokens=0,
                group=GROUP,
                max_spans=MAX_SPANS,
                lower=LOWER,
                constraint_lengths=CONSTRAINT_LENGTHS,
                time_limit=args.time_limit,
            )
        status = "; ".join(str(w.message) for w in caught) or "optimal (relative gap 1e-6)"
        solve[budget] = (time.perf_counter() - start, status)
        path = RESULTS / f"moa-plan-smollm2-{budget}.json"
        plan.save(path)
        plans[budget] = plan
        print(f"budget {budget}: solved in {solve[budget][0]:.1f} s ({status}); wrote {path}")

    lines = [
        "# MoA plans for SmolLM2-135M-Instruct",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        "",
        "Command: `python bench/bench_moa_plan.py "
        f"--samples {args.samples} --answer-tokens {args.answer_tokens} --seed {args.seed}`",
        "",
        f"Calibration: {args.samples} samples per length from Debian's license texts, chat "
        f"prompt + 'Summarize the text above', {args.answer_tokens} answer tokens regenerated "
        "greedily by the dense model, loss on the answer only. Search: scipy.optimize.milp "
        f"(HiGHS), one span per GQA group of {GROUP} heads, <= {MAX_SPANS} spans per layer, "
        f"mean KV density in [{LOWER} x budget, budget] at {list(CONSTRAINT_LENGTHS)} tokens, "
        f"{len(grid)} candidates (MoA's grid, alpha step {ALPHA_STEP}), objective: sum over "
        f"profile lengths {lengths} of the influence left out / total influence. Plans saved "
        "with max_new_tokens=0.",
        "",
        "## Profiling (batch 1, 30 layers x 9 heads, float32 probabilities kept for backward)",
        "",
        "| length | calibration s | profile s | peak MiB (profile) |",
        "|---|---|---|---|",
        *(f"| {n} | {c:.0f} | {p:.0f} | {m / 2**20:.0f} |" for n, (c, p, m) in cost.items()),
        "",
        f"Peak resident set of the whole run: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB.",
        "",
        "## Plans",
        "",
        "Influence left out (share of the total, lower is better) and KV density, MoA vs the "
        "uniform baseline (alpha=0, beta=budget, every head):",
        "",
        "| budget | plan | solver s | status | "
        + " | ".join(f"loss@{n}" for n in lengths)
        + " | "
        + " | ".join(f"density@{n}" for n in CONSTRAINT_LENGTHS)
        + " |",
        "|---|---|---|---|" + "---|" * (len(lengths) + len(CONSTRAINT_LENGTHS)),
    ]
    for budget, plan in plans.items():
        uniform = MoAPlan.uniform(30, 9, 0.0, budget, max_new_tokens=0)
        for name, p, s, st in (
            ("MoA", plan, f"{solve[budget][0]:.1f}", solve[budget][1]),
            ("uniform", uniform, "-", "-"),
        ):
            losses = " | ".join(f"{plan_loss(p, profiles[n], n):.4f}" for n in lengths)
            dens = " | ".join(f"{plan_density(p, n):.3f}" for n in CONSTRAINT_LENGTHS)
            lines.append(f"| {budget} | {name} | {s} | {st} | {losses} | {dens} |")
    for budget, plan in plans.items():
        lines += [
            "",
            f"### Spans per layer at budget {budget} (`moa-plan-smollm2-{budget}.json`)",
            "",
            "KV groups x (alpha, beta); span at total length N = alpha + beta * N "
            "(rounded up to 64, at least 128).",
            "",
            "| layer | groups x (alpha, beta) |",
            "|---|---|",
            *_spans(plan),
        ]
    write_results(RESULTS, "moa-plan-cpu", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
