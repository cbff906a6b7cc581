"""MQAR training-step benchmark: milliseconds per step of Zoology's 2-layer model per mixer.

One step of the CPU preset's training (B=64, L=64, d=64, vocab 512, AdamW, attention dropout
0.1): forward, loss at the labelled positions, backward, optimizer step. The ratio column is
against ``attention`` timed in the same round (issue 16's budget: the slow mixers within ~1.3x
of it). ``--baseline-src`` also times another checkout of headwise (e.g. the main branch's
``src``) in the same rounds, each round alternating a subprocess on either code, and prints the
ratio of this code to that one per mixer, both as measured and with each code's times in units
of its own ``attention`` step (which cancels load that differs between the two codes' runs).

    python bench/bench_mqar_step.py --mixers attention,selective,combiner
    python bench/bench_mqar_step.py --baseline-src /work/main/src --rounds 7

Results go to ``bench/results/mqar-step-cpu-<date>.md`` with device, versions and date.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def step_times(mixers: list[str], steps: int) -> dict[str, float]:
    """Median seconds per training step of each mixer's model, in this process's headwise: the
    models step in turn (3 warm-up steps each first), so a slow phase hits all of them."""
    import torch.nn.functional as F

    from headwise.evals.mqar import IGNORE, MQARModel, mqar_data

    tokens, labels = mqar_data(512, 64 * (steps + 3), 64, 4, 1)
    models = {}
    for name in mixers:
        torch.manual_seed(0)
        model = MQARModel(name, vocab_size=512, dim=64, seq_len=64)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
        models[name] = model, opt
    per_step: dict[str, list[float]] = {name: [] for name in mixers}
    for i in range(steps + 3):
        tok, lab = tokens[i * 64 : (i + 1) * 64], labels[i * 64 : (i + 1) * 64]
        keep = lab != IGNORE
        for name, (model, opt) in models.items():
            start = time.perf_counter()
            loss = F.cross_entropy(model(tok, keep), lab[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            per_step[name].append(time.perf_counter() - start)
    return {name: statistics.median(times[3:]) for name, times in per_step.items()}


def _worker(src: str | None, mixers: list[str], steps: int) -> dict[str, float]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    command = [sys.executable, __file__, "--worker", "--mixers", ",".join(mixers)]
    done = subprocess.run(
        [*command, "--steps", str(steps)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", default="attention,selective,combiner")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline-src", help="another checkout's src/ to time alongside")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mixers = args.mixers.split(",")
    if "attention" not in mixers:
        mixers.insert(0, "attention")
    if args.worker:
        print(json.dumps(step_times(mixers, args.steps)))
        return

    from headwise.measure import environment, progress, write_results

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    codes = {} if args.baseline_src is None else {"baseline": args.baseline_src}
    codes["this"] = str(Path(__file__).resolve().parents[1] / "src")
    samples: dict[tuple[str, str], list[float]] = {}
    bar = progress(args.rounds * len(codes), "runs")
    for r in range(args.rounds):
        order = list(codes) if r % 2 == 0 else list(codes)[::-1]
        for code in order:
            for name, seconds in _worker(codes[code], mixers, args.steps).items():
                samples.setdefault((code, name), []).append(seconds)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    ms = {key: statistics.median(values) * 1e3 for key, values in samples.items()}
    env = environment(torch.device("cpu"))
    head = "| mixer | " + " | ".join(f"{code} ms/step" for code in codes) + " | this / attention |"
    lines = [head, "|" + " --- |" * (len(codes) + 2)]
    if "baseline" in codes:
        lines[0] = head + " baseline / attention | this / baseline | same, per attention |"
        lines[1] += " --- | --- | --- |"
    for name in mixers:
        row = [f"{ms[(code, name)]:.1f}" for code in codes]
        row.append(f"{ms[('this', name)] / ms[('this', 'attention')]:.2f}x")
        if "baseline" in codes:
            row.append(f"{ms[('baseline', name)] / ms[('baseline', 'attention')]:.2f}x")
            row.append(f"{ms[('this', name)] / ms[('baseline', name)]:.2f}x")
            # each code's time in units of its own attention step: load that differs between
            # the two codes' runs cancels
            per_attention = (ms[("this", name)] / ms[("this", "attention")]) / (
                ms[("baseline", name)] / ms[("baseline", "attention")]
            )
            row.append(f"{per_attention:.2f}x")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    table = "\n".join(lines)
    print(table)
    text = (
        "# MQAR training step per mixer (CPU preset shapes)\n\n"
        + "".join(f"- {key}: {value}\n" for key, value in env.items())
        + f"- threads: {args.threads}; {args.steps} timed steps per model and round (median; "
        f"the models step in turn), {args.rounds} rounds (median of the round medians), "
        "the codes alternating per round\n"
        + (f"- baseline: `{args.baseline_src}`\n" if args.baseline_src else "")
        + "- the machine was shared with other work while this ran: absolute times are noisy, "
        "the ratios of one round's runs hold better\n\n"
        + f"Command: `python bench/bench_mqar_step.py {' '.join(sys.argv[1:])}`\n\n"
        + table
        + "\n"
    )
    write_results(RESULTS, "mqar-step-cpu", env, text)


if __name__ == "__main__":
    main()
