"""What the daemon reports: a target's snapshot, the daemon's status and
the run's totals, all generated from the one counter list in
umgr.paging.stats (metrics.py reads the same list)."""
from __future__ import annotations

import time

from umgr.paging.pagetable import PAGE_SIZE, State
from umgr.paging.stats import COUNTERS

# Summed over targets (gone ones included) for `--stats-json`.
SUMMED = ("faults", *COUNTERS)

# Page states with no memory of the target's own, or that cannot be evicted.
STATE_BYTES = {
    "zero_mapped_bytes": ("Managed bytes on the kernel's shared zero page", State.ZERO),
    "shared_bytes": ("Managed bytes shared copy-on-write with another process", State.SHARED),
    "pinned_bytes": ("Managed bytes that cannot be evicted now (mlocked, unreadable)", State.PINNED),
}


def snapshot(target) -> dict:
    """One target's figures, as `umgr status --json` shows them."""
    stats, pt = target.stats, target.pt
    return {
        "pid": target.pid,
        "command": target.command,
        "name": target.name,
        "budget_bytes": target.budget_pages * PAGE_SIZE,
        "resident_bytes": pt.resident * PAGE_SIZE,
        "swapped_bytes": pt.swapped * PAGE_SIZE,
        "managed_bytes": pt.managed * PAGE_SIZE,
        "peak_resident_bytes": stats.peak_resident * PAGE_SIZE,
        "largest_batch_pages": stats.largest_batch,
        **{name: pt.count(state) * PAGE_SIZE for name, (_, state) in STATE_BYTES.items()},
        "faults": stats.faults_missing + stats.faults_wp,
        **stats.counters(),
        "eviction_paused": target.eviction_paused,
        "uptime_seconds": time.monotonic() - target.started,
    }


class Totals:
    """Figures summed over targets, kept when targets are gone."""

    def __init__(self, counters: dict | None = None):
        self.counters = dict(counters or {})

    def add(self, snap: dict) -> None:
        for key in SUMMED:
            self.counters[key] = self.counters.get(key, 0) + snap[key]
        for key in ("peak_resident_bytes", "largest_batch_pages"):   # the largest of any target
            self.counters[key] = max(self.counters.get(key, 0), snap[key])
