"""Replay a fault trace against a prefetch policy, offline.

The resident set is an LRU of ``resident_capacity`` pages; every access to a
page that is not resident is a fault, handed to the policy through the same
``GuardedPrefetch`` validation the daemon uses. Prefetched pages count as used
when accessed before they are evicted.
"""

from __future__ import annotations

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
