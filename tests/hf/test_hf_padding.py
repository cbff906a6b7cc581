"""Padding never skews what is captured or scored: query rows count real tokens, scores take the
attention mask and leave padding rows out."""

from __future__ import annotations

import math

import pytest
import torch
from hf_models import build, twin

from headwise.hf import (
    attention_entropy,
    capture,
    distance_profile,
    mean_attention_distance,
    vlsam_head_weights,
)


def _eager(family):
    eager, inputs = build(family)
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    return twin(eager), inputs, out


def test_capture_last_row_is_the_last_real_token_of_a_right_padded_batch():
    model, inputs, out = _eager("bert")  # row 1: tokens 7..9 are padding
    with torch.no_grad(), capture(model, heads=[0, 2], rows=[-1]) as cache:
        model(**inputs)
    got = cache["blocks.1.attn.pattern"]
    assert cache.rows["blocks.1.attn.pattern"].tolist() == [[9], [6]]
    want = out.attentions[1][:, [0, 2]]
    assert torch.allclose(got[0, :, 0], want[0, :, 9], atol=1e-6)
    assert torch.allclose(got[1, :, 0], want[1, :, 6], atol=1e-6)
    z = cache["blocks.1.attn.z"]
    assert z.shape == (2, 1, 2, 16)


def test_capture_first_row_is_the_first_real_token_of_a_left_padded_batch():
    model, inputs, out = _eager("llama")  # row 1: tokens 0..2 are padding
    with torch.no_grad(), capture(model, rows=[0, -1], what=("pattern",)) as cache:
        model(**inputs)
    assert cache.rows["blocks.0.attn.pattern"].tolist() == [[0, 11], [3, 11]]
    want = out.attentions[0]
    got = cache["blocks.0.attn.pattern"]
    assert torch.allclose(got[1, :, 0], want[1, :, 3], atol=1e-6)
    assert torch.allclose(got[0, :, 0], want[0, :, 0], atol=1e-6)


def test_cross_attention_rows_count_the_decoder_real_tokens():
    model, inputs, out = _eager("t5")  # decoder row 1: tokens 5, 6 are padding
    with torch.no_grad(), capture(model, layers="decoder", rows=[-1]) as cache:
        model(**inputs)
    got = cache["decoder.blocks.0.cross_attn.pattern"]
    want = out.cross_attentions[0]
    assert torch.allclose(got[1, :, 0], want[1, :, 4], atol=1e-6)
    assert torch.allclose(got[0, :, 0], want[0, :, 6], atol=1e-6)


def test_rows_that_some_sequences_lack_are_refused():
    model, inputs, _ = _eager("bert")  # 10 and 7 real tokens
    with pytest.raises(ValueError, match="rows"):
        with torch.no_grad(), capture(model, rows=[8]):
            model(**inputs)


def _padded_probs():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 6, 6), -1)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    probs = probs * mask[:, None, None, :]  # padding keys get no weight, as in eager
    return probs / probs.sum(-1, keepdim=True), mask


def test_entropy_leaves_padding_rows_out():
    probs, mask = _padded_probs()
    plain = attention_entropy(probs)
    masked = attention_entropy(probs, attention_mask=mask)
    assert torch.isnan(masked[1, :, 4:]).all()
    assert torch.equal(masked[0], plain[0]) and torch.equal(masked[1, :, :4], plain[1, :, :4])


def test_mean_distance_and_profile_average_real_rows_only():
    probs, mask = _padded_probs()
    d = (torch.arange(6)[:, None] - torch.arange(6)[None]).abs().float()
    got = mean_attention_distance(probs, attention_mask=mask)
    per_row = (probs * d).sum(-1)
    assert torch.allclose(got[0], per_row[0].mean(-1))
    assert torch.allclose(got[1], per_row[1, :, :4].mean(-1))
    assert not torch.allclose(mean_attention_distance(probs)[1], got[1])
    profile = distance_profile(probs, attention_mask=mask)
    # distance 5 links only positions 0 and 5; position 5 is padding in sequence 1
    want = (probs[0, :, 0, 5] + probs[0, :, 5, 0]) / 2
    assert torch.allclose(profile[:, 5], want)
    weights = vlsam_head_weights(probs, attention_mask=mask)
    assert torch.allclose(weights[1], probs[1, :, :4].amax(-1).mean(-1))


def test_scores_check_the_mask_shape():
    probs, mask = _padded_probs()
    with pytest.raises(ValueError, match="attention_mask"):
        attention_entropy(probs, attention_mask=mask[:, :5])
    assert math.isfinite(float(mean_attention_distance(probs, attention_mask=mask).sum()))
