"""Gates, pruning, VHR, VAR, PAINT and pattern swaps on tiny transformers models."""

from __future__ import annotations

import pytest
import torch
from hf_models import build, logits_of, twin

from headwise import patterns as P
from headwise.hf import (
    ablate_heads,
    attach,
    capture,
    emphasize_tokens,
    gate_heads,
    pattern_drift,
    prune_heads,
    redistribute,
    reinforce_heads,
    select_sites,
    vhr_select,
    visual_attention_redistribution,
)


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_head_gated_to_zero_contributes_nothing(family):
    eager, inputs = build(family)
    model = twin(eager)
    attach(model)
    head, dim = 2, 16
    if family == "llama":
        proj = eager.model.layers[1].self_attn.o_proj
    else:
        proj = eager.layers[1].attention.o_proj
    with torch.no_grad():
        proj.weight[:, head * dim : (head + 1) * dim] = 0
        expected = logits_of(family, eager(**inputs))
        with ablate_heads(model, {"blocks.1.attn": [head]}):
            got = logits_of(family, model(**inputs))
        with gate_heads(model, {"blocks.1.attn": torch.ones(4)}):
            unchanged = logits_of(family, model(**inputs))
        plain = logits_of(family, model(**inputs))
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(unchanged, plain)


def test_pruning_stops_at_threshold_and_keeps_masks():
    model, inputs = build("bert")
    attach(model)
    with torch.no_grad():
        target = model(**inputs).last_hidden_state

    def loss_fn(m, batch):
        return (m(**batch).last_hidden_state - target).pow(2).mean() + m(
            **batch
        ).last_hidden_state.pow(2).mean()

    def metric_fn(m, batch):
        out = m(**batch).last_hidden_state
        return float(torch.cosine_similarity(out.flatten(), target.flatten(), 0))

    result = prune_heads(model, [inputs], loss_fn, metric_fn, threshold=0.95, step=0.25)
    pruned = [n for n, _ in result.history]
    assert pruned == sorted(pruned) and result.history[0] == (0, pytest.approx(1.0))
    assert all(value >= 0.95 for _, value in result.history)
    kept = int(sum(m.sum() for m in result.mask.values()))
    assert kept == 8 - pruned[-1]


def test_vhr_selection_rules():
    vhd = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 5.0])
    ta = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 9.0])  # head 5 surges without the image
    assert vhr_select(vhd, ta) == [2, 3, 4]
    assert vhr_select(vhd, torch.ones(6)) == [3, 4, 5]


def test_vhr_alpha_one_is_identity_and_reinforces_chosen_heads():
    model, inputs = build("llava")
    ids = inputs["input_ids"]
    text_only = {"input_ids": ids[:, ids[0] != 100]}
    with torch.no_grad():
        plain = model(**inputs).logits
        with reinforce_heads(model, inputs, text_only, alpha=1.0, layers="language_model"):
            same = model(**inputs).logits
        with reinforce_heads(model, inputs, text_only, alpha=2.0, layers="language_model") as ch:
            moved = model(**inputs).logits
    assert torch.allclose(same, plain, atol=1e-6)
    assert set(ch) == {f"language_model.blocks.{i}.attn" for i in range(4)}
    assert all(len(h) == 2 for h in ch.values())  # above the median of 4 distinct values
    assert not torch.allclose(moved, plain, atol=1e-4)


def test_redistribute_keeps_rows_and_ratios():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(1, 2, 3, 8), -1)
    sink = torch.zeros(1, 8, dtype=torch.bool)
    sink[0, [0, 3]] = True
    image = torch.zeros(1, 8, dtype=torch.bool)
    image[0, 2:6] = True
    new, selected = redistribute(probs, sink, image, rho=0.0, keep=0.6, min_image_mass=0.0)
    assert selected.all()
    assert torch.allclose(new.sum(-1), torch.ones(1, 2, 3))
    assert torch.allclose(new[..., [0, 3]], 0.6 * probs[..., [0, 3]])
    vis = [2, 4, 5]  # image non-sink keys keep their ratios
    assert torch.allclose(new[..., vis] / new[..., [2]], probs[..., vis] / probs[..., [2]])
    same, _ = redistribute(probs, sink, image, rho=0.0, keep=1.0, min_image_mass=0.0)
    assert torch.allclose(same, probs)


