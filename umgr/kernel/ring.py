"""io_uring for umgr: column-oriented batches, one cffi call per batch.

Facts this module relies on (io_uring(7), liburing 2.3, Linux >= 5.5):
- The CQ holds ``cq_entries`` CQEs (twice the SQ by default).  A ring never has
  more requests outstanding than that, so completions never overflow and
  submission never has to deal with -EBUSY from a full CQ in normal running.
- IORING_FEAT_SUBMIT_STABLE: once io_uring_submit() returns, the kernel has
  consumed the SQEs (and any iovec arrays they point to).  The data buffers,
  however, belong to the kernel until the request's CQE is posted, even if
  the task that asked for it has gone away.
- A registered eventfd is signalled for every CQE posted.  Buffered I/O that
  hits the page cache usually completes inside io_uring_submit(), so the ring
  is reaped right after submitting and the eventfd is only waited on when the
  batch is not already complete.
- trio allows one task at a time in wait_readable() on a given fd
  (BusyResourceError otherwise).

Concurrency scheme (one trio run, many tasks, one Ring):
- Every caller of :meth:`Ring.submit_and_wait` queues its batch; whichever
  task runs ``_pump`` submits queued rows of *all* batches (FIFO) as far as
  SQ space and CQ capacity allow, and reaps *all* available CQEs into the
  result arrays of their batches.
- At most one task at a time is "the reaper": the one that found no reaper
  when it had to wait.  It sleeps on the eventfd; the others sleep on a
  shared trio.Event that is set whenever CQEs were reaped or the reaper role
  was given up.  When the reaper's own batch is complete (or it is
  cancelled), it simply leaves and the next waiter to wake takes the role.
  No background task and no nursery are needed, so nothing can be left
  running or be forgotten.
- A cancelled caller's rows that are already in the kernel stay recorded
  (with the batch, so its buffers stay referenced) until their CQEs arrive;
  their user_data values are never reused before that.  Rows not yet
  submitted are dropped.  Those late CQEs are reaped by the next caller, or
  by close(), which waits for everything still in the kernel.

The Ring is not thread-safe: use it from one thread (one trio run, or plain
blocking calls to :meth:`Ring.submit_and_wait_sync`).
"""
from __future__ import annotations

import collections
import errno
import os
import select
import time

import numpy as np
import trio

from umgr.bindings._uring import ffi, lib

from umgr.errors import ClosedError
from umgr.kernel.uring_batch import MAX_ROWS, Batch, Op, address, iovec_array


__all__ = ["Op", "Batch", "Ring", "ClosedError", "address", "iovec_array"]


_ROW_BITS = 32
_ROW_MASK = (1 << _ROW_BITS) - 1
_MAX_ROWS = MAX_ROWS
# A refused submission (EAGAIN/EBUSY) posts no CQE to wake us: retry this soon.
SUBMIT_RETRY_SECONDS = 0.001
_MAX_BATCH_IDS = 1 << (64 - _ROW_BITS)


class _Record:
    """One batch on its way through the ring."""

    __slots__ = ("bid", "batch", "n", "limit", "next_row", "done", "results", "ptrs")

    def __init__(self, bid: int, batch: Batch):
        self.bid = bid
        self.batch = batch
        self.n = len(batch)
        self.limit = self.n  # rows that will be submitted (cut on cancel)
        self.next_row = 0  # rows prepared so far
        self.done = 0  # rows completed
        self.results = np.zeros(self.n, dtype=np.int32)
        self.ptrs = (
            ffi.from_buffer("uint8_t[]", batch.op),
            ffi.from_buffer("int32_t[]", batch.fd),
            ffi.from_buffer("uint64_t[]", batch.addr),
            ffi.from_buffer("uint32_t[]", batch.length),
            ffi.from_buffer("uint64_t[]", batch.offset),
            ffi.from_buffer("uint16_t[]", batch.buf_index),
        )


