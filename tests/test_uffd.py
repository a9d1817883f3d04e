"""umgr.kernel.uffd, and the calls only tests and benchmarks make
(umgr/kernel/uffd_extra.py), against the real kernel.

Memory that a fault must resolve is touched only from C (tests/helpers/ctouch:
cffi releases the GIL around the call) or from a child process, while this
thread serves the faults in Python.
"""

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
import trio

from helpers import ctouch
from umgr.kernel.uffd_extra import Userfaultfd
from umgr.kernel import PAGE_SIZE as P
from umgr.kernel import procmem
from umgr.kernel import uffd as U
from umgr.errors import ClosedError, TargetGone, UffdError
from umgr.kernel.buffers import PageBuffer
from umgr.paging.fastpath import FastLog
from umgr.paging.pagetable import State

SEED = 0x5EED


@pytest.fixture(scope="module")
def ct():
    return ctouch.load()


class Mapping:
    def __init__(self, ct, npages):
        self.ffi, self.lib = ct
        self.npages = npages
        self.len = npages * P
        self.ptr = self.lib.h_map(self.len)
        assert self.ptr != self.ffi.NULL
        self.addr = int(self.ffi.cast("uintptr_t", self.ptr))

    def page(self, i):
        return self.addr + i * P

    def bytes(self, offset, length):
        return bytes(self.ffi.buffer(self.ffi.cast("char *", self.addr + offset), length))

    def unmap(self):
        if self.ptr is not None:
            self.lib.h_unmap(self.ptr, self.len)
            self.ptr = None


@pytest.fixture
def maps(ct):
    made = []

    def make(npages):
        m = Mapping(ct, npages)
        made.append(m)
        return m

    yield make
    for m in made:
        m.unmap()


@pytest.fixture
def uffds():
    """Userfaultfds closed at teardown, which also releases any thread still
    blocked on an unserved fault (its fault then resolves normally)."""
    made = []

    def make(features=0, *, via="auto"):
        u = Userfaultfd.create(via=via)
        made.append(u)
        if features is not None:
            u.api(features)
        return u

    make.adopt = made.append
    yield make
    for u in made:
        u.close()


