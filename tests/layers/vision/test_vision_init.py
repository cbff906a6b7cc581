"""Every layer of the vision area builds on the meta device, and ``reset_parameters()`` after
``to_empty`` (the FSDP route) restores the documented init: every parameter and buffer (index
tables included) is written, the values equal a reset of a normally built layer, their
statistics match a freshly built one, and the output is finite (issue 13 item 13)."""

from __future__ import annotations

import itertools

import pytest
import torch
from vision_layer_cases import LAYERS


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(module.named_parameters(), module.named_buffers()))


@pytest.mark.parametrize("case", sorted(LAYERS))
def test_meta_to_empty_reset_restores_init(case):
    build, shape = LAYERS[case]
    torch.manual_seed(0)
    fresh = build()
    expected_shape = fresh(torch.randn(2, *shape)).shape
    with torch.device("meta"):
        layer = build()
    assert all(t.is_meta for t in _tensors(layer).values())
    assert layer(torch.empty(2, *shape, device="meta")).shape == expected_shape

    layer.to_empty(device="cpu")
    with torch.no_grad():
        for t in _tensors(layer).values():
            t.fill_(float("nan") if t.is_floating_point() else -7)
    torch.manual_seed(1)
    layer.reset_parameters()
    torch.manual_seed(1)
    fresh.reset_parameters()

    got, reset, built = _tensors(layer), _tensors(fresh), _tensors(build())
    torch.manual_seed(2)
    rebuilt = _tensors(build())
    assert got.keys() == reset.keys() == built.keys()
    for name, t in got.items():
        assert not t.is_floating_point() or torch.isfinite(t).all(), f"{name} was not reset"
        # the same code path from the same RNG state, whatever the device it was built on
        torch.testing.assert_close(t, reset[name], rtol=0, atol=0, msg=f"{name} differs")
        # and the same distribution as construction (values differ where the init is random)
        ref = built[name]
        if torch.equal(ref, rebuilt[name]):  # a deterministic init (constants, eye, indices)
            torch.testing.assert_close(t, ref, msg=f"{name}: init differs from a fresh layer")
            continue
        if t.numel() < 16:  # too few values for statistics
            continue
        n, t, ref = t.numel(), t.double(), ref.double()
        spread = max(t.std().item(), ref.std().item())
        assert abs(t.mean() - ref.mean()) <= 5 * spread * (2 / n) ** 0.5, name
        assert 0.4 <= t.std() / ref.std() <= 2.5, name

    out = layer(torch.randn(2, *shape))
    assert out.shape == expected_shape and torch.isfinite(out).all()
