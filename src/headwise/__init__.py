"""headwise: multi-head attention mechanisms from recent research under one fast, correct API.

Layout everywhere: ``(B, L, H, D)`` (batch, length, heads, head dim); packed varlen ``(T, H, D)``.
"""

from headwise import layers, patterns
from headwise._checks import ArgumentTypeError, Unsupported
from headwise.layers import KVCache, MultiHeadAttention
from headwise.ops.attention import (
    Explanation,
    Packed,
    attention,
    attention_varlen,
    explain,
    neighborhood_attention,
    pack,
    unpack,
)
from headwise.ops.linear import alibi_slopes, linear_attention, linear_attention_step, tnl_decay

__version__ = "0.1.0"

__all__ = [
    "ArgumentTypeError",
    "Explanation",
    "KVCache",
    "MultiHeadAttention",
    "Packed",
    "Unsupported",
    "alibi_slopes",
    "attention",
    "attention_varlen",
    "explain",
    "layers",
    "linear_attention",
    "linear_attention_step",
    "neighborhood_attention",
    "pack",
    "patterns",
    "tnl_decay",
    "unpack",
]
