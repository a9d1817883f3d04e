"""A typed layer over userfaultfd.

Kernel facts this module relies on (Documentation/admin-guide/mm/userfaultfd.rst
and fs/userfaultfd.c):

- poll/epoll on a uffd that is not O_NONBLOCK reports POLLERR, so every fd
  held by a Userfaultfd is made non-blocking, including the fds that
  UFFD_EVENT_FORK delivers (they arrive blocking, with FD_CLOEXEC).
- One read() returns as many whole messages as fit; it blocks only for the
  first, and an O_NONBLOCK uffd answers EAGAIN when nothing is queued (also,
  forever, once the target has exited).
- While a non-cooperative event (FORK, REMAP, REMOVE, UNMAP) is queued and
  unread, COPY, ZEROPAGE, WRITEPROTECT and MOVE answer EAGAIN: read the
  events, then retry.
- A range ioctl may stop early and report the bytes it did (the kernel then
  answers EAGAIN); EEXIST (the page is already there) and ENOENT (the range
  is gone) are normal outcomes too. ESRCH means the target's mm is gone.
- ioctls act on the mm that created the uffd, whoever calls them.

Normal outcomes are returned as (bytes_done, errno); ESRCH raises TargetGone
and everything else raises UffdError. The fault-path methods make exactly one
cffi call and allocate nothing but the result tuple.

Fast path: read_batch() reads into a preallocated buffer and returns only the
message count; the messages are read in place from .batch (MSG_WORDS
native u64 words per message: kind, flags, address, tid, see below), and
copy_fast()/zeropage_fast() return 0 when the whole range was done. Each is
one cffi call and allocates nothing; at one page per fault this is what
keeps Python close to a C handler. batch_event(i) types one message (a
fault loop needs it for what is not a page fault).

    n = uffd.read_batch()
    w = uffd.batch
    for i in range(0, n * MSG_WORDS, MSG_WORDS):
        if w[i] & 0xFF != EVENT_PAGEFAULT: ...      # see batch_event(i // MSG_WORDS)
        address, flags = w[i + W_ADDRESS], w[i + W_FLAGS]
        r = uffd.copy_fast(address & ~(PAGE_SIZE - 1), src, PAGE_SIZE)
        if r: done, err = unpack(r)                    # EAGAIN, EEXIST or ENOENT
"""

import errno as _errno
import os
from dataclasses import dataclass

import trio

from umgr.bindings._kernel import ffi as _ffi
from umgr.bindings._kernel import lib as _lib
from umgr.errors import ClosedError, TargetGone, UffdError, Unsupported

UFFD_FEATURE_PAGEFAULT_FLAG_WP = _lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
UFFD_FEATURE_EVENT_FORK = _lib.UFFD_FEATURE_EVENT_FORK
UFFD_FEATURE_EVENT_REMAP = _lib.UFFD_FEATURE_EVENT_REMAP
UFFD_FEATURE_EVENT_REMOVE = _lib.UFFD_FEATURE_EVENT_REMOVE
UFFD_FEATURE_MISSING_HUGETLBFS = _lib.UFFD_FEATURE_MISSING_HUGETLBFS
UFFD_FEATURE_MISSING_SHMEM = _lib.UFFD_FEATURE_MISSING_SHMEM
UFFD_FEATURE_EVENT_UNMAP = _lib.UFFD_FEATURE_EVENT_UNMAP
UFFD_FEATURE_SIGBUS = _lib.UFFD_FEATURE_SIGBUS
UFFD_FEATURE_THREAD_ID = _lib.UFFD_FEATURE_THREAD_ID
UFFD_FEATURE_MINOR_HUGETLBFS = _lib.UFFD_FEATURE_MINOR_HUGETLBFS
UFFD_FEATURE_MINOR_SHMEM = _lib.UFFD_FEATURE_MINOR_SHMEM
UFFD_FEATURE_EXACT_ADDRESS = _lib.UFFD_FEATURE_EXACT_ADDRESS
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = _lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
UFFD_FEATURE_WP_UNPOPULATED = _lib.UFFD_FEATURE_WP_UNPOPULATED
UFFD_FEATURE_POISON = _lib.UFFD_FEATURE_POISON
UFFD_FEATURE_WP_ASYNC = _lib.UFFD_FEATURE_WP_ASYNC
UFFD_FEATURE_MOVE = _lib.UFFD_FEATURE_MOVE

