"""umgr.kernel.procmem against the real kernel: another process's memory, zaps,
pidfds and PAGEMAP_SCAN."""

import errno
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from helpers import ctouch
from umgr.kernel.uffd_extra import Userfaultfd
from umgr.kernel import procmem as M
from umgr.kernel import uffd as U
from umgr.errors import TargetGone

P = 4096


@pytest.fixture(scope="module")
def ct():
    return ctouch.load()


@pytest.fixture
def mapping(ct):
    ffi, lib = ct
    made = []

    def make(npages):
        ptr = lib.h_map(npages * P)
        assert ptr != ffi.NULL
        made.append((ptr, npages * P))
        return int(ffi.cast("uintptr_t", ptr))

    yield make
    for ptr, length in made:
        lib.h_unmap(ptr, length)


CHILD = textwrap.dedent("""
    import ctypes, hashlib, sys
    n = int(sys.argv[1])
    buf = ctypes.create_string_buffer(bytes((i * 7 + 3) & 0xFF for i in range(n)), n)
    print(ctypes.addressof(buf), flush=True)
    for line in sys.stdin:
        print(hashlib.sha256(buf.raw).hexdigest(), flush=True)
""")


def child_bytes(n):
    return bytes((i * 7 + 3) & 0xFF for i in range(n))


