"""Whether this checkout's native kernel gives the same bits as another build of ``tiles.c``: a
change meant for speed alone (prefetch hints, a reordered max) must not move a single bit of
``out``, ``lse`` or the gradients.

    git show d2ecbd1:src/headwise/ops/attention/native/tiles.c > /tmp/tiles-old.c
    python bench/compare_kernel_bits.py /tmp/tiles-old.c

Both builds run the same calls in one process: every pattern family (dense, causal, window,
per-head, 2-D neighborhood, block-sparse, packed documents, long tiles of the grouped forward,
cross lengths) in float32 and bfloat16, with GQA, dropout and an additive bias, forward (and
backward in float32), at 1 and 2 threads. Outputs are compared as integers (so -0 and +0, or two
NaNs, differ). Exits 1 on any difference, naming the first ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import headwise.patterns as P
from bench_attention import kernel_built_from, using_kernel
from headwise.ops.attention.native.call import tiles_backward, tiles_forward

CASES = {
    "dense": (P.full(), 75, 75),
    "causal": (P.causal(), 90, 90),
    "window": (P.sliding_window(20, 9), 203, 203),
    "per_head": (
        P.per_head([P.sliding_window(8), P.causal(), P.sliding_window(30), P.full()]),
        100,
        100,
    ),
    "neighborhood": (P.neighborhood((20, 24), 7), 480, 480),
    "block_sparse": (
        P.block_sparse(torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) > 0.5, 16),
        96,
        96,
    ),
    "documents": (P.documents([33, 1, 0, 17, 64, 200, 15]), 330, 330),
    "documents causal, long tiles": (P.documents([1500, 7, 1300, 30], causal=True), 2837, 2837),
    "cross": (P.full(), 37, 1200),
}


def results() -> dict[str, torch.Tensor]:
    """Every call's outputs, by a name that says which call."""
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, (pattern, q_len, kv_len) in CASES.items():
            for dtype in (torch.float32, torch.bfloat16):
                for kv_heads, extra in ((4, ""), (2, ""), (4, "dropout"), (4, "bias")):
                    gen = torch.Generator().manual_seed(1)
                    q = torch.randn(2, q_len, 4, 40, generator=gen).to(dtype)
                    k = torch.randn(2, kv_len, kv_heads, 40, generator=gen).to(dtype)
                    v = torch.randn(2, kv_len, kv_heads, 24, generator=gen).to(dtype)
                    options = {}
                    if extra == "dropout":
                        options["dropout"] = (0.3, 123)
                    if extra == "bias":
                        options["bias"] = torch.randn(4, q_len, kv_len, generator=gen)
                    key = f"{threads} threads, {name}, {dtype}, {kv_heads} kv heads {extra}"
                    o, lse = tiles_forward(q, k, v, pattern, 0.3, **options)
                    out[f"{key}: out"], out[f"{key}: lse"] = o, lse
                    if dtype != torch.float32:
                        continue
                    grad_out = torch.randn(o.shape, generator=gen)
                    grads = tuple(torch.zeros(t.shape) for t in (q, k, v))
                    tiles_backward(grad_out, None, q, k, v, o, lse, pattern, 0.3, grads, **options)
                    for letter, grad in zip("qkv", grads):
                        out[f"{key}: d{letter}"] = grad
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="the other tiles.c")
    args = parser.parse_args()
    baseline = kernel_built_from(args.baseline)
    mine = results()
    with using_kernel(baseline):
        theirs = results()
    differ = [name for name in mine if not torch.equal(bits(mine[name]), bits(theirs[name]))]
    print(f"{len(mine)} outputs compared; {len(differ)} differ in some bit")
    for name in differ[:10]:
        print("  ", name)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
