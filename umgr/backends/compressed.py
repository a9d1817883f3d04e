"""The compressed backend: evicted pages held in the daemon's own memory,
compressed with zstd (libzstd, bindings/cffi/_cdef_zstd.py), under a
memory cap of its own.

Alone it is a store of its own (`--backend compressed`); in front of
another (`--backend compressed --backend file`) it is the fast tier of a
chain (umgr.backends.tiered): pages that do not compress, and the oldest
pages when the cap is reached, go to the next tier.

The compressor: on 102 MiB of the anonymous memory of a CPython process
(dicts, lists, strs, ints; bench/bench_backends.py makes and measures it),
zstd at level -1 held 5.0x, lz4 (block, default mode) 3.0x, entry
overhead included; through their Python bindings a page decompressed in
7.4 us (zstd) against 3.2 us (lz4), compressed in 18.6 against 10.6 us
(libzstd from C, as now: 6 us and 12 us). A fault costs far more than
the difference (45 us of daemon time on an idle machine), so zstd's 4 us
buy 1.7x the pages in the same memory. Level -1 is the default; `level=N`
trades speed for ratio.

The fault path's C call (umgr/paging/fastpath.py) unpacks pages itself,
from `memory_entries()`: per slot, the length and address of its entry,
kept beside the dict that owns the entries.

Costs counted against the cap: each page's compressed bytes and
ENTRY_OVERHEAD (its dict entry, key and bytes header as tracemalloc
measures them, plus malloc's chunk header and rounding). A same-filled
page (one 8-byte word repeated, zero pages included) is held as that word.
"""
from __future__ import annotations

import ctypes
import logging
import time

import numpy as np
import trio

from umgr.backends import Backend, ReadsDone
from umgr.bindings._kernel import ffi as _ffi
from umgr.bindings._kernel import lib as _lib
from umgr.errors import BackendError
from umgr.kernel import PAGE_SIZE
from umgr.kernel.buffers import bytes_address

log = logging.getLogger("umgr.backend")

ENTRY_OVERHEAD = 112
# A page that compresses to more than this is declined (the next tier
# takes it) or, alone, held raw: a quarter saved is not worth a
# decompression on every fault.
INCOMPRESSIBLE = PAGE_SIZE * 3 // 4
ENTRY_WORD = _lib.UMGR_ENTRY_WORD   # the length C gives a same-filled page's entry
PACK_PAGES = 512   # pages one pack() takes before its buffers grow (an eviction batch)

Entry = "bytes | int"   # compressed page (PAGE_SIZE long: held raw) or a same-filled page's word


