"""Every architecture the registry serves gives eager's numbers, padding included, and every
keyword transformers passes to the attention function is either used or refused by name."""

from __future__ import annotations

import pytest
import torch
from hf_models import ALL_FAMILIES, build, logits_of, twin

from headwise._checks import Unsupported
from headwise.hf import attach, capture
from headwise.hf.registry import attention_forward


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_headwise_equals_eager_with_padding(family):
    eager, inputs = build(family)
    model = twin(eager)
    attach(model)
    with torch.no_grad():
        expected = logits_of(family, eager(**inputs))
        got = logits_of(family, model(**inputs))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_site_names_are_unique(family):
    model, _ = build(family)
    names = [s.name for s in attach(model)]
    assert len(names) == len(set(names)), names


def test_t5_sites_name_encoder_decoder_and_cross_attention():
    model, _ = build("t5")
    names = [s.name for s in attach(model)]
    assert names == [
        "encoder.blocks.0.attn",
        "encoder.blocks.1.attn",
        "decoder.blocks.0.attn",
        "decoder.blocks.0.cross_attn",
        "decoder.blocks.1.attn",
        "decoder.blocks.1.cross_attn",
    ]


def test_t5_without_masks_equals_eager():
    """No padding: the causal decoder runs as a pattern, the position bias as the only bias."""
    eager, inputs = build("t5")
    model = twin(eager)
    attach(model)
    plain = {k: inputs[k] for k in ("input_ids", "decoder_input_ids")}
    with torch.no_grad():
        expected, got = eager(**plain).logits, model(**plain).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_t5_relative_position_bias_gets_eager_gradients():
    """T5's bias arrives as ``position_bias=``: it is added to the scores and learns as in eager."""
    eager, inputs = build("t5")
    model = twin(eager)
    attach(model)
    grads = []
    for m in (eager, model):
        m.zero_grad()
        m(**inputs).logits.pow(2).mean().backward()
        grads.append(m.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad)
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_sliding_window_and_softcap_change_the_output():
    """The identity test above is not trivial: the window hides keys, the softcap bends scores."""
    for family, field in (("mistral", "sliding_window"), ("gemma2", "attn_logit_softcapping")):
        model, inputs = build(family)
        attach(model)
        with torch.no_grad():
            with_it = model(**inputs).logits
            setattr(model.config, field, None)
            for module in model.modules():
                if hasattr(module, field):
                    setattr(module, field, None)
            without = model(**inputs).logits
        assert (with_it - without).abs().max() > 1e-3, family


class _Module(torch.nn.Module):
    is_causal = False


def _qkv():
    q = torch.randn(1, 2, 3, 4)
    return q, q.clone(), q.clone()


@pytest.mark.parametrize(
    "keyword, value",
    [
        ("s_aux", torch.zeros(2)),
        ("sinks", torch.zeros(2)),
        ("cu_seq_lens_q", torch.tensor([0, 3])),
        ("head_mask", torch.ones(2)),
        ("some_future_keyword", None),
    ],
)
def test_unhandled_keywords_are_refused_by_name(keyword, value):
    with pytest.raises(Unsupported, match=rf"_Module.*{keyword}"):
        attention_forward(_Module(), *_qkv(), None, **{keyword: value})


def test_a_model_with_learned_sinks_is_refused_by_name():
    """GPT-OSS adds a learned sink logit per head (``s_aux``): refused, not dropped."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    model = GptOssForCausalLM(config).eval()
    attach(model)
    with pytest.raises(Unsupported, match=r"GptOssAttention \(gpt_oss\) passes s_aux"):
        model(input_ids=torch.randint(0, 128, (1, 6)))


def test_model_level_keywords_are_accepted():
    """Keywords that only steer other parts of the model (eager ignores them too)."""
    q, k, v = _qkv()
    out, _ = attention_forward(
        _Module(), q, k, v, None, position_ids=torch.arange(3)[None], use_cache=True
    )
    assert out.shape == (1, 3, 2, 4)


def _eager_attentions(family, output):
    if family == "t5":
        return {
            "encoder.": (output.encoder_attentions, "attn"),
            "decoder.": (output.decoder_attentions, "attn"),
            "decoder.cross": (output.cross_attentions, "cross_attn"),
        }
    if family == "clip":
        return {
            "text_model.": (output.text_model_output.attentions, "attn"),
            "vision_model.": (output.vision_model_output.attentions, "attn"),
        }
    if family == "llava":
        return {"language_model.": (output.attentions, "attn")}
    return {"": (output.attentions, "attn")}


# GPT-2 strips the keyword before its layers: transformers' output collector still asks for them
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "bert", "t5", "clip", "llava"])
def test_output_attentions_returns_eager_probabilities(family):
    eager, inputs = build(family)
    model = twin(eager)
    attach(model)
    with torch.no_grad():
        expected = eager(**inputs, output_attentions=True)
        got = model(**inputs, output_attentions=True)
    for key, (want, _) in _eager_attentions(family, expected).items():
        have = _eager_attentions(family, got)[key][0]
        assert len(have) == len(want) > 0, key
        for a, b in zip(have, want):
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-6), (key, (a - b).abs().max())


def test_t5_capture_includes_the_position_bias():
    eager, inputs = build("t5")
    model = twin(eager)
    with torch.no_grad():
        expected = eager(**inputs, output_attentions=True)
        with capture(model, what=("pattern",)) as cache:
            model(**inputs)
    for prefix, (attentions, kind) in _eager_attentions("t5", expected).items():
        tower = prefix.split(".")[0]
        for i, want in enumerate(attentions):
            got = cache[f"{tower}.blocks.{i}.{kind}.pattern"]
            assert torch.allclose(got, want, atol=1e-6), (prefix, i)


def test_falcon_output_attentions_given_to_the_module_returns_eager_probabilities():
    """Falcon hands ``output_attentions`` to its attention module, not to the function."""
    import transformers as t

    torch.manual_seed(0)
    config = t.FalconConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=False
    )
    eager = t.FalconForCausalLM(config).eval()
    eager.set_attn_implementation("eager")
    model = twin(eager)
    attach(model)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        want = eager(ids, output_attentions=True).attentions
        have = model(ids, output_attentions=True).attentions
        plain = model(ids).attentions
    assert len(have) == len(want) == 2
    for a, b in zip(have, want):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert plain is None


def test_a_model_that_bypasses_the_attention_interface_is_refused():
    """GPT-Neo keeps its own attention code: attaching would leave every hook without effect."""
    import transformers as t

    config = t.GPTNeoConfig(
        vocab_size=128,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=64,
    )
    with pytest.raises(Unsupported, match=r"GPTNeoForCausalLM \(gpt_neo\) does not call"):
        attach(t.GPTNeoForCausalLM(config))
