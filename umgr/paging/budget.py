"""A target's memory budget and its water marks (pure arithmetic).

Resident pages climb past the high mark, the headroom under the budget (a
32nd of it, 512 to 2048 pages, and at most a 16th of it), and an eviction
round takes them down to the low mark, a batch lower (a 16th of the
budget, 512 to 2048 pages): where rounds are of one batch (faults come one
at a time) a target holds on average its budget less the headroom and half
a batch (93.75% of it at 64 MiB, 97.7% from 512 MiB up). The headroom is
room for the faults that come while a batch is put away (a one-batch round
took 4-11 ms with batches of a 32nd, in which random faults from disk bring
in a hundred pages or so); a fast burst fills it and waits at the budget,
and then two batches go in flight: such a rushed round (a first touch, a
scan) takes batches of up to an 8th of the budget, within the same bounds,
and goes one of those below the high mark (84.4% of the budget at 64 MiB,
81.25% at 32; the same marks as a round of one batch from 128 MiB up), its
last batch taking at least a quarter of one: such a round ends up to that
much lower (81.25% at 64 MiB, 78.1% at 32).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from umgr.arrays import unique
from umgr.kernel import PAGE_SHIFT
from umgr.paging.tuning import (EVICT_BATCH, EVICT_BATCH_DIVISOR, EVICT_BATCH_MAX, HEADROOM_DIVISOR,
                                HIGH_WATER_DIVISOR, HIGH_WATER_MIN_PAGES, RUSHED_BATCH_DIVISOR, RUSHED_TAIL_SHARE,
                                WINDOW_DIVISOR)


# The smallest budget: below HIGH_WATER_MIN_PAGES' few pages the marks fall
# to zero or below, every page that comes in is evicted at once, and one
# instruction that needs two pages (a memcpy across a page end) could
# have them evict each other for ever.
MIN_BUDGET_BYTES = 256 << 10

# Memory a budget does not cover (small mappings umgr leaves alone, locked
# pages) worth a warning: half the budget, and at least this much (every
# program has a few small mappings of its own, the loader's, TLS, the
# shim's; some lock a few pages of keys or buffers).
UNCOVERED_WARNING_BYTES = 16 << 20


@dataclass(frozen=True)
class Budget:
    pages: int   # resident pages allowed; 0: no limit

    @property
    def limited(self) -> bool:
        return self.pages > 0

    def _share(self, divisor: int) -> int:
        """A share of the budget, within the batches' bounds."""
        return min(EVICT_BATCH_MAX, max(EVICT_BATCH, self.pages // divisor))

    @property
    def batch(self) -> int:
        """Pages per eviction batch."""
        return self._share(EVICT_BATCH_DIVISOR)

    @property
    def rushed_batch(self) -> int:
        """Pages per eviction batch of a round whose faults come fast
        (rushed()): an 8th of the budget, within the same bounds."""
        return self._share(RUSHED_BATCH_DIVISOR)

    @property
    def headroom(self) -> int:
        """Pages between the high mark and the budget: at most a 16th of it."""
        return max(min(self._share(HEADROOM_DIVISOR), self.pages // HIGH_WATER_DIVISOR), HIGH_WATER_MIN_PAGES)

    @property
    def high_water(self) -> int:
        """Eviction starts above this many resident pages."""
        return self.pages - self.headroom if self.pages else 0

    @property
    def low_water(self) -> int:
        """An eviction round goes down to this many resident pages."""
        return self._low_water(self.batch)

    @property
    def rushed_low_water(self) -> int:
        """A rushed round goes down to this many (a rushed batch lower)."""
        return self._low_water(self.rushed_batch)

    def _low_water(self, batch: int) -> int:
        if not self.pages:
            return 0
        return max(self.high_water - self._span(batch), 0)

    def _span(self, batch: int) -> int:
        """How far below the high mark a round of such batches goes."""
        return min(batch, self.pages // 2)

    def worth_a_warning(self, uncovered_bytes: int) -> bool:
        """Whether memory the budget does not cover makes it a promise umgr
        does not keep (UNCOVERED_WARNING_BYTES)."""
        return self.limited and uncovered_bytes >= max((self.pages << PAGE_SHIFT) // 2, UNCOVERED_WARNING_BYTES)

    def over(self, resident: int) -> bool:
        return self.limited and resident > self.high_water

    def rushed(self, resident: int) -> bool:
        """Faults used half the headroom before an eviction round began:
        they come faster than one batch at a time makes room, so the round
        keeps two batches in flight."""
        return self.limited and resident >= self.pages - self.headroom // 2

    def above_rushed_low(self, resident: int) -> bool:
        """A round with two batches in flight (a rushed one) takes out
        another while this holds (`resident` less the pages in flight)."""
        return self.limited and resident > self.rushed_low_water

    def full(self, resident: int) -> bool:
        """At the budget: a new page must wait for an eviction."""
        return self.limited and resident >= self.pages

    def evict_goal(self, resident: int, rushed: bool = False) -> int:
        """How many pages the next eviction batch wants (of a rushed round:
        rushed_batch). A rushed round's last batch takes at least
        RUSHED_TAIL_SHARE of the round's span (a rushed batch, at most
        half the budget), going that much below the mark at most: a
        batch's fixed cost (write-protect, read, write, move, settle:
        about 1.7 ms) was the same for the few pages that were left above
        it, and such batches were a third of all in random reads at 64
        MiB, and most of four targets' paging at once at 32."""
        batch = self.rushed_batch if rushed else self.batch
        goal = min(batch, resident - self._low_water(batch))
        if not rushed:
            return goal
        return min(max(goal, self._span(batch) // RUSHED_TAIL_SHARE), resident)

    def room(self, resident: int, otherwise: int) -> int:
        """Pages that may come in ahead of demand without crossing the high
        mark (`otherwise` when there is no limit)."""
        return self.high_water - resident if self.limited else otherwise

    def window(self, vpn: int, pages: np.ndarray) -> np.ndarray:
        """A prefetch window for a fault on vpn (sorted vpns) cut to the
        share of the budget one may take: the pages nearest vpn, sorted (a
        descending stream's window lies below it). At least two, so that
        a strided stream's window still says its step (the C fast path
        looks for the stream's next fault a step past its far end:
        FastPath.prefetching)."""
        most = self.window_pages()
        if not self.limited or len(pages) <= most:
            return pages
        return nearest_first([(vpn, pages)], most)

    def window_pages(self) -> int:
        """The most pages a prefetch window may be (window()); a large
        number without a limit."""
        return max(2, self.pages // WINDOW_DIVISOR) if self.limited else 1 << 30

    def prefetch_room(self, resident: int, most: int) -> int:
        """Pages that may come in (at most `most`: a prefetch, a fast-path
        call) without taking the target past its budget."""
        return min(most, self.pages - resident) if self.limited else most

    def prefetch_allowed(self, resident: int, filling: int) -> bool:
        """No prefetch at the budget: it would only be evicted again."""
        return not self.limited or resident + filling < self.pages


def nearest_first(windows: list[tuple[int, np.ndarray]], room: int) -> np.ndarray:
    """The pages of prefetch windows, (fault vpn, its window) each, to bring
    when only `room` may come: each window's nearest its fault, the nearest
    of every window before the next of any (a descending stream's window
    lies below its fault: its lowest pages are its farthest); sorted."""
    pages = [window for _, window in windows]
    if sum(len(window) for window in pages) <= room:
        return unique(np.concatenate(pages)) if pages else np.empty(0, np.int64)
    ranks = [np.argsort(np.argsort(np.abs(window - vpn), kind="stable"), kind="stable") for vpn, window in windows]
    order = np.argsort(np.concatenate(ranks), kind="stable")
    return unique(np.concatenate(pages)[order][:max(room, 0)])
