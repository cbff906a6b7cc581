"""Hypothesis strategies shared by the tests: leaf patterns to compose."""

from __future__ import annotations

from hypothesis import strategies as st

import headwise.patterns as P


def pattern_leaves(max_window: int = 6, max_block: int = 3) -> st.SearchStrategy:
    """full, causal (either alignment), sliding windows, sinks and strided patterns."""
    return st.one_of(
        st.just(P.full()),
        st.sampled_from(["bottom_right", "top_left"]).map(P.causal),
        st.tuples(st.integers(0, max_window), st.integers(0, max_window)).map(
            lambda lr: P.sliding_window(*lr)
        ),
        st.integers(0, 4).map(P.sinks),
        st.tuples(st.integers(1, 4), st.integers(0, 3), st.integers(1, max_block)).map(
            lambda t: P.strided(t[0], t[1] % t[0], block=t[2])
        ),
    )
