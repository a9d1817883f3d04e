"""The compressed store's memory: one region, in a memfd, that holds its
index and the heap its entries live in (the heap's C code:
bindings/cffi/_cdef_codec.py).

    header      one page: MAGIC, VERSION, the index's slots, the area's bytes
    length      int32 per slot: the entry's length (0: none)
    where       uint64 per slot: its word, or its chunk's offset in the area
    seq         uint64 per slot: when its entry was stored (0: none, or not
                yet noted), the order a chain demotes entries in; advisory
    area        the heap's chunks

Entries name their chunk by its offset in the area, so the region means
the same wherever it is mapped. A memfd given by umgr exec (which holds it
while its program runs) or kept by the service manager for umgr daemon
(umgr/daemon/fdstore.py) outlives a daemon that dies: the restarted daemon
maps it again and adopts the entries of the slots its saved tables name
(umgr/daemon/statedir.py). The index is written in an order that leaves
it whole at any instruction (an entry is named only once its chunk is
written, and unnamed before its chunk goes back), so a daemon killed at
any moment leaves at worst chunks no entry names; the heap's own
bookkeeping is not in the region but rebuilt from the index.

A region of the store's own (no memfd given) is made the same way and
goes with the daemon. A memfd is created MAP_NORESERVE-like by the kernel
(VM_NORESERVE): only the pages the heap touches take memory.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets

import numpy as np

from umgr.bindings._kernel import ffi as _ffi
from umgr.bindings._kernel import lib as _lib
from umgr.errors import BackendError
from umgr.kernel import PAGE_SIZE
from umgr.kernel.sharedmap import map_shared

log = logging.getLogger("umgr.backend")

MAGIC = 0x31706d632d726d75   # "umr-cmp1", little-endian
VERSION = 2   # (2: the seq array)
HEADER_WORDS = 4             # MAGIC, VERSION, slots, area bytes
SPAN = _lib.UMGR_HEAP_SPAN   # the heap hands out chunks from spans of this size
GRAIN = _lib.UMGR_HEAP_GRAIN  # chunk sizes are multiples of this
WARM_SPANS = _lib.UMGR_HEAP_WARM   # free spans the heap keeps backed; past them, freed spans go back to the kernel
# Room in the area beyond the cap: the batches packed (their chunks taken)
# before the cap is checked.
AREA_SLACK = 16 << 20
MFD_NOEXEC_SEAL = 0x0008   # (Linux 6.3; refused before, and required where vm.memfd_noexec=2)


def area_bytes(cap: int) -> int:
    """The area a store of this cap gets: twice the cap, for chunks free
    in spans partly used (a span serves one size class until it is empty),
    and the slack. Address space: only the spans in use take memory."""
    return -(-(2 * cap + AREA_SLACK) // SPAN) * SPAN


def new_memfd(name: str) -> int:
    """A memfd for a store's region, closed on exec, never executable.
    Its name is `name` and a random part, which no other memfd shares
    (memfd_name): inode numbers, which the kernel's memfds take from one
    32-bit counter, may come round again."""
    unique = f"{name}-{secrets.token_hex(8)}"
    try:
        return os.memfd_create(unique, os.MFD_CLOEXEC | MFD_NOEXEC_SEAL)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return os.memfd_create(unique, os.MFD_CLOEXEC)


def memfd_name(fd: int) -> str:
    """The name a memfd was created with (/proc shows it as the target of
    its descriptor's link: "/memfd:NAME (deleted)")."""
    return os.readlink(f"/proc/self/fd/{fd}").removeprefix("/memfd:").removesuffix(" (deleted)")


def holds_a_store(fd: int) -> bool:
    """Whether the memfd holds a store a daemon left (Region.found)."""
    try:
        Region.found(fd)
    except (BackendError, OSError):
        return False
    return True


def _round_page(n: int) -> int:
    return -(-n // PAGE_SIZE) * PAGE_SIZE


class Region:
    """The index (`length`, `where`, `seq`: numpy views of the region) of
    `span` slots and the heap over `area` bytes, in the memfd `fd` (-1: one of its
    own). With `reuse`, the region holds a dead daemon's store: its sizes
    are the region's own, and its entries are adopted."""

    def __init__(self, span: int, area: int, fd: int = -1, reuse: bool = False):
        own = fd < 0
        if own:
            fd = new_memfd("umgr-compressed")
        try:
            if reuse:
                span, area = self.found(fd)
            total = self._layout(span, area)
            if reuse and os.fstat(fd).st_size < total:
                raise BackendError("the compressed store's region is shorter than its header says")
            if not reuse:
                os.ftruncate(fd, 0)   # whatever it held is gone (a fresh run)
                os.ftruncate(fd, total)
            self._map = map_shared(fd, total)
        finally:
            if own:
                os.close(fd)   # (the mapping keeps the memory)
        self.span, self.area = span, area
        self.length = np.frombuffer(self._map, np.int32, span, self._length_at)
        self.where = np.frombuffer(self._map, np.uint64, span, self._where_at)
        self.seq = np.frombuffer(self._map, np.uint64, span, self._seq_at)
        self.area_address = ctypes.addressof(self._map) + self._area_at
        self.heap = _lib.umgr_heap_new(self.area_address, area)
        if not self.heap:
            raise MemoryError("compressed: no memory for the heap's bookkeeping")
        try:
            self.lost = self._adopt() if reuse else 0
        except BaseException:
            _lib.umgr_heap_free(self.heap)
            raise
        header = np.frombuffer(self._map, np.uint64, HEADER_WORDS)
        header[:] = [MAGIC, VERSION, span, area]

    def _layout(self, span: int, area: int) -> int:
        self._length_at = PAGE_SIZE
        self._where_at = _round_page(self._length_at + 4 * span)
        self._seq_at = _round_page(self._where_at + 8 * span)
        self._area_at = _round_page(self._seq_at + 8 * span)
        return self._area_at + area

    @staticmethod
    def found(fd: int) -> tuple[int, int]:
        """The sizes of the region a dead daemon left in fd."""
        words = np.frombuffer(os.pread(fd, 8 * HEADER_WORDS, 0).ljust(8 * HEADER_WORDS, b"\0"), np.uint64)
        magic, version, span, area = (int(w) for w in words)
        if magic != MAGIC or version != VERSION or area % SPAN or span <= 1:
            raise BackendError("the compressed store's region holds no store this umgr can read")
        return span, area

    def _adopt(self) -> int:
        """Take over the entries found: those whose chunk the heap could
        not have handed out are marked lost (their pages cannot come back)."""
        lost = _lib.umgr_heap_adopt(self.heap, _ffi.cast("int32_t *", self.length.ctypes.data),
                                    _ffi.cast("uint64_t *", self.where.ctypes.data), self.span)
        if lost < 0:
            raise MemoryError("compressed: no memory to adopt the store's entries")
        if lost:
            log.error("compressed store: %d entries were damaged; their pages cannot come back", lost)
        return lost

    def spans_in_use(self) -> int:
        return int(_lib.umgr_heap_spans_in_use(self.heap)) if self.heap else 0

    def close(self) -> None:
        """Free the heap's bookkeeping and let go of the mapping (unmapped
        once no view of it is left: the fault path may hold the index; the
        area's address is only good while it does)."""
        if self.heap:
            _lib.umgr_heap_free(self.heap)
            self.heap = 0
        self.length = self.where = self.seq = None
        self._map = None
