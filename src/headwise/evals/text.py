"""Real English text, offline on every machine: the help topics of Python's own documentation
(``pydoc_data.topics``, about 750 KB in every CPython), cut into seeded passages.

Random token ids are not text: a model's attention on them (sinks, locality, perplexity) says
little about its attention on language. The topics are reStructuredText-like prose with some
code examples; each passage starts at the first letter of a paragraph of prose.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import torch

from headwise._checks import ArgumentTypeError


@functools.cache
def corpus() -> str:
    """Every pydoc help topic, in key order, separated by blank lines (deterministic for one
    CPython version)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


@functools.cache
def _paragraph_starts() -> tuple[int, ...]:
    text = corpus()
    starts, at = [0], text.find("\n\n")
    while at != -1:
        starts.append(at + 2)
        at = text.find("\n\n", at + 2)
    # a paragraph of prose starts with a letter at the margin (not indented code, not markup)
    return tuple(s for s in starts if text[s : s + 1].isalpha())


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int; got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")
    return value


def passages(count: int, chars: int, seed: int = 0) -> list[str]:
    """``count`` passages of ``chars`` characters of real English, each starting at a seeded
    paragraph boundary of :func:`corpus` (the same list for the same arguments)."""
    _positive_int("count", count)
    _positive_int("chars", chars)
    text = corpus()
    if chars > len(text) // 2:
        raise ValueError(f"chars must be at most {len(text) // 2} (half the corpus); got {chars}")
    rng = random.Random(seed)
    usable = [s for s in _paragraph_starts() if s + chars <= len(text)]
    return [text[start : start + chars] for start in (rng.choice(usable) for _ in range(count))]


def token_stream(tokenizer: object, tokens: int, seed: int = 0) -> torch.Tensor:
    """``(1, tokens)`` token ids of one contiguous stretch of :func:`corpus` starting at a seeded
    paragraph boundary (``tokenizer``: a Hugging Face tokenizer; no special tokens added)."""
    _positive_int("tokens", tokens)
    # about 4 characters per token in English; take twice that and cut to length
    (text,) = passages(1, min(8 * tokens, len(corpus()) // 2), seed)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] < tokens:
        raise ValueError(f"tokens must be at most {ids.shape[1]} for this corpus; got {tokens}")
    return ids[:, :tokens]


LICENSES = Path("/usr/share/common-licenses")


def licenses(directory: str | Path = LICENSES) -> dict[str, str]:
    """The license texts Debian ships (``/usr/share/common-licenses``: GPL, LGPL, Apache, MPL,
    ...), name to text, each text once (aliases such as ``GPL`` -> ``GPL-3`` dropped), sorted by
    name: real English legal prose disjoint from :func:`corpus`, e.g. for calibration."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"directory must hold the license texts; {root} is not a directory")
    texts: dict[str, str] = {}
    for path in sorted(root.iterdir()):
        if path.is_file() and not path.is_symlink():
            texts[path.name] = path.read_text(errors="replace").strip()
    if not texts:
        raise ValueError(f"no license texts in {root}")
    return texts
