"""Reuse-aware eviction: two FIFO queues and refault distances (2Q-like).

umgr cannot see accesses to mapped pages (no access bits reach a process),
but it sees refaults: a page that faults back in from swap, and how many
pages the target evicted since that page went out (its refault distance,
computed by the daemon). A page that comes back after fewer evictions than
there are resident pages would have stayed resident under LRU with this
budget: it is part of a working set that FIFO keeps throwing out. Such pages
go to the hot queue; everything else to the cold queue.

As in 2Q, the cold queue keeps at least ``1 - hot_share`` of the tracked
pages, so pages just brought in (a stream's prefetched pages among them)
have time to be used; above that share victims come from the cold queue,
so a stream or a scan cycles through it and leaves the hot queue alone.
Below it the hot queue gives up its oldest pages. A hot page evicted that
way comes back hot if it is still used.
Both queues are lazy FIFOs (see fifo.py): 8 bytes per resident page each.
"""

from __future__ import annotations

import numpy as np

from . import EvictionPolicy
from .fifo import FifoEviction, IsLive

_NONE: frozenset[int] = frozenset()


class ReuseEviction(EvictionPolicy):
    name = "reuse"

    def __init__(self, hot_share: float = 0.75, capacity: int = 1024):
        if not 0.0 < hot_share < 1.0:
            raise ValueError(f"need 0 < hot_share < 1, got {hot_share}")
        self.hot_share = hot_share
        self._cold = FifoEviction(capacity)
        self._hot = FifoEviction(capacity)
        # Refaulted pages about to become resident, hot. A set of ints, not
        # np.isin: a fault brings one page back, and np.isin costs ~40 us on
        # arrays this small (it sorts), more than the fault's own bookkeeping.
        self._promote = _NONE

    def attach(self, is_live: IsLive) -> None:
        self._cold.attach(is_live)
        self._hot.attach(is_live)

    def on_refault(self, vpns: np.ndarray, distances: np.ndarray) -> None:
        resident = max(len(self), 1)
        self._promote = frozenset(int(v) for v, d in zip(vpns.tolist(), distances.tolist()) if d <= resident)

    def on_resident(self, vpns: np.ndarray) -> None:
        vpns = np.asarray(vpns, dtype=np.int64).ravel()
        promote, self._promote = self._promote, _NONE
        if not promote:
            self._cold.on_resident(vpns)
        elif len(vpns) == 1:
            (self._hot if int(vpns[0]) in promote else self._cold).on_resident(vpns)
        else:
            hot = np.fromiter((v in promote for v in vpns.tolist()), bool, len(vpns))
            self._hot.on_resident(vpns[hot])
            self._cold.on_resident(vpns[~hot])

    def choose(self, n: int) -> np.ndarray:
        n = max(int(n), 0)
        surplus = len(self._cold) - int((1.0 - self.hot_share) * len(self))
        first, second = (self._cold, self._hot) if surplus > 0 else (self._hot, self._cold)
        picked = first.choose(min(n, surplus) if surplus > 0 else n)
        if len(picked) < n:
            picked = np.concatenate((picked, second.choose(n - len(picked))))
        return picked

    def __len__(self) -> int:
        return len(self._cold) + len(self._hot)

    @property
    def hot_pages(self) -> int:
        """Entries in the hot queue (stale ones included)."""
        return len(self._hot)
