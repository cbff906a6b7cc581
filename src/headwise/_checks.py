"""Argument checks shared by the whole library.

Every public entry point validates its arguments before any work starts, and every error names the
argument and what it got. A value of the wrong *type* raises :class:`ArgumentTypeError` (a
``TypeError`` that is also a ``ValueError``, so code written against the older ``ValueError``
contract keeps catching it); a value of the right type outside its range raises ``ValueError``;
a call that is well formed but that a backend or model cannot serve raises :class:`Unsupported`
(also a ``ValueError``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (catchable as ``TypeError`` or ``ValueError``)."""


class Unsupported(ValueError):
    """A well-formed request that headwise refuses instead of answering it wrongly."""


def _is_int(value: Any) -> bool:
    if type(value) is int:  # the common case, without the ABC checks below (plans check many)
        return True
    # torch.SymInt: a number torch.compile(dynamic=True) traces symbolically
    return isinstance(value, numbers.Integral | torch.SymInt) and not isinstance(value, bool)


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as a Python ``int`` (bools, floats and strings refused), within the bounds."""
    if not _is_int(value):
        raise ArgumentTypeError(f"{name} must be an integer; got {value!r}")
    if not isinstance(value, torch.SymInt):  # int() would fix a traced length to one value
        value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}; got {value!r}")
    return value


def check_ints(name: str, values: Any, *, minimum: int | None = None) -> tuple[int, ...]:
    """A sequence of integers (see :func:`check_int`); tensors are refused unless integral."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ArgumentTypeError(f"{name} must be a sequence of integers; got {values!r}")
    items = values.tolist() if hasattr(values, "tolist") else list(values)
    if hasattr(values, "is_floating_point") and (values.is_floating_point() or values.is_complex()):
        raise ArgumentTypeError(f"{name} must hold integers; got a {values.dtype} tensor")
    return tuple(check_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(items))


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool`` (``"no"``, ``0`` and ``None`` are refused, not coerced)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False; got {value!r}")
    return value


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    positive: bool = False,
) -> float:
    """``value`` as a finite Python ``float`` (one-element tensors accepted; NaN/inf refused).

    A tensor that requires grad is refused: turning it into a number would silently cut its
    gradient (a learnable temperature would never train)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ArgumentTypeError(
                f"{name} must be a real number; got a tensor of shape {tuple(value.shape)}"
            )
        if getattr(value, "requires_grad", False):
            raise ArgumentTypeError(
                f"{name} must be a number, not a tensor that requires grad (its gradient would "
                "be lost); fold a learnable factor into q instead"
            )
        value = value.item()
    # torch.SymFloat/SymInt: numbers torch.compile(dynamic=True) traces symbolically
    real = numbers.Real | torch.SymFloat | torch.SymInt
    if isinstance(value, bool) or not isinstance(value, real):
        raise ArgumentTypeError(f"{name} must be a real number; got {value!r}")
    value = float(value)
    if value != value or value == math.inf or value == -math.inf:  # math.isfinite, for symbols too
        raise ValueError(f"{name} must be finite; got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if not isinstance(value, str | int | float | type(None)) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return value
