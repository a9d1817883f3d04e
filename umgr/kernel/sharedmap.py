"""Files mapped shared, with libc's mmap (the page tables' files, the
compressed store's region)."""
from __future__ import annotations

import ctypes
import mmap
import os
import weakref

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
MAP_FAILED = ctypes.c_void_p(-1).value


def reserve(fd: int, size: int) -> None:
    """The file's first `size` bytes, its blocks allocated now: a store
    through a shared mapping into a hole the filesystem has no room for
    is a SIGBUS, which would end the daemon; a full disk is an OSError
    here instead. The blocks still read as holes (SEEK_DATA: unwritten
    extents on ext4 and xfs, pages not yet written on tmpfs), so the file
    looks as sparse as before, but they take disk space. (Where the
    filesystem has no fallocate, glibc writes them, on this thread.)"""
    os.posix_fallocate(fd, 0, size)


def map_shared(fd: int, size: int, *, random: bool = False):
    """The file's first `size` bytes, mapped shared, as a ctypes byte array
    (its address: ctypes.addressof). Not with the mmap module: it keeps a
    duplicate of the descriptor per mapping (Python < 3.13). The mapping
    goes when the last object viewing it does. `random`: MADV_RANDOM, no
    read-around: a fault on a file mapping otherwise reads the pages
    around it into the page cache (holes as zero-filled pages) and maps
    those already there, 64 KiB of the daemon's memory for a byte of a
    sparse page table (a page touched every 64 MiB of a 64 GiB
    reservation: 66 MB). A hint: a kernel that refuses it costs memory only."""
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if random:
        _libc.madvise(addr, size, mmap.MADV_RANDOM)
    memory = (ctypes.c_uint8 * size).from_address(addr)
    weakref.finalize(memory, _libc.munmap, addr, size)
    return memory
