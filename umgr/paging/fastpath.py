"""The fault path's common case, served in C and settled here in batches.

A random fault on a swapped page (or the first touch of a fresh one) needs
a table lookup, a one-page read and one UFFDIO_COPY. The full path
(faults.py) spent about 150 us of interpreter time per fault around those,
and the next fault was already waiting when it was done. The C call
(Userfaultfd.serve_plain_faults, bindings/cffi/_cdef_fastfault.py) serves
such faults back to back, marks them resident in the table, and logs them;
settle() then tells the counters, the store and the policies in one batch.

The C call is made only where its answer is the full path's:
- over the whole table: every region, sorted, pointed at anew whenever
  PageTable.layout changes (a region added, cut, moved or dropped, or given
  new arrays: a persistent table moves them to a file). An interpreter's
  heap is many mappings (CPython's are 1 MiB arenas, each a region);
- below the budget, for at most the pages left under it (at the budget a
  new page waits for the evictor: the full path);
- no fault recording (the trace wants every fault in order);
- not near a stream the prefetch policy follows. The policy hears of
  every page served here, after the fact, and the call ends early when a
  page lies near one served lately (NEAR_PAGES), so that it may see a
  stream start. The pages it asks for come in at once, and a fault at
  most STREAM_REACH pages past the far end of one of the latest 8 such windows
  (the way its stream goes) goes to the full path, whose read brings the
  next window with the faulting page. Other faults, such as an interpreter's random ones between its
  scans, stay here;
- swapped pages only while the store can be read with a plain pread
  (Backend.sync_read_fd); fresh pages always.
The call also takes the REMOVE events of the zap in flight that name only
its pages, each for the first time (removes.py tells the full path's
events apart the same way): an eviction batch of scattered pages raises
one per page, and each used to send the faults queued behind it to the
full path. Everything else the call reads (other events, write-protect
faults, other states, failed reads or copies) it hands back, still in the
message buffer.
"""
from __future__ import annotations

import numpy as np

from umgr.kernel import uffd as uffdmod
from umgr.kernel.buffers import PageBuffer
from umgr.paging.core import TargetCore
from umgr.paging.pagetable import NO_SLOT, State
from umgr.paging.removes import RemoveAttribution
from umgr.trace import NO_TRACE

assert uffdmod.fast_state_values() == (State.FRESH, State.RESIDENT, State.SWAPPED)

IDLE, HANDOFF, YIELD = uffdmod.FAST_IDLE, uffdmod.FAST_HANDOFF, uffdmod.FAST_YIELD

LOG_PAGES = 64          # pages one call may serve before they are settled
SLICE_SECONDS = 1e-3    # and how long it may run: the evictor and other targets wait meanwhile
# A page this close to one served lately ends the call, so that the prefetch
# policy sees a sequential stream start at once. Wider (64, the widest
# stride readahead follows) cost the CPython workload 25-50% more time: its
# heap faults cluster, and each call served one fault. A strided stream is
# seen when the call returns anyway (at most LOG_PAGES faults or SLICE_SECONDS).
NEAR_PAGES = 2
STREAM_REACH = 64       # a fault at most this far past a prefetch window's far end is the full path's


class FastPath:
    def __init__(self, core: TargetCore, removes: RemoveAttribution, spin: float, enabled: bool = True):
        self.core = core
        self.removes = removes
        self.enabled = enabled
        self.spin_ns = int(spin * 1e9)
        self._pages = PageBuffer(uffdmod.FAST_GROUP)   # reads land here (O_DIRECT: page aligned)
        self._zeros = PageBuffer(1)
        self._regions = uffdmod.new_fast_struct("umgr_fast_region", 16)   # the table's, as C sees them
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
        self._remove_lo = np.zeros(LOG_PAGES, np.uint64)
        self._remove_hi = np.zeros(LOG_PAGES, np.uint64)
        log.remove_lo = uffdmod.array_pointer("uint64_t *", self._remove_lo)
        log.remove_hi = uffdmod.array_pointer("uint64_t *", self._remove_hi)
        self._zap = None                          # the vpns of the zap in flight the log points at
        self._table = None                        # the table and layout self._regions describe
        self._layout = -1
        self._nregions = 0
        self._pointers: dict[int, tuple] = {}     # id(region) -> (its state, slot, their C pointers)
        log.stream_reach = STREAM_REACH
        self._stream_at = 0                       # where the next window's far end goes in log.streams

    def _follow_table(self) -> int:
        """Point the C call at every region of the table (anew only when
        its layout changed); returns how many there are."""
        pt = self.core.pt
        if self._table is pt and self._layout == pt.layout:
            return self._nregions
        regions = pt.regions
        if len(regions) > len(self._regions):
            self._regions = uffdmod.new_fast_struct("umgr_fast_region", 2 * len(regions))
        counts = uffdmod.array_pointer("int64_t *", pt.counts)
        pointers = {}
        for c, region in zip(self._regions, regions):
            known = self._pointers.get(id(region))
            if known is None or known[0] is not region.state or known[1] is not region.slot:
                known = (region.state, region.slot, uffdmod.array_pointer("uint8_t *", region.state),
                         uffdmod.array_pointer("int32_t *", region.slot))
            pointers[id(region)] = known   # holds the arrays: their pointers stay valid
            c.vpn, c.end, c.state, c.slot, c.counts = region.vpn, region.end, known[2], known[3], counts
        self._pointers = pointers
        self._table, self._layout, self._nregions = pt, pt.layout, len(regions)
        return self._nregions

    def ready(self) -> bool:
        """Whether the next faults may be tried here."""
        core = self.core
        if not self.enabled or core.trace is not NO_TRACE:
            return False
        return self._follow_table() > 0 and self._room() > 0

    def prefetching(self, vpn: int, window: np.ndarray) -> None:
        """The prefetch policy asked for `window` (sorted) at a fault on
        `vpn`: the stream's next fault lands near the window's far end."""
        first, last = int(window[0]), int(window[-1])
        descends = vpn - first > last - vpn
        self._log.streams[self._stream_at] = first if descends else last
        self._log.stream_way[self._stream_at] = -1 if descends else 1
        self._stream_at = (self._stream_at + 1) % len(self._log.streams)

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
        self._point_at_zap()
        return core.uffd.serve_plain_faults(
            self._regions, self._nregions, core.backend.sync_read_fd(), self._pages.addr, self._zeros.addr,
            self.spin_ns, int(SLICE_SECONDS * 1e9), self._room(), NEAR_PAGES, self._log)

    def _point_at_zap(self) -> None:
        """Show the call the zap in flight (removes.py), if it changed."""
        zap = self.removes.zap
        vpns = None if zap is None else zap[0]
        if vpns is self._zap:
            return
        self._zap = vpns   # begin() makes both arrays anew: the vpns tell
        if zap is None:
            self._log.zap_pages = 0
            return
        self._log.zap_vpn = uffdmod.array_pointer("int64_t *", vpns)
        self._log.zap_hits = uffdmod.array_pointer("uint8_t *", zap[1])
        self._log.zap_pages = len(vpns)

    def settle(self) -> np.ndarray:
        """The counters, the store and the eviction policy learn of the
        pages the last call served (the table has them already). Returns
        their vpns, in fault order."""
        core, stats = self.core, self.core.stats
        removes = self._log.removes
        if removes:
            stats.own_removes += removes
            self.removes.taken(self._remove_lo[:removes], self._remove_hi[:removes])
        n = self._log.served
        if not n:
            return np.empty(0, np.int64)
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
