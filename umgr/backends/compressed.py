"""The compressed backend: evicted pages held in the daemon's own memory,
compressed with zstd or lz4 (libzstd, liblz4, from C:
bindings/cffi/_cdef_codec.py), under a memory cap of its own.

Alone it is a store of its own (`--backend compressed`); in front of
another (`--backend compressed --backend file`) it is the fast tier of a
chain (umgr.backends.tiered): pages that do not compress, and the oldest
pages when the cap is reached, go to the next tier.

The codecs, on 8192 pages of the anonymous memory of a CPython process
(dicts, lists, strs, ints; bench/bench_backends.py makes and measures it),
from C, per page: zstd at level -1 held 8.9x, compressed in 14 us and
decompressed in 4.9 us; lz4 held 4.5x, in 7.3 and 2.1 us. A fault waits
for the decompression, and a target at its budget for the compression
(in a worker thread, beside the fault loop), so lz4 is the default:
`codec=zstd` buys about twice the pages in the same memory for about 2.5
us more per fault. `level=N` is zstd's level (default -1) or lz4's
acceleration (default 1: its best ratio).

The fault path's C call (umgr/paging/fastpath.py) unpacks pages itself,
from `memory_entries()`: per slot, the length of its entry and where it
is. Entries live in C, in chunks of a heap in the store's region
(umgr/backends/region.py), so storing and dropping a batch is one C call,
with no Python object per page.

The region is a memfd. Under umgr exec, the parent holds it (`region_fd`),
and under systemd, the unit's descriptor store (umgr/daemon/fdstore.py):
a daemon that dies leaves the store behind for the one started next
(`reuse`), as the file backend leaves its swap file, and the programs'
pages come back from it. Otherwise the region is the daemon's.

Costs counted against the cap: each entry's chunk (its bytes rounded up
to GRAIN, 32) and ENTRY_OVERHEAD (the age queue's slot and sequence
number, for a chain's demotions). A same-filled page (one 8-byte word
repeated, zero pages included) is held as that word: ENTRY_OVERHEAD only.
The per-slot index (12 bytes a slot of `size` in the region, 8 more of
sequence numbers) is made at start and not counted.
"""
from __future__ import annotations

import collections
import logging
import time

import numpy as np
import trio

from umgr import cpuclock
from umgr.backends import Backend, ReadsDone
from umgr.backends.region import GRAIN, SPAN, Region, area_bytes
from umgr.bindings._kernel import ffi as _ffi
from umgr.bindings._kernel import lib as _lib
from umgr.errors import BackendError
from umgr.kernel import PAGE_SIZE

log = logging.getLogger("umgr.backend")

ENTRY_OVERHEAD = 16
# A page that compresses to more than this is declined (the next tier
# takes it) or, alone, held raw: a quarter saved is not worth a
# decompression on every fault.
INCOMPRESSIBLE = PAGE_SIZE * 3 // 4
ENTRY_WORD = _lib.UMGR_ENTRY_WORD   # the length C gives a same-filled page's entry
ENTRY_LOST = _lib.UMGR_ENTRY_LOST   # the length of an entry found damaged at a restart
ENTRY_LZ4 = _lib.UMGR_ENTRY_LZ4     # added to the length of an lz4 block
CODECS = {"zstd": (_lib.UMGR_CODEC_ZSTD, -1), "lz4": (_lib.UMGR_CODEC_LZ4, 1)}   # name: (kind, default level)
DEFAULT_CODEC = "lz4"


