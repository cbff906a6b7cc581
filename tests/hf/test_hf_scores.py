"""Head scores: importance, entropy, distances, sinks, VHD, rollout/flow, VL-SAM."""

from __future__ import annotations

import math

import torch
from hf_models import build

from headwise.hf import (
    attention_entropy,
    attention_flow,
    attention_rollout,
    distance_profile,
    find_sinks,
    gate_heads,
    head_importance_ablation,
    head_importance_gradient,
    mean_attention_distance,
    vision_head_divergence,
    vlsam_head_weights,
    vlsam_map,
)


def test_gradient_importance_matches_finite_differences():
    model, inputs = build("llama")
    model.double()

    def loss_fn(m, batch):
        return m(**batch).logits.pow(2).mean()

    scores = head_importance_gradient(model, [inputs], loss_fn, layers=[1], normalize=False)
    eps = 1e-3  # Llama's RMSNorm runs in float32 even in a float64 model: not smaller
    with torch.no_grad():
        for h in range(4):
            moved = []
            for sign in (1, -1):
                gate = torch.ones(4, dtype=torch.float64)
                gate[h] += sign * eps
                with gate_heads(model, {"blocks.1.attn": gate}):
                    moved.append(float(loss_fn(model, inputs)))
            fd = abs(moved[0] - moved[1]) / (2 * eps)
            assert math.isclose(float(scores["blocks.1.attn"][h]), fd, rel_tol=1e-2), h


def test_ablation_importance_zero_for_a_dead_head():
    model, inputs = build("bert")
    with torch.no_grad():
        model.encoder.layer[0].attention.output.dense.weight[:, 16:32] = 0  # head 1

    def metric(m, batch):
        return float(m(**batch).last_hidden_state[..., :8].sum())  # not the LayerNorm-fixed norm

    scores = head_importance_ablation(model, [inputs], metric, layers=[0])
    assert abs(float(scores["blocks.0.attn"][1])) < 1e-4
    assert scores["blocks.0.attn"].abs().max() > 1e-3


def test_entropy_and_distances_of_known_patterns():
    n = 6
    uniform = torch.full((1, 1, n, n), 1 / n)
    assert torch.allclose(attention_entropy(uniform), torch.full((1, 1, n), math.log(n)))
    left = torch.zeros(1, 1, n, n)
    left[0, 0, torch.arange(1, n), torch.arange(n - 1)] = 1
    left[0, 0, 0, 0] = 1
    assert torch.allclose(attention_entropy(left), torch.zeros(1, 1, n), atol=1e-6)
    assert math.isclose(float(mean_attention_distance(left)), (n - 1) / n, rel_tol=1e-6)
    profile = distance_profile(left)
    assert int(profile[0].argmax()) == 1
    # 2 x 2 patch grid after a CLS token: every patch attends its right/left neighbour
    grid = torch.zeros(1, 1, 5, 5)
    for i, j in ((1, 2), (2, 1), (3, 4), (4, 3)):
        grid[0, 0, i, j] = 1
    grid[0, 0, 0, 0] = 1
    assert math.isclose(float(mean_attention_distance(grid, (2, 2), 1)), 1.0, rel_tol=1e-6)


def test_rollout_and_flow():
    n = 5
    eye = torch.eye(n).expand(1, 3, n, n)
    assert torch.allclose(attention_rollout([eye, eye]), torch.eye(n)[None])
    torch.manual_seed(0)
    layers = [torch.softmax(torch.randn(1, 2, n, n), -1) for _ in range(3)]
    rollout = attention_rollout(layers)
    assert torch.allclose(rollout.sum(-1), torch.ones(1, n), atol=1e-6)
    one = attention_flow(layers[:1])
    a = 0.5 * layers[0].mean(1) + 0.5 * torch.eye(n)
    assert torch.allclose(one, a, atol=1e-6)  # one layer: the flow is the edge itself
    flow = attention_flow(layers[:2])
    assert (flow <= 1 + 1e-6).all() and (flow > 0).all()


def test_vlsam_weights_and_regulariser():
    n = 4
    peaked = torch.eye(n).expand(1, 1, n, n)
    flat = torch.full((1, 1, n, n), 1 / n)
    weights = vlsam_head_weights(torch.cat([peaked, flat], 1))
    assert weights[0, 0] > weights[0, 1]
    causal = torch.tril(torch.ones(n, n))
    causal = (causal / causal.sum(-1, keepdim=True)).expand(1, 1, n, n)
    out = vlsam_map([causal])
    # the first column (seen by every query) is damped by 1 - (N - 1) / N = 1 / N
    expected = torch.eye(n) + causal[0, 0] * vlsam_head_weights(causal)[0, 0]
    expected[:, 0] = torch.eye(n)[:, 0] + (expected[:, 0] - torch.eye(n)[:, 0]) / n
    assert torch.allclose(out[0, :, 0], expected[:, 0], atol=1e-6)


def test_find_sinks_and_vhd_on_tiny_models():
    model, inputs = build("llama")
    sinks = find_sinks(model, inputs, dims=[0], tau=0.0)
    # tau = 0: every real token is a sink, so every head's share is 1
    for share in sinks.share.values():
        assert torch.allclose(share, torch.ones(4), atol=1e-5)
    assert len(sinks.ranking) == 8
    llava, llava_inputs = build("llava")
    ids = llava_inputs["input_ids"]
    vhd, _ = vision_head_divergence(
        llava, llava_inputs, {"input_ids": ids[:, ids[0] != 100]}, layers="language_model"
    )
    assert set(vhd) == {f"language_model.blocks.{i}.attn" for i in range(4)}
    assert all(v.shape == (4,) and (v > 0).all() for v in vhd.values())
    same, _ = vision_head_divergence(llava, llava_inputs, llava_inputs, layers="language_model")
    assert all(v.abs().max() < 1e-5 for v in same.values())
