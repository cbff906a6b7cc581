"""Every layer of the vision area (the mixers, neighborhood attention, the backbone) at a small
size, with an input shape: the catalogue that the whole-area tests iterate over."""

from __future__ import annotations

from headwise.layers.neighborhood import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
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
from headwise.models import available_mixers, vision_backbone

MAP = (3, 5, 8)  # (H, W, C): odd sides, so the padding paths run too

#: id -> (builder, input shape without the batch axis)
LAYERS = {
    "gpsa": (lambda: GatedPositionalSelfAttention(8, 4), MAP),
    "channel": (lambda: ChannelAttention(8, 2), MAP),
    "window": (lambda: WindowAttention(8, 2, window_size=2), MAP),
    "halo": (lambda: HaloAttention(8, 2, block_size=2, halo_size=1), MAP),
    "hilo": (lambda: HiLoAttention(8, 2, window_size=2), MAP),
    "multi_axis_block": (lambda: MultiAxisAttention(8, partition_size=2, dim_head=4), MAP),
    "multi_axis_grid": (
        lambda: MultiAxisAttention(8, partition="grid", partition_size=2, dim_head=4),
        MAP,
    ),
    "single_head": (lambda: SingleHeadAttention(8, partial_dim=4, qk_dim=4), MAP),
    "scale_aware": (lambda: ScaleAwareModulation(8, 2), MAP),
    "spectral": (lambda: SpectralGating(8, (3, 5)), MAP),
    "msa_conv": (lambda: MSAConv(8, num_heads=2), MAP),
    "msa_conv_depthwise": (
        lambda: MSAConv(8, kernel_size=(3, 1), stride=2, depthwise=True),
        MAP,
    ),
    "aggregated": (lambda: AggregatedAttention(8, 2, sr_ratio=2), (4, 5, 8)),
    "aggregated_full": (lambda: AggregatedAttention(8, 2, sr_ratio=1), (4, 5, 8)),
    "conv_glu": (lambda: ConvGLU(8, 6), MAP),
    "subspace": (lambda: SubspaceAttention(8, 2), MAP),
    "neighborhood_1d": (lambda: NeighborhoodAttention1D(8, 2, 3, rel_pos_bias=True), (7, 8)),
    "neighborhood_2d": (
        lambda: NeighborhoodAttention2D(8, 2, (3, 5), dilation=(1, 2), rel_pos_bias=True),
        (4, 6, 8),
    ),
    "neighborhood_3d": (
        lambda: NeighborhoodAttention3D(8, 2, 3, causal=(True, False, False), rel_pos_bias=True),
        (3, 4, 3, 8),
    ),
}
LAYERS.update(
    {
        f"backbone_{mixer}": (
            lambda mixer=mixer: vision_backbone(mixer, depths=(1, 2), dims=(8, 16), img_size=16),
            (3, 16, 16),
        )
        for mixer in available_mixers()
    }
)
