"""What attention dropout costs (issue 16): forward+backward of :func:`headwise.attention` with
``dropout_p`` against the same call without it, per backend and pattern.

With dropout, ``sdpa`` runs its own dropout, ``blockwise`` leaves the fused CPU kernel (which
would draw its own mask) for the step-by-step path that generates the keep mask block by block
(forward, and again in the backward pass), and ``native`` refuses (so ``auto`` goes to
``blockwise`` for patterns SDPA cannot take). Per (pattern, length) every call is timed in turn
for ``--rounds`` rounds (median), on ``B=1, H=4, D=64``, float32.

    python bench/bench_dropout.py [--lengths 256 1024] [--rounds 5] [--p 0.1]

Writes ``bench/results/dropout-cpu-<date>.md`` with device, versions and date.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import headwise.patterns as P
from headwise import attention, explain
from headwise.measure import environment, progress, time_interleaved, write_results

RESULTS = Path(__file__).parent / "results"
HEADS, DIM = 4, 64


def _step(leaves, pattern, backend: str, p: float):
    def run():
        out = attention(*leaves, pattern, backend=backend, dropout_p=p)
        return torch.autograd.grad(out.sum(), leaves)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--p", type=float, default=0.1)
    args = parser.parse_args()
    device = torch.device("cpu")
    env = environment(device)
    lines = ["# headwise attention dropout benchmark\n"]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [
        f"- problem: B=1, H={HEADS}, D={DIM}, float32, forward+backward, dropout_p={args.p}",
        f"- each time is the median of {args.rounds} rounds that call every configuration of a "
        "row group in turn; ratio = time with dropout / the same backend without",
        "- the machine was shared with other jobs (timings are noisy)",
        "",
        "| pattern | L | backend | ms without | ms with dropout | ratio | auto with dropout |",
        "|---|---|---|---|---|---|---|",
    ]
    patterns = {"causal": P.causal(), "sliding_window(128)": P.sliding_window(128)}
    bar = progress(len(args.lengths) * len(patterns), "dropout")
    for length in args.lengths:
        leaves = [torch.randn(1, length, HEADS, DIM, requires_grad=True) for _ in range(3)]

        for name, pattern in patterns.items():
            auto = explain(*leaves, pattern, dropout_p=args.p).backend
            backends = [
                b
                for b in ("sdpa", "blockwise", "reference")
                if explain(*leaves, pattern, backend=(b,), dropout_p=args.p).backend is not None
                and (b != "reference" or length <= 1024)
            ]
            fns = {}
            for backend in backends:
                fns[(backend, 0.0)] = _step(leaves, pattern, backend, 0.0)
                fns[(backend, args.p)] = _step(leaves, pattern, backend, args.p)
            seconds = time_interleaved(fns, device, rounds=args.rounds)
            for backend in backends:
                without, with_ = seconds[(backend, 0.0)], seconds[(backend, args.p)]
                row = (
                    f"| {name} | {length} | {backend} | {without * 1e3:.1f} | "
                    f"{with_ * 1e3:.1f} | {with_ / without:.2f} | {auto} |"
                )
                lines.append(row)
                print(row, flush=True)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    write_results(RESULTS, "dropout-cpu", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
