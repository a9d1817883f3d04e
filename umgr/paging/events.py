"""The non-cooperative userfaultfd events of one target: what the app did
to its memory (UFFD_EVENT_REMOVE, UNMAP, REMAP, FORK).

The target blocks in the kernel until each event has been read, so the
fault loop reads them first and hands each to one short handler here.
Handlers are idempotent: the kernel may report a REMOVE range twice.
"""
from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from umgr.arrays import merged_ranges
from umgr.backends.slots import SlotAllocator
from umgr.kernel import maps
from umgr.kernel import uffd as uffdmod
from umgr.kernel.uffd import ForkEvent, RemapEvent, RemoveEvent, UnmapEvent
from umgr.paging.core import TargetCore
from umgr.paging.crashpoint import crash_point
from umgr.paging.pagetable import PAGE_SHIFT, PageTable, State, page_up
from umgr.paging.removes import RemoveAttribution
from umgr.trace import DISCARDED, UNMAPPED

EMPTY = np.empty(0, np.int64)

# Fork events no FORKED has named yet, kept at most (_drop_oldest_fork).
UNCLAIMED_FORKS_MAX = 256
# App discards remembered between two rechecks (pinning.Pinning.recheck):
# past this many, merged, and if they stay apart, one span over them all.
APP_DISCARDED_MAX = 4096

log = logging.getLogger("umgr.target")