class CThread(threading.Thread):
    """Runs one C helper (GIL released inside) and keeps its result."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.result = fn, args, None

    def run(self):
        self.result = self.fn(*self.args)


def serve(uffd, handler, until, timeout=20.0):
    """Read and dispatch events until until() is true."""
    poller = select.poll()
    poller.register(uffd.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout
    while not until():
        events = uffd.read_events()
        if not events:
            assert time.monotonic() < deadline, "timed out serving faults"
            poller.poll(5)
            continue
        for event in events:
            handler(event)


def source_pages(maps, npages, first=0, seed=SEED):
    src = maps(npages)
    src.lib.h_fill(src.ptr, npages, first, seed)
    return src


def present_runs(start, end):
    return procmem.pagemap_scan(os.getpid(), start, end, procmem.PAGE_IS_PRESENT,
                                procmem.PAGE_IS_PRESENT)


def test_constants_match_upstream():
    assert U.UFFD_FEATURE_WP_UNPOPULATED == 1 << 13
    assert U.UFFD_FEATURE_POISON == 1 << 14
    assert U.UFFD_FEATURE_WP_ASYNC == 1 << 15
    assert U.UFFD_FEATURE_MOVE == 1 << 16
    assert U.IOCTL_MOVE == 1 << 5 and U.IOCTL_POISON == 1 << 8
    assert U.ALL_EVENTS == 0b1001110


def test_kernel_offers_what_umgr_uses():
    features, _ = U.supported_features()
    for f in (U.UFFD_FEATURE_PAGEFAULT_FLAG_WP, U.ALL_EVENTS, U.UFFD_FEATURE_THREAD_ID,
              U.UFFD_FEATURE_MOVE, U.UFFD_FEATURE_POISON):
        assert features & f == f


@pytest.mark.parametrize("via", ["syscall", "/dev/userfaultfd"])
def test_create_is_nonblocking_and_cloexec(via, uffds):
    u = uffds(None, via=via)
    assert u.created_via == via
    assert not os.get_blocking(u.fileno())
    assert not os.get_inheritable(u.fileno())
    granted = u.api(U.ALL_EVENTS | U.UFFD_FEATURE_WP_ASYNC)
    assert granted == U.ALL_EVENTS | U.UFFD_FEATURE_WP_ASYNC | U.UFFD_FEATURE_WP_UNPOPULATED
    assert u.features == granted
    assert u.available_features & granted == granted
    assert u.ioctls & U.IOCTL_REGISTER
    assert u.read_events() == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("run", [1, 4])
def test_missing_faults_served_from_python(ct, maps, uffds, run):
    npages = 64
    u = uffds(U.UFFD_FEATURE_THREAD_ID)
    dst = maps(npages)
    src = source_pages(maps, npages)
    ioctls = u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING)
    assert ioctls & (U.IOCTL_COPY | U.IOCTL_ZEROPAGE | U.IOCTL_WAKE) \
        == U.IOCTL_COPY | U.IOCTL_ZEROPAGE | U.IOCTL_WAKE
    faults = []

    def handle(ev):
        assert isinstance(ev, U.PageFault)
        faults.append(ev)
        page = (ev.address - dst.addr) // P
        n = min(run, npages - page)
        assert u.copy(dst.page(page), src.page(page), n * P) == (n * P, 0)

    reader = CThread(ct[1].h_check, dst.ptr, npages, 0, SEED)
    reader.start()
    serve(u, handle, lambda: not reader.is_alive())
    reader.join()
    assert reader.result == -1
    assert len(faults) == npages // run
    assert not any(f.is_write or f.is_wp or f.is_minor for f in faults)
    assert {f.tid for f in faults} == {reader.native_id}


@pytest.mark.timeout(30)
def test_faults_served_with_trio(ct, maps, uffds):
    npages = 16
    u = uffds(0)
    dst = maps(npages)
    u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING)
    writer_done = threading.Event()

    def write_all():
        ct[1].h_fill(dst.ptr, npages, 0, 3)
        writer_done.set()

    async def main():
        while not writer_done.is_set():
            events = u.read_events()
            if not events:
                with trio.move_on_after(0.05):
                    await u.wait_readable()
                continue
            for ev in events:
                assert ev.is_write
                page = (ev.address - dst.addr) // P
                # Serve zeros: the writer then fills the page itself.
                assert u.zeropage(dst.page(page), P) == (P, 0)

    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    trio.run(main)
    writer.join()
    assert ct[1].h_check(dst.ptr, npages, 0, 3) == -1


@pytest.mark.timeout(30)
def test_fork_event_delivers_a_usable_uffd(ct, maps, uffds):
    npages = 32
    u = uffds(U.ALL_EVENTS)
    dst = maps(npages)
    src = source_pages(maps, npages, seed=11)
    u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING)
    # fork() waits until the FORK event is read, so fork from a C call.
    forker = CThread(ct[1].h_fork_check, dst.ptr, npages, 0, 11)
    forker.start()
    forks = []

    def handle(ev):
        assert isinstance(ev, U.ForkEvent), ev
        forks.append(ev)

    serve(u, handle, lambda: forks)
    child_uffd = Userfaultfd(forks[0].fd)
    uffds.adopt(child_uffd)
    assert not os.get_blocking(child_uffd.fileno())
    forker.join()
    pid = forker.result
    assert pid > 0

    status = []

    def child_fault(ev):
        assert isinstance(ev, U.PageFault), ev
        page = (ev.address - dst.addr) // P
        done, err = child_uffd.copy(dst.page(page), src.page(page), P)
        assert (done, err) == (P, 0)

    def child_exited():
        if not status:
            wpid, st = os.waitpid(pid, os.WNOHANG)
            if wpid:
                status.append(st)
        return bool(status)

    serve(child_uffd, child_fault, child_exited)
    assert os.waitstatus_to_exitcode(status[0]) == 0
    # The parent's own range was never touched.
    assert u.read_events() == []
    assert present_runs(dst.addr, dst.addr + dst.len) == []
    # The child's mm is gone: its uffd reads nothing and its ioctls ESRCH.
    assert child_uffd.read_events() == []
    with pytest.raises(TargetGone):
        child_uffd.copy(dst.addr, src.addr, P)
    with pytest.raises(TargetGone):
        child_uffd.zeropage(dst.addr, P)


@pytest.mark.timeout(30)
def test_wp_fault_traps_write_until_unprotected(ct, maps, uffds):
    u = uffds(U.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
    dst = maps(2)
    src = source_pages(maps, 2, seed=5)
    u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING | U.UFFDIO_REGISTER_MODE_WP)
    assert u.copy(dst.addr, src.addr, 2 * P, U.UFFDIO_COPY_MODE_WP) == (2 * P, 0)
    before = dst.bytes(0, 2 * P)

    writer = CThread(ct[1].h_write_byte, dst.ptr + P + 100, 0xAB)
    writer.start()
    faults = []
    serve(u, faults.append, lambda: faults)
    (fault,) = faults
    assert fault.address == dst.page(1)
    assert fault.is_wp and fault.is_write
    time.sleep(0.05)
    assert writer.is_alive(), "the write should wait for the handler"
    assert dst.bytes(0, 2 * P) == before

    assert u.writeprotect(dst.page(1), P, protect=False) == 0
    writer.join(10)
    assert not writer.is_alive()
    after = dst.bytes(0, 2 * P)
    assert after[P + 100] == 0xAB
    assert after[:P + 100] == before[:P + 100] and after[P + 101:] == before[P + 101:]


@pytest.mark.timeout(30)
def test_unprotect_without_wake_then_wake(ct, maps, uffds):
    u = uffds(U.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
    dst = maps(1)
    u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING | U.UFFDIO_REGISTER_MODE_WP)
    assert u.zeropage(dst.addr, P) == (P, 0)
    assert u.writeprotect(dst.addr, P, protect=True) == 0
    writer = CThread(ct[1].h_write_byte, dst.ptr, 7)
    writer.start()
    faults = []
    serve(u, faults.append, lambda: faults)
    assert u.writeprotect(dst.addr, P, protect=False, wake=False) == 0
    time.sleep(0.05)
    assert writer.is_alive()
    u.wake(dst.addr, P)
    writer.join(10)
    assert not writer.is_alive()
    assert dst.bytes(0, 1) == b"\x07"


def test_copy_onto_present_page_is_eexist(maps, uffds):
    u = uffds(0)
    dst = maps(4)
    src = source_pages(maps, 4)
    u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING)
    assert u.copy(dst.page(1), src.page(1), P) == (P, 0)
    assert u.copy(dst.page(1), src.page(1), P) == (0, errno.EEXIST)
    # Page 0 is copied, then page 1 exists: the partial count comes back
    # with EAGAIN, and the retry from there reports the EEXIST.
    assert u.copy(dst.page(0), src.page(0), 2 * P) == (P, errno.EAGAIN)
    assert u.zeropage(dst.page(1), P) == (0, errno.EEXIST)
    assert u.zeropage(dst.page(2), 2 * P) == (2 * P, 0)
    assert present_runs(dst.addr, dst.addr + dst.len)[0][:2] == (dst.addr, dst.addr + 4 * P)
    assert dst.bytes(2 * P, 2 * P) == bytes(2 * P)


def test_copy_outside_registered_range_is_enoent(maps, uffds):
    u = uffds(0)
    dst = maps(2)
    src = source_pages(maps, 1)
    u.register(dst.addr, P, U.UFFDIO_REGISTER_MODE_MISSING)
    assert u.copy(dst.page(1), src.addr, P) == (0, errno.ENOENT)
    with pytest.raises(UffdError) as info:
        u.copy(dst.addr + 1, src.addr, P)
    assert info.value.errno == errno.EINVAL


def test_register_errors_are_uffd_errors(maps, uffds):
    u = uffds(0)
    dst = maps(1)
    with pytest.raises(UffdError) as info:
        u.register(dst.addr + 1, P, U.UFFDIO_REGISTER_MODE_MISSING)
    assert info.value.errno == errno.EINVAL
    assert isinstance(info.value, OSError)
    u.register(dst.addr, P, U.UFFDIO_REGISTER_MODE_MISSING)
    u.unregister(dst.addr, P)
    assert u.copy(dst.addr, dst.addr, P)[1] == errno.ENOENT


def test_close_is_idempotent_and_use_after_close_raises(maps):
    u = Userfaultfd.create()
    fd = u.fileno()
    u.close()
    u.close()
    assert u.closed
    # Whatever reuses the number must never be touched through u.
    reused = os.open("/dev/null", os.O_RDONLY)
    try:
        assert reused == fd
        with pytest.raises(ClosedError):
            u.fileno()
        with pytest.raises(ClosedError):
            u.copy(0x10000, 0x20000, P)
        with pytest.raises(ClosedError):
            u.zeropage(0x10000, P)
        with pytest.raises(ClosedError):
            u.writeprotect(0x10000, P, True)
        with pytest.raises(ClosedError):
            u.wake(0x10000, P)
        with pytest.raises(ClosedError):
            u.read_events()
        with pytest.raises(ClosedError):
            u.read_batch()
        with pytest.raises(ClosedError):
            u.copy_fast(0x10000, 0x20000, P)
        with pytest.raises(ClosedError):
            u.zeropage_fast(0x10000, P)
        with pytest.raises(ClosedError):
            u.copy_read(0x10000, 0x20000, P)
        with pytest.raises(ClosedError):
            u.register(0x10000, P, U.UFFDIO_REGISTER_MODE_MISSING)
        with pytest.raises(ClosedError):
            u.api(0)
    finally:
        os.close(reused)
    with U.Userfaultfd.create() as v:
        assert not v.closed
    assert v.closed


@pytest.mark.timeout(30)
def test_unmap_and_remap_events(ct, maps, uffds):
    u = uffds(U.ALL_EVENTS)
    region = maps(8)
    target = maps(4)
    u.register(region.addr, region.len, U.UFFDIO_REGISTER_MODE_MISSING)
    events = []
    # munmap and mremap wait until their event is read.
    unmapper = CThread(ct[1].h_unmap, region.ptr + 6 * P, 2 * P)
    unmapper.start()
    serve(u, events.append, lambda: events)
    unmapper.join()
    assert events == [U.UnmapEvent(region.page(6), region.page(8))]
    assert unmapper.result == 0

    events.clear()
    mover = CThread(ct[1].h_mremap, region.ptr, 4 * P, target.ptr)
    mover.start()
    serve(u, events.append, lambda: not mover.is_alive())
    mover.join()
    # mremap reports the move, then the unmap of the old range.
    assert events == [U.RemapEvent(region.addr, target.addr, 4 * P),
                      U.UnmapEvent(region.addr, region.page(4))]
    assert int(ct[0].cast("uintptr_t", mover.result)) == target.addr


def test_move_takes_pages_from_source(maps, uffds):
    u = uffds(U.UFFD_FEATURE_MOVE)
    dst = maps(4)
    src = source_pages(maps, 4, seed=9)
    ioctls = u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING)
    assert ioctls & U.IOCTL_MOVE
    assert u.move(dst.addr, src.addr, 4 * P) == (4 * P, 0)
    assert present_runs(dst.addr, dst.addr + dst.len) == [
        (dst.addr, dst.addr + 4 * P, procmem.PAGE_IS_PRESENT)]
    assert present_runs(src.addr, src.addr + src.len) == []
    assert dst.lib.h_check(dst.ptr, 4, 0, 9) == -1


def test_continue_maps_page_cache_pages(ct, uffds):
    ffi, lib = ct
    fd = os.memfd_create("umgr-test")
    os.ftruncate(fd, 2 * P)
    a = lib.h_map_shared(fd, 2 * P)
    b = lib.h_map_shared(fd, 2 * P)
    try:
        u = uffds(U.UFFD_FEATURE_MINOR_SHMEM)
        aaddr = int(ffi.cast("uintptr_t", a))
        u.register(aaddr, 2 * P, U.UFFDIO_REGISTER_MODE_MINOR)
        lib.h_fill(b, 2, 0, 21)
        assert present_runs(aaddr, aaddr + 2 * P) == []
        assert u.continue_(aaddr, 2 * P) == (2 * P, 0)
        assert present_runs(aaddr, aaddr + 2 * P)[0][:2] == (aaddr, aaddr + 2 * P)
        assert lib.h_check(a, 2, 0, 21) == -1
        assert u.continue_(aaddr, P) == (0, errno.EEXIST)
    finally:
        lib.h_unmap(a, 2 * P)
        lib.h_unmap(b, 2 * P)
        os.close(fd)


CHILD_POISON = textwrap.dedent("""
    import ctypes, mmap, sys
    from umgr.kernel import uffd as U
    sys.path.insert(0, sys.argv[1])
    from umgr.kernel.uffd_extra import Userfaultfd
    u = Userfaultfd.create()
    u.api(U.UFFD_FEATURE_POISON)
    m = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    u.register(addr, 4096, U.UFFDIO_REGISTER_MODE_MISSING)
    print(*u.poison(addr, 4096), flush=True)
    ctypes.string_at(addr, 1)
    print("survived", flush=True)
