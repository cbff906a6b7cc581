"""The Triton chunk kernel == quadratic reference, forward and backward (CPU interpreter).

Runs on CPU with TRITON_INTERPRET=1 on tiny shapes; skipped when triton is not installed.
"""

from __future__ import annotations

import pytest
import torch
from linear_helpers import make_inputs, run

from conftest import assert_fa3_close
from headwise.ops.linear import linear_attention

pytest.importorskip("triton", reason="triton is not installed (pip install 'headwise[triton]')")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("length", "with_state"), [(1, True), (21, True), (32, False)])
def test_triton_matches_quadratic(dtype, length, with_state):
    inputs = make_inputs(batch=1, length=length, heads=2, dim=5, dim_v=3, state=with_state)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = tuple(None if x is None else x.to(device) for x in inputs)
    oracle = run(inputs, torch.float64, "naive")
    naive_low = run(inputs, dtype, "naive")
    fast = run(inputs, dtype, "triton", chunk_size=16)
    assert fast.keys() == oracle.keys()
    for name in oracle:
        assert_fa3_close(fast[name], naive_low[name], oracle[name], dtype, what=name)


def test_triton_non_causal_and_varlen():
    q, k, v, lam, _ = make_inputs(batch=1, length=12, heads=2, dim=4, dim_v=3, state=False)
    kwargs = {"decay": lam.float(), "chunk_size": 16}
    q, k, v = q.float(), k.float(), v.float()
    a = linear_attention(q, k, v, causal=False, backend="triton", **kwargs)
    b = linear_attention(q, k, v, causal=False, backend="chunk", **kwargs)
    torch.testing.assert_close(a, b)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    a = linear_attention(q[0], k[0], v[0], cu_seqlens=cu, backend="triton", **kwargs)
    b = linear_attention(q[0], k[0], v[0], cu_seqlens=cu, backend="chunk", **kwargs)
    torch.testing.assert_close(a, b)


def test_triton_rejects_what_it_cannot_run_and_auto_falls_back():
    q = torch.randn(1, 4, 1, 300)
    with pytest.raises(ValueError, match="exceed 256"):
        linear_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="power of two"):
        linear_attention(q[..., :4], q[..., :4], q[..., :4], backend="triton", chunk_size=24)
    with pytest.raises(ValueError, match="dtype"):
        linear_attention(q.double(), q.double(), q.double(), backend="triton")
    # auto never picks Triton for CPU tensors (here it takes the quadratic form of a short
    # sequence, which sums in another order than the chunk path)
    torch.testing.assert_close(
        linear_attention(q, q, q, backend="auto"),
        linear_attention(q, q, q, backend="chunk"),
        rtol=1e-4,
        atol=1e-4,
    )
