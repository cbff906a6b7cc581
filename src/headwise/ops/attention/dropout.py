"""Attention dropout's keep mask: one counter-based definition that every backend shares.

Dropout acts on the softmax probabilities (the LSE stays the undropped one), as in
``nn.MultiheadAttention``, SDPA and FlashAttention (Dao et al., 2022):

    O_i = sum_j P_ij Z_ij / (1 - p) V_j,   Z_ij in {0, 1}

The mask ``Z`` is a pure function of ``(seed, b, h, i, j)``, so a backward pass regenerates it
instead of storing it (FlashAttention keeps Philox's state for the same reason). For a call with
``H`` query heads and lengths ``Lq``, ``Lk``, element ``(b, h, i, j)`` takes the counter
``c = ((b H + h) Lq + i) Lk + j`` through SplitMix64's output function (Steele et al., 2014), a
counter-based generator in the spirit of Philox (Salmon et al., 2011):

    z = seed + (c + 1) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)                       (all mod 2^64, logical shifts)
    keep  iff  z >> 40 >= round(p * 2^24)

The C tile kernel implements the same function; tests check the two agree bit for bit. A call
carries its dropout to a backend as a :class:`Dropout` (``p`` and the call's ``seed``).

A seed is an int, or a 0-d int64 tensor holding the seed's bits as an int64 (:func:`to_int64`).
A call given no seed draws it as a tensor (:func:`draw_seed_tensor`): ``torch.compile`` traces
the draw into the graph (a fresh seed per run) instead of breaking the graph on ``.item()``; the
custom operators take the tensor as an input and read it only in their real implementations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise._checks import ArgumentTypeError, check_int, check_real

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
#: the uniform draw has this many bits
UNIFORM_BITS = 24


def to_int64(value: int) -> int:
    """A uint64 (a seed, a constant) as the int64 with the same bits: torch has no uint64
    arithmetic, and a custom operator's ``int`` is int64."""
    return value - (1 << 64) if value >= 1 << 63 else value


def from_int64(value: int) -> int:
    """The uint64 with the bits of int64 ``value``: :func:`to_int64` undone."""
    return value % (1 << 64)