""")


def test_poisoned_page_raises_sigbus():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.run([sys.executable, "-c", CHILD_POISON, os.path.dirname(__file__)], env=env,
                           capture_output=True, text=True, timeout=20)
    assert child.stdout == f"{P} 0\n"
    assert child.returncode == -signal.SIGBUS


def test_copy_replaces_poison(maps, uffds):
    u = uffds(U.UFFD_FEATURE_POISON)
    dst = maps(1)
    src = source_pages(maps, 1, seed=4)
    ioctls = u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING)
    assert ioctls & U.IOCTL_POISON
    assert u.poison(dst.addr, P) == (P, 0)
    # A poison marker counts as an empty PTE for UFFDIO_COPY.
    assert u.copy(dst.addr, src.addr, P) == (P, 0)
    assert dst.lib.h_check(dst.ptr, 1, 0, 4) == -1


CHILD_WITH_UFFD = textwrap.dedent("""
    import sys
    from umgr.kernel.uffd import Userfaultfd
    sys.path.insert(0, sys.argv[1])
    from helpers import ctouch
    ffi, lib = ctouch.load()
    u = Userfaultfd.create()
    buf = lib.h_map(4 * 4096)
    print(u.fileno(), int(ffi.cast("uintptr_t", buf)), flush=True)
    sys.stdin.readline()          # the parent has copied pages in
    print(lib.h_check(buf, 4, 0, int(sys.argv[2])), flush=True)
    sys.stdin.readline()
