"""Attention dropout through the registry (issue 16): a transformers model in training mode
passes ``dropout`` and headwise applies it as eager does, reproducibly under
``torch.manual_seed``; hooks and attention weights, which see the undropped probabilities, are
refused with it."""

from __future__ import annotations

import pytest
import torch
from hf_models import _decoder_config, _padded_ids, build, transformers, twin

from headwise._checks import Unsupported
from headwise.hf import attach, capture


def _mistral(p: float):
    """A 2-layer Mistral (sliding window 4, GQA) whose only dropout is attention dropout ``p``."""
    torch.manual_seed(0)
    config = _decoder_config(transformers.MistralConfig, sliding_window=4, attention_dropout=p)
    model = transformers.MistralForCausalLM(config)
    model.set_attn_implementation("eager")
    ids, mask = _padded_ids(left=True)
    return model, {"input_ids": ids, "attention_mask": mask}


def test_training_equals_eager_under_the_same_seed():
    """Here every call runs on SDPA, whose CPU dropout draws eager's ``F.dropout`` mask from the
    same generator state (headwise draws no seed of its own for it): the same outputs and
    gradients as eager in training, bit for bit up to rounding."""
    eager, inputs = _mistral(0.3)
    model = twin(eager)
    attach(model)
    eager.train(), model.train()
    outputs = []
    for m in (model, eager):
        torch.manual_seed(1)
        logits = m(**inputs).logits
        logits.square().mean().backward()
        outputs.append((logits, [p.grad for p in m.parameters()]))
    (got, got_grads), (want, want_grads) = outputs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    eager.eval()
    with torch.no_grad():
        assert not torch.allclose(want, eager(**inputs).logits, atol=1e-3)


def test_training_is_reproducible_and_eval_untouched():
    eager, inputs = _mistral(0.3)
    model = twin(eager)
    attach(model)
    model.train()
    torch.manual_seed(0)
    first = model(**inputs).logits
    torch.manual_seed(0)
    assert torch.equal(first, model(**inputs).logits)
    first.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, eager.eval()(**inputs).logits, atol=1e-5)
        assert not torch.allclose(first, model(**inputs).logits)


def test_t5_trains_with_dropout():
    """T5 passes ``dropout=dropout_rate`` in training (headwise refused it before)."""
    model, inputs = build("t5")
    attach(model)
    model.train()
    out = model(**inputs, labels=inputs["decoder_input_ids"]).loss
    out.backward()
    assert torch.isfinite(out)


def test_hooks_and_weights_are_refused_with_dropout():
    eager, inputs = _mistral(0.3)
    model = twin(eager)
    attach(model)
    model.train()
    with pytest.raises(Unsupported, match=r"MistralAttention.*dropout.*output_attentions"):
        model(**inputs, output_attentions=True)
    with pytest.raises(Unsupported, match=r"MistralAttention.*dropout.*hooks"):
        with capture(model, heads=[0], rows=[-1], what=("pattern",)):
            model(**inputs)
