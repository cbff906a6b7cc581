"""VHR, layer-synchronous (Algorithm 1 of He et al., 2025) on tiny transformers models."""

from __future__ import annotations

import pytest
import torch
from hf_models import build
from transformers import DynamicCache

import headwise.hf.vhr as vhr
from headwise.hf import (
    VHRReinforcement,
    attach,
    gate_heads,
    vhr_generate,
    vhr_inputs,
    vhr_select,
    vision_head_divergence,
    vision_head_reinforcement,
)
from headwise.hooks import Call, Site

IMAGE = 100  # LLaVA's image token id in hf_models


def _llava():
    model, inputs = build("llava")
    ids = inputs["input_ids"]
    return model, inputs, {"input_ids": ids[:, ids[0] != IMAGE]}


def _llama():
    model, _ = build("llama")
    ids = torch.randint(0, 128, (1, 14), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(14, dtype=torch.bool)
    keep[2:8] = False  # the "image" tokens the text-only branch lacks
    return model, {"input_ids": ids}, {"input_ids": ids[:, keep]}


def _gates(heads: dict[str, list[int]], alpha: float, num_heads: int = 4) -> dict:
    gates = {}
    for name, chosen in heads.items():
        gates[name] = torch.ones(num_heads)
        gates[name][chosen] = alpha
    return gates


def test_outlier_rule_and_median_on_hand_made_arrays():
    vhd = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 6.0])
    ta = torch.tensor([1.0, 1.0, 30.0, 1.0, 1.0, 1.0, 1.0, 20.0])
    # head 7 surges without the image (VHD and TA above mu + sigma): zeroed, so never chosen;
    # head 2 has a large TA only: not an outlier, just below the median
    assert vhr_select(vhd, ta) == [3, 4, 5, 6]
    assert vhr_select(vhd, torch.ones(8)) == [4, 5, 6, 7]  # same VHD, no surge: kept

    # the hook computes VHD/TA from both rows' last position and applies the same rule
    heads, dim, length = 8, 3, 5
    text = torch.randn(heads, dim, generator=torch.Generator().manual_seed(0))
    direction = torch.nn.functional.normalize(torch.ones(dim), dim=0)
    image = text + vhd[:, None] * direction
    text[7] *= 40.0  # the surge head's text-only output is huge ...
    image[7] = text[7] + vhd[7] * direction  # ... and it moves by VHD = 6 with the image
    out = torch.randn(2, length, heads, dim)
    out[0, -1], out[1, -1] = image, text
    site = Site("blocks.0.attn", 0, "", heads, [], torch.nn.Identity())
    q = torch.zeros(2, length, heads, dim)
    call = Call(site, torch.nn.Identity(), q, q, q, 1.0, None, None, None, out=out.clone())
    hook = VHRReinforcement([site.name], alpha=2.0)
    hook.edit_output(call)
    assert torch.allclose(hook.vhd[site.name], vhd, atol=1e-5)
    assert torch.allclose(hook.ta[site.name], text.pow(2).sum(-1))
    assert hook.chosen[site.name] == [3, 4, 5, 6]
    gate = torch.ones(heads)
    gate[[3, 4, 5, 6]] = 2.0
    assert torch.equal(call.out, out * gate[:, None])  # every row and position (default)


def test_alpha_one_leaves_logits_unchanged():
    model, inputs, text_only = _llava()
    batch = vhr_inputs(inputs, text_only)
    assert batch["attention_mask"][1].tolist() == [0] * 16 + [1] * 7  # text-only left-padded
    with torch.no_grad():
        image = model(**inputs).logits  # eager
        text = model(**text_only).logits
        attach(model)
        plain_batch = model(**batch).logits  # headwise attention, no hook
        with vision_head_reinforcement(model, alpha=1.0) as hook:
            same = model(**batch).logits
            assert len(hook.chosen) == 4  # every language layer chose its heads
            hook.reset()
            with pytest.raises(ValueError, match="batch of 2"):
                model(**inputs)
    assert torch.equal(same, plain_batch)
    assert torch.allclose(same[0], image[0], atol=1e-5)
    assert torch.allclose(same[1, 16:], text[0], atol=1e-5)
    result = vhr_generate(model, inputs, text_only, max_new_tokens=2, alpha=1.0)
    assert torch.allclose(result.logits[0], image[0, -1], atol=1e-5)


