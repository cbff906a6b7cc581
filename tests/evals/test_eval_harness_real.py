"""The evaluation harness end to end on SmolLM2-135M-Instruct (a small case): passkey retrieval
at 512 tokens and a 512-token held-out perplexity, dense vs the uniform (StreamingLLM) plan."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from headwise.evals import perplexity, retrieval_accuracy, retrieval_contexts, token_stream
from headwise.hf import attach
from headwise.layers import MoAPlan

pytestmark = pytest.mark.real_model

UNIFORM = MoAPlan.uniform(30, 9, alpha=0, beta=0.25, max_new_tokens=0)


def _bench():
    path = Path(__file__).parents[2] / "bench" / "bench_moa_eval.py"
    spec = importlib.util.spec_from_file_location("bench_moa_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_harness_dense_vs_uniform_on_smollm2(smollm2):
    model, tokenizer = smollm2
    # left attached: a test that finds the sites already named (select_sites) expects the
    # headwise implementation to be on (tests/hf/test_hf_moa.py does)
    attach(model)
    contexts = retrieval_contexts(tokenizer, 512, contexts=1, questions=3, seed=1400)
    dense = retrieval_accuracy(model, contexts)
    uniform = retrieval_accuracy(model, contexts, UNIFORM)
    streams = [token_stream(tokenizer, 512, seed=1500)]
    ppl = {name: perplexity(model, streams, c) for name, c in (("d", None), ("u", UNIFORM))}
    assert len(dense.correct) == len(uniform.correct) == 3
    # seeded: dense finds a pass key that 64 sinks + a 64-token window cannot reach
    assert dense.accuracy > uniform.accuracy
    assert all(math.isfinite(p.whole) for p in ppl.values())
    assert 1 < ppl["d"].whole < ppl["u"].whole
    assert ppl["u"].last_half / ppl["d"].last_half > ppl["u"].whole / ppl["d"].whole


def test_bench_kv_density():
    bench = _bench()
    assert bench.kv_density(None, 1024) == 1.0
    assert bench.kv_density(UNIFORM, 1024) == 0.25
    assert bench.kv_density(MoAPlan.uniform(30, 9, alpha=0, beta=0.5), 2048) == 0.5
