"""HaloAttention: a block's output depends only on the block and its halo; equals a per-block
loop with the relative-logit index rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headwise.layers.vision import HaloAttention


def _oracle(m: HaloAttention, x: torch.Tensor) -> torch.Tensor:
    b_, height, width, _ = x.shape
    b, r, w, h = m.block_size, m.halo_size, m.window, m.num_heads
    dqk, dv = m.dim_qk, m.dim_v
    q = m.q(x).reshape(b_, height, width, h, dqk)
    kv = F.pad(m.kv(x), (0, 0, r, r, r, r)).reshape(b_, height + 2 * r, width + 2 * r, h, -1)
    out = torch.zeros(b_, height, width, h, dv, dtype=x.dtype)
    for by in range(0, height, b):
        for bx in range(0, width, b):
            window = kv[:, by : by + w, bx : bx + w].reshape(b_, w * w, h, -1)
            k, v = window[..., :dqk], window[..., dqk:]
            for iy in range(b):
                for ix in range(b):
                    qi = q[:, by + iy, bx + ix]  # (B, h, d)
                    logits = torch.einsum("bhd,bjhd->bhj", qi, k) * dqk**-0.5
                    for jy in range(w):
                        for jx in range(w):
                            rel = m.height_rel[jy - iy + w - 1] + m.width_rel[jx - ix + w - 1]
                            logits[:, :, jy * w + jx] += qi @ rel
                    out[:, by + iy, bx + ix] = torch.einsum("bhj,bjhd->bhd", logits.softmax(-1), v)
    return out.reshape(b_, height, width, h * dv)


def test_equals_per_block_loop():
    torch.manual_seed(0)
    m = HaloAttention(8, 2, block_size=2, halo_size=1, dim_head=3).double()
    x = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), _oracle(m, x))


def test_block_depends_only_on_block_and_halo():
    torch.manual_seed(1)
    m = HaloAttention(8, 2, block_size=3, halo_size=1).double()
    x = torch.randn(1, 9, 9, 8, dtype=torch.float64)
    y = m(x)
    # block (1, 1) covers rows/cols 3..5; with its halo, rows/cols 2..6
    outside = x.clone()
    keep = torch.zeros(9, 9, dtype=torch.bool)
    keep[2:7, 2:7] = True
    outside[:, ~keep] += torch.randn_like(outside[:, ~keep])
    torch.testing.assert_close(m(outside)[:, 3:6, 3:6], y[:, 3:6, 3:6])
    inside_halo = x.clone()
    inside_halo[:, 2, 2] += 1.0
    assert not torch.allclose(m(inside_halo)[:, 3:6, 3:6], y[:, 3:6, 3:6])
