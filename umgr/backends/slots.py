"""Swap slot allocation with reference counts.

A slot holds one 4 KiB page in a backend. A forked child shares its parent's
swapped pages, so a slot may be named by several targets: it is freed when
the last reference goes. A slot is free while its count is zero.

Slots are handed out in ascending order from where the last allocation
ended, past the slots in use, wrapping at the end of the store: a sweep, as
a log-structured store writes. A batch of victims (sorted by address)
therefore gets runs of consecutive slots wherever the store has free
stretches, and its write is a few large requests instead of one per page;
pages that were neighbours come back with one read of their run. Handing
out the slots freed last instead (a stack) gave a batch as many writes as
pages once random faults had scattered the free slots: 512 one-page
O_DIRECT writes took about 3.5 ms of the daemon's thread per batch,
submitted inline in io_uring_submit. The sweep looks at about n / (free
share) counts per n slots: a nearly full store makes it scan more.

Slot 0 is never handed out: it is the page tables' NO_SLOT, so a table that
is all zeros names no slot and the kernel backs it lazily (a table costs
memory only where its pages are touched; umgr/paging/pagetable.py).
"""
from __future__ import annotations

import collections

from collections.abc import Callable, Iterable

import numpy as np

from umgr.arrays import unique_counts
from umgr.errors import BackendFull
from umgr.kernel import PAGE_SIZE

FEW_SLOTS = 16   # free() of at most this many slots runs on plain integers
FREE_STEP = 1 << 14   # free() works through this many slots at a time: bounds its temporaries
SWEEP_SLACK = 64  # counts an alloc() looks at beyond what the free share predicts


