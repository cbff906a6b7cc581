"""Every vision layer's gradients (input and every parameter) at batch 1 equal finite
differences, in training and eval mode.

Batch 1 is where layouts turn ambiguous: a size-1 batch axis can carry any stride, and torch
2.13's CPU BatchNorm backward misreads a channels-last gradient or input whose batch stride is
not ``C·H·W`` (issue 13 item 3: SHViT's input, ``pre_norm`` and ``qkv`` gradients were ~100 %
off, forward exact). The check runs on every layer, so a mixer that hands a norm or conv an odd
layout is caught whatever op it hits.

The check is a directional derivative: for a loss ``L = Σ w ⊙ layer(x; θ)`` with random ``w``
and random directions ``d`` over ``(x, θ)`` (not normalised, so an error of the gradient shows
at its own scale), ``(L(p + εd) - L(p - εd)) / 2ε`` must equal ``∇L · d`` in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from vision_layer_cases import LAYERS

# the mixers are checked one by one; the backbone adds only its stem, norms, MLPs and
# downsampling, so two mixers (with BatchNorm inside) cover it
CASES = [
    *sorted(c for c in LAYERS if not c.startswith("backbone_")),
    "backbone_single_head",
    "backbone_subspace",
]


def _randomise(module: torch.nn.Module) -> None:
    # a layer at its init can hide a wrong gradient (SHViT's output BN starts at weight 0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.normal_()
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES)
def test_batch_one_gradients_equal_finite_differences(case, training):
    torch.manual_seed(0)
    build, shape = LAYERS[case]
    module = build().double().train(training)
    _randomise(module)
    names = [name for name, _ in module.named_parameters()]
    leaves = [torch.randn(1, *shape, dtype=torch.float64)]
    leaves += [p.detach() for p in module.parameters()]
    weight = None

    def loss(values):
        nonlocal weight
        out = functional_call(module, dict(zip(names, values[1:])), (values[0],))
        weight = torch.randn_like(out) if weight is None else weight
        return (out * weight).sum()

    leaves = [t.clone().requires_grad_() for t in leaves]
    grads = torch.autograd.grad(loss(leaves), leaves, materialize_grads=True)
    eps = 1e-6
    with torch.no_grad():
        for _ in range(2):
            directions = [torch.randn_like(t) for t in leaves]
            plus = loss([t + eps * d for t, d in zip(leaves, directions)])
            minus = loss([t - eps * d for t, d in zip(leaves, directions)])
            numeric = (plus - minus) / (2 * eps)
            analytic = sum((g * d).sum() for g, d in zip(grads, directions))
            torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-6)
