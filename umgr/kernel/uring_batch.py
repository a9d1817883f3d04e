"""io_uring requests as columns: a Batch is one row per SQE, each column a
scalar or an array, so a batch of thousands of requests is built with numpy
and submitted by umgr.kernel.ring in one cffi call."""
from __future__ import annotations

import enum

import numpy as np

from umgr.bindings._uring import ffi, lib

__all__ = ["Op", "Batch", "MAX_ROWS", "address", "iovec_array"]

# A request's user_data is (batch id << 32) | row: a batch has fewer rows than 2**32.
MAX_ROWS = 1 << 32


class Op(enum.IntEnum):
    """Operations of a :class:`Batch` row (umgr numbering, see _cdef_uring)."""

    READ = lib.UMGR_OP_READ
    WRITE = lib.UMGR_OP_WRITE
    READV = lib.UMGR_OP_READV  # addr: iovec array, length: number of iovecs
    WRITEV = lib.UMGR_OP_WRITEV
    READ_FIXED = lib.UMGR_OP_READ_FIXED  # addr must lie in buffer buf_index
    WRITE_FIXED = lib.UMGR_OP_WRITE_FIXED




def address(buf) -> int:
    """Address of a writable or read-only buffer (bytes, bytearray, mmap, numpy).

    The caller keeps ``buf`` alive (and unresized) until the I/O using the
    address has completed; pass it as ``Batch(..., keepalive=buf)`` to have
    the ring do that.
    """
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


def iovec_array(buffers) -> np.ndarray:
    """A ``struct iovec[]`` for READV/WRITEV as an (n, 2) uint64 array.

    Pass ``address(arr)`` (or ``arr.ctypes.data``) as the row's addr and
    ``len(arr)`` as its length.  The buffers must outlive the I/O.
    """
    out = np.empty((len(buffers), 2), dtype=np.uint64)
    for i, b in enumerate(buffers):
        out[i, 0] = address(b)
        out[i, 1] = memoryview(b).nbytes
    return out


_U64 = (1 << 64) - 1
_COLUMNS = (("op", np.uint8), ("fd", np.int32), ("addr", np.uint64),
            ("length", np.uint32), ("offset", np.uint64), ("buf_index", np.uint16))


def _as_column(name, value, dtype, n):
    """A contiguous copy of ``value`` (scalar broadcast to ``n`` rows) as ``dtype``."""
    out = np.empty(n, dtype=dtype)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if dtype is np.uint64:
            value &= _U64  # offset -1 means the file position: 2**64-1
        try:
            out.fill(value)
        except OverflowError:
            raise ValueError(f"Batch.{name}: {value} does not fit {np.dtype(dtype)}") from None
        return out
    a = np.asarray(value)
    if a.dtype.kind not in "iub" and a.size:
        raise TypeError(f"Batch.{name}: integers expected, got dtype {a.dtype}")
    np.copyto(out, a, casting="unsafe")  # wraps like C: offset -1 -> 2**64-1
    return out


class Batch:
    """Column-oriented I/O requests: one row per SQE.

    Each column is a scalar (broadcast to every row) or a 1-d array; all
    arrays must have the same length.  The columns are copied, so changing the
    arrays afterwards does not affect the batch.  Offsets are file offsets
    (uint64; -1 means the file position, as for read(2)).  ``keepalive``
    holds whatever owns the memory the addresses point into, so that a
    cancelled caller's buffers stay alive while the kernel may still write
    them.
    """

    __slots__ = ("op", "fd", "addr", "length", "offset", "buf_index", "keepalive", "_n")

    def __init__(self, op, fd, addr, length, offset, buf_index=0, *, keepalive=None):
        cols = (op, fd, addr, length, offset, buf_index)
        n = None
        for (name, _), c in zip(_COLUMNS, cols):
            if isinstance(c, (int, np.integer)):
                continue
            shape = np.shape(c)
            if len(shape) > 1:
                raise ValueError(f"Batch.{name}: scalar or 1-d array expected")
            if len(shape) == 1:
                if n is not None and shape[0] != n:
                    raise ValueError(f"Batch.{name}: {shape[0]} rows, expected {n}")
                n = shape[0]
        n = 1 if n is None else n
        if n >= MAX_ROWS:
            raise ValueError(f"Batch: at most {MAX_ROWS - 1} rows")
        if isinstance(op, (int, np.integer)):
            if not 0 <= op < lib.UMGR_OP_COUNT:
                raise ValueError(f"Batch.op: unknown operation {op}")
        else:
            ops = np.asarray(op)
            if ops.size and (ops.min() < 0 or ops.max() >= lib.UMGR_OP_COUNT):
                raise ValueError("Batch.op: unknown operation")
        for (name, dtype), c in zip(_COLUMNS, cols):
            setattr(self, name, _as_column(name, c, dtype, n))
        self.keepalive = keepalive
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"<Batch of {self._n} rows>"
