"""On a real LLM (SmolLM2-135M-Instruct, float32): ``attach`` gives eager's logits with left
padding on real English text, and greedy ``generate`` gives eager's tokens."""

from __future__ import annotations

import importlib.util
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from headwise.evals import passages
from headwise.hf import attach

pytestmark = pytest.mark.real_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@contextmanager
def implementation(model, name: str):
    """Run ``model`` with transformers' ``name`` attention (``"headwise"``: through ``attach``),
    then put its own back: the session's model is shared."""
    before = model.config._attn_implementation
    if name == "headwise":
        attach(model)
    else:
        model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def left_padded(tokenizer, texts):
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")


def test_headwise_equals_eager_with_left_padding(smollm2):
    model, tokenizer = smollm2
    texts = [p.strip() for p in passages(3, 500, seed=14)]
    texts[1] = texts[1][:120]  # very different lengths: a long left pad on one row
    inputs = left_padded(tokenizer, texts)
    real = inputs["attention_mask"].bool()
    assert (~real).sum(1).max() > 40, "the padding should really be there"
    logits = {}
    for name in ("eager", "headwise"):
        with implementation(model, name), torch.no_grad():
            logits[name] = model(**inputs).logits[real]
    error = (logits["headwise"] - logits["eager"]).abs().max()
    assert error <= 1e-4, f"max |headwise - eager| on real tokens = {error:.3g}"


def test_greedy_generate_equals_eager_and_answers(smollm2):
    model, tokenizer = smollm2
    chat = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    inputs = left_padded(tokenizer, [chat, passages(1, 300, seed=3)[0]])
    prompt = inputs["input_ids"].shape[1]
    tokens = {}
    for name in ("eager", "headwise"):
        with implementation(model, name), torch.no_grad():
            tokens[name] = model.generate(
                **inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False
            )[:, prompt:]
    assert tokens["headwise"].shape == (2, 32)
    assert torch.equal(tokens["headwise"], tokens["eager"])
    answer = tokenizer.decode(tokens["headwise"][0], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _bench(name: str):
    path = Path(__file__).parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pruning_bench_importance_order_runs(smollm2):
    """bench/bench_pruning.py's helpers on a small case: Michel et al.'s importance order over
    all 270 heads, and finite held-out perplexities with 10% of them removed."""
    bench = _bench("bench_pruning")
    model, tokenizer = smollm2
    with implementation(model, "headwise"):
        calibration = bench.disjoint_streams(tokenizer, 2, 64, seed=0)
        held_out = bench.disjoint_streams(tokenizer, 2, 64, seed=100, avoid=calibration)
        order, scores = bench.importance_order(model, calibration)
        curve = bench.pruning_curve(model, held_out, order, [0, 27])
    assert len(order) == len(set(order)) == 270
    norms = torch.stack([s.norm() for s in scores.values()])
    assert torch.allclose(norms, torch.ones(30)), "scores are L2-normalized per layer"
    assert all(math.isfinite(p) and p > 1 for p in curve), curve
