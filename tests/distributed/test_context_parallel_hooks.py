"""ContextParallel and the wrapped layer's hook points: the points it forms fire on this rank's
shard; ``hook_scores``/``hook_pattern``, which no rank can form, are refused when hooked instead
of silently never firing. The refusal comes before any communication, so one process (no
process group: world 1) tests it."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise.distributed import context_parallel

NAMES = ["hook_scores", "hook_pattern"]


@pytest.mark.parametrize("pre", [False, True], ids=["forward_hook", "pre_hook"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["ring", "ulysses"])
def test_hooked_scores_or_pattern_are_refused(mode, name, pre):
    mha = headwise.MultiHeadAttention(16, 4, causal=True)
    cp = context_parallel(mha, mode=mode)
    point = getattr(mha, name)
    seen = []
    if pre:
        handle = point.register_forward_pre_hook(lambda module, args: seen.append(args))
    else:
        handle = point.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(2, 6, 16)
    with pytest.raises(headwise.Unsupported, match=rf"{name} of the wrapped layer are hooked"):
        cp(x, seq_len=6)
    assert not seen
    handle.remove()
    torch.testing.assert_close(cp(x, seq_len=6), mha(x))  # world 1: the whole sequence


def test_the_points_it_forms_still_fire():
    mha = headwise.MultiHeadAttention(16, 4, causal=True)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = tuple(out.shape)

        return hook

    for name in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result"):
        getattr(mha, name).register_forward_hook(record(name))
    context_parallel(mha)(torch.randn(2, 6, 16), seq_len=6)
    assert seen == {
        "hook_q": (2, 6, 4, 4),
        "hook_k": (2, 6, 4, 4),
        "hook_v": (2, 6, 4, 4),
        "hook_z": (2, 6, 4, 4),
        "hook_result": (2, 6, 16),
    }
