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
  stream start. The pages it asks for come in at once, and a fault on
  the far end of one of the latest 8 such windows, or one or two of its
  steps past it, goes to the full path, where the policy hears of it
  first and its next window comes in (through prefetch() here) before
  the faulting page. Other faults, such as an
  interpreter's random ones between its scans, stay here;
- swapped pages only where the store says how to read them: unpacked
  from its memory tier (Backend.memory_entries: the compressed store), or
  read from its file with a plain pread (Backend.sync_read_fd); fresh
  pages always.
It serves write-protect faults on RESIDENT pages too (a page
that came in clean or by prefetch, written): unprotected, its clean copy
and flags dropped. After a lone fault on a swapped page it may bring in
pages of its block (PrefetchPolicy.cluster: umgr_fast_cluster), which the
full path does not: they are the policy's, done in C, and settle() counts
them as prefetched. Everything else the call reads (other events, faults
on pages in other states, failed reads, copies or unprotects) it hands
back, still in the message buffer.

Settling a call costs the daemon's thread 2-6 us a fault (the policies'
hooks, on lists of ints), and the next faults waited for it: on random
reads from the compressed store a sixth of the daemon's time. So when a
call ends on a limit that needs nothing of Python at once (its log is
full, its time slice over, the high water mark passed), the next call
starts at once in a thread of its own, into a second log, and this
thread settles the first log meanwhile (serve_in_background,
finish_background). Then it waits for that call to end, or stops it if
the settling asked for a prefetch window (it comes in at once) or another
task is now ready to run (the evictor, woken by the settling).
That is safe because settling touches nothing the call does: it tells the
counters, the store's accounting, the slot allocator (of slots no page
names any more: the call reads only the slots of SWAPPED pages) and the
policies, which are Python objects the call never sees; it reads the
table's per-state counts, which the call keeps changing (a stale count is
a count of a moment ago). Nothing else runs meanwhile: the fault loop's
step goes from the start of the call to its end, with no await, so no
other task (the evictor, the events, another target's fault loop, which
would share the process's AIO and zstd contexts) runs while the thread
does. The thread sleeps in ppoll() between faults while this one settles
(on 2 vCPUs a thread spinning for the next fault takes the CPU of the
program that is to make it), and spins once this one waits for it.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import os
import time
from collections.abc import Iterable

import numpy as np
import trio

from umgr.backends import IO_BUCKETS, SLOW_READ, ReadsDone
from umgr.kernel import uffd as uffdmod
from umgr.kernel.buffers import PageBuffer
from umgr.paging.clusternotes import ClusterNotes
from umgr.paging.core import TargetCore
from umgr.paging.pagetable import NO_SLOT, Flag, Region, State
from umgr.paging.stats import LATENCY_BUCKETS_NS
from umgr.paging.tuning import MAX_FILL_PAGES
from umgr.policies import FRESH_WINDOW_MAX
from umgr.trace import NO_TRACE

assert uffdmod.fast_state_values() == (State.FRESH, State.RESIDENT, State.SWAPPED)
assert uffdmod.fast_flag_values() == (Flag.DISCARDABLE, Flag.PREFETCHED, Flag.CLUSTERED)
assert uffdmod.FILL_MAX == FRESH_WINDOW_MAX

logger = logging.getLogger("umgr.target")

IDLE, HANDOFF, YIELD = uffdmod.FAST_IDLE, uffdmod.FAST_HANDOFF, uffdmod.FAST_YIELD
EMPTY = np.empty(0, np.int64)
LATENCY_BOUNDS_NS = np.array(LATENCY_BUCKETS_NS, np.int64)
IO_BOUNDS_NS = np.array([round(bound * 1e9) for bound in IO_BUCKETS], np.int64)

# Pages one call may serve before they are settled, and how long it may
# run. Each call costs the Python side about 100-150 us (settling, a round
# of the event loop) whatever it served, so while nothing else in the
# daemon is ready to run (no other task runnable, no timer due, nothing
# readable on the event loop's epoll set: watched by the call) it runs up to
# LONG_SLICE_SECONDS; otherwise SLICE_SECONDS, so that the evictor and other
# targets wait little. Measured on uniform random reads from a file store:
# 64 pages and 1 ms took 8% longer than 1024 pages and 16 ms, 256 pages and
# 4 ms 3% longer.
LOG_PAGES = 256
SLICE_SECONDS = 1e-3
LONG_SLICE_SECONDS = 8e-3
WATCH_SECONDS = 200e-6    # how often the call looks at the event loop's epoll set
# What may end a call with the next one going on in the background: limits
# that need nothing of Python at once. Not a page that may start a stream
# (the prefetch policy is to see it first), not the event loop's work. The
# high water mark may: the evictor is woken as the call is settled, and
# runs once the next call is over, which ends within SLICE_SECONDS then.
OVERLAP_ENDINGS = (uffdmod.FAST_WHY_FULL, uffdmod.FAST_WHY_SLICE, uffdmod.FAST_WHY_ROOM)
# A page this close to one served lately ends the call, so that the prefetch
# policy sees a sequential stream start at once. Wider (64, the widest
# stride readahead follows) cost the CPython workload 25-50% more time: its
# heap faults cluster, and each call served one fault. A fault that extends
# the last two by their gap (of up to STRIDE_PAGES) ends it too: a strided
# stream may start.
NEAR_PAGES = 2
STRIDE_PAGES = 64
# A lone fault's neighbour "went out with it" (PrefetchPolicy.cluster) if
# evicted within this share of the resident set's evictions of it, or
# CLUSTER_REACH_MIN: the evictor stamps a batch's pages alike. With every
# lone fault bringing its block (no bar), the CPython workload at scale 0.5
# under 100 MiB took 55-57 s with a reach of 0.5-2% of the resident set,
# 61 s with 5%, 68 s with all of it, and 67-71 s with no cluster.
CLUSTER_REACH = 0.01
CLUSTER_REACH_MIN = 64
# Blocks come while more of the pages brought lately were written than the
# near-refault share (each page brought pushes out one, wanted back about
# that often), or more of the pages of blocks left out came back by a fault
# soon after (clusternotes.py) than this share of it; each with a margin
# (umgr_cluster_wanted). Half for the second: a page pushed out comes back
# with the pages of its own block, in one read and one fault, so it costs
# less than the fault a wanted page saves (at the whole share sort's bar
# stood at 100%: its refaults are all near). tools/ab.py against writes as
# the only measure (alternating pairs, median and range): GNU sort of 77
# MiB under 124 MiB (bench_shapes.py's sort workload) 0.76x (0.73-0.87);
# the CPython workload (scale 0.1, 32 MiB) 0.92x (0.88-0.95); the serial
# JVM (128 MiB of arrays under 80 MiB) 0.99x (0.94-1.11); the shapes at
# 512/64 1.01x (0.90-1.08), as many faults. The second measure alone lost
# the JVM's blocks (docs/architecture.md, "A lone fault's neighbours").
CLUSTER_BAR_SHARE = 0.5
# How often a target's CPU affinity is looked at again (colocated()).
AFFINITY_SECONDS = 1.0
# A call serving beside its program that is not over this long after its
# slice is starved on that CPU: it is let run anywhere and ended.
BESIDE_GRACE_SECONDS = 50e-3


class _Entry:
    """A region as one entry of the C call's region array describes it:
    the arrays it points at (held here, so that the pointers stay valid),
    where the region was, and the pointers."""
    __slots__ = ("region", "state", "slot", "flags", "vpn", "end", "state_ptr", "slot_ptr", "flags_ptr")

    def __init__(self, region: Region):
        self.region, self.state, self.slot, self.flags = region, region.state, region.slot, region.flags
        self.vpn, self.end = region.vpn, region.end
        self.state_ptr = uffdmod.array_pointer("uint8_t *", region.state)
        self.slot_ptr = uffdmod.array_pointer("int32_t *", region.slot)
        self.flags_ptr = uffdmod.array_pointer("uint8_t *", region.flags)

    def describes(self, region: Region) -> bool:
        """The same region, with the same arrays (a persistent table moves
        them to a file), in the same place (the same state array: the same
        length)."""
        return (self.region is region and self.state is region.state and self.slot is region.slot
                and self.flags is region.flags and self.vpn == region.vpn)


class FastPath:
    def __init__(self, core: TargetCore, spin: float, enabled: bool = True, prefetch=None):
        self.core = core
        self.enabled = enabled
        self._prefetch = prefetch   # the (guarded) prefetch policy, for its cluster
        self.overlap = True   # settle beside the next call (off if no thread can be had)
        self.spin_ns = int(spin * 1e9)
        self._pages = PageBuffer(uffdmod.FAST_GROUP)   # reads land here (O_DIRECT: page aligned)
        self._zeros = PageBuffer(1)
        self._fill_zeros = PageBuffer(uffdmod.FILL_MAX, private=True)   # never written: the zero page
        self._regions = uffdmod.new_fast_struct("umgr_fast_region", 16)   # the table's, as C sees them
        self._served = FastLog(LOG_PAGES)                   # what serve() served
        self._next = FastLog(LOG_PAGES)                     # a call in the background serves into this one
        self._log = self._served.c
        self._io = uffdmod.fast_io()                        # its reads' contexts, but in a joint round
        self._log.fill_zeros = self._next.c.fill_zeros = self._fill_zeros.addr
        self._background = None                   # its thread (uffdmod.fast_background), made on first use
        self._pinned_to = -1                      # the CPU that thread is kept on (-1: none)
        self._affinity_at = -AFFINITY_SECONDS     # when the target's CPUs were last looked at
        self._target_cpu = -1                     # the one CPU its threads may run on (-1: more)
        self._joined = False                      # its call is a joint round's
        self._wake_fd = -1                        # (its eventfd: log.wake_fd)
        self._prefetched = FastLog(MAX_FILL_PAGES)          # what prefetch() brought in
        for log in (self._served, self._next, self._prefetched):
            log.use(self._io)
            log.note_clusters_in(core.cluster_notes)
        self._prefetch_pages = PageBuffer(MAX_FILL_PAGES)
        self._store = StoreView(self._io)
        self._table = None                        # the table and layout self._regions describe
        self._layout = -1
        self._nregions = 0
        self._entries: list[_Entry] = []          # what each entry of self._regions describes, in order
        self._pointers: dict[int, _Entry] = {}    # id(region) -> its entry, wherever it is now
        self._counts = None                       # the table's per-state counts, as C sees them
        self._stream_at = 0                       # where the next window's far end goes in log.streams
        self._starts: list[int] = []              # first and end vpn of each region in self._regions
        self._watch_fd: int | None = None         # event_loop_fd(), once serving
        self._ends: list[int] = []

    def _follow_table(self) -> int:
        """Point the C call at every region of the table (anew only when
        its layout changed, and then only the entries that do not already
        describe their region: a heap grown by small commits changes the
        layout with each, and rewriting thousands of entries each time took
        2.2 us a region); returns how many there are."""
        pt = self.core.pt
        if self._table is pt and self._layout == pt.layout:
            return self._nregions
        regions = pt.regions
        if self._table is not pt or len(regions) > len(self._regions):
            if len(regions) > len(self._regions):
                self._regions = uffdmod.new_fast_struct("umgr_fast_region", 2 * len(regions))
            self._entries = []   # (a new array, or another table: every entry is written)
            self._counts = uffdmod.array_pointer("int64_t *", pt.counts)
        entries, by_id = self._entries, self._pointers
        for i, region in enumerate(regions):
            if i < len(entries) and entries[i].describes(region):
                continue
            entry = by_id.get(id(region))
            if entry is None or not entry.describes(region):
                entry = _Entry(region)
            c = self._regions[i]
            c.vpn, c.end, c.counts = region.vpn, region.end, self._counts
            c.state, c.slot, c.flags = entry.state_ptr, entry.slot_ptr, entry.flags_ptr
            if i < len(entries):
                entries[i] = entry
            else:
                entries.append(entry)
        del entries[len(regions):]
        # Each entry holds its region's arrays: their pointers stay valid.
        self._pointers = {id(entry.region): entry for entry in entries}
        self._starts = [entry.vpn for entry in entries]
        self._ends = [entry.end for entry in entries]
        self._table, self._layout, self._nregions = pt, pt.layout, len(regions)
        return self._nregions

    def bounds(self, vpn: int) -> tuple[int, int]:
        """[first, end) of the region of a page the last call served: as
        PageTable.bounds, from the regions that call saw (the table cannot
        have changed since: settling comes first)."""
        i = bisect.bisect_right(self._starts, vpn) - 1
        return self._starts[i], self._ends[i]

    def with_bounds(self, vpns: list[int]) -> Iterable[tuple[int, int, int]]:
        """(vpn, first, end) for each of `vpns`, as bounds() gives them."""
        if len(self._starts) == 1:   # (most programs' memory is one region)
            return zip(vpns, itertools.repeat(self._starts[0]), itertools.repeat(self._ends[0]))
        return ((vpn, *self.bounds(vpn)) for vpn in vpns)

    def ready(self) -> bool:
        """Whether the next faults may be tried here."""
        core = self.core
        if not self.enabled or core.trace is not NO_TRACE:
            return False
        return self._follow_table() > 0 and self._room() > 0

    def prefetching(self, vpn: int, window: np.ndarray) -> None:
        """The prefetch policy asked for `window` (sorted) at a fault on
        `vpn`: the stream's next fault lands a step past the window's far
        end (a step: the gap between its pages, 1 when it has one)."""
        first, last = int(window[0]), int(window[-1])
        step = int(window[1] - window[0]) if len(window) > 1 else 1
        if not 0 < step < 1 << 31:   # not a stream the C call's int32 can hold (a plug-in's scattered pages)
            return
        descends = vpn - first > last - vpn
        self._log.streams[self._stream_at] = first if descends else last
        self._log.stream_step[self._stream_at] = -step if descends else step
        self._stream_at = (self._stream_at + 1) % len(self._log.streams)

    def prefetch(self, vpns: np.ndarray, fresh: bool = False, also: tuple[int, int] | None = None) -> int:
        """Bring in those of `vpns` (sorted, asked for by the prefetch
        policy) that are swapped, and with `fresh` the fresh ones as
        zeroed pages of their own, in C: a pread per run of slots, a copy
        per run of pages, swapped ones write-protected with their slot
        kept as CleanCopies.keep_period() says, page by page: while it
        samples, one page in SAMPLE_EVERY of each window (a window is up
        to 256 pages, and one decision for a whole window made the
        estimate wait up to 64 windows for a sample). Up to the budget.
        The table, counters and store learn of them here. Returns how
        many came in; the others (pages in other states, a copy refused)
        are left as they are.
        `also`: (slot, address) of the fault the window is for, whose page
        the full path brings: its read goes with the window's, into the
        page at address, where C can read it and a window page comes
        (read_alongside() says whether it did)."""
        core = self.core
        self._prefetched.c.also_read = 0
        room = core.fill_budget.prefetch_room(core.pt.resident, min(len(vpns), MAX_FILL_PAGES))
        if not self.ready() or room <= 0:
            return 0
        vpns = np.ascontiguousarray(vpns[:room], np.int64)
        # (The read alongside takes the buffer's page after the last one planned.)
        also_slot, also_page = also if also is not None and room < MAX_FILL_PAGES else (0, 0)
        self._prefetched.c.max = room + (also_slot != 0)
        self._prefetched.drop_references_in(core.slots.counts, core.slots.evicted_at)
        n = core.uffd.prefetch(self._regions, self._nregions, self._store.follow(core.backend), vpns,
                               self._prefetch_pages.addr, core.clean.keep_period(), fresh, self._prefetched.c,
                               also_slot, also_page)
        if n:
            self._settle_prefetched(n)
        elif self._prefetched.c.also_read:   # (the window's copies refused, its read counted all the same)
            self._came_in(self._prefetched, 0)
        return n

    def read_alongside(self) -> bool:
        """Whether the last prefetch() read its `also` page."""
        return bool(self._prefetched.c.also_read)

    def _settle_prefetched(self, n: int) -> None:
        core = self.core
        core.stats.prefetched += n
        core.stats.prefetched_fast += n
        self._came_in(self._prefetched, n)
        core.became_resident(self._prefetched.vpns[:n].astype(np.int64))
        core.note_resident()

    def _came_in(self, log: "FastLog", n: int) -> None:
        """After a call logged n entries in `log`: the store learns of the
        reads it did (preads, unpacks from its memory tier), and the slot
        allocator of the slots whose last reference it dropped (pages read
        without keeping their copy, copies dropped by a write)."""
        core, c = self.core, log.c
        if c.double_free:
            raise ValueError("double free of a swap slot (fast path)")
        if c.released_count:
            core.slots.released_elsewhere(log.released[:c.released_count].copy())
        # (A store that reads nothing outside read(), such as Redis, may be
        # behind; a prefetch's read alongside is a read with no page come in.)
        if not c.swapped and not c.file_reads and not c.memory_reads:
            return
        core.stats.pages_in += c.swapped
        core.clean.came_in_clean(c.kept_count)
        core.backend.reads_done_elsewhere(
            ReadsDone(c.file_reads, c.file_read_ns * 1e-9, c.slow_file_reads, log.file_buckets),
            ReadsDone(c.memory_reads, c.memory_read_ns * 1e-9, 0, log.memory_buckets))

    @property
    def cluster(self) -> int:
        """PrefetchPolicy.cluster: pages of a lone fault's block that may
        come with it; read at each call, as a policy that raised is
        disabled (GuardedPrefetch.cluster is 0 then)."""
        return getattr(self._prefetch, "cluster", 0)

    @property
    def fresh_window(self) -> int:
        """PrefetchPolicy.fresh_window: fresh pages a first write going up
        may bring ahead of it (read at each call, as cluster is)."""
        return getattr(self._prefetch, "fresh_window", 0)

    def _room(self) -> int:
        """Pages the next call may bring in: up to the budget, at most a log's worth."""
        return self.core.fill_budget.prefetch_room(self.core.pt.resident, LOG_PAGES)

    def _yield_after(self, room: int) -> int:
        """Pages after which the call ends: `room`, or just past the high
        water mark, so that the evictor starts at once."""
        core, budget = self.core, self.core.fill_budget
        below_high = budget.high_water - core.pt.resident
        return min(room, below_high + 1) if budget.limited and below_high >= 0 else room

    def serve(self) -> int:
        """Serve plain faults (waiting up to the spin time for each);
        returns IDLE, HANDOFF (the first `handoff` messages of uffd.batch
        are the full path's) or YIELD. Call settle() after it either way."""
        core, log = self.core, self._log
        room = self._limit(self._served)
        log.wake_fd, log.stop = -1, 0   # in the foreground (the log may have served in the background)
        return core.uffd.serve_plain_faults(
            self._regions, self._nregions, self._store.follow(core.backend), self._pages.addr, self._zeros.addr,
            self.spin_ns, int(slice_seconds(log.watch_fd) * 1e9), room, NEAR_PAGES, log)

    def _limit(self, log: "FastLog") -> int:
        """Set the limits of the next call into `log`; the pages it may bring in."""
        core, c = self.core, log.c
        if self._watch_fd is None:   # (one event loop for the FastPath's life)
            self._watch_fd = event_loop_fd()
        c.keep_period = core.clean.keep_period()
        c.watch_fd = self._watch_fd
        # (Clustered pages come in as clean copies: not while copies are never
        # kept, nor while a full store wants their slots.)
        c.cluster = self.cluster if core.clean.mode != "never" and not core.clean.suspended else 0
        c.cluster_reach = max(CLUSTER_REACH_MIN, int(core.pt.resident * CLUSTER_REACH))
        near = core.refaults.percent(unknown=100)
        c.cluster_bar, c.cluster_fault_bar = near, round(near * CLUSTER_BAR_SHARE)
        # (No more than a prefetch window may take of the budget: Budget.window.)
        c.fresh_window = min(self.fresh_window, core.fill_budget.window_pages())
        log.drop_references_in(core.slots.counts, core.slots.evicted_at)
        log.count_latencies_in(core.stats.fault_latency)
        room = self._room()
        c.yield_after = self._yield_after(room)
        return room

    def may_overlap(self, outcome: int) -> bool:
        """Whether the next call may serve in the background while the
        last one (its outcome) is settled."""
        if outcome != YIELD or self._log.why not in OVERLAP_ENDINGS or self._room() <= 0:
            return False
        return self.has_background()

    def colocated(self) -> bool:
        """Whether calls are to serve beside the program, on its CPU: the
        process (its main thread) may run on one CPU only (taskset, a
        cpuset of one CPU), one the daemon may use, and its store holds
        every page in memory (Backend.in_memory: the compressed store
        alone). The call then runs in the background thread, kept on that
        CPU, which sleeps between faults, and the daemon's thread waits for
        it (finish_beside): a fault wakes the call on the program's CPU,
        whose copy wakes the program there, with no hand-over between CPUs
        (a halted vCPU's wake-up, on a VM) and no busy-poll taking that CPU
        from the program. A call starved there (not over
        BESIDE_GRACE_SECONDS after the longest slice) is let run anywhere
        and ended: no program's CPU holds up the daemon. Measured (tools/ab.py,
        8 alternating pairs, 100k random reads of 102 MiB of a CPython heap
        from the compressed store under 32 MiB, the program on one vCPU of
        two): the random phase 0.86x and 0.88x the time, the daemon's CPU
        0.78x. Not with a file to read: a call asleep in its read on the
        program's CPU took the file store's random reads longer (single
        runs), and a program free to move is woken on whichever CPU is
        idle, so a thread kept on its last one was no help."""
        core = self.core
        if not core.backend.in_memory or not self.has_background():
            return self._pin(-1)
        now = time.monotonic()
        if now - self._affinity_at >= AFFINITY_SECONDS:
            self._affinity_at = now
            try:
                cpus = os.sched_getaffinity(core.pid)
            except OSError:   # (gone: its loop finds out)
                cpus = ()
            # (Only on a CPU the daemon may use: its own affinity is its user's choice too.)
            self._target_cpu = next(iter(cpus)) if len(cpus) == 1 and cpus <= os.sched_getaffinity(0) else -1
        return self._pin(self._target_cpu)

    def _pin(self, cpu: int) -> bool:
        """Keep the background thread on `cpu` (-1: on any); whether it is."""
        if cpu != self._pinned_to and self._background is not None:
            try:   # (on the program's CPU at the program's nice, but not above 0: umgr_fast_bg_pin)
                nice = min(os.getpriority(os.PRIO_PROCESS, self.core.pid), 0) if cpu >= 0 else 0
                uffdmod.fast_background_pin(self._background, cpu, nice)
            except OSError as exc:   # (it stays as it was, or the program is gone: serve as before)
                logger.debug("%s: fault service thread stays where it is (%s)", self.core.label, exc)
                self._target_cpu = -1   # (until the program's CPUs are looked at again)
                return False
            self._pinned_to = cpu
        return cpu >= 0

    def finish_beside(self, stop: bool = False) -> int:
        """finish_background() for a call serving beside its program
        (colocated()): waited for as it goes, and ended if starved on the
        program's CPU; then no call serves beside it until its CPUs are
        looked at again (AFFINITY_SECONDS), rather than each one starve."""
        try:   # (past the longest slice a call may have)
            return self.finish_background(stop, as_it_goes=LONG_SLICE_SECONDS + BESIDE_GRACE_SECONDS)
        finally:
            if self._background.unpinned:
                logger.debug("%s: fault service thread starved on CPU %d: let run anywhere",
                             self.core.label, self._target_cpu)
                self._background.unpinned = 0
                self._pinned_to = self._target_cpu = -1
                self._affinity_at = time.monotonic()

    def has_background(self) -> bool:
        """Whether calls may run in the background thread (made on first use)."""
        if self._background is None and self.overlap:
            try:
                self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._background = uffdmod.fast_background()
            except OSError as exc:   # (no thread to be had: serve as before)
                logger.warning("%s: faults are settled after they are served (%s)", self.core.label, exc)
                if self._wake_fd >= 0:
                    os.close(self._wake_fd)
                    self._wake_fd = -1
                self.overlap = False
                return False
        return self.overlap

    def serve_in_background(self, joint: tuple[float, uffdmod.FastIO, int] | None = None) -> None:
        """After may_overlap(): start the next call in the background
        thread, into the other log. settle() the last call's meanwhile,
        then finish_background() before anything else.
        As a member of a joint round (after has_background(); joint.py):
        `joint` is the round's (slice, the member's I/O contexts, the
        eventfd each member's call adds 1 to as it ends), and the call does
        not watch the event loop (the round does)."""
        core, last, log = self.core, self._log, self._next.c
        room = self._limit(self._next)
        log.wake_fd = self._wake_fd
        log.concurrent = last.concurrent   # (what the calls carry over, from the last)
        log.keep_phase = last.keep_phase
        log.recent, log.recent_at = last.recent, last.recent_at
        log.cluster_brought, log.cluster_hits = last.cluster_brought, last.cluster_hits
        log.cluster_skips, log.cluster_probes = last.cluster_skips, last.cluster_probes
        log.fill_next, log.fill_size, log.fill_at = last.fill_next, last.fill_size, last.fill_at
        log.streams, log.stream_step = last.streams, last.stream_step
        log.block_ends, log.block_end_at = last.block_ends, last.block_end_at
        store = self._store.follow(core.backend)
        if joint is None:
            slice_s = SLICE_SECONDS if core.over_budget() else slice_seconds(log.watch_fd)
        else:
            slice_s, io, notify_fd = joint
            self._joined = True
            log.watch_fd = -1
            self._next.use(io)
            store.dctx = io.dctx
            self._background.notify_fd = notify_fd
        core.uffd.serve_in_background(
            self._background, self._regions, self._nregions, store, self._pages.addr,
            self._zeros.addr, self.spin_ns, int(slice_s * 1e9), room, NEAR_PAGES, log)

    def stop_background(self) -> None:
        """Ask the call in the background to end after the group it is
        serving (finish_background() waits for it)."""
        uffdmod.fast_background_stop(self._background)

    def finish_background(self, stop: bool = False, as_it_goes: float = 0.0) -> int:
        """Wait for the call in the background to end (`stop`: end it now;
        `as_it_goes`: let it sleep between faults as it does, where it
        would spin from now on, for up to that many seconds); its outcome,
        as serve()'s. Its log is the one settle() reads next."""
        try:
            return self.core.uffd.finish_background(self._background, stop, as_it_goes)
        finally:   # (a failed read of the uffd too: what the call served is in its log, to be settled)
            settled, self._served, self._next = self._served, self._next, self._served
            self._log = self._served.c
            # Settling may have noted a prefetch window meanwhile (prefetching()).
            self._log.streams, self._log.stream_step = settled.c.streams, settled.c.stream_step
            faults = self._log.served - self._log.clustered - self._log.filled   # (faults only)
            if not self._joined:
                self.core.stats.faults_background += faults
            else:   # a joint round's: its own contexts go back to the round
                self._joined = False
                self.core.stats.faults_joined += faults
                self._served.use(self._io)
                self._store.c.dctx = self._io.dctx
                self._background.notify_fd = -1

    def settle(self) -> tuple[list[int], list[int]]:
        """The counters, the store and the eviction policy learn of the
        faults the last call served (the table has them already, and the
        call counted what needs no Python: umgr_fast_log). Returns the
        vpns of its MISSING faults, in fault order (the prefetch policy
        is to hear of each), and of the prefetched pages it saw written
        (the policy's hits). Pages brought beside a lone fault (kind
        FAST_CLUSTER) are counted as prefetched and are not faults. On
        lists of ints: a call serves a few pages
        (an interpreter's faults, 5-7 on average), and numpy's per-call
        cost, ~3 us here, made settling ~200 us a call (~130 on lists)."""
        core, stats, c = self.core, self.core.stats, self._log
        n = c.served
        if not n:
            return [], []
        read, served = c.read_ns_sum * 1e-9, c.serve_ns_sum * 1e-9
        clustered = c.clustered   # (pages read from a slot, not faults)
        filled = c.filled         # (fresh pages, not faults)
        stats.faults_fast += n - clustered - filled
        stats.fault_read_seconds += read
        stats.fault_copy_seconds += served - read
        stats.fault_batch_seconds += served
        stats.fault_latency_sum += served - c.cluster_ns_sum * 1e-9   # (the histogram counts faults only)
        stats.faults_missing += c.missing
        stats.faults_swapped += c.swapped - clustered
        stats.faults_fresh += c.missing - (c.swapped - clustered)
        if clustered:
            stats.prefetched += clustered
            stats.prefetched_fast += clustered
            stats.clustered += clustered
        if filled:
            stats.prefetched += filled
            stats.prefetched_fast += filled
            stats.filled_ahead += filled
        self._came_in(self._served, n)
        log = self._served
        vpns, hits = log.vpns[:n].tolist(), []
        # Without c.wp, clustered and filled pages, every entry is a MISSING fault.
        kinds, missing, came_in = [0] * n, vpns, vpns
        if c.wp or clustered or filled:
            stats.faults_wp += c.wp
            if c.wp_dropped:
                core.clean.dirtied(c.wp_dropped)
            kinds = log.kind[:n].tolist()
            hits = [vpn for vpn, kind in zip(vpns, kinds) if kind & uffdmod.FAST_WAS_PREFETCHED]
            stats.prefetch_hits += len(hits)
            came_in = [vpn for vpn, kind in zip(vpns, kinds) if not kind & uffdmod.FAST_WP]
            # (Nor a fault that brought pages ahead: the policy's window is in.)
            missing = [vpn for vpn, kind in zip(vpns, kinds)
                       if not kind & (uffdmod.FAST_WP | uffdmod.FAST_CLUSTER | uffdmod.FAST_FILL | uffdmod.FAST_AHEAD)]
        if came_in:
            if c.swapped:   # (their distances: the eviction policy's, and near_refaults)
                # (a WP entry's slot is the clean copy its write dropped)
                back = [(vpn, slot) for vpn, slot, kind in zip(vpns, log.slots[:n].tolist(), kinds)
                        if slot != NO_SLOT and not kind & (uffdmod.FAST_WP | uffdmod.FAST_CLUSTER)]
                if back:
                    vpns_back, slots_back = zip(*back)
                    core.refaulted(np.array(vpns_back, np.int64), np.array(slots_back, np.int32))
            core.became_resident(np.array(came_in, np.int64))
        core.note_resident()
        return missing, hits

    def cluster_hit(self) -> None:
        """The full path served the first write to a page brought beside a
        lone fault: counted as the C call counts those it serves."""
        self._log.cluster_hits += 1

    @property
    def handoff(self) -> int:
        return self._log.handoff

    @property
    def served(self) -> int:
        """Pages the last call served."""
        return self._log.served

    @property
    def file_reads(self) -> int:
        """Pages the last call read from the store's file."""
        return self._log.file_reads

    def release_buffers(self) -> None:
        """The staging buffers' memory goes back (between calls only)."""
        self._pages.release()
        self._prefetch_pages.release()

    def close(self) -> None:
        if self._background is not None:
            uffdmod.fast_background_end(self._background)
            os.close(self._wake_fd)
            self._background = None
        self._pages.close()
        self._zeros.close()
        self._fill_zeros.close()
        self._prefetch_pages.close()


class StoreView:
    """Where a backend's swapped pages are, as the C call reads them (a
    struct umgr_fast_store): its memory tier's entries and its file."""

    def __init__(self, io: uffdmod.FastIO | None = None):
        self.c = uffdmod.new_fast_struct("umgr_fast_store")
        self.c.dctx = (io or uffdmod.fast_io()).dctx
        self._entries = None   # the backend's memory_entries() self.c points at (held: pointers stay valid)

    def follow(self, backend):
        """The struct, pointed at where backend's pages are now."""
        c = self.c
        c.fd = backend.sync_read_fd()
        entries = backend.memory_entries()
        if not _same_arrays(entries, self._entries):   # (a new tuple each call: compare what it holds)
            if entries is None:
                c.length, c.span = uffdmod.NULL, 0
            else:
                c.length = uffdmod.array_pointer("int32_t *", entries[0])
                c.where = uffdmod.array_pointer("uint64_t *", entries[1])
                c.area = entries[2]
                c.span = len(entries[0])
            self._entries = entries
        return c


def _same_arrays(these, those) -> bool:
    if these is None or those is None:
        return these is those
    return all(a is b for a, b in zip(these, those))


def event_loop_fd() -> int:
    """The fd of the running trio loop's epoll set, -1 if it cannot be
    found. It is readable when a task waiting on I/O can go on (a thread's
    result comes through it too). Trio does not publish it: this reads
    its runner's I/O manager (epoll on Linux; checked with trio 0.35);
    tests/test_fastpath.py fails if that changes."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT
        return GLOBAL_RUN_CONTEXT.runner.io_manager._epoll.fileno()
    except (ImportError, AttributeError, ValueError):
        return -1


def others_waiting() -> bool:
    """Whether another task of the daemon is ready to run, or a timer due."""
    loop = trio.lowlevel.current_statistics()
    return bool(loop.tasks_runnable or loop.run_sync_soon_queue_size or loop.seconds_to_next_deadline <= 0)


def slice_seconds(watch_fd: int, besides: frozenset = frozenset()) -> float:
    """How long the next call may serve: long while nothing else in the
    daemon is ready to run (watch_fd tells the call when that changes),
    `besides` these runnable tasks (the fault loops a joint round serves)."""
    if watch_fd < 0:
        return SLICE_SECONDS
    loop = trio.lowlevel.current_statistics()
    runnable = loop.tasks_runnable
    if runnable and besides:
        runnable = runnable_besides(besides, runnable)
    if runnable or loop.run_sync_soon_queue_size:
        return SLICE_SECONDS
    return min(LONG_SLICE_SECONDS, max(loop.seconds_to_next_deadline, SLICE_SECONDS))


def runnable_besides(tasks: frozenset, runnable: int) -> int:
    """How many of the running trio loop's runnable tasks are not `tasks`
    (`runnable` if that cannot be read). Trio does not publish its run
    queue: this reads its runner's (checked with trio 0.35;
    tests/test_fastpath.py fails if that changes). Like tasks_runnable it
    leaves out the tasks of the batch trio is running."""
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT
        return sum(1 for task in GLOBAL_RUN_CONTEXT.runner.runq if task not in tasks)
    except (ImportError, AttributeError):
        return runnable


class FastLog:
    """A struct umgr_fast_log of `size` entries and the numpy arrays it
    points at: what a C call served, for the Python side to settle."""

    def __init__(self, size: int):
        self.vpns = np.zeros(size, np.uint64)
        self.slots = np.zeros(size, np.int32)
        self.kept = np.zeros(size, np.uint8)
        self.kind = np.zeros(size, np.uint8)
        self.read_ns = np.zeros(size, np.int64)
        self.serve_ns = np.zeros(size, np.int64)
        self.released = np.zeros(size, np.int32)
        self.file_buckets = np.zeros(len(IO_BOUNDS_NS) + 1, np.int64)
        self.memory_buckets = np.zeros(len(IO_BOUNDS_NS) + 1, np.int64)
        c = self.c = uffdmod.new_fast_struct("umgr_fast_log")
        c.max = size
        c.vpn = uffdmod.array_pointer("uint64_t *", self.vpns)
        c.slot = uffdmod.array_pointer("int32_t *", self.slots)
        c.kept = uffdmod.array_pointer("uint8_t *", self.kept)
        c.kind = uffdmod.array_pointer("uint8_t *", self.kind)
        c.read_ns = uffdmod.array_pointer("int64_t *", self.read_ns)
        c.serve_ns = uffdmod.array_pointer("int64_t *", self.serve_ns)
        c.released = uffdmod.array_pointer("int32_t *", self.released)
        c.file_buckets = uffdmod.array_pointer("int64_t *", self.file_buckets)
        c.memory_buckets = uffdmod.array_pointer("int64_t *", self.memory_buckets)
        c.io_bounds = uffdmod.array_pointer("int64_t *", IO_BOUNDS_NS)
        c.nio_bounds = len(IO_BOUNDS_NS)
        c.slow_read_ns = round(SLOW_READ * 1e9)
        c.watch_fd = -1
        c.wake_fd = -1   # (a call in the foreground)
        c.efd = -1       # (until use())
        c.watch_ns = round(WATCH_SECONDS * 1e9)
        c.max_stride = STRIDE_PAGES
        self._counts = None    # the slot counts c.refs points at (held: the pointer stays valid)
        self._evicted_at = None  # the stamps c.evicted_at points at (likewise)
        self._latency = None   # the histogram c.latency points at (likewise)

    def use(self, io: uffdmod.FastIO) -> None:
        """The next call reads through these contexts."""
        self.c.aio, self.c.efd = io.aio, io.efd

    def drop_references_in(self, counts: np.ndarray, evicted_at: np.ndarray) -> None:
        """The call drops slot references in `counts` (SlotAllocator.counts)
        and reads when each slot's page went out in `evicted_at` (its
        evicted_at: as many entries)."""
        if counts is not self._counts or evicted_at is not self._evicted_at:
            assert len(evicted_at) == len(counts)
            self.c.refs = uffdmod.array_pointer("uint16_t *", counts)
            self.c.evicted_at = uffdmod.array_pointer("uint32_t *", evicted_at)
            self.c.nrefs = len(counts)
            self._counts, self._evicted_at = counts, evicted_at

    def note_clusters_in(self, notes: ClusterNotes) -> None:
        """The call notes the pages of the blocks it leaves out in `notes`
        (held: the pointers stay valid), and brings blocks while its counts
        say so."""
        self._notes = notes
        self.c.noted_vpn = uffdmod.array_pointer("uint64_t *", notes.vpn)
        self.c.noted_tick = uffdmod.array_pointer("uint32_t *", notes.tick)
        self.c.cluster_counts = uffdmod.array_pointer("int64_t *", notes.counts)

    def count_latencies_in(self, histogram: np.ndarray) -> None:
        """The call counts each fault's service time in `histogram`
        (TargetStats.fault_latency, buckets LATENCY_BUCKETS_NS)."""
        if histogram is self._latency:
            return
        self._latency = histogram   # held: the pointer stays valid
        self.c.latency = uffdmod.array_pointer("int64_t *", histogram)
        self.c.latency_bounds = uffdmod.array_pointer("int64_t *", LATENCY_BOUNDS_NS)
        self.c.nbounds = len(LATENCY_BOUNDS_NS)
