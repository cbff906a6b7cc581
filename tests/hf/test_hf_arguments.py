"""Bad arguments to the hf entry points raise ValueError/TypeError naming the argument; an MoA
plan is accepted by swap_pattern as its docstring says."""

from __future__ import annotations

import pytest
import torch
from hf_models import build

from headwise import patterns as P
from headwise.hf import (
    ablate_heads,
    attach,
    capture,
    gate_heads,
    pattern_drift,
    select_sites,
    swap_pattern,
)
from headwise.layers.moa import MoAPlan


@pytest.fixture(scope="module")
def llama():
    model, inputs = build("llama")
    attach(model)
    return model, inputs


def test_ablate_heads_out_of_range_names_the_argument(llama):
    model, _ = llama
    with pytest.raises(ValueError, match=r"heads\['blocks.1.attn'\].*4"):
        with ablate_heads(model, {"blocks.1.attn": [4]}):
            pass
    with pytest.raises(TypeError, match="heads"):
        with ablate_heads(model, {"blocks.1.attn": [1.5]}):
            pass
    with pytest.raises(TypeError, match="heads"):
        with ablate_heads(model, {"blocks.1.attn": 2}):
            pass


def test_capture_arguments_are_checked(llama):
    model, _ = llama
    for kwargs, error, text in [
        (dict(heads=[9]), ValueError, "heads"),
        (dict(heads=[True]), TypeError, "heads"),
        (dict(rows=["a"]), TypeError, "rows"),
        (dict(what="pattern"), TypeError, "what"),
        (dict(what=("probs",)), ValueError, "what"),
        (dict(detach="no"), TypeError, "detach"),
        (dict(layers=True), TypeError, "layers"),
        (dict(layers=[7]), ValueError, "layers"),
    ]:
        with pytest.raises(error, match=text):
            with capture(model, **kwargs):
                pass


def test_gate_shapes_are_checked(llama):
    model, _ = llama
    with pytest.raises(ValueError, match=r"gates\['blocks.0.attn'\]"):
        with gate_heads(model, {"blocks.0.attn": torch.ones(3)}):
            pass
    with pytest.raises(TypeError, match="gates"):
        with gate_heads(model, {"blocks.0.attn": [1.0, 1.0, 1.0, 1.0]}):
            pass
    with pytest.raises(TypeError, match="layers"):
        select_sites(model, 1.5)


def test_swap_pattern_accepts_an_moa_plan(llama):
    model, inputs = llama
    plan = MoAPlan.uniform(2, 4, alpha=2, beta=0.0, block=1, sink_size=1, min_cache=1)
    per_site = {f"blocks.{i}.attn": plan.pattern(4, layer=i) for i in range(2)}
    with torch.no_grad():
        with swap_pattern(model, plan):
            got = model(**inputs).logits
        with swap_pattern(model, per_site):
            want = model(**inputs).logits
        plain = model(**inputs).logits
    assert torch.equal(got, want)
    assert (got - plain).abs().max() > 1e-4
    assert pattern_drift(model, inputs, plan).max_abs > 1e-4
    with pytest.raises(ValueError, match="plan"):
        with swap_pattern(model, MoAPlan.uniform(3, 4, alpha=2, beta=0.0)):
            pass
    with pytest.raises(TypeError, match="pattern"):
        with swap_pattern(model, "causal"):
            pass
    with pytest.raises(TypeError, match="pattern"):
        with swap_pattern(model, {"blocks.0.attn": "causal"}):
            pass
    with swap_pattern(model, P.sliding_window(2)):
        pass
