"""A target's memory budget and its water marks (pure arithmetic)."""
from __future__ import annotations

from dataclasses import dataclass

from umgr.paging.tuning import (
    EVICT_BATCH, EVICT_BATCH_DIVISOR, EVICT_BATCH_MAX, HIGH_WATER_BATCHES, HIGH_WATER_DIVISOR, HIGH_WATER_MIN_PAGES,
    LOW_WATER_BATCHES, LOW_WATER_DIVISOR,
)


@dataclass(frozen=True)
class Budget:
    pages: int   # resident pages allowed; 0: no limit

    @property
    def limited(self) -> bool:
        return self.pages > 0

    @property
    def high_water(self) -> int:
        """Eviction starts above this many resident pages."""
        if not self.pages:
            return 0
        headroom = min(self.pages // HIGH_WATER_DIVISOR, HIGH_WATER_BATCHES * self.batch)
        return self.pages - max(headroom, HIGH_WATER_MIN_PAGES)

    @property
    def batch(self) -> int:
        """Pages per eviction batch: a share of the budget, within bounds."""
        return min(EVICT_BATCH_MAX, max(EVICT_BATCH, self.pages // EVICT_BATCH_DIVISOR))

    @property
    def low_water(self) -> int:
        """An eviction round goes down to this many resident pages."""
        if not self.pages:
            return 0
        below = min(self.pages // LOW_WATER_DIVISOR, LOW_WATER_BATCHES * self.batch)
        return self.pages - max(below, min(self.batch, self.pages // 2))

    def over(self, resident: int) -> bool:
        return self.limited and resident > self.high_water

    def full(self, resident: int) -> bool:
        """At the budget: a new page must wait for an eviction."""
        return self.limited and resident >= self.pages

    def evict_goal(self, resident: int) -> int:
        """How many pages the next eviction batch wants."""
        return min(self.batch, resident - self.low_water)

    def room(self, resident: int, otherwise: int) -> int:
        """Pages that may come in ahead of demand without crossing the high
        mark (`otherwise` when there is no limit)."""
        return self.high_water - resident if self.limited else otherwise

    def prefetch_allowed(self, resident: int, filling: int) -> bool:
        """No prefetch at the budget: it would only be evicted again."""
        return not self.limited or resident + filling < self.pages
