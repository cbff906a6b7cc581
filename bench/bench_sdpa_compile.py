"""Causal attention on the sdpa backend: eager cost of its custom operators and torch.compile.

Eager: ``attention(q, k, v, causal(), backend="sdpa")`` (the operators
``headwise::sdpa_attention_fwd``/``_bwd``, non-finite rule inside) against the path it replaces
(``has_non_finite`` then ``F.scaled_dot_product_attention(is_causal=True)``), forward and
forward+backward, timed in turn round by round. Compiled: one transformer block (bench_attention's)
with causal attention on ``sdpa`` and, for comparison, on ``native`` (the other custom operator),
eager vs ``torch.compile`` with graph breaks counted. Writes ``<name>-cpu-<date>.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import torch
import torch._dynamo
import torch.nn.functional as F

import headwise.patterns as P
from bench_attention import RESULTS, _Block, _run
from headwise import attention
from headwise.measure import environment, progress, time_interleaved, write_results
from headwise.ops.attention.nonfinite import has_non_finite


def _replaced(q, k, v):
    """The sdpa path before the operators: the api's check, then SDPA."""
    has_non_finite(q, k, v)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    )
    return out.transpose(1, 2)


def bench_eager(args, lines):
    lines += [
        f"\n## Eager causal attention (B=1, H={args.heads}, D={args.dim}, float32)\n",
        f"Medians of {args.repeats} interleaved rounds. ratio = operator / replaced path.\n",
        "| L | pass | replaced ms | operator ms | ratio |",
        "|---|---|---|---|---|",
    ]
    for length in args.lengths:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(1, length, args.heads, args.dim, generator=gen).requires_grad_()
            for _ in range(3)
        )
        calls = {}
        for mode, grad in (("fwd", False), ("fwd+bwd", True)):
            calls[f"{mode} replaced"] = functools.partial(
                _run, functools.partial(_replaced, q, k, v), (q, k, v), grad
            )
            operator = functools.partial(attention, q, k, v, P.causal(), backend="sdpa")
            calls[f"{mode} operator"] = functools.partial(_run, operator, (q, k, v), grad)
        ms = {
            key: t * 1e3
            for key, t in time_interleaved(calls, q.device, rounds=args.repeats).items()
        }
        for mode in ("fwd", "fwd+bwd"):
            old, new = ms[f"{mode} replaced"], ms[f"{mode} operator"]
            lines.append(f"| {length} | {mode} | {old:.1f} | {new:.1f} | {new / old:.2f} |")
            print(lines[-1], flush=True)


def bench_compiled(args, lines):
    width = args.heads * args.dim
    lines += [
        f"\n## torch.compile: one transformer block, causal (B=1, L={args.compile_length}, "
        f"E={width}, H={args.heads}, float32)\n",
        "Pre-norm block (LayerNorm, MultiHeadAttention, LayerNorm, MLP 4E). step = forward + "
        "backward of the sum; forward under no_grad. Eager and compiled (inductor) timed in "
        f"turn (all backends in one rotation), {args.repeats} rounds, medians. ratio = compiled "
        "/ eager.\n",
        "| backend | breaks | graphs | compile s | fwd eager ms | fwd compiled ms | fwd ratio | "
        "step eager ms | step compiled ms | step ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    bar = progress(len(args.compile_backends), "compiling blocks")
    calls, graphs, compile_seconds = {}, {}, {}
    x = torch.randn(1, args.compile_length, width)
    for backend in args.compile_backends:
        torch.manual_seed(0)
        block = _Block(width, args.heads, P.causal(), backend)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda x, block=block: block(x).sum())(x)
        graphs[backend] = explained.graph_break_count, explained.graph_count
        torch._dynamo.reset()
        compiled = torch.compile(block)
        params = list(block.parameters())
        for mode, grad in (("fwd", False), ("step", True)):
            for kind, fn in (("eager", block), ("compiled", compiled)):
                calls[f"{backend} {mode} {kind}"] = functools.partial(
                    _run, functools.partial(fn, x), params, grad
                )
        start = time.perf_counter()
        calls[f"{backend} fwd compiled"]()
        calls[f"{backend} step compiled"]()
        compile_seconds[backend] = time.perf_counter() - start
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    # every block, eager and compiled, in one interleaved timing: the backends compare too
    times = time_interleaved(calls, x.device, rounds=args.repeats)
    ms = {key: t * 1e3 for key, t in times.items()}
    for backend in args.compile_backends:
        breaks, count = graphs[backend]
        fwd = ms[f"{backend} fwd eager"], ms[f"{backend} fwd compiled"]
        step = ms[f"{backend} step eager"], ms[f"{backend} step compiled"]
        lines.append(
            f"| {backend} | {breaks} | {count} | {compile_seconds[backend]:.0f} | {fwd[0]:.1f} | "
            f"{fwd[1]:.1f} | {fwd[1] / fwd[0]:.2f} | {step[0]:.1f} | {step[1]:.1f} | "
            f"{step[1] / step[0]:.2f} |"
        )
        print(lines[-1], flush=True)
    torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-length", type=int, default=1024)
    parser.add_argument("--compile-heads", type=int, default=4)
    parser.add_argument("--compile-backends", nargs="*", default=["sdpa", "native"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["eager", "compiled"])
    parser.add_argument("--name", default="sdpa-compile", help="results file stem")
    args = parser.parse_args()
    env = environment(torch.device("cpu"))
    lines = ["# headwise: causal attention on sdpa's custom operators\n"]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines.append(
        f"- load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        "(a shared machine: 4 engineers at once)"
    )
    print("\n".join(lines), flush=True)
    if "eager" not in args.skip:
        bench_eager(args, lines)
    if "compiled" not in args.skip:
        bench_compiled(argparse.Namespace(**{**vars(args), "heads": args.compile_heads}), lines)
    write_results(RESULTS, f"{args.name}-cpu", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
