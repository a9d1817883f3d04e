"""The fault path's common case, served in C and settled here in batches.

A random fault on a swapped page (or the first touch of a fresh one) needs
a table lookup, a one-page read and one UFFDIO_COPY. The full path
(faults.py) spent about 150 us of interpreter time per fault around those,
and the next fault was already waiting when it was done. The C call
(Userfaultfd.serve_plain_faults, bindings/cffi/_cdef_fastfault.py) serves
such faults back to back, marks them resident in the table, and logs them;
settle() then tells the counters, the store and the policies in one batch.

The C call is made only where its answer is the full path's:
- in the regions of the latest faults the full path served (up to
  REGIONS of them: a heap is several mappings), their arrays checked
  unchanged (PageTable.layout; a persistent table moves a region's arrays
  to a file);
- below the budget, for at most the pages left under it (at the budget a
  new page waits for the evictor: the full path);
- no fault recording (the trace wants every fault in order);
- not while the prefetch policy follows a stream. The policy hears of
  every page served here, after the fact, and the call ends early when a
  page lies near one served lately (NEAR_PAGES). Once the policy asks for
  pages, they come in at once, and faults take the full path, whose reads
  bring the asked-for pages with the faulting one, until QUIET_FAULTS
  faults in a row got no pages from it;
- swapped pages only while the store can be read with a plain pread
  (Backend.sync_read_fd); fresh pages always.
Everything else the call reads (events, write-protect faults, other
states, failed reads or copies) it hands back, still in the message buffer.
"""
from __future__ import annotations

import numpy as np

from umgr.kernel import uffd as uffdmod
from umgr.kernel.buffers import PageBuffer
from umgr.paging.core import TargetCore
from umgr.paging.pagetable import NO_SLOT, State
from umgr.trace import NO_TRACE

assert uffdmod.fast_state_values() == (State.FRESH, State.RESIDENT, State.SWAPPED)

IDLE, HANDOFF, YIELD = uffdmod.FAST_IDLE, uffdmod.FAST_HANDOFF, uffdmod.FAST_YIELD

LOG_PAGES = 64          # pages one call may serve before they are settled
SLICE_SECONDS = 1e-3    # and how long it may run: the evictor and other targets wait meanwhile
NEAR_PAGES = 64         # a page this close to one served lately ends the call (a stream may start)
QUIET_FAULTS = 16       # faults in a row the prefetch policy wanted nothing for: back to the fast path
REGIONS = 8             # regions a call serves in, the most recently faulted