@pytest.fixture
def child():
    """A Python child holding a known 64 KiB buffer: (Popen, address, size)."""
    size = 64 * 1024
    with subprocess.Popen([sys.executable, "-c", CHILD, str(size)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as proc:
        addr = int(proc.stdout.readline())
        yield proc, addr, size
        proc.kill()


def child_digest(proc):
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_process_vm_readv_reads_another_process(child):
    proc, addr, size = child
    want = child_bytes(size)
    offsets = np.array([0, 5000, 9000, 40000, size - 100], dtype=np.uint64)
    lens = np.array([100, 3000, 1, 8192, 100], dtype=np.uint64)
    local = np.zeros(int(lens.sum()), dtype=np.uint8)
    n = M.process_vm_readv(proc.pid, local.ctypes.data, offsets + addr, lens)
    assert n == lens.sum()
    expect = b"".join(want[o:o + ln] for o, ln in zip(offsets.tolist(), lens.tolist()))
    assert local.tobytes() == expect


def test_process_vm_writev_writes_another_process(child):
    import hashlib
    proc, addr, size = child
    data = np.frombuffer(os.urandom(2 * 4096), dtype=np.uint8).copy()
    n = M.process_vm_writev(proc.pid, data.ctypes.data, [addr + 100, addr + 20000], [4096, 4096])
    assert n == 2 * 4096
    want = bytearray(child_bytes(size))
    want[100:100 + 4096] = data[:4096].tobytes()
    want[20000:20000 + 4096] = data[4096:].tobytes()
    assert child_digest(proc) == hashlib.sha256(want).hexdigest()


def test_process_vm_readv_loops_past_iov_max():
    src = np.frombuffer(os.urandom(3000 * 64), dtype=np.uint8).copy()
    starts = np.arange(3000, dtype=np.uint64) * 64 + src.ctypes.data
    lens = np.full(3000, 16, dtype=np.uint64)
    local = np.zeros(3000 * 16, dtype=np.uint8)
    assert M.process_vm_readv(os.getpid(), local.ctypes.data, starts, lens) == 3000 * 16
    assert np.array_equal(local.reshape(3000, 16), src.reshape(3000, 64)[:, :16])


def test_process_vm_readv_stops_at_a_hole(mapping, ct):
    base = mapping(3)
    ct[1].h_fill(ct[0].cast("void *", base), 3, 0, 1)
    M.madvise(base + P, P, M.MADV_DONTNEED)
    ct[1].h_unmap(ct[0].cast("void *", base + 2 * P), P)
    local = np.zeros(3 * P, dtype=np.uint8)
    # An unmapped remote page ends the read: the count says how far it got.
    assert M.process_vm_readv(os.getpid(), local.ctypes.data, [base], [3 * P]) == 2 * P
    with pytest.raises(OSError) as info:
        M.process_vm_readv(os.getpid(), local.ctypes.data, [base + 2 * P], [P])
    assert info.value.errno == errno.EFAULT


def test_process_vm_readv_after_exit_is_target_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    local = np.zeros(16, dtype=np.uint8)
    with pytest.raises(TargetGone):
        M.process_vm_readv(proc.pid, local.ctypes.data, [0x10000], [16])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("who", ["PIDFD_SELF_PROCESS", "PIDFD_SELF_THREAD", "own pidfd"])
def test_process_madvise_on_self_zaps_and_reports_remove(ct, mapping, who):
    ffi, lib = ct
    base = mapping(6)
    src = mapping(6)
    lib.h_fill(ffi.cast("void *", src), 6, 0, 77)
    with Userfaultfd.create() as u:
        u.api(U.UFFD_FEATURE_EVENT_REMOVE)
        u.register(base, 6 * P, U.UFFDIO_REGISTER_MODE_MISSING)
        assert u.copy(base, src, 6 * P) == (6 * P, 0)
        pidfd = {"PIDFD_SELF_PROCESS": M.PIDFD_SELF_PROCESS,
                 "PIDFD_SELF_THREAD": M.PIDFD_SELF_THREAD,
                 "own pidfd": None}[who]
        owned = pidfd is None
        if owned:
            pidfd = M.pidfd_open(os.getpid())
        result = []
        # The zap waits for each REMOVE to be read; the call runs in C with
        # the GIL released, so this thread can read them.
        zapper = threading.Thread(target=lambda: result.append(M.process_madvise(
            pidfd, [base, base + 3 * P], [P, 2 * P], M.MADV_DONTNEED)), daemon=True)
        zapper.start()
        events = []
        poller = select.poll()
        poller.register(u.fileno(), select.POLLIN)
        deadline = time.monotonic() + 20
        while zapper.is_alive():
            assert time.monotonic() < deadline
            events += u.read_events()
            poller.poll(5)
        events += u.read_events()
        zapper.join()
        if owned:
            os.close(pidfd)
    assert result == [3 * P]
    # One REMOVE per iovec, in order.
    assert events == [U.RemoveEvent(base, base + P), U.RemoveEvent(base + 3 * P, base + 5 * P)]
    present = M.pagemap_scan(os.getpid(), base, base + 6 * P, M.PAGE_IS_PRESENT, M.PAGE_IS_PRESENT)
    assert [(s, e) for s, e, _ in present] == [(base + P, base + 3 * P), (base + 5 * P, base + 6 * P)]


def page_range(addr, size):
    lo = addr & ~(P - 1)
    return lo, (addr + size + P - 1) & ~(P - 1)


def test_remote_dontneed_is_einval_but_cold_works(child):
    """Upstream Linux accepts only WILLNEED, COLD, PAGEOUT and COLLAPSE from
    another process; this kernel answers EINVAL for DONTNEED."""
    proc, addr, size = child
    lo, _ = page_range(addr, size)
    pidfd = M.pidfd_open(proc.pid)
    try:
        with pytest.raises(OSError) as info:
            M.process_madvise(pidfd, [lo], [P], M.MADV_DONTNEED)
        assert info.value.errno == errno.EINVAL
        assert M.process_madvise(pidfd, [lo], [P], M.MADV_COLD) == P
    finally:
        os.close(pidfd)


def test_process_madvise_after_exit_is_target_gone(child):
    proc, addr, size = child
    lo, _ = page_range(addr, size)
    pidfd = M.pidfd_open(proc.pid)
    try:
        proc.kill()
        proc.wait()
        with pytest.raises(TargetGone):
            M.process_madvise(pidfd, [lo], [P], M.MADV_COLD)
    finally:
        os.close(pidfd)


def test_process_madvise_loops_past_iov_max(ct, mapping):
    ffi, lib = ct
    n = 3000
    base = mapping(2 * n)
    lib.h_fill(ffi.cast("void *", base), 2 * n, 0, 1)
    starts = base + np.arange(n, dtype=np.uint64) * (2 * P)
    done = M.process_madvise(M.PIDFD_SELF_PROCESS, starts, np.full(n, P, dtype=np.uint64),
                             M.MADV_DONTNEED)
    assert done == n * P
    present = M.pagemap_scan(os.getpid(), base, base + 2 * n * P, M.PAGE_IS_PRESENT,
                             M.PAGE_IS_PRESENT)
    assert [s for s, _, _ in present] == [base + (2 * i + 1) * P for i in range(n)]


def test_pidfd_send_signal_and_getfd(child):
    proc, _, _ = child
    pidfd = M.pidfd_open(proc.pid)
    try:
        # The child's stdout is the write end of our pipe.
        fd = M.pidfd_getfd(pidfd, 1)
        try:
            assert not os.get_inheritable(fd)
            os.write(fd, b"hello\n")
        finally:
            os.close(fd)
        assert proc.stdout.readline() == "hello\n"
        M.pidfd_send_signal(pidfd, signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM
    finally:
        os.close(pidfd)
    with pytest.raises(TargetGone):
        M.pidfd_open(proc.pid)


def test_pagemap_scan_reports_present_pages(ct, mapping):
    ffi, lib = ct
    base = mapping(8)
    for page in (0, 1, 5):
        lib.h_write_byte(ffi.cast("char *", base + page * P), 1)
    scan = lambda **kw: M.pagemap_scan(os.getpid(), base, base + 8 * P, M.PAGE_IS_PRESENT,
                                       M.PAGE_IS_PRESENT, **kw)
    expect = [(base, base + 2 * P, M.PAGE_IS_PRESENT), (base + 5 * P, base + 6 * P, M.PAGE_IS_PRESENT)]
    assert scan() == expect
    # A one-entry output vector makes the kernel stop early at every run.
    assert scan(batch=1) == expect
    assert scan(max_pages=1) == [(base, base + P, M.PAGE_IS_PRESENT)]
    assert scan(max_pages=3) == expect
    holes = M.pagemap_scan(os.getpid(), base, base + 8 * P, M.PAGE_IS_PRESENT, M.PAGE_IS_PRESENT,
                           category_inverted=M.PAGE_IS_PRESENT)
    assert holes == [(base + 2 * P, base + 5 * P, 0), (base + 6 * P, base + 8 * P, 0)]


def test_pagemap_scan_of_another_process(child):
    proc, addr, size = child
    lo, hi = page_range(addr, size)
    fd = M.open_pagemap(proc.pid)
    try:
        with os.fdopen(fd, "rb", closefd=False) as pagemap:
            runs = M.pagemap_scan(pagemap, lo, hi, M.PAGE_IS_PRESENT, M.PAGE_IS_ALL)
    finally:
        os.close(fd)
    # The child wrote its whole buffer: the runs cover it without a gap.
    assert runs[0][0] == lo and runs[-1][1] == hi
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    assert all(c & M.PAGE_IS_PRESENT and not c & M.PAGE_IS_FILE for _, _, c in runs)
    proc.kill()
    proc.wait()
    with pytest.raises(TargetGone):
        M.pagemap_scan(proc.pid, lo, hi, M.PAGE_IS_PRESENT, M.PAGE_IS_PRESENT)


def test_madvise_self(ct, mapping):
    ffi, lib = ct
    base = mapping(2)
    lib.h_fill(ffi.cast("void *", base), 2, 0, 2)
    M.madvise(base, 2 * P, M.MADV_DONTNEED)
    assert M.pagemap_scan(os.getpid(), base, base + 2 * P, M.PAGE_IS_PRESENT, M.PAGE_IS_PRESENT) == []
    assert bytes(ffi.buffer(ffi.cast("char *", base), 2 * P)) == bytes(2 * P)
    with pytest.raises(OSError) as info:
        M.madvise(base + 1, P, M.MADV_DONTNEED)
    assert info.value.errno == errno.EINVAL


@pytest.mark.timeout(30)
@pytest.mark.parametrize("old_mm", ["kept alive", "gone"])
def test_checked_readv_never_reads_the_program_a_process_execd(programs, old_mm):
    """A pid names whatever program runs there now: after an exec,
    process_vm_readv reads the new one. checked_readv (the evictor's read)
    reads only the mm its /proc/PID/mem was opened on: it answers None (what
    it read wiped) while that mm lives on in a CLONE_VM sibling, whose pages
    mem_readv still reads, and TargetGone once the mm is gone."""
    from umgr.kernel.buffers import PageBuffer
    buf, mem_fd = PageBuffer(1), -1
    with subprocess.Popen([programs["exec_behind"], "keep" if old_mm == "kept alive" else "drop"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True) as proc:
        try:
            _, canary, data = proc.stdout.readline().split()
            canary, addrs, lens = int(canary, 16), np.array([int(data, 16)], np.uint64), np.array([P], np.uint64)
            mem_fd = M.open_mem(proc.pid)
            assert M.checked_readv(proc.pid, mem_fd, canary, buf.addr, addrs, lens) == P
            assert bytes(buf.bytes) == b"O" * P
            proc.stdin.write(b"exec\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == b"execd\n"
            buf.bytes[:] = 0
            # What the proof is for: by pid, the new program is read.
            assert M.process_vm_readv(proc.pid, buf.addr, addrs, lens) == P and bytes(buf.bytes) == b"N" * P
            if old_mm == "kept alive":
                assert M.checked_readv(proc.pid, mem_fd, canary, buf.addr, addrs, lens) is None
                assert not buf.bytes.any()
                assert M.mem_readv(mem_fd, buf.addr, addrs, lens, proc.pid) == P and bytes(buf.bytes) == b"O" * P
            else:
                buf.bytes[:] = 0
                with pytest.raises(TargetGone):
                    M.checked_readv(proc.pid, mem_fd, canary, buf.addr, addrs, lens)
                with pytest.raises(TargetGone):
                    M.mem_readv(mem_fd, buf.addr, addrs, lens, proc.pid)
                assert not buf.bytes.any()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            if mem_fd >= 0:
                os.close(mem_fd)
            buf.close()


def test_pagemap_entries_of_scattered_runs_read_as_one_span_or_one_by_one(ct, mapping):
    """Runs close together are read as one span, far apart one at a time;
    either way each run's pages get their own entries, in order."""
    ffi, lib = ct
    base = mapping(64)
    vpn0 = base // P
    touched = [0, 1, 2, 7, 20, 21, 40, 63]
    for page in touched:
        lib.h_write_byte(ffi.cast("void *", base + page * P), 1)
    starts = np.array([vpn0, vpn0 + 6, vpn0 + 19, vpn0 + 40, vpn0 + 62], np.int64)
    lengths = np.array([3, 2, 3, 1, 2], np.int64)
    pages = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)]) - vpn0
    want = [page in touched for page in pages.tolist()]
    for factor in (16, 1):   # 16: one span (64 pages for 11); 1: a pread per run
        old, M.SPAN_READ_FACTOR = M.SPAN_READ_FACTOR, factor
        try:
            entries = M.pagemap_entries(os.getpid(), starts, lengths)
        finally:
            M.SPAN_READ_FACTOR = old
        present = ((entries & np.uint64(M.PM_PRESENT)) != 0).tolist()
        assert present == want, factor


def test_pagemap_entries_of_an_exited_process_say_it_is_gone():
    """The pagemap of a zombie reads as empty: a short read, not zeros."""
    proc = subprocess.Popen(["sleep", "30"])
    fd = M.open_pagemap(proc.pid)   # (checks the process is there)
    os.close(fd)
    vpn = 0x400000 // P
    starts, lengths = np.array([vpn, vpn + 100], np.int64), np.array([1, 1], np.int64)
    assert len(M.pagemap_entries(proc.pid, starts, lengths)) == 2
    proc.kill()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)   # a zombie: its /proc entry stays
    try:
        for factor in (16, 1):
            old, M.SPAN_READ_FACTOR = M.SPAN_READ_FACTOR, factor
            try:
                with pytest.raises(TargetGone):
                    M.pagemap_entries(proc.pid, starts, lengths)
            finally:
                M.SPAN_READ_FACTOR = old
    finally:
        proc.wait()


def test_zero_pages_finds_exactly_the_all_zero_pages():
    """An eviction batch's zero pages take no slot: a page is zero only if
    every byte is, wherever its one nonzero byte lies."""
    from umgr.kernel.buffers import PageBuffer
    buf = PageBuffer(64)
    rng = np.random.default_rng(5)
    nonzero = rng.random(64) < 0.5
    for page in np.flatnonzero(nonzero):
        buf.bytes[page * 4096 + int(rng.integers(4096))] = 1 + int(rng.integers(255))
    assert np.array_equal(buf.zero_pages(64), ~nonzero)
    assert np.array_equal(buf.zero_pages(10), ~nonzero[:10])
    assert len(buf.zero_pages(0)) == 0
    with pytest.raises(ValueError):
        buf.zero_pages(65)
    buf.close()
