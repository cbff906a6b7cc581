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
import contextlib
import dataclasses
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
from headwise.ops.attention.blockwise import plan as blockwise_plan
from headwise.ops.attention.blockwise.heads import group_heads, head_passes
from headwise.ops.attention.blockwise.plan import DEFAULT_BLOCK, plan_for
from headwise.ops.attention.native import build as native_build
from headwise.ops.attention.native import call as native_call
from headwise.ops.attention.native import plan as native_plan
from headwise.ops.attention.native.plan import _shared_tile_plan
from headwise.patterns import base as pattern_base

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


def _fresh_batches(kind: str, gen: torch.Generator):
    """Endless ``(cu_seqlens, causal)``, a new batch per call: ``"16k/10"``: 16384 tokens cut
    at 9 random places (language-model training on packed documents, causal); ``"bert"``: 32
    sequences of 32..512 tokens (Unpadded BERT, bidirectional)."""
    while True:
        if kind == "16k/10":
            cuts = torch.sort(torch.randperm(16383, generator=gen)[:9] + 1).values
            lengths = torch.cat([cuts, torch.tensor([16384])]).diff(prepend=torch.tensor([0]))
        else:
            lengths = torch.randint(32, 513, (32,), generator=gen)
        yield torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32), kind == "16k/10"


def _plan_seconds(cu: torch.Tensor, causal: bool) -> float:
    """Seconds to build the native plan of these documents (what a call with new ``cu_seqlens``
    builds before any attention; the caches are emptied first, so nothing is reused)."""
    _forget_plans()
    lengths = cu.diff().tolist()
    start = time.perf_counter()
    pattern = P.documents(lengths, causal=causal)
    total = int(cu[-1])
    for group, _ in head_passes(pattern, total, total, DEFAULT_BLOCK):
        _shared_tile_plan(group, total, total)
    return time.perf_counter() - start


def kernel_built_from(source: Path):
    """The native kernel compiled from another ``tiles.c`` (an earlier commit's, say), loaded
    beside this checkout's so that both are timed in the same process."""
    default = native_build.SOURCE
    native_build.SOURCE = source
    try:
        lib = native_build.build_library()
    finally:
        native_build.SOURCE = default
    if lib is None:
        raise SystemExit(f"--baseline-kernel: {source} does not build")
    return lib


@contextlib.contextmanager
def using_kernel(lib):
    """Native calls inside use ``lib`` (``None``: this checkout's kernel)."""
    default = native_call.library
    native_call.library = default if lib is None else lambda: lib
    try:
        yield
    finally:
        native_call.library = default


def bench_fresh_varlen(args, device, dtype, lines):
    """Packed training with new ``cu_seqlens`` every batch (no plan reused): the plan's share of
    an ``attention_varlen`` call, and packed headwise vs a loop of SDPA calls, one per document,
    timed round by round in the same run. Every candidate draws from its own copy of one batch
    sequence, so round r gives all of them the same batch (random batches differ in work by
    tens of percent; the order within a round is random). With ``--baseline-kernel``, the
    packed forward on another kernel build is one more candidate."""
    baseline = None if args.baseline_kernel is None else kernel_built_from(args.baseline_kernel)
    lines.append("\n## Fresh cu_seqlens every call: packed attention vs a per-document SDPA loop\n")
    lines.append(
        f"H={args.heads}, D={args.dim}, {args.dtype}; every call gets a new batch of documents, "
        "round r the same one for every candidate. plan share = native plan build / packed call; "
        "ratio = packed / SDPA loop (< 1: packed is faster). Medians over rounds, candidates "
        "interleaved.\n"
    )
    lines.append(
        "| batch | plan ms | packed fwd ms | loop fwd ms | fwd ratio | plan share fwd | "
        "packed fwd+bwd ms | loop fwd+bwd ms | fwd+bwd ratio | plan share fwd+bwd |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    against = []
    for kind in ("16k/10", "bert"):
        total = 16384 if kind == "16k/10" else 32 * 512
        data = [torch.randn(total, args.heads, args.dim, device=device, dtype=dtype) for _ in "qkv"]

        def draws(kind=kind):
            return _fresh_batches(kind, torch.Generator().manual_seed(0))

        def packed(grad, batches, data=data):
            cu, causal = next(batches)
            _forget_plans()  # another candidate had this batch in this round: no plan reused
            leaves = [t[: int(cu[-1])].detach().requires_grad_(grad) for t in data]
            return _run(
                lambda: attention_varlen(*leaves, cu.to(device), causal=causal), leaves, grad
            )

        def loop(grad, batches, data=data):
            cu, causal = next(batches)
            leaves = [t[: int(cu[-1])].detach().requires_grad_(grad) for t in data]

            def forward():
                outs = []
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
                    q, k, v = (t[a:b].transpose(0, 1)[None] for t in leaves)
                    out = torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=causal
                    )
                    outs.append(out[0].transpose(0, 1))
                return torch.cat(outs)

            return _run(forward, leaves, grad)

        candidates = {
            "plan": functools.partial(lambda batches: _plan_seconds(*next(batches)), draws()),
            "packed fwd": functools.partial(packed, False, draws()),
            "loop fwd": functools.partial(loop, False, draws()),
            "packed step": functools.partial(packed, True, draws()),
            "loop step": functools.partial(loop, True, draws()),
        }
        if baseline is not None:
            candidates["baseline fwd"] = functools.partial(
                _packed_forward, draws(), data, device, baseline
            )
        times = time_interleaved(candidates, device, rounds=args.repeats)
        ms = {name: seconds * 1e3 for name, seconds in times.items()}
        row = (
            f"| {kind} | {ms['plan']:.1f} | {ms['packed fwd']:.1f} | {ms['loop fwd']:.1f} | "
            f"{ms['packed fwd'] / ms['loop fwd']:.2f} | {ms['plan'] / ms['packed fwd']:.0%} | "
            f"{ms['packed step']:.1f} | {ms['loop step']:.1f} | "
            f"{ms['packed step'] / ms['loop step']:.2f} | {ms['plan'] / ms['packed step']:.0%} |"
        )
        print(row, flush=True)
        lines.append(row)
        if baseline is not None:
            against.append(
                f"| {kind} | {ms['packed fwd']:.1f} | {ms['baseline fwd']:.1f} | "
                f"{ms['packed fwd'] / ms['baseline fwd']:.3f} | {ms['loop fwd']:.1f} | "
                f"{ms['baseline fwd'] / ms['loop fwd']:.2f} |"
            )
    if against:
        lines.append(
            f"\nThis kernel vs the baseline build ({args.baseline_kernel.name}), packed forward "
            "in the same rounds (< 1: this one is faster):\n"
        )
        lines.append(
            "| batch | packed fwd ms | baseline kernel fwd ms | ratio | loop fwd ms | "
            "baseline fwd ratio |"
        )
        lines.append("|---|---|---|---|---|---|")
        lines += against
        print("\n".join(lines[-len(against) - 2 :]), flush=True)


