"""Vision token mixers: parameters, FLOPs and images/s (forward + backward) in one small backbone.

For every mixer :func:`headwise.models.available_mixers` lists, this builds the same small
hierarchical backbone (``vision_backbone(mixer, depths, dims)``: 4x4 patch stem, four stages,
2x2 downsampling), and at each input size reports its parameters, forward FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention kernels; FFTs
and elementwise ops are not counted) and training images/s (forward + backward, batch 1 by
default, best of ``--repeats``), with the ratio to the ``window`` mixer (plain window MHSA)
measured in the same run.

    python bench/bench_vision.py                           # CPU defaults: 224 and 512, batch 1
    python bench/bench_vision.py --sizes 224 --mixers hilo halo --device cuda --batch 32

Results go to ``bench/results/vision-<device>-<date>.md`` with device, versions and date.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from headwise.measure import environment, write_results
from headwise.models import available_mixers, vision_backbone
from headwise.ops.attention import backends

RESULTS = Path(__file__).parent / "results"
BASELINE = "window"


def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# torch 2.13's counter knows the CUDA SDPA kernels but not the CPU flash kernel (it would count 0)
_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops}


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    # The counter cannot see inside headwise's native C kernel: count with it switched off, so
    # sparse attention runs through blockwise's calls of PyTorch's fused kernel, which it sees.
    with (
        mock.patch.object(backends, "tiles_available", return_value=False),
        FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter,
    ):
        model(x)
    return counter.get_total_flops()


def _step(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", nargs="+", default=list(available_mixers()))
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 1, 1, 1])
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    mixers = [BASELINE] + [m for m in args.mixers if m != BASELINE]

    rows = []
    for size in args.sizes:
        models, best = {}, {}
        x = torch.randn(args.batch, 3, size, size, device=device)
        for name in mixers:
            torch.manual_seed(0)
            models[name] = vision_backbone(name, args.depths, args.dims, img_size=size).to(device)
            _step(models[name], x, device)  # warm-up
            best[name] = float("inf")
        # round-robin, keeping each mixer's fastest step: load from other jobs on a shared
        # machine then spreads over all mixers instead of hitting a few, and only ever adds time
        for _ in range(args.repeats):
            for name in mixers:
                best[name] = min(best[name], _step(models[name], x, device))
        for name in mixers:
            params = sum(p.numel() for p in models[name].parameters())
            flops = _flops(models[name], x)
            rate, base = args.batch / best[name], args.batch / best[BASELINE]
            rows.append((name, size, params, flops, rate, rate / base))
            print(
                f"{name:<12} {size:>4}  params {params / 1e6:6.3f} M  "
                f"GFLOPs {flops / 1e9:7.3f}  img/s {rate:8.2f}  x{rate / base:.2f}",
                flush=True,
            )

    env = environment(device)
    lines = [
        "# Vision token mixers: size, FLOPs and training throughput",
        "",
        *(f"- {key}: {value}" for key, value in env.items()),
        f"- command: `python bench/bench_vision.py --sizes {' '.join(map(str, args.sizes))} "
        f"--batch {args.batch} --device {args.device}`",
        "",
        f"What was measured: `vision_backbone(mixer, depths={tuple(args.depths)}, "
        f"dims={tuple(args.dims)})` — patch stem 4x4/4, one block per stage "
        "(`x + mixer(LN(x))`, `x + MLP(LN(x))`, MLP ratio 4; ConvGLU for `aggregated`), 2x2/2 "
        f"downsampling, mean-pooled features; batch {args.batch}, float32, training mode "
        "(`multi_axis` and `dual` alternate per block, so with one block per stage they run only "
        "block / window attention). "
        "Stage maps are 56/28/14/7 at 224 and 128/64/32/16 at 512. GFLOPs: one forward pass, "
        "counted by `torch.utils.flop_counter.FlopCounterMode` (matmul, conv, SDPA incl. the CPU "
        "flash kernel; FFTs and "
        "elementwise ops not counted; 1 multiply-add = 2 FLOPs; attention that runs in headwise's "
        "native C kernel, which the counter cannot see, is counted on the blockwise path, "
        "including the masked work of its 32-query tiles). img/s: fastest of "
        f"{args.repeats} forward+backward steps after one warm-up, the mixers timed round-robin "
        "(the CPU is shared with other jobs: load only adds time, and round-robin spreads it over "
        "all mixers). "
        f"`vs {BASELINE}`: img/s ratio to the `{BASELINE}` mixer (7x7 window MHSA) "
        "in the same run.",
        "",
        f"| mixer | input | params (M) | GFLOPs (fwd) | img/s (fwd+bwd) | vs {BASELINE} |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {size}² | {params / 1e6:.3f} | {flops / 1e9:.3f} | {rate:.2f} | "
            f"{ratio:.2f} |"
            for name, size, params, flops, rate, ratio in rows
        ),
    ]
    write_results(RESULTS, f"vision-{device.type}", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
