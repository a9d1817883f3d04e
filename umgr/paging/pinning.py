"""Pages whose zap would free nothing, found and kept in memory.

After an eviction batch is write-protected, its pagemap entries say which
victims sit on the kernel's zero page (ZERO), are still shared copy-on-write
with another process (SHARED), are mlocked (MADV_DONTNEED refuses them: PINNED),
or were already dropped by the kernel (MADV_FREE: FRESH). ZERO and SHARED use
no memory of the target's own, so they do not count against its budget; they
stay write-protected and a write makes them RESIDENT again. Unreadable
(PROT_NONE) pages are pinned too. Nothing tells umgr when a lock, a
protection or a sharing ends, so recheck() looks again every RECHECK_SECONDS.
A mixin of umgr.paging.target.Target.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from umgr.kernel import maps, procmem
from umgr.paging.pagetable import NO_SLOT, PAGE_SHIFT, State, runs
from umgr.paging.tuning import RECHECK_SECONDS

log = logging.getLogger("umgr.paging.target")


class Unfreeable:
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
        zero_pfn = procmem.zero_pfn()
        if zero_pfn:
            on_zero = present & ((entries & np.uint64(procmem.PM_PFN_MASK)) == zero_pfn)
        else:  # PFNs are hidden from us (no CAP_SYS_ADMIN): zero-page pages look shared
            on_zero = np.zeros(len(vpns), bool)
        dropped = ~present & ~in_swap
        locked = self._in_locked(vpns) & present
        shared = present & ~exclusive & ~on_zero & ~locked
        self._drop_clean_copies(vpns[dropped])  # the kernel dropped the page: it reads zero now
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
                self._count_again(pinned[~still])
        if self.pt.counts[State.SHARED]:
            shared = np.concatenate([r.vpn + np.flatnonzero(r.state == State.SHARED) for r in self.pt.regions])
            starts, lengths = runs(shared.astype(np.int64))
            entries = procmem.pagemap_entries(self.pid, starts, lengths)
            own = (entries & np.uint64(procmem.PM_MMAP_EXCLUSIVE)) != 0
            self._count_again(shared[own])

    def _count_again(self, vpns: np.ndarray) -> None:
        """Pages become ordinary resident pages, eviction candidates again."""
        if len(vpns):
            self.pt.set(vpns, State.RESIDENT)
            self.eviction.on_resident(vpns)
            self._note_resident()


def _inside(vpns: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Which vpns lie in any of the [lo, hi) ranges."""
    inside = np.zeros(len(vpns), bool)
    for lo, hi in ranges:
        inside |= (vpns >= lo) & (vpns < hi)
    return inside
