"""Feature maps ``phi`` for linear attention: scores are ``phi_q(q_i) . phi_k(k_j)``.

A feature map is anything with ``query(x)`` and ``key(x)`` methods acting on ``(..., L, H, D)``
tensors (the length axis is ``-3``), or a plain callable applied to both. A map may also offer
``similarity(q, k) -> (B, H, L, S)``, all ``phi(q_i) . phi(k_j)`` in closed form; ``auto`` then
runs short sequences in the quadratic form without building features (the Taylor map does).
Names accepted by :func:`get_feature_map`:

* ``"identity"``: ``phi(x) = x`` (Lightning / TransNormerLLM; the operator itself has no scale).
* ``"elu+1"`` (alias ``"elu"``): ``phi(x) = elu(x) + 1`` (Katharopoulos et al., 2020).
* ``"relu"``: ``phi(x) = max(x, 0)``.
* ``"taylor"``: second-order Taylor map of Based (Arora et al., 2024, "Simple linear attention
  language models balance the recall-throughput tradeoff"):
  ``phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]`` of size ``1 + d + d^2``, so that
  ``phi(q) . phi(k) = 1 + z + z^2 / 2`` with ``z = q . k / sqrt(d)``.
* ``"inline"``: the injective form of InLine attention (Han et al., NeurIPS 2024, "Bridging the
  Divide: Reconsidering Softmax and Linear Attention"), see :class:`InLineFeatureMap`. It is
  sequence-level (it uses the mean key and the length), so it needs ``causal=False``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from headwise._checks import check_real


@runtime_checkable
class FeatureMap(Protocol):
    """Maps queries and keys ``(..., L, H, D)`` to features ``(..., L, H, D')``."""

    def query(self, x: torch.Tensor) -> torch.Tensor: ...

    def key(self, x: torch.Tensor) -> torch.Tensor: ...


FeatureMapLike = str | FeatureMap | Callable[[torch.Tensor], torch.Tensor] | None


class _Symmetric:
    """The same token-wise map for queries and keys."""

    #: True when the map looks at one token at a time (so it works for varlen and decoding)
    tokenwise = True

    def __init__(
        self,
        name: str,
        fn: Callable[[torch.Tensor], torch.Tensor],
        similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.name = name
        self._fn = fn
        #: ``(q: (B, L, H, D), k: (B, S, H, D)) -> (B, H, L, S)`` equal to ``phi(q) . phi(k)``
        #: without building the features, when the map has such a closed form (else None)
        self.similarity = similarity

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def key(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def __repr__(self) -> str:
        return f"FeatureMap({self.name!r})"


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def taylor(x: torch.Tensor) -> torch.Tensor:
    """Based's second-order Taylor features ``(..., D) -> (..., 1 + D + D^2)``.

    ``taylor(q) . taylor(k) == 1 + z + z^2 / 2`` with ``z = q . k / sqrt(D)``.
    """
    d = x.shape[-1]
    ones = torch.ones_like(x[..., :1])
    first = x * d**-0.25
    second = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0 * d)
    return torch.cat([ones, first, second], dim=-1)


def taylor_similarity(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``taylor(q) . taylor(k) = 1 + z + z^2 / 2``, ``z = q . k / sqrt(D)``, for all pairs.

    ``q: (B, L, H, D)``, ``k: (B, S, H, D)`` -> ``(B, H, L, S)``: ``O(L S D)`` work instead of the
    ``O(L S D^2)`` of the features (the "quadratic" view of Based, Arora et al. 2024).
    """
    return taylor_of(torch.einsum("blhd,bshd->bhls", q, k) * q.shape[-1] ** -0.5)


def taylor_of(z: torch.Tensor) -> torch.Tensor:
    """``1 + z + z^2 / 2`` of scaled dot products ``z``, as ``(z / 2 + 1) z + 1`` (one new
    tensor, the rest in place)."""
    return (z * 0.5).add_(1.0).mul_(z).add_(1.0)


class InLineFeatureMap:
    """InLine attention's injective weights as a (non-causal) feature map pair.

    For one head over ``N`` tokens with kernel ``phi`` and scale ``s`` (default ``D^-1/2``)::

        w_ij = 1/N + (s/N) * phi(q_i) . (phi(k_j) - kbar),   kbar = mean_t phi(k_t)

    Every row of ``w`` sums to exactly 1 and ``w`` is not invariant to rescaling ``q`` (the map
    is injective, unlike normalized linear attention). It factorizes as
    ``w_ij = query(q)_i . key(k)_j`` with ``query(q) = [sqrt(s) phi(q), 1]`` and
    ``key(k) = [sqrt(s) (phi(k) - kbar), 1] / N``, so ``linear_attention(..., causal=False)``
    with this map and ``normalize=False`` computes ``o_i = sum_j w_ij v_j`` in linear time.
    Means and ``N`` are taken over the length axis ``-3`` of the tensor given.
    """

    tokenwise = False

    def __init__(self, kernel: str = "identity", scale: float | None = None) -> None:
        self.kernel = get_feature_map(kernel)
        if not getattr(self.kernel, "tokenwise", False):
            raise ValueError(f"kernel must be a token-wise feature map; got {kernel!r}")
        self.scale = None if scale is None else check_real("scale", scale, positive=True)

    def _scale(self, x: torch.Tensor) -> float:
        return x.shape[-1] ** -0.5 if self.scale is None else self.scale

    def query(self, x: torch.Tensor) -> torch.Tensor:
        phi = self.kernel.query(x) * math.sqrt(self._scale(x))
        return torch.cat([phi, torch.ones_like(phi[..., :1])], dim=-1)

    def key(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-3]
        phi = self.kernel.key(x)
        centered = (phi - phi.mean(dim=-3, keepdim=True)) * math.sqrt(self._scale(x))
        return torch.cat([centered, torch.ones_like(phi[..., :1])], dim=-1) / max(n, 1)

    def __repr__(self) -> str:
        return f"InLineFeatureMap(kernel={self.kernel!r}, scale={self.scale})"


_NAMED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "elu+1": _elu_plus_one,
    "elu": _elu_plus_one,
    "relu": F.relu,
    "taylor": taylor,
}


def get_feature_map(feature_map: FeatureMapLike) -> FeatureMap:
    """Resolve a name, a callable or a :class:`FeatureMap` to a :class:`FeatureMap`.

    ``None`` means identity. A plain callable is applied to queries and keys alike and is assumed
    to act token by token.
    """
    if feature_map is None:
        return _Symmetric("identity", _NAMED["identity"])
    if isinstance(feature_map, str):
        key = feature_map.lower()
        if key == "inline":
            return InLineFeatureMap()
        if key not in _NAMED:
            raise ValueError(
                f"feature_map must be one of {sorted([*_NAMED, 'inline'])}, a callable or an "
                f"object with query/key methods; got {feature_map!r}"
            )
        return _Symmetric(key, _NAMED[key], taylor_similarity if key == "taylor" else None)
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if callable(feature_map):
        return _Symmetric(getattr(feature_map, "__name__", "callable"), feature_map)
    raise ValueError(
        f"feature_map must be a name, a callable or an object with query/key methods; "
        f"got {type(feature_map).__name__}"
    )
