"""FIFO eviction by fault order.

The queue is a growable ring buffer of int64 vpns: 8 bytes per entry and no
Python object per page (a 16 GiB target has four million pages). It is lazy:
``on_removed`` is a no-op and stale entries (pages evicted or unmapped since)
are filtered by the caller, or dropped in bulk by ``compact``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import EvictionPolicy

IsLive = Callable[[np.ndarray], np.ndarray]

# Up to this many pages are queued one by one: numpy's slicing costs ~3 us a
# call, an item assignment ~0.1 us.
_FEW = 16


class FifoEviction(EvictionPolicy):
    name = "fifo"

    def __init__(self, capacity: int = 1024, is_live: IsLive | None = None):
        """With ``is_live`` given, the queue is compacted before it grows, so
        stale entries do not make it grow without bound."""
        self._buf = np.empty(max(int(capacity), 1), dtype=np.int64)
        self._head = 0
        self._count = 0
        self._is_live = is_live

    def attach(self, is_live: IsLive) -> None:
        """The daemon's liveness test: compact with it before growing."""
        self._is_live = is_live

    def __len__(self) -> int:
        return self._count

    @property
    def capacity(self) -> int:
        return len(self._buf)

    def _ordered(self) -> np.ndarray:
        """The entries, oldest first (a copy when they wrap around)."""
        end = self._head + self._count
        if end <= len(self._buf):
            return self._buf[self._head:end]
        return np.concatenate((self._buf[self._head:], self._buf[: end - len(self._buf)]))

    def _reset(self, entries: np.ndarray, capacity: int) -> None:
        buf = np.empty(max(capacity, 1), dtype=np.int64)
        buf[: len(entries)] = entries
        self._buf, self._head, self._count = buf, 0, len(entries)

    def on_resident(self, vpns: np.ndarray) -> None:
        vpns = np.asarray(vpns, dtype=np.int64).ravel()
        need = self._count + len(vpns)
        if len(vpns) <= _FEW and need <= len(self._buf):   # a few pages (faults): no slicing
            buf, cap, at = self._buf, len(self._buf), self._head + self._count
            for vpn in vpns.tolist():
                buf[at % cap] = vpn
                at += 1
            self._count = need
            return
        if need > len(self._buf) and self._is_live is not None:
            self.compact(self._is_live)
            need = self._count + len(vpns)
            # Grow anyway if compaction freed little, or it would run per insert.
            if 4 * need > 3 * len(self._buf):
                self._reset(self._ordered(), max(2 * len(self._buf), need))
        if need > len(self._buf):
            self._reset(self._ordered(), max(2 * len(self._buf), need))
        # Write in at most two slices: up to the end of the buffer, then from 0.
        cap = len(self._buf)
        tail = (self._head + self._count) % cap
        first = min(len(vpns), cap - tail)
        self._buf[tail:tail + first] = vpns[:first]
        self._buf[: len(vpns) - first] = vpns[first:]
        self._count = need

    def choose(self, n: int) -> np.ndarray:
        n = min(max(int(n), 0), self._count)
        cap = len(self._buf)
        first = min(n, cap - self._head)
        out = np.concatenate((self._buf[self._head:self._head + first], self._buf[: n - first]))
        self._head = (self._head + n) % cap
        self._count -= n
        return out

    def compact(self, is_live: IsLive | None = None) -> int:
        """Drop stale entries, keeping order: all but the newest entry of a
        vpn (a page that left without ``choose``, e.g. unmapped, and faulted
        back), and, if given, those for which the vectorised ``is_live(vpns) ->
        bool array`` is false. Shrinks the buffer if it is mostly empty.
        Returns the number of entries dropped."""
        entries = self._ordered()
        _, from_end = np.unique(entries[::-1], return_index=True)
        kept = entries[np.sort(len(entries) - 1 - from_end)]
        if is_live is not None:
            kept = kept[np.asarray(is_live(kept), dtype=bool)]
        capacity = len(self._buf)
        if 4 * len(kept) < capacity:
            capacity = max(2 * len(kept), 1024)
        self._reset(kept, capacity)
        return len(entries) - len(kept)
