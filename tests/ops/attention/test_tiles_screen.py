"""The native operators' screen for the non-finite rule (:func:`headwise.ops.attention.native.
call.has_non_finite`, read by the kernel in place): an inf or NaN at any position of any view,
in every dtype the kernel takes, is found; finite extremes are not; and the native operators
screen through it."""

from __future__ import annotations

import pytest
import torch

import headwise.patterns as P
from headwise.ops.attention.native import autograd, available, native_attention
from headwise.ops.attention.native.call import has_non_finite

pytestmark = pytest.mark.skipif(not available(), reason="native tile kernel not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _views(dtype: torch.dtype) -> list[torch.Tensor]:
    base = torch.randn(3, 5, 2, 14, generator=torch.Generator().manual_seed(0)).to(dtype)
    return [
        base,  # contiguous: one run
        base[..., ::3],  # last dim strided
        base[:, 1:4],  # rows of a larger tensor
        base.transpose(1, 2),  # leading dims permuted
        base[..., 3:13],  # rows shorter than a vector
        base.expand(2, 3, 5, 2, 14)[1],  # a view of broadcast memory
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_screen_finds_a_bad_entry_anywhere(dtype, bad):
    for view in _views(dtype):
        assert not has_non_finite(view)
        for index in range(view.numel()):
            position = torch.unravel_index(torch.tensor(index), view.shape)
            old = view[position].clone()
            view[position] = bad
            assert has_non_finite(view.detach()), (tuple(view.stride()), index)
            view[position] = old
        assert not has_non_finite(view)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_screen_passes_finite_extremes_and_empty_tensors(dtype):
    info = torch.finfo(dtype)
    for value in (info.max, -info.max, info.tiny, info.tiny / 4, 0.0, -0.0):
        assert not has_non_finite(torch.full((2, 3, 1, 33), value, dtype=dtype))
    assert not has_non_finite(torch.empty(2, 0, 1, 4, dtype=dtype))
    # the sum of the old screen overflows here: a false alarm it no longer raises
    assert not has_non_finite(torch.full((1, 4, 1, 4), info.max, dtype=dtype), torch.ones(1))


def test_the_operators_apply_the_rule_through_this_screen(monkeypatch):
    screens = []
    screen = autograd.has_non_finite
    monkeypatch.setattr(autograd, "has_non_finite", lambda *t: screens.append(1) or screen(*t))
    q, k, v = (torch.randn(2, 9, 2, 8, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        k[1, 4, 0, 2] = float("nan")
    out, _ = native_attention(q, k, v, P.sliding_window(3))
    out.nan_to_num().sum().backward()
    assert len(screens) == 2  # forward and backward
    # the rule: rows that see the bad key are NaN, the bad entry gets gradient 0
    assert out[1, 4:7, 0].isnan().all() and not out[1, :4].isnan().any()
    assert not out[:, :, 1].isnan().any() and not out[0].isnan().any()
    assert torch.isfinite(k.grad).all() and k.grad[1, 4, 0, 2] == 0