class MemoryEvents:
    def __init__(self, core: TargetCore, removes: RemoveAttribution):
        self.core = core
        self.removes = removes
        self.forks: list[ForkedMemory] = []   # children's uffds and memory, waiting for their pid
        # Why a fork's child may not be served (the daemon's caps on what a
        # user makes it hold), or None: set by the daemon.
        self.refuse_fork: Callable[[], str | None] = lambda: None

    def handle_all(self, events: list) -> None:
        """Each event, in order; a run of REMOVEs (a zap's: one per range)
        is attributed in one go."""
        i = 0
        while i < len(events):
            j = i
            while j < len(events) and type(events[j]) is RemoveEvent:
                j += 1
            if j - i > 1:
                self._on_removes(events[i:j])
                i = j
            else:
                self.handle(events[i])
                i += 1

    def handle(self, event) -> None:
        kind = type(event)
        if kind is RemoveEvent:
            self._on_remove(event.start, event.end)
        elif kind is UnmapEvent:
            self._on_unmap(event.start, event.end)
        elif kind is RemapEvent:
            self._on_remap(event)
        elif kind is ForkEvent:
            self.core.stats.forks += 1
            self.core.may_share_pages = True
            if len(self.forks) >= UNCLAIMED_FORKS_MAX:
                self._drop_oldest_fork()
            child_uffd = uffdmod.Userfaultfd(event.fd)
            refusal = self.refuse_fork()
            if refusal is not None:
                self._refuse_fork(child_uffd, refusal)
                return
            try:
                self.forks.append(ForkedMemory.at_fork(child_uffd, self.core))
            except SlotCountFull:
                # (Its uffd closed, the child's ranges would be unregistered
                # and its paged-out pages read as zeros: it is killed instead.)
                why = "a swap slot of its memory has 65535 references"
                log.warning("%s: its forked child will be killed: %s", self.core.label, why)
                self.forks.append(ForkedMemory.refused_at_fork(child_uffd, self.core, why))

    def _refuse_fork(self, child_uffd: uffdmod.Userfaultfd, refusal: str) -> None:
        """A fork whose child the daemon will not serve. With nothing of the
        parent's out of memory (no page swapped or being zapped), the
        child has all its pages: its uffd is closed now, which unregisters
        its ranges, and it runs unmanaged (its shim, told there is no fork
        event, attaches as a new process, within the caps or not at all).
        Else its paged-out pages could come only from the daemon: it is
        killed once it is named (refused_at_fork)."""
        pt = self.core.pt
        if pt.swapped == 0 and pt.count(State.ZAPPING) == 0:
            child_uffd.close()
            log.warning("%s: its forked child runs unmanaged: %s", self.core.label, refusal)
            return
        log.warning("%s: its forked child will be killed: %s", self.core.label, refusal)
        self.forks.append(ForkedMemory.refused_at_fork(child_uffd, self.core, refusal))

    def _drop_oldest_fork(self) -> None:
        """Forks nobody names (children of a raw clone or _Fork(), which run
        no atfork handler) would pile up for the parent's life, each with a
        descriptor of the daemon's, a copy of the table and a reference on
        every slot it names (16-bit counts: 65535 forks would wrap one to
        free while named). Past UNCLAIMED_FORKS_MAX the oldest goes: a fork
        the shim names is named at once, so it is none of those."""
        oldest = self.forks.pop(0)
        oldest.close()
        log.warning("%s: more than %d forks never named (children made without fork(): raw clone, _Fork); "
                    "the oldest dropped", self.core.label, UNCLAIMED_FORKS_MAX)

    def _on_unmap(self, start: int, end: int) -> None:
        core = self.core
        crash_point("unmap")
        core.stats.unmaps += 1
        log.debug("%s: unmap %#x-%#x", core.label, start, end)
        lo, hi = start >> PAGE_SHIFT, page_up(end)
        core.trace.gone(lo, hi, UNMAPPED)
        core.left_residency(core.pt.find_state(lo, hi, State.RESIDENT)[0])
        core.slots.free(core.pt.remove(lo, hi))

    def _on_remove(self, start: int, end: int) -> None:
        """A REMOVE event: our own zap's, or the app's madvise (removes.py
        tells them apart). Pages of the zap in flight that the app discarded
        too are settled by the evictor when the zap returns (FRESH, not
        SWAPPED: their copy would resurrect data the app threw away)."""
        lo, hi = start >> PAGE_SHIFT, page_up(end)
        if self.removes.count(lo, hi):
            self.core.stats.own_removes += 1
        else:
            self._on_app_remove(lo, hi, start, end)

    def _on_removes(self, events: list) -> None:
        """_on_remove() of each, in order (what one does to the table does
        not change whose the next one is)."""
        lo = [event.start >> PAGE_SHIFT for event in events]
        hi = [page_up(event.end) for event in events]
        own = self.removes.count_many(lo, hi)
        self.core.stats.own_removes += sum(own)
        for i in [i for i, ours in enumerate(own) if not ours]:
            self._on_app_remove(lo[i], hi[i], events[i].start, events[i].end)

    def _on_app_remove(self, lo: int, hi: int, start: int, end: int) -> None:
        core = self.core
        core.stats.app_removes += 1
        crash_point("app-remove")
        log.debug("%s: app discarded %#x-%#x", core.label, start, end)
        core.trace.gone(lo, hi, DISCARDED)
        core.left_residency(core.pt.find_state(lo, hi, State.RESIDENT)[0])
        core.slots.free(core.pt.discard(lo, hi, keep=(State.ZAPPING,)))
        core.app_discarded.append((lo, hi))
        if len(core.app_discarded) > APP_DISCARDED_MAX:   # (a discard a call, thousands a second)
            core.app_discarded = list(zip(*(part.tolist() for part in merged_ranges(core.app_discarded))))
            if len(core.app_discarded) > APP_DISCARDED_MAX // 2:   # (apart: one span over them all)
                core.app_discarded = [(core.app_discarded[0][0], core.app_discarded[-1][1])]

    def _on_remap(self, event: RemapEvent) -> None:
        """mremap moved pages (the event comes after the move is complete;
        the kernel keeps the uffd-wp bit on moved PTEs under EVENT_REMAP)."""
        core = self.core
        crash_point("remap")
        core.stats.remaps += 1
        log.debug("%s: remap %#x -> %#x (%#x bytes)", core.label, event.src, event.dst, event.length)
        npages = event.length >> PAGE_SHIFT
        src, dst = event.src >> PAGE_SHIFT, event.dst >> PAGE_SHIFT
        core.trace.moved(src, dst, npages)
        core.left_residency(core.pt.find_state(src, src + npages, State.RESIDENT)[0])
        # A maps scan may have registered the new range before this event:
        # what it recorded there is replaced by the moved pages.
        core.slots.free(core.pt.move(src, dst, npages))
        moved = np.arange(dst, dst + npages, dtype=np.int64)
        states = core.pt.states(moved)
        # An eviction batch in flight names the old addresses, so the moved
        # pages leave it. EVICTING pages are still mapped: they stay resident
        # (still write-protected: a write unprotects them).
        core.release(moved[states == State.EVICTING], State.EVICTING)
        zapping = moved[states == State.ZAPPING]
        if len(zapping) and self.removes.active:
            # The zap (or move) in flight names the old addresses: if the
            # app moved the pages back before it ran, it would take them.
            # They stay ZAPPING (a write waits, as during any zap) and the
            # evictor settles them once it has returned.
            core.zapping_moved.append(zapping)
        else:
            core.settle_moved_zapping(zapping, EMPTY)
        # The eviction order names pages by address: give it the new ones
        # (those that were EVICTING or ZAPPING it heard of as they came back).
        core.became_resident(moved[states == State.RESIDENT])

    def close(self) -> None:
        for child in self.forks:
            child.close()
        self.forks.clear()


