"""One managed process: its uffd, page table, fault service and eviction.

Two trio tasks per target share the page table without locks (trio runs one
task at a time; state is only changed between awaits):
- the fault loop reads uffd messages in batches (in place, uffd.read_batch),
  handles the non-cooperative events (REMOVE, UNMAP, REMAP, FORK) of each
  batch in order once it has been walked, and serves the page faults;
- the evictor (umgr/evictor.py) keeps resident pages under the budget:
  write-protect victims, read them, store them, zap them.

Target is this module's fault service plus three mixins, one file each:
Evictor (umgr/evictor.py), Unfreeable (umgr/unfreeable.py: pages whose zap
would free nothing) and Hints (umgr/advice.py: umgr_advise). The knobs are
in umgr/tuning.py. The kernel facts and race rules behind the code are in
shared/DESIGN.md ("Paging out", "Paging in").
"""
from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import trio

from umgr.kernel import procmem, uffd as uffdmod
from umgr.paging.advice import Hints
from umgr.backends import io_to_the_end
from umgr.kernel.buffers import PageBuffer
from umgr.errors import TargetGone
from umgr.paging.evictor import Evictor
from umgr.paging.pagetable import NO_SLOT, PAGE_SHIFT, PAGE_SIZE, Flag, PageTable, State, runs
from umgr.paging.tuning import BACKPRESSURE_LIMIT, EVICT_BATCH, KEEP_CLEAN_COPIES, MAX_FILL_PAGES, SPIN_SECONDS
from umgr.paging.pinning import Unfreeable
from umgr.kernel.uffd import (EVENT_PAGEFAULT, MSG_WORDS, UFFD_PAGEFAULT_FLAG_WP, UFFD_PAGEFAULT_FLAG_WRITE,
                       W_ADDRESS, W_FLAGS, ForkEvent, RemapEvent, RemoveEvent, UnmapEvent)

log = logging.getLogger("umgr.paging.target")

REGISTER_MODE = uffdmod.UFFDIO_REGISTER_MODE_MISSING | uffdmod.UFFDIO_REGISTER_MODE_WP
LATENCY_BUCKETS = (5e-6, 10e-6, 20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 5e-3, 20e-3, 100e-3)


@dataclass
class TargetStats:
    faults_missing: int = 0
    faults_wp: int = 0
    faults_fresh: int = 0
    faults_swapped: int = 0
    pages_in: int = 0
    pages_out: int = 0
    prefetched: int = 0
    zero_pages_out: int = 0
    zap_batches: int = 0
    zap_ranges: int = 0
    own_removes: int = 0
    app_removes: int = 0
    unmaps: int = 0
    remaps: int = 0
    forks: int = 0
    eviction_cancelled: int = 0
    zero_mapped: int = 0          # victims found on the zero page (made ZERO, not evicted)
    shared_skipped: int = 0       # victims found shared copy-on-write (made SHARED)
    locked_pinned: int = 0        # victims found mlocked (pinned)
    backend_errors: int = 0
    peak_resident: int = 0
    hint_cold: int = 0            # application hints received (umgr_advise)
    hint_willneed: int = 0
    hint_discardable: int = 0
    cold_evicted: int = 0         # pages a COLD hint sent to eviction
    willneed_in: int = 0          # pages a WILLNEED hint brought in
    discarded: int = 0            # DISCARDABLE pages dropped instead of written
    fault_latency: np.ndarray = field(default_factory=lambda: np.zeros(len(LATENCY_BUCKETS) + 1, np.int64))
    fault_latency_sum: float = 0.0


