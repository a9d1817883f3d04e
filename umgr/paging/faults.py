"""The fault service of one target: its fault loop.

It reads uffd messages in batches (in place, uffd.read_batch), hands the
non-cooperative events of each batch (REMOVE, UNMAP, REMAP, FORK) to
MemoryEvents (events.py) in order once the batch has been walked, and serves
the page faults: those that
bring in no content at once (write-protect faults, pages believed resident),
the others in one backend read and few UFFDIO_COPYs, with what the prefetch
policy adds. At the budget, new pages wait for the evictor (backpressure).
While nothing is queued, plain faults are served in C instead (fastpath.py);
what that call cannot serve comes back here as a batch.
Race rules: docs/architecture.md.
"""
from __future__ import annotations

import errno
import logging
import time

import numpy as np
import trio

from umgr.backends import io_to_the_end
from umgr.errors import TargetGone
from umgr.kernel import uffd as uffdmod
from umgr.kernel.buffers import PageBuffer
from umgr.kernel.uffd import EVENT_PAGEFAULT, MSG_WORDS, UFFD_PAGEFAULT_FLAG_WP, UFFD_PAGEFAULT_FLAG_WRITE, W_ADDRESS, W_FLAGS
from umgr.paging.budget import nearest_first
from umgr.paging.core import UNCOUNTED, TargetCore
from umgr.paging.pagetable import NO_SLOT, PAGE_SHIFT, PAGE_SIZE, Flag, State, runs
from umgr.paging.events import MemoryEvents
from umgr.paging.fastpath import HANDOFF as FAST_HANDOFF
from umgr.paging.fastpath import IDLE as FAST_IDLE
from umgr.paging.fastpath import FastPath, others_waiting
from umgr.paging.joint import JOIN_RECENT_SECONDS
from umgr.paging.pinning import Pinning
from umgr.paging.tuning import (BACKPRESSURE_LIMIT, BACKPRESSURE_POLL, MAX_EVENTS_PER_READ, MAX_FILL_PAGES,
                                REMOVE_LINGER_SECONDS, SPIN_SECONDS)

log = logging.getLogger("umgr.target")

ABSENT = (State.FRESH, State.SWAPPED)   # states a MISSING fault fills


