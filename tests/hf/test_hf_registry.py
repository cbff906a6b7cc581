"""The "headwise" attention function in real transformers models equals eager attention."""

from __future__ import annotations

import pytest
import torch
from hf_models import FAMILIES, build, logits_of, twin

from headwise.hf import attach, capture
from headwise.hf.registry import attention_forward
from headwise.ops.attention import BACKENDS


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_path_equals_eager(family):
    eager, inputs = build(family)
    model = twin(eager)
    attach(model)
    with torch.no_grad():
        expected = logits_of(family, eager(**inputs))
        got = logits_of(family, model(**inputs))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_tower_names():
    model, _ = build("llava")
    names = [s.name for s in attach(model)]
    assert names[:2] == ["vision_tower.blocks.0.attn", "vision_tower.blocks.1.attn"]
    assert names[2:] == [f"language_model.blocks.{i}.attn" for i in range(4)]


def test_without_mask_function_padding_vanishes():
    """The trap: an attention function registered without its mask builder loses the padding."""
    from transformers import AttentionInterface

    eager, inputs = build("llama")
    AttentionInterface.register("headwise_no_mask", attention_forward)
    bare = twin(eager)
    bare.set_attn_implementation("headwise_no_mask")
    ours = twin(eager)
    attach(ours)
    with torch.no_grad():
        expected = eager(**inputs).logits[1, 3:]  # the left-padded row's real tokens
        assert not torch.allclose(bare(**inputs).logits[1, 3:], expected, atol=1e-3)
        assert torch.allclose(ours(**inputs).logits[1, 3:], expected, atol=1e-5)


def test_generation_with_cache_equals_eager():
    eager, _ = build("llama")
    model = twin(eager)
    attach(model)
    ids = torch.randint(0, 128, (1, 6))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = eager.generate(ids, **kwargs, output_logits=True, return_dict_in_generate=True)
        got = model.generate(ids, **kwargs, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def _eager_attentions(family, eager, inputs):
    out = eager(**inputs, output_attentions=True)
    if family == "clip":
        return {
            "text_model.": out.text_model_output.attentions,
            "vision_model.": out.vision_model_output.attentions,
        }
    if family == "llava":
        # the language model's own attentions; the vision tower is checked through CLIP
        return {"language_model.": out.attentions}
    return {"": out.attentions}


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_probabilities_equal_eager(family):
    eager, inputs = build(family)
    model = twin(eager)
    heads, rows = [1, 3], [0, 2, -1]
    with torch.no_grad():
        towers = _eager_attentions(family, eager, inputs)
        with capture(model, heads=heads, rows=rows, what=("pattern", "z")) as cache:
            model(**inputs)
    for prefix, attentions in towers.items():
        for i, expected in enumerate(attentions):
            got = cache[f"{prefix}blocks.{i}.attn.pattern"]
            # rows count each sequence's real tokens: positions differ in a padded batch
            at = cache.rows[f"{prefix}blocks.{i}.attn.pattern"]
            want = expected[:, heads].take_along_dim(at[:, None, :, None], 2)
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-6), (family, prefix, i)
            assert cache[f"{prefix}blocks.{i}.attn.z"].shape[1:3] == (len(rows), len(heads))


def test_capture_stays_off_the_dense_path(monkeypatch):
    """A few heads are recomputed from the LSE; no layer runs the L x L reference backend."""
    eager, inputs = build("bert")
    model = twin(eager)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference (L x L) backend ran")

    monkeypatch.setattr(BACKENDS["reference"], "run", refuse)
    with torch.no_grad(), capture(model, heads=[2], rows=[-1], what=("pattern",)) as cache:
        model(**inputs)
    assert cache["blocks.1.attn.pattern"].shape == (2, 1, 1, 10)
    assert torch.allclose(cache["blocks.1.attn.pattern"].sum(-1), torch.ones(2, 1, 1))


def test_scores_and_z_match_eager_definitions():
    eager, inputs = build("bert")
    model = twin(eager)
    layer = eager.encoder.layer[0].attention
    seen = {}
    layer.output.dense.register_forward_pre_hook(lambda m, a: seen.setdefault("z", a[0]))
    with torch.no_grad():
        eager(**inputs)
        with capture(model, layers=[0], what=("scores", "pattern", "z")) as cache:
            model(**inputs)
    z = seen["z"].view(2, 10, 4, 16)
    assert torch.allclose(cache["blocks.0.attn.z"], z, atol=1e-6)
    assert torch.allclose(
        torch.softmax(cache["blocks.0.attn.scores"], -1), cache["blocks.0.attn.pattern"], atol=1e-6
    )
