"""MoA spans as key ranges (sink blocks + block-aligned local window): exactly the predicate's
keys, and the native plan built from them equals the plan built from the predicate."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.layers.moa import MoASpan
from headwise.ops.attention.native import plan as native_plan

spans = st.builds(
    MoASpan,
    alpha=st.sampled_from([0.0, 5.0, 100.0, math.inf]),
    beta=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    block=st.just(8),
    sink_size=st.sampled_from([0, 8, 16]),
    min_cache=st.sampled_from([1, 8, 16]),
    extra_tokens=st.sampled_from([0, 5]),
    length=st.sampled_from([None, 40]),
)


@settings(max_examples=60, deadline=None)
@given(spans, st.integers(1, 60), st.integers(1, 60))
def test_moa_span_ranges_are_its_visible_keys_and_give_the_same_plan(span, q_len, kv_len):
    lo, hi = span._key_ranges(torch.arange(q_len), q_len, kv_len)
    keys = torch.arange(kv_len)
    seen = ((keys >= lo[..., None]) & (keys < hi[..., None])).any(-2)
    assert torch.equal(seen, span.dense_mask(q_len, kv_len))
    fast = native_plan._tiles_of(span, q_len, kv_len)
    slow = native_plan._predicate_tiles(span, q_len, kv_len)
    for field in ("rows", "seg_offsets", "seg_start", "seg_len", "bit_offsets", "bits"):
        assert torch.equal(getattr(fast, field), getattr(slow, field)), field
    assert fast.max_keys == slow.max_keys
