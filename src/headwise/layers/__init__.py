"""nn.Modules built on the ops, one file per mechanism family."""

from headwise.layers.multihead import KVCache, MultiHeadAttention, apply_rotary
from headwise.layers.neighborhood import (
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)

__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "apply_rotary",
]