def _packed_forward(batches, data, device, lib) -> None:
    """``attention_varlen`` forward on the next batch of ``batches``, on the kernel ``lib``."""
    cu, causal = next(batches)
    _forget_plans()
    with torch.no_grad(), using_kernel(lib):
        attention_varlen(*(t[: int(cu[-1])] for t in data), cu.to(device), causal=causal)


def _forget_plans():
    """Empty every plan and layout cache, so the next use builds from scratch."""
    for cache in (native_plan.PLANS, blockwise_plan.PLANS):
        cache._plans.clear()
        cache._total = 0
    group_heads.cache_clear()
    pattern_base._block_layout.cache_clear()


def _plan_bytes(plan, seen: set[int] | None = None) -> int:
    """Bytes of the tensors a plan (a dataclass, or a tuple of them) holds, each tensor once
    (groups of a blockwise plan may share one mask)."""
    seen = set() if seen is None else seen
    if isinstance(plan, torch.Tensor):
        if id(plan) in seen:
            return 0
        seen.add(id(plan))
        return plan.numel() * plan.element_size()
    if isinstance(plan, tuple | list):
        return sum(_plan_bytes(x, seen) for x in plan)
    if dataclasses.is_dataclass(plan):
        return sum(_plan_bytes(getattr(plan, f.name), seen) for f in dataclasses.fields(plan))
    return 0


