"""Page-aligned staging buffers.

Anonymous mmap memory is page aligned, as O_DIRECT I/O and UFFDIO_COPY
sources want, and its address is stable for the buffer's life.
"""
from __future__ import annotations

import mmap

import numpy as np

from umgr.bindings._kernel import ffi as _ffi
from umgr.bindings._kernel import lib as _lib
from umgr.kernel import PAGE_SIZE


def bytes_address(data: bytes) -> int:
    """Where a bytes object's content lies in memory: valid while it lives
    (bytes never move or change)."""
    return int(_ffi.cast("uintptr_t", _ffi.from_buffer(data)))


class PageBuffer:
    def __init__(self, npages: int, private: bool = False):
        """`private`: a private mapping, whose pages read before they are
        written are the kernel's zero page (no memory); a shared one (shmem)
        gets a page of its own at any first touch."""
        self.npages = npages
        self.private = private
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS if private else mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
        self._map = mmap.mmap(-1, npages * PAGE_SIZE, flags=flags)
        self.bytes = np.frombuffer(self._map, np.uint8)
        self.addr = self.bytes.ctypes.data

    def addrs(self, positions: np.ndarray) -> np.ndarray:
        """Addresses of the pages at these positions."""
        return (self.addr + np.asarray(positions, np.uint64) * PAGE_SIZE).astype(np.uint64)

    def zero_pages(self, count: int) -> np.ndarray:
        """Which of the first `count` pages are all zero."""
        if not 0 <= count <= self.npages:
            raise ValueError(f"{count} pages asked of a buffer of {self.npages}")
        zero = np.zeros(count, np.uint8)
        _lib.umgr_zero_pages(self.addr, count, _ffi.cast("uint8_t *", zero.ctypes.data))
        return zero.view(bool)

    def hashes(self, count: int) -> np.ndarray:
        """umgr_page_hash (bindings/shim/pagehash.h) of each of the first
        `count` pages: what MOVE_OUT sends the agent, to find a page a
        device wrote after it was copied here."""
        if not 0 <= count <= self.npages:
            raise ValueError(f"{count} pages asked of a buffer of {self.npages}")
        out = np.empty(count, np.uint64)
        _lib.umgr_page_hashes(self.addr, count, _ffi.cast("uint64_t *", out.ctypes.data))
        return out

    def clear(self, positions: np.ndarray) -> None:
        pages = self.bytes.reshape(self.npages, PAGE_SIZE)
        pages[positions] = 0

    def page(self, position: int) -> memoryview:
        start = position * PAGE_SIZE
        return memoryview(self._map)[start:start + PAGE_SIZE]

    def release(self) -> None:
        """Give the pages' memory back (they read zero after), keeping the
        mapping: its address stays valid for a read that may still write
        it. A shared mapping's pages live in shmem, which MADV_DONTNEED
        does not free: MADV_REMOVE does."""
        self._map.madvise(mmap.MADV_DONTNEED if self.private else mmap.MADV_REMOVE)

    def close(self) -> None:
        self.bytes = None
        self._map.close()
