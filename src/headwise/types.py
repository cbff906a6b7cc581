"""Type aliases shared by the whole library (one place, as NATTEN's ``types.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

#: ``"auto"``, one backend name, or a tuple of names ``auto`` may choose from
Backend = str | tuple[str, ...]
#: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (FlexAttention style, broadcasting)
ScoreMod = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]
#: where queries sit relative to keys when ``Lq != Lk``
Align = Literal["bottom_right", "top_left"]

__all__ = ["Align", "Backend", "ScoreMod"]