class Target(Evictor, Unfreeable, Hints):
    def __init__(self, *, pid: int, uffd: uffdmod.Userfaultfd, pidfd: int, budget_pages: int,
                 backend, prefetch, eviction, label: str, spin: float = SPIN_SECONDS,
                 keep_clean: bool = KEEP_CLEAN_COPIES):
        self.pid = pid
        self.uffd = uffd
        self.pidfd = pidfd
        self.budget_pages = budget_pages
        self.backend = backend
        self.prefetch = prefetch
        self.eviction = eviction
        self.label = label
        self.spin = spin
        self.keep_clean = keep_clean    # prefetched pages keep their slot (tuning.KEEP_CLEAN_COPIES)
        self.pt = PageTable()
        self.stats = TargetStats()
        self.zapper = None              # set when the agent attaches (or remote zap)
        self.gone = False
        self.eviction_paused = ""       # why eviction cannot run now, "" if it can
        self.no_victims = False         # the evictor's last try found nothing to evict
        self.locked: list[tuple[int, int]] = []   # mlocked vpn ranges: pinned
        self.unreadable: list[tuple[int, int]] = []   # PROT_NONE (...) vpn ranges: pinned
        self._rechecked = 0.0
        self.command = read_cmdline(pid)
        self.started = time.monotonic()
        self._pending: list[tuple[int, int]] = []   # page faults to serve: (address, flags)
        # The zap in flight: its pages (sorted vpns), how many REMOVE events
        # have covered each, and the (lo, hi) vpn ranges of those events.
        self._zap_vpns: np.ndarray | None = None
        self._zap_hits = np.zeros(0, np.uint8)
        self._zap_removes: list[tuple[int, int]] = []
        self._fill = PageBuffer(MAX_FILL_PAGES)
        self._zeros = PageBuffer(MAX_FILL_PAGES)
        self._victims = PageBuffer(EVICT_BATCH)
        self._evict_wanted = trio.Event()
        self._waiting: trio.CancelScope | None = None   # fault loop waiting for eviction
        self.fork_events: list[uffdmod.Userfaultfd] = []   # child uffds waiting for their pid
        self.cancel_scope: trio.CancelScope | None = None   # set by the daemon while running
        self._init_hints()   # application hints (end of the class)

    # ---- budget --------------------------------------------------------
    @property
    def high_water(self) -> int:
        return self.budget_pages - max(self.budget_pages // 16, 16) if self.budget_pages else 0

    @property
    def low_water(self) -> int:
        return self.budget_pages - max(self.budget_pages // 8, min(EVICT_BATCH, self.budget_pages // 2)) \
            if self.budget_pages else 0

    def over_budget(self) -> bool:
        return bool(self.budget_pages) and self.pt.resident > self.high_water

    def _note_resident(self) -> None:
        resident = self.pt.resident
        if resident > self.stats.peak_resident:
            self.stats.peak_resident = resident
        if self.over_budget():
            self._evict_wanted.set()

    def resident_vpns(self) -> np.ndarray:
        return np.concatenate([r.vpn + np.flatnonzero(r.state == State.RESIDENT) for r in self.pt.regions]
                              or [np.empty(0, np.int64)]).astype(np.int64)

    def is_resident(self, vpns: np.ndarray) -> np.ndarray:
        """For the eviction policy's compaction: vpns in any order."""
        order = np.argsort(vpns, kind="stable")
        live = np.empty(len(vpns), bool)
        live[order] = self.pt.states(np.asarray(vpns)[order]) == State.RESIDENT
        return live

    # ---- regions -------------------------------------------------------
    def register(self, start: int, length: int) -> bool:
        """Register [start, start+length) in the target's mm and manage it.
        Pages already present start RESIDENT (PAGEMAP_SCAN says which)."""
        start_vpn, npages = start >> PAGE_SHIFT, length >> PAGE_SHIFT
        # Only what no region covers is new: a covered page may be swapped
        # (e.g. moved here by mremap before a maps scan sees the mapping).
        gaps = self.pt.gaps(start_vpn, start_vpn + npages) if npages > 0 else []
        for lo, hi in gaps:
            try:
                self.uffd.register(lo << PAGE_SHIFT, (hi - lo) << PAGE_SHIFT, REGISTER_MODE)
            except TargetGone:
                raise
            except OSError as exc:
                log.debug("%s: cannot register %#x-%#x: %s", self.label, lo << PAGE_SHIFT, hi << PAGE_SHIFT, exc)
                return False
            present = self._present_pages(lo, hi - lo)
            self.pt.add(lo, hi - lo, present)
            resident = np.flatnonzero(present) + lo
            if len(resident):
                self.eviction.on_resident(resident.astype(np.int64))
        self._note_resident()
        return True

    def _present_pages(self, start_vpn: int, npages: int) -> np.ndarray:
        present = np.zeros(npages, bool)
        # category_mask requires every bit; anyof is "present or (kernel-)swapped".
        in_memory = procmem.PAGE_IS_PRESENT | procmem.PAGE_IS_SWAPPED
        ranges = procmem.pagemap_scan(self.pid, start_vpn << PAGE_SHIFT, (start_vpn + npages) << PAGE_SHIFT,
                                      0, in_memory, category_anyof=in_memory)
        for lo, hi, _ in ranges:
            present[(lo >> PAGE_SHIFT) - start_vpn:(hi >> PAGE_SHIFT) - start_vpn] = True
        return present

    # ---- fault loop ----------------------------------------------------
    async def fault_loop(self) -> None:
        try:
            while True:
                if not self._drain() and not self._pending and not self._spin():
                    await self.uffd.wait_readable()
                    continue
                if self._pending:
                    await self._serve_pending()
        except TargetGone:
            self.gone = True

    def _spin(self) -> bool:
        """Busy-poll briefly: on a VM the wake-up of a sleeping daemon costs
        more than serving the fault."""
        deadline = time.perf_counter() + self.spin
        while time.perf_counter() < deadline:
            if self._drain():
                return True
        return False

    def _drain(self) -> bool:
        """Read every queued message: queue faults, handle the other events.
        True when anything was read."""
        got = False
        while True:
            n = self.uffd.read_batch(64)
            if not n:
                return got
            got = True
            for event in self._walk_batch(n):
                self._handle_event(event)

    def _walk_batch(self, n: int) -> list:
        """Queue the page faults of the n messages just read (in place, in
        uffd.batch) as (address, flags); return the other events, typed.
        They are handled only after the walk: a handler may read the uffd
        again, which reuses the buffer."""
        uffd = self.uffd
        words, queue = uffd.batch, self._pending.append
        events = []
        for i in range(0, n * MSG_WORDS, MSG_WORDS):
            if words[i] & 0xFF == EVENT_PAGEFAULT:
                queue((words[i + W_ADDRESS], words[i + W_FLAGS]))
            else:
                events.append(uffd.batch_event(i // MSG_WORDS))
        return events

    def _handle_event(self, event) -> None:
        kind = type(event)
        if kind is RemoveEvent:
            self._on_remove(event.start, event.end)
        elif kind is UnmapEvent:
            self.stats.unmaps += 1
            log.debug("%s: unmap %#x-%#x", self.label, event.start, event.end)
            self.backend.slots.free(self.pt.remove(event.start >> PAGE_SHIFT, _page_up(event.end)))
        elif kind is RemapEvent:
            self._on_remap(event)
        elif kind is ForkEvent:
            self.stats.forks += 1
            self.fork_events.append(uffdmod.Userfaultfd(event.fd))

    def _on_remove(self, start: int, end: int) -> None:
        """A REMOVE event: our own zap's, or the app's madvise. The event
        does not say whose. Our zap covers each of its pages exactly once,
        so a page of the zap in flight covered twice was also discarded by
        the app: _zap settles it as FRESH, not SWAPPED (its copy would
        resurrect data the app threw away)."""
        lo, hi = start >> PAGE_SHIFT, _page_up(end)
        if self._zap_vpns is not None and self._count_zap_remove(lo, hi):
            self.stats.own_removes += 1
            return
        self.stats.app_removes += 1
        log.debug("%s: app discarded %#x-%#x", self.label, start, end)
        # Pages whose zap is in flight are settled by _zap (see above).
        freed = self.pt.discard(lo, hi, keep=(State.ZAPPING,))
        self.backend.slots.free(freed)

    def _count_zap_remove(self, lo: int, hi: int) -> bool:
        """Count a REMOVE against the zap in flight. True when it can only
        be ours: it lies within the zap and covers its pages for the first time."""
        # The kernel repeats the tail [vma end, end) of a REMOVE when the VMA
        # was split while madvise had dropped mmap_lock: not a second discard.
        if any(h == hi and l < lo for l, h in self._zap_removes):
            return True
        self._zap_removes.append((lo, hi))
        a, b = np.searchsorted(self._zap_vpns, [lo, hi])
        hits = self._zap_hits[a:b]
        first_time = not hits.any()
        np.minimum(hits + 1, 2, out=hits)
        return first_time and b - a == hi - lo

    def _on_remap(self, event: RemapEvent) -> None:
        """mremap moved pages (the event comes after the move is complete;
        the kernel keeps the uffd-wp bit on moved PTEs under EVENT_REMAP)."""
        self.stats.remaps += 1
        log.debug("%s: remap %#x -> %#x (%#x bytes)", self.label, event.src, event.dst, event.length)
        npages = event.length >> PAGE_SHIFT
        src, dst = event.src >> PAGE_SHIFT, event.dst >> PAGE_SHIFT
        # A maps scan may have registered the new range before this event:
        # what it recorded there is replaced by the moved pages.
        self.backend.slots.free(self.pt.move(src, dst, npages))
        moved = np.arange(dst, dst + npages, dtype=np.int64)
        states = self.pt.states(moved)
        # An eviction batch in flight names the old addresses, so the moved
        # pages leave it. EVICTING pages are still mapped: they stay resident
        # (still write-protected: a write unprotects them).
        self._release(moved[states == State.EVICTING], State.EVICTING)
        # A ZAPPING page was either emptied by the zap before the move (its
        # content is in its slot) or is still mapped (the zap, aimed at the
        # old address, misses it now). Presence at the new address tells.
        zapping = moved[states == State.ZAPPING]
        if len(zapping):
            first = int(zapping[0])
            present = self._present_pages(first, int(zapping[-1]) - first + 1)[zapping - first]
            self._release(zapping[present], State.ZAPPING)
            emptied = zapping[~present]
            slots = self.pt.slots(emptied)
            self.pt.set(emptied[slots == NO_SLOT], State.FRESH)
            self.pt.set(emptied[slots != NO_SLOT], State.SWAPPED)
        # The eviction order names pages by address: give it the new ones.
        self.eviction.on_resident(moved[self.pt.states(moved) == State.RESIDENT])

    def _must_wait_for_eviction(self) -> bool:
        return (bool(self.budget_pages) and self.pt.resident >= self.budget_pages
                and self.zapper is not None and not self.eviction_paused and not self.no_victims)

    async def _backpressure(self, fills: dict[int, bool]) -> None:
        """At the budget, new pages wait for the evictor. Meanwhile events
        are read (the evictor's zap waits on its REMOVE events) and every
        fault that adds no page is served: the evictor's own
        process_vm_readv may be waiting on one."""
        deadline = time.monotonic() + BACKPRESSURE_LIMIT
        while self._must_wait_for_eviction() and time.monotonic() < deadline:
            self._evict_wanted.set()
            with trio.move_on_after(0.005) as self._waiting:
                await self.uffd.wait_readable()
            self._waiting = None
            self._drain()
            faults, self._pending = self._pending, []
            for vpn, is_write in self._triage(faults).items():
                fills[vpn] = fills.get(vpn, False) or is_write

    async def _serve_pending(self) -> None:
        started = time.perf_counter()
        faults, self._pending = self._pending, []
        fills = self._triage(faults)
        if fills:
            await self._backpressure(fills)
            await self._serve_fills(fills)
        elapsed = time.perf_counter() - started
        self.stats.fault_latency[np.searchsorted(LATENCY_BUCKETS, elapsed)] += len(faults)
        self.stats.fault_latency_sum += elapsed * len(faults)
        self._note_resident()

    def _triage(self, faults: list[tuple[int, int]]) -> dict[int, bool]:
        """Serve at once the faults that bring in no content (WP faults,
        pages believed resident or being evicted); return the others as
        {vpn: is_write}, de-duplicated."""
        fills: dict[int, bool] = {}
        for address, flags in faults:
            vpn = address >> PAGE_SHIFT
            region = self.pt.find(vpn)
            state = region.state[vpn - region.vpn] if region else State.UNMAPPED
            if flags & UFFD_PAGEFAULT_FLAG_WP:
                self.stats.faults_wp += 1
                if state in UNCOUNTED:
                    fills[vpn] = True  # it will count against the budget: held back like a new page
                else:
                    self._on_wp_fault(vpn)
                continue
            self.stats.faults_missing += 1
            if state == State.ZERO:  # its zero-page mapping went away: fill it anew
                self.pt.set_one(region, vpn - region.vpn, State.FRESH)
                state = State.FRESH
            if state in (State.FRESH, State.SWAPPED):
                fills[vpn] = fills.get(vpn, False) or bool(flags & UFFD_PAGEFAULT_FLAG_WRITE)
            elif state != State.ZAPPING:  # ZAPPING: woken when its zap completes, then refaults
                self._serve_absent(vpn, state)
        return fills

    def _serve_absent(self, vpn: int, state: int) -> None:
        """A page believed resident (the kernel reclaimed a MADV_FREE page),
        being evicted, or unknown is absent: zeros, as the kernel would give.
        A COPY onto a page that is present after all is a harmless EEXIST."""
        mode = uffdmod.UFFDIO_COPY_MODE_WP if state == State.EVICTING else 0
        self._drop_clean_copies(np.array([vpn], np.int64))
        address = vpn << PAGE_SHIFT
        self._retry_eagain(lambda: self.uffd.copy_fast(address, self._zeros.addr, PAGE_SIZE, mode))
        self.uffd.wake(address, PAGE_SIZE)

    def _on_wp_fault(self, vpn: int) -> None:
        region = self.pt.find(vpn)
        state = region.state[vpn - region.vpn] if region else State.UNMAPPED
        if state == State.ZAPPING:
            return  # never unprotect while the zap is in flight; woken after it
        if state in UNCOUNTED:  # the write gives it a page of its own: count it
            self.pt.set_one(region, vpn - region.vpn, State.RESIDENT)
            self.eviction.on_resident(np.array([vpn], np.int64))
        if state == State.EVICTING:
            self.stats.eviction_cancelled += 1
            self.pt.set_one(region, vpn - region.vpn, State.RESIDENT)
            self.eviction.on_resident(np.array([vpn], np.int64))
        if region is not None:  # application hints: a write cancels DISCARDABLE
            region.flags[vpn - region.vpn] &= ~np.uint8(Flag.DISCARDABLE)
            if region.slot[vpn - region.vpn] != NO_SLOT:  # a kept clean copy: the write makes it stale
                self._drop_clean_copies(np.array([vpn], np.int64))
        # The write wins: unprotect (which wakes the writer).
        self._retry_eagain(lambda: self.uffd.writeprotect(vpn << PAGE_SHIFT, PAGE_SIZE, False))

    def _retry_eagain(self, ioctl) -> int:
        """Run a range ioctl, reading queued events while it answers EAGAIN.
        `ioctl` returns copy_fast()'s packed outcome or writeprotect()'s
        plain errno: either way the errno is the low 16 bits."""
        while True:
            err = ioctl() & 0xFFFF
            if err != errno.EAGAIN:
                return err
            self._drain()

    async def _serve_fills(self, fills: dict[int, bool]) -> None:
        """Bring in the faulting FRESH/SWAPPED pages and what the prefetch
        policy adds, in one backend read and few UFFDIO_COPYs."""
        fill: dict[int, int] = {}          # vpn -> slot (NO_SLOT: zeros)
        writes = False
        for vpn, is_write in sorted(fills.items()):
            region = self.pt.find(vpn)
            if region is not None and region.state[vpn - region.vpn] in UNCOUNTED:
                self._on_wp_fault(vpn)  # a write to a ZERO or SHARED page, held back until now
                continue
            if region is None or region.state[vpn - region.vpn] not in (State.FRESH, State.SWAPPED):
                self.uffd.wake(vpn << PAGE_SHIFT, PAGE_SIZE)  # moved or unmapped while we waited
                continue
            writes |= is_write
            self._plan_fill(region, vpn, fill)
        if fill:
            await self._fill_pages(fill, writes, fills)

    def _plan_fill(self, region, vpn: int, fill: dict[int, int]) -> None:
        if len(fill) >= MAX_FILL_PAGES:
            return
        fill[vpn] = int(region.slot[vpn - region.vpn])
        if region.state[vpn - region.vpn] == State.SWAPPED:
            self.stats.faults_swapped += 1
        else:
            self.stats.faults_fresh += 1
        if self.budget_pages and self.pt.resident + len(fill) >= self.budget_pages:
            return  # no prefetch over budget: it would only be evicted again
        extra = self.prefetch.on_fault(vpn, region.vpn, region.end)
        if len(extra) == 0:
            return
        extra = extra[(extra >= region.vpn) & (extra < region.end)]
        states = region.state[extra - region.vpn]
        extra = extra[(states == State.FRESH) | (states == State.SWAPPED)]
        for page in extra[: MAX_FILL_PAGES - len(fill)]:
            page = int(page)
            if page not in fill:
                fill[page] = int(region.slot[page - region.vpn])
                self.stats.prefetched += 1

    async def _fill_pages(self, fill: dict[int, int], writes: bool, faulting: dict[int, bool]) -> None:
        vpns = np.fromiter(sorted(fill), np.int64, len(fill))
        slots = np.fromiter((fill[v] for v in vpns.tolist()), np.int32, len(fill))
        swapped = slots != NO_SLOT
        positions = np.arange(len(vpns))
        if swapped.any():
            self._fill_reading = True  # application hints: WILLNEED waits for it
            try:
                await io_to_the_end(self.backend.read, slots[swapped], self._fill.addrs(positions[swapped]))
            finally:
                self._fill_reading = False
        if not swapped.all():
            self._fill.clear(positions[~swapped])
        # Events read while we waited may have changed these pages: fill only
        # those still as planned.
        planned = np.where(swapped, State.SWAPPED, State.FRESH)
        valid = (self.pt.states(vpns) == planned) & (self.pt.slots(vpns) == slots)
        done = np.zeros(len(vpns), bool)
        clean = np.zeros(len(vpns), bool)   # copied in write-protected by us: the slot still matches
        for run_vpn, seg in self._runs_faulting_last(vpns, faulting):
            run_len = seg.stop - seg.start
            if not valid[seg].all():
                continue
            only_zeros = not writes and not swapped[seg].any()
            for part_vpn, part_len, keep in self._clean_parts(run_vpn, run_len, swapped[seg], faulting):
                part = slice(seg.start + part_vpn - run_vpn, seg.start + part_vpn - run_vpn + part_len)
                done[part], copied = self._copy_run(part_vpn, part_len, part.start, only_zeros, keep)
                clean[part] = copied & keep
        # An app REMOVE read while copying (EAGAIN) has already settled the
        # pages it names: FRESH, slot freed. Only the others become ours.
        done &= (self.pt.states(vpns) == planned) & (self.pt.slots(vpns) == slots)
        filled = vpns[done]
        if len(filled):
            clean &= done & swapped
            self.backend.slots.free(slots[done & swapped & ~clean])
            self.pt.set(filled, State.RESIDENT, np.where(clean, slots, NO_SLOT)[done])
            self.eviction.on_resident(filled)
            self.stats.pages_in += int((done & swapped).sum())
        # A faulting page we could not fill goes round again with fresh state.
        for vpn in set(faulting) - set(filled.tolist()):
            region = self.pt.find(vpn)
            if region is not None and region.state[vpn - region.vpn] in (State.FRESH, State.SWAPPED):
                self._pending.append((vpn << PAGE_SHIFT, 0))

    @staticmethod
    def _runs_faulting_last(vpns: np.ndarray, faulting: dict[int, bool]) -> list[tuple[int, slice]]:
        """The runs of sorted vpns as (first vpn, slice of vpns), those with
        a faulting page last: UFFDIO_COPY wakes a run's waiters when it
        returns, so a program woken last finds its prefetched pages (a
        stride's are one-page runs) in place instead of faulting on them."""
        starts, lengths = runs(vpns)
        ends = np.cumsum(lengths)
        spans = [(int(v), slice(int(e - n), int(e))) for v, n, e in zip(starts, lengths, ends)]

        def has_faulting(span: tuple[int, slice]) -> bool:
            first, seg = span
            return any(v in faulting for v in range(first, first + seg.stop - seg.start))
        return sorted(spans, key=has_faulting)

    def _clean_parts(self, vpn: int, npages: int, swapped: np.ndarray, faulting: dict[int, bool]):
        """Split a run to copy into (vpn, npages, keep_clean) parts. Prefetched
        swapped pages come in write-protected and keep their slot (evicting
        them again is a zap only); the faulting pages come in writable (a
        program often writes what it just read: a WP fault each would cost
        more than the write it saves). A write fault in the run: all writable."""
        if not self.keep_clean or not swapped.any() or \
                any(faulting.get(v, False) for v in range(vpn, vpn + npages)):
            return [(vpn, npages, False)]
        protect = np.array([v not in faulting for v in range(vpn, vpn + npages)])
        edges = np.flatnonzero(np.diff(protect)) + 1
        bounds = [0, *edges.tolist(), npages]
        return [(vpn + a, b - a, bool(protect[a])) for a, b in zip(bounds[:-1], bounds[1:])]

    def _copy_run(self, vpn: int, npages: int, position: int, only_zeros: bool,
                  protect: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """UFFDIO_COPY (or ZEROPAGE) a run, page by page past EEXIST, write-
        protected if `protect`. Returns which pages of the run are now in
        place, and which of them this call put there (not EEXIST)."""
        done = np.zeros(npages, bool)
        ours = np.zeros(npages, bool)
        mode = uffdmod.UFFDIO_COPY_MODE_WP if protect else 0
        i = 0
        while i < npages:
            dst = (vpn + i) << PAGE_SHIFT
            length = (npages - i) << PAGE_SHIFT
            if only_zeros:
                r = self.uffd.zeropage_fast(dst, length)
            else:
                r = self.uffd.copy_fast(dst, self._fill.addr + ((position + i) << PAGE_SHIFT), length, mode)
            if not r:  # the whole rest of the run
                done[i:] = ours[i:] = True
                break
            ok, err = r >> (16 + PAGE_SHIFT), r & 0xFFFF   # pages done, then why it stopped
            done[i:i + ok] = ours[i:i + ok] = True
            i += ok
            if err == errno.EAGAIN:
                # Either a queued event (read it: the rest of the run may have
                # been discarded, so its faults go round again with fresh
                # state) or a short copy stopped by a present page (go on:
                # the next attempt answers EEXIST for it).
                self._drain()
                continue
            if err == errno.EEXIST:
                done[i] = True  # present already: the page is there, wake its waiters
                self.uffd.wake((vpn + i) << PAGE_SHIFT, PAGE_SIZE)
                i += 1
            else:  # ENOENT: the range went away; its UNMAP event follows
                self.uffd.wake(dst, length)
                break
        return done, ours

    # ---- teardown ------------------------------------------------------
    def stop(self) -> None:
        """The mm is gone (exit, exec): stop serving now."""
        self.gone = True
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    def release_all(self) -> None:
        """The target's mm is gone: free every slot and descriptor."""
        self.gone = True
        self.backend.slots.free(self.pt.clear())
        for child in self.fork_events:
            child.close()
        self.fork_events.clear()
        self.uffd.close()
        if self.zapper is not None:
            self.zapper.close()
        for buf in (self._fill, self._zeros):  # _victims: an abandoned readv may still write it
            buf.close()
        if self._hint_buf is not None:
            self._hint_buf.close()

    def snapshot(self) -> dict:
        s = self.stats
        return {
            "pid": self.pid,
            "command": self.command,
            "budget_bytes": self.budget_pages * PAGE_SIZE,
            "resident_bytes": self.pt.resident * PAGE_SIZE,
            "swapped_bytes": self.pt.swapped * PAGE_SIZE,
            "managed_bytes": self.pt.managed * PAGE_SIZE,
            "peak_resident_bytes": s.peak_resident * PAGE_SIZE,
            "faults": s.faults_missing + s.faults_wp,
            "faults_missing": s.faults_missing,
            "faults_wp": s.faults_wp,
            "pages_in": s.pages_in,
            "pages_out": s.pages_out,
            "prefetched": s.prefetched,
            "zero_pages_out": s.zero_pages_out,
            "zero_mapped_bytes": int(self.pt.counts[State.ZERO]) * PAGE_SIZE,
            "shared_bytes": int(self.pt.counts[State.SHARED]) * PAGE_SIZE,
            "pinned_bytes": int(self.pt.counts[State.PINNED]) * PAGE_SIZE,
            "zero_mapped": s.zero_mapped,
            "shared_skipped": s.shared_skipped,
            "locked_pinned": s.locked_pinned,
            "zap_batches": s.zap_batches,
            "zap_ranges": s.zap_ranges,
            "app_removes": s.app_removes,
            "unmaps": s.unmaps,
            "remaps": s.remaps,
            "forks": s.forks,
            "hint_cold": s.hint_cold,
            "hint_willneed": s.hint_willneed,
            "hint_discardable": s.hint_discardable,
            "cold_evicted": s.cold_evicted,
            "willneed_in": s.willneed_in,
            "discarded": s.discarded,
            "eviction_paused": self.eviction_paused,
            "uptime_seconds": time.monotonic() - self.started,
        }


UNCOUNTED = (State.ZERO, State.SHARED)  # mapped, but no memory of the target's own


def _page_up(addr: int) -> int:
    return (addr + PAGE_SIZE - 1) >> PAGE_SHIFT


def read_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
