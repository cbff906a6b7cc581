"""nn.Modules built on the ops, one file per mechanism family."""

from headwise.layers.multihead import KVCache, MultiHeadAttention, apply_rotary

__all__ = ["KVCache", "MultiHeadAttention", "apply_rotary"]
