"""Application hints for Python programs running under umgr.

    import mmap, umgr.hints as hints
    buf = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    ...
    hints.advise(buf, hints.COLD)          # done with it for a while
    hints.advise(buf, hints.WILLNEED)      # about to use it again
    hints.advise(buf, hints.DISCARDABLE)   # a cache: may be dropped (reads as zero)

`advise` calls the shim's `umgr_advise()` (found with ctypes.CDLL(None): the
shim is in the process when it runs under `umgr exec` or with the shim in
LD_PRELOAD). It returns True when umgr took the hint, False when there is no
umgr here (no shim, or the shim found no daemon), so a program can call it
unconditionally; a bad argument raises OSError (EINVAL, or ENOMEM when part of
the range is not managed by umgr: the managed part is still advised).

A buffer object (bytearray, memoryview, mmap, array, numpy array: anything
with a writable or read-only C-contiguous buffer) is advised on the whole
pages it contains: its start is rounded up and its end down to page
boundaries, so a hint never reaches the neighbours of an unaligned buffer
(DISCARDABLE could otherwise drop their data). Python's own buffers are rarely
page aligned: a bytearray of n pages covers n-1 whole ones. An integer is an
address, passed on as it is with `length` (then it must be page aligned).
umgr manages anonymous private memory only: `mmap.mmap(-1, n)` alone is
MAP_SHARED (advising it raises ENOMEM); pass flags=MAP_PRIVATE|MAP_ANONYMOUS.
This module has no dependencies beyond the standard library.
"""
from __future__ import annotations

import ctypes
import errno
import os

__all__ = ["COLD", "WILLNEED", "DISCARDABLE", "advise", "available", "managed"]

# The values of umgr.h's enum umgr_advice; umgr.protocol.Advice takes them
# from here (this module stays standard-library only: protocol needs numpy).
COLD = 1         # evict soon, whatever the budget (in the background)
WILLNEED = 2     # bring swapped-out pages in now (in the background)
DISCARDABLE = 3  # like MADV_FREE: may be dropped instead of written out

# The kernel's, not umgr.kernel.PAGE_SIZE: importing umgr.kernel fails on a
# kernel with other pages, where advise() must still answer False.
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_UNSET = object()
_funcs = _UNSET


def _shim():
    """(umgr_advise, umgr_is_managed) from the process, or None."""
    global _funcs
    if _funcs is _UNSET:
        try:
            process = ctypes.CDLL(None, use_errno=True)
            fn = process.umgr_advise
            is_managed = process.umgr_is_managed
        except (AttributeError, OSError):
            _funcs = None
        else:
            fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            fn.restype = ctypes.c_int
            is_managed.argtypes = ()
            is_managed.restype = ctypes.c_int
            _funcs = (fn, is_managed)
    return _funcs


def available() -> bool:
    """Whether the umgr shim is loaded in this process."""
    return _shim() is not None


def managed() -> bool:
    """Whether a umgr daemon manages this process's memory."""
    funcs = _shim()
    return funcs is not None and bool(funcs[1]())


def _address_range(obj, length: int | None) -> tuple[int, int]:
    if isinstance(obj, int):
        if length is None:
            raise TypeError("advise(address, advice, length): an address needs a length")
        return obj, length
    view = memoryview(obj)
    if not view.c_contiguous:
        raise ValueError("advise needs a C-contiguous buffer")
    nbytes = view.nbytes if length is None else min(length, view.nbytes)
    if nbytes == 0:
        return 0, 0
    if view.readonly:
        # ctypes only maps writable buffers; the address of a read-only one
        # comes from the buffer protocol itself.
        start = _readonly_address(view)
    else:
        first = ctypes.c_char.from_buffer(view)
        start = ctypes.addressof(first)
        del first  # its export would keep the view (and an mmap) from closing
    view.release()
    lo = -(-start // PAGE_SIZE) * PAGE_SIZE
    hi = (start + nbytes) // PAGE_SIZE * PAGE_SIZE
    return (lo, hi - lo) if hi > lo else (lo, 0)


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def _readonly_address(view: memoryview) -> int:
    """The address of a read-only buffer, through the C buffer protocol."""
    api = ctypes.pythonapi
    api.PyObject_GetBuffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
    api.PyBuffer_Release.argtypes = (ctypes.POINTER(_PyBuffer),)
    pybuf = _PyBuffer()
    if api.PyObject_GetBuffer(view, ctypes.byref(pybuf), 0) != 0:
        raise ValueError("cannot get the buffer's address")
    try:
        return pybuf.buf or 0
    finally:
        api.PyBuffer_Release(ctypes.byref(pybuf))


def advise(obj, advice: int, length: int | None = None) -> bool:
    """Give umgr a hint about the pages of `obj` (a buffer, or an address with
    `length`). True: umgr took it. False: no umgr in this process (a no-op).
    Raises OSError (EINVAL, ENOMEM) when umgr refuses it, ETIMEDOUT when
    its daemon did not answer in time."""
    funcs = _shim()
    if funcs is None:
        return False
    start, nbytes = _address_range(obj, length)
    if nbytes == 0:
        return bool(funcs[1]())  # no whole page: nothing to do
    if funcs[0](start, nbytes, int(advice)) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ENOTCONN:
        return False
    raise OSError(err, f"umgr_advise({start:#x}, {nbytes}, {int(advice)}): {os.strerror(err)}")
