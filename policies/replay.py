"""Replay a fault trace against a prefetch policy, offline.

The resident set is an LRU of ``resident_capacity`` pages; every access to a
page that is not resident is a fault, handed to the policy through the same
``GuardedPrefetch`` validation the daemon uses. Prefetched pages count as used
when accessed before they are evicted.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import GuardedPrefetch, PrefetchPolicy


@dataclass
class ReplayResult:
    accesses: int
    faults: int
    prefetched: int      # pages brought in ahead of use
    prefetch_used: int   # of those, pages accessed before eviction

    @property
    def prefetch_accuracy(self) -> float:
        return self.prefetch_used / self.prefetched if self.prefetched else 0.0


def replay(
    policy: PrefetchPolicy | GuardedPrefetch,
    trace_vpns,
    resident_capacity: int,
    region: tuple[int, int] | None = None,
) -> ReplayResult:
    """Simulate ``trace_vpns`` (page accesses in order) in one mapping,
    ``region`` = [start, end) in vpns, by default the trace's span."""
    trace = np.asarray(trace_vpns, dtype=np.int64)
    if region is None:
        region = (int(trace.min()), int(trace.max()) + 1) if trace.size else (0, 0)
    guarded = policy if isinstance(policy, GuardedPrefetch) else GuardedPrefetch(policy, target="replay")
    resident: OrderedDict[int, None] = OrderedDict()
    unused: set[int] = set()  # prefetched, not accessed yet
    faults = prefetched = used = 0
    for vpn in trace.tolist():
        if vpn in resident:
            resident.move_to_end(vpn)
            if vpn in unused:
                unused.discard(vpn)
                used += 1
                guarded.on_prefetch_hit(vpn)
            continue
        faults += 1
        for page in guarded.on_fault(vpn, *region).tolist():
            if page not in resident:
                resident[page] = None
                unused.add(page)
                prefetched += 1
        resident[vpn] = None  # most recently used, after its prefetched pages
        while len(resident) > resident_capacity:
            unused.discard(resident.popitem(last=False)[0])
    return ReplayResult(len(trace), faults, prefetched, used)


@dataclass
class EvictionReplayResult:
    accesses: int
    faults: int
    refaults: int        # faults on pages evicted earlier
    evictions: int


def replay_eviction(policy, trace_vpns, resident_capacity: int, batch: int = 64) -> EvictionReplayResult:
    """Drive an eviction policy over ``trace_vpns`` (page accesses in order)
    the way the daemon does: a fault makes the page resident (after
    ``on_refault`` with its refault distance if it was evicted before);
    above ``resident_capacity`` pages, ``choose`` picks up to ``batch``
    victims, stale candidates are skipped, and ``on_removed`` reports those
    evicted. Like the daemon, the policy sees faults, never hits."""
    from . import GuardedEviction

    resident: set[int] = set()
    evicted_at: dict[int, int] = {}
    guarded = policy if isinstance(policy, GuardedEviction) else GuardedEviction(policy, target="replay")
    guarded.attach(lambda vpns: np.fromiter((int(v) in resident for v in vpns), bool, len(vpns)))
    faults = refaults = evictions = 0
    for vpn in np.asarray(trace_vpns, dtype=np.int64).tolist():
        if vpn in resident:
            continue
        faults += 1
        if vpn in evicted_at:
            refaults += 1
            guarded.on_refault(np.array([vpn]), np.array([evictions - evicted_at.pop(vpn)]))
        resident.add(vpn)
        guarded.on_resident(np.array([vpn]))
        if len(resident) > resident_capacity:
            victims = [v for v in guarded.choose(batch).tolist() if v in resident]
            for v in victims:
                resident.discard(v)
                evicted_at[v] = evictions
                evictions += 1
            guarded.on_removed(np.array(victims, dtype=np.int64))
    return EvictionReplayResult(len(np.asarray(trace_vpns)), faults, refaults, evictions)


@dataclass
class PagingReplayResult:
    accesses: int
    faults: int          # accesses to pages that were not resident
    from_swap: int       # of those, pages that had been evicted with content (major faults)
    prefetched: int      # pages brought in ahead of use
    prefetch_used: int   # of those, pages accessed before eviction
    pages_in: int        # pages read from swap (faults and prefetches)
    pages_out: int       # pages written to swap (evicted with content)
    evictions: int       # pages evicted (with content or not)

    @property
    def hit_rate(self) -> float:
        return 1 - self.faults / self.accesses if self.accesses else 0.0

    def __add__(self, other: PagingReplayResult) -> PagingReplayResult:
        return PagingReplayResult(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))


