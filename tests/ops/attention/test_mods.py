"""Score mods and the LSE merge in their own modules, and the old import paths that point there."""

from __future__ import annotations

import pytest
import torch

import headwise.patterns as P
from headwise.ops.attention import attention, merge_partials
from headwise.ops.attention.mods import alibi_slopes, softcap


def test_softcap_is_cap_times_tanh_of_score_over_cap():
    scores = torch.randn(2, 3, 5, 7) * 40
    index = torch.zeros(())
    capped = softcap(30.0)(scores, index, index, index, index)
    assert torch.equal(capped, 30.0 * torch.tanh(scores / 30.0))
    q, k, v = (torch.randn(1, 9, 2, 8, requires_grad=True) for _ in range(3))
    got = attention(q, k, v, P.causal(), score_mod=softcap(5.0), backend="blockwise")
    want = attention(q, k, v, P.causal(), score_mod=softcap(5.0), backend="reference")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cap", [0, -1.0, float("inf"), "1"])
def test_softcap_refuses_a_cap_that_is_not_a_positive_number(cap):
    with pytest.raises(ValueError, match="cap"):
        softcap(cap)


def test_moved_names_keep_their_old_homes():
    import headwise.distributed
    import headwise.ops.linear

    assert headwise.ops.linear.alibi_slopes is alibi_slopes is headwise.alibi_slopes
    assert headwise.distributed.merge_partials is merge_partials


def test_old_module_paths_warn_and_forward():
    from headwise.ops.attention import mods, native, neighborhood, tiles

    with pytest.warns(DeprecationWarning, match="ops.attention.native.call.tiles_forward"):
        assert tiles.tiles_forward is native.tiles_forward
    with pytest.warns(DeprecationWarning, match="ops.attention.mods.relative_position_bias"):
        assert neighborhood.relative_position_bias is mods.relative_position_bias
