"""Softmax attention benchmark: every pattern x backend against dense SDPA, measured in one run.

For each length it times dense SDPA first (the baseline), then every (pattern, backend) pair that
can serve the problem, and prints time, peak memory and the ratio to dense SDPA at that length.
It times ``auto`` against the fastest backend able to serve each pattern, in the same rounds.
Then it compares a padded batch (SDPA + key-padding bias) with the same batch packed
(``attention_varlen``), records FlexAttention's compilation behaviour, and times one
transformer block per pattern eager and under ``torch.compile``, with its graph breaks.

    python bench/bench_attention.py                      # CPU defaults
    python bench/bench_attention.py --lengths 1024 4096 16384 --backward --device cuda

Results go to ``bench/results/attention-<device>[-backward]-<date>.md`` with device, versions
and date.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from pathlib import Path

import torch
import torch._dynamo

import headwise.patterns as P
from headwise import attention, attention_varlen, explain, pack
from headwise.layers import MultiHeadAttention
from headwise.measure import (
    environment,
    peak_memory,
    progress,
    time_call,
    time_interleaved,
    write_results,
)

RESULTS = Path(__file__).parent / "results"


def patterns_for(length: int, heads: int) -> dict[str, P.Pattern | None]:
    gen = torch.Generator().manual_seed(0)
    blocks = -(-length // 128)
    layout = (torch.rand(blocks, blocks, generator=gen) < 0.1) | torch.eye(blocks, dtype=torch.bool)
    docs = [length // 8] * 7 + [length - 7 * (length // 8)]
    mixed = [
        P.sliding_window(256) | P.sinks(4),
        P.sliding_window(1024),
        P.causal(),
        P.strided(4, 3, block=64) & P.causal(),
    ]
    return {
        "dense": None,
        "causal": P.causal(),
        "window(256)": P.sliding_window(256),
        "window(256)|sinks(4)": P.sliding_window(256) | P.sinks(4),
        "documents(8, causal)": P.documents(docs, causal=True),
        "block_sparse(10%)": P.block_sparse(layout, 128),
        "per_head(mixed)": P.per_head([mixed[h % len(mixed)] for h in range(heads)]),
    }


def bench_lengths(args, device, dtype, lines):
    lines.append("## Patterns vs dense SDPA\n")
    mode = "forward+backward" if args.backward else "forward"
    lines.append(
        f"B={args.batch}, H={args.heads}, D={args.dim}, {args.dtype}, {mode}. "
        "ratio = time / dense SDPA time at the same length (lower is faster).\n"
    )
    lines.append("| L | pattern | density | backend | ms | peak MiB | ratio vs dense SDPA |")
    lines.append("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        shape = (args.batch, length, args.heads, args.dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        leaves = [t.clone().requires_grad_(args.backward) for t in (q, k, v)]
        baseline = None
        for name, pattern in patterns_for(length, args.heads).items():
            density = 1.0 if pattern is None else pattern.density(length, length)
            for backend in args.backends:
                if backend == "reference" and length > args.reference_max:
                    continue
                if explain(*leaves, pattern, backend=(backend,)).backend is None:
                    continue

                def call(pattern=pattern, backend=backend, leaves=leaves):
                    if not args.backward:
                        with torch.no_grad():
                            return attention(*leaves, pattern, backend=backend)
                    out = attention(*leaves, pattern, backend=backend)
                    return torch.autograd.grad(out.sum(), leaves)

                seconds = time_call(call, device, repeats=args.repeats)
                peak = peak_memory(call, device)
                if baseline is None:
                    baseline = seconds  # dense SDPA comes first
                row = (
                    f"| {length} | {name} | {density:.3f} | {backend} | {seconds * 1e3:.1f} | "
                    f"{peak / 2**20:.1f} | {seconds / baseline:.2f} |"
                )
                print(row, flush=True)
                lines.append(row)


def bench_auto(args, device, dtype, lines):
    """``auto`` against the fastest backend able to serve, timed in the same rounds: speed of
    auto / speed of the fastest (goal >= 0.97). ``explain`` first times the candidates of a new
    class (once per class and machine), outside the rounds, and tells where the choice came
    from."""
    lines.append("\n## auto vs the fastest backend\n")
    mode = "forward+backward" if args.backward else "forward"
    lines.append(
        f"B={args.batch}, H={args.heads}, D={args.dim}, {args.dtype}, {mode}, {args.repeats} "
        "rounds. auto / fastest = fastest backend's time / auto's time (speeds; goal >= 0.97); "
        "pick / fastest = the same for the backend auto picked, called by name in the same "
        "rounds (what is left is auto's dispatch and the noise between two timings of one "
        "backend); source: where auto's choice came from (measured, cached, shorter, fixed "
        "rule).\n"
    )
    lines.append(
        "| L | pattern | auto picks | source | auto ms | fastest | ms | auto / fastest | "
        "pick / fastest |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        shape = (args.batch, length, args.heads, args.dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        leaves = [t.clone().requires_grad_(args.backward) for t in (q, k, v)]
        for name, pattern in patterns_for(length, args.heads).items():
            serving = [
                backend
                for backend in args.backends
                if (backend != "reference" or length <= args.reference_max)
                and explain(*leaves, pattern, backend=(backend,)).backend is not None
            ]

            def call(pattern=pattern, backend="auto", leaves=leaves):
                if not args.backward:
                    with torch.no_grad():
                        return attention(*leaves, pattern, backend=backend)
                out = attention(*leaves, pattern, backend=backend)
                return torch.autograd.grad(out.sum(), leaves)

            with torch.set_grad_enabled(args.backward):
                choice = explain(*leaves, pattern)  # times the candidates of a new class
            fns = {"auto": call, **{b: functools.partial(call, backend=b) for b in serving}}
            times = time_interleaved(fns, device, rounds=args.repeats)
            fastest = min(serving, key=times.get)
            picked = times.get(choice.backend)  # None when --backends leaves it out
            pick = "-" if picked is None else f"{times[fastest] / picked:.2f}"
            cell = name.replace("|", "&#124;")  # a pipe would split the Markdown cell
            row = (
                f"| {length} | {cell} | {choice.backend} | {choice.source} | "
                f"{times['auto'] * 1e3:.1f} | {fastest} | {times[fastest] * 1e3:.1f} | "
                f"{times[fastest] / times['auto']:.2f} | {pick} |"
            )
            print(row, flush=True)
            lines.append(row)


def bench_packed(args, device, dtype, lines):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, 513, (32,), generator=gen)
    max_len = int(lengths.max())
    mask = (torch.arange(max_len)[None] < lengths[:, None]).to(device)
    shape = (32, max_len, args.heads, args.dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    bias = torch.zeros(32, 1, 1, max_len, device=device, dtype=dtype)
    bias = bias.masked_fill(~mask[:, None, None], float("-inf"))
    packed = [pack(t, mask) for t in (q, k, v)]
    cu = packed[0].cu_seqlens
    real = int(lengths.sum())
    lines.append("\n## Padded vs packed (32 sequences, lengths uniform in 32..512)\n")
    lines.append(f"{real} real tokens of {32 * max_len} padded ({real / (32 * max_len):.0%}).\n")
    lines.append("| mode | backend | fwd ms | fwd+bwd ms | ratio fwd+bwd vs padded SDPA |")
    lines.append("|---|---|---|---|---|")

    def padded(grad):
        leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        return lambda: _run(lambda: attention(*leaves, bias=bias), leaves, grad)

    def unpadded(grad):
        leaves = [p.tokens.clone().requires_grad_(grad) for p in packed]
        return lambda: _run(lambda: attention_varlen(*leaves, cu), leaves, grad)

    base = None
    for mode, make in (("padded + key-padding bias", padded), ("packed (cu_seqlens)", unpadded)):
        fwd = time_call(make(False), device, repeats=args.repeats)
        step = time_call(make(True), device, repeats=args.repeats)
        base = base or step
        choice = "sdpa" if mode.startswith("padded") else "auto (native on CPU)"
        row = f"| {mode} | {choice} | {fwd * 1e3:.1f} | {step * 1e3:.1f} | {step / base:.2f} |"
        print(row, flush=True)
        lines.append(row)


def _run(forward, leaves, grad):
    if not grad:
        with torch.no_grad():
            return forward()
    out = forward()
    return torch.autograd.grad(out.sum(), leaves)


def bench_recompiles(args, device, dtype, lines):
    """How often compiled FlexAttention recompiles as shapes change."""
    lines.append("\n## FlexAttention compilation (torch.compile, dynamic=False)\n")
    lines.append("| call | seconds | new graphs compiled |")
    lines.append("|---|---|---|")
    counters = torch._dynamo.utils.counters["stats"]
    pattern = P.sliding_window(64)
    for label, length in (
        ("first call, L=512", 512),
        ("same shape again", 512),
        ("new length L=640", 640),
        ("back to L=512", 512),
        ("new length L=768", 768),
    ):
        q = torch.randn(1, length, args.heads, args.dim, device=device, dtype=dtype)
        before = counters["unique_graphs"]
        start = time.perf_counter()
        with torch.no_grad():
            attention(q, q, q, pattern, backend="flex")
        if device.type == "cuda":
            torch.cuda.synchronize()
        compiled = counters["unique_graphs"] - before
        row = f"| {label} | {time.perf_counter() - start:.2f} | {compiled} |"
        print(row, flush=True)
        lines.append(row)


class _Block(torch.nn.Module):
    """A pre-norm transformer block: ``x + mha(norm(x))``, then ``+ mlp(norm(.))``."""

    def __init__(self, width: int, heads: int, pattern: P.Pattern | None, backend: str):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = MultiHeadAttention(width, heads, pattern=pattern, backend=backend)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def bench_compiled(args, device, dtype, lines, env):
    """Eager vs ``torch.compile`` (inductor) step time of one transformer block per pattern,
    with dynamo's graph breaks counted (``torch._dynamo.explain``); also written on its own to
    ``compile-<device>-<date>.md``."""
    side = math.isqrt(args.compile_length)
    length, width = side * side, args.heads * args.dim
    windows = [P.sliding_window(w) for w in (16, 32, 64, 128)]
    cases = [
        ("causal", P.causal(), "auto"),
        ("sliding_window(64)", P.sliding_window(64), "auto"),
        ("per_head(4 windows)", P.per_head([windows[h % 4] for h in range(args.heads)]), "auto"),
        (f"neighborhood({side}x{side}, 7)", P.neighborhood((side, side), 7), "auto"),
        ("sliding_window(64)", P.sliding_window(64), "blockwise"),
    ]
    section = [
        f"\n## torch.compile: one transformer block (B={args.batch}, L={length}, E={width}, "
        f"H={args.heads}, {args.dtype})\n",
        "Pre-norm block (LayerNorm, MultiHeadAttention, LayerNorm, MLP 4E). step = forward + "
        "backward of the sum; forward under no_grad. Eager and compiled (inductor) timed in "
        f"turn, {args.repeats} rounds, medians. ratio = compiled / eager (lower is faster). "
        "breaks: dynamo graph breaks of the training step. Load average at the start: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine is noisy).\n",
        "| pattern | backend | breaks | graphs | compile s | fwd eager ms | fwd compiled ms | "
        "fwd ratio | step eager ms | step compiled ms | step ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(section), flush=True)
    bar = progress(len(cases), "compiled blocks")
    for name, pattern, backend in cases:
        torch.manual_seed(0)
        block = _Block(width, args.heads, pattern, backend).to(device, dtype)
        x = torch.randn(args.batch, length, width, device=device, dtype=dtype)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda x, block=block: block(x).sum())(x)
        torch._dynamo.reset()
        compiled = torch.compile(block)

        params = list(block.parameters())
        calls = {}
        for mode, grad in (("fwd", False), ("step", True)):
            for kind, fn in (("eager", block), ("compiled", compiled)):
                calls[f"{mode} {kind}"] = functools.partial(
                    _run, functools.partial(fn, x), params, grad
                )
        start = time.perf_counter()
        calls["fwd compiled"]()
        calls["step compiled"]()
        compile_seconds = time.perf_counter() - start
        times = time_interleaved(calls, device, rounds=args.repeats)
        ms = {key: value * 1e3 for key, value in times.items()}
        row = (
            f"| {name} | {backend} | {explained.graph_break_count} | {explained.graph_count} | "
            f"{compile_seconds:.0f} | {ms['fwd eager']:.1f} | {ms['fwd compiled']:.1f} | "
            f"{ms['fwd compiled'] / ms['fwd eager']:.2f} | {ms['step eager']:.1f} | "
            f"{ms['step compiled']:.1f} | {ms['step compiled'] / ms['step eager']:.2f} |"
        )
        section.append(row)
        if bar is None:
            print(row, flush=True)
        else:
            bar.write(row)
            bar.update()
    if bar is not None:
        bar.close()
    torch._dynamo.reset()
    lines += section
    header = ["# headwise: eager vs torch.compile\n", *(f"- {k}: {v}" for k, v in env.items())]
    write_results(RESULTS, f"compile-{device.type}", env, "\n".join(header + section) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backends", nargs="+", default=["sdpa", "flex", "native", "blockwise", "reference"]
    )
    parser.add_argument("--backward", action="store_true", help="time forward+backward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-max", type=int, default=4096)
    parser.add_argument("--compile-length", type=int, default=1024, help="a square number")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["lengths", "auto", "packed", "compile", "compiled"],
    )
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = environment(device)
    lines = ["# headwise softmax attention benchmark\n"]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines.append("")
    print("\n".join(lines), flush=True)
    if "lengths" not in args.skip:
        bench_lengths(args, device, dtype, lines)
    if "auto" not in args.skip:
        bench_auto(args, device, dtype, lines)
    if "packed" not in args.skip:
        bench_packed(args, device, dtype, lines)
    if "compile" not in args.skip:
        bench_recompiles(args, device, dtype, lines)
    if "compiled" not in args.skip:
        bench_compiled(args, device, dtype, lines, env)
    suffix = "-backward" if args.backward else ""
    write_results(RESULTS, f"attention-{device.type}{suffix}", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