def _shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 ``z`` (torch's ``>>`` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def threshold(p: float) -> int:
    """Draws below this (of ``2^24``) are dropped."""
    return round(check_dropout(p) * (1 << UNIFORM_BITS))


def check_dropout(p: object, name: str = "dropout_p") -> float:
    """``p`` as a float in ``[0, 1)``; a ``ValueError``/``TypeError`` naming ``name`` otherwise."""
    value = check_real(name, p, minimum=0.0)
    if not value < 1:
        raise ValueError(f"{name} must be in [0, 1); got {p!r}")
    return value


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, 2^64)``; a ``ValueError``/``TypeError`` naming ``name``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArgumentTypeError(f"{name} must be an int; got {type(seed).__name__}")
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"{name} must be in [0, 2**64); got {seed}")
    return seed


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A fresh 62-bit seed from ``generator`` (torch's default CPU generator when ``None``), so
    ``torch.manual_seed`` fixes the masks: the int of :func:`draw_seed_tensor`."""
    return int(draw_seed_tensor(generator))


def draw_seed_tensor(generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`draw_seed`'s draw (the same number from the same generator, one draw) as a 0-d
    int64 tensor, without reading it: ``torch.compile`` keeps the draw in its graph."""
    return torch.randint(0, 1 << 62, (), dtype=torch.int64, generator=generator)


#: the ``seed`` input of operator calls without dropout (never read; one tensor, made once)
NO_SEED = torch.zeros((), dtype=torch.int64)


def seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """``seed`` as the 0-d int64 tensor of the custom operators' ``seed`` input (an int's bits as
    an int64, :func:`to_int64`; a tensor as it is)."""
    if isinstance(seed, torch.Tensor):
        return _check_seed_tensor(seed)
    return torch.tensor(to_int64(check_seed(seed)), dtype=torch.int64)


def _check_seed_tensor(seed: torch.Tensor) -> torch.Tensor:
    if seed.dtype != torch.int64:
        raise ArgumentTypeError(f"a tensor seed must be int64; got {seed.dtype}")
    if seed.dim() != 0:
        raise ValueError(f"a tensor seed must be 0-d; got shape {tuple(seed.shape)}")
    return seed


def keep_mask(
    seed: int | torch.Tensor,
    p: float,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    *,
    rows: torch.Tensor | slice | None = None,
    keys: torch.Tensor | slice | None = None,
    head_ids: torch.Tensor | slice | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The keep mask ``Z`` ``(batch, len(head_ids), len(rows), len(keys))`` (bool) of a call with
    these sizes; ``rows``/``keys``/``head_ids`` pick query rows, key positions and query heads
    (all when ``None``), so a block of the mask is generated without the rest. ``seed``: an int
    or a 0-d int64 tensor of its bits (module docstring), read by tensor arithmetic only."""
    if isinstance(seed, torch.Tensor):
        start = _check_seed_tensor(seed)  # 0-d: it meets tensors on any device
    else:
        start = to_int64(check_seed(seed))
    cut = threshold(p)
    sizes = [
        check_int(name, value, minimum=0)
        for name, value in (
            ("batch", batch),
            ("heads", heads),
            ("q_len", q_len),
            ("kv_len", kv_len),
        )
    ]
    batch, heads, q_len, kv_len = sizes
    i = _positions(rows, q_len, device)
    j = _positions(keys, kv_len, device)
    h = _positions(head_ids, heads, device)
    if torch.compiler.is_compiling():
        # inductor folds the hash's wrapping int64 products into index arithmetic on Python
        # ints: wrong masks, or an OverflowError in code generation. The operator runs the
        # same eager code.
        return torch.ops.headwise.keep_mask(
            seed_tensor(seed), cut, batch, heads, q_len, kv_len, h, i, j
        )
    return _hashed(start, cut, batch, heads, q_len, kv_len, h, i, j)


def _hashed(start, cut, batch, heads, q_len, kv_len, h, i, j) -> torch.Tensor:
    """:func:`keep_mask` from its checked arguments: the seed as an int64 (or 0-d tensor), the
    threshold, the sizes and the head, row and key positions."""
    b = torch.arange(batch, device=i.device, dtype=torch.int64)
    counter = (b.view(-1, 1, 1, 1) * heads + h.view(1, -1, 1, 1)) * q_len + i.view(1, 1, -1, 1)
    counter = counter * kv_len + j.view(1, 1, 1, -1)
    z = start + (counter + 1) * to_int64(_GOLDEN)
    z = (z ^ _shift(z, 30)) * to_int64(_MIX1)
    z = (z ^ _shift(z, 27)) * to_int64(_MIX2)
    z = z ^ _shift(z, 31)
    return _shift(z, 64 - UNIFORM_BITS) >= cut


@torch.library.custom_op("headwise::keep_mask", mutates_args=())
def _keep_mask_operator(
    seed: torch.Tensor,
    cut: int,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    h: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
) -> torch.Tensor:
    return _hashed(seed, cut, batch, heads, q_len, kv_len, h, i, j)


@_keep_mask_operator.register_fake
def _(seed, cut, batch, heads, q_len, kv_len, h, i, j):
    return i.new_empty((batch, h.shape[0], i.shape[0], j.shape[0]), dtype=torch.bool)


def _positions(index, length: int, device) -> torch.Tensor:
    if index is None:
        return torch.arange(length, device=device, dtype=torch.int64)
    if isinstance(index, slice):
        return torch.arange(length, device=device, dtype=torch.int64)[index]
    return torch.as_tensor(index, device=device).to(torch.int64)


@dataclass(frozen=True)
class Dropout:
    """The dropout of one attention call, as backends receive it: rate ``p`` in ``(0, 1)`` and
    the call's ``seed`` of :func:`keep_mask`, an int or a 0-d int64 tensor (``None`` for
    ``sdpa``, which draws its own mask from torch's generator)."""

    p: float
    seed: int | torch.Tensor | None

    def weights(
        self,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        *,
        rows: torch.Tensor | slice | None = None,
        keys: torch.Tensor | slice | None = None,
        head_ids: torch.Tensor | slice | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``Z / (1 - p)`` on a block of :func:`keep_mask` (same arguments), in ``dtype``: the
        factor each probability is multiplied by."""
        keep = keep_mask(
            self.seed,
            self.p,
            batch,
            heads,
            q_len,
            kv_len,
            rows=rows,
            keys=keys,
            head_ids=head_ids,
            device=device,
        )
        return keep.to(dtype) * (1 / (1 - self.p))
