"""umgr.kernel.ring against the real kernel: real io_uring, real files."""
import errno
import mmap
import os
import shutil
import tempfile

import numpy as np
import pytest
import trio
import trio.testing

from umgr.kernel.ring import Batch, ClosedError, Op, Ring, address, iovec_array

PAGE = 4096


@pytest.fixture
def disk_dir():
    # /tmp may be tmpfs, which refuses O_DIRECT; /var/tmp is on the disk.
    d = tempfile.mkdtemp(prefix="umgr-ring-", dir="/var/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ring():
    r = Ring(64)
    yield r
    r.close()


def open_direct(path, size):
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as e:  # the file backend needs O_DIRECT in its state directory too
        pytest.fail(f"O_DIRECT refused for {path}: {e}")
    os.ftruncate(fd, size)
    return fd


def pages(n, seed):
    """n pages of random bytes in a page-aligned anonymous mapping."""
    m = mmap.mmap(-1, n * PAGE)
    m[:] = np.random.default_rng(seed).integers(0, 256, n * PAGE, dtype=np.uint8).tobytes()
    return m


def page_of(m, i):
    return m[i * PAGE:(i + 1) * PAGE]


@pytest.mark.timeout(60)
def test_write_writev_then_read_readv_at_random_offsets(disk_dir, ring):
    n = 96
    fd = os.open(os.path.join(disk_dir, "f"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        src = pages(n, 1)
        base = address(src)
        slots = np.random.default_rng(2).permutation(1024)[:n]  # random page slots
        # First half with WRITE, second half with WRITEV (two iovecs of 2 KiB each).
        half = n // 2
        res = ring.submit_and_wait_sync(
            Batch(Op.WRITE, fd, base + np.arange(half) * PAGE, PAGE, slots[:half] * PAGE))
        assert (res == PAGE).all()
        iovs = [iovec_array([memoryview(src)[i * PAGE:i * PAGE + 2048],
                             memoryview(src)[i * PAGE + 2048:(i + 1) * PAGE]])
                for i in range(half, n)]
        res = ring.submit_and_wait_sync(
            Batch(Op.WRITEV, fd, [a.ctypes.data for a in iovs], 2, slots[half:] * PAGE,
                  keepalive=iovs))
        assert (res == PAGE).all()
        for i in range(n):  # independent check through the page cache
            assert os.pread(fd, PAGE, int(slots[i]) * PAGE) == page_of(src, i)

        # Read back in another order: READ for even rows, READV (one iovec) for odd.
        dst = mmap.mmap(-1, n * PAGE)
        dbase = address(dst)
        order = np.random.default_rng(3).permutation(n)
        ops = np.where(order % 2 == 0, Op.READ, Op.READV)
        iov1 = [iovec_array([memoryview(dst)[i * PAGE:(i + 1) * PAGE]]) for i in range(n)]
        addrs = np.where(order % 2 == 0, dbase + order * PAGE,
                         np.array([iov1[i].ctypes.data for i in order], dtype=np.int64))
        lens = np.where(order % 2 == 0, PAGE, 1)
        res = ring.submit_and_wait_sync(
            Batch(ops, fd, addrs, lens, slots[order] * PAGE, keepalive=iov1))
        assert (res == PAGE).all()
        assert dst[:] == src[:]
        st = ring.statistics()
        assert st["in_flight"] == 0 and st["submitted"] == st["completed"] == 2 * n
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_fixed_buffers_read_and_write(disk_dir, ring):
    n = 32
    fd = os.open(os.path.join(disk_dir, "f"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        src = pages(n, 4)
        dst = bytearray(n * PAGE)  # bytearray and mmap both register
        ring.register_buffers([src, dst])
        offs = np.random.default_rng(5).permutation(4 * n)[:n] * PAGE
        res = ring.submit_and_wait_sync(
            Batch(Op.WRITE_FIXED, fd, address(src) + np.arange(n) * PAGE, PAGE, offs, 0))
        assert (res == PAGE).all()
        res = ring.submit_and_wait_sync(
            Batch(Op.READ_FIXED, fd, address(dst) + np.arange(n) * PAGE, PAGE, offs, 1))
        assert (res == PAGE).all()
        assert bytes(dst) == src[:]
        # An address outside the named fixed buffer is refused by the kernel.
        res = ring.submit_and_wait_sync(Batch(Op.READ_FIXED, fd, address(src), PAGE, 0, 1))
        assert res[0] == -errno.EFAULT
        ring.unregister_buffers()
        res = ring.submit_and_wait_sync(Batch(Op.READ_FIXED, fd, address(dst), PAGE, 0, 1))
        assert res[0] < 0
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_o_direct_read_write_and_fixed(disk_dir, ring):
    n = 128
    fd = open_direct(os.path.join(disk_dir, "direct"), 2048 * PAGE)
    try:
        src = pages(n, 6)
        offs = np.random.default_rng(7).permutation(2048)[:n] * PAGE
        res = ring.submit_and_wait_sync(
            Batch(Op.WRITE, fd, address(src) + np.arange(n) * PAGE, PAGE, offs))
        assert (res == PAGE).all()
        dst = mmap.mmap(-1, n * PAGE)
        ring.register_buffers([dst])
        res = ring.submit_and_wait_sync(
            Batch(Op.READ_FIXED, fd, address(dst) + np.arange(n) * PAGE, PAGE, offs, 0))
        assert (res == PAGE).all()
        assert dst[:] == src[:]
        # (Misaligned O_DIRECT is not an error on ext4: it falls back to buffered I/O.)
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_errors_come_back_per_row(disk_dir, ring):
    path = os.path.join(disk_dir, "f")
    with open(path, "wb") as f:
        f.write(b"x" * PAGE)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = mmap.mmap(-1, 3 * PAGE)
        a = address(buf)
        closed_fd = os.open(path, os.O_RDONLY)
        os.close(closed_fd)
        res = ring.submit_and_wait_sync(Batch(
            [Op.READ, Op.READ, Op.WRITE, Op.READ, Op.READ],
            [fd, 987654, fd, fd, fd],
            [a, a + PAGE, a, 0, a + 2 * PAGE],
            PAGE,
            [0, 0, 0, 0, PAGE]))
        assert res.dtype == np.int32
        assert list(res) == [PAGE, -errno.EBADF, -errno.EBADF, -errno.EFAULT, 0]
        assert buf[:PAGE] == b"x" * PAGE
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_batch_columns():
    b = Batch(Op.READ, 3, np.arange(5) * PAGE, PAGE, -1)
    assert len(b) == 5
    assert (b.fd == 3).all() and b.offset[0] == 2**64 - 1
    assert len(Batch(Op.READ, 3, 0, 1, 0)) == 1
    assert len(Batch(Op.READ, 3, np.zeros(0, np.uint64), 1, 0)) == 0
    offs = np.arange(5) * PAGE
    b = Batch(Op.READ, 3, 0, PAGE, offs)
    offs[0] = 12345  # columns are copies: changing the caller's array later is harmless
    assert b.offset[0] == 0
    with pytest.raises(ValueError):
        Batch(Op.READ, [1, 2], [1, 2, 3], 1, 0)
    with pytest.raises(ValueError):
        Batch(17, 1, 0, 1, 0)
    with pytest.raises(TypeError):
        Batch(Op.READ, 1, 0.5, 1, 0)
    with pytest.raises(ValueError):
        Batch(Op.READ, 1, np.zeros((2, 2), np.uint64), 1, 0)


@pytest.mark.timeout(60)
def test_empty_batch(ring):
    assert len(ring.submit_and_wait_sync(Batch(Op.READ, 0, np.zeros(0, np.int64), 1, 0))) == 0
    assert trio.run(ring.submit_and_wait, Batch(Op.READ, 0, [], 1, 0)).shape == (0,)


@pytest.mark.timeout(60)
def test_batch_larger_than_ring(disk_dir):
    n = 1000
    with Ring(4) as r:  # SQ 4, CQ 8
        assert r.sq_entries == 4 and r.cq_entries == 8
        fd = open_direct(os.path.join(disk_dir, "direct"), n * PAGE)
        try:
            src = pages(n, 8)
            perm = np.random.default_rng(9).permutation(n)
            res = r.submit_and_wait_sync(
                Batch(Op.WRITE, fd, address(src) + perm * PAGE, PAGE, np.arange(n) * PAGE))
            assert (res == PAGE).all()
            dst = mmap.mmap(-1, n * PAGE)

            async def main():
                return await r.submit_and_wait(
                    Batch(Op.READ, fd, address(dst) + np.arange(n) * PAGE, PAGE,
                          np.argsort(perm) * PAGE))

            res = trio.run(main)
            assert (res == PAGE).all()
            assert dst[:] == src[:]
            assert r.statistics()["in_flight"] == 0
        finally:
            os.close(fd)


@pytest.mark.timeout(60)
def test_page_cache_hits_complete_without_waiting(disk_dir, ring):
    path = os.path.join(disk_dir, "f")
    with open(path, "wb") as f:
        f.write(os.urandom(64 * PAGE))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 64 * PAGE, 0)  # now in the page cache
        dst = mmap.mmap(-1, 64 * PAGE)
        waits = ring.statistics()["waits"]

        async def main():
            return await ring.submit_and_wait(
                Batch(Op.READ, fd, address(dst) + np.arange(64) * PAGE, PAGE,
                      np.arange(64) * PAGE))

        res = trio.run(main)
        assert (res == PAGE).all()
        assert ring.statistics()["waits"] == waits
    finally:
        os.close(fd)


@pytest.mark.timeout(60)
def test_concurrent_trio_tasks_share_one_ring(disk_dir):
    tasks, per_task, rounds = 6, 40, 5
    npages = tasks * per_task
    with Ring(16) as r:
        fd = open_direct(os.path.join(disk_dir, "direct"), npages * PAGE)
        try:
            src = pages(npages, 10)
            res = r.submit_and_wait_sync(
                Batch(Op.WRITE, fd, address(src) + np.arange(npages) * PAGE, PAGE,
                      np.arange(npages) * PAGE))
            assert (res == PAGE).all()
            dsts = [mmap.mmap(-1, per_task * PAGE) for _ in range(tasks)]

            async def worker(t):
                rng = np.random.default_rng(100 + t)
                for _ in range(rounds):
                    # each task reads random pages of the whole file
                    which = rng.integers(0, npages, per_task)
                    res = await r.submit_and_wait(Batch(
                        Op.READ, fd, address(dsts[t]) + np.arange(per_task) * PAGE, PAGE,
                        which * PAGE))
                    assert (res == PAGE).all()
                    for i, p in enumerate(which):
                        assert page_of(dsts[t], i) == page_of(src, p)

            async def main():
                async with trio.open_nursery() as nursery:
                    for t in range(tasks):
                        nursery.start_soon(worker, t)

            trio.run(main)
            st = r.statistics()
            assert st["in_flight"] == 0 and st["unknown_cqes"] == 0
            assert st["completed"] == npages + tasks * per_task * rounds
            assert st["waits"] > 0  # O_DIRECT completions arrived via the eventfd
        finally:
            os.close(fd)


@pytest.mark.timeout(60)
def test_cancellation_does_not_corrupt_later_batches(disk_dir):
    n = 2048
    with Ring(32) as r:
        fd = open_direct(os.path.join(disk_dir, "direct"), n * PAGE)
        try:
            src = pages(n, 11)
            res = r.submit_and_wait_sync(
                Batch(Op.WRITE, fd, address(src) + np.arange(n) * PAGE, PAGE,
                      np.arange(n) * PAGE))
            assert (res == PAGE).all()
            victim = mmap.mmap(-1, n * PAGE)
            other = mmap.mmap(-1, n * PAGE)
            cancelled_in_flight = []

            async def doomed(task_status=trio.TASK_STATUS_IGNORED):
                with trio.CancelScope() as cs:
                    task_status.started(cs)
                    await r.submit_and_wait(Batch(
                        Op.READ, fd, address(victim) + np.arange(n) * PAGE, PAGE,
                        np.arange(n) * PAGE, keepalive=victim))
                assert cs.cancelled_caught

            async def patient(rows):
                res = await r.submit_and_wait(Batch(
                    Op.READ, fd, address(other) + rows * PAGE, PAGE, rows[::-1] * PAGE))
                assert (res == PAGE).all()
                for i, p in zip(rows, rows[::-1]):
                    assert page_of(other, i) == page_of(src, p)

            async def main():
                async with trio.open_nursery() as nursery:
                    # doomed becomes the reaper; patient waits behind it
                    # (not wait_all_tasks_blocked: with I/O completing all the
                    # time the run is never idle until the batch is over)
                    cs = await nursery.start(doomed)
                    while not r._reaper_busy:
                        await trio.sleep(0)
                    nursery.start_soon(patient, np.arange(0, n // 2))
                    await trio.sleep(0)
                    await trio.sleep(0)
                    cancelled_in_flight.append(r.statistics()["in_flight"])
                    cs.cancel()
                # later batches on the same ring are exact
                await patient(np.arange(n // 2, n))

            trio.run(main)
            st = r.statistics()
            assert cancelled_in_flight[0] > 0  # the cancel really hit requests in the kernel
            assert st["in_flight"] == 0 and st["queued"] == 0 and st["unknown_cqes"] == 0
            assert not r._records  # the cancelled record was dropped once its CQEs came
            # every row of the cancelled batch that was submitted did land where asked
            done = st["completed"] - n - n
            assert 0 < done <= n
        finally:
            os.close(fd)


@pytest.mark.timeout(60)
def test_reaper_cancelled_hands_over(disk_dir):
    n = 512
    with Ring(8) as r:
        fd = open_direct(os.path.join(disk_dir, "direct"), n * PAGE)
        try:
            buf_a = pages(n, 12)  # written first: holes would read back with no I/O
            assert (r.submit_and_wait_sync(Batch(
                Op.WRITE, fd, address(buf_a) + np.arange(n) * PAGE, PAGE,
                np.arange(n) * PAGE)) == PAGE).all()
            buf_b = mmap.mmap(-1, n * PAGE)
            result = {}

            async def reader(name, buf, task_status=trio.TASK_STATUS_IGNORED):
                with trio.CancelScope() as cs:
                    task_status.started(cs)
                    result[name] = await r.submit_and_wait(Batch(
                        Op.READ, fd, address(buf) + np.arange(n) * PAGE, PAGE,
                        np.arange(n) * PAGE, keepalive=buf))

            async def main():
                async with trio.open_nursery() as nursery:
                    cs_a = await nursery.start(reader, "a", buf_a)
                    while not r._reaper_busy:
                        await trio.sleep(0)
                    await nursery.start(reader, "b", buf_b)
                    await trio.sleep(0)
                    assert r._reaper_busy and "a" not in result
                    cs_a.cancel()

            trio.run(main)
            assert "a" not in result
            assert (result["b"] == PAGE).all()
            assert buf_b[:] == buf_a[:]
            assert r.statistics()["in_flight"] == 0
        finally:
            os.close(fd)


@pytest.mark.timeout(60)
def test_close_semantics(disk_dir):
    r = Ring(8)
    r.close()
    r.close()  # idempotent
    with pytest.raises(ClosedError):
        r.submit_and_wait_sync(Batch(Op.READ, 0, 0, 0, 0))
    with pytest.raises(ClosedError):
        r.register_buffers([bytearray(PAGE)])

    # close() waits for requests in the kernel; a task waiting on the ring
    # gets its results if its batch completed, else ClosedError.
    r = Ring(8)
    rfd, wfd = os.pipe()  # a read from an empty pipe stays pending
    buf = bytearray(16)

    outcome = []

    async def reader():
        try:
            res = await r.submit_and_wait(
                Batch(Op.READ, rfd, address(buf), 16, -1, keepalive=buf))
            outcome.append(res.tolist())
        except ClosedError:
            outcome.append("closed")
        try:
            await r.submit_and_wait(Batch(Op.READ, rfd, address(buf), 16, -1, keepalive=buf))
        except ClosedError:
            outcome.append("closed")

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            os.write(wfd, b"0123456789abcdef")  # lets close() drain the pending read
            r.close()

    try:
        trio.run(main)
        assert outcome == [[16], "closed"]
        assert bytes(buf) == b"0123456789abcdef"
    finally:
        os.close(rfd)
        os.close(wfd)


@pytest.mark.timeout(60)
def test_sync_call_inside_trio_is_refused(ring):
    async def main():
        with pytest.raises(RuntimeError):
            ring.submit_and_wait_sync(Batch(Op.READ, 0, 0, 0, 0))

    trio.run(main)