class _EventFd:
    """Owner of the ring's eventfd; forgets the number once closed."""

    def __init__(self):
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def drain(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:  # not inside a trio run: nobody can be waiting
            pass
        os.close(fd)


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


class Ring:
    """An io_uring instance with an eventfd, shared by the tasks of one trio run.

    ``entries`` is the SQ size (the kernel rounds it up to a power of two);
    batches of any length are split to fit.
    """

    def __init__(self, entries: int = 256):
        self._ring = ffi.new("struct io_uring *")
        _check(lib.io_uring_queue_init(entries, self._ring, 0), "io_uring_queue_init")
        self._closed = False
        try:
            self._efd = _EventFd()
            _check(lib.io_uring_register_eventfd(self._ring, self._efd.fd),
                   "io_uring_register_eventfd")
        except BaseException:
            lib.io_uring_queue_exit(self._ring)
            self._closed = True
            raise
        self.sq_entries = lib.umgr_uring_sq_entries(self._ring)
        self.cq_entries = lib.umgr_uring_cq_entries(self._ring)
        self._ud = np.empty(self.cq_entries, dtype=np.uint64)
        self._res = np.empty(self.cq_entries, dtype=np.int32)
        self._ud_p = ffi.from_buffer("uint64_t[]", self._ud)
        self._res_p = ffi.from_buffer("int32_t[]", self._res)
        self._records: dict[int, _Record] = {}  # bid -> record with rows in flight or queued
        self._queue: collections.deque[_Record] = collections.deque()  # rows to submit
        self._next_bid = 1
        self._in_flight = 0  # prepared and not yet completed
        self._reaper_busy = False
        self._wakeup = trio.Event()
        self._fixed = None  # keeps registered buffers exported while registered
        self._stats = dict(submitted=0, completed=0, batches=0, unknown_cqes=0, waits=0)

    # -- life cycle ---------------------------------------------------------

    def close(self) -> None:
        """Tear the ring down; idempotent.

        Requests still in the kernel (from cancelled callers) are waited for
        first, so that no buffer is written after the ring is gone.
        """
        if self._closed:
            return
        try:
            self._drain_blocking(timeout_s=10.0)
        finally:
            self._closed = True
            self._queue.clear()
            self._efd.close()
            lib.io_uring_queue_exit(self._ring)
            self._fixed = None
            self._wake()

    def __del__(self):
        # Without this an unclosed Ring leaks its io_uring fd and pinned buffers.
        if not getattr(self, "_closed", True):
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("io_uring ring is closed")

    # -- registration -------------------------------------------------------

    def register_buffers(self, buffers) -> None:
        """Register writable buffers as fixed buffers 0..n-1 (replacing any)."""
        self._check_open()
        if self._in_flight or self._queue:
            raise RuntimeError("cannot change fixed buffers with I/O in flight")
        views = [ffi.from_buffer("char[]", b, require_writable=True) for b in buffers]
        iov = ffi.new("struct iovec[]", len(views))
        for i, v in enumerate(views):
            iov[i].iov_base = v
            iov[i].iov_len = len(v)
        self.unregister_buffers()
        if views:
            _check(lib.io_uring_register_buffers(self._ring, iov, len(views)),
                   "io_uring_register_buffers")
            self._fixed = views

    def unregister_buffers(self) -> None:
        self._check_open()
        if self._fixed is None:
            return
        if self._in_flight or self._queue:
            raise RuntimeError("cannot change fixed buffers with I/O in flight")
        _check(lib.io_uring_unregister_buffers(self._ring), "io_uring_unregister_buffers")
        self._fixed = None

    # -- submission and completion -----------------------------------------

    def _new_record(self, batch: Batch) -> _Record:
        if not isinstance(batch, Batch):
            raise TypeError("Batch expected")
        bid = self._next_bid
        while bid in self._records:  # only after 2**32 batches: skip live ids
            bid = bid % (_MAX_BATCH_IDS - 1) + 1
        self._next_bid = bid % (_MAX_BATCH_IDS - 1) + 1
        rec = _Record(bid, batch)
        self._stats["batches"] += 1
        if rec.n:
            self._records[bid] = rec
            self._queue.append(rec)
        return rec

    def _fill(self) -> int:
        """Prepare queued rows within CQ capacity and submit them."""
        ring = self._ring
        prepared = 0
        while self._queue:
            cap = self.cq_entries - self._in_flight
            if cap <= 0:
                break
            rec = self._queue[0]
            row = rec.next_row
            k = min(cap, rec.limit - row)
            p = rec.ptrs
            got = lib.umgr_uring_prep_batch(
                ring, k, p[0] + row, p[1] + row, p[2] + row, p[3] + row,
                p[4] + row, p[5] + row, (rec.bid << _ROW_BITS) | row)
            _check(got, "umgr_uring_prep_batch")
            rec.next_row += got
            prepared += got
            self._in_flight += got
            if rec.next_row >= rec.limit:
                self._queue.popleft()
            if got < k and not self._submit():  # SQ full, and it would not drain
                break
        if lib.io_uring_sq_ready(ring):
            self._submit()
        return prepared

    def _submit(self) -> bool:
        ret = lib.umgr_uring_submit(self._ring)
        if ret in (-errno.EAGAIN, -errno.EBUSY):  # SQEs stay queued; retry after reaping
            return False
        _check(ret, "io_uring_submit")
        self._stats["submitted"] += ret
        return True

    def _reap(self) -> int:
        n = lib.umgr_uring_reap(self._ring, self._ud_p, self._res_p, self.cq_entries)
        _check(n, "umgr_uring_reap")
        if n == 0:
            return 0
        ud = self._ud[:n]
        res = self._res[:n]
        bids = ud >> np.uint64(_ROW_BITS)
        rows = (ud & np.uint64(_ROW_MASK)).astype(np.intp)
        first = int(bids[0])
        if (bids == first).all():
            self._deliver(first, rows, res)
        else:
            for bid in np.unique(bids):
                sel = bids == bid
                self._deliver(int(bid), rows[sel], res[sel])
        self._in_flight -= n
        self._stats["completed"] += n
        return n

    def _deliver(self, bid: int, rows, res) -> None:
        rec = self._records.get(bid)
        if rec is None:  # cannot happen unless the kernel is confused; count it
            self._stats["unknown_cqes"] += len(rows)
            self._in_flight += len(rows)  # it was never counted as ours
            return
        rec.results[rows] = res
        rec.done += len(rows)
        if rec.done >= rec.limit:
            del self._records[bid]

    def _pump(self) -> None:
        """Submit what fits and reap what is there.

        Goes round again only while everything submitted has completed
        (page-cache hits complete inside io_uring_submit).  When the device is
        slower, polling the CQ in a loop would only starve the other tasks:
        room freed by the reap is refilled once and the caller then waits on
        the eventfd.
        """
        self._check_open()
        reaped = 0
        while True:
            self._fill()
            r = self._reap()
            reaped += r
            if not r or not self._queue:
                break
            if self._in_flight:
                self._fill()
                break
        if reaped:
            self._wake()

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = trio.Event()

    def _abandon(self, rec: _Record) -> None:
        """The caller is gone: submit nothing more, keep what is in the kernel."""
        rec.limit = rec.next_row
        try:
            self._queue.remove(rec)
        except ValueError:
            pass
        if rec.done >= rec.limit:
            self._records.pop(rec.bid, None)

    async def _wait(self) -> None:
        if self._reaper_busy:
            await self._wakeup.wait()
            return
        self._reaper_busy = True
        try:
            self._stats["waits"] += 1
            if lib.io_uring_sq_ready(self._ring):
                # Submission was refused (EAGAIN/EBUSY): the eventfd may never
                # fire for it, so poll again soon.
                with trio.move_on_after(SUBMIT_RETRY_SECONDS):
                    await trio.lowlevel.wait_readable(self._efd.fd)
            else:
                await trio.lowlevel.wait_readable(self._efd.fd)
            self._efd.drain()
        except trio.ClosedResourceError:
            pass  # close() drained the ring first; the caller checks its batch
        finally:
            self._reaper_busy = False
            self._wake()  # hand the reaper role to whoever wakes next

    async def submit_and_wait(self, batch: Batch) -> np.ndarray:
        """Run every row of ``batch``; return int32 results (bytes or -errno) in row order.

        Safe to call from many tasks at once.  If the caller is cancelled,
        requests already in the kernel run to completion in the background
        (their batch, and its ``keepalive``, stay referenced until then).
        """
        self._check_open()
        await trio.lowlevel.checkpoint_if_cancelled()
        rec = self._new_record(batch)
        waited = False
        try:
            while True:
                self._pump()
                if rec.done >= rec.limit:
                    break
                waited = True
                await self._wait()
                if rec.done >= rec.n:  # complete, even if the ring closed meanwhile
                    break
        except BaseException:
            self._abandon(rec)
            raise
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return rec.results

    def submit_and_wait_sync(self, batch: Batch) -> np.ndarray:
        """Blocking :meth:`submit_and_wait` for code outside trio."""
        self._check_open()
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("Ring.submit_and_wait_sync would block the trio run; "
                               "await Ring.submit_and_wait instead")
        rec = self._new_record(batch)
        poller = select.poll()
        poller.register(self._efd.fd, select.POLLIN)
        try:
            while True:
                self._pump()
                if rec.done >= rec.limit:
                    return rec.results
                self._stats["waits"] += 1
                poller.poll(1 if lib.io_uring_sq_ready(self._ring) else None)
                self._efd.drain()
        except BaseException:  # KeyboardInterrupt: same rule as cancellation
            self._abandon(rec)
            raise

    def _drain_blocking(self, timeout_s: float) -> None:
        """Wait (blocking) for every request already in the kernel."""
        self._queue.clear()
        for rec in self._records.values():
            rec.limit = rec.next_row
        poller = select.poll()
        poller.register(self._efd.fd, select.POLLIN)
        end = time.monotonic() + timeout_s
        while self._in_flight:
            if lib.io_uring_sq_ready(self._ring):
                self._submit()
            self._reap()
            if not self._in_flight or time.monotonic() > end:
                break
            poller.poll(10)
            self._efd.drain()
        self._records.clear()

    # -- observability ------------------------------------------------------

    def statistics(self) -> dict:
        """Counters: SQEs submitted, CQEs completed, batches accepted, rows in flight."""
        s = dict(self._stats)
        s["in_flight"] = self._in_flight
        s["queued"] = sum(r.limit - r.next_row for r in self._queue)
        s["sq_entries"] = self.sq_entries
        s["cq_entries"] = self.cq_entries
        return s