def test_var_in_llava_keeps_rows_and_changes_only_selected_heads():
    model, inputs = build("llava")
    ids = inputs["input_ids"]
    image = ids == 100
    language = model.model.language_model.layers

    def inject(mod, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        x[:, [3, 4], 0] += 1e3  # two "massive" image tokens in dim 0
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handles = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in language]
    try:
        with torch.no_grad(), capture(model, layers="language_model") as plain:
            model(**inputs)
        with (
            torch.no_grad(),
            visual_attention_redistribution(
                model, image, sink_dims=[0], rho=0.5, heads=[1, 3]
            ) as var,
            capture(model, layers="language_model") as steered,
        ):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    changed_any = False
    for i in range(3):  # layer 3 (the last, never steered) sees layer 2's changes
        name = f"language_model.blocks.{i}.attn"
        a, b = plain[f"{name}.pattern"], steered[f"{name}.pattern"]
        assert torch.allclose(b.sum(-1), torch.ones_like(b.sum(-1)), atol=1e-5)
        changed = (a - b).abs().amax(-1) > 1e-7  # (B, H, L)
        assert not changed[:, [0, 2]].any()  # heads not chosen
        assert not changed[:, :, :19].any()  # queries up to the image's end
        if i == 2:  # VAR's default layers: [2, L) without the last
            sel = var.selected[name]
            assert torch.equal(changed, sel)
            changed_any |= bool(sel.any())
        else:
            assert not changed.any()
    assert changed_any


def test_paint_boosts_last_row_only():
    model, inputs = build("llama")
    tokens = [1, 4]
    with torch.no_grad():
        with capture(model, layers=[1], what=("scores", "pattern")) as base:
            plain = model(**inputs).logits
        with emphasize_tokens(model, tokens, alpha=0.0, beta=0.0):
            same = model(**inputs).logits
        with (
            emphasize_tokens(model, [1], summary_tokens=[4], layers=[1]),
            capture(model, layers=[1], what=("scores", "pattern")) as steered,
        ):
            model(**inputs)
    assert torch.allclose(same, plain, atol=1e-6)
    z0, z1 = base["blocks.1.attn.scores"], steered["blocks.1.attn.scores"]
    assert torch.allclose(z0[:, :, :-1], z1[:, :, :-1])
    last0, last1 = z0[:, :, -1], z1[:, :, -1]
    assert torch.allclose(last1[..., 1], last0[..., 1] + 0.7 * last0[..., 1].abs())
    assert torch.allclose(last1[..., 4], last0[..., 4] + 0.3 * last0[..., 4].abs())
    others = [0, 2, 3, 5]
    assert torch.equal(last1[..., others], last0[..., others])


@pytest.mark.parametrize("family", ["llama", "bert", "clip"])
def test_full_pattern_swap_changes_nothing(family):
    model, inputs = build(family)
    output = "logits_per_image" if family == "clip" else "auto"
    drift = pattern_drift(model, inputs, P.full(), output=output)
    assert drift.max_abs < 1e-5


def test_sparse_pattern_swap_reports_drift():
    model, inputs = build("llama")
    plan = P.per_head([P.sliding_window(2)] * 2 + [P.strided(2, 0, block=2)] * 2)
    drift = pattern_drift(model, inputs, plan, layers=[1])
    assert drift.max_abs > 1e-3 and 0 < drift.relative < 10


def test_moa_plan_and_s2_shards_swap_into_a_real_model():
    from headwise.layers.moa import MoAPlan
    from headwise.layers.s2 import S2Pattern

    model, inputs = build("llama")
    # alpha >= the length keeps every key: the MoA plan must change nothing
    dense_plan = MoAPlan.uniform(2, 4, alpha=4096, beta=0.0, max_new_tokens=0)
    sites = [s.name for s in select_sites(model, None)]
    patterns = dict(zip(sites, dense_plan.layer_patterns(length=12)))
    assert pattern_drift(model, inputs, patterns).max_abs < 1e-5
    sparse = MoAPlan.uniform(
        2, 4, alpha=0, beta=0.25, block=2, sink_size=2, min_cache=2, max_new_tokens=0
    )
    patterns = dict(zip(sites, sparse.layer_patterns(length=12)))
    assert pattern_drift(model, inputs, patterns).max_abs > 1e-4
    shards = S2Pattern(heads=4, num_kv_heads=2, block=2, n_local=1, vert_stride=2, head_step=1)
    assert pattern_drift(model, inputs, shards, layers=[1]).max_abs > 1e-4
