"""Head importance on a real LLM: SmolLM2-135M-Instruct's held-out perplexity vs the fraction of
its 270 attention heads pruned, least important first vs in random order.

Michel, Levy & Neubig ("Are Sixteen Heads Really Better than One?", NeurIPS 2019) score each
head by ``I[l,h] = E_x |dL(x)/d xi[l,h]|``, the gradient of the loss at a gate ``xi`` on the
head's output, normalize the scores within each layer (L2, as they do before pruning across
layers), and prune heads globally from the lowest score up; they find many heads can go with
little loss, and that importance order beats random order. This script:

1. scores the heads once with :func:`headwise.hf.head_importance_gradient` (one calibration
   passage per gradient, so the mean of ``|grad|`` is over passages),
2. removes the ``k`` least important heads with :func:`headwise.hf.ablate_heads` (the head's
   output is zeroed before ``o_proj``) for ``k`` = 0, 10, ..., 50% of the heads, and in the
   same run the first ``k`` heads of random orders (``--random-seeds``),
3. measures perplexity on held-out real English (:func:`headwise.evals.token_stream`: Python's
   own help topics) that shares no 16-token span with the calibration text.

The scores are computed once on the unpruned model (Michel et al.'s figure 4 setting), not
re-estimated after each step as :func:`headwise.hf.prune_heads` does.

    python bench/bench_pruning.py [--passages 8] [--tokens 256] [--seed 0]

Writes ``bench/results/pruning-cpu-<date>.md`` (device, versions, date) and the plot
``bench/results/pruning-cpu-<date>.png``.
"""

from __future__ import annotations

import argparse
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from headwise.evals import smollm2_for_eval, token_stream
from headwise.hf import ablate_heads, attach, head_importance_gradient, select_sites
from headwise.measure import progress, write_results

RESULTS = Path(__file__).parent / "results"
FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
SPAN = 16  # held-out text may share no span this long with the calibration text

Head = tuple[str, int]


