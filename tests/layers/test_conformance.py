"""Every layer, one suite: each entry of the registry (:mod:`headwise.layers.registry`) at its
small default configuration and a few variants, plus the models built from the layers (BERT, the
vision backbone with every mixer). For each case:

- output shape and dtype (float32 and float64);
- a finite backward that reaches every parameter;
- backend equivalence: ``backend="auto"`` equals ``"reference"``, outputs and gradients, on an
  odd length / odd grid (padding and ragged-block paths);
- a ``state_dict`` round trip into a fresh layer gives identical outputs;
- the FSDP route: built on the meta device, materialised with ``to_empty`` (garbage memory) and
  reset, every parameter and buffer holds the documented init, equal to a fresh layer's;
- error messages: a wrong input rank, a wrong input dtype and bad constructor arguments name the
  argument;
- vision mixers: token form equals map form; batch-1 gradients equal finite differences.

Each layer's defining property is tested beside it, in ``tests/layers/test_<family>.py``.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

from headwise import layers
from headwise.layers import (
    LightningAttention,
    MultiHeadAttention,
    SparsifinerAttention,
    create_layer,
    list_layers,
)
from headwise.layers.registry import DIM, HEADS, LENGTH, layer_spec
from headwise.layers.vision import (
    AggregatedAttention,
    ChannelAttention,
    GatedPositionalSelfAttention,
    HaloAttention,
    HiLoAttention,
    MSAConv,
    MultiAxisAttention,
    ScaleAwareModulation,
    SingleHeadAttention,
    SpectralGating,
    SubspaceAttention,
    WindowAttention,
)
from headwise.models import BertConfig, available_mixers, vision_backbone
from headwise.models.bert import BertLayer, UnpaddedBert
from headwise.types import Backend

BERT = BertConfig(
    vocab_size=11,
    hidden_size=DIM,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    intermediate_size=24,
    max_position_embeddings=LENGTH,
)


@dataclass(frozen=True)
class Case:
    """A layer or model: ``build(**overrides)``, ``inputs(batch, dtype=, seed=)`` (keyword
    arguments of one forward call), the main output tensor, and what the suite may expect."""

    build: Callable[..., nn.Module]
    inputs: Callable[..., dict[str, Any]]
    output: Callable[[Any], torch.Tensor] = lambda out: out
    kind: str = "model"
    #: output shape at batch 2 when it is not the first input's
    shape: tuple[int, ...] | None = None
    #: the oracle backend, for layers that take ``backend=``
    reference: str | None = None
    #: inputs and parameters (by name suffix) that get no gradient by design
    no_grad: tuple[str, ...] = ()


def _registered(name: str, **overrides: Any) -> Case:
    spec = layer_spec(name)
    return Case(
        partial(spec.build, **overrides),
        spec.example_inputs,
        spec.output,
        spec.kind,
        reference=spec.reference_backend if spec.has_backend else None,
    )


def _bert_layer_inputs(batch: int = 2, *, dtype=None, seed: int = 0) -> dict[str, Any]:
    x = torch.randn(5, DIM, generator=torch.Generator().manual_seed(seed))
    return {"x": x.to(dtype or torch.float32), "cu_seqlens": torch.tensor([0, 2, 5])}


def _bert_inputs(batch: int = 2, *, dtype=None, seed: int = 0) -> dict[str, Any]:
    return {
        "input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
    }


def _images(batch: int = 2, *, dtype=None, seed: int = 0) -> dict[str, Any]:
    images = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return {"images": images.to(dtype or torch.float32)}


CASES: dict[str, Case] = {name: _registered(name) for name in list_layers()}
CASES.update(
    {
        "multihead_gqa_norm_rotary": _registered(
            "multihead", num_kv_heads=2, qk_norm="rms", rotary=True
        ),
        "multihead_layernorm_causal": _registered("multihead", qk_norm="layer", causal=True),
        "moh_all_shared": _registered("moh", num_shared=HEADS, top_k=1),
        "moh_query_norm": _registered(
            "moh", num_shared=1, top_k=2, router="query_norm", rotary=True
        ),
        "combiner_axial": _registered("combiner", variant="axial", causal=False),
        "multi_axis_grid": _registered("multi_axis", partition="grid"),
        "msa_conv_stride": _registered("msa_conv", dim_out=12, stride=2),
        "msa_conv_depthwise": _registered(
            "msa_conv", num_heads=1, kernel_size=(3, 1), stride=2, depthwise=True
        ),
        "aggregated_full": _registered("aggregated", sr_ratio=1),
        "bert_layer": Case(lambda: BertLayer(BERT), _bert_layer_inputs),
        "bert": Case(
            lambda: UnpaddedBert(BERT),
            _bert_inputs,
            lambda out: out.last_hidden_state,
            shape=(5, DIM),  # the 5 real tokens, packed
            no_grad=("pooler.weight", "pooler.bias"),  # the pooled output is not checked
        ),
    }
)
CASES.update(
    {
        f"backbone_{mixer}": Case(
            lambda mixer=mixer: vision_backbone(mixer, depths=(1, 2), dims=(8, 16), img_size=16),
            _images,
            shape=(2, 16),
        )
        for mixer in available_mixers()
    }
)
#: no gradient by design: ranking scores enter through top-k only; GPSA's positional bias is
#: constant over keys (softmax drops it); SMHA's router only selects; Sparsifiner's predictor
#: learns from its distillation loss only (the mask is detached); SHViT's pre-norm bias is a
#: per-channel constant that the training-mode BatchNorm after the (bias-free) 1x1 conv
#: subtracts again with the batch mean
NO_GRAD = {
    "global_local_cross": ("scores",),
    "gpsa": ("pos_proj.bias",),
    "backbone_gpsa": ("pos_proj.bias",),
    "single_head": ("pre_norm.bias",),
    "backbone_single_head": ("pre_norm.bias",),
    "selective": ("router.weight", "router.bias"),
    "sparsifiner": (
        "token_proj",
        "basis",
        "q_reduce.weight",
        "q_reduce.bias",
        "k_reduce.weight",
        "k_reduce.bias",
    ),
}
for case_id, names in NO_GRAD.items():
    CASES[case_id] = replace(CASES[case_id], no_grad=names)
CASES["global_local_cross"] = replace(CASES["global_local_cross"], shape=(2, 4, DIM))
CASES["conditional_cross"] = replace(CASES["conditional_cross"], shape=(2, 2, DIM))
CASES["multi_branch_pooling"] = replace(CASES["multi_branch_pooling"], shape=(2, DIM))
CASES["msa_conv_stride"] = replace(CASES["msa_conv_stride"], shape=(2, 2, 3, 12))
CASES["msa_conv_depthwise"] = replace(CASES["msa_conv_depthwise"], shape=(2, 2, 3, 8))

IDS = sorted(CASES)
BACKEND_IDS = [i for i in IDS if CASES[i].reference]
VISION_IDS = [i for i in IDS if CASES[i].kind == "vision"]


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(module.named_parameters(), module.named_buffers()))


def _floats(inputs: dict[str, Any]) -> list[str]:
    return [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _perturb(module: nn.Module, seed: int = 5) -> None:
    # away from the init, where zero-initialised weights (SHViT's output BN) hide a path
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator).to(p))


def _expected_shape(case: Case, inputs: dict[str, Any]) -> tuple[int, ...]:
    if case.shape is not None:
        return case.shape
    return tuple(next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape)


def _forward_backward(case: Case, layer: nn.Module) -> list[torch.Tensor]:
    """Output, then the gradients of every float input and every parameter (``None`` kept)."""
    inputs = case.inputs()
    for name in _floats(inputs):
        inputs[name] = inputs[name].requires_grad_()
    out = case.output(layer(**inputs))
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * weight).sum().backward()
    return [out, *(inputs[n].grad for n in _floats(inputs))] + [p.grad for p in layer.parameters()]


# -- the registry ------------------------------------------------------------------------------


def _public_layer_classes() -> set[type]:
    return {
        obj
        for module in (layers, layers.vision)
        for obj in (getattr(module, name) for name in module.__all__)
        if isinstance(obj, type) and issubclass(obj, nn.Module) and not inspect.isabstract(obj)
    }


def test_every_public_layer_is_registered():
    registered = {layer_spec(name).cls for name in list_layers()}
    missing = sorted(cls.__name__ for cls in _public_layer_classes() - registered)
    assert not missing, f"not in headwise.layers.registry: {missing}"


def test_list_layers_by_kind_and_create_layer():
    sequence, vision = list_layers("sequence"), list_layers("vision")
    assert set(sequence) | set(vision) == set(list_layers()) and not set(sequence) & set(vision)
    assert list(list_layers()) == sorted(list_layers())
    assert "multihead" in sequence and "hilo" in vision
    layer = create_layer("hilo", dim=32, num_heads=4)
    assert isinstance(layer, HiLoAttention) and (layer.dim, layer.window_size) == (32, 2)
    with pytest.raises(ValueError, match="name must be one of"):
        create_layer("nope")
    with pytest.raises(ValueError, match="kind must be one of"):
        list_layers("audio")


BACKEND_LAYERS = [
    n for n in list_layers() if "backend" in inspect.signature(layer_spec(n).cls).parameters
]


@pytest.mark.parametrize("name", BACKEND_LAYERS)
def test_backend_argument_is_typed_as_backend(name):
    """``backend`` takes a name or a tuple of names (:data:`headwise.types.Backend`)."""
    assert typing.get_type_hints(layer_spec(name).cls.__init__)["backend"] == Backend


# -- shapes, backward, backends, state_dict ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case_id", [i for i in IDS if not i.startswith("backbone_")])
def test_output_shape_and_dtype(case_id, dtype):
    """(The backbone's stage shapes are tests/models/test_vision_backbone.py's.)"""
    case = CASES[case_id]
    torch.manual_seed(0)
    layer = case.build().to(dtype)
    inputs = case.inputs(dtype=dtype)
    out = case.output(layer(**inputs))
    assert out.dtype == dtype
    assert tuple(out.shape) == _expected_shape(case, inputs)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case_id", IDS)
def test_backward_is_finite_and_reaches_every_parameter(case_id):
    case = CASES[case_id]
    torch.manual_seed(0)
    layer = case.build()
    _perturb(layer)
    _, *grads = _forward_backward(case, layer)
    inputs = _floats(case.inputs())
    names = inputs + [n for n, _ in layer.named_parameters()]
    for name, grad in zip(names, grads):
        if name.endswith(case.no_grad):
            continue
        assert grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("case_id", BACKEND_IDS)
def test_auto_backend_equals_reference_with_gradients(case_id):
    case = CASES[case_id]
    results = []
    for backend in ("auto", case.reference):
        torch.manual_seed(0)
        layer = case.build(backend=backend)
        _perturb(layer)
        results.append(_forward_backward(case, layer))
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case_id", IDS)
def test_state_dict_round_trip_gives_identical_outputs(case_id):
    case = CASES[case_id]
    torch.manual_seed(0)
    layer = case.build().eval()
    _perturb(layer)
    torch.manual_seed(1)
    fresh = case.build().eval()
    assert fresh.load_state_dict(layer.state_dict()) is not None
    assert fresh.state_dict().keys() == layer.state_dict().keys()
    inputs = case.inputs()
    expected = case.output(layer(**inputs))
    torch.testing.assert_close(case.output(fresh(**inputs)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case_id", VISION_IDS)
def test_token_form_equals_map_form(case_id):
    case = CASES[case_id]
    torch.manual_seed(0)
    layer = case.build()
    if "size" not in inspect.signature(layer.forward).parameters:
        pytest.skip("takes maps only")
    x = case.inputs()["x"]
    y = layer(x)
    tokens = layer(x.flatten(1, 2), size=tuple(x.shape[1:3]))
    torch.testing.assert_close(tokens, y.flatten(1, 2))


# -- the FSDP route: meta device, to_empty, reset_parameters -------------------------------------


@pytest.mark.parametrize("case_id", IDS)
def test_builds_on_meta_without_touching_memory(case_id):
    case = CASES[case_id]
    torch.manual_seed(0)
    expected = case.output(case.build()(**case.inputs())).shape
    with torch.device("meta"):
        layer = case.build()
    tensors = _tensors(layer)
    assert tensors and all(t.is_meta for t in tensors.values())
    if case.kind == "vision" or case_id.startswith("backbone_"):
        meta = {
            k: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v
            for k, v in case.inputs().items()
        }
        assert case.output(layer(**meta)).shape == expected


@pytest.mark.parametrize("case_id", IDS)
def test_reset_parameters_equals_fresh_init_under_the_same_seed(case_id):
    case = CASES[case_id]
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
    inputs = case.inputs()
    out = case.output(layer(**inputs))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, case.output(fresh(**inputs)), rtol=0, atol=0)


def _garbage(module: nn.Module, *, recurse: bool = True) -> None:
    # what ``to_empty`` may leave: NaN, or -7 in integer buffers
    tensors = itertools.chain(module.parameters(recurse=recurse), module.buffers(recurse=recurse))
    with torch.no_grad():
        for t in tensors:
            t.fill_(float("nan") if t.is_floating_point() else -7)


def _assert_documented_init(case: Case, layer: nn.Module) -> None:
    """Every tensor of ``layer`` finite and holding the construction-time init: a deterministic
    one (constants, identity, locality, index tables) equal to a fresh layer's, a random one with
    a fresh layer's mean and spread up to sampling error (bounds that scale with the number of
    values, so that the same init drawn from another RNG state passes at any size)."""
    torch.manual_seed(0)
    built = _tensors(case.build())
    torch.manual_seed(2)
    rebuilt = _tensors(case.build())
    got = _tensors(layer)
    assert got.keys() == built.keys()
    for name, t in got.items():
        assert not t.is_floating_point() or torch.isfinite(t).all(), f"{name} was not reset"
        t, ref = t.detach(), built[name].detach()
        if torch.equal(ref, rebuilt[name]):  # a deterministic init (constants, eye, indices)
            torch.testing.assert_close(t, ref, msg=f"{name}: init differs from a fresh layer")
            continue
        if t.numel() < 16:  # too few values for statistics
            continue
        # the same distribution as construction: mean and spread equal to sampling error
        n, t, ref = t.numel(), t.double(), ref.double()
        spread = max(t.std().item(), ref.std().item())
        assert abs(t.mean() - ref.mean()) <= 5 * spread * (2 / n) ** 0.5, name
        assert 0.4 <= t.std() / ref.std() <= 2.5, name
        # log of a ratio of two sample spreads: standard error ~ n^-1/2; 4 of them tell
        # Kaiming-uniform (std 1/sqrt(3 fan_in)) from a normal(fan_in^-1/2) at 64 values
        assert abs(torch.log(t.std() / ref.std())) <= 4 / n**0.5, f"{name}: spread"


def _assert_runs(case: Case, layer: nn.Module) -> None:
    layer.eval()
    inputs = case.inputs()
    out = case.output(layer(**inputs))
    assert tuple(out.shape) == _expected_shape(case, inputs) and torch.isfinite(out).all()


@pytest.mark.parametrize("case_id", IDS)
def test_reset_parameters_overwrites_every_parameter_and_buffer(case_id):
    """Garbage after ``to_empty`` (here NaN, or -7 in integer buffers) must not survive
    ``reset_parameters``, and the values must follow the construction-time init."""
    case = CASES[case_id]
    with torch.device("meta"):
        layer = case.build()
    layer.to_empty(device="cpu")
    _garbage(layer)
    torch.manual_seed(1)
    layer.reset_parameters()
    _assert_documented_init(case, layer)
    _assert_runs(case, layer)


def _parents_first(root: nn.Module) -> list[nn.Module]:
    # breadth-first from the root, as FSDP1's ``_get_modules_to_materialize``
    order, queue = [], collections.deque([root])
    while queue:
        module = queue.popleft()
        order.append(module)
        queue.extend(module.children())
    return order


def _children_first(root: nn.Module) -> list[nn.Module]:
    return list(root.modules())[::-1]  # reversed pre-order: every child before its parent


@pytest.mark.parametrize("order", [_parents_first, _children_first], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case_id", IDS)
def test_module_by_module_materialisation_gives_the_documented_init(case_id, order):
    """FSDP1's meta-device materialisation (``_materialize_meta_module``), simulated exactly:
    for each module in ``order`` that owns parameters or buffers directly, ``to_empty(recurse=
    False)`` and ``reset_parameters()``, under PyTorch's convention that a module's reset
    initialises its own tensors. A layer that initialises a child's tensor in its own reset
    (GPSA's locality, SHViT's zero BN weight, TransNeXt's and SMT's trunc-normal Linears) loses
    that init when the child resets after it (parents first), or never applies it when the
    parent owns nothing directly (children first) (follow-up of issue 13 item 13)."""
    case = CASES[case_id]
    with torch.device("meta"):
        layer = case.build()
    torch.manual_seed(1)
    with torch.no_grad():
        for module in order(layer):
            if next(itertools.chain(module.parameters(False), module.buffers(False)), None) is None:
                continue
            module.to_empty(device="cpu", recurse=False)
            _garbage(module, recurse=False)
            module.reset_parameters()
    _assert_documented_init(case, layer)
    _assert_runs(case, layer)


@pytest.mark.parametrize("case_id", IDS)
def test_every_module_reset_in_turn_gives_the_documented_init(case_id):
    """``for m in model.modules(): m.reset_parameters()``, a common re-init loop."""
    case = CASES[case_id]
    with torch.device("meta"):
        layer = case.build()
    layer.to_empty(device="cpu")
    _garbage(layer)
    torch.manual_seed(1)
    for module in layer.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    _assert_documented_init(case, layer)


# -- error messages ------------------------------------------------------------------------------

#: every floating input of every case, but SpectralGating's (by design, see below) and GLCA's
#: ranking scores (only their order is used)
DTYPE_CASES = [
    (case_id, name)
    for case_id in IDS
    if not case_id.startswith("spectral")
    for name in _floats(CASES[case_id].inputs())
    if (case_id, name) != ("global_local_cross", "scores")
]


@pytest.mark.parametrize("case_id, name", DTYPE_CASES, ids=[f"{c}-{n}" for c, n in DTYPE_CASES])
def test_float64_input_to_float32_layer_names_the_input_and_both_dtypes(case_id, name):
    case = CASES[case_id]
    layer = case.build()
    inputs = case.inputs()
    inputs[name] = inputs[name].double()
    with pytest.raises(TypeError, match=rf"{name} must be torch.float32.*got torch.float64") as err:
        layer(**inputs)
    assert isinstance(err.value, ValueError)


def test_spectral_gating_computes_in_the_wider_dtype():
    # by design (AMP safety): the FFT runs in the promoted dtype, the output keeps the input's
    layer = SpectralGating(8, (3, 5))
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    assert layer(x).dtype == torch.float64
    torch.testing.assert_close(layer(x).float(), layer(x.float()), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case_id", [i for i in IDS if i != "gaussian"])  # GAAM: any rank
def test_wrong_input_rank_names_the_input(case_id):
    case = CASES[case_id]
    layer = case.build()
    inputs = case.inputs()
    name = next(k for k, v in inputs.items() if isinstance(v, torch.Tensor))
    inputs[name] = inputs[name][None]
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        layer(**inputs)


@pytest.mark.parametrize("name", list_layers())
def test_non_integer_size_argument_is_named(name):
    argument, value = next(iter(layer_spec(name).config().items()))
    with pytest.raises(TypeError, match=argument):
        create_layer(name, **{argument: value + 0.5})


def test_float64_layers_accept_float64_and_autocast_is_not_refused():
    layer = MultiHeadAttention(DIM, HEADS).double()
    x = layer_spec("multihead").example_inputs()["x"]
    assert layer(x.double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert MultiHeadAttention(DIM, HEADS)(x.bfloat16()).dtype == torch.bfloat16


def test_input_on_another_device_is_named():
    with torch.device("meta"):
        layer = MultiHeadAttention(DIM, HEADS)
    with pytest.raises(ValueError, match=r"x must be .*meta.*got .*cpu"):
        layer(**layer_spec("multihead").example_inputs())


def test_bert_refuses_float_ids():
    with pytest.raises(TypeError, match="input_ids must hold integer"):
        UnpaddedBert(BERT)(torch.ones(2, 3), torch.ones(2, 3))


#: (registered layer, boolean argument)
BAD_BOOLS = [
    ("multihead", "causal"),
    ("multihead", "rotary"),
    ("multihead", "bias"),
    ("moh", "causal"),
    ("sparsifiner", "causal"),
    ("sparsifiner", "cls_token"),
    ("sparsifiner", "qkv_bias"),
    ("combiner", "causal"),
    ("selective", "causal"),
    ("s2", "homo_head"),
    ("s2", "causal"),
    ("agent", "qkv_bias"),
    ("agent_2d", "qkv_bias"),
    ("inline", "qkv_bias"),
]


@pytest.mark.parametrize("value", ["no", 0, None])
@pytest.mark.parametrize("layer, name", BAD_BOOLS, ids=[f"{c}-{n}" for c, n in BAD_BOOLS])
def test_bool_arguments_are_not_coerced(layer, name, value):
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        create_layer(layer, **{name: value})


@pytest.mark.parametrize("value", ["no", 0, None])
def test_bert_bool_argument_is_not_coerced(value):
    with pytest.raises(TypeError, match="add_pooling_layer must be True or False"):
        UnpaddedBert(BERT, add_pooling_layer=value)


def test_forward_bool_flags_are_not_coerced():
    x = layer_spec("sparsifiner").example_inputs()["x"]
    with pytest.raises(TypeError, match="dense must be True or False"):
        SparsifinerAttention(DIM, HEADS, LENGTH)(x, dense="no")
    with pytest.raises(TypeError, match="return_approx must be True or False"):
        SparsifinerAttention(DIM, HEADS, LENGTH)(x, return_approx=1)
    with pytest.raises(TypeError, match="return_state must be True or False"):
        LightningAttention(DIM, HEADS)(x, return_state="yes")


#: (registered layer, arguments, the name the error must give)
BAD_NUMBERS = [
    ("multihead", {"num_heads": 4.0}, "num_heads"),
    ("multihead", {"rope_base": "10000"}, "rope_base"),
    ("multihead", {"scale": float("nan")}, "scale"),
    ("multihead", {"kv_dim": True}, "kv_dim"),
    ("moh", {"top_k": 1.0}, "top_k"),
    ("moh", {"eps": 0.0}, "eps"),
    ("sparsifiner", {"keep_rate": "0.5"}, "keep_rate"),
    ("sparsifiner", {"basis_threshold": float("inf")}, "basis_threshold"),
    ("gaussian", {"axis": 1.0}, "axis"),
    ("gaussian", {"eps": -1.0}, "eps"),
    ("gaussian", {"padding_value": "0"}, "padding_value"),
    ("parameter_free_cross", {"embed_dim": 16.0}, "embed_dim"),
    ("parameter_free_cross", {"num_visual_tokens": 2.5}, "num_visual_tokens"),
    ("parameter_free_cross", {"scale": float("nan")}, "scale"),
    ("parameter_free_cross", {"drop_ratio": True}, "drop_ratio"),
    ("multi_branch_pooling", {"mask_ratio": "0.5"}, "mask_ratio"),
    ("agent_2d", {"resolution": (2.5, 2)}, "resolution"),
    ("lightning", {"layer_idx": 0.5}, "layer_idx"),
    ("lightning", {"num_layers": True}, "num_layers"),
    ("lightning", {"chunk_size": 2.0}, "chunk_size"),
    ("based", {"chunk_size": 2.0}, "chunk_size"),
    ("combiner", {"head_dim": 2.0}, "head_dim"),
    ("selective", {"scale": "1"}, "scale"),
    ("global_local_cross", {"top_ratio": "0.5"}, "top_ratio"),
    ("relative_conv", {"max_len": 8.0}, "max_len"),
    ("s2", {"block_size": 2.0}, "block"),
    ("conditional_cross", {"num_heads": 4.0}, "num_heads"),
    ("conditional_cross", {"num_conditions": True}, "num_conditions"),
    ("conditional_cross", {"queries_per_condition": 1.5}, "queries_per_condition"),
    ("conditional_cross", {"kv_dim": "8"}, "kv_dim"),
]


@pytest.mark.parametrize(
    "layer, kwargs, name", BAD_NUMBERS, ids=[f"{c}-{n}" for c, _, n in BAD_NUMBERS]
)
def test_numeric_arguments_are_not_coerced(layer, kwargs, name):
    with pytest.raises(ValueError, match=name):
        create_layer(layer, **kwargs)


def _backbone(**kwargs):
    return vision_backbone("hilo", **{"depths": (1,), "dims": (32,), "img_size": 8, **kwargs})


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: GatedPositionalSelfAttention(8, 2, qkv_bias=1), "qkv_bias"),
        (lambda: GatedPositionalSelfAttention(8, 2, locality_strength="1"), "locality_strength"),
        (lambda: GatedPositionalSelfAttention(8, 2.0), "num_heads"),
        (lambda: ChannelAttention(8, 2, qkv_bias=None), "qkv_bias"),
        (lambda: WindowAttention(8, 2, window_size=2.0), "window_size"),
        (lambda: HaloAttention(8, 2, halo_size=True), "halo_size"),
        (lambda: HaloAttention(8, 2, dim_head=4.0), "dim_head"),
        (lambda: HiLoAttention(8, 2, alpha="0.5"), "alpha"),
        (lambda: HiLoAttention(8, 2, qkv_bias=0), "qkv_bias"),
        (lambda: MultiAxisAttention(8, dim_head=4, partition_size=True), "partition_size"),
        (lambda: MultiAxisAttention(8, dim_head=4, qkv_bias="no"), "qkv_bias"),
        (lambda: SingleHeadAttention(8, partial_dim=2.5), "partial_dim"),
        (lambda: ScaleAwareModulation(8, 2, expand_ratio=2.0), "expand_ratio"),
        (lambda: ScaleAwareModulation(8, 2, qkv_bias=1), "qkv_bias"),
        (lambda: SpectralGating(8, (3.7, 5)), "size"),
        (lambda: SpectralGating(8, (True, 5)), "size"),
        (lambda: MSAConv(8, kernel_size=True), "kernel_size"),
        (lambda: MSAConv(8, kernel_size=3.0), "kernel_size"),
        (lambda: MSAConv(8, depthwise=1), "depthwise"),
        (lambda: AggregatedAttention(8, 2, pretrain_size=(16.5, 16)), "pretrain_size"),
        (lambda: AggregatedAttention(8, 2, qkv_bias="True"), "qkv_bias"),
        (lambda: SubspaceAttention(8, 2, bn_momentum="0.1"), "bn_momentum"),
        (lambda: _backbone(depths=(1.0,)), "depths"),
        (lambda: _backbone(img_size=8.0), "img_size"),
        (lambda: _backbone(in_chans=3.0), "in_chans"),
        (lambda: _backbone(mlp_ratio=True), "mlp_ratio"),
        (lambda: _backbone(mixer_kwargs=[("qkv_bias", False)]), "mixer_kwargs"),
    ],
)
def test_vision_argument_types(make, name):
    with pytest.raises(TypeError, match=name):
        make()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: HiLoAttention(8, 2, alpha=1.5), "alpha must be in"),
        (lambda: SubspaceAttention(8, 2, bn_momentum=2.0), "bn_momentum must be in"),
        (lambda: MultiAxisAttention(8, dim_head=4, partition="row"), "partition must be one of"),
        (lambda: MSAConv(8, kernel_size=(3, 4)), "kernel_size must be odd"),
        (lambda: SpectralGating(8, (3, 5, 7)), "size must be an int or a pair"),
        (lambda: _backbone(num_classes=-1), "num_classes"),
    ],
)
def test_vision_argument_values(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- vision: batch-1 gradients against finite differences ----------------------------------------

#: the mixers one by one; the backbone adds only its stem, norms, MLPs and downsampling, so two
#: mixers (with BatchNorm inside) cover it
GRADIENT_IDS = [*VISION_IDS, "neighborhood_1d", "backbone_single_head", "backbone_subspace"]


def _randomise(module: nn.Module) -> None:
    # a layer at its init can hide a wrong gradient (SHViT's output BN starts at weight 0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.normal_()
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case_id", GRADIENT_IDS)
def test_batch_one_gradients_equal_finite_differences(case_id, training):
    """Batch 1 is where layouts turn ambiguous: a size-1 batch axis can carry any stride, and
    torch 2.13's CPU BatchNorm backward misreads a channels-last gradient or input whose batch
    stride is not ``C·H·W`` (issue 13 item 3: SHViT's input, ``pre_norm`` and ``qkv`` gradients
    were ~100 % off, forward exact). The check is a directional derivative: for ``L = Σ w ⊙
    layer(x; θ)`` with random ``w`` and random directions ``d`` over ``(x, θ)`` (not normalised,
    so an error of the gradient shows at its own scale), ``(L(p + εd) - L(p - εd)) / 2ε`` must
    equal ``∇L · d`` in float64."""
    case = CASES[case_id]
    torch.manual_seed(0)
    module = case.build().double().train(training)
    _randomise(module)
    names = [name for name, _ in module.named_parameters()]
    (input_name, x), *others = case.inputs(batch=1, dtype=torch.float64).items()
    leaves = [x] + [p.detach() for p in module.parameters()]
    weight = None

    def loss(values):
        nonlocal weight
        out = functional_call(
            module, dict(zip(names, values[1:])), (), {input_name: values[0], **dict(others)}
        )
        weight = torch.randn_like(out) if weight is None else weight
        return (out * weight).sum()

    leaves = [t.clone().requires_grad_() for t in leaves]
    grads = torch.autograd.grad(loss(leaves), leaves, materialize_grads=True)
    eps = 1e-6
    with torch.no_grad():
        for _ in range(2):
            directions = [torch.randn_like(t) for t in leaves]
            plus = loss([t + eps * d for t, d in zip(leaves, directions)])
            minus = loss([t - eps * d for t, d in zip(leaves, directions)])
            numeric = (plus - minus) / (2 * eps)
            analytic = sum((g * d).sum() for g, d in zip(grads, directions))
            torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-6)
