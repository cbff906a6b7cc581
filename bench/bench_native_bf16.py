"""bfloat16 on the native kernel (issue 15 item 5): is bf16 2-D neighborhood attention at 64 x 64
no slower than float32, now that the kernel reads bf16 as it is instead of a float32 copy of q, k
and v? Also times the old path (float32 copies, the result cast back) and, as a side row, the
cost of attention dropout in the kernel (float32, p = 0.1) against no dropout.

    python bench/bench_native_bf16.py                  # 64 x 64 grid, k in {7, 13}, H=8, D=64
    python bench/bench_native_bf16.py --rounds 9

Every candidate of a row is called in turn, round by round (``headwise.measure.
time_interleaved``), forward under ``no_grad`` and forward+backward; each time is the median of
its rounds. The first rows call the kernel's autograd (``native_attention``); the
``attention()`` rows add the public entry point's own work (input checks, the scan for
non-finite keys) on the same problem. Results go to ``bench/results/native-bf16-cpu-<date>.md``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import headwise.patterns as P
from headwise.measure import environment, progress, time_interleaved, write_results
from headwise.ops.attention import attention
from headwise.ops.attention.native import native_attention

RESULTS = Path(__file__).parent / "results"


def candidates(pattern, leaves, backward: bool) -> dict:
    """name -> a call of the problem (forward, or forward and backward)."""
    wide = [t.detach().float().requires_grad_(backward) for t in leaves]
    half = [t.detach().bfloat16().requires_grad_(backward) for t in leaves]

    def kernel(*tensors, **options):
        return native_attention(*tensors, pattern, **options)[0]

    calls = {
        "float32": (wide, lambda: kernel(*wide)),
        "bfloat16 (in-kernel)": (half, lambda: kernel(*half)),
        # the old NativeBackend.run: float32 copies of q, k, v, the result cast back
        "bfloat16 via float32 copies": (
            half,
            lambda: kernel(*(t.float() for t in half)).bfloat16(),
        ),
        "float32, dropout 0.1": (wide, lambda: kernel(*wide, dropout_p=0.1, seed=1)),
        "attention(): float32": (wide, lambda: attention(*wide, pattern, backend="native")),
        "attention(): bfloat16": (half, lambda: attention(*half, pattern, backend="native")),
    }

    def timed(inputs, fn):
        def run():
            if not backward:
                with torch.no_grad():
                    return fn()
            return torch.autograd.grad(fn().float().sum(), inputs)

        return run

    return {name: timed(*call) for name, call in calls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--kernels", type=int, nargs="+", default=[7, 13])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    device = torch.device("cpu")
    length = args.side * args.side
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(1, length, args.heads, args.dim, generator=gen) for _ in range(3)]
    env = environment(device)
    lines = ["# bfloat16 on the native kernel: 2-D neighborhood attention\n"]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [
        f"- problem: B=1, {args.side}x{args.side} grid (L={length}), H={args.heads}, "
        f"D={args.dim}, backend native",
        f"- every candidate of a row called in turn for {args.rounds} rounds after a warm-up; "
        "median ms; ratio = time / float32 time (<= 1: no slower than float32)",
        "- the machine was shared with other jobs (2 cores, 3 engineers): absolute times are "
        "noisy, the interleaved ratios less so; load average (1/5/15 min) at the start: "
        + " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "- 'bfloat16 (in-kernel)' is the kernel reading bf16 as it is; 'via float32 copies' is "
        "the path before (copies of q, k, v, the result cast back); the attention() rows add "
        "the public entry point's checks",
        "",
        "| pattern | pass | candidate | ms | / float32 |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    bar = progress(2 * len(args.kernels), "native bf16")
    for kernel in args.kernels:
        pattern = P.neighborhood((args.side, args.side), kernel)
        for backward in (False, True):
            seconds = time_interleaved(
                candidates(pattern, leaves, backward), device, rounds=args.rounds
            )
            base = seconds["float32"]
            for name, time_s in seconds.items():
                row = (
                    f"| neighborhood2d(k={kernel}) | {'fwd+bwd' if backward else 'fwd'} | "
                    f"{name} | {time_s * 1e3:.1f} | {time_s / base:.2f} |"
                )
                lines.append(row)
                if bar is None:
                    print(row, flush=True)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
        print("\n".join(lines[-12 * len(args.kernels) :]))
    lines.append("\n- load average at the end: " + " / ".join(f"{x:.1f}" for x in os.getloadavg()))
    write_results(RESULTS, f"native-bf16-{device.type}", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