""")


@pytest.mark.timeout(30)
def test_ioctls_act_on_the_creators_mm_and_esrch_after_exit(maps, uffds):
    """The daemon's set-up: it holds a target's uffd (here via pidfd_getfd)
    and copies pages into the target's memory without its help."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with subprocess.Popen(
            [sys.executable, "-c", CHILD_WITH_UFFD, os.path.dirname(__file__), "33"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) as child:
        fd, addr = map(int, child.stdout.readline().split())
        pidfd = procmem.pidfd_open(child.pid)
        u = Userfaultfd(procmem.pidfd_getfd(pidfd, fd))
        uffds.adopt(u)
        os.close(pidfd)
        u.api(U.ALL_EVENTS)
        u.register(addr, 4 * P, U.UFFDIO_REGISTER_MODE_MISSING)
        src = source_pages(maps, 4, seed=33)
        assert u.copy(addr, src.addr, 4 * P) == (4 * P, 0)
        # Nothing landed in this process at that address.
        child.stdin.write("\n")
        child.stdin.flush()
        assert int(child.stdout.readline()) == -1
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(10) == 0
        assert u.read_events() == []
        with pytest.raises(TargetGone):
            u.copy(addr, src.addr, P)
        with pytest.raises(TargetGone):
            u.writeprotect(addr, P, True)
        assert u.read_batch() == 0
        with pytest.raises(TargetGone):
            u.copy_fast(addr, src.addr, P)
        with pytest.raises(TargetGone):
            u.zeropage_fast(addr, P)
        with pytest.raises(TargetGone):
            u.copy_read(addr, src.addr, P)


