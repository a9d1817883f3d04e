"""One managed process: its uffd, page table, fault service and eviction.

Two trio tasks per target share the page table without locks (trio runs one
task at a time; state is only changed between awaits):
- the fault loop reads uffd messages in batches (in place, uffd.read_batch),
  handles the non-cooperative events (REMOVE, UNMAP, REMAP, FORK) of each
  batch in order once it has been walked, and serves the page faults;
- the evictor keeps resident pages under the budget: write-protect victims,
  read them (process_vm_readv, in a worker thread: on the fault-serving thread
  it would deadlock on a userfault), store them, zap them.

The kernel facts and race rules behind the code are in shared/DESIGN.md
("Paging out", "Paging in").
"""
from __future__ import annotations

import collections
import errno
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import trio

from umgr import maps, procmem, uffd as uffdmod
from umgr.buffers import PageBuffer
from umgr.errors import BackendError, BackendFull, TargetGone
from umgr.pagetable import NO_SLOT, PAGE_SHIFT, PAGE_SIZE, Flag, PageTable, State, runs
from umgr.protocol import Advice
from umgr.uffd import (EVENT_PAGEFAULT, MSG_WORDS, UFFD_PAGEFAULT_FLAG_WP, UFFD_PAGEFAULT_FLAG_WRITE,
                       W_ADDRESS, W_FLAGS, ForkEvent, RemapEvent, RemoveEvent, UnmapEvent)

log = logging.getLogger("umgr.target")

REGISTER_MODE = uffdmod.UFFDIO_REGISTER_MODE_MISSING | uffdmod.UFFDIO_REGISTER_MODE_WP
MAX_FILL_PAGES = 256      # pages brought in per fault batch (staging buffer)
EVICT_BATCH = 512         # pages per eviction batch
SPIN_SECONDS = 50e-6      # busy-poll the uffd this long before sleeping
RECHECK_SECONDS = 1.0     # how often pinned (mlocked) and SHARED pages are looked at again
# Longest a fault waits for eviction at the budget. Past it the page comes in
# anyway: the evictor may itself be waiting on that fault (a page the zap
# agent or a process_vm_readv touches), and overshooting beats a deadlock.
BACKPRESSURE_LIMIT = 0.1
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


