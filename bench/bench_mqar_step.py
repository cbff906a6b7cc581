"""What one MQAR training step costs per mixer (issue 16's 30-minute CPU preset): milliseconds of
forward + backward + AdamW step of :class:`headwise.evals.mqar.MQARModel`, as
:func:`headwise.evals.mqar.train_run` takes it (Zoology's MQAR, Arora et al., arXiv 2312.04927).

Every mixer of :func:`headwise.evals.mqar.list_mixers` (or ``--mixers``) plus ``floor``: the same
model with each sequence mixer replaced by a plain ``nn.Linear(d, d)``, the baseline every ratio
is taken against (embeddings, LayerNorms, dropout, LM head and optimizer without any token
mixing). One model per mixer, seeded alike; a call runs ``--steps`` training steps on fixed
batches of Zoology's generator; every round calls each model once, each round starting one model
later than the one before (so none always runs first); the figure is the median over
``--rounds`` rounds per step.

    python bench/bench_mqar_step.py [--mixers base_conv,linear_elu] [--rounds 7] [--steps 5]
        [--threads 1] [--batch 64] [--length 64] [--dim 64] [--output bench/results]

Writes ``bench/results/mqar-step-cpu-<date>.md`` with device, versions, date and every round.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from headwise.evals.mqar import IGNORE, MQARModel, check_mixer, list_mixers, mqar_data
from headwise.measure import environment, progress, write_results

RESULTS = Path(__file__).parent / "results"
FLOOR = "floor"
#: training steps per epoch of the CPU preset (20k examples, batch 64)
STEPS_PER_EPOCH = 313


def _model(mixer: str, args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    model = MQARModel(
        "linear_identity" if mixer == FLOOR else mixer,
        vocab_size=args.vocab,
        dim=args.dim,
        seq_len=args.length,
    )
    if mixer == FLOOR:
        for block in model.layers:
            block.sequence_mixer = nn.Linear(args.dim, args.dim)
    return model


def training_steps(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int
) -> Callable[[], None]:
    """``steps`` training steps of ``model`` as :func:`train_run` takes them, cycling through
    ``batches``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    model.train()
    state = {"next": 0}

    def run() -> None:
        for _ in range(steps):
            tokens, labels = batches[state["next"] % len(batches)]
            state["next"] += 1
            where = labels != IGNORE
            loss = F.cross_entropy(model(tokens, where), labels[where])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", default=",".join(list_mixers()))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder of the results file")
    args = parser.parse_args()
    mixers = [check_mixer(name.strip()) for name in args.mixers.split(",") if name.strip()]
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    torch.set_num_threads(args.threads)
    x, y = mqar_data(args.vocab, 4 * args.batch, args.length, args.pairs, 1)
    batches = list(zip(x.split(args.batch), y.split(args.batch)))
    names = [FLOOR, *mixers]
    calls = {name: training_steps(_model(name, args), batches, args.steps) for name in names}
    begin, load = time.perf_counter(), os.getloadavg()[0]
    bar = progress(len(names) * (args.rounds + 1), "mqar step")
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(-1, args.rounds):  # round -1 warms every model up and is not recorded
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            if r >= 0:
                times[name].append((time.perf_counter() - start) / args.steps)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    total = time.perf_counter() - begin

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    floor = median(times[FLOOR])
    env = environment(torch.device("cpu"))
    lines = [
        "# MQAR training step per mixer (CPU)",
        "",
        *(f"- {key}: {value}" for key, value in env.items()),
        f"- problem: B={args.batch}, L={args.length}, d={args.dim}, vocab {args.vocab}, "
        f"K={args.pairs}, 2-layer Zoology model, float32; a step = forward + backward + fused "
        "AdamW step, loss on the labelled positions only (as train_run)",
        f"- median over {args.rounds} rounds of {args.steps} steps each (every round runs every "
        f"model once, rotated); `floor`: each mixer replaced by nn.Linear(d, d); s/epoch = "
        f"median x {STEPS_PER_EPOCH} steps (the CPU preset's epoch, test pass excluded)",
        f"- load average (1 min) {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
        f"on {os.cpu_count()} cores (above ~1 other jobs shared the machine: timings are noisy); "
        f"total {total:.0f} s",
        "",
        "| mixer | ms/step | vs floor | s/epoch | rounds (ms/step) |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        m = median(times[name])
        shown = ", ".join(f"{t * 1e3:.1f}" for t in times[name])
        lines.append(
            f"| {name} | {m * 1e3:.1f} | {m / floor:.2f}x | {m * STEPS_PER_EPOCH:.1f} | {shown} |"
        )
        print(f"{name}: {m * 1e3:.1f} ms/step ({m / floor:.2f}x floor)")
    write_results(args.output, "mqar-step-cpu", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
