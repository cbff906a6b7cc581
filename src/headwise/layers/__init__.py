"""nn.Modules built on the ops, one file per mechanism family.

Sequence-side layers live here; vision token mixers in :mod:`headwise.layers.vision`.
"""

from headwise.layers import vision
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
from headwise.layers.moa import MoAAttention, MoAPlan
from headwise.layers.moh import MoHAttention
from headwise.layers.multihead import KVCache, MultiHeadAttention, apply_rotary
from headwise.layers.neighborhood import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from headwise.layers.rcmha import RelativeConvAttention
from headwise.layers.registry import create_layer, list_layers
from headwise.layers.s2 import S2Attention
from headwise.layers.selective import SelectiveMultiHeadAttention
from headwise.layers.sparsifiner import SparsifinerAttention

__all__ = [
    "AgentAttention",
    "AgentAttention2d",
    "BasedAttention",
    "CombinerAttention",
    "ConditionalCrossAttention",
    "CrossAttention",
    "GaussianAdaptiveAttention",
    "GlobalLocalCrossAttention",
    "InLineAttention",
    "KVCache",
    "LightningAttention",
    "MoAAttention",
    "MoAPlan",
    "MoHAttention",
    "MultiBranchAttentionPooling",
    "MultiHeadAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "PairwiseCrossAttention",
    "ParameterFreeCrossAttention",
    "RelativeConvAttention",
    "S2Attention",
    "SelectiveMultiHeadAttention",
    "SparsifinerAttention",
    "apply_rotary",
    "create_layer",
    "list_layers",
    "vision",
]
