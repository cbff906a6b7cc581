"""MultiAxisAttention: partitions cover every token once (grid = strided); equals dense attention
masked to the windows with the TF relative bias; padded keys are masked."""

from __future__ import annotations

import pytest
import torch

from headwise.layers.vision import MultiAxisAttention
from headwise.layers.vision.windows import (
    block_partition,
    block_reverse,
    grid_partition,
    grid_reverse,
)


@pytest.mark.parametrize("size", [2, 3])
def test_partitions_cover_every_token_once(size):
    height, width = 6, 12
    labels = torch.arange(height * width).reshape(1, height, width, 1)
    for split, merge in ((block_partition, block_reverse), (grid_partition, grid_reverse)):
        windows = split(labels, size)
        assert windows.shape == (height * width // size**2, size * size, 1)
        assert torch.equal(windows.flatten().sort().values, torch.arange(height * width))
        assert torch.equal(merge(windows, size, height, width), labels)
    grid = grid_partition(labels, size)
    step_h, step_w = height // size, width // size
    for a in range(step_h):
        for b in range(step_w):
            expected = [
                (i * step_h + a) * width + j * step_w + b for i in range(size) for j in range(size)
            ]
            assert grid[a * step_w + b, :, 0].tolist() == expected
    block = block_partition(labels, size)
    assert block[0, :, 0].tolist() == [y * width + x for y in range(size) for x in range(size)]


def _oracle(m: MultiAxisAttention, x: torch.Tensor) -> torch.Tensor:
    """Dense attention over the real tokens, masked to same-window pairs, TF bias by in-window
    coordinates; windows defined on the zero-padded grid."""
    b, height, width, c = x.shape
    p = m.size
    padded_h, padded_w = -(-height // p) * p, -(-width // p) * p
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    if m.partition == "block":
        window, wy, wx = (ys // p) * (padded_w // p) + xs // p, ys % p, xs % p
    else:
        sh, sw = padded_h // p, padded_w // p
        window, wy, wx = (ys % sh) * sw + xs % sw, ys // sh, xs // sw
    table = m.relative_position_bias_table
    bias = table[:, wy[None, :] - wy[:, None] + p - 1, wx[None, :] - wx[:, None] + p - 1]
    q, k, v = m.qkv(x.reshape(b, -1, c)).reshape(b, -1, 3, m.num_heads, m.dim_head).unbind(2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * m.dim_head**-0.5 + bias
    scores = scores.masked_fill(window[:, None] != window[None, :], float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).flatten(2)
    return m.proj(o).reshape(b, height, width, c)


@pytest.mark.parametrize("partition", ["block", "grid"])
@pytest.mark.parametrize("shape", [(6, 9), (5, 7)])
def test_equals_masked_dense_oracle(partition, shape):
    torch.manual_seed(0)
    m = MultiAxisAttention(16, partition=partition, partition_size=3, dim_head=8).double()
    with torch.no_grad():
        m.relative_position_bias_table.normal_()
    x = torch.randn(2, *shape, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), _oracle(m, x))


def test_relative_bias_is_key_minus_query():
    m = MultiAxisAttention(8, partition_size=3, dim_head=8)
    bias = m.relative_bias()
    table = m.relative_position_bias_table
    # query (0, 0) = token 0, key (2, 1) = token 7: offset (+2, +1)
    assert bias[0, 0, 7] == table[0, 2 + 2, 1 + 2]
    assert bias[0, 7, 0] == table[0, -2 + 2, -1 + 2]


def test_errors():
    with pytest.raises(ValueError, match="partition"):
        MultiAxisAttention(32, partition="diagonal")
    with pytest.raises(ValueError, match="dim_head"):
        MultiAxisAttention(48, dim_head=32)
