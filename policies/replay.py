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
