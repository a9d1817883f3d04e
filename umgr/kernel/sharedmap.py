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
MAP_FAILED = ctypes.c_void_p(-1).value


def map_shared(fd: int, size: int):
    """The file's first `size` bytes, mapped shared, as a ctypes byte array
    (its address: ctypes.addressof). Not with the mmap module: it keeps a
    duplicate of the descriptor per mapping (Python < 3.13). The mapping
    goes when the last object viewing it does."""
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    memory = (ctypes.c_uint8 * size).from_address(addr)
    weakref.finalize(memory, _libc.munmap, addr, size)
    return memory