def replay_paging(prefetch, eviction, trace_vpns, resident_capacity: int, regions=None,
                  batch: int = 64, events=()) -> PagingReplayResult:
    """Drive a prefetch and an eviction policy together over ``trace_vpns``
    (page accesses in order), as the daemon does with one target: an access
    to a page that is not resident faults, the prefetch policy adds pages
    within the page's region (``regions``: sorted (first vpn, end vpn)
    pairs; a page in none gets no prefetch), all become resident together
    (a page evicted before comes back from swap, and the eviction policy
    hears its refault distance); above ``resident_capacity`` pages (0: no
    limit) the eviction policy chooses victims, ``batch`` at a time. A page
    has content once accessed: evicting one that was only prefetched, and
    never from swap, writes nothing and it reads as zero again.
    ``events``: what the app did to its memory (umgr.trace.TargetRun's:
    (accesses before it, GONE or MOVED, first vpn, end vpn, destination),
    in order): the pages of a range it discarded or unmapped leave and
    read as zero again; those of a range mremap moved go with their
    content (the eviction policy hears of both, as live)."""
    from . import GuardedEviction

    prefetch = prefetch if isinstance(prefetch, GuardedPrefetch) else GuardedPrefetch(prefetch, target="replay")
    eviction = eviction if isinstance(eviction, GuardedEviction) else GuardedEviction(eviction, target="replay")
    resident: set[int] = set()
    content: set[int] = set()          # accessed, or read back from swap
    swapped: dict[int, int] = {}       # vpn -> evictions before it went out
    unused: set[int] = set()           # prefetched, not accessed yet
    eviction.attach(lambda vpns: np.fromiter((int(v) in resident for v in vpns), bool, len(vpns)))
    starts = [r[0] for r in regions or ()]
    ends = [r[1] for r in regions or ()]
    n = PagingReplayResult(0, 0, 0, 0, 0, 0, 0, 0)
    pages = _Pages(resident, content, swapped, unused, eviction)
    events = list(events)
    next_event = 0
    for at, vpn in enumerate(np.asarray(trace_vpns, dtype=np.int64).tolist()):
        while next_event < len(events) and events[next_event][0] <= at:
            pages.apply(*events[next_event][1:])
            next_event += 1
        n.accesses += 1
        if vpn in resident:
            if vpn in unused:
                unused.discard(vpn)
                n.prefetch_used += 1
                prefetch.on_prefetch_hit(vpn)
            content.add(vpn)
            continue
        n.faults += 1
        i = bisect.bisect_right(starts, vpn) - 1
        bounds = (int(starts[i]), int(ends[i])) if i >= 0 and vpn < ends[i] else (vpn, vpn + 1)
        extra = [p for p in prefetch.on_fault(vpn, *bounds).tolist() if p not in resident]
        came = sorted([vpn, *extra])
        back = [p for p in came if p in swapped]
        if vpn in swapped:
            n.from_swap += 1
            eviction.on_refault(np.array([vpn]), np.array([n.evictions - swapped[vpn]]))
        for p in back:
            del swapped[p]
        n.pages_in += len(back)
        content.update(back)
        content.add(vpn)
        resident.update(came)
        unused.update(extra)
        n.prefetched += len(extra)
        eviction.on_resident(np.array(came, np.int64))
        if resident_capacity:
            _evict(eviction, resident, content, swapped, unused, resident_capacity, batch, n)
    return n


GONE, MOVED = 10, 12   # umgr.trace.Kind's


@dataclass
class _Pages:
    """A replay's page sets, for what the app does to its memory."""
    resident: set
    content: set
    swapped: dict
    unused: set
    eviction: object

    def apply(self, kind: int, lo: int, hi: int, dst: int) -> None:
        if kind == GONE:
            self._take(lo, hi)
        elif kind == MOVED:
            taken = self._take(lo, hi)
            self._take(dst, dst + hi - lo)   # (mremap replaced what was there)
            came = []
            for name, members in taken.items():
                moved = {vpn - lo + dst: members[vpn] for vpn in members} if name == "swapped" \
                    else {vpn - lo + dst for vpn in members}
                getattr(self, name).update(moved)
                if name == "resident":
                    came = sorted(moved)
            if came:
                self.eviction.on_resident(np.array(came, np.int64))

    def _take(self, lo: int, hi: int) -> dict:
        """The pages of [lo, hi), out of every set (the eviction policy
        hears of the resident ones leaving); by set name."""
        taken = {}
        for name in ("resident", "content", "swapped", "unused"):
            members = getattr(self, name)
            inside = [vpn for vpn in (range(lo, hi) if hi - lo < len(members) else list(members))
                      if lo <= vpn < hi and vpn in members]
            taken[name] = {vpn: members[vpn] for vpn in inside} if name == "swapped" else set(inside)
            for vpn in inside:
                if name == "swapped":
                    del members[vpn]
                else:
                    members.discard(vpn)
        if taken["resident"]:
            self.eviction.on_removed(np.array(sorted(taken["resident"]), np.int64))
        return taken


def _evict(eviction, resident, content, swapped, unused, capacity, batch, n) -> None:
    for _ in range(64):  # a policy that keeps offering stale pages gives up, as the daemon's evictor does
        if len(resident) <= capacity:
            return
        victims = [v for v in eviction.choose(batch).tolist() if v in resident]
        if not victims:
            return
        for v in victims:
            resident.discard(v)
            unused.discard(v)
            if v in content:
                content.discard(v)
                swapped[v] = n.evictions
                n.pages_out += 1
            n.evictions += 1
        eviction.on_removed(np.array(victims, dtype=np.int64))
