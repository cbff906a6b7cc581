"""Who may attend to whom: immutable, composable attention patterns.

See :class:`headwise.patterns.Pattern` for what every pattern provides, and
:mod:`headwise.patterns.library` for the position and alignment conventions.
"""

from headwise.patterns.base import EMPTY, FULL, PARTIAL, Pattern
from headwise.patterns.library import (
    block_sparse,
    causal,
    documents,
    full,
    modality_mutual,
    per_head,
    query_positions,
    sinks,
    sliding_window,
    strided,
)
from headwise.patterns.neighborhood import neighborhood

__all__ = [
    "EMPTY",
    "FULL",
    "PARTIAL",
    "Pattern",
    "block_sparse",
    "causal",
    "documents",
    "full",
    "modality_mutual",
    "neighborhood",
    "per_head",
    "query_positions",
    "sinks",
    "sliding_window",
    "strided",
]
