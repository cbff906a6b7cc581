"""Bad input raises ValueError naming the argument and what it got; never an internal error."""

from __future__ import annotations

import pytest
import torch

from headwise.ops.linear import linear_attention

Q = torch.randn(2, 5, 3, 4)
V = torch.randn(2, 5, 3, 6)

CASES = [
    ({"q": Q[0]}, r"q must be \(B, L, H, D\); got \(5, 3, 4\)"),
    ({"k": torch.randn(2, 6, 3, 4)}, r"k must have q's shape"),
    ({"k": torch.randn(2, 5, 2, 4)}, r"k must have as many heads as q"),
    ({"v": torch.randn(2, 5, 2, 6)}, r"v must have as many heads as q"),
    ({"v": torch.randn(2, 4, 3, 6)}, r"v must share \(B, L, H\)"),
    ({"v": V.double()}, r"v must match q's dtype"),
    ({"q": Q.long(), "k": Q.long()}, r"q must be floating point"),
    ({"decay": torch.tensor([0.5, 1.5, 0.2])}, r"decay values must lie in \(0, 1\]"),
    ({"decay": 0.0}, r"decay values must lie in \(0, 1\]"),
    ({"decay": torch.ones(4)}, r"decay must have shape \(3,\)"),
    ({"initial_state": torch.zeros(2, 3, 4, 5)}, r"initial_state must be .* got \(2, 3, 4, 5\)"),
    ({"initial_state": torch.zeros(2, 3, 4, 6), "causal": False}, r"need causal=True"),
    ({"backend": "cuda"}, r"backend must be one of"),
    ({"chunk_size": 0}, r"chunk_size must be a positive int"),
    ({"backend": "triton", "decay": 0.5}, r"backend='triton' cannot run"),
]


@pytest.mark.parametrize(("overrides", "message"), CASES)
def test_bad_input_raises_value_error(overrides, message, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = {"q": Q, "k": Q, "v": V, **overrides}
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=message):
        linear_attention(q, k, v, **args)


PACKED = torch.randn(6, 2, 4)

CU_CASES = [
    (torch.tensor([0, 3, 6]).float(), "cu_seqlens must be int32 or int64"),
    (torch.tensor([[0, 6]]), "cu_seqlens must be a 1-D"),
    (torch.tensor([1, 6]), r"must start at 0 and end at T=6"),
    (torch.tensor([0, 5]), r"must start at 0 and end at T=6"),
    (torch.tensor([0, 4, 2, 6]), "non-decreasing"),
]


@pytest.mark.parametrize(("cu", "message"), CU_CASES)
def test_bad_cu_seqlens(cu, message):
    with pytest.raises(ValueError, match=message):
        linear_attention(PACKED, PACKED, PACKED, cu_seqlens=cu)


def test_packed_rank_and_state_count():
    with pytest.raises(ValueError, match=r"q must be \(T, H, D\) \(packed"):
        linear_attention(Q, Q, V, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"initial_state must be .*\(3, 2, 4, 4\)"):
        linear_attention(PACKED, PACKED, PACKED, cu_seqlens=torch.tensor([0, 1, 2, 6]),
                         initial_state=torch.zeros(2, 2, 4, 4))  # fmt: skip


def test_non_tensor_is_type_error():
    with pytest.raises(TypeError, match="q must be a tensor"):
        linear_attention([1.0], Q, V)