ALL_EVENTS = (UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP
              | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP)

UFFD_USER_MODE_ONLY = _lib.UFFD_USER_MODE_ONLY

UFFDIO_REGISTER_MODE_MISSING = _lib.UFFDIO_REGISTER_MODE_MISSING
UFFDIO_REGISTER_MODE_WP = _lib.UFFDIO_REGISTER_MODE_WP
UFFDIO_REGISTER_MODE_MINOR = _lib.UFFDIO_REGISTER_MODE_MINOR
UFFDIO_COPY_MODE_DONTWAKE = _lib.UFFDIO_COPY_MODE_DONTWAKE
UFFDIO_COPY_MODE_WP = _lib.UFFDIO_COPY_MODE_WP
UFFDIO_ZEROPAGE_MODE_DONTWAKE = _lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE
UFFDIO_WRITEPROTECT_MODE_WP = _lib.UFFDIO_WRITEPROTECT_MODE_WP
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = _lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
UFFDIO_CONTINUE_MODE_DONTWAKE = _lib.UFFDIO_CONTINUE_MODE_DONTWAKE
UFFDIO_CONTINUE_MODE_WP = _lib.UFFDIO_CONTINUE_MODE_WP
UFFDIO_POISON_MODE_DONTWAKE = _lib.UFFDIO_POISON_MODE_DONTWAKE
UFFDIO_MOVE_MODE_DONTWAKE = _lib.UFFDIO_MOVE_MODE_DONTWAKE
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = _lib.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES

UFFD_PAGEFAULT_FLAG_WRITE = _lib.UFFD_PAGEFAULT_FLAG_WRITE
UFFD_PAGEFAULT_FLAG_WP = _lib.UFFD_PAGEFAULT_FLAG_WP
UFFD_PAGEFAULT_FLAG_MINOR = _lib.UFFD_PAGEFAULT_FLAG_MINOR

# Bits of the ioctls masks that UFFDIO_API and UFFDIO_REGISTER report.
IOCTL_REGISTER = 1 << _lib._UFFDIO_REGISTER
IOCTL_UNREGISTER = 1 << _lib._UFFDIO_UNREGISTER
IOCTL_API = 1 << _lib._UFFDIO_API
IOCTL_WAKE = 1 << _lib._UFFDIO_WAKE
IOCTL_COPY = 1 << _lib._UFFDIO_COPY
IOCTL_ZEROPAGE = 1 << _lib._UFFDIO_ZEROPAGE
IOCTL_MOVE = 1 << _lib._UFFDIO_MOVE
IOCTL_WRITEPROTECT = 1 << _lib._UFFDIO_WRITEPROTECT
IOCTL_CONTINUE = 1 << _lib._UFFDIO_CONTINUE
IOCTL_POISON = 1 << _lib._UFFDIO_POISON


@dataclass(slots=True, frozen=True)
class PageFault:
    address: int
    flags: int
    tid: int

    @property
    def is_write(self) -> bool:
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WRITE)

    @property
    def is_wp(self) -> bool:
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WP)

    @property
    def is_minor(self) -> bool:
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_MINOR)


@dataclass(slots=True, frozen=True)
class ForkEvent:
    """The child's new uffd, already installed in this process: the reader
    owns it (wrap it in Userfaultfd, or close it)."""
    fd: int


@dataclass(slots=True, frozen=True)
class RemapEvent:
    src: int
    dst: int
    length: int


@dataclass(slots=True, frozen=True)
class RemoveEvent:
    start: int
    end: int


@dataclass(slots=True, frozen=True)
class UnmapEvent:
    start: int
    end: int


