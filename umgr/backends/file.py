"""The file backend: a preallocated swap file, 4 KiB slots, I/O batched
through io_uring.

The file is created unnamed (O_TMPFILE) in the state directory, a 0700
directory of the daemon's uid, so nobody else can open it and a crashed
daemon leaves nothing behind. O_DIRECT is used where the filesystem
accepts it (tmpfs does not): swapped pages should not fill the page cache,
which is the memory umgr is trying to save. Buffers are page aligned
(the daemon allocates them with mmap), as O_DIRECT needs.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import time

import numpy as np

from umgr.backends import DEFAULT_SIZE, SLOW_READ, Backend, ReadsDone, io_runs
from umgr.errors import BackendError
from umgr.kernel import PAGE_SIZE
from umgr.kernel.ring import Batch, Op, Ring

log = logging.getLogger("umgr.backend")

# One per user: `umgr exec` run by anyone gets a directory of its own.
DEFAULT_STATE_DIR = f"/var/tmp/umgr-{os.geteuid()}"
MAX_SLOTS = (1 << 31) - 1  # slot numbers are int32 (umgr/backends/slots.py)
# With no size given, the swap file is DEFAULT_SIZE, or half the space free
# where it goes if that is less: a first `umgr exec` must work on a small
# VM's disk, and a swap file that fills its filesystem fails everyone
# else's writes there. Below MIN_DEFAULT_SIZE there is no point.
MIN_DEFAULT_SIZE = 16 << 20

# A one-page read is a fault waiting for it. Measured here (Linux 6.18,
# virtio disk): a 4 KiB O_DIRECT pread takes 26 us, the same read through
# io_uring 72-85 us (the completion comes back through a worker thread and
# the eventfd), and the daemon woken for it later still. So one-page reads
# are plain preads on the daemon's thread while they stay fast; if most of
# them (a running share over about the last 16) take longer than
# SYNC_READ_LIMIT (a slow device: the daemon would stall every other target
# meanwhile) they go through io_uring, and a pread is tried again every
# SYNC_READ_RETRY reads. A share, not a mean: on a busy machine a pread now
# and then is preempted for milliseconds, and a mean sent every read to the
# slower path for that (seen here: most reads on io_uring at load 2). The
# limit is 500 us, not 200: reads queued behind the evictor's writes take
# 250-300 us in bursts here, and at 200 us such bursts sent a one-thread
# program's faults to io_uring 1024 at a time (a fifth of them); a slow
# device takes milliseconds.
SYNC_READ_LIMIT = SLOW_READ   # (500 us; the fast path counts reads slower than SLOW_READ for this)
SYNC_READ_RETRY = 1024


def default_size(free: int) -> int:
    """The swap file's size when none is given, with `free` bytes free
    where it goes: DEFAULT_SIZE, or half of `free` (whole MiB) if less."""
    return min(DEFAULT_SIZE, free // 2 >> 20 << 20)


def open_state_dir(directory: str, dir_fd: int | None = None) -> int:
    """A descriptor of the state directory (made 0700 if missing; relative
    to dir_fd if given), refused unless it is a real directory (O_NOFOLLOW)
    of this process's uid that no one else may enter: the swap file holds
    the targets' memory."""
    # A trailing slash would make lstat and O_NOFOLLOW follow a link.
    directory = directory.rstrip("/") or "/"
    try:
        os.mkdir(directory, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        mode = os.stat(directory, dir_fd=dir_fd, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):   # never followed: whoever may change the link would choose where memory goes
            target = os.path.realpath(directory) if dir_fd is None else ""
            itself = f" ({target})" if target and os.path.isdir(target) else ""
            raise BackendError(f"state directory {directory} is a symbolic link, which umgr does not follow: "
                               f"give the directory itself{itself}") from None
        if not stat.S_ISDIR(mode):
            raise BackendError(f"state directory {directory} is not a directory") from None
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise BackendError(f"state directory {directory} must belong to uid {os.geteuid()} with mode 0700 "
                           f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
    return fd


def _open_swap_file(directory: str) -> tuple[int, bool]:
    """An unnamed file (O_TMPFILE) in the state directory: it never has a
    name anyone could open, and it goes when its last descriptor closes."""
    dir_fd = open_state_dir(directory)
    try:
        for flags in (os.O_DIRECT, 0):
            try:
                return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC | flags, 0o600, dir_fd=dir_fd), bool(flags)
            except OSError as exc:
                if not flags:
                    raise BackendError(f"cannot create a swap file in {directory}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)


def _open_named_swap_file(directory: str, name: str, reuse: bool) -> tuple[int, bool]:
    """The swap file `name` in `directory` (the daemon's own 0700 state
    directory), kept after a crash so a restarted daemon can read it back:
    reopened when `reuse`, else made anew, exclusively. Never followed
    through a link; refused unless it is a regular file of this uid with no
    other name."""
    dir_fd = open_state_dir(directory)
    try:
        if not reuse:
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
        create = 0 if reuse else os.O_CREAT | os.O_EXCL
        for direct in (os.O_DIRECT, 0):
            try:
                fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | create | direct, 0o600, dir_fd=dir_fd)
                break
            except OSError as exc:
                if direct and exc.errno == errno.EINVAL:   # no O_DIRECT here (tmpfs)
                    continue
                raise BackendError(f"cannot open the swap file {directory}/{name}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise BackendError(f"{directory}/{name} is not a swap file of this daemon's")
    return fd, bool(direct)


class FileBackend(Backend):
    name = "file"

    def __init__(self, size: int | None = None, directory: str = DEFAULT_STATE_DIR, ring_entries: int = 256,
                 swap_name: str = "", reuse: bool = False):
        """`size`: None for the default (default_size()). `swap_name`: keep
        the swap file under this name in `directory` (a daemon that can
        take its programs back after a crash); with `reuse`, the existing
        file and its contents, at its own size."""
        if swap_name:
            self.fd, self.direct = _open_named_swap_file(directory, swap_name, reuse)
            if reuse:   # the file holds slot 0 too (never used)
                size = os.fstat(self.fd).st_size - PAGE_SIZE
        else:
            self.fd, self.direct = _open_swap_file(directory)
        self.path = os.path.join(directory, swap_name) if swap_name else None
        # Checked first: a filesystem may allocate what it has before it
        # fails with ENOSPC, filling the disk for everyone meanwhile.
        fs = os.fstatvfs(self.fd)
        if size is None:
            size = self._default_size(fs.f_bavail * fs.f_frsize, directory)
        if size // PAGE_SIZE > MAX_SLOTS:
            os.close(self.fd)
            raise BackendError(f"{size >> 20} MiB of swap is more than the {MAX_SLOTS * PAGE_SIZE >> 20} MiB "
                               "a file backend addresses")
        if fs.f_bavail * fs.f_frsize < size and not reuse:
            os.close(self.fd)
            raise BackendError(f"cannot preallocate {size >> 20} MiB of swap in {directory}: "
                               f"{fs.f_bavail * fs.f_frsize >> 20} MiB free")
        super().__init__(size // PAGE_SIZE)
        try:
            os.posix_fallocate(self.fd, 0, self.slots.span * PAGE_SIZE)
        except OSError as exc:
            os.close(self.fd)
            raise BackendError(f"cannot preallocate {size >> 20} MiB of swap in {directory}: {exc.strerror}") from exc
        self.ring = Ring(ring_entries)
        self._slow_share = 0.0        # share of recent one-page preads slower than SYNC_READ_LIMIT
        self._async_reads = 0         # one-page reads sent to io_uring since the last pread
        log.info("swap file in %s: %d MiB, %s", directory, size >> 20,
                 "O_DIRECT" if self.direct else "buffered (no O_DIRECT here)")

    def _default_size(self, free: int, directory: str) -> int:
        """default_size(free), or BackendError (the file closed) if that is too small to be of use."""
        size = default_size(free)
        if size < MIN_DEFAULT_SIZE:
            os.close(self.fd)
            raise BackendError(f"no room for a swap file in {directory}: {free >> 20} MiB free "
                               "(--state-dir puts it elsewhere)")
        if size < DEFAULT_SIZE:
            log.info("swap file: %d MiB, half the %d MiB free in %s (the default is %d MiB; --swap-size sets it)",
                     size >> 20, free >> 20, directory, DEFAULT_SIZE >> 20)
        return size

    async def write(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        await self._io(Op.WRITE, slots, addrs)
        self.pages_written += len(slots)

    async def read(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        if len(slots) == 1 and self._sync_read_fast():
            # No checkpoint: the fault loop yields once the page is in
            # place, so a faulting thread never waits out an eviction step.
            self._read_one(int(slots[0]), int(addrs[0]))
        else:
            await self._io(Op.READ, slots, addrs)
        self.pages_read += len(slots)

    def _sync_read_fast(self) -> bool:
        if self._slow_share < 0.5:
            return True
        self._async_reads += 1
        if self._async_reads >= SYNC_READ_RETRY:
            self._async_reads = 0
            self._slow_share = 0.0     # try again: the device may be fast now
            return True
        return False

    def _read_one(self, slot: int, addr: int) -> None:
        started = time.perf_counter()
        try:
            done = os.preadv(self.fd, [(ctypes.c_char * PAGE_SIZE).from_address(addr)], slot * PAGE_SIZE)
        except OSError as exc:
            self.errors += 1
            raise BackendError(f"swap file read failed: {exc.strerror}") from exc
        if done != PAGE_SIZE:
            self.errors += 1
            raise BackendError(f"swap file read failed: short transfer of {done} bytes")
        elapsed = self._timed(started)
        self.read_seconds += elapsed
        self._note_slow(1, int(elapsed > SYNC_READ_LIMIT))

    def _note_slow(self, reads: int, slow: int) -> None:
        """`reads` one-page preads (here, or in the fault path's C call),
        `slow` of them slower than SYNC_READ_LIMIT: each moves the running
        share 1/16 of the way to 1 (slow) or 0; a batch's reads move it as
        if they had come in their mean."""
        mean = slow / reads
        self._slow_share = mean + (self._slow_share - mean) * (15 / 16) ** reads

    def sync_read_fd(self) -> int:
        """The swap file, while one-page reads are plain preads (see
        SYNC_READ_LIMIT): the fault path's C call reads it itself."""
        return self.fd if self._slow_share < 0.5 else -1

    def reads_done_elsewhere(self, file: ReadsDone, memory: ReadsDone) -> None:
        if file.pages:
            self._count_reads(file)
            self._note_slow(file.pages, file.slow)

    async def _io(self, op: Op, slots: np.ndarray, addrs: np.ndarray) -> None:
        run_addrs, first_slot, count = io_runs(slots, addrs)
        if len(count) == 0:
            return
        lengths = (count * PAGE_SIZE).astype(np.uint32)
        batch = Batch(op, self.fd, run_addrs, lengths, (first_slot * PAGE_SIZE).astype(np.uint64))
        started = time.perf_counter()
        try:
            results = await self.ring.submit_and_wait(batch)
        except OSError as exc:
            # Submitting stopped part way (the ring refused a request): what
            # went in before runs on in the kernel.
            self.errors += 1
            raise BackendError(f"swap file {op.name.lower()} could not be submitted: {exc.strerror or exc}",
                               may_land=True) from None
        elapsed = self._timed(started)
        if op == Op.READ:
            self.read_seconds += elapsed
        bad = np.flatnonzero(results != lengths.astype(np.int64))
        if len(bad):
            self.errors += 1
            res = int(results[bad[0]])
            reason = os.strerror(-res) if res < 0 else f"short transfer of {res} bytes"
            raise BackendError(f"swap file {op.name.lower()} failed: {reason}")

    def remove(self) -> None:
        """Unlink a named swap file (a clean stop: nothing will come back for it)."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def close(self) -> None:
        if self.fd >= 0:
            self.ring.close()
            os.close(self.fd)
            self.fd = -1
