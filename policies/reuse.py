"""Reuse-aware eviction, umgr's default: hot and cold FIFO queues, split adaptively.

Two FIFO queues as in 2Q, refault distances, and a split between the queues
that adapts as in ARC.

umgr cannot see accesses to mapped pages (no access bits reach a process),
but it sees refaults: a page that faults back in from swap, and how many
pages the target evicted since that page went out (its refault distance,
computed by the daemon). A page that comes back after fewer evictions than
there are resident pages (a near refault) would have stayed resident under
LRU with this budget: it is in use, and evicting it was a mistake. It goes to
the hot queue if its distance fits in the hot queue's share of the pages;
everything else goes to the cold queue.

Victims come from the cold queue while it holds more than its share, else
from the hot queue (and from the other queue when one runs out), so a scan
or random traffic cycles through the cold queue and leaves a hot set alone.
The share adapts to where the mistakes come from:
- a near refault of a page evicted from the hot queue (remembered in a small
  table of such "ghosts", indexed by the vpn's low bits; a collision forgets
  one): the hot set did not fit, and the cold share shrinks by a page;
- a near refault of a page evicted from the cold queue: the pages in use did
  not fit in it, and its share grows by a page. Unless the page fits in the
  hot share while the hot queue holds less than half of it: it is promoted,
  and that is how a hot set is found.
Between mistakes the share drifts back to where it started (its distance
from there falls to 1/e for each 64 budgets' worth of pages evicted), so a
phase that pushed it to one end does not keep it there.

The share starts (and drifts back) at a cold queue of a tenth of the pages:
more refaults fit in the hot share and are promoted. On the CPython
benchmark workload (bench_shapes.py, scale 0.1 under 32 MiB) that read back
6-20% fewer pages than a start of a quarter and took a median 0.87-0.94
of the time (three runs of paired rounds); the shapes benchmark's fault
counts did not change.

When the pages in use fill the whole budget (threads each rewriting their
own group of pages, a loop over a little more data than fits) mistakes come
from the cold queue, its share grows, promotions stop, and the policy is
FIFO. With a hot set smaller than the budget they come from the hot queue,
whose share grows up to ``1 - min_cold_share``.

Both queues are lazy FIFOs (see fifo.py): 8 bytes per resident page each;
the ghost table takes 16 to 32 bytes per hot page (a power of two, at least
twice the hot queue's length).
"""

from __future__ import annotations

import numpy as np

from . import EvictionPolicy
from .fifo import FifoEviction, IsLive

_NONE: frozenset[int] = frozenset()
_NO_GHOST = -1
_GHOSTS_MIN = 1024
# Budgets' worth of evictions over which the share's distance from its start falls to 1/e.
_DRIFT_BUDGETS = 64
# The hot queue's fill, as a part of its share, below which a near refault
# from the cold queue that fits in the hot share does not grow the cold share.
_HOT_FILLING = 0.5


