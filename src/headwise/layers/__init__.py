"""nn.Modules built on the ops, one file per mechanism family."""

from headwise.layers.agent import AgentAttention, AgentAttention2d
from headwise.layers.based import BasedAttention
from headwise.layers.inline import InLineAttention
from headwise.layers.lightning import LightningAttention
from headwise.layers.multihead import KVCache, MultiHeadAttention, apply_rotary
from headwise.layers.neighborhood import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)

__all__ = [
    "AgentAttention",
    "AgentAttention2d",
    "BasedAttention",
    "InLineAttention",
    "KVCache",
    "LightningAttention",
    "MultiHeadAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "apply_rotary",
]