# struct uffd_msg is 32 packed bytes; decode it as four native u64 words.
# The layout is asserted against the compiler's offsets here, once.
MSG_WORDS = _MSG_WORDS = 4
W_KIND = 0      # & 0xFF: the event (EVENT_PAGEFAULT, ...)
W_FLAGS = 1     # page fault: UFFD_PAGEFAULT_FLAG_*; fork: the new uffd (& 0xFFFFFFFF);
                # remap: from; remove/unmap: start
W_ADDRESS = 2   # page fault: the address; remap: to; remove/unmap: end
W_TID = 3       # page fault: the thread id (& 0xFFFFFFFF, UFFD_FEATURE_THREAD_ID); remap: len
EVENT_PAGEFAULT = _lib.UFFD_EVENT_PAGEFAULT
EVENT_FORK = _lib.UFFD_EVENT_FORK
EVENT_REMAP = _lib.UFFD_EVENT_REMAP
EVENT_REMOVE = _lib.UFFD_EVENT_REMOVE
EVENT_UNMAP = _lib.UFFD_EVENT_UNMAP
assert _lib.UMGR_MSG_SIZE == 8 * _MSG_WORDS
assert (_lib.UMGR_MSG_OFF_PF_FLAGS, _lib.UMGR_MSG_OFF_PF_ADDRESS,
        _lib.UMGR_MSG_OFF_PF_PTID) == (8, 16, 24)
assert _lib.UMGR_MSG_OFF_FORK_UFD == 8
assert (_lib.UMGR_MSG_OFF_REMAP_FROM, _lib.UMGR_MSG_OFF_REMAP_TO,
        _lib.UMGR_MSG_OFF_REMAP_LEN) == (8, 16, 24)
assert (_lib.UMGR_MSG_OFF_REMOVE_START, _lib.UMGR_MSG_OFF_REMOVE_END) == (8, 16)

_writeprotect = _lib.umgr_uffd_writeprotect
_wake = _lib.umgr_uffd_wake
_read_batch = _lib.umgr_uffd_read_batch
_copy_fast = _lib.umgr_uffd_copy_fast
_zeropage_fast = _lib.umgr_uffd_zeropage_fast

_EAGAIN = _errno.EAGAIN
_EEXIST = _errno.EEXIST
_ENOENT = _errno.ENOENT
_ESRCH = _errno.ESRCH
_EBADF = _errno.EBADF
_NORMAL_RANGE = frozenset((_EAGAIN, _EEXIST, _ENOENT))
_NORMAL_WP = frozenset((_EAGAIN, _ENOENT))


def unpack(packed: int) -> tuple[int, int]:
    """(bytes_done, errno) of a nonzero copy_fast()/zeropage_fast() result.

    The packed int holds the bytes the ioctl did in its high bits (bit 16
    up) and the errno that stopped it in its low 16 bits. The kernel copies
    whole pages, so bytes_done >> PAGE_SHIFT is the pages done; errno is
    EAGAIN, EEXIST or ENOENT (copy_fast() raises for anything else)."""
    return packed >> 16, packed & 0xFFFF


_VIA_SYSCALL = "syscall"
_VIA_DEV = "/dev/userfaultfd"


