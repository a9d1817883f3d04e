"""Pages whose zap would free nothing, found and kept in memory.

After an eviction batch is write-protected, its pagemap entries say which
victims sit on the kernel's zero page (ZERO), are still shared copy-on-write
with another process (SHARED), are mlocked (MADV_DONTNEED refuses them: PINNED),
or were already dropped by the kernel (MADV_FREE: FRESH). ZERO and SHARED use
no memory of the target's own, so they do not count against its budget; they
stay write-protected and a write makes them RESIDENT again. Unreadable
(PROT_NONE) pages are pinned too, and so are pages the agent could not move
out because they were busy (EBUSY: pinned for I/O, as the kernel's own
reclaim leaves such pages alone). Nothing tells umgr when a lock, a
protection, a sharing or an I/O pin ends, so recheck() looks again every
RECHECK_SECONDS. Busy pages are simply tried again, after RECHECK_SECONDS
at first and twice as long each time pages come back busy soon after
(up to BUSY_WAIT_MAX): each try reads and stores them again, and a
buffer registered with io_uring stays pinned for the ring's life.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from umgr.arrays import merged_ranges, unique
from umgr.kernel import maps, procmem
from umgr.paging.core import TargetCore
from umgr.paging.pagetable import NO_SLOT, PAGE_SHIFT, State, runs
from umgr.paging.tuning import RECHECK_SECONDS
from umgr.sizes import format_size

log = logging.getLogger("umgr.target")

BUSY_WAIT_MAX = 64.0   # seconds busy pages wait at most before they are tried again


class Pinning:
    def __init__(self, core: TargetCore):
        self.core = core
        self.locked: list[tuple[int, int]] = []       # mlocked vpn ranges: pinned
        self.unreadable: list[tuple[int, int]] = []   # PROT_NONE (...) vpn ranges: pinned
        self.busy: list[np.ndarray] = []              # pages pinned because a move found them busy
        self._busy_wait = RECHECK_SECONDS             # how long they wait before they are tried again
        self._busy_due: float | None = None           # when they are
        self._busy_tried = -1e9                       # when busy pages were last tried again
        self._rechecked = 0.0
        self._pinned_told = False

    async def keep_freeable(self, vpns: np.ndarray) -> tuple[np.ndarray, bool]:
        """Victims (write-protected now) whose zap would free nothing leave
        the batch: pages on the shared zero page become ZERO, pages still
        shared copy-on-write with another process SHARED (neither counts
        against the budget; both stay write-protected, so a write faults),
        mlocked pages are pinned, pages the kernel dropped itself
        (MADV_FREE) become FRESH. Returns the rest, and whether any page
        left the resident count."""
        core = self.core
        vpns = vpns[core.pt.states(vpns) == State.EVICTING]
        if len(vpns) == 0:
            return vpns, False
        private = self._private(vpns)
        if private.all() and not self.locked:   # (clean pages of a target that never shared any)
            return vpns, False
        on_zero, shared, dropped, locked = self._classify(vpns, private)
        gone = on_zero | shared | dropped | locked
        if not gone.any():   # the common case: every page holds memory of its own
            return vpns, False
        core.drop_clean_copies(vpns[dropped])  # the kernel dropped the page: it reads zero now
        core.pt.set(vpns[on_zero], State.ZERO)
        core.pt.set(vpns[shared], State.SHARED)
        core.pt.set(vpns[dropped], State.FRESH)
        core.pt.set(vpns[locked], State.PINNED)
        await core.unprotect(vpns[locked])
        core.stats.zero_mapped += int(on_zero.sum())
        core.stats.shared_skipped += int(shared.sum())
        core.stats.locked_pinned += int(locked.sum())
        core.left_residency(vpns[gone])
        if locked.any():
            self._tell_pinned()
        return vpns[~gone], bool(gone.any())

    def all_locked(self, vpns) -> bool:
        """Whether every page named lies in a range known to be mlocked
        (an eviction round would pin them, not free memory)."""
        return bool(self.locked) and bool(_inside(np.fromiter(vpns, np.int64), self.locked).all())

    def _private(self, vpns: np.ndarray) -> np.ndarray:
        """Which victims are known to be present pages of the target's own,
        with no need to ask pagemap: those holding a clean copy, while the
        target has never shared its pages (core.may_share_pages). Such a
        page came in by UFFDIO_COPY, a private page, not the zero page;
        only a fork shares it, and an app discard (MADV_DONTNEED, FREE)
        raises a REMOVE, which drops the copy. (KSM could merge it, if the
        app asked for that: then it leaves by zap, not moved, and frees
        nothing; its copy holds it all the same.) A pagemap read costs about
        a microsecond per run: in a batch of scattered clean victims (random
        reads at the budget) that was a quarter of the round, with every
        fault waiting."""
        core = self.core
        if core.may_share_pages:
            return np.zeros(len(vpns), bool)
        return core.pt.slots(vpns) != NO_SLOT

    def _classify(self, vpns: np.ndarray, private: np.ndarray) -> tuple[np.ndarray, ...]:
        """(on the zero page, shared, dropped, locked) masks: from pagemap,
        but for the `private` pages (present, exclusive, not the zero page)."""
        entries = np.zeros(len(vpns), np.uint64)
        entries[private] = procmem.PM_PRESENT | procmem.PM_MMAP_EXCLUSIVE
        asked = ~private
        if asked.any():
            entries[asked] = procmem.pagemap_entries(self.core.pid, *runs(vpns[asked]))
        present = (entries & np.uint64(procmem.PM_PRESENT)) != 0
        in_swap = (entries & np.uint64(procmem.PM_SWAPPED)) != 0
        exclusive = (entries & np.uint64(procmem.PM_MMAP_EXCLUSIVE)) != 0
        zero_pfn = procmem.zero_pfn()
        if zero_pfn:
            on_zero = present & ((entries & np.uint64(procmem.PM_PFN_MASK)) == zero_pfn)
        else:  # PFNs are hidden from us (no CAP_SYS_ADMIN): zero-page pages look shared
            on_zero = np.zeros(len(vpns), bool)
        dropped = ~present & ~in_swap
        locked = _inside(vpns, self.locked) & present
        shared = present & ~exclusive & ~on_zero & ~locked
        return on_zero & ~locked, shared, dropped, locked

    def _read_locked(self) -> None:
        self.locked = [(lo >> PAGE_SHIFT, hi >> PAGE_SHIFT) for lo, hi in maps.locked_ranges(self.core.pid)]
        self._rechecked = time.monotonic()

    def _read_unreadable(self) -> None:
        self.unreadable = [(lo >> PAGE_SHIFT, hi >> PAGE_SHIFT) for lo, hi in maps.unreadable_ranges(self.core.pid)]

    async def pin_locked(self, failed: np.ndarray) -> np.ndarray:
        """A zap stopped at `failed`: MADV_DONTNEED refuses mlocked memory
        (EINVAL). Pin what is locked (its copies are dropped); return the rest."""
        if len(failed) == 0:
            return failed
        try:
            self._read_locked()
        except OSError:
            return failed
        core = self.core
        inside = _inside(failed, self.locked)
        locked = failed[inside]
        if len(locked):
            log.info("%s: %d pages are mlocked: pinned while they stay locked", core.label, len(locked))
            core.stats.locked_pinned += len(locked)
            await self._pin(locked)
            self._tell_pinned()
        return failed[~inside]

    async def pin_busy(self, busy: np.ndarray) -> None:
        """ZAPPING pages the agent could not move out, busy (EBUSY): a device
        may still write them (an O_DIRECT read in flight, io_uring's
        registered buffers), and a zap would leave its writes in a page the
        app no longer sees. Pinned (their copies dropped) until recheck()."""
        core = self.core
        busy = busy[core.pt.states(busy) == State.ZAPPING]
        if len(busy) == 0:
            return
        now = time.monotonic()
        if now - self._busy_tried < 2 * self._busy_wait:   # busy again soon after a try: wait longer
            self._busy_wait = min(2 * self._busy_wait, BUSY_WAIT_MAX)
        elif now - self._busy_tried > 4 * self._busy_wait:
            self._busy_wait = RECHECK_SECONDS
        if self._busy_due is None:
            self._busy_due = now + self._busy_wait
        log.info("%s: %d pages are busy (pinned for I/O): kept in memory for %g s", core.label, len(busy),
                 self._busy_wait)
        core.stats.busy_pinned += len(busy)
        self.busy.append(busy)
        await self._pin(busy)

    async def _pin(self, vpns: np.ndarray) -> None:
        """ZAPPING pages stay in memory, PINNED, unprotected: their copies
        are dropped (the page is what counts now)."""
        core = self.core
        slots = core.pt.slots(vpns)
        core.slots.free(slots[slots != NO_SLOT])
        core.pt.set(vpns, State.PINNED, NO_SLOT)
        core.left_residency(vpns)
        await core.unprotect(vpns)

    def pin_unreadable(self, failed: np.ndarray) -> None:
        """process_vm_readv stopped at `failed` (one page): if it lies in a
        mapping the process cannot read (PROT_NONE, ...), pin every resident
        page of those mappings: none of them can be read back until the app
        makes them readable again (recheck unpins them then)."""
        core = self.core
        if len(failed) == 0 or core.pt.states(failed)[0] != State.RESIDENT:
            return  # unmapped meanwhile, or written (WP fault) meanwhile
        self._read_unreadable()
        if not _inside(failed, self.unreadable).any():
            return
        for lo, hi in self.unreadable:
            pages, _ = core.pt.find_state(lo, hi, State.RESIDENT)
            if len(pages):
                log.info("%s: %d pages at %#x cannot be read; pinned while unreadable",
                         core.label, len(pages), int(pages[0]) << PAGE_SHIFT)
                core.pt.set(pages, State.PINNED)
                core.left_residency(pages)
        self._tell_pinned()

    def _tell_pinned(self) -> None:
        """Once per target, a warning when pinned pages hold half the budget
        or more: the budget is then a promise umgr does not keep (a program
        that calls mlockall, as some databases and real-time programs do,
        keeps all of its memory), and the INFO lines above say so only
        under -v."""
        core = self.core
        nbytes = core.pt.count(State.PINNED) << PAGE_SHIFT
        if self._pinned_told or not core.budget.worth_a_warning(nbytes):
            return
        self._pinned_told = True
        log.warning("%s: %s of its memory, so far, is mlocked or cannot be read, so umgr cannot page it out: its "
                    "budget of %s does not cover it", core.label, format_size(nbytes),
                    format_size(core.budget.pages << PAGE_SHIFT))

    def recheck(self) -> None:
        """At most every RECHECK_SECONDS: unpin pages no longer mlocked or
        unreadable, count again SHARED pages the other process has let go
        of (it wrote, unmapped or exited: no event tells us), and pages the
        app discarded with MADV_FREE that are still in memory (_count_reused)."""
        now = time.monotonic()
        if now - self._rechecked < RECHECK_SECONDS:
            return
        self._rechecked = now
        if self.locked or self.unreadable:
            self._unpin_released()
        if self.busy and now >= self._busy_due:
            busy = unique(np.concatenate(self.busy))   # (sorted, as the table's lookups need)
            self.busy.clear()
            self._busy_due, self._busy_tried = None, now
            busy = busy[self.core.pt.states(busy) == State.PINNED]
            self._count_again(busy[~_inside(busy, self.locked) & ~_inside(busy, self.unreadable)])
        shared = self.core.pt.vpns_in(State.SHARED)
        if len(shared):
            entries = procmem.pagemap_entries(self.core.pid, *runs(shared))
            own = (entries & np.uint64(procmem.PM_MMAP_EXCLUSIVE)) != 0
            self._count_again(shared[own])
        self._count_reused()

    def _count_reused(self) -> None:
        """Pages the app discarded that are still in memory become RESIDENT.
        The kernel tells the uffd of an MADV_FREE as of an MADV_DONTNEED (a
        REMOVE: the pages are FRESH in the table), but frees lazily, and a
        write before it does cancels the free: such a page is the process's
        again with no fault to say so, and was counted nowhere, so no budget
        held it (a program of jemalloc's reused 48 MiB so under a 16 MiB
        budget). One not written again is in memory too until the kernel
        frees it, and pagemap cannot tell the two apart: both count.
        Looked for in the ranges discarded since the last recheck, by
        PAGEMAP_SCAN (the kernel lists the present runs: nothing here grows
        with a range that holds none); no task fills a page meanwhile (a C
        call in the background ends before any other task runs)."""
        core = self.core
        discarded, core.app_discarded = core.app_discarded, []
        if not discarded:
            return
        los, his = merged_ranges(discarded)
        for lo, hi in zip(los.tolist(), his.tolist()):
            for start, end, _ in procmem.pagemap_scan(core.pid, lo << PAGE_SHIFT, hi << PAGE_SHIFT,
                                                      procmem.PAGE_IS_PRESENT, procmem.PAGE_IS_PRESENT):
                present = np.arange(start >> PAGE_SHIFT, end >> PAGE_SHIFT, dtype=np.int64)
                self._count_again(present[core.pt.states(present) == State.FRESH])

    def _unpin_released(self) -> None:
        before = self.locked + self.unreadable
        self._read_locked()
        if self.unreadable:
            self._read_unreadable()
        for lo, hi in before:
            pinned, _ = self.core.pt.find_state(lo, hi, State.PINNED)
            still = _inside(pinned, self.locked) | _inside(pinned, self.unreadable)
            self._count_again(pinned[~still])

    def _count_again(self, vpns: np.ndarray) -> None:
        """Pages become ordinary resident pages, eviction candidates again."""
        if len(vpns):
            self.core.pt.set(vpns, State.RESIDENT)
            self.core.became_resident(vpns)
            self.core.note_resident()


def _inside(vpns: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Which vpns lie in any of the [lo, hi) ranges. By a binary search
    over the ranges merged: a program decides how many there are (every
    mprotect(PROT_NONE) of a registered page can make one), and a test of
    each vpn against each range cost the daemon's thread R numpy passes."""
    vpns = np.asarray(vpns, np.int64)
    if not ranges or not len(vpns):
        return np.zeros(len(vpns), bool)
    los, his = merged_ranges(ranges)
    at = np.searchsorted(los, vpns, side="right") - 1   # the last range starting at or below each vpn
    return (at >= 0) & (vpns < his[np.maximum(at, 0)])