class ReuseEviction(EvictionPolicy):
    name = "reuse"

    def __init__(self, hot_share: float = 0.9, capacity: int = 1024, adapt: bool = True,
                 min_cold_share: float = 0.0625):
        """``hot_share``: the hot queue's share to start from (and to keep,
        with ``adapt`` false); the cold queue's share never goes below
        ``min_cold_share``, so pages just brought in have some time."""
        if not 0.0 < hot_share < 1.0:
            raise ValueError(f"need 0 < hot_share < 1, got {hot_share}")
        if not 0.0 < min_cold_share <= 1.0 - hot_share:
            raise ValueError(f"need 0 < min_cold_share <= 1 - hot_share, got {min_cold_share}")
        self.start_cold_share = self.cold_share = 1.0 - hot_share
        self.min_cold_share = min_cold_share
        self.adapt = adapt
        self._cold = FifoEviction(capacity)
        self._hot = FifoEviction(capacity)
        self._ghosts = np.full(_GHOSTS_MIN, _NO_GHOST, np.int64)   # vpns evicted from the hot queue
        # Refaulted pages about to become resident, hot. A set of ints, not
        # np.isin: a fault brings one page back, and np.isin costs ~40 us on
        # arrays this small (it sorts), more than the fault's own bookkeeping.
        self._promote = _NONE

    def attach(self, is_live: IsLive) -> None:
        self._cold.attach(is_live)
        self._hot.attach(is_live)

    def on_refault(self, vpns: np.ndarray, distances: np.ndarray) -> None:
        # On lists of ints: a fault brings back a few pages, and numpy's
        # per-call cost (~3 us) over a dozen calls was most of this hook.
        vpns = np.asarray(vpns, np.int64).tolist()
        distances = np.asarray(distances, np.int64).tolist()
        resident = max(len(self), 1)
        hot_room = (1.0 - self.cold_share) * resident
        fits_hot = [distance <= hot_room for distance in distances]
        if self.adapt:
            self._learn([(vpn, fits) for vpn, fits, distance in zip(vpns, fits_hot, distances)
                         if distance <= resident], resident)
        hot = [vpn for vpn, fits in zip(vpns, fits_hot) if fits]
        self._promote = frozenset(hot) if hot else _NONE

    def _learn(self, near: list[tuple[int, bool]], resident: int) -> None:
        """Near refaults (vpn, whether it fits in the hot share) move the
        split toward the queue they left from. A page from the cold queue
        that fits in the hot queue's share is promoted, which mends that
        mistake: it counts against the cold queue only once the hot queue
        holds half its share (while it fills, such refaults are how a hot
        set is found). One that does not fit counts."""
        if not near:
            return
        ghosts = self._ghosts
        mask = len(ghosts) - 1
        hot_filling = len(self._hot) < _HOT_FILLING * (1.0 - self.cold_share) * resident
        hot_mistakes = cold_mistakes = 0
        for vpn, fits_hot in near:
            if ghosts[vpn & mask] == vpn:
                ghosts[vpn & mask] = _NO_GHOST
                hot_mistakes += 1
            elif not (hot_filling and fits_hot):
                cold_mistakes += 1
        share = self.cold_share + (cold_mistakes - hot_mistakes) / resident
        self.cold_share = min(max(share, self.min_cold_share), 1.0)

    def on_resident(self, vpns: np.ndarray) -> None:
        vpns = np.asarray(vpns, dtype=np.int64).ravel()
        promote, self._promote = self._promote, _NONE
        if not promote:
            self._cold.on_resident(vpns)
        elif len(vpns) == 1:
            (self._hot if int(vpns[0]) in promote else self._cold).on_resident(vpns)
        else:
            listed = vpns.tolist()
            self._hot.on_resident(np.array([vpn for vpn in listed if vpn in promote], np.int64))
            self._cold.on_resident(np.array([vpn for vpn in listed if vpn not in promote], np.int64))

    def choose(self, n: int) -> np.ndarray:
        n = max(int(n), 0)
        if self.adapt:
            self._drift(n)
        # The cold queue's pages over its share, then the hot queue's, then
        # the cold queue's again if the hot one ran out.
        surplus = len(self._cold) - int(self.cold_share * len(self))
        over_share = self._cold.choose(min(n, max(surplus, 0)))
        from_hot = self._leave_hot(n - len(over_share))
        rest = self._cold.choose(n - len(over_share) - len(from_hot))
        return np.concatenate((over_share, rest, from_hot))

    def _drift(self, evicting: int) -> None:
        """The share moves back toward its start as pages are evicted."""
        step = min(1.0, evicting / (_DRIFT_BUDGETS * max(len(self), 1)))
        self.cold_share += (self.start_cold_share - self.cold_share) * step

    def _leave_hot(self, n: int) -> np.ndarray:
        """Up to n of the hot queue's oldest, remembered as its ghosts."""
        picked = self._hot.choose(n)
        if len(picked):
            if 2 * len(self._hot) > len(self._ghosts):
                self._grow_ghosts()
            self._ghosts[picked & (len(self._ghosts) - 1)] = picked
        return picked

    def _grow_ghosts(self) -> None:
        size = len(self._ghosts)
        while size < 2 * len(self._hot):
            size *= 2
        kept = self._ghosts[self._ghosts != _NO_GHOST]
        self._ghosts = np.full(size, _NO_GHOST, np.int64)
        self._ghosts[kept & (size - 1)] = kept

    def __len__(self) -> int:
        return len(self._cold) + len(self._hot)

    @property
    def hot_pages(self) -> int:
        """Entries in the hot queue (stale ones included)."""
        return len(self._hot)
