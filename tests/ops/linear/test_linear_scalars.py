"""Scalar arguments of linear attention: a Python float keeps the inputs' precision (a float64
call is exact to float64 rounding, not to float32's), and every scalar of the wrong type or value
is refused with an error naming it."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.ops.linear import (
    InLineFeatureMap,
    alibi_slopes,
    linear_attention,
    linear_attention_step,
    tnl_decay,
)

LAM = 0.9  # not representable in float32: rounding it there moves o by ~1e-8 relative


def inputs(length=24, heads=2, dim=4, dim_v=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(1, length, heads, d, generator=gen, dtype=torch.float64)
        for d in (dim, dim, dim_v)
    )


@pytest.mark.parametrize("backend", ["chunk", "naive", "recurrent"])
@pytest.mark.parametrize(
    "options",
    [{}, {"causal": False}, {"normalize": True, "feature_map": "elu+1"}],
    ids=["causal", "noncausal", "normalize"],
)
def test_float_decay_keeps_float64(backend, options):
    q, k, v = inputs()
    exact = torch.tensor(LAM, dtype=torch.float64)
    got = linear_attention(q, k, v, decay=LAM, backend=backend, **options)
    want = linear_attention(q, k, v, decay=exact, backend=backend, **options)
    assert got.dtype == torch.float64
    assert (got - want).abs().max().item() <= 1e-14 * want.abs().max().item()


def test_float_decay_keeps_float64_for_state_varlen_and_step():
    q, k, v = inputs(length=10)
    exact = torch.tensor(LAM, dtype=torch.float64)
    s0 = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    for call in (
        lambda lam: linear_attention(q, k, v, decay=lam, initial_state=s0, return_state=True),
        lambda lam: linear_attention(
            q[0], k[0], v[0], decay=lam, cu_seqlens=torch.tensor([0, 4, 10]),
            initial_state=s0.expand(2, -1, -1, -1), return_state=True,
        ),
        lambda lam: linear_attention_step(q[:, 0], k[:, 0], v[:, 0], s0, decay=lam),
    ):  # fmt: skip
        for got, want in zip(call(LAM), call(exact)):
            assert got.dtype == torch.float64
            assert (got - want).abs().max().item() <= 1e-14 * want.abs().max().item()


def test_schedules_can_be_built_in_float64():
    lam = tnl_decay(8, 1, 4, dtype=torch.float64)
    slopes = torch.tensor([2.0 ** (-8.0 * h / 8) for h in range(1, 9)], dtype=torch.float64)
    assert lam.dtype == torch.float64
    assert torch.allclose(lam, torch.exp(-slopes * (1 - 1 / 3 + 1e-5)), rtol=1e-15, atol=0)
    # the float32 default is the float64 value rounded once
    assert torch.equal(tnl_decay(8, 1, 4), lam.float())
    assert alibi_slopes(6, dtype=torch.float64).dtype == torch.float64


Q = torch.randn(1, 5, 2, 4)

BAD = [
    ({"decay": math.nan}, "decay"),
    ({"decay": math.inf}, "decay"),
    ({"decay": "0.5"}, "decay"),
    ({"decay": True}, "decay"),
    ({"decay": [0.5, 0.5]}, "decay"),
    ({"decay": torch.tensor([0.5, math.nan])}, "decay"),
    ({"eps": -1.0}, "eps"),
    ({"eps": math.nan}, "eps"),
    ({"eps": "tiny"}, "eps"),
    ({"causal": "no"}, "causal"),
    ({"causal": 0}, "causal"),
    ({"normalize": "yes"}, "normalize"),
    ({"return_state": 1}, "return_state"),
    ({"chunk_size": 16.0}, "chunk_size"),
    ({"chunk_size": True}, "chunk_size"),
    ({"backend": None}, "backend"),
    ({"backend": ["chunk"]}, "backend"),
]


@pytest.mark.parametrize("overrides,name", BAD)
def test_bad_scalar_is_refused_naming_it(overrides, name):
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
        linear_attention(Q, Q, Q, **overrides)


@pytest.mark.parametrize(
    "overrides,name",
    [
        ({"decay": math.nan}, "decay"),
        ({"decay": "0.5"}, "decay"),
        ({"eps": math.nan}, "eps"),
        ({"normalize": "no"}, "normalize"),
    ],
)
def test_bad_scalar_is_refused_by_step(overrides, name):
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
        linear_attention_step(Q[:, 0], Q[:, 0], Q[:, 0], **overrides)


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: InLineFeatureMap(scale=math.nan), "scale"),
        (lambda: InLineFeatureMap(scale=math.inf), "scale"),
        (lambda: InLineFeatureMap(scale="big"), "scale"),
        (lambda: InLineFeatureMap(scale=0.0), "scale"),
        (lambda: alibi_slopes(4.0), "num_heads"),
        (lambda: alibi_slopes(True), "num_heads"),
        (lambda: tnl_decay(4, 0, 2.0), "num_layers"),
        (lambda: tnl_decay(4, True, 2), "layer_idx"),
        (lambda: tnl_decay(4, 2, 2), "layer_idx"),
        (lambda: tnl_decay(4.0), "num_heads"),
    ],
)
def test_bad_schedule_or_feature_map_argument(make, name):
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
        make()
