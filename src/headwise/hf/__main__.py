"""``python -m headwise.hf [--model DIR] [--out FILE] [TEXT ...]``: write the HTML head report."""

from __future__ import annotations

import argparse

from headwise.hf.report import TEXTS, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m headwise.hf", description=__doc__)
    parser.add_argument("texts", nargs="*", help="sentences (default: a few built-in ones)")
    parser.add_argument("--model", help="local checkpoint directory (default: offline MiniLM)")
    parser.add_argument("--out", default="headwise-report.html", help="HTML file to write")
    args = parser.parse_args(argv)
    result = report(args.model, args.texts or TEXTS, args.out)
    print(f"wrote {result.path}")
    for name, head, share in result.sink_heads:
        print(f"  sink head {name} head {head}: share {share:.3f}")


if __name__ == "__main__":
    main()
