"""Every sequence-side layer: meta-device construction, ``reset_parameters`` and input checks.

The FSDP route builds a model on the meta device, materialises it with ``to_empty`` (garbage
memory) and calls ``reset_parameters``: that must re-initialise every parameter and buffer,
recursively, to the layer's documented init. Built on the meta device (which draws no random
numbers) and reset under a seed, a layer must equal a fresh layer built under the same seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from headwise.layers import (
    AgentAttention,
    AgentAttention2d,
    BasedAttention,
    CombinerAttention,
    ConditionalCrossAttention,
    CrossAttention,
    GaussianAdaptiveAttention,
    GlobalLocalCrossAttention,
    InLineAttention,
    LightningAttention,
    MoAAttention,
    MoHAttention,
    MultiBranchAttentionPooling,
    MultiHeadAttention,
    PairwiseCrossAttention,
    ParameterFreeCrossAttention,
    RelativeConvAttention,
    S2Attention,
    SelectiveMultiHeadAttention,
    SparsifinerAttention,
)
from headwise.models import BertConfig
from headwise.models.bert import BertLayer, UnpaddedBert

E, H, B, L = 16, 4, 2, 6
BERT = BertConfig(
    vocab_size=11,
    hidden_size=E,
    num_hidden_layers=2,
    num_attention_heads=H,
    intermediate_size=24,
    max_position_embeddings=L,
)


def _x(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape or (B, L, E), generator=torch.Generator().manual_seed(1)).to(dtype)


@dataclass(frozen=True)
class Case:
    """A layer factory, a call on float inputs of ``dtype`` and the name of the checked input."""

    build: Callable[[], nn.Module]
    call: Callable[[nn.Module, torch.dtype], object]
    input_name: str = "x"

    def __repr__(self) -> str:
        return type(self.build()).__name__


def _first(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


CASES = {
    "mha": Case(lambda: MultiHeadAttention(E, H), lambda m, dt: m(_x(dt))),
    "mha_gqa_norm_rotary": Case(
        lambda: MultiHeadAttention(E, H, num_kv_heads=2, qk_norm="rms", rotary=True),
        lambda m, dt: m(_x(dt)),
    ),
    "mha_layernorm": Case(
        lambda: MultiHeadAttention(E, H, qk_norm="layer", causal=True), lambda m, dt: m(_x(dt))
    ),
    "cross": Case(
        lambda: CrossAttention(E, H, kv_dim=8),
        lambda m, dt: m(_x(torch.float32), _x(dt, B, 3, 8)),
        "context",
    ),
    "glca": Case(
        lambda: GlobalLocalCrossAttention(E, H, top_ratio=0.5),
        lambda m, dt: m(_x(dt), _x(torch.float32, B, L)),
    ),
    "pwca": Case(
        lambda: PairwiseCrossAttention(E, H),
        lambda m, dt: m(_x(torch.float32), _x(dt, B, 3, E)),
        "distractor",
    ),
    "conditional": Case(
        lambda: ConditionalCrossAttention(E, H, 3, queries_per_condition=2),
        lambda m, dt: m(_x(dt), torch.tensor([0, 2])),
        "image",
    ),
    "parameter_free": Case(
        lambda: ParameterFreeCrossAttention(E, drop_ratio=0.3, num_visual_tokens=3),
        lambda m, dt: m(_x(dt), _x(torch.float32, B, 3, E)),
    ),
    "moh": Case(
        lambda: MoHAttention(E, H, num_shared=2, top_k=1), lambda m, dt: m(_x(dt)).output
    ),
    "moh_all_shared": Case(
        lambda: MoHAttention(E, H, num_shared=H, top_k=1), lambda m, dt: m(_x(dt)).output
    ),
    "moh_query_norm": Case(
        lambda: MoHAttention(E, H, num_shared=1, top_k=2, router="query_norm", rotary=True),
        lambda m, dt: m(_x(dt)).output,
    ),
    "moa": Case(
        lambda: MoAAttention(
            E, H, alphas=[0.0] * H, betas=[0.5] * H, block=2, sink_size=2, min_cache=2,
            max_new_tokens=0,
        ),
        lambda m, dt: m(_x(dt)),
    ),
    "s2": Case(
        lambda: S2Attention(E, H, block_size=2, local_blocks=1, vert_stride=2),
        lambda m, dt: m(_x(dt)),
    ),
    "sparsifiner": Case(
        lambda: SparsifinerAttention(E, H, L, keep_rate=0.5, token_reduction=2),
        lambda m, dt: m(_x(dt)),
    ),
    "gaussian": Case(lambda: GaussianAdaptiveAttention(2, 3), lambda m, dt: m(_x(dt))),
    "agent": Case(lambda: AgentAttention(E, H, agent_num=4), lambda m, dt: m(_x(dt))),
    "agent2d": Case(
        lambda: AgentAttention2d(E, H, (2, 3), agent_num=4), lambda m, dt: m(_x(dt))
    ),
    "based": Case(
        lambda: BasedAttention(E, H, feature_dim=4, window_size=2), lambda m, dt: m(_x(dt))
    ),
    "combiner_fixed": Case(
        lambda: CombinerAttention(E, H, segment_len=2), lambda m, dt: m(_x(dt))
    ),
    "combiner_axial": Case(
        lambda: CombinerAttention(E, H, segment_len=3, variant="axial", causal=False),
        lambda m, dt: m(_x(dt)),
    ),
    "inline": Case(lambda: InLineAttention(E, H), lambda m, dt: m(_x(dt), (2, 3))),
    "lightning": Case(
        lambda: LightningAttention(E, H, layer_idx=1, num_layers=3), lambda m, dt: m(_x(dt))
    ),
    "rcmha": Case(lambda: RelativeConvAttention(E, H, max_len=8), lambda m, dt: m(_x(dt))),
    "selective": Case(lambda: SelectiveMultiHeadAttention(E, H), lambda m, dt: m(_x(dt))),
    "acmil": Case(
        lambda: MultiBranchAttentionPooling(E, 8, num_branches=3, top_k=2),
        lambda m, dt: m(_x(dt)).bag,
        "h",
    ),
    "bert_layer": Case(
        lambda: BertLayer(BERT),
        lambda m, dt: m(_x(dt, 5, E), torch.tensor([0, 2, 5])),
    ),
    "bert": Case(
        lambda: UnpaddedBert(BERT),
        lambda m, dt: m(
            torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]),
            torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        ),
    ),
}
ids = list(CASES)
params = [CASES[k] for k in ids]


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@pytest.mark.parametrize("case", params, ids=ids)
def test_builds_on_meta_without_touching_memory(case):
    with torch.device("meta"):
        layer = case.build()
    tensors = _tensors(layer)
    assert tensors and all(t.is_meta for t in tensors.values())


@pytest.mark.parametrize("case", params, ids=ids)
def test_reset_parameters_equals_fresh_init_under_the_same_seed(case):
    torch.manual_seed(123)
    fresh = case.build()
    with torch.device("meta"):
        layer = case.build()
    layer.to_empty(device="cpu")
    torch.manual_seed(123)
    layer.reset_parameters()
    expected, got = _tensors(fresh), _tensors(layer)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
    fresh.eval(), layer.eval()
    out = _first(case.call(layer, torch.float32))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _first(case.call(fresh, torch.float32)), rtol=0, atol=0)


@pytest.mark.parametrize("case", params, ids=ids)
def test_reset_parameters_overwrites_every_parameter_and_buffer(case):
    """Garbage after ``to_empty`` (here NaN everywhere) must not survive ``reset_parameters``."""
    with torch.device("meta"):
        layer = case.build()
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for t in _tensors(layer).values():
            t.fill_(float("nan") if t.is_floating_point() else -1)
    layer.reset_parameters()
    fresh = case.build()
    for name, t in _tensors(layer).items():
        assert torch.isfinite(t).all(), f"{name} was not re-initialised"
        t, ref = t.detach(), _tensors(fresh)[name].detach()
        # Same init distribution as a fresh layer: equal mean and spread to sampling error.
        if t.numel() > 64:
            spread = float(ref.double().std())
            assert abs(float(t.double().mean() - ref.double().mean())) < 0.3 * spread + 1e-6, name
            assert float(t.double().std()) == pytest.approx(spread, rel=0.3, abs=1e-6), name
        elif t.numel() and float(ref.double().std() if ref.numel() > 1 else 0) == 0:
            torch.testing.assert_close(t, ref, msg=name)  # constant inits (ones, zeros)
    layer.eval()
    assert torch.isfinite(_first(case.call(layer, torch.float32))).all()


@pytest.mark.parametrize("case", [c for k, c in zip(ids, params) if k != "bert"], ids=ids[:-1])
def test_float64_input_to_float32_layer_names_the_input_and_both_dtypes(case):
    layer = case.build()
    with pytest.raises(TypeError) as err:
        case.call(layer, torch.float64)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert case.input_name in message and "float64" in message and "float32" in message


def test_float64_layers_accept_float64_and_autocast_is_not_refused():
    layer = MultiHeadAttention(E, H).double()
    assert layer(_x(torch.float64)).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert MultiHeadAttention(E, H)(_x(torch.bfloat16)).dtype == torch.bfloat16


def test_input_on_another_device_is_named():
    with torch.device("meta"):
        layer = MultiHeadAttention(E, H)
    with pytest.raises(ValueError, match=r"x must be .*meta.*got .*cpu"):
        layer(_x(torch.float32))


def test_bert_refuses_float_ids():
    with pytest.raises(TypeError, match="input_ids must hold integer"):
        UnpaddedBert(BERT)(torch.ones(2, 3), torch.ones(2, 3))


BAD_BOOLS = [
    (lambda v: MultiHeadAttention(E, H, causal=v), "causal"),
    (lambda v: MultiHeadAttention(E, H, rotary=v), "rotary"),
    (lambda v: MultiHeadAttention(E, H, bias=v), "bias"),
    (lambda v: MoHAttention(E, H, num_shared=2, top_k=1, causal=v), "causal"),
    (lambda v: SparsifinerAttention(E, H, L, causal=v), "causal"),
    (lambda v: SparsifinerAttention(E, H, L, cls_token=v), "cls_token"),
    (lambda v: SparsifinerAttention(E, H, L, qkv_bias=v), "qkv_bias"),
    (lambda v: CombinerAttention(E, H, segment_len=2, causal=v), "causal"),
    (lambda v: SelectiveMultiHeadAttention(E, H, causal=v), "causal"),
    (lambda v: S2Attention(E, H, homo_head=v), "homo_head"),
    (lambda v: S2Attention(E, H, causal=v), "causal"),
    (lambda v: AgentAttention(E, H, qkv_bias=v), "qkv_bias"),
    (lambda v: AgentAttention2d(E, H, (2, 2), agent_num=4, qkv_bias=v), "qkv_bias"),
    (lambda v: InLineAttention(E, H, qkv_bias=v), "qkv_bias"),
    (lambda v: UnpaddedBert(BERT, add_pooling_layer=v), "add_pooling_layer"),
]


@pytest.mark.parametrize("value", ["no", 0, None])
@pytest.mark.parametrize("build, name", BAD_BOOLS, ids=[n for _, n in BAD_BOOLS])
def test_bool_arguments_are_not_coerced(build, name, value):
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        build(value)


def test_forward_bool_flags_are_not_coerced():
    x = _x(torch.float32)
    with pytest.raises(TypeError, match="dense must be True or False"):
        SparsifinerAttention(E, H, L)(x, dense="no")
    with pytest.raises(TypeError, match="return_approx must be True or False"):
        SparsifinerAttention(E, H, L)(x, return_approx=1)
    with pytest.raises(TypeError, match="return_state must be True or False"):
        LightningAttention(E, H)(x, return_state="yes")


BAD_NUMBERS = [
    (lambda: MultiHeadAttention(E, 4.0), "num_heads"),
    (lambda: MultiHeadAttention(E, H, rope_base="10000"), "rope_base"),
    (lambda: MultiHeadAttention(E, H, scale=float("nan")), "scale"),
    (lambda: MultiHeadAttention(E, H, kv_dim=True), "kv_dim"),
    (lambda: MoHAttention(E, H, num_shared=2, top_k=1.0), "top_k"),
    (lambda: MoHAttention(E, H, num_shared=2, top_k=1, eps=0.0), "eps"),
    (lambda: SparsifinerAttention(E, H, L, keep_rate="0.5"), "keep_rate"),
    (lambda: SparsifinerAttention(E, H, L, basis_threshold=float("inf")), "basis_threshold"),
    (lambda: GaussianAdaptiveAttention(2, 3, axis=1.0), "axis"),
    (lambda: GaussianAdaptiveAttention(2, 3, eps=-1.0), "eps"),
    (lambda: GaussianAdaptiveAttention(2, 3, padding_value="0"), "padding_value"),
    (lambda: ParameterFreeCrossAttention(16.0), "embed_dim"),
    (lambda: ParameterFreeCrossAttention(E, num_visual_tokens=2.5), "num_visual_tokens"),
    (lambda: ParameterFreeCrossAttention(E, scale=float("nan")), "scale"),
    (lambda: ParameterFreeCrossAttention(E, drop_ratio=True), "drop_ratio"),
    (lambda: MultiBranchAttentionPooling(E, mask_ratio="0.5"), "mask_ratio"),
    (lambda: AgentAttention2d(E, H, (2.5, 2), agent_num=4), "resolution"),
    (lambda: LightningAttention(E, H, layer_idx=0.5), "layer_idx"),
    (lambda: LightningAttention(E, H, num_layers=True), "num_layers"),
    (lambda: LightningAttention(E, H, chunk_size=2.0), "chunk_size"),
    (lambda: BasedAttention(E, H, chunk_size=2.0), "chunk_size"),
    (lambda: CombinerAttention(E, H, segment_len=2, head_dim=2.0), "head_dim"),
    (lambda: SelectiveMultiHeadAttention(E, H, scale="1"), "scale"),
    (lambda: GlobalLocalCrossAttention(E, H, top_ratio="0.5"), "top_ratio"),
    (lambda: RelativeConvAttention(E, H, max_len=8.0), "max_len"),
    (lambda: S2Attention(E, H, block_size=2.0), "block"),
]


@pytest.mark.parametrize("build, name", BAD_NUMBERS, ids=[n for _, n in BAD_NUMBERS])
def test_numeric_arguments_are_not_coerced(build, name):
    with pytest.raises(ValueError, match=name):
        build()