# -- fast path: read_batch(), .batch, copy_fast(), zeropage_fast() ------------


def serve_batches(uffd, handler, until, timeout=20.0):
    """serve() with read_batch(): handler(index) per message in .batch."""
    poller = select.poll()
    poller.register(uffd.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout
    while not until():
        n = uffd.read_batch()
        if not n:
            assert time.monotonic() < deadline, "timed out serving faults"
            poller.poll(5)
            continue
        for i in range(n):
            handler(i)


def test_batch_layout_constants():
    assert U.MSG_WORDS == 4
    assert (U.W_KIND, U.W_FLAGS, U.W_ADDRESS, U.W_TID) == (0, 1, 2, 3)
    assert U.EVENT_PAGEFAULT == 0x12 and U.EVENT_FORK == 0x13 and U.EVENT_REMAP == 0x14
    assert U.EVENT_REMOVE == 0x15 and U.EVENT_UNMAP == 0x16


@pytest.mark.timeout(30)
@pytest.mark.parametrize("run", [1, 4])
def test_faults_served_with_read_batch_and_copy_fast(ct, maps, uffds, run):
    npages = 64
    u = uffds(U.UFFD_FEATURE_THREAD_ID)
    dst = maps(npages)
    src = source_pages(maps, npages)
    u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING)
    w = u.batch
    assert len(w) >= 64 * U.MSG_WORDS
    faults = []

    def handle(i):
        base = i * U.MSG_WORDS
        assert w[base + U.W_KIND] & 0xFF == U.EVENT_PAGEFAULT
        address, flags = w[base + U.W_ADDRESS], w[base + U.W_FLAGS]
        faults.append((address, flags, w[base + U.W_TID] & 0xFFFFFFFF))
        assert u.batch_event(i) == U.PageFault(address, flags, faults[-1][2])
        page = (address - dst.addr) // P
        n = min(run, npages - page)
        assert u.copy_fast(dst.page(page), src.page(page), n * P) == 0

    reader = CThread(ct[1].h_check, dst.ptr, npages, 0, SEED)
    reader.start()
    serve_batches(u, handle, lambda: not reader.is_alive())
    reader.join()
    assert reader.result == -1
    assert [a for a, _, _ in faults] == [dst.page(i) for i in range(0, npages, run)]
    assert {f for _, f, _ in faults} == {0}
    assert {t for _, _, t in faults} == {reader.native_id}
    assert u.read_batch() == 0


@pytest.mark.timeout(30)
def test_zeropage_fast_serves_write_faults(ct, maps, uffds):
    npages = 8
    u = uffds(0)
    dst = maps(npages)
    u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING)
    flags = []

    def handle(i):
        ev = u.batch_event(i)
        flags.append(ev.flags)
        assert u.zeropage_fast(ev.address, P) == 0

    writer = CThread(ct[1].h_fill, dst.ptr, npages, 0, 8)
    writer.start()
    serve_batches(u, handle, lambda: not writer.is_alive())
    writer.join()
    assert ct[1].h_check(dst.ptr, npages, 0, 8) == -1
    assert flags == [U.UFFD_PAGEFAULT_FLAG_WRITE] * npages


