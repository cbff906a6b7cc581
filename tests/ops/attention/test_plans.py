"""Plans built from key ranges equal the plans built from the predicate: the native kernel's
tile plans tensor for tensor, the blockwise panels group for group, on random patterns; and a
pattern the ranges cannot describe still gets its plan from the predicate."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import headwise.patterns as P
from headwise.ops.attention.blockwise import plan as blockwise_plan
from headwise.ops.attention.native import available, lanes
from headwise.ops.attention.native import plan as native_plan
from patterns.test_ranges import ranged_problems


def same(a, b) -> bool:
    """Equal plans: tensors of one dtype and equal values, slices, flags, nested dataclasses."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


@pytest.mark.skipif(not available(), reason="native tile kernel not built")
@settings(max_examples=80, deadline=None)
@given(ranged_problems())
def test_native_plan_from_ranges_equals_plan_from_predicate(problem):
    pattern, q_len, kv_len = problem
    fast = native_plan._tiles_of(pattern, q_len, kv_len)
    assert same(fast, native_plan._predicate_tiles(pattern, q_len, kv_len))
    assert fast.bits.is_contiguous()  # the kernel steps through heads by bits.shape[1]


@settings(max_examples=60, deadline=None)
@given(ranged_problems(), st.sampled_from([4, 8, 32]), st.sampled_from([1 << 24, 100]))
def test_blockwise_plan_from_ranges_equals_plan_from_predicate(problem, block, mask_budget):
    pattern, q_len, kv_len = problem
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blockwise_plan, "MASK_CACHE_ELEMENTS", mask_budget)
        fast = blockwise_plan._build_plan(pattern, q_len, kv_len, block, "cpu")
        patch.setattr(blockwise_plan, "_ranged_groups", lambda *args: None)
        slow = blockwise_plan._build_plan(pattern, q_len, kv_len, block, "cpu")
    if mask_budget > q_len * kv_len * (pattern.num_heads or 1):
        assert same(fast, slow)
        return
    # a small budget: groups sharing a mask keep it past the budget; every mask is the pattern
    groups = list(blockwise_plan.plan_groups(fast))
    for row in groups:
        if row.mask is not None:
            rows, keys = (
                blockwise_plan.positions_of(row.rows),
                blockwise_plan.positions_of(row.keys),
            )
            visible = pattern.visible(rows, keys, q_len, kv_len)
            assert torch.equal(row.mask, blockwise_plan._additive(visible))
    without_masks = [dataclasses.replace(r, mask=None) for r in blockwise_plan.plan_groups(slow)]
    assert same([dataclasses.replace(r, mask=None) for r in groups], without_masks)


def test_blockwise_groups_of_a_window_share_one_mask():
    plan = blockwise_plan._build_plan(P.sliding_window(40), 400, 400, 16, "cpu")
    masks = {id(r.mask) for r in blockwise_plan.plan_groups(plan) if r.mask is not None}
    assert len(masks) == 4  # groups cut at key 0 (rows 0-47), then one for the other 22
    assert blockwise_plan.PLANS.size(plan) == sum(
        m.numel() for m in {id(r.mask): r.mask for r in blockwise_plan.plan_groups(plan)
                            if r.mask is not None}.values()
    )  # fmt: skip


@pytest.mark.skipif(not available(), reason="native tile kernel not built")
def test_documents_plan_is_built_from_ranges_without_the_predicate(monkeypatch):
    def refuse(*args):
        raise AssertionError("the predicate was evaluated")

    pattern = P.documents([40, 0, 3, 61], causal=True) & P.sliding_window(20)
    monkeypatch.setattr(type(pattern), "visible", refuse)
    monkeypatch.setattr(P.library.Documents, "_allowed", refuse)
    plan = native_plan._tiles_of(pattern, 104, 104)
    assert plan.rows.shape == (-(-104 // lanes()), lanes())
    monkeypatch.undo()
    assert same(plan, native_plan._predicate_tiles(pattern, 104, 104))


def test_plan_budget_scales_with_the_machine(monkeypatch):
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (64 << 30) // 4096}  # 64 GiB

    def sysconf(name):
        if name not in pages:
            raise ValueError(f"unrecognized configuration name {name!r}")
        return pages[name]

    monkeypatch.setattr(native_plan.os, "sysconf", sysconf)
    assert native_plan.plan_budget() == (4 << 30) // 4  # a sixteenth, in int32 entries
    pages["SC_PHYS_PAGES"] = (2 << 30) // 4096  # 2 GiB: the floor, 512 MiB
    assert native_plan.plan_budget() == (512 << 20) // 4
    pages.clear()  # a system without these names: the floor
    assert native_plan.plan_budget() == (512 << 20) // 4