class Target:
    def __init__(self, *, pid: int, uffd: uffdmod.Userfaultfd, pidfd: int, budget_pages: int,
                 backend, prefetch, eviction, label: str, spin: float = SPIN_SECONDS):
        self.pid = pid
        self.uffd = uffd
        self.pidfd = pidfd
        self.budget_pages = budget_pages
        self.backend = backend
        self.prefetch = prefetch
        self.eviction = eviction
        self.label = label
        self.spin = spin
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
                await _io_to_the_end(self.backend.read, slots[swapped], self._fill.addrs(positions[swapped]))
            finally:
                self._fill_reading = False
        if not swapped.all():
            self._fill.clear(positions[~swapped])
        # Events read while we waited may have changed these pages: fill only
        # those still as planned.
        planned = np.where(swapped, State.SWAPPED, State.FRESH)
        valid = (self.pt.states(vpns) == planned) & (self.pt.slots(vpns) == slots)
        done = np.zeros(len(vpns), bool)
        starts, lengths = runs(vpns)
        offset = 0
        for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
            seg = slice(offset, offset + run_len)
            offset += run_len
            if not valid[seg].all():
                continue
            only_zeros = not writes and not swapped[seg].any()
            done[seg] = self._copy_run(run_vpn, run_len, seg.start, only_zeros)
        # An app REMOVE read while copying (EAGAIN) has already settled the
        # pages it names: FRESH, slot freed. Only the others become ours.
        done &= (self.pt.states(vpns) == planned) & (self.pt.slots(vpns) == slots)
        filled = vpns[done]
        if len(filled):
            self.backend.slots.free(slots[done & swapped])
            self.pt.set(filled, State.RESIDENT, NO_SLOT)
            self.eviction.on_resident(filled)
            self.stats.pages_in += int((done & swapped).sum())
        # A faulting page we could not fill goes round again with fresh state.
        for vpn in set(faulting) - set(filled.tolist()):
            region = self.pt.find(vpn)
            if region is not None and region.state[vpn - region.vpn] in (State.FRESH, State.SWAPPED):
                self._pending.append((vpn << PAGE_SHIFT, 0))

    def _copy_run(self, vpn: int, npages: int, position: int, only_zeros: bool) -> np.ndarray:
        """UFFDIO_COPY (or ZEROPAGE) a run, page by page past EEXIST.
        Returns which pages of the run are now in place."""
        done = np.zeros(npages, bool)
        i = 0
        while i < npages:
            dst = (vpn + i) << PAGE_SHIFT
            length = (npages - i) << PAGE_SHIFT
            if only_zeros:
                r = self.uffd.zeropage_fast(dst, length)
            else:
                r = self.uffd.copy_fast(dst, self._fill.addr + ((position + i) << PAGE_SHIFT), length)
            if not r:  # the whole rest of the run
                done[i:] = True
                break
            ok, err = r >> (16 + PAGE_SHIFT), r & 0xFFFF   # pages done, then why it stopped
            done[i:i + ok] = True
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
        return done

    # ---- eviction ------------------------------------------------------
    async def evictor(self) -> None:
        try:
            while True:
                await self._evict_wanted.wait()
                self._evict_wanted = trio.Event()
                await self._serve_hints()  # application hints: COLD, WILLNEED
                while self.over_budget() and self.zapper is not None and not self.eviction_paused:
                    # No victim (all pinned, or unknown to the policy): faults
                    # must not wait at the budget for an eviction that cannot come.
                    self.no_victims = not await self.evict_batch()
                    if self.no_victims:
                        break
                    await trio.sleep(0)
        except TargetGone:
            self.gone = True

    def _choose_victims(self) -> np.ndarray:
        want = min(EVICT_BATCH, self.pt.resident - self.low_water)
        chosen: list[np.ndarray] = []
        count = 0
        for _ in range(8):
            if count >= want or len(self.eviction) == 0:
                break
            candidates = np.unique(self.eviction.choose(want - count))
            candidates = candidates[self.pt.states(candidates) == State.RESIDENT]
            chosen.append(candidates)
            count += len(candidates)
        if not chosen:
            return np.empty(0, np.int64)
        return np.unique(np.concatenate(chosen))[:EVICT_BATCH]

    async def evict_batch(self, victims: np.ndarray | None = None) -> bool:
        """One batch: WP -> read -> store -> zap. False when nothing could go.
        `victims` (sorted RESIDENT vpns, at most EVICT_BATCH): a COLD hint's."""
        vpns = self._choose_victims() if victims is None else victims
        if len(vpns) == 0:
            return False
        self.pt.set(vpns, State.EVICTING)
        starts, lengths = runs(vpns)
        for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
            err = await self._writeprotect(run_vpn, run_len, True)
            if err:  # ENOENT: unmapped meanwhile; the UNMAP event drops them
                self._release(np.arange(run_vpn, run_vpn + run_len), State.EVICTING)
        vpns, settled = await self._keep_freeable(vpns)
        if len(vpns) == 0:
            return settled
        starts, lengths = runs(vpns)
        try:
            nbytes = await self._read_victims(starts, lengths)
        except TargetGone:
            raise
        except OSError:  # EFAULT on the first range: unmapped meanwhile, or unreadable
            nbytes = 0
        nread = nbytes >> PAGE_SHIFT
        if nread < len(vpns):
            rest = vpns[nread:]
            self._release(rest, State.EVICTING)
            await self._unprotect(rest)
            self._pin_unreadable(rest[:1])
            vpns = vpns[:nread]
        zero = self._victims.zero_pages(len(vpns))
        live = self.pt.states(vpns) == State.EVICTING
        drop = self._discardable(vpns)  # application hints: zapped unwritten, read back as zero
        store = live & ~zero & ~drop
        try:
            slots = self.backend.slots.alloc(int(store.sum()))
        except BackendFull as exc:
            await self._abort(vpns, f"swap full ({exc}); eviction paused until slots are freed")
            return False
        try:
            await _io_to_the_end(self.backend.write, slots, self._victims.addrs(np.flatnonzero(store)))
        except BackendError as exc:
            self.backend.slots.free(slots)
            self.stats.backend_errors += 1
            await self._abort(vpns, f"backend error ({exc}); pages stay resident")
            return False
        except BaseException:  # the table does not hold these yet; no write to them is in flight
            self.backend.slots.free(slots)
            raise
        page_slots = np.full(len(vpns), NO_SLOT, np.int32)
        page_slots[store] = slots
        # Pages that were written to (WP fault), discarded or unmapped while
        # their copy was in flight have left EVICTING: their copy is dropped.
        still = self.pt.states(vpns) == State.EVICTING
        self.stats.discarded += int((still & drop & ~zero).sum())
        self.backend.slots.free(page_slots[~still & store])
        vpns, page_slots, zero = vpns[still], page_slots[still], zero[still]
        if len(vpns) == 0:
            return True
        self.pt.set(vpns, State.ZAPPING, page_slots)
        await self._zap(vpns)
        self.stats.zero_pages_out += int(zero.sum())
        return True

    async def _read_victims(self, starts: np.ndarray, lengths: np.ndarray) -> int:
        """process_vm_readv in a worker thread. Abandoned on cancel: a read
        blocked on a userfault of a target that is going away is woken only
        when its uffd is closed, after this task has finished. The thread
        holds the buffer, so it stays mapped until the read returns."""
        buf, pid = self._victims, self.pid
        addrs, lens = (starts << PAGE_SHIFT).astype(np.uint64), (lengths << PAGE_SHIFT).astype(np.uint64)
        return await trio.to_thread.run_sync(
            lambda: procmem.process_vm_readv(pid, buf.addr, addrs, lens), abandon_on_cancel=True)

    async def _keep_freeable(self, vpns: np.ndarray) -> tuple[np.ndarray, bool]:
        """Victims (write-protected now) whose zap would free nothing leave
        the batch: pages on the shared zero page become ZERO, pages still
        shared copy-on-write with another process SHARED (neither counts
        against the budget; both stay write-protected, so a write faults),
        mlocked pages are pinned, pages the kernel dropped itself
        (MADV_FREE) become FRESH. Returns the rest, and whether any page
        left the resident count."""
        vpns = vpns[self.pt.states(vpns) == State.EVICTING]
        if len(vpns) == 0:
            return vpns, False
        starts, lengths = runs(vpns)
        entries = procmem.pagemap_entries(self.pid, starts, lengths)
        present = (entries & np.uint64(procmem.PM_PRESENT)) != 0
        in_swap = (entries & np.uint64(procmem.PM_SWAPPED)) != 0
        exclusive = (entries & np.uint64(procmem.PM_MMAP_EXCLUSIVE)) != 0
        zero_pfn = procmem.zero_pfn()  # 0: PFNs hidden from us; zero-page pages then look shared
        on_zero = present & ((entries & np.uint64(procmem.PM_PFN_MASK)) == zero_pfn)
        dropped = ~present & ~in_swap
        locked = self._in_locked(vpns) & present
        shared = present & ~exclusive & ~on_zero & ~locked
        self.pt.set(vpns[on_zero & ~locked], State.ZERO)
        self.pt.set(vpns[shared], State.SHARED)
        self.pt.set(vpns[dropped], State.FRESH)
        self.pt.set(vpns[locked], State.PINNED)
        await self._unprotect(vpns[locked])
        self.stats.zero_mapped += int((on_zero & ~locked).sum())
        self.stats.shared_skipped += int(shared.sum())
        self.stats.locked_pinned += int(locked.sum())
        gone = on_zero | shared | dropped | locked
        return vpns[~gone], bool(gone.any())

    def _in_locked(self, vpns: np.ndarray) -> np.ndarray:
        return _inside(vpns, self.locked)

    def _read_locked(self) -> None:
        self.locked = [(lo >> PAGE_SHIFT, hi >> PAGE_SHIFT) for lo, hi in maps.locked_ranges(self.pid)]
        self._rechecked = time.monotonic()

    async def _pin_locked(self, failed: np.ndarray) -> np.ndarray:
        """A zap stopped at `failed`: MADV_DONTNEED refuses mlocked memory
        (EINVAL). Pin what is locked (its copies are dropped); return the rest."""
        if len(failed) == 0:
            return failed
        try:
            self._read_locked()
        except OSError:
            return failed
        inside = self._in_locked(failed)
        locked = failed[inside]
        if len(locked):
            log.info("%s: %d pages are mlocked: pinned while they stay locked", self.label, len(locked))
            self.stats.locked_pinned += len(locked)
            slots = self.pt.slots(locked)
            self.backend.slots.free(slots[slots != NO_SLOT])
            self.pt.set(locked, State.PINNED, NO_SLOT)
            await self._unprotect(locked)
        return failed[~inside]

    def _pin_unreadable(self, failed: np.ndarray) -> None:
        """process_vm_readv stopped at `failed` (one page): if it lies in a
        mapping the process cannot read (PROT_NONE, ...), pin every resident
        page of those mappings: none of them can be read back until the app
        makes them readable again (recheck unpins them then)."""
        if len(failed) == 0 or self.pt.states(failed)[0] != State.RESIDENT:
            return  # unmapped meanwhile, or written (WP fault) meanwhile
        self.unreadable = [(lo >> PAGE_SHIFT, hi >> PAGE_SHIFT) for lo, hi in maps.unreadable_ranges(self.pid)]
        if not _inside(failed, self.unreadable).any():
            return
        for lo, hi in self.unreadable:
            pages, _ = self.pt.find_state(lo, hi, State.RESIDENT)
            if len(pages):
                log.info("%s: %d pages at %#x cannot be read; pinned while unreadable",
                         self.label, len(pages), int(pages[0]) << PAGE_SHIFT)
                self.pt.set(pages, State.PINNED)

    def recheck(self) -> None:
        """At most every RECHECK_SECONDS: unpin pages no longer mlocked or
        unreadable, and count again SHARED pages the other process has let
        go of (it wrote, unmapped or exited: no event tells us)."""
        now = time.monotonic()
        if now - self._rechecked < RECHECK_SECONDS:
            return
        self._rechecked = now
        if self.locked or self.unreadable:
            before = self.locked + self.unreadable
            self._read_locked()
            self.unreadable = [(lo >> PAGE_SHIFT, hi >> PAGE_SHIFT) for lo, hi in maps.unreadable_ranges(self.pid)] \
                if self.unreadable else []
            for lo, hi in before:
                pinned, _ = self.pt.find_state(lo, hi, State.PINNED)
                still = _inside(pinned, self.locked) | _inside(pinned, self.unreadable)
                self._count_again(pinned[~still], State.PINNED)
        if self.pt.counts[State.SHARED]:
            shared = np.concatenate([r.vpn + np.flatnonzero(r.state == State.SHARED) for r in self.pt.regions])
            starts, lengths = runs(shared.astype(np.int64))
            entries = procmem.pagemap_entries(self.pid, starts, lengths)
            own = (entries & np.uint64(procmem.PM_MMAP_EXCLUSIVE)) != 0
            self._count_again(shared[own], State.SHARED)

    def _count_again(self, vpns: np.ndarray, from_state: int) -> None:
        """Pages become ordinary resident pages, eviction candidates again."""
        if len(vpns):
            self.pt.set(vpns, State.RESIDENT)
            self.eviction.on_resident(vpns)
            self._note_resident()

    async def _zap(self, vpns: np.ndarray) -> None:
        starts, lengths = runs(vpns)
        byte_starts, byte_lengths = starts << PAGE_SHIFT, lengths << PAGE_SHIFT
        self._zap_vpns, self._zap_hits, self._zap_removes = vpns, np.zeros(len(vpns), np.uint8), []
        try:
            zapped = await self.zapper.zap(byte_starts.astype(np.uint64), byte_lengths.astype(np.uint64))
        finally:
            self._zap_vpns = None
        # The zap has returned, so every REMOVE it caused has been read (the
        # zapping thread waits in the kernel until its event is read).
        discarded = vpns[self._zap_hits >= 2]
        nzapped = zapped >> PAGE_SHIFT
        done, failed = vpns[:nzapped], vpns[nzapped:]
        # Only pages still ZAPPING are ours to settle: an UNMAP or REMAP in
        # between has dealt with the others (and their slots).
        done = done[self.pt.states(done) == State.ZAPPING]
        slots = self.pt.slots(done)
        gone = np.isin(done, discarded)  # the app discarded them too: they read as zero
        self.backend.slots.free(slots[gone & (slots != NO_SLOT)])
        slots[gone] = NO_SLOT
        self.pt.set(done, State.ZAPPING, slots)
        self.pt.set(done[slots == NO_SLOT], State.FRESH)
        self.pt.set(done[slots != NO_SLOT], State.SWAPPED)
        self.stats.pages_out += len(done)
        if self._waiting is not None:
            self._waiting.cancel()
        self.stats.zap_batches += 1
        self.stats.zap_ranges += len(starts)
        # Pages an mremap or munmap took away meanwhile are not ours to settle.
        failed = failed[self.pt.states(failed) == State.ZAPPING]
        failed = await self._pin_locked(failed)
        if len(failed):
            log.warning("%s: zap stopped after %d of %d pages", self.label, nzapped, len(vpns))
            self._release(failed, State.ZAPPING)
            await self._unprotect(failed)
        # Writers blocked on a WP fault during the zap retry now: a MISSING
        # fault, served from the copy.
        for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
            self.uffd.wake(run_vpn << PAGE_SHIFT, run_len << PAGE_SHIFT)

    def _release(self, vpns: np.ndarray, from_state: int) -> None:
        """Pages leave an eviction batch and are resident again."""
        vpns = np.asarray(vpns, np.int64)
        vpns = vpns[self.pt.states(vpns) == from_state]
        slots = self.pt.slots(vpns)
        self.backend.slots.free(slots[slots != NO_SLOT])
        self.pt.set(vpns, State.RESIDENT, NO_SLOT)
        self.eviction.on_resident(vpns)

    async def _abort(self, vpns: np.ndarray, why: str) -> None:
        if why != self.eviction_paused:
            log.warning("%s: %s", self.label, why)
        self.eviction_paused = why
        self._release(vpns, State.EVICTING)
        await self._unprotect(vpns)

    def resume_eviction(self) -> None:
        """Slots were freed or the backend recovered: try again."""
        if self.eviction_paused:
            self.eviction_paused = ""
            self._note_resident()

    async def _unprotect(self, vpns: np.ndarray) -> None:
        self.pt.set_flag(np.asarray(vpns, np.int64), Flag.DISCARDABLE, False)  # unprotected: writes unseen
        starts, lengths = runs(np.asarray(vpns, np.int64))
        for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
            await self._writeprotect(run_vpn, run_len, False)

    async def _writeprotect(self, vpn: int, npages: int, protect: bool) -> int:
        while True:
            err = self.uffd.writeprotect(vpn << PAGE_SHIFT, npages << PAGE_SHIFT, protect)
            if err != errno.EAGAIN:
                return err
            # A non-cooperative event is queued: the fault loop reads it.
            await trio.sleep(0)

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

    # ---- application hints ---------------------------------------------
    # umgr_advise() from the shim (README "Hints"). The daemon validates a
    # hint and calls advise(); the ACK goes back when it returns:
    # - COLD and WILLNEED are queued for the evictor task, which runs them in
    #   order before its over-budget work: COLD evicts the range's resident
    #   pages (whatever the budget), WILLNEED reads the range's swapped pages
    #   and UFFDIO_COPYs them in. Running them there keeps one eviction batch
    #   at a time (they share its buffer and zap bookkeeping).
    # - DISCARDABLE takes effect before the ACK: swapped pages of the range
    #   are dropped at once (slot freed, FRESH), resident ones are
    #   write-protected and flagged (Flag.DISCARDABLE). The evictor does not
    #   write a flagged page (it is zapped and becomes FRESH); a write to it
    #   WP-faults and clears the flag (_on_wp_fault), and so does anything
    #   that unprotects it (_unprotect). A write after the hint thus always
    #   keeps its page.

    def _init_hints(self) -> None:
        self._hints: collections.deque[tuple[int, int, int]] = collections.deque()  # (advice, lo, hi) vpns
        self._hint_buf: PageBuffer | None = None      # WILLNEED staging, made on first use
        self._fill_reading = False                    # the fault loop's backend read is in flight

    async def advise(self, vpn_lo: int, vpn_hi: int, advice: int) -> None:
        """Apply a validated hint to the managed pages of [vpn_lo, vpn_hi)."""
        if advice == Advice.DISCARDABLE:
            self.stats.hint_discardable += 1
            await self._advise_discardable(vpn_lo, vpn_hi)
            return
        if advice == Advice.COLD:
            self.stats.hint_cold += 1
        else:
            self.stats.hint_willneed += 1
        self._hints.append((advice, vpn_lo, vpn_hi))
        self._evict_wanted.set()

    async def _advise_discardable(self, vpn_lo: int, vpn_hi: int) -> None:
        # Swapped pages: drop the copy now, as MADV_FREE drops swap entries.
        # A fill reading the slot meanwhile sees the page changed and skips it.
        swapped, _ = self.pt.find_state(vpn_lo, vpn_hi, State.SWAPPED)
        if len(swapped):
            slots = self.pt.slots(swapped)
            self.pt.set(swapped, State.FRESH, NO_SLOT)
            self.backend.slots.free(slots[slots != NO_SLOT])
            self.stats.discarded += len(swapped)
        # Pages being evicted are write-protected already: flag them as they are.
        evicting, _ = self.pt.find_state(vpn_lo, vpn_hi, State.EVICTING)
        self.pt.set_flag(evicting, Flag.DISCARDABLE)
        # Resident pages: write-protect, then flag, with no await in between,
        # so that any write after the hint WP-faults after the flag is set.
        resident, _ = self.pt.find_state(vpn_lo, vpn_hi, State.RESIDENT)
        starts, lengths = runs(resident)
        for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
            while True:
                err = self.uffd.writeprotect(run_vpn << PAGE_SHIFT, run_len << PAGE_SHIFT, True)
                if err != errno.EAGAIN:
                    break
                await trio.sleep(0)  # a queued event: the fault loop reads it
            if not err:  # else ENOENT: unmapped meanwhile
                # Sticks only on pages still resident (or since picked for eviction).
                self.pt.set_flag(np.arange(run_vpn, run_vpn + run_len, dtype=np.int64), Flag.DISCARDABLE)

    def _discardable(self, vpns: np.ndarray) -> np.ndarray:
        """Which victims (sorted vpns) the evictor may drop instead of writing."""
        return self.pt.has_flag(vpns, Flag.DISCARDABLE)

    async def _serve_hints(self) -> None:
        """Run queued COLD/WILLNEED hints, in order (on the evictor task)."""
        while self._hints and not self.gone:
            advice, lo, hi = self._hints.popleft()
            if advice == Advice.COLD:
                await self._evict_cold(lo, hi)
            else:
                await self._prefetch_willneed(lo, hi)

    async def _evict_cold(self, lo: int, hi: int) -> None:
        while lo < hi and self.zapper is not None and not self.eviction_paused:
            victims, lo = self.pt.find_state(lo, hi, State.RESIDENT, EVICT_BATCH)
            if len(victims) == 0:
                return
            self.stats.cold_evicted += len(victims)
            if not await self.evict_batch(victims):
                return
            await trio.sleep(0)

    async def _prefetch_willneed(self, lo: int, hi: int) -> None:
        """Bring the swapped pages of [lo, hi) in, as much as the budget has
        room for (beyond that they would only push other pages out)."""
        if self._hint_buf is None:
            self._hint_buf = PageBuffer(MAX_FILL_PAGES)
        while lo < hi and not self.gone:
            room = self.high_water - self.pt.resident if self.budget_pages else MAX_FILL_PAGES
            if room <= 0:
                return
            vpns, lo = self.pt.find_state(lo, hi, State.SWAPPED, min(room, MAX_FILL_PAGES))
            if len(vpns) == 0:
                return
            slots = self.pt.slots(vpns)
            # Our own reference: a slot freed meanwhile (the page faulted in,
            # discarded, unmapped) is not reused while we read it, so a page
            # still SWAPPED in the same slot afterwards has exactly this copy.
            self.backend.slots.incref(slots)
            try:
                try:
                    await _io_to_the_end(self.backend.read, slots, self._hint_buf.addrs(np.arange(len(vpns))))
                except BackendError as exc:
                    self.stats.backend_errors += 1
                    log.warning("%s: WILLNEED read failed (%s); pages stay swapped", self.label, exc)
                    return
                await self._copy_willneed(vpns, slots)
            finally:
                self.backend.slots.free(slots)
            await trio.sleep(0)

    async def _copy_willneed(self, vpns: np.ndarray, slots: np.ndarray) -> None:
        pending = np.ones(len(vpns), bool)
        while pending.any():
            # Never change a page's state while the fault loop's read of a
            # slot is in flight: it checks the page afterwards by state and
            # slot, which must not have been freed and reused in between.
            while self._fill_reading:
                await trio.sleep(0.0002)
            pending &= (self.pt.states(vpns) == State.SWAPPED) & (self.pt.slots(vpns) == slots)
            done = np.zeros(len(vpns), bool)
            again = False
            positions = np.flatnonzero(pending)
            starts, lengths = runs(vpns[positions])
            at = 0
            for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
                first = int(positions[at])
                at += run_len
                i = 0
                while i < run_len:
                    copied, err = self.uffd.copy((run_vpn + i) << PAGE_SHIFT,
                                                 self._hint_buf.addr + ((first + i) << PAGE_SHIFT),
                                                 (run_len - i) << PAGE_SHIFT)
                    ok = max(copied, 0) >> PAGE_SHIFT
                    done[first + i:first + i + ok] = True
                    i += ok
                    if err == 0:
                        break
                    if err == errno.EEXIST:  # present already (as _copy_run treats it)
                        done[first + i] = True
                        i += 1
                        continue
                    if err == errno.EAGAIN:  # an event is queued (or a short copy): go round
                        again = True
                    pending[first + i:first + run_len] &= err == errno.EAGAIN  # ENOENT: gone
                    break
                if again:
                    break
            # Settle what went in now, before any await.
            filled = vpns[done]
            if len(filled):
                self.backend.slots.free(slots[done])       # the page table's references
                self.pt.set(filled, State.RESIDENT, NO_SLOT)
                self.eviction.on_resident(filled)
                self.stats.pages_in += len(filled)
                self.stats.willneed_in += len(filled)
                self._note_resident()
            pending &= ~done
            if not again:
                return
            await trio.sleep(0)  # let the fault loop read the queued event


UNCOUNTED = (State.ZERO, State.SHARED)  # mapped, but no memory of the target's own


async def _io_to_the_end(operation, slots: np.ndarray, addrs: np.ndarray) -> None:
    """Backend I/O, shielded from cancellation (the target going away): a
    request abandoned in flight could still land in a slot or a buffer
    reused since. A batch takes milliseconds."""
    with trio.CancelScope(shield=True):
        await operation(slots, addrs)


def _inside(vpns: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Which vpns lie in any of the [lo, hi) ranges."""
    inside = np.zeros(len(vpns), bool)
    for lo, hi in ranges:
        inside |= (vpns >= lo) & (vpns < hi)
    return inside


def _page_up(addr: int) -> int:
    return (addr + PAGE_SIZE - 1) >> PAGE_SHIFT


def read_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
