"""Linear attention benchmark: constant speed in length, Based's training step, tokens/s vs SDPA.

Three parts, one results file:

1. Per-token time from 1k to 64k tokens at ``B = 1`` (``--heads`` 8, ``--dim`` 64, TNL decay,
   ``backend="chunk"``), forward and forward+backward: every round times every length in turn
   (lengths from ``--long`` up only in the first ``--long-rounds`` rounds), medians, ratio to the
   first length. Lightning Attention-2's claim is a flat line; the target is within +-10%.
2. One training step (forward, backward, AdamW) on ``(64, 64, 64)`` inputs: ``BasedAttention``
   (default: feature dim 16, window 64; and Zoology's Figure 2 form: feature dim 8, no window)
   against 1-head softmax ``MultiHeadAttention`` of the same width, as a layer and inside a
   2-layer pre-LN model with MLPs and an LM head (vocab 512, Zoology's MQAR setting). Target:
   within 2x of softmax.
3. tokens/s vs length at a fixed token budget: the chunked path (``--heads`` 4 there), the
   quadratic reference up to ``--max-quadratic`` and causal SDPA up to ``--max-sdpa``.

    python bench/bench_linear.py                                  # CPU defaults
    python bench/bench_linear.py --device cuda --backend triton --backward

Results go to ``bench/results/linear-<device>-<date>.md`` with device, versions and date.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from headwise.layers import BasedAttention, MultiHeadAttention
from headwise.measure import (
    environment,
    progress,
    seconds,
    time_call,
    time_interleaved,
    write_results,
)
from headwise.ops.linear import linear_attention, tnl_decay

RESULTS = Path(__file__).parent / "results"


def per_token(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Part 1: per-token time of ``linear_attention`` at B = 1 across lengths, rounds in turn."""
    heads, dim = args.sweep_heads, args.dim
    decay = tnl_decay(heads).to(device)
    lengths = args.sweep_lengths
    inputs = {
        n: [torch.randn(1, n, heads, dim, device=device) * 0.1 for _ in range(3)] for n in lengths
    }
    lines = [
        f"## 1. Per-token time vs length (B=1, H={heads}, D=E={dim}, TNL decay, "
        f"chunk {args.chunk_size}, backend {args.backend}, float32)\n",
        f"Rounds: {args.rounds} (lengths >= {args.long}: {args.long_rounds}); every round times "
        "every length in turn; medians. Ratio = per-token time / per-token time at "
        f"{lengths[0]}.\n",
        "| mode | L | median ms | us/token | ratio to first |",
        "|---|---|---|---|---|",
    ]
    for mode in ("forward", "forward+backward"):
        backward = mode != "forward"

        def call(n: int, backward: bool = backward) -> None:
            q, k, v = (x.requires_grad_(backward) for x in inputs[n])
            out = linear_attention(
                q, k, v, decay=decay, backend=args.backend, chunk_size=args.chunk_size
            )
            if backward:
                out.sum().backward()

        for n in lengths:
            call(n)
        times: dict[int, list[float]] = {n: [] for n in lengths}
        bar = progress(args.rounds * len(lengths), f"per-token {mode}")
        for r in range(args.rounds):
            for n in lengths:
                if n < args.long or r < args.long_rounds:
                    times[n].append(seconds(lambda n=n: call(n), device))
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
        base = statistics.median(times[lengths[0]]) / lengths[0]
        ratios = []
        for n in lengths:
            median = statistics.median(times[n])
            ratios.append(median / n / base)
            lines.append(
                f"| {mode} | {n} | {median * 1e3:.1f} | {median / n * 1e6:.2f} | {ratios[-1]:.2f} |"
            )
            print(lines[-1], flush=True)
        spread = max(abs(r - 1) for r in ratios)
        lines.append(
            f"| {mode} | all | | | within +-{spread * 100:.0f}% of {lengths[0]} "
            f"({'meets' if spread <= 0.10 else 'misses'} +-10%) |"
        )
    return lines


