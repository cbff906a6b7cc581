"""Sparse attention benchmark: does a pattern of density d run ~1/d faster than dense SDPA?

For L tokens (default 4096) it times dense SDPA (the baseline) and then, for patterns of density
about 1/16, 1/8, 1/4 and 1/2 (sliding windows, block-sparse layouts, per-head heterogeneous stacks,
2-D neighborhood attention), every backend that serves them, and prints the achieved speedup next
to the FLOP bound 1/d (as NATTEN reports it). NATTEN runs as a peer on the neighborhood rows when
it is installed (``pip install --no-deps natten``).

    python bench/bench_sparse.py                 # CPU, forward (compiled flex + blockwise)
    python bench/bench_sparse.py --backward      # forward + backward (blockwise; flex on CUDA)
    python bench/bench_sparse.py --device cuda --length 16384

Results go to ``bench/results/sparse-<device>[-backward]-<date>.md`` with device, versions and
date.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import headwise.patterns as P
from headwise import attention, explain
from headwise.measure import environment, time_interleaved, write_results

RESULTS = Path(__file__).parent / "results"


def patterns_for(length: int, heads: int) -> list[tuple[str, P.Pattern]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for fraction in (16, 8, 4, 2):
        half = length // fraction // 2
        rows.append((f"window(+-{half})", P.sliding_window(half, half)))
        blocks = -(-length // 128)
        layout = torch.rand(heads, blocks, blocks, generator=gen) < 1 / fraction
        rows.append((f"block_sparse(1/{fraction}, per head)", P.block_sparse(layout, 128)))
        windows = [max(1, int(half * s)) for s in (0.5, 1.0, 1.5, 1.0)]
        stack = [P.sliding_window(w, w) for w in windows]
        rows.append((f"per_head(windows {windows})", P.per_head(stack * (heads // 4))))
        side = math.isqrt(length)
        kernel = max(1, round(math.sqrt(length / fraction)))
        if side * side == length and kernel <= side:
            rows.append(
                (f"neighborhood2d({side}x{side}, k={kernel})", P.neighborhood((side, side), kernel))
            )
    return rows


def natten_call(pattern: P.Pattern, q, k, v):
    """A NATTEN call on the same problem, or ``None`` if NATTEN is absent or does not apply."""
    try:
        import natten
    except ImportError:
        return None
    if not isinstance(pattern, P.Pattern) or not hasattr(pattern, "grid"):
        return None
    shape = (q.shape[0], *pattern.grid, *q.shape[2:])
    qs, ks, vs = (t.reshape(shape) for t in (q, k, v))
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(pattern.grid)]
    return lambda: fn(qs, ks, vs, kernel_size=pattern.kernel_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=["flex", "blockwise", "native"])
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = (args.batch, args.length, args.heads, args.dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    leaves = [t.clone().requires_grad_(args.backward) for t in (q, k, v)]

    def timed(fn):
        def run():
            if not args.backward:
                with torch.no_grad():
                    return fn()
            return torch.autograd.grad(fn().sum(), leaves)

        return run

    env = environment(device)
    lines = ["# headwise sparse attention benchmark\n"]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    mode = "forward+backward" if args.backward else "forward"
    lines += [
        f"- problem: B={args.batch}, L={args.length}, H={args.heads}, D={args.dim}, "
        f"{args.dtype}, {mode}",
        "- speedup = dense SDPA time / pattern time; per pattern, dense SDPA and every backend "
        f"are called in turn for {args.repeats} rounds and each time is the median of its "
        "rounds; bound = 1/density (FLOP-wise); target = 0.5/density (issue 3, CPU)",
        "",
        "| pattern | density | backend | ms | dense ms | speedup | bound 1/d | speedup / bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name, pattern in patterns_for(args.length, args.heads):
        density = pattern.density(args.length, args.length)
        candidates = {
            b: timed(lambda b=b, p=pattern: attention(*leaves, p, backend=b))
            for b in args.backends
            if explain(*leaves, pattern, backend=(b,)).backend is not None
        }
        # NATTEN's CPU path is FlexAttention, which has no backward on CPU.
        cpu_backward = args.backward and device.type == "cpu"
        peer = None if cpu_backward else natten_call(pattern, *leaves)
        if peer is not None:
            candidates["natten"] = timed(peer)
        seconds = time_interleaved(
            {"dense": timed(lambda: attention(*leaves, backend="sdpa")), **candidates},
            device,
            rounds=args.repeats,
        )
        dense = seconds.pop("dense")
        for backend, time_s in seconds.items():
            speedup = dense / time_s
            row = (
                f"| {name} | {density:.3f} | {backend} | {time_s * 1e3:.1f} | {dense * 1e3:.1f} "
                f"| {speedup:.2f} | {1 / density:.1f} | {speedup * density:.2f} |"
            )
            print(row, flush=True)
            lines.append(row)
    suffix = "-backward" if args.backward else ""
    write_results(RESULTS, f"sparse-{device.type}{suffix}", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