def test_copy_fast_outcomes_are_packed(maps, uffds):
    u = uffds(0)
    dst = maps(4)
    src = source_pages(maps, 4)
    u.register(dst.addr, 3 * P, U.UFFDIO_REGISTER_MODE_MISSING)
    assert u.copy_fast(dst.page(1), src.page(1), P) == 0
    r = u.copy_fast(dst.page(1), src.page(1), P)
    assert r and U.unpack(r) == (0, errno.EEXIST)
    # Page 0 is copied, then page 1 exists: partial count and EAGAIN.
    assert U.unpack(u.copy_fast(dst.page(0), src.page(0), 2 * P)) == (P, errno.EAGAIN)
    assert U.unpack(u.zeropage_fast(dst.page(1), P)) == (0, errno.EEXIST)
    assert U.unpack(u.copy_fast(dst.page(3), src.addr, P)) == (0, errno.ENOENT)
    assert U.unpack(u.zeropage_fast(dst.page(3), P)) == (0, errno.ENOENT)
    assert u.zeropage_fast(dst.page(2), P) == 0
    assert dst.bytes(2 * P, P) == bytes(P)
    assert dst.lib.h_check(dst.ptr, 2, 0, SEED) == -1
    for call in (lambda: u.copy_fast(dst.addr + 1, src.addr, P),
                 lambda: u.zeropage_fast(dst.addr, P + 1)):
        with pytest.raises(UffdError) as info:
            call()
        assert info.value.errno == errno.EINVAL


@pytest.mark.timeout(30)
def test_read_batch_decodes_events_and_grows(ct, maps, uffds):
    u = uffds(U.ALL_EVENTS)
    region = maps(8)
    u.register(region.addr, region.len, U.UFFDIO_REGISTER_MODE_MISSING)
    with pytest.raises(ValueError):
        u.read_batch(0)
    small = u.batch
    assert u.read_batch(200) == 0
    assert u.batch is not small and len(u.batch) >= 200 * U.MSG_WORDS
    events = []
    unmapper = CThread(ct[1].h_unmap, region.ptr + 6 * P, 2 * P)
    unmapper.start()
    serve_batches(u, lambda i: events.append(u.batch_event(i)), lambda: events)
    unmapper.join()
    assert events == [U.UnmapEvent(region.page(6), region.page(8))]
    w = u.batch
    assert w[U.W_KIND] & 0xFF == U.EVENT_UNMAP
    assert (w[U.W_FLAGS], w[U.W_ADDRESS]) == (region.page(6), region.page(8))
    assert u.batch_events(1) == events

    forker = CThread(ct[1].h_fork_check, region.ptr, 0, 0, 0)
    forker.start()
    forks = []
    serve_batches(u, lambda i: forks.append(u.batch_event(i)), lambda: forks)
    forker.join()
    (fork,) = forks
    assert isinstance(fork, U.ForkEvent)
    uffds.adopt(U.Userfaultfd(fork.fd))
    _, status = os.waitpid(forker.result, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.timeout(30)
def test_read_batch_lingers_for_the_rest_of_a_discard(ct, maps, uffds):
    """Each range of a discard is one REMOVE, raised only once the one
    before was read: a read that lingers after a REMOVE takes them in one
    batch, where a plain read takes them one by one. (One read(2) goes on
    taking messages while any is queued, so where the discarder's CPU wakes
    within a microsecond or two, as with idle CPUs polling, a plain read
    can take several: the discarder waits GAP_US after each.)"""
    npages, gap_us = 64, 300
    u = uffds(U.ALL_EVENTS)
    region = maps(npages)
    u.register(region.addr, region.len, U.UFFDIO_REGISTER_MODE_MISSING)
    for linger in (0.0, 0.2):
        discarder = CThread(ct[1].h_discard_every_other, region.ptr, npages, gap_us)
        discarder.start()
        batches = []
        while len(sum(batches, [])) < npages // 2:
            n = u.read_batch(64, linger)
            batches.append([u.batch_event(i) for i in range(n)] if n else [])
        discarder.join()
        assert discarder.result == 0
        removes = sum(batches, [])
        assert removes == [U.RemoveEvent(region.page(p), region.page(p + 1)) for p in range(0, npages, 2)]
        largest = max(len(batch) for batch in batches)
        if linger:   # all 32 in one batch, unless a loaded machine stops the
            assert largest >= npages // 4, batches   # discarder longer than that (seen once)
        else:   # one at a time, unless a loaded machine stops the reader
            assert largest < npages // 8, batches   # longer than a gap (2 in a batch, seen once)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("blocking", [False, True])
def test_copy_read_resolves_a_fault_and_reads_the_next(ct, maps, uffds, blocking):
    """One call per fault: each copy_read() lets the reader go on to its
    next page, whose fault the same call then reads."""
    npages = 32
    u = uffds(0)
    dst = maps(npages)
    src = source_pages(maps, npages, seed=12)
    u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING)
    reader = CThread(ct[1].h_check, dst.ptr, npages, 0, 12)
    reader.start()
    poller = select.poll()
    poller.register(u.fileno(), select.POLLIN)
    assert poller.poll(10_000), "no first fault"
    if blocking:
        os.set_blocking(u.fileno(), True)
    w = u.batch
    served = []
    count = u.read_batch()
    deadline = time.monotonic() + 20
    while len(served) < npages:
        assert time.monotonic() < deadline, "timed out serving faults"
        if not count:
            assert not blocking, "a blocking copy_read() returns a message"
            poller.poll(5)
            count = u.read_batch()
            continue
        assert count == 1, "the reader waits on one fault at a time"
        assert w[U.W_KIND] & 0xFF == U.EVENT_PAGEFAULT
        page = (w[U.W_ADDRESS] - dst.addr) // P
        served.append(page)
        if len(served) == npages:
            assert u.copy_fast(dst.page(page), src.page(page), P) == 0
            break
        count = u.copy_read(dst.page(page), src.page(page), P)
        assert count >= 0
    reader.join(10)
    assert reader.result == -1
    assert served == list(range(npages))
    os.set_blocking(u.fileno(), False)
    assert u.read_batch() == 0


