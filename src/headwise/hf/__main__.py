"""``python -m headwise.hf [--model DIR] [--out FILE] [TEXT ...]``: ``headwise inspect``."""

from __future__ import annotations

import sys

from headwise.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
