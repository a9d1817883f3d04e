"""Per-target page table: the state and swap slot of every managed page.

Flat numpy arrays per registered region (one state byte, one int32 slot and
one flag byte per page: 6 bytes a page; with the eviction queues' 8 per
resident page the daemon keeps about 14 bytes per managed page, more for the
hot pages' ghosts), never a Python object per
page: a target with 16 GiB of managed memory has four million pages. Pages
are named by vpn (virtual address >> 12). Every state change goes through
this module, which keeps the per-state counts the budget and the metrics read.

A new region's arrays are all zeros (FRESH, NO_SLOT, no flag) and made by
umgr.arrays.sparse_zeros, which for large arrays is an anonymous mapping the
kernel fills only where it is written, 4 KiB at a time (no huge pages): a
region costs memory for the parts of it that were touched, not for its
virtual size (a 64 GiB MAP_NORESERVE mapping is 96 MiB of arrays, almost
none of it backed). Copies keep that property (sparse_copy), and
whole-array work goes in chunks, so no temporary is as large as a region
either.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from umgr.arrays import sparse_zeros
from umgr.kernel import PAGE_SHIFT, PAGE_SIZE

__all__ = ["PAGE_SHIFT", "PAGE_SIZE", "NO_SLOT", "State", "Flag", "PageTable", "Region", "runs", "page_up"]

NO_SLOT = 0   # slot 0 is never handed out (umgr/backends/slots.py): zeros name no slot
SMALL = 8   # arrays this short are cheaper in a Python loop than in a numpy call
CHUNK = 1 << 20   # pages per step of a whole-region scan: bounds its temporaries
# Pages per step of histogram(): np.bincount makes an int64 copy of its
# input, 8 bytes a page, and glibc keeps a freed block of that size in the
# heap once it has handed one out (its mmap threshold rises to it): at
# CHUNK, 8 MiB of the daemon's memory for good; here 512 KiB.
COUNT_STEP = 1 << 16
SLOT_STEP = 1 << 14   # pages per step of gathering a region's slots


class State:
    FRESH = 0      # never written, or discarded: reads as zero
    RESIDENT = 1   # mapped in the target
    EVICTING = 2   # write-protected, copy on its way to the backend
    ZAPPING = 3    # copy durable, zap requested: must stay write-protected
    SWAPPED = 4    # zapped; content in a slot
    PINNED = 5     # resident and never to be evicted (cannot be read back, mlocked)
    # Mapped and write-protected, but using no memory of the target's own, so
    # not counted resident and never evicted (zapping would free nothing). A
    # write WP-faults and makes the page RESIDENT.
    ZERO = 6       # on the kernel's shared zero page
    SHARED = 7     # shared copy-on-write with another process (after fork)
    UNMAPPED = 255  # not in any region (only ever returned, never stored)


RESIDENT_STATES = (State.RESIDENT, State.EVICTING, State.ZAPPING, State.PINNED)


class Flag:
    """Per-page flag bits (Region.flags). A flag only means something while
    the page has content in memory: the table clears a page's flags when it
    leaves FLAGGED_STATES (becomes FRESH, SWAPPED, PINNED, ...)."""
    DISCARDABLE = 1  # umgr_advise(DISCARDABLE) and not written since: evict
                     # without writing it (it reads back as zero). The page
                     # is write-protected, so a write faults and clears this.
    PREFETCHED = 2   # brought in by the prefetch policy, no use seen yet
    CLUSTERED = 4    # with PREFETCHED: brought beside a lone fault by the C fast path
                     # (the readahead policy's cluster), no use seen yet


FLAGGED_STATES = (State.RESIDENT, State.EVICTING, State.ZAPPING)   # consecutive values


@dataclass(eq=False)
class Region:
    vpn: int          # first page
    state: np.ndarray  # uint8 per page
    slot: np.ndarray   # int32 per page
    flags: np.ndarray = None  # uint8 per page (Flag bits)
    backing: object = None    # where state and slot live, if not in memory (umgr/paging/tablefile.py)

    def __post_init__(self):
        if self.flags is None:
            self.flags = sparse_zeros(len(self.state), np.uint8)

    @property
    def npages(self) -> int:
        return len(self.state)

    @property
    def end(self) -> int:
        return self.vpn + len(self.state)

    @classmethod
    def empty(cls, vpn: int, npages: int) -> "Region":
        return cls(vpn, sparse_zeros(npages, np.uint8), sparse_zeros(npages, np.int32))

    def steps(self, a: int, b: int, of: str = "both") -> Iterator[tuple[int, int]]:
        """Steps [lo, hi) of pages [a, b) (indexes into the arrays), of at
        most CHUNK pages, outside of which every page is FRESH ("state"),
        with no slot ("slot"), or both ("both"; and so with no flag):
        where a scan for anything else need look. Arrays in memory: every
        step (their untouched parts read as the shared zero page). Arrays
        in a file: where that array holds data, since reading a hole
        through a shared mapping fills it in the page cache (5 bytes a
        page: the exit of a 64 GiB reservation read 20 MB of holes)."""
        if self.backing is None:
            yield from chunk_steps(a, b)
        else:
            yield from self.backing.steps(a, b, of)

    def piece(self, lo: int, hi: int) -> "Region":
        """A copy of pages [lo, hi) (vpns) of this region."""
        a, b = lo - self.vpn, hi - self.vpn
        copy = Region(lo, sparse_zeros(b - a, np.uint8), sparse_zeros(b - a, np.int32), sparse_copy(self.flags[a:b]))
        for step, end in self.steps(a, b):
            copy_nonzero(copy.state[step - a:end - a], self.state[step:end])
            copy_nonzero(copy.slot[step - a:end - a], self.slot[step:end])
        return copy


def chunk_steps(a: int, b: int) -> Iterator[tuple[int, int]]:
    for lo in range(a, b, CHUNK):
        yield lo, min(lo + CHUNK, b)


def sparse_copy(array: np.ndarray) -> np.ndarray:
    """A copy that writes only the nonzero entries into fresh zeros: the
    untouched (zero) parts of a lazily backed array stay untouched."""
    out = sparse_zeros(len(array), array.dtype)
    copy_nonzero(out, array)
    return out


def copy_nonzero(out: np.ndarray, array: np.ndarray) -> None:
    """out[i] = array[i] wherever array[i] is not zero (out is zeros)."""
    for lo in range(0, len(array), CHUNK):
        part = array[lo:lo + CHUNK]
        nonzero = np.flatnonzero(part)
        out[lo + nonzero] = part[nonzero]


class MemoryArrays:
    """Where a table's regions keep their arrays: in the daemon's memory.
    A persistent table (umgr/paging/tablefile.py) moves a region's arrays
    to a file when a page of it first gets a slot; every region is made,
    cut and dropped through these calls."""

    def holding_slots(self, region: Region) -> None:
        """A page of `region` is about to name a slot."""

    def empty(self, vpn: int, npages: int) -> Region:
        return Region.empty(vpn, npages)

    def piece(self, region: Region, lo: int, hi: int) -> Region:
        return region.piece(lo, hi)

    def moved(self, region: Region, vpn: int) -> None:
        region.vpn = vpn

    def drop(self, region: Region) -> None:
        pass


IN_MEMORY = MemoryArrays()


@dataclass
class PageTable:
    regions: list[Region] = field(default_factory=list)  # sorted, disjoint
    counts: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    arrays: MemoryArrays = IN_MEMORY
    layout: int = 0   # bumped whenever a region is added, cut, moved or dropped, or gets new arrays
    # (layout and region count, each region's first and end vpn): by_region's, made anew when they change
    _bounds: tuple = field(default=(None, None, None), init=False, repr=False, compare=False)
    _managed: tuple = field(default=(None, 0), init=False, repr=False, compare=False)   # (layout key, pages)

    # ---- queries -----------------------------------------------------
    @property
    def resident(self) -> int:
        counts = self.counts   # RESIDENT_STATES, written out: read on every fault
        return int(counts[State.RESIDENT] + counts[State.EVICTING] + counts[State.ZAPPING] + counts[State.PINNED])

    @property
    def swapped(self) -> int:
        return int(self.counts[State.SWAPPED])

    @property
    def managed(self) -> int:
        """Pages in all regions (asked at each registration: a heap grown
        by small commits has thousands of regions, so the sum is kept
        until the layout changes)."""
        key = (self.layout, len(self.regions))   # (as _region_bounds keys its arrays)
        if self._managed[0] != key:
            self._managed = (key, sum(len(r.state) for r in self.regions))
        return self._managed[1]

    def find(self, vpn: int) -> Region | None:
        i = bisect.bisect_right(self.regions, vpn, key=lambda r: r.vpn) - 1
        if i >= 0 and vpn < self.regions[i].end:
            return self.regions[i]
        return None

    def gaps(self, vpn_lo: int, vpn_hi: int) -> list[tuple[int, int]]:
        """The parts of [vpn_lo, vpn_hi) that no region covers."""
        out, at = [], vpn_lo
        for _, lo, hi in self._overlapping(vpn_lo, vpn_hi):
            if lo > at:
                out.append((at, lo))
            at = hi
        if at < vpn_hi:
            out.append((at, vpn_hi))
        return out

    def by_region(self, vpns: np.ndarray) -> Iterator[tuple[Region, slice, np.ndarray]]:
        """For sorted vpns: (region, their positions in vpns, indices in region);
        vpns outside every region are left out."""
        n = len(vpns)
        if not n:
            return
        region = self.find(int(vpns[0]))
        if region is not None and int(vpns[-1]) < region.end:   # the fault path's common case
            yield region, slice(None), vpns - region.vpn
            return
        # An eviction batch of an interpreter's heap spans hundreds of
        # regions (1 MiB arenas; node's are 256 KiB): each vpn's region and
        # index in it found in a few array operations, then one slice per
        # region (its Python, ~0.5 us, is all a region costs).
        regions = self.regions
        if not regions:
            return
        starts, ends = self._region_bounds()
        which = np.searchsorted(starts, vpns, side="right") - 1   # the last region starting at or before
        which[(which >= 0) & (vpns >= ends[which])] = -1           # past its end: in no region
        idx = vpns - starts[which].astype(vpns.dtype, copy=False)
        cuts = (np.flatnonzero(np.diff(which)) + 1).tolist()
        firsts = [0] + cuts
        for a, b, k in zip(firsts, cuts + [n], which[firsts].tolist()):
            if k >= 0:
                yield regions[k], slice(a, b), idx[a:b]

    def _region_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Each region's first and end vpn, made anew only when the layout
        changed. node's V8 heap is 1500 regions of 256 KiB for 400 MB
        (--min-region 256K): made on every call, they cost 80 us, more
        than the rest of a lookup of a few pages. (states() there: 16
        scattered pages 150 us -> 30-40, 1024 pages 2.2 ms -> 0.5-0.9,
        with the per-region work above.)"""
        key = (self.layout, len(self.regions))
        if self._bounds[0] != key:
            starts = np.fromiter((r.vpn for r in self.regions), np.int64, len(self.regions))
            ends = starts + np.fromiter((r.npages for r in self.regions), np.int64, len(self.regions))
            self._bounds = (key, starts, ends)
        return self._bounds[1], self._bounds[2]

    def state_of(self, vpn: int) -> int:
        region = self.find(vpn)
        return int(region.state[vpn - region.vpn]) if region is not None else State.UNMAPPED

    def slot_of(self, vpn: int) -> int:
        region = self.find(vpn)
        return int(region.slot[vpn - region.vpn]) if region is not None else NO_SLOT

    def bounds(self, vpn: int) -> tuple[int, int] | None:
        """[first, end) vpns of the region holding vpn, or None."""
        region = self.find(vpn)
        return (region.vpn, region.end) if region is not None else None

    def vpns_in(self, state: int) -> np.ndarray:
        """Every page in `state`, sorted (a scan of the whole table, unless
        none is: reading a saved table's untouched parts would fill them
        with page-cache pages)."""
        if not self.counts[state]:
            return np.empty(0, np.int64)
        found = [r.vpn + lo + np.flatnonzero(r.state[lo:hi] == state)
                 for r in self.regions
                 for lo, hi in (chunk_steps(0, r.npages) if state == State.FRESH else r.steps(0, r.npages, "state"))]
        return np.concatenate(found).astype(np.int64) if found else np.empty(0, np.int64)

    def is_in_state(self, vpns: np.ndarray, state: int = State.RESIDENT) -> np.ndarray:
        """Which of these vpns (any order) are in `state`: the eviction
        policy's liveness test for compacting its stale entries."""
        vpns = np.asarray(vpns)
        order = np.argsort(vpns, kind="stable")
        found = np.empty(len(vpns), bool)
        found[order] = self.states(vpns[order]) == state
        return found

    def count(self, state: int) -> int:
        return int(self.counts[state])

    def states(self, vpns: np.ndarray) -> np.ndarray:
        out = np.full(len(vpns), State.UNMAPPED, np.uint8)
        for region, pos, idx in self.by_region(vpns):
            out[pos] = region.state[idx]
        return out

    def slots(self, vpns: np.ndarray) -> np.ndarray:
        out = np.full(len(vpns), NO_SLOT, np.int32)
        for region, pos, idx in self.by_region(vpns):
            out[pos] = region.slot[idx]
        return out

    def has_flag(self, vpns: np.ndarray, flag: int) -> np.ndarray:
        """For sorted vpns: which have `flag` (False outside every region)."""
        out = np.zeros(len(vpns), bool)
        for region, pos, idx in self.by_region(vpns):
            out[pos] = (region.flags[idx] & flag) != 0
        return out

    def set_flag(self, vpns: np.ndarray, flag: int, on: bool = True) -> None:
        """Set (or clear) `flag` on sorted vpns. Set only sticks on pages in
        FLAGGED_STATES (others have no content in memory to flag)."""
        for region, pos, idx in self.by_region(vpns):
            if on:
                states = region.state[idx]
                idx = idx[(states >= FLAGGED_STATES[0]) & (states <= FLAGGED_STATES[-1])]
                region.flags[idx] |= flag
            else:
                region.flags[idx] &= ~np.uint8(flag)

    def find_state(self, vpn_lo: int, vpn_hi: int, state: int, limit: int | None = None) -> tuple[np.ndarray, int]:
        """The pages of [vpn_lo, vpn_hi) in `state`, sorted, at most `limit`
        of them; and the vpn to go on from (vpn_hi when all were returned)."""
        found: list[np.ndarray] = []
        count = 0
        for region, lo, hi in self._overlapping(vpn_lo, vpn_hi):
            a, b = lo - region.vpn, hi - region.vpn
            # (a bool a page: no temporary of a whole region)
            for step, end in (chunk_steps(a, b) if state == State.FRESH else region.steps(a, b, "state")):
                hits = region.vpn + step + np.flatnonzero(region.state[step:end] == state)
                if limit is not None and count + len(hits) >= limit:
                    hits = hits[:limit - count]
                    found.append(hits)
                    return np.concatenate(found).astype(np.int64), (int(hits[-1]) + 1 if len(hits) else region.vpn + step)
                found.append(hits)
                count += len(hits)
        return (np.concatenate(found).astype(np.int64) if found else np.empty(0, np.int64)), vpn_hi

    def clear_flag_everywhere(self, flag: int) -> None:
        """`flag` off on every page."""
        for region in self.regions:
            if region.flags.any():
                region.flags &= ~np.uint8(flag)

    def flagged(self, flag: int) -> int:
        """How many pages have `flag` (a scan: for status and tests)."""
        return sum(int(np.count_nonzero(r.flags & flag)) for r in self.regions)

    # ---- transitions -------------------------------------------------
    def set(self, vpns: np.ndarray, state: int, slots: np.ndarray | int | None = None) -> None:
        """Set the state (and, if given, the slot) of sorted vpns."""
        for region, pos, idx in self.by_region(vpns):
            self._count_out(region.state[idx])
            region.state[idx] = state
            self.counts[state] += len(idx)
            if state not in FLAGGED_STATES:
                region.flags[idx] = 0
            if slots is not None:
                values = slots if np.isscalar(slots) else slots[pos]
                if region.backing is None and np.any(values != NO_SLOT):
                    self._holding_slots(region)
                region.slot[idx] = values

    def _holding_slots(self, region: Region) -> None:
        state = region.state
        self.arrays.holding_slots(region)
        if region.state is not state:   # moved to a file: whoever points at the arrays must look again
            self.layout += 1

    def set_state(self, vpn: int, state: int, slot: int | None = None) -> None:
        """One page's state (and slot, if given): the fault path's
        single-page form of set()."""
        region = self.find(vpn)
        if region is None:
            return
        index = vpn - region.vpn
        self.counts[region.state[index]] -= 1
        region.state[index] = state
        self.counts[state] += 1
        if state not in FLAGGED_STATES:
            region.flags[index] = 0
        if slot is not None:
            if region.backing is None and slot != NO_SLOT:
                self._holding_slots(region)
            region.slot[index] = slot

    def clear_flag(self, vpn: int, flag: int) -> bool:
        """Clear `flag` on one page; True when it was set."""
        region = self.find(vpn)
        if region is None or not region.flags[vpn - region.vpn] & flag:
            return False
        region.flags[vpn - region.vpn] &= ~np.uint8(flag)
        return True

    def take_kept_slots(self) -> np.ndarray:
        """Resident pages give up the swap copies they kept (clean copies):
        returns those slots, to be freed."""
        taken = []
        for region in self.regions:
            for lo, hi in region.steps(0, region.npages, "slot"):
                state, slot = region.state[lo:hi], region.slot[lo:hi]
                kept = np.flatnonzero(slot)
                kept = kept[state[kept] == State.RESIDENT]
                taken.append(slot[kept].copy())
                slot[kept] = NO_SLOT
        return joined(taken)

    def add(self, vpn: int, npages: int, present: np.ndarray | None = None) -> tuple[Region, np.ndarray]:
        """A new registered range; pages marked present start RESIDENT.
        Returns the region and the slots freed from whatever it replaced."""
        freed = self.remove(vpn, vpn + npages)
        region = self.arrays.empty(vpn, npages)
        resident = 0
        if present is not None:
            region.state[present] = State.RESIDENT
            resident = int(np.count_nonzero(present))
        self.counts[State.RESIDENT] += resident   # counted, not scanned: the rest is FRESH
        self.counts[State.FRESH] += npages - resident
        bisect.insort(self.regions, region, key=lambda r: r.vpn)
        self.layout += 1
        return region, freed

    def remove(self, vpn_lo: int, vpn_hi: int) -> np.ndarray:
        """Pages [vpn_lo, vpn_hi) are gone (munmap): drop them, splitting
        regions as needed. Returns their slots, to be freed."""
        freed = []
        for region, lo, hi in list(self._overlapping(vpn_lo, vpn_hi)):
            self.counts -= _counts_of(region, lo - region.vpn, hi - region.vpn)
            for a, b in region.steps(lo - region.vpn, hi - region.vpn, "slot"):
                freed.append(nonzero_slots(region.slot[a:b]))
            self._split_out(region, lo, hi)
        return joined(freed)

    def discard(self, vpn_lo: int, vpn_hi: int, keep: tuple[int, ...] = ()) -> np.ndarray:
        """The app discarded [vpn_lo, vpn_hi) (MADV_DONTNEED/REMOVE): pages read
        as zero from now on. Pages in a state listed in `keep` are left alone.
        Returns the slots to free. Idempotent: the kernel may report a range twice."""
        freed = []
        for region, lo, hi in self._overlapping(vpn_lo, vpn_hi):
            # (FRESH pages with no slot outside its steps stay as they are)
            for a, b in region.steps(lo - region.vpn, hi - region.vpn):
                states = region.state[a:b]
                hit = ~np.isin(states, keep) if keep else np.ones(b - a, bool)
                slots = region.slot[a:b]
                freed.append(slots[hit & (slots != NO_SLOT)])
                self._count_out(states[hit])
                states[hit] = State.FRESH
                slots[hit] = NO_SLOT
                region.flags[a:b][hit] = 0
                self.counts[State.FRESH] += int(hit.sum())
        return joined(freed)

    def move(self, src_vpn: int, dst_vpn: int, npages: int) -> np.ndarray:
        """mremap moved [src, src+n) to dst: states and slots follow the pages.
        Returns the slots of what the move replaced at dst, to be freed."""
        # (the moved pages keep their states: the counts do not change,
        # and a saved region's holes are not read to count them twice)
        pieces = [(lo, self.arrays.piece(region, lo, hi))
                  for region, lo, hi in self._overlapping(src_vpn, src_vpn + npages)]
        self._cut(src_vpn, src_vpn + npages)
        replaced = self.remove(dst_vpn, dst_vpn + npages)
        # The newest piece first: a daemon killed in this loop leaves the
        # pieces already moved newer than those left (recovery._remap).
        for lo, piece in reversed(pieces):
            self.arrays.moved(piece, dst_vpn + (lo - src_vpn))
            bisect.insort(self.regions, piece, key=lambda r: r.vpn)
        self.layout += 1
        return replaced

    def relocate(self, region: Region, vpn: int) -> np.ndarray:
        """Give a whole region of the table a new place, as it is (no new
        piece: a saved table's file keeps its generation, which
        recovery._remap reads). Returns the slots of what it replaced there."""
        self.regions = [r for r in self.regions if r is not region]
        replaced = self.remove(vpn, vpn + region.npages)
        self.arrays.moved(region, vpn)
        bisect.insort(self.regions, region, key=lambda r: r.vpn)
        self.layout += 1
        return replaced

    def clear(self, free_slots: Callable[[np.ndarray], None]) -> None:
        """Everything is gone (exit, exec): every slot named is handed to
        free_slots, in steps (slot_steps)."""
        for slots in self.slot_steps():
            free_slots(slots)
        for region in self.regions:
            self.arrays.drop(region)
        self.regions.clear()
        self.layout += 1
        self.counts[:] = 0

    def copy(self, arrays: MemoryArrays = IN_MEMORY) -> "PageTable":
        """A deep copy, its arrays made by `arrays`."""
        regions = [arrays.piece(r, r.vpn, r.end) for r in self.regions]
        return PageTable(regions, self.counts.copy(), arrays)

    def forked(self, arrays: MemoryArrays = IN_MEMORY) -> "PageTable":
        """The table a forked child starts with. Its swapped pages name the
        parent's slots (the caller takes a reference on each). Pages in an
        eviction batch are resident in the child: still present there, or,
        if the zap came first, swapped in the shared slot (FRESH without
        one). Flags (application hints) stay the parent's."""
        child = self.copy(arrays)
        for region in child.regions:
            region.flags = sparse_zeros(region.npages, np.uint8)
            for lo, hi in region.steps(0, region.npages, "state"):   # (slots read where ZAPPING only)
                state, slot = region.state[lo:hi], region.slot[lo:hi]
                evicting = state == State.EVICTING
                zapping = state == State.ZAPPING
                state[evicting] = State.RESIDENT
                state[zapping] = np.where(slot[zapping] == NO_SLOT, State.FRESH, State.SWAPPED)
        child.recount()
        return child

    def slot_steps(self) -> Iterator[np.ndarray]:
        """The slots named, a step of a region at a time (a fork takes a
        reference on each, an exit frees them: at 4 bytes a page, one array
        of them all, and the allocator's work on it, would raise the
        daemon's peak memory by several times the page table's 6)."""
        for region in self.regions:
            for lo, hi in region.steps(0, region.npages, "slot"):
                yield from named_steps(region.slot[lo:hi])

    # ---- helpers -----------------------------------------------------
    def _overlapping(self, vpn_lo: int, vpn_hi: int) -> Iterator[tuple[Region, int, int]]:
        i = max(0, bisect.bisect_right(self.regions, vpn_lo, key=lambda r: r.vpn) - 1)
        while i < len(self.regions) and self.regions[i].vpn < vpn_hi:
            region = self.regions[i]
            lo, hi = max(vpn_lo, region.vpn), min(vpn_hi, region.end)
            if lo < hi:
                yield region, lo, hi
            i += 1

    def _cut(self, vpn_lo: int, vpn_hi: int) -> None:
        """Remove pages without counting them out (they move on: move())."""
        for region, lo, hi in list(self._overlapping(vpn_lo, vpn_hi)):
            self._split_out(region, lo, hi)

    def _split_out(self, region: Region, lo: int, hi: int) -> None:
        """Replace `region` by its parts outside [lo, hi). The parts are
        made before the region is dropped: a persistent table always has
        every page in some file."""
        self.regions.remove(region)
        self.layout += 1
        for keep_lo, keep_hi in ((region.vpn, lo), (hi, region.end)):
            if keep_hi > keep_lo:
                bisect.insort(self.regions, self.arrays.piece(region, keep_lo, keep_hi), key=lambda r: r.vpn)
        self.arrays.drop(region)

    def recount(self) -> None:
        """Per-state counts from the arrays (a table loaded from files)."""
        self.counts[:] = 0
        for region in self.regions:
            self.counts += _counts_of(region, 0, region.npages)

    def _count_out(self, states: np.ndarray) -> None:
        if len(states) <= SMALL:
            for state in states.tolist():
                self.counts[state] -= 1
        else:
            self.counts -= histogram(states)


