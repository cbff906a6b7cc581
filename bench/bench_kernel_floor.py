"""How close is ``blockwise`` to the kernel it is built on? (CPU)

For each pattern of ``bench_sparse.py`` this times, in one run, called in turn round by round:
dense SDPA (the baseline), ``headwise.attention(..., backend="blockwise")`` and the *kernel floor*:
PyTorch's fused CPU attention kernel alone on exactly the calls blockwise makes for that pattern
(query groups, key panels and batched runs of the cached plan), with every view and gather prepared
in advance. No schedule built on that kernel and on this plan can beat the floor; when the floor
itself misses 0.5/d, reaching the target needs a better kernel or a plan with less waste, not less
overhead.

    python bench/bench_kernel_floor.py            # L=4096, H=8, D=64, float32, forward

Results go to ``bench/results/kernel-floor-cpu-<date>.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench_sparse import patterns_for
from headwise import attention
from headwise.measure import environment, time_interleaved, write_results
from headwise.ops.attention.blockwise import DEFAULT_BLOCK
from headwise.ops.attention.blockwise.fused import (
    FUSED,
    PanelGather,
    run_keys,
    run_mask,
    run_rows,
    take,
)
from headwise.ops.attention.blockwise.heads import group_heads
from headwise.ops.attention.blockwise.plan import Run, count, plan_for

RESULTS = Path(__file__).parent / "results"


def kernel_calls(q, k, v, pattern):
    """The fused-kernel calls blockwise makes for ``pattern``, as prepared argument tuples."""
    heads = q.shape[2]
    groups = group_heads(pattern, q.shape[1], k.shape[1], DEFAULT_BLOCK)
    calls = []
    for sub_pattern, subset in groups or [(pattern, list(range(heads)))]:
        qs, ks, vs = (t[:, :, subset].contiguous() for t in (q, k, v))
        plan = plan_for(sub_pattern, q.shape[1], k.shape[1], DEFAULT_BLOCK, "cpu")
        gather = PanelGather(plan, ks, vs)
        for panel in plan:
            k_panel, v_panel = (t.clone() for t in gather(panel))
            for item in panel.runs:
                if isinstance(item, Run):
                    for b in range(q.shape[0]):
                        calls.append(
                            (
                                run_rows(item, qs, b).contiguous(),
                                run_keys(item, k_panel, b),
                                run_keys(item, v_panel, b),
                                run_mask(item, q.dtype),
                            )
                        )
                elif count(item.keys):
                    mask = item.mask[None].to(q.dtype) if item.needs_mask else None
                    calls.append(
                        (
                            take(qs, item.rows).contiguous(),
                            take(k_panel, item.panel_keys),
                            take(v_panel, item.panel_keys),
                            mask,
                        )
                    )
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    shape = (1, args.length, args.heads, args.dim)
    q, k, v = (torch.randn(shape) for _ in range(3))
    env = environment(torch.device("cpu"))
    lines = ["# headwise kernel floor (CPU)\n"]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [
        f"- problem: B=1, L={args.length}, H={args.heads}, D={args.dim}, float32, forward; "
        f"median of {args.rounds} interleaved rounds",
        "- columns give speedup over dense SDPA / FLOP bound 1/d (target 0.5)",
        "",
        "| pattern | density | kernel calls | blockwise ms | floor ms | blockwise | floor |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    fused = FUSED
    with torch.no_grad():
        for name, pattern in patterns_for(args.length, args.heads):
            calls = kernel_calls(q, k, v, pattern)
            runs = {
                "dense": lambda: attention(q, k, v, backend="sdpa"),
                "blockwise": lambda p=pattern: attention(q, k, v, p, backend="blockwise"),
                "floor": lambda c=calls: [
                    fused(a, b, c_, 0.0, False, attn_mask=m) for a, b, c_, m in c
                ],
            }
            best = time_interleaved(runs, torch.device("cpu"), rounds=args.rounds)
            density = pattern.density(args.length, args.length)
            row = (
                f"| {name} | {density:.3f} | {len(calls)} | {best['blockwise'] * 1e3:.1f} | "
                f"{best['floor'] * 1e3:.1f} | {best['dense'] / best['blockwise'] * density:.2f} | "
                f"{best['dense'] / best['floor'] * density:.2f} |"
            )
            print(row, flush=True)
            lines.append(row)
    write_results(RESULTS, "kernel-floor-cpu", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