class CompressedBackend(Backend):
    name = "compressed"

    def __init__(self, size: int = 4 << 30, cap: int | None = None, level: int = -1):
        """size: the pages it can hold when alone (slots); cap: the memory
        it may use (default a quarter of size)."""
        super().__init__(size // PAGE_SIZE)
        self.cap = int(cap) if cap is not None else size // 4
        if self.cap < ENTRY_OVERHEAD:
            raise ValueError(f"compressed: cap of {self.cap} bytes holds no page")
        self.level = int(level)
        self._cctx = _lib.umgr_zstd_new_cctx(self.level)
        if not self._cctx:
            raise ValueError(f"compressed: zstd takes no level {self.level}")
        self._dctx = _lib.umgr_zstd_new_dctx()
        self._packing = trio.Lock()   # one batch at a time in the codec's buffers and context
        self._room_for(PACK_PAGES)
        self._pages: dict[int, bytes | int] = {}   # slot -> entry, oldest first (dict order)
        self._index_slots()
        self.held_bytes = 0            # counted against the cap
        self.same_filled = 0           # pages held as one word
        self.incompressible = 0        # pages that did not compress (declined or held raw)
        self.alone = True              # no next tier: incompressible pages are held raw
        self.peak_pages = 0            # most pages held at once, and the bytes they took
        self.peak_bytes = 0
        self.slots.on_free = self.release

    # ---- the chain's side (umgr.backends.tiered) ------------------------------
    def stack_on(self, lower: Backend) -> None:
        """Become the fast tier in front of `lower`: its slots are ours."""
        self.slots = lower.slots
        self.alone = False
        self._index_slots()

    def _index_slots(self) -> None:
        """The entries as C reads them, per slot of self.slots: the length
        of each (0: not held; ENTRY_WORD: a same-filled page, its word in
        _where; PAGE_SIZE: held raw) and its address."""
        self._length = np.zeros(self.slots.span, np.int32)
        self._where = np.zeros(self.slots.span, np.uint64)

    def _room_for(self, npages: int) -> None:
        """Buffers for packing npages at once: their addresses in, per page
        its entry's length (or ENTRY_WORD and the word) and frame out."""
        self._addrs = np.zeros(npages, np.uint64)
        self._lengths = np.zeros(npages, np.int32)
        self._words = np.zeros(npages, np.uint64)
        self._frames = _ffi.new("char[]", npages * INCOMPRESSIBLE)
        self._arrays_c = (_ffi.cast("uint64_t *", self._addrs.ctypes.data),
                          _ffi.cast("int32_t *", self._lengths.ctypes.data),
                          _ffi.cast("uint64_t *", self._words.ctypes.data))

    async def pack(self, addrs: np.ndarray) -> list:
        """The entry of each page (None: incompressible, for the next tier).
        zstd takes about 12 us a page here: a batch is packed in a worker
        thread (the C call runs without the GIL), so the fault loop goes
        on meanwhile, and the core of a target waiting on its faults
        does the work."""
        async with self._packing:
            if len(addrs) > len(self._addrs):
                self._room_for(len(addrs))
            self._addrs[:len(addrs)] = addrs
            packed = await trio.to_thread.run_sync(self._compress, len(addrs))
            return self._entries(addrs, packed)

    def _compress(self, n: int) -> int:
        addrs, lengths, words = self._arrays_c
        return _lib.umgr_zstd_pack_batch(self._cctx, addrs, n, self._frames, INCOMPRESSIBLE, lengths, words)

    def _entries(self, addrs: np.ndarray, packed: int) -> list:
        n = len(addrs)
        if packed < n:
            self.errors += 1
            raise BackendError("zstd failed to compress a page")
        frames = _ffi.buffer(self._frames)
        entries = []
        for i, length in enumerate(self._lengths[:n].tolist()):
            if length == ENTRY_WORD:
                entries.append(int(self._words[i]))
            elif length:
                entries.append(frames[i * INCOMPRESSIBLE:i * INCOMPRESSIBLE + length])
            else:
                self.incompressible += 1
                entries.append(ctypes.string_at(int(addrs[i]), PAGE_SIZE) if self.alone else None)
        return entries

    @staticmethod
    def cost(entry) -> int:
        return ENTRY_OVERHEAD + (len(entry) if isinstance(entry, bytes) else 0)

    def room(self) -> int:
        return self.cap - self.held_bytes

    def keep(self, slots: np.ndarray, entries: list) -> np.ndarray:
        """Hold the pages that fit under the cap, in order; which did."""
        kept = np.zeros(len(slots), bool)
        for i, (slot, entry) in enumerate(zip(slots.tolist(), entries)):
            if entry is None:
                continue
            if slot in self._pages:   # written again without a free: the new page replaces
                self._forget(slot)
            cost = self.cost(entry)
            if self.held_bytes + cost > self.cap:
                break
            self._pages[slot] = entry
            self._index(slot, entry)
            self.held_bytes += cost
            self.same_filled += isinstance(entry, int)
            kept[i] = True
        self.pages_written += int(kept.sum())
        if len(self._pages) > self.peak_pages:
            self.peak_pages, self.peak_bytes = len(self._pages), self.held_bytes
        return kept

    def _index(self, slot: int, entry) -> None:
        if isinstance(entry, int):
            self._length[slot], self._where[slot] = ENTRY_WORD, entry
        else:
            self._length[slot], self._where[slot] = len(entry), bytes_address(entry)

    def holds(self, slots: np.ndarray) -> np.ndarray:
        pages = self._pages
        return np.fromiter((slot in pages for slot in slots.tolist()), bool, len(slots))

    def holds_one(self, slot: int) -> bool:
        return slot in self._pages

    def oldest(self, nbytes: int, limit: int, skip: np.ndarray) -> tuple[np.ndarray, list]:
        """The oldest pages, at most `limit`, holding at least `nbytes`
        between them if there are enough; pages with skip[slot] are passed over."""
        slots, entries, freed = [], [], 0
        for slot, entry in self._pages.items():
            if freed >= nbytes or len(slots) >= limit:
                break
            if skip[slot]:
                continue
            slots.append(slot)
            entries.append(entry)
            freed += self.cost(entry)
        return np.array(slots, np.int32), entries

    def unpack(self, entries: list, addrs: np.ndarray) -> None:
        for entry, addr in zip(entries, addrs.tolist()):
            self._unpack_one(entry, addr)

    def drop_if_held(self, slots: np.ndarray, entries: list) -> None:
        """Pages now in the next tier leave this one, unless their slot was
        freed (and maybe stored again) meanwhile."""
        pages = self._pages
        for slot, entry in zip(slots.tolist(), entries):
            if pages.get(slot) is entry:
                self._forget(slot)

    # ---- the Backend interface --------------------------------------------------
    async def write(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        slots = np.asarray(slots, np.int32)
        started = time.perf_counter()
        entries = await self.pack(np.asarray(addrs, np.uint64))
        need = sum(self.cost(entry) for entry in entries)
        if need > self.room():
            self.errors += 1
            raise BackendError(f"compressed store full: {need} bytes wanted, "
                               f"{self.room()} left of a {self.cap}-byte cap")
        self.keep(slots, entries)
        self._timed(started)

    async def read(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        started = time.perf_counter()
        pages = self._pages
        for slot, addr in zip(np.asarray(slots).tolist(), np.asarray(addrs).tolist()):
            entry = pages.get(slot)
            if entry is None:
                self.errors += 1
                raise BackendError(f"compressed store holds no page in slot {slot}")
            self._unpack_one(entry, addr)
        self.pages_read += len(slots)
        elapsed = time.perf_counter() - started
        self.read_seconds += elapsed
        self._timed(started)

    def memory_entries(self) -> tuple[np.ndarray, np.ndarray]:
        return self._length, self._where

    def reads_done_elsewhere(self, file: ReadsDone, memory: ReadsDone) -> None:
        if memory.pages:
            self._count_reads(memory)

    def _unpack_one(self, entry, addr: int) -> None:
        if isinstance(entry, int):
            length, where = ENTRY_WORD, entry
        else:
            length, where = len(entry), bytes_address(entry)
        if not _lib.umgr_zstd_unpack(self._dctx, length, where, addr):
            self.errors += 1
            raise BackendError("compressed page does not decompress to one page")

    def release(self, slots: np.ndarray) -> None:
        """Freed slots: their pages are dropped (the slot allocator's on_free)."""
        pages = self._pages
        for slot in slots.tolist():
            if slot in pages:
                self._forget(slot)

    def _forget(self, slot: int) -> None:
        entry = self._pages.pop(slot)
        self._length[slot] = 0
        self.held_bytes -= self.cost(entry)
        self.same_filled -= isinstance(entry, int)

    @property
    def pages_held(self) -> int:
        return len(self._pages)

    def close(self) -> None:
        self._pages.clear()
        self._length[:] = 0
        self.held_bytes = 0
        if self._cctx:
            _lib.umgr_zstd_free(self._cctx, self._dctx)
            self._cctx = self._dctx = 0

    def tier_statistics(self) -> list[dict]:
        held = len(self._pages)
        return [{
            "tier": self.name,
            "capacity_bytes": self.cap,
            "used_bytes": self.held_bytes,
            "pages": held,
            "pages_written": self.pages_written,
            "pages_read": self.pages_read,
            "read_seconds_per_page": self.read_seconds / self.pages_read if self.pages_read else 0.0,
            "ratio": held * PAGE_SIZE / self.held_bytes if self.held_bytes else 0.0,
            "peak_pages": self.peak_pages,
            "peak_ratio": self.peak_pages * PAGE_SIZE / self.peak_bytes if self.peak_bytes else 0.0,
            "same_filled_pages": self.same_filled,
            "incompressible_pages": self.incompressible,
        }]
