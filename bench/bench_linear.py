"""Linear attention benchmark: tokens/s vs length at a fixed token budget, against dense SDPA.

"Constant speed" (Lightning Attention-2, TNL): with batch x length fixed, the chunked algorithm's
tokens/s should not fall as the length grows, while causal softmax attention's does. For every
length this times, in one run: the chunked linear attention (``backend="chunk"``, per-head decay),
the quadratic linear-attention reference up to ``--max-quadratic``, and causal SDPA up to
``--max-sdpa``; it reports tokens/s, the ratio to SDPA, the flatness of the chunked path from 4k
upward and the crossover length.

    python bench/bench_linear.py                                  # CPU defaults
    python bench/bench_linear.py --device cuda --backend triton --backward

Results go to ``bench/results/linear-<device>-<date>.md`` with device, versions and date.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from headwise.measure import environment, time_call, write_results
from headwise.ops.linear import linear_attention, tnl_decay

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536]
    )
    parser.add_argument("--tokens", type=int, default=65536, help="batch x length per call")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--backend", default="chunk")
    parser.add_argument("--max-sdpa", type=int, default=16384)
    parser.add_argument("--max-quadratic", type=int, default=4096)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()  # fmt: skip
    device = torch.device(args.device)
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
    lines = [f"# Linear attention: tokens/s vs length ({args.device}, {mode})\n"]
    env = environment(device)
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines.append(
        f"- tokens per call {args.tokens}, H={args.heads}, D=E={args.dim}, float32, "
        f"chunk {args.chunk_size}, backend {args.backend}, TNL decay, median of {args.repeats}\n"
    )
    lines.append("| L | B | path | ms | ktokens/s | vs SDPA (speed ratio) |")
    lines.append("|---|---|---|---|---|---|")
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
    print("\n".join(lines[-2:]))
    write_results(RESULTS, f"linear-{device.type}", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