class FaultService:
    def __init__(self, core: TargetCore, events: MemoryEvents, pinning: Pinning, prefetch, *,
                 spin: float = SPIN_SECONDS, fast_path: bool = True, joint=None):
        self.core = core
        self.events = events              # handles what is not a page fault
        self.pinning = pinning            # knows the mlocked ranges, whose pages no eviction frees
        self.prefetch = prefetch          # a policies.GuardedPrefetch
        self.spin = spin
        self._pending: list[tuple[int, int]] = []         # page faults to serve: (address, flags)
        self.events_read = 0                              # messages read that were not page faults
        self._fill = PageBuffer(MAX_FILL_PAGES)
        self._zeros = PageBuffer(1)
        self._one_slot = np.zeros(1, np.int32)                 # _fill_one's backend read
        self._one_addr = self._fill.addrs(np.zeros(1, np.int64))
        self.fast = FastPath(core, spin, enabled=fast_path, prefetch=prefetch)   # the common case in C (fastpath.py)
        self.asleep_since: float | None = None   # when the loop last went to sleep, while it sleeps
        # Joint rounds (joint.py): the daemon's, where this loop may serve
        # beside other targets' (None: alone); the loop's state as a round
        # sees it: asleep on the uffd (a scope that wakes it), paused
        # between two rounds, what a round led by another served for it
        # (outcome and windows, or the exception to raise), and when its
        # calls last read the swap file.
        self.joint = joint
        self._sleep_scope: trio.CancelScope | None = None
        self.paused = False
        self._carried = None
        self.file_reads_at = -1e9
        self.task = None

    # ---- the loop -------------------------------------------------------------
    async def run(self) -> None:
        reads = self.core.reads
        self.task = trio.lowlevel.current_task()   # (a joint round tells it from other runnable tasks)
        if self.joint is not None:
            self.joint.add(self)
        try:
            while True:
                await reads.enter()   # not while the agent moves pages out (readgate.py)
                try:
                    wait = await self._round()
                finally:
                    reads.leave()
                if wait is not None:
                    await wait()
        except TargetGone:
            self.core.gone = True
        finally:
            if self.joint is not None:
                self.joint.remove(self)

    async def _round(self):
        """Read and serve what is queued. Returns what to wait for before
        the next round (None: go on at once)."""
        if self._carried is not None or (not self._pending and self.fast.ready()):
            outcome, wanted = self._serve_round()
            await self._prefetch_now(wanted)
            if outcome == FAST_HANDOFF:
                self.drain()
                return None
            if outcome == FAST_IDLE and not self._pending:   # (the prefetch may have read faults)
                self.core.stats.fault_loop_sleeps += 1
                return self._sleep
            return self._pause
        if not self.drain() and not self._pending and not self._spin():
            self.core.stats.fault_loop_sleeps += 1
            return self._sleep
        if self._pending:
            await self._serve_pending()
            # The other tasks (the evictor, other targets) run now,
            # while the woken threads run, not between a fault's
            # read and its copy (a sync read yields nowhere).
            return self._pause
        return None

    def _serve_round(self) -> tuple[int, list]:
        """The C call's round (or a joint round's, or what one led by
        another target served for this one): its outcome and the prefetch
        windows asked for. The handoff batch is taken before anything
        reads the uffd again."""
        if self._carried is not None:
            carried, self._carried = self._carried, None
            if isinstance(carried, BaseException):
                raise carried
            return carried
        joined = self.joint.run(self) if self.joint is not None else None
        if joined is not None:
            return joined
        outcome, wanted = self._serve_fast()
        self._call_over(outcome)
        return outcome, wanted

    def _call_over(self, outcome: int) -> None:
        """After a call was settled: note whether it read the swap file,
        and take its handoff before anything reads the uffd again."""
        if self.fast.file_reads:
            self.file_reads_at = time.monotonic()
        if outcome == FAST_HANDOFF:
            self._take_batch(self.fast.handoff)

    def reads_files_lately(self, now: float) -> bool:
        """Whether its calls read the swap file lately: its faults wait on
        the device, and a joint round keeps their reads in flight beside
        other targets'. (Faults that wait on no device, fresh pages or a
        memory tier's, are served faster alone: a call in the background
        sleeps between faults, where one in the foreground spins; first
        touches of 4 processes took 1.08-1.16x the time in joint rounds.)"""
        return now - self.file_reads_at < JOIN_RECENT_SECONDS

    async def _pause(self) -> None:
        """Let the other tasks run (a joint round may serve this loop's
        target meanwhile)."""
        self.paused = True
        try:
            await trio.lowlevel.checkpoint()
        finally:
            self.paused = False

    async def _sleep(self) -> None:
        """Until the uffd has something (or a joint round wakes the loop).
        Meanwhile the target's maps scan may give the staging buffers'
        memory back (release_buffers)."""
        self.asleep_since = time.monotonic()
        try:
            with trio.CancelScope() as self._sleep_scope:
                await self.core.uffd.wait_readable()
        finally:
            self._sleep_scope = None
            self.asleep_since = None

    # ---- joint rounds (joint.py) ---------------------------------------------
    def joinable(self, now: float) -> bool:
        """Whether a round led by another target may serve this one's faults
        now: the loop is parked (asleep or paused) with nothing of its own
        to do, read the swap file lately, and may read its uffd (no move
        out holds its gate)."""
        return ((self._sleep_scope is not None or self.paused) and self._carried is None and not self._pending
                and self.reads_files_lately(now) and not self.core.gone
                and not self.core.reads.held and self.fast.ready() and self.fast.has_background())

    def wake_to_join(self) -> None:
        """A round takes this loop's target: an asleep loop is woken (its
        uffd leaves the event loop's epoll set, which the round watches);
        it runs once the round is over, and goes on from what the round
        served for it (carry())."""
        if self._sleep_scope is not None:
            self._sleep_scope.cancel()
            self._sleep_scope = None
            self.asleep_since = None
        self.paused = False

    def settle_joined(self, outcome: int) -> tuple[int, list]:
        """A round's call for this target is over: settle it and take its
        handoff, as _serve_round() does. A call stopped with nothing
        served counts as idle (the loop sleeps on)."""
        wanted = self._settle_fast()
        self._call_over(outcome)
        if outcome != FAST_HANDOFF and not self.fast.served:
            outcome = FAST_IDLE
        return outcome, wanted

    def carry(self, carried) -> None:
        """What a round led by another target served for this one
        (settle_joined()'s, or an exception for this loop to raise)."""
        self._carried = carried

    def release_buffers(self) -> None:
        """The staging buffers' memory goes back: only while the loop is
        asleep (asleep_since), when no call and no backend read uses them
        (a round waits for its reads, and for a call in the background
        to end)."""
        self._fill.release()
        self.fast.release_buffers()

    def _serve_fast(self) -> tuple[int, list[tuple[int, np.ndarray]]]:
        """Serve plain faults in C, settling each call's log while the next
        call serves in the background where it may (fastpath.py). Returns
        the last call's outcome and the windows the prefetch policy asked
        for, with the fault each is for."""
        fast = self.fast
        # A program kept on one CPU, its pages in memory: the call serves
        # on that CPU, in the background thread, and this one waits.
        beside = fast.colocated()
        finish = fast.finish_beside if beside else fast.finish_background
        if beside:
            fast.serve_in_background()
            outcome = self._settled_if_failed(finish)
        else:
            outcome = self._settled_if_failed(fast.serve)
        windows = []
        while fast.may_overlap(outcome):
            fast.serve_in_background()
            try:
                more = self._settle_fast()
            except BaseException:
                finish(stop=True)   # nothing may go on beside what handles it
                raise
            windows += more
            # It goes on while nothing else is waiting for this thread: the
            # pages the prefetch policy just asked for are to come in at
            # once, and the evictor, woken as the log was settled, to run.
            outcome = self._settled_if_failed(finish, stop=bool(more) or others_waiting())
        windows += self._settle_fast()
        return outcome, windows

    def _settled_if_failed(self, call, **options) -> int:
        """A C call's outcome; if its read of the uffd failed partway, what
        it served before is settled first (its pages are RESIDENT in the
        table already, and the slots they gave up are free only once the
        allocator hears of them)."""
        try:
            return call(**options)
        except uffdmod.UffdError:
            self._settle_fast()
            raise

    def _spin(self) -> bool:
        """Busy-poll briefly: on a VM the wake-up of a sleeping daemon costs
        more than serving the fault."""
        deadline = time.perf_counter() + self.spin
        while time.perf_counter() < deadline:
            if self.drain():
                return True
        return False

    def drain(self) -> bool:
        """Read every queued message: queue faults, handle the other events.
        True when anything was read."""
        got = False
        while True:
            n = self.core.uffd.read_batch(MAX_EVENTS_PER_READ, REMOVE_LINGER_SECONDS)
            if not n:
                return got
            got = True
            self._take_batch(n)

    def _take_batch(self, n: int) -> None:
        """Queue the faults and handle the events of the n messages read."""
        events = self._walk_batch(n)
        self.events_read += len(events)
        self.events.handle_all(events)
        self.core.uffd.clear_batch(n)   # handled: nothing to replay after a crash (tablefile.EventJournal)

    def _walk_batch(self, n: int) -> list:
        """Queue the page faults of the n messages just read (in place, in
        uffd.batch) as (address, flags); return the other events, typed.
        They are handled only after the walk: a handler may read the uffd
        again, which reuses the buffer."""
        uffd = self.core.uffd
        words, queue = uffd.batch, self._pending.append
        events = []
        for i in range(0, n * MSG_WORDS, MSG_WORDS):
            if words[i] & 0xFF == EVENT_PAGEFAULT:
                queue((words[i + W_ADDRESS], words[i + W_FLAGS]))
            else:
                events.append(uffd.batch_event(i // MSG_WORDS))
        return events

    # ---- page faults ------------------------------------------------------------
    def _settle_fast(self) -> list[tuple[int, np.ndarray]]:
        """After the C call served faults: their bookkeeping, then the
        prefetch policy hears of its hits and of each fault. Returns the
        windows it asked for, with their faults, to bring in at once
        (fastpath.py)."""
        vpns, hits = self.fast.settle()
        for vpn in hits:
            self.prefetch.on_prefetch_hit(vpn)
        if not vpns:
            return []
        windows = [(vpn, self.core.fill_budget.window(vpn, window))
                   for vpn, window in self.prefetch.on_faults(self.fast.with_bounds(vpns))]
        for vpn, window in windows:
            self.fast.prefetching(vpn, window)
        return windows

    async def _prefetch_now(self, windows: list[tuple[int, np.ndarray]]) -> None:
        """Bring in at once the pages the prefetch policy asked for after
        faults the C call served (those nearest their faults where not all
        fit under the budget): the swapped ones in C too, the rest (fresh
        pages, what C left) here."""
        core = self.core
        if not windows or not core.fill_budget.prefetch_allowed(core.pt.resident, 0):
            return
        wanted = nearest_first(windows, core.fill_budget.prefetch_room(core.pt.resident, MAX_FILL_PAGES))
        if not len(wanted):
            return
        # Fault service time, as the same pages' read and copy are when
        # they come with a fault on the full path.
        started = time.perf_counter()
        if self.fast.prefetch(wanted):
            self.core.stats.fault_batch_seconds += time.perf_counter() - started
            if not self.core.fill_budget.prefetch_allowed(self.core.pt.resident, 0):
                return
        fill: dict[int, int] = {}
        self._add_prefetch(wanted, fill)
        if fill:
            started = time.perf_counter()
            await self._fill_pages(fill, False, {})
            self.core.stats.fault_batch_seconds += time.perf_counter() - started
            self.core.note_resident()

    async def _serve_pending(self) -> None:
        started = time.perf_counter()
        faults, self._pending = self._pending, []
        fills = self._triage(faults)
        if fills:
            await self._backpressure(fills)
            await self._serve_fills(fills)
        stats = self.core.stats
        elapsed = time.perf_counter() - started
        stats.fault_batch_seconds += elapsed
        stats.record_latency(elapsed, len(faults))
        self.core.note_resident()

    def _triage(self, faults: list[tuple[int, int]]) -> dict[int, bool]:
        """Serve at once the faults that bring in no content (WP faults,
        pages believed resident or being evicted); return the others as
        {vpn: is_write}, de-duplicated."""
        pt, stats = self.core.pt, self.core.stats
        self.core.trace.faults(pt, faults)
        fills: dict[int, bool] = {}
        for address, flags in faults:
            vpn = address >> PAGE_SHIFT
            state = pt.state_of(vpn)
            if flags & UFFD_PAGEFAULT_FLAG_WP:
                stats.faults_wp += 1
                if state in UNCOUNTED:
                    fills[vpn] = True  # it will count against the budget: held back like a new page
                else:
                    self._on_wp_fault(vpn, state)
                continue
            stats.faults_missing += 1
            if state == State.ZERO:  # its zero-page mapping went away: fill it anew
                pt.set_state(vpn, State.FRESH)
                state = State.FRESH
            if state in ABSENT:
                fills[vpn] = fills.get(vpn, False) or bool(flags & UFFD_PAGEFAULT_FLAG_WRITE)
            elif state == State.ZAPPING:  # woken when its zap completes, then refaults
                self.core.zap_waiters.add(vpn)
            else:
                self._serve_absent(vpn, state)
        return fills

    def _serve_absent(self, vpn: int, state: int) -> None:
        """A MISSING fault on a page believed resident, being evicted, or
        unknown. Most are stale: threads that faulted on one absent page
        each queue a message, and the first fill wakes them all, so the
        others' messages are read once the page is present (and may be
        EVICTING by then). A COPY onto it answers EEXIST and changes
        nothing. A page absent indeed (the kernel reclaimed a MADV_FREE
        page) gets zeros, as the kernel would give, and its clean copy no
        longer holds what it reads. Dropping that copy on a stale message
        lost the page: a clean page is taken out without being read, so
        without its copy it left as zeros."""
        mode = uffdmod.UFFDIO_COPY_MODE_WP if state == State.EVICTING else 0
        address = vpn << PAGE_SHIFT
        err = self._retry_eagain(lambda: uffdmod.unpack(
            self.core.uffd.copy_fast(address, self._zeros.addr, PAGE_SIZE, mode))[1])
        if err == 0:
            self.core.drop_clean_copies(np.array([vpn], np.int64))
        self.core.uffd.wake(address, PAGE_SIZE)

    def _on_wp_fault(self, vpn: int, state: int) -> None:
        """A write to a write-protected page: it wins, unless the page's zap
        is in flight (then the writer stays blocked until the zap is done,
        and refaults on the copy: docs/architecture.md, "Race rules")."""
        core = self.core
        if state == State.ZAPPING:
            core.zap_waiters.add(vpn)
            return
        if state in UNCOUNTED:  # the write gives it a page of its own: count it
            core.pt.set_state(vpn, State.RESIDENT)
            core.became_resident(np.array([vpn], np.int64))
        if state == State.EVICTING:
            core.stats.eviction_cancelled += 1
            core.pt.set_state(vpn, State.RESIDENT)
            core.became_resident(np.array([vpn], np.int64))
        if state != State.UNMAPPED:
            core.pt.clear_flag(vpn, Flag.DISCARDABLE)  # application hints: a write cancels DISCARDABLE
            clustered = core.pt.clear_flag(vpn, Flag.CLUSTERED)
            if clustered:
                self.fast.cluster_hit()
            if core.pt.clear_flag(vpn, Flag.PREFETCHED):
                core.stats.prefetch_hits += 1
                self.prefetch.on_prefetch_hit(vpn)
            if core.pt.slot_of(vpn) != NO_SLOT:  # a kept clean copy: the write makes it stale
                core.drop_clean_copies(np.array([vpn], np.int64))
                if not clustered:   # (always kept: not one of the copies CleanCopies measures)
                    core.clean.dirtied()
        self._retry_eagain(lambda: core.uffd.writeprotect(vpn << PAGE_SHIFT, PAGE_SIZE, False))

    def _retry_eagain(self, ioctl) -> int:
        """Run an ioctl returning an errno, reading queued events while it
        answers EAGAIN (the fault loop is the task that reads them)."""
        while True:
            err = ioctl()
            if err != errno.EAGAIN:
                return err
            self.drain()

    async def _backpressure(self, fills: dict[int, bool]) -> None:
        """At the budget, new pages wait for the evictor. Meanwhile events
        are read (the evictor's zap waits on its REMOVE events) and every
        fault that adds no page is served: the evictor's own
        process_vm_readv may be waiting on one."""
        core = self.core
        if not self._must_wait_for_eviction() or self.pinning.all_locked(fills):
            # Pages of an mlocked range would only wait for an eviction
            # round that pins them (mlock's populate faults them one at a
            # time: 2 ms each, 27x a plain run's time for 48 MiB).
            return
        started = time.monotonic()
        deadline = started + BACKPRESSURE_LIMIT
        while self._must_wait_for_eviction() and time.monotonic() < deadline:
            core.want_eviction()
            core.reads.leave()   # the evictor may move pages out meanwhile
            await core.evicted.wait(core.uffd.wait_readable, BACKPRESSURE_POLL)
            await core.reads.enter()
            self.drain()
            faults, self._pending = self._pending, []
            for vpn, is_write in self._triage(faults).items():
                fills[vpn] = fills.get(vpn, False) or is_write
        core.stats.fault_wait_seconds += time.monotonic() - started

    def _must_wait_for_eviction(self) -> bool:
        core = self.core
        return core.budget.full(core.pt.resident) and core.can_evict() and not core.no_victims

    # ---- fills ----------------------------------------------------------------
    async def _serve_fills(self, fills: dict[int, bool]) -> None:
        """Bring in the faulting FRESH/SWAPPED pages and what the prefetch
        policy adds, in one backend read and few UFFDIO_COPYs."""
        pt = self.core.pt
        fill: dict[int, int] = {}          # vpn -> slot (NO_SLOT: zeros)
        writes = False
        absent = []
        for vpn, is_write in sorted(fills.items()):
            state = pt.state_of(vpn)
            if state in UNCOUNTED:
                self._on_wp_fault(vpn, state)  # a write to a ZERO or SHARED page, held back until now
                continue
            if state not in ABSENT:
                self.core.uffd.wake(vpn << PAGE_SHIFT, PAGE_SIZE)  # moved or unmapped while we waited
                continue
            if len(absent) == MAX_FILL_PAGES:   # the staging buffer is full: next round
                self._pending.append((vpn << PAGE_SHIFT, UFFD_PAGEFAULT_FLAG_WRITE if is_write else 0))
                continue
            writes |= is_write
            absent.append(vpn)
            self._plan_fault(vpn, state, fill)
        # Then the windows, in the room the faulting pages leave: a window
        # (up to MAX_FILL_PAGES) must never crowd out another thread's fault.
        for vpn in absent:
            self._plan_prefetch(vpn, fill)
        if len(fill) == 1:
            (vpn, slot), = fill.items()
            await self._fill_one(vpn, slot, writes, fills)
        elif fill and not await self._fill_window_in_c(fill, writes, fills):
            await self._fill_pages(fill, writes, fills)

    async def _fill_window_in_c(self, fill: dict[int, int], writes: bool, faulting: dict[int, bool]) -> bool:
        """One faulting page and the window the prefetch policy asked for
        with it (a stream's next): the window comes in through C first
        (FastPath.prefetch: its pages are in place when the program wakes;
        what C leaves is not brought, prefetch being optional), with the
        faulting page's read in flight beside the window's, then the
        faulting page on its own. False when the C call cannot be made or
        brings nothing and reads nothing (a store C cannot read: Redis, a
        plug-in; a read fault's window of fresh pages), and _fill_pages
        brings the window, reading it in one batch."""
        first = [vpn for vpn in fill if vpn in faulting]
        if len(first) != 1 or not self.fast.ready():
            return False
        vpn = first[0]
        window = np.fromiter(sorted(page for page in fill if page != vpn), np.int64, len(fill) - 1)
        started = time.perf_counter()
        # (Its read after the window's waited out a device round trip of
        # its own, often behind eviction writes: node's heap under
        # --min-region 256K, 290 us a fault.)
        also = (fill[vpn], self._fill.addr) if fill[vpn] != NO_SLOT else None
        brought = self.fast.prefetch(window, fresh=writes, also=also)
        self.core.stats.fault_read_seconds += time.perf_counter() - started
        read = self.fast.read_alongside()
        if not brought and not read:
            return False
        self.core.stats.read_with_window += read
        await self._fill_one(vpn, fill[vpn], writes, faulting, read=not read)
        return True

    async def _fill_one(self, vpn: int, slot: int, write: bool, faulting: dict[int, bool], read: bool = True) -> None:
        """_fill_pages for one page with nothing prefetched (random access):
        the same steps on plain integers, without numpy's per-call cost.
        Without `read`, its slot's page is in the staging buffer already."""
        core, pt = self.core, self.core.pt
        planned = State.SWAPPED if slot != NO_SLOT else State.FRESH
        keep = slot != NO_SLOT and not write and core.clean.keep()   # comes in clean, keeps its slot
        if slot != NO_SLOT:
            self._one_slot[0] = slot
            if read:
                started = time.perf_counter()
                with core.fill_reads:  # WILLNEED hints wait for it
                    await io_to_the_end(core.backend.read, self._one_slot, self._one_addr)
                core.stats.fault_read_seconds += time.perf_counter() - started
        elif write:
            self._fill.bytes[:PAGE_SIZE] = 0
        if pt.state_of(vpn) != planned or pt.slot_of(vpn) != slot:
            self._retry_faulting(faulting, ())  # events changed it while we read
            return
        started = time.perf_counter()
        zeros = planned == State.FRESH and not write
        # The common case in one ioctl; copy_run() deals with EAGAIN, EEXIST and ENOENT.
        mode = uffdmod.UFFDIO_COPY_MODE_WP if keep else 0
        if zeros:
            done = not core.uffd.zeropage_fast(vpn << PAGE_SHIFT, PAGE_SIZE)
        else:
            done = not core.uffd.copy_fast(vpn << PAGE_SHIFT, self._fill.addr, PAGE_SIZE, mode)
        if not done:
            done = self.core.copy_run(vpn, 1, self._fill.addr, zeros=zeros, protect=keep,
                                      on_eagain=self._drain_and_go_on)[0][0]
        core.stats.fault_copy_seconds += time.perf_counter() - started
        if not done or pt.state_of(vpn) != planned or pt.slot_of(vpn) != slot:
            self._retry_faulting(faulting, ())
            return
        pt.set_state(vpn, State.RESIDENT, slot if keep else NO_SLOT)
        if slot != NO_SLOT:
            if keep:
                core.clean.came_in_clean(1)
            else:
                core.slots.free_one(slot)
            core.refaulted(np.array([vpn], np.int64), self._one_slot)
            core.stats.pages_in += 1
        core.became_resident(np.array([vpn], np.int64))

    def _plan_fault(self, vpn: int, state: int, fill: dict[int, int]) -> None:
        fill[vpn] = self.core.pt.slot_of(vpn)
        if state == State.SWAPPED:
            self.core.stats.faults_swapped += 1
        else:
            self.core.stats.faults_fresh += 1

    def _plan_prefetch(self, vpn: int, fill: dict[int, int]) -> None:
        """What the prefetch policy asks for on the fault at vpn, planned
        where there is room."""
        core, pt = self.core, self.core.pt
        first, end = pt.bounds(vpn)
        # The policy hears of every fault (as from the C fast path, and in an
        # offline replay), a window or not: its streams follow the faults.
        asked = self.prefetch.on_fault(vpn, first, end)
        if len(fill) >= MAX_FILL_PAGES or not core.fill_budget.prefetch_allowed(pt.resident, len(fill)):
            return
        extra = core.fill_budget.window(vpn, asked)
        if len(extra):
            self.fast.prefetching(vpn, extra)
        self._add_prefetch(extra, fill, vpn)

    def _add_prefetch(self, extra: np.ndarray, fill: dict[int, int], vpn: int | None = None) -> None:
        """Plan the fill of the pages the prefetch policy asked for that
        are absent, up to the staging buffer's size and the budget (the
        pages nearest the fault at vpn where not all fit)."""
        if len(extra) == 0:
            return
        core, pt = self.core, self.core.pt
        states = pt.states(extra)
        extra = extra[(states == State.FRESH) | (states == State.SWAPPED)]
        # A window (up to 256 pages) never takes the target past its budget.
        room = max(core.fill_budget.prefetch_room(pt.resident + len(fill), MAX_FILL_PAGES - len(fill)), 0)
        if vpn is not None and room < len(extra):
            extra = nearest_first([(vpn, extra)], room)
        slots = pt.slots(extra)
        for page, slot in zip(extra[:room].tolist(), slots.tolist()):
            if page not in fill:
                fill[page] = slot

    async def _fill_pages(self, fill: dict[int, int], writes: bool, faulting: dict[int, bool]) -> None:
        core, pt = self.core, self.core.pt
        vpns = np.fromiter(sorted(fill), np.int64, len(fill))
        slots = np.fromiter((fill[v] for v in vpns.tolist()), np.int32, len(fill))
        swapped = slots != NO_SLOT
        positions = np.arange(len(vpns))
        if swapped.any():
            started = time.perf_counter()
            with core.fill_reads:  # WILLNEED hints wait for it
                await io_to_the_end(core.backend.read, slots[swapped], self._fill.addrs(positions[swapped]))
            core.stats.fault_read_seconds += time.perf_counter() - started
        if not swapped.all():
            self._fill.clear(positions[~swapped])
        # Events read while we waited may have changed these pages: fill only
        # those still as planned.
        planned = np.where(swapped, State.SWAPPED, State.FRESH)
        valid = (pt.states(vpns) == planned) & (pt.slots(vpns) == slots)
        started = time.perf_counter()
        done, clean = self._copy_in(vpns, swapped, valid, writes, faulting)
        core.stats.fault_copy_seconds += time.perf_counter() - started
        # An app REMOVE read while copying (EAGAIN) has already settled the
        # pages it names: FRESH, slot freed. Only the others become ours.
        done &= (pt.states(vpns) == planned) & (pt.slots(vpns) == slots)
        self._settle_filled(vpns, slots, swapped, done, clean, faulting)

    def _copy_in(self, vpns, swapped, valid, writes: bool, faulting: dict[int, bool]):
        """UFFDIO_COPY the planned runs that are still valid. Returns which
        pages are in place, and which came in write-protected with their
        slot kept (clean)."""
        done = np.zeros(len(vpns), bool)
        clean = np.zeros(len(vpns), bool)
        keep_clean = self.core.clean.keep()
        for run_vpn, seg in runs_faulting_last(vpns, faulting):
            if not valid[seg].all():
                continue
            zeros = not writes and not swapped[seg].any()
            for part_vpn, part_len, keep in clean_parts(run_vpn, swapped[seg], faulting, keep_clean):
                at = seg.start + part_vpn - run_vpn
                part = slice(at, at + part_len)
                done[part], copied, stopped = self.core.copy_run(
                    part_vpn, part_len, self._fill.addr + (at << PAGE_SHIFT), zeros=zeros, protect=keep,
                    on_eagain=self._drain_and_go_on)
                clean[part] = copied & keep
                if stopped:   # (the runs' validity is of before the event)
                    return done, clean
        return done, clean

    def _drain_and_go_on(self) -> bool:
        """A copy answered EAGAIN: a short copy stopped by a present page
        (the next try answers EEXIST: go on), or an event queued. An event
        read here may have changed the pages still to be copied (the app's
        discard makes them FRESH), and the kernel no longer holds copies
        back once it is read: the app's MADV_DONTNEED empties the range
        after, so a copy going on could land after it, and the app would
        read the old page where it asked for zeros. So after an event the
        fill stops; its faults go round again with fresh state."""
        events = self.events_read
        self.drain()
        return self.events_read == events

    def _settle_filled(self, vpns, slots, swapped, done, clean, faulting: dict[int, bool]) -> None:
        core, pt = self.core, self.core.pt
        filled = vpns[done]
        if len(filled):
            clean &= done & swapped
            core.clean.came_in_clean(int(clean.sum()))
            core.slots.free(slots[done & swapped & ~clean])
            pt.set(filled, State.RESIDENT, np.where(clean, slots, NO_SLOT)[done])
            prefetched = np.fromiter((v not in faulting for v in filled.tolist()), bool, len(filled))
            refault = ~prefetched & swapped[done]
            core.refaulted(filled[refault], slots[done][refault])
            pt.set_flag(filled[prefetched], Flag.PREFETCHED)
            # (Counted as they come, never as planned: a counter taken back
            # between two scrapes reads as a reset to Prometheus.)
            core.stats.prefetched += int(prefetched.sum())
            core.became_resident(filled)
            core.stats.pages_in += int((done & swapped).sum())
        self._retry_faulting(faulting, filled.tolist())

    def _retry_faulting(self, faulting: dict[int, bool], filled) -> None:
        """A faulting page we could not fill goes round again with fresh state."""
        for vpn in set(faulting) - set(filled):
            if self.core.pt.state_of(vpn) in ABSENT:
                self._pending.append((vpn << PAGE_SHIFT, 0))

    def close(self) -> None:
        self._fill.close()
        self._zeros.close()
        self.fast.close()


def runs_faulting_last(vpns: np.ndarray, faulting: dict[int, bool]) -> list[tuple[int, slice]]:
    """The runs of sorted vpns as (first vpn, slice of vpns), those with a
    faulting page last: UFFDIO_COPY wakes a run's waiters when it returns,
    so a program woken last finds its prefetched pages (a stride's are
    one-page runs) in place instead of faulting on them."""
    if len(vpns) == 1:
        return [(int(vpns[0]), slice(0, 1))]
    starts, lengths = runs(vpns)
    ends = np.cumsum(lengths)
    spans = [(int(v), slice(int(e - n), int(e))) for v, n, e in zip(starts, lengths, ends)]

    def has_faulting(span: tuple[int, slice]) -> bool:
        first, seg = span
        return any(v in faulting for v in range(first, first + seg.stop - seg.start))
    return sorted(spans, key=has_faulting)


def clean_parts(vpn: int, swapped: np.ndarray, faulting: dict[int, bool],
                keep_clean: bool) -> list[tuple[int, int, bool]]:
    """Split a run of len(swapped) pages from `vpn` into (vpn, npages,
    keep_clean) parts. With keep_clean, swapped pages come in
    write-protected and keep their slot (evicting them again is a zap
    only); pages that were not swapped (zeros) come in writable. A write
    fault in the run: all writable (the program writes what it reads)."""
    npages = len(swapped)
    if not keep_clean or not swapped.any() or any(faulting.get(v, False) for v in range(vpn, vpn + npages)):
        return [(vpn, npages, False)]
    protect = swapped
    edges = np.flatnonzero(np.diff(protect)) + 1
    bounds = [0, *edges.tolist(), npages]
    return [(vpn + a, b - a, bool(protect[a])) for a, b in zip(bounds[:-1], bounds[1:])]