class Userfaultfd:
    """Owns one userfaultfd.

    The integer is forgotten on close(), so a use after close raises
    ClosedError instead of acting on whatever fd reuses the number. Not
    meant for concurrent read_batch() from several threads
    (the message buffer, .batch, is per instance); the ioctls are
    thread-safe.
    """

    __slots__ = ("_fd", "_zeros", "created_via", "features", "available_features",
                 "ioctls", "_msgs", "_words", "_max", "batch")

    def __init__(self, fd: int):
        self._fd = -1
        os.set_blocking(fd, False)
        self._fd = fd
        self.created_via = None
        self.features = 0
        self.available_features = 0
        self.ioctls = 0
        self._zeros = None   # set by read_into(): batches are read into the caller's memory
        self._grow(64)

    @classmethod
    def create(cls, *, via: str = "auto", user_mode_only: bool = False) -> "Userfaultfd":
        """via: "auto" (the syscall, then /dev/userfaultfd), "syscall" or
        "/dev/userfaultfd"."""
        flags = os.O_CLOEXEC | os.O_NONBLOCK
        if user_mode_only:
            flags |= UFFD_USER_MODE_ONLY
        if via not in ("auto", _VIA_SYSCALL, _VIA_DEV):
            raise ValueError(f"via must be 'auto', 'syscall' or '/dev/userfaultfd', not {via!r}")
        fd = -_errno.ENOSYS
        used = via
        if via in ("auto", _VIA_SYSCALL):
            fd = _lib.umgr_userfaultfd(flags)
            used = _VIA_SYSCALL
        if (fd < 0 and via == "auto") or via == _VIA_DEV:
            fd = _lib.umgr_userfaultfd_dev(flags)
            used = _VIA_DEV
        if fd < 0:
            err = -fd
            if err in (_errno.ENOSYS, _errno.ENOENT):
                raise Unsupported(f"userfaultfd via {via}: {os.strerror(err)}")
            raise UffdError(err, f"userfaultfd via {used}: {os.strerror(err)}")
        uffd = cls(fd)
        uffd.created_via = used
        return uffd

    # -- ownership ---------------------------------------------------------

    def fileno(self) -> int:
        if self._fd < 0:
            raise ClosedError("userfaultfd is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "Userfaultfd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # An unreferenced uffd would keep its target's faults unserved:
        # closing it lets them resolve as ordinary faults.
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<Userfaultfd {state} via={self.created_via}>"

    # -- errors ------------------------------------------------------------

    def _raise(self, err: int, what: str):
        if err == _ESRCH:
            raise TargetGone(f"{what}: target's mm is gone")
        if err == _EBADF and self._fd < 0:
            raise ClosedError(f"{what}: userfaultfd is closed")
        raise UffdError(err, f"{what}: {os.strerror(err)}")

    def _range_outcome(self, packed: int, length: int, what: str) -> tuple[int, int]:
        """(bytes_done, errno) of a packed range ioctl over length bytes;
        raises unless errno is 0, EAGAIN, EEXIST or ENOENT."""
        if not packed:
            return length, 0
        done, err = unpack(packed)
        if err in _NORMAL_RANGE:
            return done, err
        self._raise(err, what)

    # -- set-up ------------------------------------------------------------

    def api(self, features: int) -> int:
        """UFFDIO_API (once per uffd). Returns the features enabled, which
        are the ones asked for (the kernel adds WP_UNPOPULATED to WP_ASYNC).
        The kernel's full offer lands in .available_features."""
        out = _ffi.new("uint64_t[2]")
        r = _lib.umgr_uffd_api(self._fd, features, out, out + 1)
        if r < 0:
            self._raise(-r, f"UFFDIO_API features={features:#x}")
        if features & UFFD_FEATURE_WP_ASYNC:
            features |= UFFD_FEATURE_WP_UNPOPULATED
        self.features = features
        self.available_features = out[0]
        self.ioctls = out[1]
        return features

    def register(self, start: int, length: int, mode: int) -> int:
        """UFFDIO_REGISTER; returns the ioctls mask allowed on the range."""
        out = _ffi.new("uint64_t[1]")
        r = _lib.umgr_uffd_register(self._fd, start, length, mode, out)
        if r < 0:
            self._raise(-r, f"UFFDIO_REGISTER {start:#x}+{length:#x} mode={mode:#x}")
        return out[0]

    def unregister(self, start: int, length: int) -> None:
        r = _lib.umgr_uffd_unregister(self._fd, start, length)
        if r < 0:
            self._raise(-r, f"UFFDIO_UNREGISTER {start:#x}+{length:#x}")

    # -- fault path --------------------------------------------------------

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> tuple[int, int]:
        """UFFDIO_COPY from the address src in this process. Returns
        (bytes_copied, errno) with errno 0, EAGAIN, EEXIST or ENOENT."""
        packed = _copy_fast(self._fd, dst, src, length, mode)
        return self._range_outcome(packed, length, "UFFDIO_COPY")

    def zeropage(self, dst: int, length: int, mode: int = 0) -> tuple[int, int]:
        packed = _zeropage_fast(self._fd, dst, length, mode)
        return self._range_outcome(packed, length, "UFFDIO_ZEROPAGE")

    def writeprotect(self, start: int, length: int, protect: bool, wake: bool = True) -> int:
        """Set or clear write protection. Returns 0, EAGAIN or ENOENT."""
        mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
        if not wake:
            mode |= UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        r = _writeprotect(self._fd, start, length, mode)
        if not r:
            return 0
        if -r in _NORMAL_WP:
            return -r
        self._raise(-r, "UFFDIO_WRITEPROTECT")

    def wake(self, start: int, length: int) -> None:
        r = _wake(self._fd, start, length)
        if r:
            self._raise(-r, "UFFDIO_WAKE")

    def writeprotect_runs(self, vpns, npages, protect: bool) -> tuple[int, int]:
        """writeprotect() of each run of pages (contiguous int64 numpy
        arrays: first vpn, page count; pagetable.runs() makes them) in
        order, in one call, until one answers EAGAIN or ENOENT: returns
        (runs done, that errno), (len, 0) when all were."""
        mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
        done, err = self._runs(vpns, npages, mode)
        if err and err not in _NORMAL_WP:
            self._raise(err, "UFFDIO_WRITEPROTECT")
        return done, err

    def wake_runs(self, vpns, npages) -> None:
        """wake() of each run of pages, in one call."""
        _, err = self._runs(vpns, npages, -1)
        if err:
            self._raise(err, "UFFDIO_WAKE")

    def _runs(self, vpns, npages, wp_mode: int) -> tuple[int, int]:
        if vpns.dtype.str != "<i8" or npages.dtype.str != "<i8" or not (
                vpns.flags.c_contiguous and npages.flags.c_contiguous):
            raise TypeError("runs are contiguous int64 arrays")
        err = _ffi.new("int *")
        done = _lib.umgr_uffd_runs(self._fd, _ffi.cast("int64_t *", vpns.ctypes.data),
                                   _ffi.cast("int64_t *", npages.ctypes.data), len(vpns), wp_mode, err)
        return done, err[0]

    def copy_fast(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        """copy() for the fault path: 0 when all of length was copied, else
        (bytes_copied << 16) | errno with errno EAGAIN, EEXIST or ENOENT
        (see unpack()); raises as copy() does."""
        r = _copy_fast(self._fd, dst, src, length, mode)
        if r and (r & 0xFFFF) not in _NORMAL_RANGE:
            self._raise(r & 0xFFFF, "UFFDIO_COPY")
        return r

    def zeropage_fast(self, dst: int, length: int, mode: int = 0) -> int:
        """zeropage() for the fault path; returns as copy_fast()."""
        r = _zeropage_fast(self._fd, dst, length, mode)
        if r and (r & 0xFFFF) not in _NORMAL_RANGE:
            self._raise(r & 0xFFFF, "UFFDIO_ZEROPAGE")
        return r

    def serve_plain_faults(self, regions, nregions: int, store, pages: int, zeros: int, spin_ns: int,
                           slice_ns: int, room: int, near: int, log) -> int:
        """Serve plain MISSING faults in regions[0..nregions) in C until a message is
        not one (umgr_fast_serve, bindings/cffi/_cdef_fastfault.py),
        reading messages into .batch; swapped pages come from `store` (a
        struct umgr_fast_store). `pages`: FAST_GROUP pages of buffer.
        Returns FAST_IDLE, FAST_HANDOFF (the first log.handoff messages of
        .batch are the caller's) or FAST_YIELD; log.served pages were served."""
        r = _lib.umgr_fast_serve(self._fd, self._msgs, self._max, regions, nregions, store, pages, zeros,
                                 spin_ns, slice_ns, room, near, log)
        if r < 0:
            self._raise(-r, "read")
        return r

    def serve_in_background(self, bg, regions, nregions: int, store, pages: int, zeros: int, spin_ns: int,
                            slice_ns: int, room: int, near: int, log) -> None:
        """serve_plain_faults() in the thread of `bg` (fast_background()),
        reading into .batch as it does: nothing else may read this uffd,
        touch .batch or serve faults of these regions until
        finish_background() has returned. log.wake_fd must be set."""
        bg.uffd, bg.msgs, bg.max_msgs = self._fd, self._msgs, self._max
        bg.regions, bg.nregions, bg.store, bg.pages, bg.zeros = regions, nregions, store, pages, zeros
        bg.spin_ns, bg.slice_ns, bg.room, bg.near, bg.log = spin_ns, slice_ns, room, near, log
        _lib.umgr_fast_bg_go(bg)

    def finish_background(self, bg, stop: bool, as_it_goes: float = 0.0) -> int:
        """Wait for the call serve_in_background() started to end (with
        `stop`, end it after the group it is serving; else it spins for
        the next fault from now on, or with `as_it_goes` (seconds) sleeps
        for it as before); with `as_it_goes`, a call not over by then is
        let run on any CPU (bg.unpinned) and ended (umgr_fast_bg_wait).
        Its FAST_*, as serve_plain_faults() returns it."""
        if as_it_goes:
            r = _lib.umgr_fast_bg_wait(bg, stop, round(as_it_goes * 1e9))
        else:
            r = _lib.umgr_fast_bg_finish(bg, stop)
        if r < 0:
            self._raise(-r, "read")
        return r

    def prefetch(self, regions, nregions: int, store, vpns, pages: int, keep_period: int, fresh: bool,
                 log, also_slot: int = 0, also_page: int = 0) -> int:
        """Bring in the swapped (and with `fresh` the fresh) pages of vpns
        (a sorted int64 array) in C (umgr_fast_prefetch,
        bindings/cffi/_cdef_fastfault.py), keeping the clean copies of every
        page (keep_period 1), none (0) or every nth; returns how many,
        logged in log. With also_slot, that slot is read into the page at
        also_page alongside, where it can be (log.also_read)."""
        return _lib.umgr_fast_prefetch(self._fd, regions, nregions, store,
                                       _ffi.cast("int64_t *", vpns.ctypes.data), len(vpns), pages, keep_period,
                                       fresh, also_slot, also_page, log)

    def _grow(self, max_events: int) -> None:
        """A .batch that holds max_events messages (at least 64); a read of
        fewer than one message is a ValueError."""
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self._max = max(max_events, 64)
        self._msgs = _ffi.new("struct uffd_msg[]", self._max)
        self._words = self.batch = memoryview(_ffi.buffer(self._msgs)).cast("Q")

    def read_into(self, address: int, max_events: int) -> None:
        """Read batches into the max_events messages at `address` from now
        on (memory the caller keeps mapped: a shared file, so that a batch
        read survives the reader's death; umgr/paging/tablefile.py). Such a
        batch is zeroed with clear_batch() once handled."""
        self._max = max_events
        self._msgs = _ffi.cast("struct uffd_msg *", address)
        self._words = self.batch = memoryview(_ffi.buffer(self._msgs, max_events * _MSG_WORDS * 8)).cast("Q")
        self._zeros = _ffi.new("char[]", max_events * _MSG_WORDS * 8)

    def clear_batch(self, n: int) -> None:
        """Zero the first n messages of a batch read with read_into()."""
        if self._zeros is not None and n:
            _ffi.memmove(self._msgs, self._zeros, n * _MSG_WORDS * 8)

    def read_batch(self, max_events: int = 64, linger: float = 0.0) -> int:
        """Read up to max_events queued messages with one read() into
        .batch, in place; return how many (0 when none is queued). A batch
        that ends in a REMOVE waits up to `linger` seconds for the next
        message, while the buffer has room (a zap's events come one by
        one; nonblocking uffd only). The
        buffer is reused by the next read: decode a batch before reading
        again. Asking for more than ever before replaces .batch with a
        bigger buffer (fetch .batch after such a read). A ForkEvent's fd is
        the reader's to own: decode non-fault messages with batch_event()."""
        if max_events > self._max or max_events < 1:
            if self._zeros is not None:
                raise ValueError(f"at most {self._max} messages fit where this uffd reads")
            self._grow(max_events)
        n = _read_batch(self._fd, self._msgs, max_events, int(linger * 1e9))
        if n >= 0:
            return n
        self._raise(-n, "read")

    def batch_event(self, index: int):
        """Message index of the last batch as a typed event."""
        w = self._words
        i = index * _MSG_WORDS
        kind = w[i] & 0xFF
        if kind == EVENT_PAGEFAULT:
            return PageFault(w[i + 2], w[i + 1], w[i + 3] & 0xFFFFFFFF)
        if kind == EVENT_REMOVE:
            return RemoveEvent(w[i + 1], w[i + 2])
        if kind == EVENT_UNMAP:
            return UnmapEvent(w[i + 1], w[i + 2])
        if kind == EVENT_REMAP:
            return RemapEvent(w[i + 1], w[i + 2], w[i + 3])
        if kind == EVENT_FORK:
            return ForkEvent(w[i + 1] & 0xFFFFFFFF)
        raise UffdError(_errno.EPROTO, f"unknown uffd event {kind:#x}")

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.fileno())


FAST_GROUP = _lib.UMGR_FAST_GROUP
FAST_IDLE = _lib.UMGR_FAST_IDLE
FAST_HANDOFF = _lib.UMGR_FAST_HANDOFF
FAST_YIELD = _lib.UMGR_FAST_YIELD


def new_fast_struct(name: str, count: int = 0):
    """A zeroed struct umgr_fast_log, umgr_fast_region or umgr_fast_store (name), or an
    array of `count` of them, for Userfaultfd.serve_plain_faults()."""
    return _ffi.new(f"struct {name}[{count}]") if count else _ffi.new(f"struct {name} *")


def fast_background():
    """A struct umgr_fast_bg whose thread runs serve_in_background() calls;
    fast_background_end() ends it."""
    bg = _ffi.new("struct umgr_fast_bg *")
    err = _lib.umgr_fast_bg_start(bg)
    if err < 0:
        raise OSError(-err, f"fault service thread: {os.strerror(-err)}")
    _threads_running.add(bg)   # its struct outlives whoever forgets to end it: the thread reads it
    return bg


def fast_background_pin(bg, cpu: int, nice: int) -> None:
    """Keep the thread of fast_background() on `cpu` at `nice`, or (-1)
    on any CPU the daemon may use at the nice value the daemon's thread had
    when it started it (`nice` unused). A nice value refused is not an
    error: the thread keeps the one it has."""
    err = _lib.umgr_fast_bg_pin(bg, cpu, nice)
    if err:
        raise OSError(err, f"fault service thread's CPU: {os.strerror(err)}")


def fast_background_stop(bg) -> None:
    """Ask the call running in bg's thread to end after the group it is
    serving (Userfaultfd.finish_background() waits for it)."""
    _lib.umgr_fast_bg_stop(bg)


def fast_background_end(bg) -> None:
    """End the thread of fast_background() (no call of it running)."""
    _lib.umgr_fast_bg_end(bg)
    _threads_running.discard(bg)


_threads_running: set = set()


def unpack_entry(store, slot: int, page: int) -> bool:
    """Unpack slot's page from the memory tier `store` describes into the
    4096 bytes at `page`, as the fast path does; whether it came out whole."""
    return bool(_lib.umgr_fast_unpack(store, slot, page))


class FastIO:
    """What a fast path call reads with: an AIO context (aio, 0: none could
    be made; a group's reads are then preads one after another), the
    eventfd its reads signal (efd, -1: none) and a zstd decompression
    context (dctx, 0: none). Never destroyed: io_destroy() waits out an
    RCU grace period, 32 ms here, and no read is in flight between calls,
    so one serves any call made while no other call uses it."""
    __slots__ = ("c",)

    def __init__(self):
        self.c = _ffi.new("struct umgr_fast_log *")
        self.c.efd = -1
        _lib.umgr_fast_open(self.c)

    @property
    def aio(self) -> int:
        return self.c.aio

    @property
    def efd(self) -> int:
        return self.c.efd

    @property
    def dctx(self) -> int:
        return self.c.dctx


_fast_io: FastIO | None = None     # the process's: for calls made one at a time
_joint_io: list[FastIO] = []       # one more per member of a joint round, made as needed


def fast_io() -> FastIO:
    """The I/O contexts of every call made one at a time (the fault loops
    of all targets take turns), made on first use (the daemon makes them as
    it starts: a descriptor that appears later looks like a leak)."""
    global _fast_io
    if _fast_io is None:
        _fast_io = FastIO()
    return _fast_io


def joint_io(n: int) -> list[FastIO]:
    """n I/O contexts for the members of a joint round, which run at once:
    a context each (a completion reaped by another call would be lost to
    its own), kept for the next rounds."""
    while len(_joint_io) < n:
        _joint_io.append(FastIO())
    return _joint_io[:n]


NULL = _ffi.NULL


def array_pointer(ctype: str, array) -> object:
    """A C pointer (ctype, such as "uint8_t *") to a numpy array's data;
    the caller keeps the array alive while C may use it."""
    return _ffi.cast(ctype, array.ctypes.data)


def fast_state_values() -> tuple[int, int, int]:
    """The FRESH, RESIDENT and SWAPPED values umgr_fast_serve was built with."""
    return _lib.UMGR_STATE_FRESH, _lib.UMGR_STATE_RESIDENT, _lib.UMGR_STATE_SWAPPED


def fast_flag_values() -> tuple[int, int, int]:
    """The DISCARDABLE, PREFETCHED and CLUSTERED flag bits umgr_fast_serve was built with."""
    return _lib.UMGR_FLAG_DISCARDABLE, _lib.UMGR_FLAG_PREFETCHED, _lib.UMGR_FLAG_CLUSTERED


FAST_WP = _lib.UMGR_FAST_WP                           # log kind: a write to a resident page
FAST_WAS_PREFETCHED = _lib.UMGR_FAST_WAS_PREFETCHED   # ... that had come in by prefetch
FAST_MEMORY = _lib.UMGR_FAST_MEMORY                   # a MISSING fault's page came from a memory tier
FAST_CLUSTER = _lib.UMGR_FAST_CLUSTER                 # a page brought beside a lone fault: not a fault
FAST_FILL = _lib.UMGR_FAST_FILL                       # a fresh page brought ahead of a first write: not a fault
FAST_AHEAD = _lib.UMGR_FAST_AHEAD                     # a fault that brought fresh pages ahead of it
FILL_MAX = _lib.UMGR_FILL_MAX                         # pages a first write going up brings ahead, at most
CLUSTER_NOTES = _lib.UMGR_CLUSTER_NOTES               # entries of a log's noted_vpn and noted_tick
CLUSTER_NOTED = _lib.UMGR_CLUSTER_NOTED               # indices of a log's cluster_counts
CLUSTER_WANTED = _lib.UMGR_CLUSTER_WANTED
CLUSTER_TICK = _lib.UMGR_CLUSTER_TICK
FAST_WHY_FULL = _lib.UMGR_FAST_WHY_FULL               # log.why: the log filled up
FAST_WHY_SLICE = _lib.UMGR_FAST_WHY_SLICE             # log.why: the call's time slice ran out
FAST_WHY_ROOM = _lib.UMGR_FAST_WHY_ROOM               # log.why: the budget's room or high water mark reached


def supported_features(*, via: str = "auto") -> tuple[int, int]:
    """(features, ioctls) the kernel offers, probed on a scratch uffd
    (UFFDIO_API can be called once per uffd)."""
    with Userfaultfd.create(via=via) as probe:
        probe.api(0)
        return probe.available_features, probe.ioctls