class SlotAllocator:
    def __init__(self, capacity: int):
        """Slots 1 .. capacity: a store's page k+1 is slot k+1, its page 0
        (slot 0) is never used."""
        if capacity <= 0:
            raise ValueError("a backend needs at least one slot")
        self.capacity = capacity
        self.span = capacity + 1   # slot numbers are below this
        self._nfree = capacity
        self._refs = np.zeros(self.span, np.uint16)
        self._sweep = 1            # where the next alloc() starts looking
        # When each slot's page was evicted, on its target's eviction clock
        # (TargetCore.evictions, wrapping): for refault distances.
        self.evicted_at = np.zeros(self.span, np.uint32)
        self.on_release: Callable[[], None] | None = None   # called when slots become free
        # Told which slots became free, before on_release: a store that holds
        # pages in memory drops them (a file's stale blocks cost nothing).
        self.on_free: Callable[[np.ndarray], None] | None = None

    @property
    def used(self) -> int:
        return self.capacity - self._nfree

    @property
    def free_count(self) -> int:
        return self._nfree

    def alloc(self, n: int) -> np.ndarray:
        """n slots with one reference each, ascending from the sweep's
        position (wrapping once); BackendFull when fewer are free (nothing
        is allocated then)."""
        if n > self._nfree:
            raise BackendFull(f"{n} slots wanted, {self._nfree} free of {self.capacity}, "
                              f"{self.capacity * PAGE_SIZE >> 20} MiB")
        if n <= 0:
            return np.empty(0, np.int32)
        found, need, at = [], n, self._sweep
        while need:
            # Enough counts to find `need` free ones at the store's free share, and then some.
            end = min(self.span, at + need * self.span // self._nfree + SWEEP_SLACK)
            free = np.flatnonzero(self._refs[at:end] == 0)[:need] + at
            found.append(free)
            need -= len(free)
            at = int(free[-1]) + 1 if not need else end
            if at >= self.span:
                at = 1
        slots = np.concatenate(found).astype(np.int32)
        self._sweep = at
        self._nfree -= n
        self._refs[slots] = 1
        return slots

    def adopt(self, pieces: Iterable[np.ndarray]) -> None:
        """Start from these references (a restarted daemon's saved tables,
        in pieces: a slot named n times has n references); every other
        slot is free. Counted in place, piece by piece: np.bincount over
        the whole store raised the peak by 50 MB for a 64 GiB swap file,
        and copying its result in backed every count (32 MB) for good."""
        if np.count_nonzero(self._refs):   # (reading untouched counts backs none of them)
            self._refs[:] = 0
        for slots in pieces:
            slots = np.asarray(slots, np.int64)
            if len(slots) and (slots.min() < 1 or slots.max() >= self.span):
                raise ValueError("slot 0 is reserved" if slots.min() < 1 else "slot past the store")
            np.add.at(self._refs, slots, 1)
        self._nfree = self.capacity - int(np.count_nonzero(self._refs))
        self._sweep = 1

    def referenced(self, slots: np.ndarray) -> np.ndarray:
        """Whether each of these slots is in use."""
        return self._refs[slots] != 0

    def may_incref(self, slots: np.ndarray) -> bool:
        """Whether incref(slots) has room: a count is 16 bits, and one that
        wrapped to 0 would make a named slot free (another page written
        over it)."""
        named, times = unique_counts(np.asarray(slots, np.int32))
        return not len(named) or bool((self._refs[named].astype(np.int64) + times
                                       <= np.iinfo(self._refs.dtype).max).all())

    def set_aside(self, slots: np.ndarray) -> None:
        """One more reference on each slot, owned by no page, so that none
        is handed out again: a write to it may still land. A slot freed
        meanwhile is taken out of the free pool."""
        named, times = unique_counts(np.asarray(slots, np.int32))
        if not len(named):
            return
        self._nfree -= int(np.count_nonzero(self._refs[named] == 0))
        self._refs[named] = np.minimum(self._refs[named].astype(np.int64) + times,
                                       np.iinfo(self._refs.dtype).max).astype(self._refs.dtype)

    def incref(self, slots: np.ndarray) -> None:
        slots = np.asarray(slots, np.int32)
        if len(slots) and (self._refs[slots] == 0).any():
            raise ValueError("incref of a free slot")
        if not self.may_incref(slots):
            raise ValueError("a swap slot's reference count is full")
        named, times = unique_counts(slots)
        self._refs[named] += times.astype(self._refs.dtype)

    def free(self, slots: np.ndarray) -> None:
        """Drop one reference of each slot; slots reaching zero become free."""
        slots = np.asarray(slots, np.int32)
        if len(slots) == 0:
            return
        if len(slots) <= FEW_SLOTS:
            self._free_few(slots.tolist())
            return
        steps = [slots[lo:lo + FREE_STEP] for lo in range(0, len(slots), FREE_STEP)]
        if any((self._refs[step] == 0).any() for step in steps):
            raise ValueError("double free of a swap slot")
        # A whole target's slots at its exit are 4 bytes a page; the work on
        # them in steps keeps its temporaries (masks, the sort) from adding
        # several times that to the daemon's peak memory. A slot may be
        # named more than once (shared after a fork), never more often than
        # it has references: the count would wrap and the slot never free.
        for step in steps:
            named, times = unique_counts(step)
            if (self._refs[named] < times).any():
                raise ValueError("double free of a swap slot")
            self._refs[named] -= times.astype(self._refs.dtype)
            self._now_free(named[self._refs[named] == 0])

    def _now_free(self, released: np.ndarray) -> None:
        """These slots (sorted) lost their last reference."""
        if len(released):
            self._nfree += len(released)
            if self.on_free is not None:
                self.on_free(released)
            if self.on_release is not None:
                self.on_release()

    def _free_few(self, slots: list[int]) -> None:
        """free() on plain integers: numpy's reductions and ufunc.at cost
        about 40 us even for a few slots (a write fault drops one clean
        copy, an app discard a few)."""
        if len(slots) == 1:
            self.free_one(slots[0])
            return
        refs = self._refs
        # A slot may be named twice (shared after a fork): counted, where
        # the common case (each once) needs no Counter (a few us).
        named = collections.Counter(slots) if len(set(slots)) < len(slots) else dict.fromkeys(slots, 1)
        if any(refs[slot] < times for slot, times in named.items()):
            raise ValueError("double free of a swap slot")
        released = []
        for slot, times in named.items():
            left = int(refs[slot]) - times
            refs[slot] = left
            if left == 0:
                released.append(slot)
        if released:
            self._now_free(np.array(sorted(released), np.int32))

    def free_one(self, slot: int) -> None:
        """free() of one slot on plain integers: a random fault frees one,
        and numpy's per-call cost was most of free()'s time."""
        refs = int(self._refs[slot])
        if refs == 0:
            raise ValueError("double free of a swap slot")
        self._refs[slot] = refs - 1
        if refs == 1:
            self._nfree += 1
            if self.on_free is not None:
                self.on_free(np.array((slot,), np.int32))
            if self.on_release is not None:
                self.on_release()

    @property
    def counts(self) -> np.ndarray:
        """The reference count of every slot, for the fault path's C call,
        which drops references itself (then tells released_elsewhere())."""
        return self._refs

    def released_elsewhere(self, slots: np.ndarray) -> None:
        """These slots' last references were dropped in `counts` by the
        fault path's C call: they are free now."""
        self._now_free(np.sort(slots))

    def refs(self, slots: np.ndarray) -> np.ndarray:
        return self._refs[np.asarray(slots, np.int32)]