@pytest.mark.timeout(30)
def test_copy_read_outcomes(ct, maps, uffds):
    u = uffds(U.ALL_EVENTS)
    dst = maps(5)
    src = source_pages(maps, 4)
    u.register(dst.addr, 3 * P, U.UFFDIO_REGISTER_MODE_MISSING)
    u.register(dst.page(4), P, U.UFFDIO_REGISTER_MODE_MISSING)
    with pytest.raises(ValueError):
        u.copy_read(dst.page(0), src.page(0), P, max_events=0)
    assert u.copy_read(dst.page(1), src.page(1), P) == 0
    # Short copies read nothing and answer -copy_fast().
    assert U.unpack(-u.copy_read(dst.page(1), src.page(1), P)) == (0, errno.EEXIST)
    assert U.unpack(-u.copy_read(dst.page(0), src.page(0), 2 * P)) == (P, errno.EAGAIN)
    assert U.unpack(-u.copy_read(dst.page(3), src.page(3), P)) == (0, errno.ENOENT)
    with pytest.raises(UffdError) as info:
        u.copy_read(dst.addr + 1, src.addr, P)
    assert info.value.errno == errno.EINVAL
    # While an event is queued the copy answers EAGAIN, so nothing is read:
    # read_batch() takes the event, then the copy goes through.
    unmapper = CThread(ct[1].h_unmap, dst.ptr + 4 * P, P)
    unmapper.start()
    poller = select.poll()
    poller.register(u.fileno(), select.POLLIN)
    assert poller.poll(10_000)
    assert U.unpack(-u.copy_read(dst.page(2), src.page(2), P)) == (0, errno.EAGAIN)
    assert u.read_batch(100) == 1
    assert u.batch_events(1) == [U.UnmapEvent(dst.page(4), dst.page(5))]
    # The kernel counts the event done once munmap returns, not when read.
    unmapper.join(10)
    assert unmapper.result == 0
    assert u.copy_read(dst.page(2), src.page(2), P, max_events=100) == 0
    assert dst.lib.h_check(dst.ptr, 3, 0, SEED) == -1


def test_writeprotect_and_wake_of_many_runs_in_one_call(maps, uffds):
    """writeprotect_runs() protects exactly the runs' pages (the evictor's
    scattered victims), and stops at a run that is not registered (ENOENT),
    saying how many it did; wake_runs() of the same runs is accepted."""
    u = uffds(U.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
    dst = maps(16)
    src = source_pages(maps, 16, seed=4)
    u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING | U.UFFDIO_REGISTER_MODE_WP)
    assert u.copy(dst.addr, src.addr, 16 * P) == (16 * P, 0)
    first = dst.addr // P
    starts = np.array([first, first + 3, first + 9], np.int64)
    lengths = np.array([2, 1, 4], np.int64)
    assert u.writeprotect_runs(starts, lengths, True) == (3, 0)
    with open("/proc/self/pagemap", "rb") as pagemap:
        entries = np.frombuffer(os.pread(pagemap.fileno(), 16 * 8, first * 8), np.uint64)
    protected = np.flatnonzero(entries & np.uint64(1 << 57)).tolist()   # the pte's uffd-wp bit
    assert protected == [0, 1, 3, 9, 10, 11, 12]
    u.wake_runs(starts, lengths)
    beyond = np.array([first + 1, first + 16 + 1024], np.int64)   # the second is in no registered range
    assert u.writeprotect_runs(beyond, np.array([1, 1], np.int64), False) == (1, errno.ENOENT)