def bench_plan_build(args, device, lines):
    """First use of a (pattern, length): the plan each backend builds before its first call
    (head grouping and block layouts included), its time, the peak memory while it is built and
    the plan's own size."""
    windows = P.per_head([P.sliding_window(64 * (h + 1)) for h in range(16)])
    docs = P.documents([32768], causal=True)
    gen = torch.Generator().manual_seed(1)
    cases = [
        ("per_head(16 windows 64..1024)", windows, 16384, "native"),
        ("per_head(16 windows 64..1024)", windows, 16384, "blockwise"),
        ("documents([32768], causal)", docs, 32768, "native"),
        ("documents([32768], causal)", docs, 32768, "blockwise"),
    ]
    for kind in ("16k/10", "bert"):
        cu, causal = next(_fresh_batches(kind, gen))
        fresh = P.documents(cu.diff().tolist(), causal=causal)
        cases.append((f"varlen {kind} (fresh cu_seqlens)", fresh, int(cu[-1]), "native"))
    lines.append("\n## Plan build on first use of a (pattern, length)\n")
    lines.append(
        "Time and peak memory to build everything a backend needs before its first forward "
        "call (head grouping, block layouts, plans), from empty caches, medians of "
        f"{args.repeats} builds; CPU s = process time (all threads), which a loaded machine "
        "inflates less than wall time; peak = most memory in use while building, the plan "
        "included; temporaries = peak - plan.\n"
    )
    lines.append(
        "| pattern | L | backend | build s | CPU s | peak MiB | plan MiB | temporaries / plan |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, pattern, length, backend in cases:
        built, wall, cpu, peaks = [], [], [], []

        def build(pattern=pattern, length=length, backend=backend, built=built, wall=wall, cpu=cpu):
            start, start_cpu = time.perf_counter(), time.process_time()
            for group, _ in head_passes(pattern, length, length, DEFAULT_BLOCK):
                if backend == "native":
                    built.append(_shared_tile_plan(group, length, length))
                else:
                    built.append(plan_for(group, length, length, DEFAULT_BLOCK, str(device)))
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)

        for _ in range(args.repeats):
            # emptied before the measurement starts, so that freeing the last plans does not
            # hide memory the new build takes
            _forget_plans()
            built.clear()
            peaks.append(peak_memory(build, device))
        seconds, cpu_seconds = (sorted(t)[len(t) // 2] for t in (wall, cpu))
        peak, size = max(peaks), _plan_bytes(built)
        row = (
            f"| {name} | {length} | {backend} | {seconds:.3f} | {cpu_seconds:.3f} | "
            f"{peak / 2**20:.1f} | {size / 2**20:.1f} | {max(0, peak - size) / max(size, 1):.2f} |"
        )
        print(row, flush=True)
        lines.append(row)


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

    def __init__(
        self, width: int, heads: int, pattern: P.Pattern | None, backend: str, dropout: float = 0.0
    ):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = MultiHeadAttention(
            width, heads, pattern=pattern, backend=backend, dropout=dropout
        )
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def bench_compiled(args, device, dtype, lines, env):
    """Eager vs ``torch.compile`` (inductor) step time of one transformer block per pattern,
    with dynamo's graph breaks counted (``torch._dynamo.explain``); also written on its own to
    ``compile-<device>-<date>.md`` (``compile-dropout-...`` with ``--compile-dropout``: attention
    dropout in training mode, a new mask every call)."""
    side = math.isqrt(args.compile_length)
    length, width = side * side, args.heads * args.dim
    windows = [P.sliding_window(w) for w in (16, 32, 64, 128)]
    patterns = {
        "causal": P.causal(),
        "sliding_window(64)": P.sliding_window(64),
        "per_head(4 windows)": P.per_head([windows[h % 4] for h in range(args.heads)]),
        f"neighborhood({side}x{side}, 7)": P.neighborhood((side, side), 7),
        "documents(4, causal)": P.documents([length // 4] * 4, causal=True),
    }
    common = ["causal", "sliding_window(64)", "per_head(4 windows)"]
    rows = {
        "auto": [*common, f"neighborhood({side}x{side}, 7)"],
        "blockwise": [*common, "documents(4, causal)"],
    }
    cases = [(name, patterns[name], kind) for kind in args.compile_backends for name in rows[kind]]
    section = [
        f"\n## torch.compile: one transformer block (B={args.batch}, L={length}, E={width}, "
        f"H={args.heads}, {args.dtype}, attention dropout {args.compile_dropout:g})\n",
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
        block = _Block(width, args.heads, pattern, backend, args.compile_dropout).to(device, dtype)
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
    stem = "compile-dropout" if args.compile_dropout else "compile"
    write_results(RESULTS, f"{stem}-{device.type}", env, "\n".join(header + section) + "\n")


def _load(when: str) -> str:
    """A results-file line: the machine's load average (timings on a shared machine are
    noisy; the interleaved ratios less so)."""
    one, five, fifteen = os.getloadavg()
    return f"- load average {when} (1/5/15 min): {one:.1f} / {five:.1f} / {fifteen:.1f}"


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
        "--compile-backends",
        nargs="+",
        default=["auto", "blockwise"],
        choices=["auto", "blockwise"],
        help="whose rows the compiled-block section times",
    )
    parser.add_argument(
        "--compile-dropout",
        type=float,
        default=0.0,
        help="attention dropout of the compiled blocks (training mode)",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["lengths", "auto", "packed", "fresh", "plans", "compile", "compiled"],
    )
    parser.add_argument("--name", default="attention", help="results file stem")
    parser.add_argument(
        "--baseline-kernel",
        type=Path,
        help="another tiles.c (e.g. `git show REV:src/headwise/ops/attention/native/tiles.c`) "
        "whose packed forward the fresh section times too, on the same batches",
    )
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = environment(device)
    lines = ["# headwise softmax attention benchmark\n"]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines.append(_load("at the start"))
    lines.append("")
    print("\n".join(lines), flush=True)
    if "lengths" not in args.skip:
        bench_lengths(args, device, dtype, lines)
    if "auto" not in args.skip:
        bench_auto(args, device, dtype, lines)
    if "packed" not in args.skip:
        bench_packed(args, device, dtype, lines)
    if "fresh" not in args.skip:
        bench_fresh_varlen(args, device, dtype, lines)
    if "plans" not in args.skip:
        bench_plan_build(args, device, lines)
    if "compile" not in args.skip:
        bench_recompiles(args, device, dtype, lines)
    if "compiled" not in args.skip:
        bench_compiled(args, device, dtype, lines, env)
    lines.insert(lines.index(""), _load("at the end"))
    suffix = "-backward" if args.backward else ""
    write_results(RESULTS, f"{args.name}-{device.type}{suffix}", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