def _lm_loss(model: nn.Module, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def _spans(ids: torch.Tensor) -> set[tuple[int, ...]]:
    rows = ids.reshape(-1, ids.shape[-1]).tolist()
    return {tuple(row[i : i + SPAN]) for row in rows for i in range(len(row) - SPAN + 1)}


def disjoint_streams(
    tokenizer, count: int, tokens: int, seed: int, avoid: torch.Tensor | None = None
) -> torch.Tensor:
    """``(count, tokens)`` seeded real-text streams (seeds ``seed``, ``seed + 1``, ...), skipping
    any that shares a ``SPAN``-token stretch with ``avoid`` or with a stream already taken."""
    seen = set() if avoid is None else _spans(avoid)
    rows, s = [], seed
    while len(rows) < count:
        ids = token_stream(tokenizer, tokens, s)
        s += 1
        spans = _spans(ids)
        if spans & seen:
            continue
        seen |= spans
        rows.append(ids)
    return torch.cat(rows)


def importance_order(model: nn.Module, calibration: torch.Tensor) -> tuple[list[Head], dict]:
    """Every head, least important first, by Michel et al.'s per-layer normalized gradient
    importance on the rows of ``calibration`` (one row per gradient); also the raw scores."""
    batches = [{"input_ids": row[None]} for row in calibration]
    scores = head_importance_gradient(model, batches, _lm_loss)
    heads = [(name, h) for name, s in scores.items() for h in range(len(s))]
    flat = torch.cat(list(scores.values()))
    return [heads[i] for i in flat.argsort(stable=True).tolist()], scores


def random_order(model: nn.Module, seed: int) -> list[Head]:
    heads = [(s.name, h) for s in select_sites(model) for h in range(s.heads)]
    perm = torch.randperm(len(heads), generator=torch.Generator().manual_seed(seed))
    return [heads[i] for i in perm.tolist()]


def perplexity(model: nn.Module, ids: torch.Tensor, removed: list[Head] = ()) -> float:
    """Perplexity of ``ids`` (equal-length rows, every token predicted from its prefix) with the
    ``removed`` heads' outputs zeroed."""
    heads: dict[str, list[int]] = {}
    for name, h in removed:
        heads.setdefault(name, []).append(h)
    with torch.no_grad(), ablate_heads(model, heads) if heads else nullcontext():
        return math.exp(float(_lm_loss(model, {"input_ids": ids})))


def pruning_curve(
    model: nn.Module, held_out: torch.Tensor, order: list[Head], counts: list[int], bar=None
) -> list[float]:
    """Held-out perplexity with the first ``k`` heads of ``order`` removed, for ``k`` in
    ``counts``."""
    curve = []
    for k in counts:
        curve.append(perplexity(model, held_out, order[:k]))
        if bar is not None:
            bar.update()
    return curve


def _plot(path: Path, percents, importance, randoms, base: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stack = torch.tensor(randoms)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(percents, importance, "o-", label="importance order (least important first)")
    ax.plot(percents, stack.mean(0), "s--", label=f"random order (mean of {len(randoms)})")
    ax.fill_between(
        percents,
        stack.min(0).values,
        stack.max(0).values,
        color="C1",
        alpha=0.2,
        label="random order (min-max)",
    )
    ax.axhline(base, color="gray", lw=0.8, ls=":", label="unpruned")
    ax.set_yscale("log")
    ax.set_xlabel("heads pruned (%)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=8, help="calibration and held-out each")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, tokenizer, env, load = smollm2_for_eval()
    attach(model)
    calibration = disjoint_streams(tokenizer, args.passages, args.tokens, args.seed)
    held_out = disjoint_streams(
        tokenizer, args.passages, args.tokens, args.seed + 10_000, avoid=calibration
    )

    start = time.perf_counter()
    order, scores = importance_order(model, calibration)
    score_time = time.perf_counter() - start
    total = len(order)
    counts = [round(f * total) for f in FRACTIONS]
    orders = {"importance": order}
    for s in range(args.random_seeds):
        orders[f"random {args.seed + s}"] = random_order(model, args.seed + s)

    bar = progress(len(orders) * len(counts), "perplexity")
    start = time.perf_counter()
    curves = {name: pruning_curve(model, held_out, o, counts, bar) for name, o in orders.items()}
    if bar is not None:
        bar.close()
    ppl_time = time.perf_counter() - start
    base = curves["importance"][0]
    randoms = [c for name, c in curves.items() if name != "importance"]

    pruned_per_layer = [0] * len(scores)
    names = list(scores)
    for name, _ in order[: counts[-1]]:
        pruned_per_layer[names.index(name)] += 1
    lines = [
        "# Head importance (Michel et al.) on SmolLM2-135M-Instruct (CPU)",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        f"- heads: {total} ({len(scores)} layers); importance: per-layer L2-normalized "
        f"E|dL/d gate| on {args.passages} calibration streams of {args.tokens} tokens "
        f"(seeds from {args.seed}), computed once on the unpruned model",
        f"- held-out: {args.passages} streams of {args.tokens} tokens (seeds from "
        f"{args.seed + 10_000}), sharing no {SPAN}-token span with the calibration text",
        "- text: Python's pydoc help topics; pruning = the head's output zeroed before o_proj "
        "(headwise.hf.ablate_heads)",
        f"- model load {load:.1f} s; importance {score_time:.1f} s; "
        f"perplexity passes {ppl_time:.1f} s",
        "",
        "## Held-out perplexity vs heads pruned (ratio to unpruned in parentheses)",
        "",
        "| pruned | heads | importance order | random mean | random min-max |",
        "|---|---|---|---|---|",
    ]
    for i, (f, k) in enumerate(zip(FRACTIONS, counts)):
        imp = curves["importance"][i]
        rnd = [c[i] for c in randoms]
        mean = sum(rnd) / len(rnd)
        lines.append(
            f"| {f:.0%} | {k} | {imp:.2f} ({imp / base:.2f}x) | {mean:.2f} ({mean / base:.2f}x) "
            f"| {min(rnd):.2f}-{max(rnd):.2f} |"
        )
    lines += [
        "",
        "Per random seed: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{p:.2f}" for p in c)
            for name, c in curves.items()
            if name != "importance"
        ),
        "",
        f"Heads pruned per layer at {FRACTIONS[-1]:.0%} (importance order, layers 0-"
        f"{len(scores) - 1}): {pruned_per_layer}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    path = write_results(RESULTS, "pruning-cpu", env, text)
    _plot(
        path.with_suffix(".png"),
        [100 * f for f in FRACTIONS],
        curves["importance"],
        randoms,
        base,
        f"SmolLM2-135M-Instruct: {args.passages}x{args.tokens} held-out tokens, {total} heads",
    )


if __name__ == "__main__":
    main()
