"""A target's counters: the one list that the target's stats, its status
snapshot, the daemon's totals, `--stats-json` and the Prometheus metrics are
all generated from. A counter added here shows up in each of them."""
from __future__ import annotations

import bisect

import numpy as np

# name -> help text (the metric is umgr_<name>_total)
COUNTERS: dict[str, str] = {
    "faults_missing": "MISSING userfaults (page not mapped)",
    "faults_wp": "Write-protect userfaults (a write to a protected page)",
    "faults_fresh": "MISSING faults on never-written pages, served with zeros",
    "faults_swapped": "MISSING faults on swapped-out pages, served from the backend",
    "faults_fast": "Faults served whole by the C fast path (umgr/paging/fastpath.py): MISSING, and WP on resident pages",
    "faults_background": "Part of them served while the daemon's thread settled the faults served before",
    "faults_joined": ("Part of them served in a joint round: beside other targets' faults, each target's "
                      "call in a thread of its own (umgr/paging/joint.py)"),
    "pages_in": "Pages brought back from the backend",
    "pages_out": "Pages evicted (written out or dropped as zero) and zapped",
    "copied_out": "Pages copied out of the target for eviction (a clean copy's page is not: its slot holds it)",
    "prefetched": "Pages brought in by the prefetch policy with a fault",
    "prefetched_fast": "Part of them brought in by the C fast path, after faults it served",
    "read_with_window": ("Faults continuing a prefetch stream whose page was read beside the window's pages "
                         "(its read in flight with theirs), to be copied in after them"),
    "near_refaults": ("Faults on swapped pages evicted no more evictions ago than there were resident pages "
                      "(they would have stayed under LRU)"),
    "clustered": "Part of those brought beside a lone fault: pages of its block that went out with it",
    "filled_ahead": "Part of those brought as zeros ahead of a first write going up (fresh pages, in C)",
    "prefetch_hits": "Prefetched pages seen used (their first write-protect fault)",
    "clean_kept": ("Pages read back that came in as clean copies (write-protected, their slot kept) as "
                   "--clean-copies decides; pages brought beside a lone fault, always kept, are not counted"),
    "clean_dirtied": "Of those, copies a write dropped (auto keeps copies while under half of the latest are)",
    "zero_pages_out": "Evicted pages that were all zero and took no slot",
    "zap_batches": "Eviction batches taken out of the target (moved out by the agent, zapped, or both)",
    "moved_out": "Pages moved out by the shim's agent (UFFDIO_MOVE): no UFFD_EVENT_REMOVE",
    "zap_ranges": "Ranges zapped with MADV_DONTNEED (one UFFD_EVENT_REMOVE each): what could not move out",
    "own_removes": "UFFD_EVENT_REMOVE events caused by umgr's own zaps",
    "app_removes": "MADV_DONTNEED/REMOVE events from the application",
    "unmaps": "munmap events",
    "remaps": "mremap events",
    "forks": "fork events",
    "busy_pinned": ("Pages the agent could not move out because they were busy (pinned for I/O): kept in memory "
                    "(never zapped) and tried again a second later"),
    "device_written": ("Pages a device wrote after their copy for eviction (I/O pinned before their write "
                       "protection, done before their move): kept with what it wrote, the copy dropped"),
    "eviction_cancelled": "Pages written while being evicted (the write won, the copy was dropped)",
    "zero_mapped": "Victims found on the kernel's zero page (kept, not counted resident)",
    "shared_skipped": "Victims found shared copy-on-write with another process (kept, not counted)",
    "locked_pinned": "Victims found mlocked (pinned while locked)",
    "backend_failures": "Backend I/O errors met by this target (its pages stayed where they were)",
    "hint_cold": "umgr_advise(COLD) hints received",
    "hint_willneed": "umgr_advise(WILLNEED) hints received",
    "hint_discardable": "umgr_advise(DISCARDABLE) hints received",
    "cold_evicted": "Pages evicted because of a COLD hint",
    "willneed_in": "Pages brought in because of a WILLNEED hint",
    "discarded": "DISCARDABLE pages dropped instead of written",
    # Where fault service time goes (seconds of the daemon's, per batch of
    # faults served together): a regression shows up in one of these.
    "fault_batch_seconds": "Time serving fault batches, from reading them to their last page copied in",
    "fault_wait_seconds": "Part of it spent waiting at the budget for the evictor",
    "fault_read_seconds": "Part of it spent reading pages (and their prefetch) from the backend",
    "fault_copy_seconds": "Part of it in UFFDIO_COPY/ZEROPAGE, waking the faulting threads included",
    "fault_gate_seconds": "Time the uffd went unread while the agent moved pages out (a fault then waits)",
    "fault_loop_sleeps": "Times the fault loop slept with nothing to serve: the next fault pays a wake-up",
    "evict_cpu_seconds": ("CPU time the daemon spent evicting (its tasks' steps and worker threads; "
                          "the agent's moves are the program's)"),
}

# Fault service time, from reading a batch of faults to serving it (seconds).
LATENCY_BUCKETS = (5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 5e-3, 20e-3, 100e-3)
LATENCY_BUCKETS_NS = tuple(round(bound * 1e9) for bound in LATENCY_BUCKETS)


class TargetStats:
    """Plain number attributes, one per COUNTERS entry, bumped on the fault
    path (no call into a metrics library there); plus the peak resident page
    count and a bucketed fault-latency histogram."""

    def __init__(self):
        for name in COUNTERS:
            setattr(self, name, 0)
        self.peak_resident = 0
        self.largest_batch = 0   # the most pages one eviction batch took out
        self.fault_latency = np.zeros(len(LATENCY_BUCKETS) + 1, np.int64)
        self.fault_latency_sum = 0.0

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}

    def record_latency(self, seconds: float, faults: int) -> None:
        self.fault_latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += faults
        self.fault_latency_sum += seconds * faults

