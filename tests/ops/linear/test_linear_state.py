"""Carried state: two pieces == whole, step-by-step decoding == parallel form."""

from __future__ import annotations

import pytest
import torch
from linear_helpers import make_inputs

from headwise.ops.linear import linear_attention, linear_attention_step

CONFIGS = [
    {"decay": None},
    {"decay": "per-head"},
    {"decay": "per-head", "normalize": True, "feature_map": "elu+1"},
    {"decay": 0.9, "feature_map": "taylor"},
]


def _kwargs(config, lam):
    kwargs = dict(config)
    if kwargs["decay"] == "per-head":
        kwargs["decay"] = lam
    return kwargs


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("split", [0, 1, 10, 23])
def test_two_pieces_equal_whole(config, split):
    q, k, v, lam, _ = make_inputs(length=23, dim=4, state=False)
    kwargs = _kwargs(config, lam)
    whole, s_whole = linear_attention(q, k, v, return_state=True, chunk_size=4, **kwargs)
    first, s1 = linear_attention(
        q[:, :split], k[:, :split], v[:, :split], return_state=True, chunk_size=4, **kwargs
    )
    second, s2 = linear_attention(
        q[:, split:], k[:, split:], v[:, split:], initial_state=s1, return_state=True,
        chunk_size=4, **kwargs,
    )  # fmt: skip
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    torch.testing.assert_close(s2, s_whole)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("prefill", [0, 6])
def test_step_decoding_equals_parallel(config, prefill):
    q, k, v, lam, _ = make_inputs(length=15, dim=4, state=False)
    kwargs = _kwargs(config, lam)
    parallel = linear_attention(q, k, v, **kwargs)
    state = None
    outs = []
    if prefill:
        o, state = linear_attention(
            q[:, :prefill], k[:, :prefill], v[:, :prefill], return_state=True, **kwargs
        )
        outs.append(o)
    for t in range(prefill, q.shape[1]):
        o, state = linear_attention_step(q[:, t], k[:, t], v[:, t], state, **kwargs)
        outs.append(o[:, None])
    torch.testing.assert_close(torch.cat(outs, dim=1), parallel)


def test_step_state_is_constant_size_and_float32_for_bf16():
    q, k, v, lam, _ = make_inputs(length=3, dim=4, state=False)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    state = None
    for t in range(3):
        o, state = linear_attention_step(q[:, t], k[:, t], v[:, t], state, decay=lam.float())
        assert state.shape == (2, 3, 4, 6)
        assert state.dtype == torch.float32
        assert o.dtype == torch.bfloat16


def test_step_rejects_bad_shapes():
    q, k, v, _, _ = make_inputs(length=2, dim=4, state=False)
    with pytest.raises(ValueError, match="q must be"):
        linear_attention_step(q, k[:, 0], v[:, 0])
    with pytest.raises(ValueError, match="state must be"):
        linear_attention_step(q[:, 0], k[:, 0], v[:, 0], torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="sequence-level"):
        linear_attention_step(q[:, 0], k[:, 0], v[:, 0], feature_map="inline")
