"""MoA on a Hugging Face causal LM: calibration, profiling through the hook engine, plan, apply."""

from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")

from headwise.evals.text import passages  # noqa: E402
from headwise.hf import attach, swap_pattern  # noqa: E402
from headwise.hf.moa import moa_calibration, moa_plan, moa_profile  # noqa: E402
from headwise.layers.moa import MoAPlan  # noqa: E402
from headwise.moa import attention_influence, plan_density  # noqa: E402

EOS = 1


class _CharTokenizer:
    """A character tokenizer with a chat template: enough for the calibration's needs."""

    eos_token_id = EOS
    pad_token_id = 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}</>" for m in messages) + "<assistant>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % 120 for c in text]}


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=EOS,
    )
    return transformers.LlamaForCausalLM(config).eval()


TEXTS = passages(3, 3000, seed=1)


def test_calibration_answers_are_the_dense_models_greedy_tokens_and_only_they_are_labeled():
    model, tok = _llama(), _CharTokenizer()
    # a generation config's penalties would bend "greedy": calibration must ignore them
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.no_repeat_ngram_size = 1
    batches = moa_calibration(model, tok, TEXTS, 96, samples=2, answer_tokens=8, seed=3)
    assert len(batches) == 2
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        assert ids.shape == labels.shape == (1, 96)
        prompt = 96 - 8
        assert (labels[0, :prompt] == -100).all()
        assert torch.equal(labels[0, prompt:], ids[0, prompt:])
        with torch.no_grad():
            logits = model(ids).logits[0, prompt - 1 : -1]
        logits[:, EOS] = -math.inf  # the answer may not end before its 8 tokens
        assert torch.equal(logits.argmax(-1), ids[0, prompt:])
    assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    again = moa_calibration(model, tok, TEXTS, 96, samples=2, answer_tokens=8, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_profile_equals_the_influence_of_eager_attention_probabilities():
    model, tok = _llama(1), _CharTokenizer()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    attach(model)
    model.set_attn_implementation("sdpa")  # attached once, switched away since: re-attached
    batches = moa_calibration(model, tok, TEXTS, 60, samples=2, answer_tokens=6, instruction="Sum.")
    tiles = moa_profile(model, batches, block=8)
    assert [t.shape for t in tiles] == [(4, 8, 8)] * 2
    expected = [0.0, 0.0]
    for batch in batches:
        embeds = eager.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
        out = eager(inputs_embeds=embeds, labels=batch["labels"], output_attentions=True)
        grads = torch.autograd.grad(out.loss, out.attentions)
        for layer, (a, g) in enumerate(zip(out.attentions, grads)):
            expected[layer] = expected[layer] + attention_influence(a, g, block=8) / 2
    for got, want in zip(tiles, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())


def test_plan_in_one_call_round_trips_through_json_and_swaps_in(tmp_path):
    model, tok = _llama(2), _CharTokenizer()
    plan = moa_plan(
        model, tok, TEXTS, 0.6, lengths=(256, 512), samples=1, answer_tokens=4, alpha_step=64
    )
    assert plan.max_new_tokens == 0
    for n in (256, 512):
        assert 0.9 * 0.6 - 1e-9 <= plan_density(plan, n) <= 0.6 + 1e-9
    for alphas, betas in zip(plan.alphas, plan.betas):
        spans = list(zip(alphas, betas))
        assert spans[0] == spans[1] and spans[2] == spans[3]  # one span per KV head
        assert len(set(spans)) <= 2
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = MoAPlan.load(path)
    assert loaded == plan
    ids = torch.randint(2, 128, (1, 512))
    with torch.no_grad():
        dense = model(ids).logits
        with swap_pattern(model, loaded):
            sparse = model(ids).logits
        with swap_pattern(model, MoAPlan.uniform(2, 4, math.inf, 0.0)):
            full = model(ids).logits
    torch.testing.assert_close(full, dense)
    # the first 128 tokens see every key under any plan; later ones lose some
    torch.testing.assert_close(sparse[:, :128], dense[:, :128])
    assert not torch.allclose(sparse[:, 128:], dense[:, 128:])


def test_bad_arguments():
    model, tok = _llama(), _CharTokenizer()
    with pytest.raises(ValueError, match="leaves no room for text"):
        moa_calibration(model, tok, TEXTS, 20, answer_tokens=8)
    with pytest.raises(ValueError, match="too short"):
        moa_calibration(model, tok, ["A short text."], 96, answer_tokens=8)
    with pytest.raises(TypeError, match="texts must be"):
        moa_calibration(model, tok, "one string", 96)
    batches = moa_calibration(model, tok, TEXTS, 40, answer_tokens=4, instruction="Sum.")
    batches += moa_calibration(model, tok, TEXTS, 48, answer_tokens=4, instruction="Sum.")
    with pytest.raises(ValueError, match="one length"):
        moa_profile(model, batches)


@pytest.mark.real_model
def test_smollm2_profile_is_dominated_by_the_sink_block(smollm2):
    model, tokenizer = smollm2
    batches = moa_calibration(model, tokenizer, TEXTS, 192, samples=1, answer_tokens=4)
    tiles = moa_profile(model, batches)
    assert len(tiles) == 30 and all(t.shape == (9, 3, 3) for t in tiles)
    total = torch.stack(tiles)
    assert torch.isfinite(total).all() and (total >= 0).all()
    # the answer rows (last block) draw most of their influence from the first (sink) block
    # and their own block, as StreamingLLM and MoA find
    last = total[:, :, -1]
    assert (last[..., 0] + last[..., -1]).sum() > 0.5 * last.sum()
