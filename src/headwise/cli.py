"""Command line: ``headwise demo`` runs every pattern through ``auto`` and checks it;
``headwise inspect`` writes the HTML head report of a Hugging Face model.

The CLI is thin: it calls the same public API a user would.
"""

from __future__ import annotations

import argparse
import sys

import torch

import headwise.patterns as P
from headwise.measure import environment, peak_memory, time_call
from headwise.ops.attention import attention, explain


def demo_patterns(length: int, heads: int, seed: int = 0) -> dict[str, P.Pattern | None]:
    """One default instance of every pattern family, sized for ``length`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    window = max(1, length // 16)
    cuts = torch.sort(torch.randint(0, length + 1, (5,), generator=gen)).values.tolist()
    doc_lengths = [b - a for a, b in zip([0, *cuts], [*cuts, length])]
    blocks = -(-length // 128)
    layout = (torch.rand(blocks, blocks, generator=gen) < 0.3) | torch.eye(blocks, dtype=torch.bool)
    image = (length // 8, length // 2)
    mix = [
        P.causal(),
        P.sliding_window(window),
        P.sliding_window(window) | P.sinks(4),
        P.strided(8, 7) & P.causal(),
    ]
    return {
        "full": None,
        "causal": P.causal(),
        f"sliding_window({window})": P.sliding_window(window),
        f"sliding_window({window}) | sinks(4)": P.sliding_window(window) | P.sinks(4),
        "strided(8, 7) & causal": P.strided(8, 7) & P.causal(),
        "documents(causal)": P.documents(doc_lengths, causal=True),
        "modality_mutual": P.modality_mutual([(image, (image[1], image[1] + length // 8))]),
        "block_sparse(30%)": P.block_sparse(layout, 128),
        "per_head(mixed)": P.per_head([mix[h % len(mix)] for h in range(heads)]),
    }


def run_demo(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.length, args.heads, args.dim)
    q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    env = environment(device)
    print(f"headwise demo: q/k/v {shape} {args.dtype} on {env['device']}, torch {env['torch']}")
    print(
        "every pattern through backend='auto' (forward + backward), checked against 'reference'\n"
    )
    header = f"{'pattern':<34}{'backend':<11}{'density':>8}{'fwd ms':>9}{'fwd+bwd ms':>12}"
    header += f"{'peak MiB':>10}{'max err':>10}{'grad err':>10}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for name, pattern in demo_patterns(args.length, args.heads).items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        chosen = explain(*leaves, pattern).backend
        density = 1.0 if pattern is None else pattern.density(args.length, args.length)

        def forward(pattern=pattern):
            with torch.no_grad():
                return attention(q, k, v, pattern)

        def train_step(pattern=pattern, leaves=leaves):
            out = attention(*leaves, pattern)
            return torch.autograd.grad(out.sum(), leaves)

        fwd = time_call(forward, device, repeats=args.repeats)
        step = time_call(train_step, device, repeats=args.repeats)
        peak = peak_memory(train_step, device)
        out = attention(*leaves, pattern)
        ref = attention(*leaves, pattern, backend="reference")
        grad = torch.randn_like(out)
        g_fast = torch.autograd.grad(out, leaves, grad)
        g_ref = torch.autograd.grad(ref, leaves, grad)
        err = (out - ref).abs().max().item()
        grad_err = max((a - b).abs().max().item() for a, b in zip(g_fast, g_ref))
        worst = max(worst, err, grad_err)
        print(
            f"{name:<34}{chosen:<11}{density:>8.3f}{fwd * 1e3:>9.2f}{step * 1e3:>12.2f}"
            f"{peak / 2**20:>10.1f}{err:>10.1e}{grad_err:>10.1e}"
        )
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    ok = worst <= tolerance
    print(f"\nmax error {worst:.2e} vs tolerance {tolerance:.0e}: {'OK' if ok else 'FAILED'}")
    print("why a backend was (not) chosen: headwise.explain(q, k, v, pattern)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="headwise", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every pattern through auto and check it")
    demo.add_argument("--length", type=int, default=1024)
    demo.add_argument("--heads", type=int, default=8)
    demo.add_argument("--dim", type=int, default=64)
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.add_argument("--repeats", type=int, default=3)
    sub.add_parser(
        "inspect",
        help="HTML head report of a Hugging Face model (default: offline MiniLM); "
        "options: see python -m headwise.hf -h",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "inspect":
        from headwise.hf.__main__ import main as report_main

        report_main(rest)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
