"""Taking back a process after a daemon crash: its page table, as the dead
daemon left it in files (umgr/paging/tablefile.py), is settled by what the
kernel says, then every blocked fault is made to fault again.

A page's state in the file is what the dead daemon had stored; pagemap
presence (PAGEMAP_SCAN: present or in the kernel's swap) tells what
happened since:

    absent,  SWAPPED              stays SWAPPED (its slot holds the bytes)
    absent,  ZAPPING with a slot  SWAPPED: the copy was written before the
                                  zap was asked for (evictor.py), and the
                                  zap emptied the page
    absent,  anything else        FRESH (discarded, or never filled)
    present, PINNED/ZERO/SHARED   unchanged (the kernel has them)
    present, ZAPPING              left ZAPPING while the shim's agent may
                                  still be zapping it (a REMOVE leaves it
                                  alone), then settled like the others
    present, anything else        RESIDENT, slot freed: the kernel's copy is
                                  the page (a fill that copied it in before
                                  the crash, an eviction that never zapped)

Before that, the REMOVE, UNMAP and REMAP messages the dead daemon had read
and not yet applied (left in the target's journal, tablefile.EventJournal)
are applied (replay): the app's madvise, munmap or mremap returned when
the message was read, so the kernel's side is done. Applying them again is
harmless: discarding or unmapping twice changes nothing, and a REMAP whose
source the table no longer has was applied already.

Then UFFDIO_WAKE over all of user space: a fault the dead daemon read but
never served is not delivered again, but a woken thread faults again, for
the new reader (measured on Linux 6.18), also in a region the saved table
does not have (one that never had a page in a slot).
"""
from __future__ import annotations

import numpy as np

from umgr.kernel import PAGE_SHIFT
from umgr.kernel.uffd import EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP
from umgr.paging.pagetable import CHUNK, NO_SLOT, PageTable, State, page_up

KERNEL_KEEPS = (State.PINNED, State.ZERO, State.SHARED)


def replay(pt: PageTable, messages: np.ndarray) -> np.ndarray:
    """Apply the unhandled messages (rows of four uffd_msg words, in the
    order read) to the table; returns the slots to free. A REMOVE keeps
    ZAPPING pages, as the live handler does: a REMOVE of the dead daemon's
    own zap names only those."""
    freed = []
    for kind, first, second, third in messages.tolist():
        kind &= 0xFF
        if kind == EVENT_REMOVE:
            freed.append(pt.discard(first >> PAGE_SHIFT, page_up(second), keep=(State.ZAPPING,)))
        elif kind == EVENT_UNMAP:
            freed.append(pt.remove(first >> PAGE_SHIFT, page_up(second)))
        elif kind == EVENT_REMAP:
            freed.append(_remap(pt, first >> PAGE_SHIFT, second >> PAGE_SHIFT, third >> PAGE_SHIFT))
    return _join(freed).astype(np.int32) if freed else np.empty(0, np.int32)


def _remap(pt: PageTable, src: int, dst: int, npages: int) -> np.ndarray:
    """A REMAP not applied, or applied in part: the dead daemon's move
    (PageTable.move) makes the source's pieces (files, in address order,
    each newer than the last), empties the destination, then gives each
    piece its new place, newest first, noting in its header where it came
    from. A crash in that loop leaves pieces at the destination that came
    from this source and are newer than every piece left behind: then the
    pieces left behind follow them as they are, newest first too (so a
    crash of this daemon here leaves the same picture). Else the whole
    range moves, emptying the destination. Returns the slots to free."""
    left = [region for region in pt.regions if region.vpn < src + npages and region.end > src]
    if not left:
        return np.empty(0, np.int32)   # applied
    if any(region.backing is None or region.vpn < src or region.end > src + npages for region in left):
        return pt.move(src, dst, npages)   # (not pieces of a move in files)
    newest_left = max(region.backing.generation for region in left)
    if not any(dst <= region.vpn and region.end <= dst + npages and region.backing is not None
               and region.backing.generation > newest_left and region.backing.moved_from == region.vpn - dst + src
               for region in pt.regions):
        return pt.move(src, dst, npages)   # none arrived
    newest_first = sorted(left, key=lambda region: -region.backing.generation)
    return _join([pt.relocate(region, dst + (region.vpn - src)) for region in newest_first])


