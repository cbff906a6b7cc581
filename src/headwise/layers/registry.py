"""The catalogue of every headwise layer, by name (timm's ``list_models`` idea).

Each entry (:class:`LayerSpec`) holds the layer class, its kind (``"sequence"``: tokens
``(B, L, C)``; ``"vision"``: channels-last maps ``(B, H, W, C)``, or ``(B, T, H, W, C)`` for the
3-D neighborhood attention), a small default configuration and an example-input builder, so
tests and benchmarks iterate over every layer without knowing any constructor::

    for name in list_layers("vision"):
        spec = layer_spec(name)
        layer = spec.build()                 # = create_layer(name)
        out = spec.output(layer(**spec.example_inputs(batch=2)))

The example inputs are small and have an odd length or odd sides, so padding and ragged-block
paths run. :func:`create_layer` takes the default configuration and overrides it by keyword.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from headwise._checks import check_choice
from headwise.layers.acmil import MultiBranchAttentionPooling
from headwise.layers.agent import AgentAttention, AgentAttention2d
from headwise.layers.based import BasedAttention
from headwise.layers.combiner import CombinerAttention
from headwise.layers.cross import (
    ConditionalCrossAttention,
    CrossAttention,
    GlobalLocalCrossAttention,
    PairwiseCrossAttention,
    ParameterFreeCrossAttention,
)
from headwise.layers.gaussian import GaussianAdaptiveAttention
from headwise.layers.inline import InLineAttention
from headwise.layers.lightning import LightningAttention
from headwise.layers.moa import MoAAttention
from headwise.layers.moh import MoHAttention
from headwise.layers.multihead import MultiHeadAttention
from headwise.layers.neighborhood import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from headwise.layers.rcmha import RelativeConvAttention
from headwise.layers.s2 import S2Attention
from headwise.layers.selective import SelectiveMultiHeadAttention
from headwise.layers.sparsifiner import SparsifinerAttention
from headwise.layers.vision import (
    AggregatedAttention,
    ChannelAttention,
    ConvGLU,
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

Kind = Literal["sequence", "vision"]
KINDS = ("sequence", "vision")

#: the example sizes: channels, heads, sequence length (odd), map sides (odd)
DIM, HEADS, LENGTH, MAP = 16, 4, 7, (3, 5)
VISION_DIM = 8

InputBuilder = Callable[[int, torch.Generator], dict[str, Any]]


def _identity(out: Any) -> torch.Tensor:
    return out


@dataclass(frozen=True)
class LayerSpec:
    """One registered layer: its class, kind, default configuration and example inputs.

    ``args``/``kwargs`` are the small default configuration; ``inputs(batch, generator)`` gives
    the keyword arguments of one forward call (float32 tensors); ``output`` picks the main
    output tensor from what ``forward`` returns (a named tuple for some layers);
    ``reference_backend`` is the oracle among the layer's backends (``"naive"`` for the linear
    attention layers, whose backends are :func:`headwise.linear_attention`'s).
    """

    name: str
    cls: type[nn.Module]
    kind: Kind
    inputs: InputBuilder
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    output: Callable[[Any], torch.Tensor] = _identity
    reference_backend: str = "reference"

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The default configuration as constructor keywords, updated by ``overrides``."""
        signature = inspect.signature(self.cls)
        config = dict(signature.bind_partial(*self.args, **self.kwargs).arguments)
        for parameter in signature.parameters.values():
            if parameter.kind is parameter.VAR_KEYWORD:  # ``**kwargs``, flattened
                config.update(config.pop(parameter.name, {}))
        config.update(overrides)
        return config

    def build(self, **overrides: Any) -> nn.Module:
        """The layer at its default configuration, with ``overrides`` applied."""
        return self.cls(**self.config(**overrides))

    def example_inputs(
        self, batch: int = 2, *, dtype: torch.dtype | None = None, seed: int = 0
    ) -> dict[str, Any]:
        """Keyword arguments of one forward call; floating tensors cast to ``dtype`` if given."""
        inputs = self.inputs(batch, torch.Generator().manual_seed(seed))
        if dtype is not None:
            inputs = {
                k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in inputs.items()
            }
        return inputs

    @property
    def has_backend(self) -> bool:
        """Whether the layer takes ``backend=`` (it runs :func:`headwise.attention` inside); the
        layers with ``**kwargs`` pass them on to an attention layer."""
        parameters = inspect.signature(self.cls).parameters.values()
        return any(p.name == "backend" or p.kind is p.VAR_KEYWORD for p in parameters)

    @property
    def has_dropout(self) -> bool:
        """Whether the layer takes ``dropout=``: attention dropout on its softmax probabilities,
        in training mode only; the layers with ``**kwargs`` pass it on to an attention layer."""
        parameters = inspect.signature(self.cls).parameters.values()
        return any(p.name == "dropout" or p.kind is p.VAR_KEYWORD for p in parameters)


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def _tokens(length: int = LENGTH, dim: int = DIM) -> InputBuilder:
    return lambda b, g: {"x": _randn(g, b, length, dim)}


