"""Distributed attention benchmark: ring attention on P local gloo ranks vs one process, plus a
paper model of communication vs compute for 8-64 ranks.

Measured part (this machine): causal self-attention, forward+backward, at growing lengths. The
baseline, measured in the same run, is one process running ``headwise.attention`` with the same
``blockwise`` kernel the ring runs per block, and dense SDPA for context. Every process (each
rank and the baseline) gets ``--threads`` CPU threads, so the ring's speed-up is what P times the
compute buys after communication; per-rank peak memory shows the ``O(L / P)`` footprint.

Paper part: per step of ring attention each rank sends one K/V shard, ``2 (L/P) H_kv D`` elements,
while it computes ``4 (L/P)^2 H D`` FLOPs (two matmuls; half under zig-zag causal off the
diagonal). Ulysses moves ``(P-1)/P`` of this rank's q, k, v and out shards in 4 all-to-alls,
``(L/P) (2H + 2H_kv) D`` elements.
The table gives bytes per step, FLOPs per step and the shard length ``L/P`` above which compute
hides the transfer for a stated accelerator and link (assumptions, not measurements).

    python bench/bench_distributed.py                    # CPU, gloo, 2 ranks
    python bench/bench_distributed.py --lengths 1024 2048 4096 8192 --world 2 4

Results go to ``bench/results/distributed-<device>-<date>.md`` with device, versions and date.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import headwise
from headwise import patterns as P
from headwise.distributed import launch, ring_attention, shard_sequence
from headwise.measure import environment, peak_memory, time_call, write_results

RESULTS = Path(__file__).parent / "results"


def _inputs(length, args):
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, length, args.heads, args.dim)
    return [torch.randn(shape, generator=gen) for _ in range(3)]


def _fwd_bwd(fn, tensors):
    leaves = [t.detach().requires_grad_() for t in tensors]

    def run():
        out = fn(*leaves)
        out.sum().backward()
        for t in leaves:
            t.grad = None

    return run


def _rank_bench(rank, world, lengths, args):
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    rows = []
    for length in lengths:
        shards = [shard_sequence(t) for t in _inputs(length, args)]

        def ring(q, k, v, length=length):
            return ring_attention(q, k, v, P.causal(), seq_len=length)

        run = _fwd_bwd(ring, shards)
        torch.distributed.barrier()
        seconds = time_call(run, cpu, repeats=args.repeats)
        torch.distributed.barrier()
        peak = peak_memory(run, cpu)
        rows.append((length, seconds, peak))
    return rows


def _single(length, args, backend):
    cpu = torch.device("cpu")
    run = _fwd_bwd(
        lambda q, k, v: headwise.attention(q, k, v, P.causal(), backend=backend),
        _inputs(length, args),
    )
    return time_call(run, cpu, repeats=args.repeats), peak_memory(run, cpu)


def measured(args, lines):
    torch.set_num_threads(args.threads)
    lines.append("## Measured: ring attention vs one process (causal, forward+backward)\n")
    lines.append(
        f"B={args.batch}, H={args.heads}, D={args.dim}, float32, {args.threads} thread(s) per "
        "process, gloo over loopback, zig-zag layout. Peak memory is per process (allocator "
        "high-water mark above the start, inputs excluded). speed-up = one-process blockwise time "
        "/ slowest rank's time.\n"
    )
    lines.append(
        "| L | ranks | ring ms (slowest rank) | ring peak MiB (max rank) "
        "| one process blockwise ms | one process peak MiB | SDPA ms | speed-up vs blockwise |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    single = {n: (_single(n, args, "blockwise"), _single(n, args, "sdpa")) for n in args.lengths}
    for world in args.world:
        results = launch(_rank_bench, world, args.lengths, args, timeout=3000)
        for i, length in enumerate(args.lengths):
            ring_s = max(r.value[i][1] for r in results)
            ring_peak = max(r.value[i][2] for r in results)
            (one_s, one_peak), (sdpa_s, _) = single[length]
            lines.append(
                f"| {length} | {world} | {ring_s * 1e3:.1f} | {ring_peak / 2**20:.1f} | "
                f"{one_s * 1e3:.1f} | {one_peak / 2**20:.1f} | {sdpa_s * 1e3:.1f} | "
                f"{one_s / ring_s:.2f}x |"
            )
            print(lines[-1], flush=True)
    lines.append("")


def paper(args, lines):
    length, heads, kv_heads, dim, nbytes = 131072, 32, 8, 128, 2
    flops, link = args.flops * 1e12, args.link * 1e9
    lines.append("## Paper model: communication vs compute per rank, 8-64 ranks\n")
    lines.append(
        f"L={length}, H={heads}, H_kv={kv_heads}, D={dim}, bf16, batch 1, forward. Assumed "
        f"accelerator {args.flops:g} TFLOP/s sustained, link {args.link:g} GB/s per direction "
        "(assumptions). Ring step: send one K/V shard, compute one causal block pair (zig-zag: "
        "half a full block off the diagonal). Ulysses: 4 all-to-alls (q, k, v, out) per layer. "
        "`L/P for overlap` is the shard length at which a ring step's compute time equals its "
        "transfer time (independent of P).\n"
    )
    lines.append(
        "| P | L/P | ring bytes/step | ring FLOPs/step | ring compute ms | ring comm ms | "
        "comm hidden? | ring total bytes/rank | Ulysses bytes/rank | L/P for overlap |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for world in (8, 16, 32, 64):
        shard = length // world
        step_bytes = 2 * shard * kv_heads * dim * nbytes
        step_flops = 4 * shard * shard * heads * dim / 2
        compute_ms, comm_ms = step_flops / flops * 1e3, step_bytes / link * 1e3
        ulysses = (world - 1) / world * shard * (2 * heads + 2 * kv_heads) * dim * nbytes
        # compute(s) = 2 s^2 H D / F equals bytes(s) = 2 s H_kv D b / W at s = H_kv b F / (H W)
        overlap = kv_heads * nbytes * flops / (heads * link)
        lines.append(
            f"| {world} | {shard} | {step_bytes / 2**20:.1f} MiB | {step_flops / 1e12:.2f} T | "
            f"{compute_ms:.2f} | {comm_ms:.2f} | {'yes' if compute_ms >= comm_ms else 'no'} | "
            f"{(world - 1) * step_bytes / 2**20:.0f} MiB | {ulysses / 2**20:.0f} MiB | "
            f"{overlap:.0f} |"
        )
    lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--world", type=int, nargs="+", default=[2])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flops", type=float, default=400.0, help="TFLOP/s for the paper model")
    parser.add_argument("--link", type=float, default=50.0, help="GB/s for the paper model")
    args = parser.parse_args()
    env = environment(torch.device("cpu"))
    lines = ["# Distributed attention benchmark\n"]
    lines += [f"- {k}: {v}" for k, v in env.items()] + [""]
    start = time.perf_counter()
    measured(args, lines)
    paper(args, lines)
    lines.append(f"Total benchmark time {time.perf_counter() - start:.0f} s.")
    print("\n".join(lines))
    write_results(RESULTS, "distributed-cpu", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