def _counts_of(region: Region, a: int, b: int) -> np.ndarray:
    """Pages [a, b) of the region per state: its steps' states counted,
    the pages outside them FRESH without being read."""
    counts = np.zeros(256, np.int64)
    for lo, hi in region.steps(a, b, "state"):
        counts += histogram(region.state[lo:hi])
    counts[State.FRESH] += (b - a) - int(counts.sum())
    return counts


def histogram(states: np.ndarray) -> np.ndarray:
    """How many pages are in each state, COUNT_STEP pages at a time."""
    counts = np.zeros(256, np.int64)
    for lo in range(0, len(states), COUNT_STEP):
        counts += np.bincount(states[lo:lo + COUNT_STEP], minlength=256)
    return counts


def joined(slot_arrays: list[np.ndarray]) -> np.ndarray:
    """The slot arrays as one. A single array is returned as it is: the
    munmap of a large region frees 4 bytes a page, and np.concatenate
    would copy them."""
    if len(slot_arrays) == 1:
        return slot_arrays[0]
    return np.concatenate(slot_arrays) if slot_arrays else np.empty(0, np.int32)


def nonzero_slots(slots: np.ndarray) -> np.ndarray:
    """The slots named in an array of them, filled in steps into an array
    of their count: no temporary of the array's size (the munmap of a
    large region gathers 4 bytes for each of its pages, and this is all
    it adds)."""
    named = np.empty(np.count_nonzero(slots), np.int32)
    at = 0
    for part in named_steps(slots):
        named[at:at + len(part)] = part
        at += len(part)
    return named


def named_steps(slots: np.ndarray) -> Iterator[np.ndarray]:
    """The slots named in an array of them, SLOT_STEP pages at a time
    (empty steps left out): no mask of the whole array."""
    for lo in range(0, len(slots), SLOT_STEP):
        part = slots[lo:lo + SLOT_STEP]
        part = part[part != NO_SLOT]
        if len(part):
            yield part


def page_up(addr: int) -> int:
    """The vpn just past a range ending at addr (rounded up to a page)."""
    return (addr + PAGE_SIZE - 1) >> PAGE_SHIFT


def runs(vpns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique vpns as contiguous runs: (first vpns, lengths)."""
    if len(vpns) <= 1:
        return np.asarray(vpns, np.int64), np.ones(len(vpns), np.int64)
    breaks = np.flatnonzero(np.diff(vpns) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(vpns)]))
    return vpns[starts].astype(np.int64), (ends - starts).astype(np.int64)