def _map(*sides: int, dim: int = VISION_DIM) -> InputBuilder:
    return lambda b, g: {"x": _randn(g, b, *(sides or MAP), dim)}


_REGISTRY: dict[str, LayerSpec] = {}


def _register(spec: LayerSpec) -> None:
    _REGISTRY[spec.name] = spec


for _spec in (
    # sequence layers: tokens (B, L, C)
    LayerSpec("multihead", MultiHeadAttention, "sequence", _tokens(), (DIM, HEADS)),
    LayerSpec(
        "cross",
        CrossAttention,
        "sequence",
        lambda b, g: {"x": _randn(g, b, LENGTH, DIM), "context": _randn(g, b, 3, 8)},
        (DIM, HEADS),
        {"kv_dim": 8},
    ),
    LayerSpec(
        "global_local_cross",
        GlobalLocalCrossAttention,
        "sequence",
        lambda b, g: {"x": _randn(g, b, LENGTH, DIM), "scores": _randn(g, b, LENGTH)},
        (DIM, HEADS),
        {"top_ratio": 0.5},
        output=lambda out: out[0],
    ),
    LayerSpec(
        "pairwise_cross",
        PairwiseCrossAttention,
        "sequence",
        lambda b, g: {"x": _randn(g, b, LENGTH, DIM), "distractor": _randn(g, b, 3, DIM)},
        (DIM, HEADS),
    ),
    LayerSpec(
        "conditional_cross",
        ConditionalCrossAttention,
        "sequence",
        lambda b, g: {
            "image": _randn(g, b, LENGTH, DIM),
            "condition": torch.randint(0, 3, (b,), generator=g),
        },
        (DIM, HEADS, 3),
        {"queries_per_condition": 2},
    ),
    LayerSpec(
        "parameter_free_cross",
        ParameterFreeCrossAttention,
        "sequence",
        lambda b, g: {"x": _randn(g, b, LENGTH, DIM), "visual": _randn(g, b, 3, DIM)},
        (DIM,),
        {"drop_ratio": 0.3, "num_visual_tokens": 3},
    ),
    LayerSpec(
        "moh",
        MoHAttention,
        "sequence",
        _tokens(),
        (DIM, HEADS),
        {"num_shared": 2, "top_k": 1},
        output=lambda out: out.output,
    ),
    LayerSpec(
        "moa",
        MoAAttention,
        "sequence",
        _tokens(),
        (DIM, HEADS),
        {
            "alphas": (0.0,) * HEADS,
            "betas": (0.5,) * HEADS,
            "block": 2,
            "sink_size": 2,
            "min_cache": 2,
            "max_new_tokens": 0,
        },
    ),
    LayerSpec(
        "s2",
        S2Attention,
        "sequence",
        _tokens(),
        (DIM, HEADS),
        {"block_size": 2, "local_blocks": 1, "vert_stride": 2},
    ),
    LayerSpec(
        "sparsifiner",
        SparsifinerAttention,
        "sequence",
        _tokens(),
        (DIM, HEADS, LENGTH),
        {"keep_rate": 0.5, "token_reduction": 2},
    ),
    LayerSpec("gaussian", GaussianAdaptiveAttention, "sequence", _tokens(), (2, 3)),
    LayerSpec("agent", AgentAttention, "sequence", _tokens(), (DIM, HEADS), {"agent_num": 4}),
    LayerSpec(
        "agent_2d",
        AgentAttention2d,
        "sequence",
        _tokens(MAP[0] * MAP[1]),
        (DIM, HEADS, MAP),
        {"agent_num": 4},
    ),
    LayerSpec(
        "based",
        BasedAttention,
        "sequence",
        _tokens(),
        (DIM, HEADS),
        {"feature_dim": 4, "window_size": 2},
        reference_backend="naive",
    ),
    LayerSpec(
        "combiner", CombinerAttention, "sequence", _tokens(9), (DIM, HEADS), {"segment_len": 3}
    ),
    LayerSpec(
        "inline",
        InLineAttention,
        "sequence",
        lambda b, g: {"x": _randn(g, b, MAP[0] * MAP[1], DIM), "size": MAP},
        (DIM, HEADS),
        reference_backend="naive",
    ),
    LayerSpec(
        "lightning",
        LightningAttention,
        "sequence",
        _tokens(),
        (DIM, HEADS),
        {"layer_idx": 1, "num_layers": 3},
        reference_backend="naive",
    ),
    LayerSpec(
        "relative_conv", RelativeConvAttention, "sequence", _tokens(), (DIM, HEADS), {"max_len": 8}
    ),
    LayerSpec("selective", SelectiveMultiHeadAttention, "sequence", _tokens(), (DIM, HEADS)),
    LayerSpec(
        "multi_branch_pooling",
        MultiBranchAttentionPooling,
        "sequence",
        lambda b, g: {"h": _randn(g, b, LENGTH, DIM)},
        (DIM, 8),
        {"num_branches": 3, "top_k": 2},
        output=lambda out: out.bag,
    ),
    LayerSpec(
        "neighborhood_1d",
        NeighborhoodAttention1D,
        "sequence",
        _tokens(LENGTH, VISION_DIM),
        (VISION_DIM, 2, 3),
        {"rel_pos_bias": True},
    ),
    # vision token mixers: channels-last maps (B, H, W, C)
    LayerSpec("gpsa", GatedPositionalSelfAttention, "vision", _map(), (VISION_DIM, 4)),
    LayerSpec("channel", ChannelAttention, "vision", _map(), (VISION_DIM, 2)),
    LayerSpec("window", WindowAttention, "vision", _map(), (VISION_DIM, 2), {"window_size": 2}),
    LayerSpec(
        "halo",
        HaloAttention,
        "vision",
        _map(),
        (VISION_DIM, 2),
        {"block_size": 2, "halo_size": 1},
    ),
    LayerSpec("hilo", HiLoAttention, "vision", _map(), (VISION_DIM, 2), {"window_size": 2}),
    LayerSpec(
        "multi_axis",
        MultiAxisAttention,
        "vision",
        _map(),
        (VISION_DIM,),
        {"partition_size": 2, "dim_head": 4},
    ),
    LayerSpec(
        "single_head",
        SingleHeadAttention,
        "vision",
        _map(),
        (VISION_DIM,),
        {"partial_dim": 4, "qk_dim": 4},
    ),
    LayerSpec("scale_aware", ScaleAwareModulation, "vision", _map(), (VISION_DIM, 2)),
    LayerSpec("spectral", SpectralGating, "vision", _map(), (VISION_DIM, MAP)),
    LayerSpec("msa_conv", MSAConv, "vision", _map(), (VISION_DIM,), {"num_heads": 2}),
    LayerSpec(
        "aggregated", AggregatedAttention, "vision", _map(4, 5), (VISION_DIM, 2), {"sr_ratio": 2}
    ),
    LayerSpec("conv_glu", ConvGLU, "vision", _map(), (VISION_DIM, 6)),
    LayerSpec("subspace", SubspaceAttention, "vision", _map(), (VISION_DIM, 2)),
    LayerSpec(
        "neighborhood",
        NeighborhoodAttention2D,
        "vision",
        _map(4, 6),
        (VISION_DIM, 2, (3, 5)),
        {"dilation": (1, 2), "rel_pos_bias": True},
    ),
    LayerSpec(
        "neighborhood_3d",
        NeighborhoodAttention3D,
        "vision",
        _map(3, 4, 3),
        (VISION_DIM, 2, 3),
        {"causal": (True, False, False), "rel_pos_bias": True},
    ),
):
    _register(_spec)
del _spec


def list_layers(kind: Kind | None = None) -> tuple[str, ...]:
    """Names of the registered layers, sorted; ``kind="sequence"`` or ``"vision"`` filters."""
    if kind is not None:
        check_choice("kind", kind, KINDS)
    return tuple(sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind))


def layer_spec(name: str) -> LayerSpec:
    """The registry entry of ``name`` (see :func:`list_layers`)."""
    if name not in _REGISTRY:
        raise ValueError(f"name must be one of {list_layers()}; got {name!r}")
    return _REGISTRY[name]


def create_layer(name: str, **kwargs: Any) -> nn.Module:
    """The layer ``name`` at its small default configuration, updated by ``kwargs``.

    ``create_layer("hilo", dim=64, num_heads=2)`` is ``HiLoAttention(64, 2, window_size=2)``:
    keywords override the entry's defaults one by one (the class's own defaults apply to every
    argument neither sets).
    """
    return layer_spec(name).build(**kwargs)
