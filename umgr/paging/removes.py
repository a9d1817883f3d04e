"""Telling umgr's own UFFD_EVENT_REMOVEs from the application's.

A REMOVE event does not say who discarded the range. A zap (one vectored
MADV_DONTNEED of sorted runs) covers each of its pages exactly once, and the
zapping thread waits in the kernel until the event of each range is read,
so every event of a zap has been counted when the zap returns. Counting
REMOVEs per page of the zap in flight therefore tells the cases apart:
- an event inside the zap covering its pages for the first time is ours;
- a page covered twice was discarded by the app too (it must read zero,
  not come back from its swap copy);
- an event that repeats the tail [vma end, end) of an earlier one is the
  kernel's, not a discard: madvise repeats it after a VMA split while it had
  dropped mmap_lock (mm/madvise.c, userfaultfd_remove()).
"""
from __future__ import annotations

from bisect import bisect_left

import numpy as np


class RemoveAttribution:
    # Plain lists, not numpy: count() runs once per REMOVE event, on the
    # fault loop's thread, and most events of a zap name one or a few pages.
    def __init__(self):
        self._vpns: np.ndarray | None = None   # the zap in flight, sorted
        self._sorted: list[int] = []            # the same vpns, for bisect
        self._hits = bytearray()                # REMOVEs that covered each page (at most 2 counted)
        self._lowest_lo: dict[int, int] = {}     # hi -> lowest lo of the events seen ending there

    @property
    def active(self) -> bool:
        return self._vpns is not None

    def begin(self, vpns: np.ndarray, own_events: bool = True) -> None:
        """A zap of these sorted vpns is about to be issued. Without
        `own_events` it raises none (the agent moves the pages out): every
        REMOVE over them is the app's, as if each page were covered once already."""
        self._vpns, self._sorted = vpns, vpns.tolist()
        self._hits = bytearray(len(vpns)) if own_events else bytearray(b"\x01" * len(vpns))
        self._lowest_lo = {}

    def count(self, lo: int, hi: int) -> bool:
        """A REMOVE of vpns [lo, hi): True when it can only be the zap's."""
        if self._vpns is None:
            return False
        # A dict, not a scan of the events: a zap of scattered pages has
        # hundreds of ranges, and a scan per event made each zap quadratic.
        seen_lo = self._lowest_lo.get(hi)
        if seen_lo is not None and seen_lo < lo:
            return True
        self._lowest_lo[hi] = lo if seen_lo is None else min(lo, seen_lo)
        a = bisect_left(self._sorted, lo)
        b = bisect_left(self._sorted, hi, a)
        hits = self._hits[a:b]
        first_time = not any(hits)
        self._hits[a:b] = bytes(min(h + 1, 2) for h in hits)
        return first_time and b - a == hi - lo

    def count_many(self, lo: list[int], hi: list[int]) -> list[bool]:
        """count() of each REMOVE [lo[i], hi[i]), in order. A zap's events,
        read in batches, are disjoint ranges covering its pages for the
        first time: those are told apart with a few array operations
        (a zap of scattered pages raises hundreds); any other batch is
        counted one event at a time."""
        if self._vpns is None or not lo:
            return [False] * len(lo)
        if not self._disjoint_and_new(lo, hi):
            return [self.count(a, b) for a, b in zip(lo, hi)]
        los, his = np.array(lo, np.int64), np.array(hi, np.int64)
        first = np.searchsorted(self._vpns, los)
        last = np.searchsorted(self._vpns, his)
        hits = np.frombuffer(self._hits, np.uint8)   # a view: written through
        seen = np.concatenate(([0], np.cumsum(hits > 0)))
        first_time = seen[last] == seen[first]
        cover = np.zeros(len(hits) + 1, np.int64)    # +1 at each event's first page, -1 past its last
        np.add.at(cover, first, 1)
        np.add.at(cover, last, -1)
        hits[:] = np.minimum(hits + np.cumsum(cover[:-1]), 2)
        self._lowest_lo.update(zip(hi, lo))
        return (first_time & (last - first == his - los)).tolist()

    def _disjoint_and_new(self, lo: list[int], hi: list[int]) -> bool:
        """No two of these ranges overlap, and none ends where an earlier
        event did (count()'s one rule that looks back at other events)."""
        if any(end in self._lowest_lo for end in hi) or len(set(hi)) < len(hi):
            return False
        order = sorted(range(len(lo)), key=lo.__getitem__)
        return all(hi[a] <= lo[b] for a, b in zip(order, order[1:]))

    def end(self) -> np.ndarray:
        """The zap has returned: the pages the app discarded as well."""
        vpns, hits = self._vpns, np.frombuffer(bytes(self._hits), np.uint8)
        self._vpns = None
        if vpns is None:
            return np.empty(0, np.int64)
        return vpns[hits >= 2]