class SlotCountFull(Exception):
    """A slot a forked child would name has no room for another reference."""


@dataclass(eq=False)
class ForkedMemory:
    """A forked child's userfaultfd and page table, as they were at the
    fork. The parent's fork() waits until its fork event is read, so the
    table is taken before the parent can fault a page back in or evict
    one, and the swapped pages' slots get the child's reference now: the
    parent freeing one before the child is known (its FORKED, or the
    child's own HELLO if the parent dies first) cannot lose the child's copy."""
    uffd: uffdmod.Userfaultfd
    pages: PageTable
    slots: SlotAllocator
    born: float                  # CLOCK_BOOTTIME seconds when the fork event was read
    refused: str = ""            # why the child is not to be served (its table was not kept): it is killed once known

    @classmethod
    def at_fork(cls, uffd: uffdmod.Userfaultfd, core: TargetCore) -> "ForkedMemory":
        """Raises SlotCountFull, nothing taken, when a slot's reference
        count has no room for the child's."""
        pages = core.pt.forked()
        if not all(core.slots.may_incref(slots) for slots in pages.slot_steps()):
            raise SlotCountFull
        for slots in pages.slot_steps():
            core.slots.incref(slots)
        return cls(uffd, pages, core.slots, time.clock_gettime(time.CLOCK_BOOTTIME))

    @classmethod
    def refused_at_fork(cls, uffd: uffdmod.Userfaultfd, core: TargetCore, why: str) -> "ForkedMemory":
        """A fork whose child the daemon will not serve (why): no table is
        kept, and the uffd stays open so that the child's paged-out pages
        wait (not zeros) until it is known, and killed."""
        return cls(uffd, PageTable(), core.slots, time.clock_gettime(time.CLOCK_BOOTTIME), refused=why)

    def fit_to_child(self, pid: int) -> None:
        """The table as the kernel made the child's memory, read from its
        smaps once it is known (the parent's fork() returned as soon as its
        event was read, so not sooner): a MADV_WIPEONFORK mapping is empty
        in the child, its pages zero on first touch, and a MADV_DONTFORK one
        is not there at all (what the child maps in its place, its shim's
        probe page say, is not registered). Both stay in the parent's table
        as it was: served from the parent's slots, the child would read the
        data the parent wiped (keys, random state) or keep phantom pages
        counted against its budget. So the table keeps only what lies in the
        child's registered mappings. (If the child exited meanwhile, none
        are left: the table goes, and its uffd's mm with it.)"""
        registered, wiped = maps.registered_and_wiped(pid)
        for lo, hi in wiped:
            self.slots.free(self.pages.discard(lo >> PAGE_SHIFT, page_up(hi)))
        for lo, hi in _not_mapped([(region.vpn, region.end) for region in self.pages.regions], registered):
            self.slots.free(self.pages.remove(lo, hi))

    def close(self) -> None:
        """Never claimed: its slots and its uffd go (the child, if it still
        runs, is killed by its shim for want of a daemon)."""
        self.pages.clear(self.slots.free)
        self.uffd.close()


def _not_mapped(spans: list[tuple[int, int]], mapped: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of the page spans [lo, hi) (vpns) that no mapping (byte
    addresses, sorted and apart, as /proc/PID/maps lists them) covers."""
    pages = [(start >> PAGE_SHIFT, page_up(end)) for start, end in mapped]
    ends = [end for _, end in pages]
    holes = []
    for lo, hi in spans:
        at = lo
        for j in range(bisect.bisect_right(ends, lo), len(pages)):   # (from the first ending past lo)
            start, end = pages[j]
            if start >= hi:
                break
            if start > at:
                holes.append((at, start))
            at = max(at, end)
        if at < hi:
            holes.append((at, hi))
    return holes
