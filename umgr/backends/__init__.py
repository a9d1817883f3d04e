"""Swap backends: where evicted pages live.

A backend is two batch methods: `write(slots, addrs)` stores the page at
each address `addrs[i]` in `slots[i]`, `read(slots, addrs)` brings them
back (umap's Store has the same shape). Slot numbers come from the backend's
SlotAllocator, which the daemon uses directly. A backend raises BackendError
when I/O fails; the daemon then keeps the pages resident. Adding a backend:
subclass Backend, implement the two methods, add it to BACKENDS, and run
tests/test_backends.py against it (the conformance suite is parametrised
over BACKENDS).
"""
from __future__ import annotations

import time

import numpy as np
import trio

from umgr.backends.slots import SlotAllocator
from umgr.kernel import PAGE_SIZE

IO_BUCKETS = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 200e-3, 1.0)


class Backend:
    name = "abstract"

    def __init__(self, capacity_pages: int):
        self.slots = SlotAllocator(capacity_pages)
        self.pages_written = 0
        self.pages_read = 0
        self.errors = 0
        self.io_latency = np.zeros(len(IO_BUCKETS) + 1, np.int64)  # batches per bucket
        self.io_seconds = 0.0

    async def write(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        raise NotImplementedError

    async def read(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def _timed(self, started: float) -> float:
        """Account an I/O that began at `started`; returns its seconds."""
        elapsed = time.perf_counter() - started
        self.io_latency[np.searchsorted(IO_BUCKETS, elapsed)] += 1
        self.io_seconds += elapsed
        return elapsed

    def statistics(self) -> dict:
        return {
            "backend": self.name,
            "capacity_pages": self.slots.capacity,
            "used_pages": self.slots.used,
            "pages_written": self.pages_written,
            "pages_read": self.pages_read,
            "errors": self.errors,
        }


def io_runs(slots: np.ndarray, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pages with consecutive slots and consecutive addresses form one I/O:
    returns (address, first slot, pages) per run."""
    slots = np.asarray(slots, np.int64)
    addrs = np.asarray(addrs, np.uint64)
    if len(slots) == 0:
        empty = np.empty(0, np.int64)
        return empty.astype(np.uint64), empty, empty
    contiguous = (np.diff(slots) == 1) & (np.diff(addrs.astype(np.int64)) == PAGE_SIZE)
    first = np.concatenate(([0], np.flatnonzero(~contiguous) + 1))
    count = np.diff(np.concatenate((first, [len(slots)])))
    return addrs[first], slots[first], count


def open_backend(name: str, **options) -> Backend:
    if name == "file":
        from umgr.backends.file import FileBackend
        return FileBackend(**options)
    raise ValueError(f"unknown backend {name!r}; available: file")


async def io_to_the_end(operation, slots: np.ndarray, addrs: np.ndarray) -> None:
    """Backend I/O, shielded from cancellation (the target going away): a
    request abandoned in flight could still land in a slot or a buffer
    reused since. A batch takes milliseconds."""
    with trio.CancelScope(shield=True):
        await operation(slots, addrs)
