"""The native kernel's fixed costs at MQAR's shapes (issue 16's time target; Zoology, Arora et
al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models"): one training
step of the MQAR model (B=64, L=64, d=64, vocab 512, 1 thread) per mixer whose attention runs on
``native`` (with attention dropout 0.1), and the kernel's autograd alone on that problem, in this
checkout and, with ``--baseline``, in another one, timed in turn round by round.

    python bench/bench_native_small.py --baseline /path/to/other/checkout/src
    python bench/bench_native_small.py --mixers attention sliding_window --rounds 7

Each round starts one worker process per checkout (``PYTHONPATH`` = its ``src``; the order
alternates between rounds), which times ``--steps`` training steps after 3 warm-up steps, and
``native_attention`` forward (no grad) and forward+backward, in CPU time of the worker's one
thread (``time.thread_time``: on a shared machine a call that is descheduled midway would
otherwise count the other jobs' time slices, which the longer calls catch more often); each
figure is the median over rounds of the workers' medians. Results go to
``bench/results/native-small-cpu-<date>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SOURCE = Path(__file__).resolve().parents[1] / "src"
#: the MQAR mixers whose attention runs on the native kernel at these shapes
MIXERS = ["attention", "sliding_window", "moa", "moh", "s2"]


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _worker(mixers: list[str], steps: int) -> dict[str, float]:
    """ms per MQAR training step of each mixer, and of the native operator alone."""
    import headwise.patterns as P
    from bench_mqar_step import training_steps  # the step as train_run takes it
    from headwise.evals.mqar import MQARModel, mqar_data
    from headwise.ops.attention.native import native_attention

    torch.set_num_threads(1)
    tokens, labels = mqar_data(512, 64 * (steps + 3), 64, 4, 1)
    batches = list(zip(tokens.split(64), labels.split(64)))
    result = {}
    for name in mixers:
        torch.manual_seed(0)
        step = training_steps(MQARModel(name, vocab_size=512, dim=64, seq_len=64), batches, 1)
        times = []
        for _ in batches:
            start = time.thread_time()
            step()
            times.append(time.thread_time() - start)
        result[f"step {name}"] = _median(times[3:]) * 1e3
    # the operator alone: q, k, v as slices of one projection, as the layers give them
    for label, pattern in (("sliding_window(16)", P.sliding_window(16)), ("causal", P.causal())):
        qkv = torch.randn(64, 64, 3 * 64, requires_grad=True)
        grad = torch.randn(64, 64, 1, 64)

        def call(qkv=qkv, pattern=pattern):
            q, k, v = (t.view(64, 64, 1, 64) for t in qkv.split(64, -1))
            return native_attention(q, k, v, pattern, dropout_p=0.1, seed=1)[0]

        def forward(call=call):
            with torch.no_grad():
                call()

        def step(call=call, grad=grad, qkv=qkv):
            call().backward(grad)
            qkv.grad = None

        for part, fn in (("fwd", forward), ("fwd+bwd", step)):
            fn()
            times = []
            for _ in range(30):
                start = time.thread_time()
                fn()
                times.append(time.thread_time() - start)
            result[f"native {label} {part}"] = _median(times) * 1e3
    return result


def _run_worker(src: Path, mixers: list[str], steps: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--worker", "--steps", str(steps), "--mixers", *mixers]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", nargs="+", default=MIXERS)
    parser.add_argument("--baseline", type=Path, help="another checkout's src directory")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.mixers, args.steps)))
        return
    from headwise.measure import environment, progress, write_results

    trees = {"this": SOURCE} | ({"baseline": args.baseline} if args.baseline else {})
    env = environment(torch.device("cpu"))
    env["cpu_threads"] = "1"
    loads = [os.getloadavg()]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    bar = progress(args.rounds * len(trees), "native small")
    for r in range(args.rounds):
        for name in list(trees)[:: 1 if r % 2 == 0 else -1]:
            runs[name].append(_run_worker(trees[name], args.mixers, args.steps))
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    loads.append(os.getloadavg())
    keys = list(runs["this"][0])
    median = {name: {k: _median([run[k] for run in rs]) for k in keys} for name, rs in runs.items()}
    lines = ["# The native kernel at MQAR's shapes: training steps and the operator alone\n"]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [
        f"- this checkout: {SOURCE}; baseline: {args.baseline or 'none'}",
        "- MQAR model B=64, L=64, d=64, vocab 512, 2 layers, attention dropout 0.1; CPU ms "
        "(thread time) per training step (forward, backward, AdamW), median of "
        f"{args.steps} steps per worker, then median over {args.rounds} rounds (worker processes "
        "of the two checkouts alternate); native rows: native_attention on (64, 64, 1, 64) "
        "slices of one projection, dropout 0.1",
        "- load average (1/5/15 min) at start / end: "
        + " ; ".join(" / ".join(f"{x:.1f}" for x in load) for load in loads)
        + " (2 cores shared with other jobs: absolute times are noisy, the ratios less so)",
        "",
        "| row | this ms | baseline ms | this / baseline |",
        "|---|---|---|---|",
    ]
    for key in keys:
        base = median.get("baseline", {}).get(key)
        ratio = "" if base is None else f"{median['this'][key] / base:.2f}"
        lines.append(f"| {key} | {median['this'][key]:.2f} | {base or 0:.2f} | {ratio} |")
    print("\n".join(lines))
    write_results(RESULTS, "native-small-cpu", env, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