def entry_costs(lengths: np.ndarray) -> np.ndarray:
    """What entries of these lengths cost against the cap (0: no entry)."""
    lengths = np.asarray(lengths, np.int64)
    nbytes = np.where(lengths > 0, lengths % ENTRY_LZ4, 0)
    chunks = -(-nbytes // GRAIN) * GRAIN
    return np.where(lengths != 0, chunks + ENTRY_OVERHEAD, 0)


def _ptr(ctype: str, array: np.ndarray):
    return _ffi.cast(ctype, array.ctypes.data)


class Packed:
    """A batch packed by CompressedBackend.pack(), its entries not yet
    installed: per page its entry (length 0: declined) and cost. Its
    blocks are the store's once kept, or freed by discard()."""

    def __init__(self, heap: int, lengths: np.ndarray, values: np.ndarray):
        self.heap, self.lengths, self.values = heap, lengths, values
        self.costs = entry_costs(lengths)

    @property
    def need(self) -> int:
        """Bytes of the cap the entries would take."""
        return int(self.costs.sum())

    def declined(self) -> np.ndarray:
        return self.lengths == 0

    def heap_full(self) -> np.ndarray:
        """Declined because the heap had no chunk left (not for their bytes)."""
        return (self.lengths == 0) & (self.values == _lib.UMGR_DECLINED_FULL)

    def discard(self) -> None:
        _lib.umgr_entries_free(self.heap, _ptr("int32_t *", self.lengths), _ptr("uint64_t *", self.values),
                               len(self.lengths))
        self.lengths[:] = 0


class CompressedBackend(Backend):
    name = "compressed"
    in_memory = True   # (alone: incompressible pages are held as they are)

    def __init__(self, size: int = 4 << 30, cap: int | None = None, codec: str = DEFAULT_CODEC,
                 level: int | None = None, region_fd: int = -1, reuse: bool = False):
        """size: the pages it can hold when alone (slots); cap: the memory
        it may use (default a quarter of size); codec: lz4 or zstd; level:
        zstd's level or lz4's acceleration (the codec's default if None);
        region_fd: a memfd to keep the store in (umgr exec's, or the
        service manager's, which outlives the daemon); reuse: the memfd
        holds a dead daemon's store, to take over (its size is the store's
        own then)."""
        self.cap = int(cap) if cap is not None else size // 4
        self._region_fd, self._reuse = region_fd, reuse and region_fd >= 0
        if self._reuse:
            size = (Region.found(region_fd)[0] - 1) * PAGE_SIZE
        super().__init__(size // PAGE_SIZE)
        if self.cap < entry_costs([ENTRY_WORD])[0]:
            raise ValueError(f"compressed: cap of {self.cap} bytes holds no page")
        if codec not in CODECS:
            raise ValueError(f"compressed: no codec {codec!r}; it takes {' or '.join(CODECS)}")
        kind, default_level = CODECS[codec]
        self.codec, self.level = codec, default_level if level is None else int(level)
        self._codec = _lib.umgr_codec_new(kind, self.level)
        if not self._codec:
            raise ValueError(f"compressed: {codec} takes no level {self.level}")
        self._dctx = _lib.umgr_zstd_new_dctx()
        self._packing = trio.Lock()   # one batch at a time in the codec's context
        self.incompressible = 0        # pages that did not compress (declined or held raw)
        self.heap_full = 0             # pages declined for want of a chunk (chunks free in other classes' spans)
        self.alone = True              # no next tier: incompressible pages are held raw
        self.peak_pages = 0            # most pages held at once, and the bytes they took
        self.peak_bytes = 0
        self._region = None
        try:
            self._index_slots()
        except BaseException:
            self.close()
            raise

    # ---- the chain's side (umgr.backends.tiered) ------------------------------
    def stack_on(self, lower: Backend) -> None:
        """Become the fast tier in front of `lower`: its slots are ours."""
        if self._reuse and lower.slots.span != self.slots.span:
            raise BackendError(f"the compressed tier's saved store has {self.slots.capacity} slots, the store "
                               f"behind it {lower.slots.capacity}: it cannot be taken over")
        self.slots = lower.slots
        self.alone = False
        self._index_slots()

    def _index_slots(self) -> None:
        """The entries as C reads them, per slot of self.slots: the length
        of each (0: not held) and where it is (_cdef_codec.py), in the
        region; and when each was stored (0: not held), in the order a
        chain demotes them (_age: batches of (slots, sequence numbers),
        oldest first; an entry dropped since is skipped). A region taken
        over keeps its entries, and their age order (the region's seq)."""
        span = self.slots.span
        if self._region is None or self._region.span != span:
            if self._region is not None:
                self._region.close()
            self._region = Region(span, area_bytes(self.cap), self._region_fd, self._reuse)
        region = self._region
        self._length, self._where = region.length, region.where
        self._heap = region.heap
        self._seq = region.seq
        self._next_seq = 1
        self._age: collections.deque[tuple[np.ndarray, np.ndarray]] = collections.deque()
        self._aged = 0   # entries in _age, dropped ones included
        self._c_index = (_ptr("int32_t *", self._length), _ptr("uint64_t *", self._where))
        self._held = self.held_bytes = self.same_filled = 0
        if self._reuse:   # (a fresh index is not read: reading a memfd's hole backs it)
            held = np.flatnonzero(self._length)
            self._count(len(held), int(entry_costs(self._length[held]).sum()),
                        int(np.count_nonzero(self._length[held] == ENTRY_WORD)))
            self._take_over_age(held[self._length[held] != ENTRY_LOST].astype(np.int32))

    def _take_over_age(self, slots: np.ndarray) -> None:
        """The entries of a region taken over, in the order they were stored
        (seq; one whose seq was not yet noted when its daemon died counts as
        the oldest), numbered again from 1."""
        self._stored(slots[np.argsort(self._seq[slots], kind="stable")])

    async def pack(self, addrs: np.ndarray) -> Packed:
        """The pages' new entries, to keep() or discard(). Compression takes
        several us a page: a batch is packed in a worker thread (the C call
        runs without the GIL), so the fault loop goes on meanwhile, and the
        core of a target waiting on its faults does the work."""
        addrs = np.ascontiguousarray(addrs, np.uint64)
        n = len(addrs)
        lengths, values = np.zeros(n, np.int32), np.zeros(n, np.uint64)
        async with self._packing:
            packed = await cpuclock.to_thread(
                lambda: _lib.umgr_codec_pack_batch(self._codec, self._heap, _ptr("uint64_t *", addrs), n,
                                                   INCOMPRESSIBLE, self.alone, _ptr("int32_t *", lengths),
                                                   _ptr("uint64_t *", values)))
        batch = Packed(self._heap, lengths, values)
        if packed < n:
            batch.discard()
            self.errors += 1
            raise BackendError(f"compressed store full: its heap has no chunk left for a page "
                               f"({self.held_bytes} bytes held of a {self.cap}-byte cap), "
                               f"or {self.codec} failed")
        full = int(np.count_nonzero(batch.heap_full()))
        self.heap_full += full
        self.incompressible += int(np.count_nonzero((lengths == 0) | (lengths == PAGE_SIZE))) - full
        return batch

    def room(self) -> int:
        return self.cap - self.held_bytes

    def keep(self, slots: np.ndarray, batch: Packed) -> np.ndarray:
        """Hold the entries that fit under the cap, in order; which did.
        The slots' earlier entries are dropped (their pages were written
        again), declined pages' too: a page is in one tier only."""
        slots = np.ascontiguousarray(slots, np.int32)
        self._drop(slots)
        offered = ~batch.declined()
        kept = offered & (np.cumsum(np.where(offered, batch.costs, 0)) <= self.room())
        _lib.umgr_entries_install(self._heap, _ptr("int32_t *", slots), _ptr("uint8_t *", kept.view(np.uint8)),
                                  len(slots),
                                  _ptr("int32_t *", batch.lengths), _ptr("uint64_t *", batch.values), *self._c_index)
        held = slots[kept]
        self._count(len(held), int(batch.costs[kept].sum()), int(np.count_nonzero(batch.lengths[kept] == ENTRY_WORD)))
        batch.lengths[:] = 0   # the blocks are the store's now, or freed
        self._stored(held)
        self.pages_written += len(held)
        if self._held > self.peak_pages:
            self.peak_pages, self.peak_bytes = self._held, self.held_bytes
        return kept

    def _stored(self, slots: np.ndarray) -> None:
        seqs = np.arange(self._next_seq, self._next_seq + len(slots), dtype=np.uint64)
        self._next_seq += len(slots)
        self._seq[slots] = seqs
        if self.alone:   # nothing is demoted: no age to keep
            return
        self._age.append((slots, seqs))
        self._aged += len(slots)
        if self._aged > 2 * self._held + 4096:
            self._compact_age()

    def _live(self, slots: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        return self._seq[slots] == seqs

    def still_held(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Which of oldest()'s pages (its tokens) are still held as they were."""
        return self._live(slots, tokens)

    def _compact_age(self) -> None:
        """Leave out of the age queue the entries dropped since."""
        if not self._age:
            return
        slots, seqs = (np.concatenate(parts) for parts in zip(*self._age))
        live = self._live(slots, seqs)
        self._age = collections.deque([(slots[live], seqs[live])])
        self._aged = int(np.count_nonzero(live))

    def _count(self, pages: int, nbytes: int, words: int) -> None:
        self._held += pages
        self.held_bytes += nbytes
        self.same_filled += words

    def _held_cost(self, slots: np.ndarray) -> int:
        """What the entries those slots hold now take of the cap."""
        lengths = self._length[np.asarray(slots, np.int64)]
        return int(entry_costs(lengths[lengths != 0]).sum())

    def _drop(self, slots: np.ndarray) -> int:
        """Drop the entries of those slots that have one; how many did."""
        lengths = self._length[slots]
        held = lengths != 0
        if not held.any():
            return 0
        slots, lengths = np.ascontiguousarray(slots[held], np.int32), lengths[held]
        self._count(-len(slots), -int(entry_costs(lengths).sum()), -int(np.count_nonzero(lengths == ENTRY_WORD)))
        _lib.umgr_entries_drop(self._heap, _ptr("int32_t *", slots), len(slots), *self._c_index)
        self._seq[slots] = 0
        return len(slots)

    def holds(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, np.int64)
        inside = (slots >= 0) & (slots < len(self._length))
        return inside & (self._length[np.where(inside, slots, 0)] != 0)

    def holds_one(self, slot: int) -> bool:
        return 0 <= slot < len(self._length) and bool(self._length[slot])

    def oldest(self, nbytes: int, limit: int, skip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The oldest pages, at most `limit`, holding at least `nbytes`
        between them if there are enough, and a token per page for
        drop_if_held(); pages with skip[slot] are passed over."""
        while self._age and not self._live(*self._age[0]).any():
            self._aged -= len(self._age.popleft()[0])
        taken, tokens, freed, count = [], [], 0, 0
        for slots, seqs in self._age:
            if freed >= nbytes or count >= limit:
                break
            live = self._live(slots, seqs) & ~skip[slots]
            slots, seqs = slots[live], seqs[live]
            cum = freed + np.cumsum(entry_costs(self._length[slots]))
            k = min(int(np.searchsorted(cum, nbytes)) + 1, len(slots), limit - count)
            if k:
                taken.append(slots[:k])
                tokens.append(seqs[:k])
                freed, count = int(cum[k - 1]), count + k
        if not taken:
            return np.empty(0, np.int32), np.empty(0, np.uint64)
        return np.concatenate(taken), np.concatenate(tokens)

    def unpack(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        """The held pages of slots into the pages at addrs."""
        if len(slots) == 1:   # a fault's one page: no arrays to make
            slot = int(slots[0])
            if self.holds_one(slot) and _lib.umgr_entry_unpack(self._dctx, int(self._length[slot]),
                                                               int(self._where[slot]), self._region.area_address,
                                                               int(addrs[0])):
                return
        slots = np.ascontiguousarray(slots, np.int32)
        addrs = np.ascontiguousarray(addrs, np.uint64)
        done = _lib.umgr_entries_unpack(self._dctx, _ptr("int32_t *", slots), len(slots), *self._c_index,
                                        self._region.area_address, len(self._length), _ptr("uint64_t *", addrs))
        if done < len(slots):
            self.errors += 1
            slot = int(slots[done])
            if not 0 <= slot < len(self._length) or not self._length[slot]:
                raise BackendError(f"compressed store holds no page in slot {slot}")
            if self._length[slot] == ENTRY_LOST:
                raise BackendError(f"compressed store lost the page in slot {slot}: its entry was found damaged "
                                   "when the daemon was restarted")
            raise BackendError(f"compressed page in slot {slot} does not decompress to one page")

    def drop_if_held(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Pages now in the next tier leave this one, unless their slot was
        freed (and maybe stored again) meanwhile."""
        self._drop(slots[self._live(slots, tokens)])

    # ---- the Backend interface --------------------------------------------------
    async def write(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        started = time.perf_counter()
        batch = await self.pack(addrs)
        if batch.need > self.room() + self._held_cost(slots):   # (a slot written again gives its entry back: keep())
            batch.discard()
            raise BackendError(f"compressed store full: {batch.need} bytes wanted, "
                               f"{self.room()} left of a {self.cap}-byte cap", full=True)
        self.keep(slots, batch)
        self._timed(started)

    async def read(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        started = time.perf_counter()
        self.unpack(slots, addrs)
        self.pages_read += len(slots)
        self.read_seconds += self._timed(started)

    def memory_entries(self) -> tuple[np.ndarray, np.ndarray, int]:
        return self._length, self._where, self._region.area_address

    def reads_done_elsewhere(self, file: ReadsDone, memory: ReadsDone) -> None:
        if memory.pages:
            self._count_reads(memory)

    def release(self, slots: np.ndarray) -> None:
        """Freed slots: their pages are dropped (the slot allocator's on_free)."""
        self._drop(np.asarray(slots, np.int64))

    @property
    def pages_held(self) -> int:
        return self._held

    def slots_adopted(self) -> None:
        """A restarted daemon's slots are known: entries of slots no saved
        table names (their pages were going, or gone, when the daemon died)
        are dropped."""
        if self._reuse:
            held = np.flatnonzero(self._length)
            self._drop(held[~self.slots.referenced(held)])

    def close(self) -> None:
        """Let go of the store. A region held elsewhere (umgr exec, the
        service manager) keeps it (a daemon that fails ends so, and its
        successor takes the store over); the store's own region goes."""
        if self._region is not None:
            self._region.close()
            self._region = None
        self._length = self._where = self._seq = None   # (views of the region: the mapping goes with the last)
        if self._codec:
            _lib.umgr_codec_free(self._codec)
            _lib.umgr_zstd_free_dctx(self._dctx)
            self._codec = self._dctx = 0

    def tier_statistics(self) -> list[dict]:
        held = self._held
        return [{
            "tier": self.name,
            "codec": self.codec,
            "capacity_bytes": self.cap,
            "used_bytes": self.held_bytes,
            "pages": held,
            "pages_written": self.pages_written,
            "pages_read": self.pages_read,
            "read_seconds_per_page": self.read_seconds / self.pages_read if self.pages_read else 0.0,
            "ratio": held * PAGE_SIZE / self.held_bytes if self.held_bytes else 0.0,
            "peak_pages": self.peak_pages,
            "peak_ratio": self.peak_pages * PAGE_SIZE / self.peak_bytes if self.peak_bytes else 0.0,
            "heap_bytes": self._region.spans_in_use() * SPAN if self._region is not None else 0,
            "heap_full_pages": self.heap_full,
            "same_filled_pages": self.same_filled,
            "incompressible_pages": self.incompressible,
        }]