def test_heads_chosen_at_step_zero_are_reused_with_the_cache(monkeypatch):
    model, inputs, text_only = _llava()
    selections = []

    def counting_select(vhd, ta):
        selections.append(vhd)
        return vhr_select(vhd, ta)

    monkeypatch.setattr(vhr, "vhr_select", counting_select)
    result = vhr_generate(model, inputs, text_only, max_new_tokens=3)
    assert len(selections) == 4  # one choice per language layer, at step 0 only
    assert result.tokens.shape == (1, 3) and result.logits.shape == (3, 128)
    assert all(len(h) == 2 for h in result.heads.values())

    # the image branch alone with those heads gated by alpha, greedy with a KV cache, must
    # give the same logits at every step: the text-only row does not change row 0, and steps
    # >= 1 reinforce exactly the step-0 heads
    gates = _gates(result.heads, 2.0)
    ids, cache, logits = inputs["input_ids"], DynamicCache(), []
    with torch.no_grad(), gate_heads(model, gates):
        out = model(**inputs, cache=cache, use_cache=True)
        for _ in range(3):
            logits.append(out.logits[0, -1])
            token = out.logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, token], 1)
            out = model(input_ids=token, cache=cache, use_cache=True)
    assert torch.equal(ids[:, -3:], result.tokens)
    assert torch.allclose(torch.stack(logits), result.logits, atol=1e-4)
    plain = vhr_generate(model, inputs, text_only, max_new_tokens=3, alpha=1.0)
    assert not torch.allclose(plain.logits, result.logits, atol=1e-3)


def test_vhd_of_a_layer_is_measured_on_reinforced_states():
    model, image, text = _llama()
    alpha = 2.0
    vhd0, ta0 = vision_head_divergence(model, image, text, layers=[0])
    heads0 = vhr_select(vhd0["blocks.0.attn"], ta0["blocks.0.attn"])
    with gate_heads(model, _gates({"blocks.0.attn": heads0}, alpha)):
        synced, synced_ta = vision_head_divergence(model, image, text, layers=[1])
    unreinforced, _ = vision_head_divergence(model, image, text, layers=[1])
    with torch.no_grad(), vision_head_reinforcement(model, alpha) as hook:
        model(**vhr_inputs(image, text))
    assert hook.chosen["blocks.0.attn"] == heads0
    assert torch.allclose(hook.vhd["blocks.0.attn"], vhd0["blocks.0.attn"], atol=1e-5)
    assert torch.allclose(hook.vhd["blocks.1.attn"], synced["blocks.1.attn"], atol=1e-5)
    assert torch.allclose(hook.ta["blocks.1.attn"], synced_ta["blocks.1.attn"], atol=1e-5)
    assert hook.chosen["blocks.1.attn"] == vhr_select(
        synced["blocks.1.attn"], synced_ta["blocks.1.attn"]
    )
    assert not torch.allclose(hook.vhd["blocks.1.attn"], unreinforced["blocks.1.attn"], atol=1e-3)


@pytest.mark.parametrize("scale_prompt", [True, False])
def test_scaling_a_head_adds_its_projected_output(scale_prompt):
    model, image, text = _llama()
    alpha, proj = 3.0, model.model.layers[1].self_attn.o_proj
    seen = []
    handle = proj.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    batch = vhr_inputs(image, text)
    try:
        with torch.no_grad():
            model(**batch)
            with vision_head_reinforcement(model, alpha, [1], scale_prompt) as hook:
                model(**batch)
    finally:
        handle.remove()
    (o, before), (_, after) = seen  # layer 1's input is the same: layer 0 is not reinforced
    o = o.unflatten(-1, (4, 16))  # (B, L, H, D)
    expected = torch.zeros_like(before)
    for h in hook.chosen["blocks.1.attn"]:
        expected += (alpha - 1) * o[:, :, h] @ proj.weight[:, h * 16 : (h + 1) * 16].T
    if not scale_prompt:
        expected[:, :-1] = 0
    assert len(hook.chosen["blocks.1.attn"]) == 2
    assert torch.allclose(after - before, expected, atol=1e-5)
    if not scale_prompt:
        assert (after - before)[:, :-1].abs().max() < 1e-6
