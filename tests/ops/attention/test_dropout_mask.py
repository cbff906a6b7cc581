"""The attention-dropout keep mask (headwise.ops.attention.dropout): the counter-based rule as
written in its docstring, its keep rate, blocks that agree with the whole mask, and seeds given as
0-d int64 tensors (the seeds of calls without ``dropout_seed``)."""

import pytest
import torch

from headwise.ops.attention.dropout import check_dropout, draw_seed, draw_seed_tensor, keep_mask

M64 = (1 << 64) - 1


def _splitmix(seed: int, counter: int) -> int:
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


@pytest.mark.parametrize("seed", [0, 1, 12345, (1 << 62) - 1, (1 << 64) - 1])
def test_mask_follows_the_rule_in_python_integers(seed):
    p, shape = 0.3, (2, 3, 5, 7)
    mask = keep_mask(seed, p, *shape)
    cut = round(p * (1 << 24))
    expected = torch.zeros(shape, dtype=torch.bool)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                for j in range(7):
                    counter = ((b * 3 + h) * 5 + i) * 7 + j
                    expected[b, h, i, j] = (_splitmix(seed, counter) >> 40) >= cut
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_keep_rate(p):
    mask = keep_mask(7, p, 2, 4, 64, 96)
    n = mask.numel()
    rate = mask.float().mean().item()
    # binomial standard error; 5 sigma
    assert abs(rate - (1 - p)) <= 5 * ((p * (1 - p) / n) ** 0.5) + 1e-12


def test_blocks_agree_with_the_whole_mask():
    whole = keep_mask(99, 0.25, 2, 3, 11, 13)
    rows, keys = torch.tensor([0, 4, 10]), slice(2, 9)
    assert torch.equal(
        keep_mask(99, 0.25, 2, 3, 11, 13, rows=rows, keys=keys), whole[:, :, rows, 2:9]
    )


def test_seeds_differ_and_repeat():
    assert torch.equal(keep_mask(5, 0.5, 1, 1, 8, 8), keep_mask(5, 0.5, 1, 1, 8, 8))
    assert not torch.equal(keep_mask(5, 0.5, 1, 1, 8, 8), keep_mask(6, 0.5, 1, 1, 8, 8))
    torch.manual_seed(0)
    first = draw_seed()
    torch.manual_seed(0)
    assert draw_seed() == first


@pytest.mark.parametrize("p", [-0.1, 1.0, float("nan")])
def test_bad_probability(p):
    with pytest.raises(ValueError, match="dropout_p"):
        check_dropout(p)


def test_tensor_seed_is_the_int_of_its_bits():
    # a 0-d int64 tensor holds the seed's bits as an int64 (seeds from 2^63 are negative)
    for seed in (0, 12345, (1 << 63) + 7, (1 << 64) - 1):
        bits = torch.tensor(seed - (1 << 64) if seed >= 1 << 63 else seed)
        assert torch.equal(keep_mask(bits, 0.3, 2, 3, 5, 7), keep_mask(seed, 0.3, 2, 3, 5, 7))


def test_draw_seed_tensor_is_draw_seeds_draw():
    torch.manual_seed(4)
    drawn = draw_seed_tensor()
    state = torch.get_rng_state()
    torch.manual_seed(4)
    assert (drawn.shape, drawn.dtype) == ((), torch.int64)
    assert draw_seed() == int(drawn)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_seed():
    with pytest.raises(TypeError, match="seed"):
        keep_mask(1.5, 0.1, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="seed"):
        keep_mask(-1, 0.1, 1, 1, 2, 2)
    with pytest.raises(TypeError, match="seed must be int64; got torch"):
        keep_mask(torch.tensor(1.0), 0.1, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="seed must be 0-d"):
        keep_mask(torch.tensor([1]), 0.1, 1, 1, 2, 2)
