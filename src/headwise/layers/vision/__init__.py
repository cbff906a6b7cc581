"""Vision token mixers from the papers, one file per mechanism family.

Feature maps are channels-last ``(B, H, W, C)``; mixers whose papers work on tokens also take
``(B, N, C)`` with ``size=(H, W)``.
"""

from headwise.layers.vision.convit import GatedPositionalSelfAttention
from headwise.layers.vision.davit import ChannelAttention, WindowAttention
from headwise.layers.vision.halo import HaloAttention
from headwise.layers.vision.hilo import HiLoAttention
from headwise.layers.vision.maxvit import MultiAxisAttention
from headwise.layers.vision.shvit import SingleHeadAttention
from headwise.layers.vision.smt import ScaleAwareModulation
from headwise.layers.vision.spectformer import SpectralGating
from headwise.layers.vision.ticconv import MSAConv
from headwise.layers.vision.transnext import AggregatedAttention, ConvGLU
from headwise.layers.vision.ulsam import SubspaceAttention

__all__ = [
    "AggregatedAttention",
    "ChannelAttention",
    "ConvGLU",
    "GatedPositionalSelfAttention",
    "HaloAttention",
    "HiLoAttention",
    "MSAConv",
    "MultiAxisAttention",
    "ScaleAwareModulation",
    "SingleHeadAttention",
    "SpectralGating",
    "SubspaceAttention",
    "WindowAttention",
]