class _Block(nn.Module):
    """Pre-LN residual block: mixer then a 4x MLP (the Zoology MQAR model's shape)."""

    def __init__(self, mixer: nn.Module, dim: int) -> None:
        super().__init__()
        self.mixer, self.norm1, self.norm2 = mixer, nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Model(nn.Module):
    def __init__(self, make_mixer: Callable[[], nn.Module], dim: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(_Block(make_mixer(), dim), _Block(make_mixer(), dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(ids))) @ self.embed.weight.T


def based_step(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Part 2: training step of Based vs 1-head softmax attention, layer and 2-layer model."""
    batch, length, dim, vocab = 64, 64, 64, 512
    mixers = {
        "softmax MultiHeadAttention(64, 1, causal)": lambda: MultiHeadAttention(
            dim, 1, causal=True
        ),
        "BasedAttention(64, 1) (d'=16, window 64)": lambda: BasedAttention(dim, 1),
        "BasedAttention(64, 1, d'=8, window 0) (Zoology Fig. 2)": lambda: BasedAttention(
            dim, 1, feature_dim=8, window_size=0
        ),
    }
    torch.manual_seed(0)
    x = torch.randn(batch, length, dim, device=device)
    ids = torch.randint(0, vocab, (batch, length), device=device)
    calls = {}
    for name, make in mixers.items():
        for scope in ("layer", "2-layer model"):
            module = (make() if scope == "layer" else _Model(make, dim, vocab)).to(device)
            opt = torch.optim.AdamW(module.parameters(), lr=1e-3)

            def step(module=module, opt=opt, scope=scope) -> None:
                if scope == "layer":
                    loss = module(x).square().mean()
                else:
                    loss = F.cross_entropy(module(ids).flatten(0, 1), ids.flatten())
                loss.backward()
                opt.step()
                opt.zero_grad()

            calls[name, scope] = step
    medians = time_interleaved(calls, device, rounds=args.step_rounds)
    lines = [
        f"\n## 2. Training step (forward, backward, AdamW), B={batch}, L={length}, d={dim}\n",
        f"{args.step_rounds} rounds, every configuration in turn; medians. Target: Based within 2x "
        "of softmax. The model: token embedding (vocab 512), 2 pre-LN blocks (mixer + 4x MLP), "
        "tied LM head, cross-entropy.\n",
        "| mixer | scope | median ms | vs softmax |",
        "|---|---|---|---|",
    ]
    softmax = next(iter(mixers))
    for (name, scope), median in medians.items():
        ratio = median / medians[softmax, scope]
        lines.append(f"| {name} | {scope} | {median * 1e3:.1f} | {ratio:.2f}x |")
        print(lines[-1], flush=True)
    return lines


def throughput(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Part 3: tokens/s vs length at a fixed token budget, against SDPA."""
    decay = tnl_decay(args.heads).to(device)

    def timed(fn, q, k, v):
        def call():
            out = fn(q, k, v)
            if args.backward:
                out.sum().backward()

        return time_call(call, device, repeats=args.repeats)

    runners = {
        "chunk": lambda q, k, v: linear_attention(
            q, k, v, decay=decay, backend=args.backend, chunk_size=args.chunk_size
        ),
        "quadratic": lambda q, k, v: linear_attention(q, k, v, decay=decay, backend="naive"),
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        ),
    }
    limits = {"chunk": None, "quadratic": args.max_quadratic, "sdpa": args.max_sdpa}
    rows, speed = [], {}
    for length in args.lengths:
        batch = max(1, args.tokens // length)
        shape = (batch, length, args.heads, args.dim)
        q, k, v = (
            (torch.randn(shape, device=device) * 0.1).requires_grad_(args.backward)
            for _ in range(3)
        )
        for name, fn in runners.items():
            if limits[name] is not None and length > limits[name]:
                continue
            seconds = timed(fn, q, k, v)
            speed[name, length] = batch * length / seconds
            rows.append((length, batch, name, seconds))
            print(f"L={length:6d} B={batch:3d} {name:9s} {seconds * 1e3:9.1f} ms "
                  f"{speed[name, length] / 1e3:9.1f} ktok/s", flush=True)  # fmt: skip

    mode = "forward+backward" if args.backward else "forward"
    lines = [
        f"\n## 3. tokens/s vs length at {args.tokens} tokens per call ({mode})\n",
        f"H={args.heads}, D=E={args.dim}, float32, chunk {args.chunk_size}, backend "
        f"{args.backend}, TNL decay, median of {args.repeats}\n",
        "| L | B | path | ms | ktokens/s | vs SDPA (speed ratio) |",
        "|---|---|---|---|---|---|",
    ]
    for length, batch, name, seconds in rows:
        base = speed.get(("sdpa", length))
        ratio = f"{speed[name, length] / base:.2f}x" if base else "SDPA not run"
        lines.append(
            f"| {length} | {batch} | {name} | {seconds * 1e3:.1f} | "
            f"{speed[name, length] / 1e3:.1f} | {ratio} |"
        )
    flat = [speed["chunk", n] for n in args.lengths if n >= 4096 and ("chunk", n) in speed]
    if flat:
        ref = flat[0]
        spread = max(abs(s / ref - 1) for s in flat)
        lines.append(
            f"\nChunked tokens/s from 4k upward: within ±{spread * 100:.1f}% of the 4k value."
        )
    crossover = next(
        (n for n in args.lengths if ("sdpa", n) in speed and speed["chunk", n] > speed["sdpa", n]),
        None,
    )
    lines.append(f"Crossover (first length where chunked beats SDPA): {crossover}.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lengths = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    parser.add_argument("--sweep-lengths", type=int, nargs="+", default=lengths)
    parser.add_argument("--sweep-heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--long", type=int, default=32768, help="lengths timed in fewer rounds")
    parser.add_argument("--long-rounds", type=int, default=3)
    parser.add_argument("--step-rounds", type=int, default=15)
    parser.add_argument("--lengths", type=int, nargs="+", default=lengths)
    parser.add_argument("--tokens", type=int, default=65536, help="batch x length per call")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--backend", default="chunk")
    parser.add_argument("--max-sdpa", type=int, default=16384)
    parser.add_argument("--max-quadratic", type=int, default=4096)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=["sweep", "based", "throughput"])
    parser.add_argument("--note", default="", help="a line for the results file (machine load)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()  # fmt: skip
    device = torch.device(args.device)
    env = environment(device)
    lines = [f"# Linear attention: constant speed, Based's training step, tokens/s ({device})\n"]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    if args.note:
        lines.append(f"- note: {args.note}")
    lines.append("")
    if "sweep" not in args.skip:
        lines += per_token(args, device)
    if "based" not in args.skip:
        lines += based_step(args, device)
    if "throughput" not in args.skip:
        lines += throughput(args, device)
    write_results(RESULTS, f"linear-{device.type}", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