class FastPath:
    def __init__(self, core: TargetCore, spin: float, enabled: bool = True):
        self.core = core
        self.enabled = enabled
        self.spin_ns = int(spin * 1e9)
        self._pages = PageBuffer(uffdmod.FAST_GROUP)   # reads land here (O_DIRECT: page aligned)
        self._zeros = PageBuffer(1)
        self._regions = uffdmod.new_fast_struct("umgr_fast_region", REGIONS)
        self._log = uffdmod.new_fast_struct("umgr_fast_log")
        self._vpns = np.zeros(LOG_PAGES, np.uint64)
        self._slots = np.zeros(LOG_PAGES, np.int32)
        self._kept = np.zeros(LOG_PAGES, np.uint8)
        self._read_ns = np.zeros(LOG_PAGES, np.int64)
        self._serve_ns = np.zeros(LOG_PAGES, np.int64)
        log = self._log
        log.max = LOG_PAGES
        log.vpn = uffdmod.array_pointer("uint64_t *", self._vpns)
        log.slot = uffdmod.array_pointer("int32_t *", self._slots)
        log.kept = uffdmod.array_pointer("uint8_t *", self._kept)
        log.read_ns = uffdmod.array_pointer("int64_t *", self._read_ns)
        log.serve_ns = uffdmod.array_pointer("int64_t *", self._serve_ns)
        log.aio = uffdmod.fast_aio_context()
        self._table = (None, -1)                  # the table and layout the aimed regions are of
        self._aimed: list[tuple] = []             # (region, state, slot, their C pointers) the call serves in, latest first
        self._quiet = QUIET_FAULTS                # faults in a row the prefetch policy asked nothing for

    def aim(self, vpn: int) -> None:
        """Serve faults in the region of `vpn` (the latest fault's) too from now on."""
        pt = self.core.pt
        region = pt.find(vpn)
        if region is None:
            return
        if self._still_aimed() and any(entry[0] is region for entry in self._aimed):
            return
        if not self._same_layout():
            self._aimed = []    # a region was cut, moved or dropped: start over
        current = [entry for entry in self._aimed
                   if entry[0] is not region and entry[0].state is entry[1] and entry[0].slot is entry[2]]
        pointers = (uffdmod.array_pointer("uint8_t *", region.state), uffdmod.array_pointer("int32_t *", region.slot))
        self._aimed = [(region, region.state, region.slot, pointers)] + current[:REGIONS - 1]
        self._table = (pt, pt.layout)
        counts = uffdmod.array_pointer("int64_t *", pt.counts)
        for c, (region, _, _, (state, slot)) in zip(self._regions, self._aimed):
            c.vpn, c.end, c.state, c.slot, c.counts = region.vpn, region.end, state, slot, counts

    def _same_layout(self) -> bool:
        pt = self.core.pt
        return self._table[0] is pt and self._table[1] == pt.layout

    def _still_aimed(self) -> bool:
        """Whether the C array still describes the table: no region was
        cut, moved or dropped, none was given new arrays."""
        return self._same_layout() and all(region.state is state and region.slot is slot
                                           for region, state, slot, _ in self._aimed)

    def ready(self) -> bool:
        """Whether the next faults may be tried here."""
        core = self.core
        if not self._aimed or self.streaming or not self.enabled or core.trace is not NO_TRACE:
            return False
        if not self._still_aimed():
            self._aimed = []
            return False
        return self._room() > 0

    @property
    def streaming(self) -> bool:
        """Whether the prefetch policy is following a stream."""
        return self._quiet < QUIET_FAULTS

    def policy_answered(self, asked_for_pages: bool) -> None:
        """The prefetch policy answered a fault (on either path)."""
        self._quiet = 0 if asked_for_pages else self._quiet + 1

    def _room(self) -> int:
        """Pages the next call may bring in: up to the budget, at most a log's worth."""
        core = self.core
        if not core.budget.limited:
            return LOG_PAGES
        return min(LOG_PAGES, core.budget.pages - core.pt.resident)

    def serve(self) -> int:
        """Serve plain faults (waiting up to the spin time for each);
        returns IDLE, HANDOFF (the first `handoff` messages of uffd.batch
        are the full path's) or YIELD. Call settle() after it either way."""
        core = self.core
        self._log.keep_period = core.clean.keep_period()
        return core.uffd.serve_plain_faults(
            self._regions, len(self._aimed), core.backend.sync_read_fd(), self._pages.addr, self._zeros.addr,
            self.spin_ns, int(SLICE_SECONDS * 1e9), self._room(), NEAR_PAGES, self._log)

    def settle(self) -> np.ndarray:
        """The counters, the store and the eviction policy learn of the
        pages the last call served (the table has them already). Returns
        their vpns, in fault order."""
        n = self._log.served
        if not n:
            return np.empty(0, np.int64)
        core, stats = self.core, self.core.stats
        vpns = self._vpns[:n].astype(np.int64)
        slots, kept = self._slots[:n].copy(), self._kept[:n].astype(bool)
        read = self._read_ns[:n] * 1e-9
        served = self._serve_ns[:n] * 1e-9
        swapped = slots != NO_SLOT
        nswapped = int(swapped.sum())
        stats.faults_missing += n
        stats.faults_fast += n
        stats.faults_swapped += nswapped
        stats.faults_fresh += n - nswapped
        stats.pages_in += nswapped
        if nswapped:
            core.backend.reads_done_elsewhere(read[swapped])
            core.clean.came_in_clean(int(kept.sum()))
            core.slots.free(slots[swapped & ~kept])
            core.refaulted(vpns[swapped], slots[swapped])
        core.became_resident(vpns)
        stats.fault_read_seconds += float(read.sum())
        stats.fault_copy_seconds += float((served - read).sum())
        stats.fault_batch_seconds += float(served.sum())
        stats.record_latencies(served)
        core.note_resident()
        return vpns

    @property
    def handoff(self) -> int:
        return self._log.handoff

    def close(self) -> None:
        self._pages.close()
        self._zeros.close()
