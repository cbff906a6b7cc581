"""Plans cached per (pattern, lengths, ...): kept while a model has layers and heads that use them
(a fixed small LRU would rebuild them on every call), within a budget for their size."""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

Plan = TypeVar("Plan")


class PlanCache(Generic[Plan]):
    """Plans by key, least recently used dropped first once there are more than ``max_plans`` or
    their ``size`` (counted once, when a plan is built) adds up to more than ``max_size``; the
    newest plan always stays."""

    def __init__(self, max_plans: int, max_size: int, size: Callable[[Plan], int]):
        self.max_plans, self.max_size, self.size = max_plans, max_size, size
        self._plans: collections.OrderedDict[Hashable, tuple[Plan, int]] = collections.OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Plan]) -> Plan:
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key][0]
        plan = build()
        self._plans[key] = (plan, self.size(plan))
        while len(self._plans) > 1 and (
            len(self._plans) > self.max_plans
            or sum(size for _, size in self._plans.values()) > self.max_size
        ):
            self._plans.popitem(last=False)
        return plan

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._plans)