@pytest.mark.timeout(60)
def test_a_fast_path_call_in_the_background_serves_faults(ct, maps, uffds):
    # The fast path's C call in a thread of its own (serve_in_background)
    # serves a C writer's faults on fresh pages (zeros: the writer then
    # fills them) while this thread only waits for the writer; by then the
    # call sleeps until the next fault, and a stop ends it. Waited for
    # instead, it spins for the next fault and ends when none comes.
    npages = 32
    u = uffds(0)
    dst = maps(npages)
    call = FreshRegionCall(u, dst, npages, 2 * npages)   # (room for more: no limit ends the call)
    state, counts, log = call.state, call.counts, call.log
    log.c.max_stride = 0   # (nor a stride: the writer goes page by page)
    bg = U.fast_background()
    try:
        def start():
            call.serve_in_background(bg, 60 * 10**9)
        start()
        writer = CThread(ct[1].h_fill, dst.ptr, npages, 0, SEED)
        writer.start()
        writer.join(30)
        assert not writer.is_alive()
        time.sleep(0.2)   # (the call is asleep by now: the stop must wake it)
        assert u.finish_background(bg, stop=True) == U.FAST_IDLE
        assert log.c.served == log.c.missing == npages
        assert (state == State.RESIDENT).all() and counts[State.RESIDENT] == npages and counts[State.FRESH] == 0
        assert ct[1].h_check(dst.ptr, npages, 0, SEED) == -1
        start()
        assert u.finish_background(bg, stop=False) == U.FAST_IDLE
        assert log.c.served == 0
    finally:
        U.fast_background_end(bg)
        call.close()


@pytest.mark.timeout(60)
def test_a_call_waited_for_as_it_goes_ends_with_its_slice_or_is_let_go_when_starved(maps, uffds):
    # A call serving beside its program (FastPath.colocated) is waited for
    # without spinning it up: an idle one ends when its slice does. One
    # not over by the wait's deadline (as if starved on the CPU it is kept
    # on: here a slice of a minute) is let run anywhere and stopped, so
    # the daemon's thread is not held up.
    npages = 8
    u = uffds(0)
    call = FreshRegionCall(u, maps(npages), npages, npages)
    bg = U.fast_background()
    try:
        U.fast_background_pin(bg, max(os.sched_getaffinity(0)), os.getpriority(os.PRIO_PROCESS, 0))
        call.serve_in_background(bg, 50 * 10**6)
        started = time.monotonic()
        assert u.finish_background(bg, stop=False, as_it_goes=5.0) == U.FAST_IDLE
        assert 0.04 < time.monotonic() - started < 2 and bg.unpinned == 0   # (its slice: 50 ms)
        call.serve_in_background(bg, 60 * 10**9)
        started = time.monotonic()
        assert u.finish_background(bg, stop=False, as_it_goes=0.05) == U.FAST_IDLE
        assert time.monotonic() - started < 2 and bg.unpinned == 1   # (let run on any CPU again)
    finally:
        U.fast_background_end(bg)
        call.close()


class FreshRegionCall:
    """A fast path call's arguments over `npages` fresh pages at `dst`,
    registered on `u` for MISSING faults, with a log of `room` pages."""

    def __init__(self, u, dst, npages: int, room: int):
        u.register(dst.addr, dst.len, U.UFFDIO_REGISTER_MODE_MISSING)
        self.u, self.room = u, room
        self.state, self.slot = np.zeros(npages, np.uint8), np.zeros(npages, np.int32)
        self.flags = np.zeros(npages, np.uint8)
        self.counts = np.zeros(256, np.int64)
        self.counts[State.FRESH] = npages
        self.regions = regions = U.new_fast_struct("umgr_fast_region", 1)
        regions[0].vpn, regions[0].end = dst.addr // P, dst.addr // P + npages
        regions[0].counts = U.array_pointer("int64_t *", self.counts)
        regions[0].state = U.array_pointer("uint8_t *", self.state)
        regions[0].slot = U.array_pointer("int32_t *", self.slot)
        regions[0].flags = U.array_pointer("uint8_t *", self.flags)
        self.store = U.new_fast_struct("umgr_fast_store")
        self.store.fd = -1
        self.log = FastLog(room)
        self.log.c.yield_after = room
        self.log.drop_references_in(np.zeros(2, np.uint16), np.zeros(2, np.uint32))
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.log.c.wake_fd = self.wake_fd
        self.pages, self.zeros = PageBuffer(U.FAST_GROUP), PageBuffer(1)

    def serve_in_background(self, bg, slice_ns: int) -> None:
        self.u.serve_in_background(bg, self.regions, 1, self.store, self.pages.addr, self.zeros.addr, 50_000,
                                   slice_ns, self.room, 0, self.log.c)

    def close(self) -> None:
        os.close(self.wake_fd)
        self.pages.close()
        self.zeros.close()