def settle(pt: PageTable, present_pages, zapping: bool) -> tuple[np.ndarray, np.ndarray]:
    """Settle the table by presence (`present_pages(vpn, n)`: bool per
    page); ZAPPING pages that are present only when `zapping`. Returns the
    slots to free and the vpns that became RESIDENT. A region is looked at
    CHUNK pages at a time, and pages that stay as they are (the untouched
    FRESH pages of a large reservation, most of it) are never listed: a
    64 GiB reservation's settling took 650 MB of the daemon's memory. Nor
    are a saved region's holes read (Region.steps): their pages are FRESH
    with no slot, and presence alone can change them."""
    to_resident, to_swapped, to_fresh, freed = [], [], [], []
    for region in list(pt.regions):
        at = 0
        for lo, hi in [*region.steps(0, region.npages), (region.npages, region.npages)]:
            for gap in range(at, lo, CHUNK):   # FRESH, no slot: RESIDENT if present
                present = present_pages(region.vpn + gap, min(gap + CHUNK, lo) - gap)
                to_resident.append(region.vpn + gap + np.flatnonzero(present))
            if hi > lo:
                resident, swapped, fresh, slots = _changes(region.state[lo:hi], region.slot[lo:hi],
                                                           present_pages(region.vpn + lo, hi - lo), zapping)
                freed.append(slots)
                for chosen, out in ((resident, to_resident), (swapped, to_swapped), (fresh, to_fresh)):
                    out.append(region.vpn + lo + np.flatnonzero(chosen))
            at = max(at, hi)
    newly_resident = _join(to_resident)
    newly_resident = newly_resident[pt.states(newly_resident) != State.RESIDENT]
    pt.set(_join(to_resident), State.RESIDENT, NO_SLOT)
    pt.set(_join(to_swapped), State.SWAPPED)
    pt.set(_join(to_fresh), State.FRESH, NO_SLOT)
    return _join(freed).astype(np.int32), newly_resident


def _changes(state: np.ndarray, slot: np.ndarray, present: np.ndarray, zapping: bool) -> tuple[np.ndarray, ...]:
    """For a stretch of a region: which pages become RESIDENT, SWAPPED and
    FRESH (masks), and the slots freed (those of pages becoming RESIDENT or
    FRESH). A FRESH page with no slot stays as it is."""
    is_zapping = state == State.ZAPPING
    absent = ~present
    swapped = absent & is_zapping & (slot != NO_SLOT)
    fresh = absent & (state != State.SWAPPED) & ~swapped & ~((state == State.FRESH) & (slot == NO_SLOT))
    resident = present & ~np.isin(state, KERNEL_KEEPS) & (zapping | ~is_zapping) & (state != State.RESIDENT)
    # A RESIDENT page keeping a clean copy gives it up: nothing says
    # the copy was still current when the daemon died.
    resident |= present & (state == State.RESIDENT) & (slot != NO_SLOT)
    return resident, swapped, fresh, slot[(resident | fresh) & (slot != NO_SLOT)].copy()


# UFFDIO_WAKE checks only that the range is page aligned, at or above
# mmap_min_addr and below TASK_SIZE (47-bit user space on x86-64); it wakes
# every waiter of this uffd in the range, registered or not. One call then
# reaches threads blocked in regions the saved table does not have too.
USER_SPACE_END = (1 << 47) - (1 << PAGE_SHIFT)


def _mmap_min_addr() -> int:
    try:
        with open("/proc/sys/vm/mmap_min_addr") as f:
            value = int(f.read())
    except (OSError, ValueError):
        value = 1 << 16
    page = 1 << PAGE_SHIFT
    return max(page, (value + page - 1) // page * page)


def wake_all(pt: PageTable, uffd) -> None:
    """Every thread blocked on a fault of this uffd faults again."""
    start = _mmap_min_addr()
    try:
        uffd.wake(start, USER_SPACE_END - start)
    except OSError:   # a larger address space: region by region
        for region in pt.regions:
            uffd.wake(region.vpn << PAGE_SHIFT, region.npages << PAGE_SHIFT)


def _join(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)
