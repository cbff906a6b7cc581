"""A small hierarchical vision backbone in which any headwise vision token mixer can be swapped
with one argument: ``vision_backbone(mixer="hilo")``.

Layout (MetaFormer-style, channels-last inside): a 4x4/4 patch stem, four stages of pre-norm
blocks ``x + mixer(LN(x))``, ``x + MLP(LN(x))``, and LN + 2x2/2 conv downsampling between stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from headwise._checks import ArgumentTypeError, check_int, check_ints, check_real
from headwise.layers._init import check_input, reset_submodules
from headwise.layers.registry import layer_spec
from headwise.layers.vision._common import check_pair

#: ``builder(dim, stage, block, resolution, **kwargs) -> nn.Module`` mapping ``(B, H, W, C)`` to
#: itself; ``stage``/``block`` are 0-based indices, ``resolution`` is the stage's ``(H, W)``.
MixerBuilder = Callable[..., nn.Module]
#: ``mlp_builder(dim, hidden_dim) -> nn.Module`` on ``(B, H, W, C)``.
MlpBuilder = Callable[[int, int], nn.Module]


class Mlp(nn.Module):
    """``W_2 GELU(W_1 x)``, the default channel mixer."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _heads(dim: int) -> int:
    # 32 channels per head (MaxViT, SMT and LITv2 sit near this), at least one head
    heads = max(1, dim // 32)
    while dim % heads:
        heads -= 1
    return heads


_MIXERS: dict[str, tuple[MixerBuilder, MlpBuilder | None]] = {}


def register_mixer(name: str, builder: MixerBuilder, *, mlp: MlpBuilder | None = None) -> None:
    """Make ``vision_backbone(mixer=name)`` use ``builder`` (and ``mlp`` as channel mixer)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str; got {name!r}")
    if not callable(builder):
        raise ValueError(f"builder must be callable; got {type(builder).__name__}")
    _MIXERS[name] = (builder, mlp)


def available_mixers() -> tuple[str, ...]:
    """Names :func:`vision_backbone` accepts for ``mixer``."""
    return tuple(sorted(_MIXERS))


def _builtin(
    name: str, builder: Callable[..., nn.Module], *, mlp: MlpBuilder | None = None
) -> None:
    # a built-in mixer is the registered layer of the same name (headwise.layers.registry, the
    # one catalogue of layers); ``builder(cls, dim, stage, block, resolution, **kwargs)`` only
    # chooses the backbone's arguments for it
    cls = layer_spec(name).cls
    register_mixer(name, lambda d, s, b, r, **kw: builder(cls, d, s, b, r, **kw), mlp=mlp)


_TRANSNEXT_SR = (8, 4, 2, 1)

_builtin("hilo", lambda cls, d, s, b, r, **kw: cls(d, _heads(d), alpha=0.9, **kw))
_builtin(
    "multi_axis",
    # MaxViT: block attention then grid attention, each with its own norm, attention and MLP
    lambda cls, d, s, b, r, **kw: cls(
        d, partition="block" if b % 2 == 0 else "grid", dim_head=d // _heads(d), **kw
    ),
)
_builtin("channel", lambda cls, d, s, b, r, **kw: cls(d, _heads(d), **kw))
_builtin("window", lambda cls, d, s, b, r, **kw: cls(d, _heads(d), **kw))
register_mixer(
    "dual",
    # DaViT: a spatial (window) block, then a channel block
    lambda d, s, b, r, **kw: layer_spec("window" if b % 2 == 0 else "channel").cls(
        d, _heads(d), **kw
    ),
)
_builtin("gpsa", lambda cls, d, s, b, r, **kw: cls(d, _heads(d), **kw))
_builtin("halo", lambda cls, d, s, b, r, **kw: cls(d, _heads(d), **kw))
_builtin(
    "aggregated",
    lambda cls, d, s, b, r, **kw: cls(d, _heads(d), sr_ratio=_TRANSNEXT_SR[min(s, 3)], **kw),
    mlp=lambda d, hidden: layer_spec("conv_glu").cls(d, hidden),
)
_builtin("single_head", lambda cls, d, s, b, r, **kw: cls(d, **kw))
_builtin("spectral", lambda cls, d, s, b, r, **kw: cls(d, r, **kw))
_builtin("subspace", lambda cls, d, s, b, r, **kw: cls(d, **kw))
_builtin("scale_aware", lambda cls, d, s, b, r, **kw: cls(d, **kw))
_builtin("msa_conv", lambda cls, d, s, b, r, **kw: cls(d, **kw))
_builtin(
    "neighborhood",
    # NAT: 7x7 neighborhood attention with its relative positional bias
    lambda cls, d, s, b, r, **kw: cls(d, _heads(d), kernel_size=7, rel_pos_bias=True, **kw),
)


class VisionBlock(nn.Module):
    """``x + mixer(LN(x))``, then ``x + mlp(LN(x))`` on ``(B, H, W, C)``."""

    def __init__(self, dim: int, mixer: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Downsample(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim_in)
        self.conv = nn.Conv2d(dim_in, dim_out, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class VisionBackbone(nn.Module):
    """Patch stem, stages of :class:`VisionBlock`, downsampling; see :func:`vision_backbone`."""

    def __init__(
        self,
        mixer: str | MixerBuilder,
        depths: Sequence[int],
        dims: Sequence[int],
        *,
        img_size: int | tuple[int, int],
        in_chans: int,
        num_classes: int,
        mlp_ratio: float,
        mixer_kwargs: dict[str, Any] | None,
    ) -> None:
        super().__init__()
        if isinstance(mixer, str):
            if mixer not in _MIXERS:
                raise ValueError(f"mixer must be one of {available_mixers()}; got {mixer!r}")
            builder, mlp_builder = _MIXERS[mixer]
        elif callable(mixer):
            builder, mlp_builder = mixer, None
        else:
            raise ValueError(f"mixer must be a name or a builder; got {type(mixer).__name__}")
        depths, dims = check_ints("depths", depths, minimum=1), check_ints("dims", dims, minimum=1)
        if not depths or len(depths) != len(dims):
            raise ValueError(
                f"depths and dims must be non-empty, one per stage; got {depths}, {dims}"
            )
        height, width = check_pair("img_size", img_size)
        check_int("in_chans", in_chans, minimum=1)
        check_int("num_classes", num_classes, minimum=0)
        check_real("mlp_ratio", mlp_ratio, positive=True)
        if mixer_kwargs is not None and not isinstance(mixer_kwargs, dict):
            raise ArgumentTypeError(
                f"mixer_kwargs must be a dict; got {type(mixer_kwargs).__name__}"
            )
        if min(height, width) < 4 * 2 ** (len(dims) - 1):
            raise ValueError(
                f"img_size must be at least {4 * 2 ** (len(dims) - 1)} for {len(dims)} stages; "
                f"got {img_size}"
            )
        self.img_size, self.dims = (height, width), dims
        mlp_builder = mlp_builder or Mlp
        kwargs = dict(mixer_kwargs or {})
        self.stem = nn.Conv2d(in_chans, dims[0], 4, stride=4)
        self.stem_norm = nn.LayerNorm(dims[0])
        resolution = (height // 4, width // 4)
        self.stages = nn.ModuleList()
        for s, (depth, dim) in enumerate(zip(depths, dims)):
            layers: list[nn.Module] = []
            if s > 0:
                layers.append(_Downsample(dims[s - 1], dim))
                resolution = (resolution[0] // 2, resolution[1] // 2)  # 2x2/2 conv floors
            hidden = int(dim * mlp_ratio)
            layers += [
                VisionBlock(dim, builder(dim, s, b, resolution, **kwargs), mlp_builder(dim, hidden))
                for b in range(depth)
            ]
            self.stages.append(nn.Sequential(*layers))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes else nn.Identity()

    def reset_parameters(self) -> None:
        """Every submodule's own init: default stem, norms, MLPs and head; each mixer's paper
        init."""
        reset_submodules(self)

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output ``(B, H_s, W_s, C_s)`` for ``images: (B, in_chans, H, W)``."""
        check_input("images", images, self)
        if images.dim() != 4 or images.shape[1] != self.stem.in_channels:
            raise ValueError(
                f"images must be (B, {self.stem.in_channels}, H, W); got {tuple(images.shape)}"
            )
        x = self.stem_norm(self.stem(images).permute(0, 2, 3, 1))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, num_classes)`` logits, or pooled ``(B, C_last)`` when ``num_classes=0``."""
        last = self.forward_features(images)[-1]
        return self.head(self.norm(last.mean(dim=(1, 2))))


def vision_backbone(
    mixer: str | MixerBuilder = "hilo",
    depths: Sequence[int] = (2, 2, 6, 2),
    dims: Sequence[int] = (64, 128, 256, 512),
    *,
    img_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    num_classes: int = 0,
    mlp_ratio: float = 4.0,
    mixer_kwargs: dict[str, Any] | None = None,
) -> VisionBackbone:
    """A hierarchical backbone (stem 4x4/4, stages at strides 4, 8, 16, 32) with one mixer.

    Args:
        mixer: a name from :func:`available_mixers`, each the registered vision layer of that
            name (:func:`headwise.layers.list_layers`): ``"hilo"``, ``"multi_axis"`` (block and
            grid attention alternate), ``"channel"``, ``"window"``, ``"gpsa"``, ``"halo"``,
            ``"aggregated"`` (with ConvGLU; ``sr = 8, 4, 2, 1`` per stage), ``"single_head"``,
            ``"spectral"``, ``"subspace"``, ``"scale_aware"``, ``"msa_conv"``,
            ``"neighborhood"``; or ``"dual"`` (DaViT: window and channel alternate); or
            ``builder(dim, stage, block, resolution, **mixer_kwargs) -> nn.Module``. Heads are
            ``dim // 32`` (at least 1).
        depths: blocks per stage.
        dims: channels per stage.
        img_size: input ``(H, W)``; size-locked mixers (``"spectral"``) are built for it.
        in_chans: image channels.
        num_classes: classifier outputs; 0 returns pooled features.
        mlp_ratio: hidden width of the channel MLP.
        mixer_kwargs: extra keyword arguments for every mixer.

    Shapes: ``images (B, in_chans, H, W) -> (B, num_classes)`` or ``(B, dims[-1])``;
    ``forward_features`` gives every stage's ``(B, H_s, W_s, C_s)``.
    """
    return VisionBackbone(
        mixer,
        depths,
        dims,
        img_size=img_size,
        in_chans=in_chans,
        num_classes=num_classes,
        mlp_ratio=mlp_ratio,
        mixer_kwargs=mixer_kwargs,
    )
