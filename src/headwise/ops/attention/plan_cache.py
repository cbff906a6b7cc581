"""Plans cached per (pattern, lengths, ...): kept while a model has layers and heads that use them
(a fixed small LRU would rebuild them on every call), within a budget for their size."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

Plan = TypeVar("Plan")


class PlanCache(Generic[Plan]):
    """Plans by key, least recently used dropped first once there are more than ``max_plans`` or
    their ``size`` (counted once, when a plan is built) adds up to more than ``max_size``; the
    newest plan always stays.

    Thread-safe: one lock guards the table; a plan is built outside it, so threads building
    different plans do not wait for each other (two threads missing the same key both build it,
    and the first plan stored is the one every caller gets)."""

    def __init__(self, max_plans: int, max_size: int, size: Callable[[Plan], int]):
        self.max_plans, self.max_size, self.size = max_plans, max_size, size
        self._plans: collections.OrderedDict[Hashable, tuple[Plan, int]] = collections.OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], Plan]) -> Plan:
        with self._lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key][0]
        plan = build()
        size = self.size(plan)
        with self._lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key][0]
            self._plans[key] = (plan, size)
            self._total += size
            while len(self._plans) > 1 and (
                len(self._plans) > self.max_plans or self._total > self.max_size
            ):
                _, (_, dropped) = self._plans.popitem(last=False)
                self._total -= dropped
        return plan

    def __iter__(self) -> Iterator[Hashable]:
        with self._lock:
            return iter(list(self._plans))
