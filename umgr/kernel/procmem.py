"""Another process's memory: vectored reads and writes, zaps, pidfds and
PAGEMAP_SCAN.

Kernel facts (Linux 6.18):
- process_vm_readv on a not-present page of a uffd-registered range raises a
  userfault in the target and waits for it to be served: never call it from
  the thread that serves that uffd.
- process_madvise on another process accepts only WILLNEED, COLD, PAGEOUT
  (and COLLAPSE): MADV_DONTNEED there is EINVAL. A process may apply any
  advice to itself (PIDFD_SELF_*, or a pidfd of itself) since 6.13.
- PIDFD_SELF_THREAD / PIDFD_SELF_PROCESS are 6.15's sentinels for "the
  calling thread / its process" wherever a pidfd is taken.
- PAGEMAP_SCAN (6.7) stops early when its output vector is full or
  max_pages is reached and reports where in walk_end.

Ranges are two arrays, addresses and lengths (anything numpy turns into
contiguous uint64 without a copy is passed as is). ESRCH raises TargetGone;
other failures raise OSError with the kernel's errno.
"""

import errno as _errno
import mmap
import os

import numpy as np

from umgr.bindings._kernel import ffi as _ffi
from umgr.bindings._kernel import lib as _lib
from umgr.errors import TargetGone
from umgr.kernel import PAGE_SIZE as _PAGE_SIZE

PIDFD_SELF_THREAD = -10000
PIDFD_SELF_PROCESS = -10001

MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_FREE = 8
MADV_REMOVE = 9
MADV_COLD = 20
MADV_PAGEOUT = 21

PAGE_IS_WPALLOWED = _lib.PAGE_IS_WPALLOWED
PAGE_IS_WRITTEN = _lib.PAGE_IS_WRITTEN
PAGE_IS_FILE = _lib.PAGE_IS_FILE
PAGE_IS_PRESENT = _lib.PAGE_IS_PRESENT
PAGE_IS_SWAPPED = _lib.PAGE_IS_SWAPPED
PAGE_IS_PFNZERO = _lib.PAGE_IS_PFNZERO
PAGE_IS_HUGE = _lib.PAGE_IS_HUGE
PAGE_IS_SOFT_DIRTY = _lib.PAGE_IS_SOFT_DIRTY
PAGE_IS_ALL = (PAGE_IS_WPALLOWED | PAGE_IS_WRITTEN | PAGE_IS_FILE | PAGE_IS_PRESENT
               | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_HUGE | PAGE_IS_SOFT_DIRTY)
PM_SCAN_WP_MATCHING = _lib.PM_SCAN_WP_MATCHING
PM_SCAN_CHECK_WPASYNC = _lib.PM_SCAN_CHECK_WPASYNC

IOV_MAX = _lib.UMGR_IOV_MAX


def _fail(err: int, what: str, pid: int | None = None):
    if err == _errno.ESRCH:
        raise TargetGone(f"{what}: process {pid} is gone", pid=pid)
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _ranges(addrs, lens):
    addrs = np.ascontiguousarray(addrs, dtype=np.uint64)
    lens = np.ascontiguousarray(lens, dtype=np.uint64)
    if addrs.shape != lens.shape or addrs.ndim != 1:
        raise ValueError("addrs and lens must be 1-d arrays of the same length")
    return (_ffi.from_buffer("uint64_t[]", addrs), _ffi.from_buffer("uint64_t[]", lens),
            len(addrs))


def process_vm_readv(pid: int, local_addr: int, addrs, lens) -> int:
    """Read the remote ranges, back to back, into the local buffer at
    local_addr. Returns the bytes read (short if a remote range failed
    part-way)."""
    a, l, n = _ranges(addrs, lens)
    r = _lib.umgr_process_vm_readv(pid, local_addr, a, l, n)
    if r < 0:
        _fail(-r, "process_vm_readv", pid)
    return r


def open_mem(pid: int) -> int:
    """An fd of /proc/PID/mem (read-write: checked_readv writes its token
    through it; the caller closes it). It is bound to the mm the process has
    now: after an exec its reads return 0 bytes instead of reaching the new
    program (and a setuid program's memory)."""
    try:
        return os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone(f"/proc/{pid}/mem: process {pid} is gone", pid=pid) from None


def mem_readv(mem_fd: int, local_addr: int, addrs, lens, pid: int | None = None) -> int:
    """process_vm_readv() through an open /proc/PID/mem (open_mem): the
    remote ranges, back to back, into the local buffer. Returns the bytes
    read (short if a range failed part-way). Unlike process_vm_readv, a
    page missing in a userfaultfd range fails the read (EIO) rather than
    waiting for the fault to be served. Raises TargetGone when the mm the
    file was opened on is gone."""
    a, l, n = _ranges(addrs, lens)
    r = _lib.umgr_mem_readv(mem_fd, local_addr, a, l, n)
    if r < 0:
        _fail(-r, "read /proc/PID/mem", pid)
    if r == 0 and np.count_nonzero(np.asarray(lens)):
        raise TargetGone(f"process {pid}: the memory it had at attach is gone", pid=pid)
    return r


def checked_readv(pid: int, mem_fd: int, canary: int, local_addr: int, addrs, lens) -> int | None:
    """process_vm_readv of `pid`, proven to have read the mm `mem_fd` (its
    /proc/PID/mem, open_mem) is bound to: a random token written at
    `canary` through mem_fd must come back in the same call. Returns the
    bytes read (short if a range failed part-way), or None when that proof
    failed (the process exec'd or its canary page changed; nothing read is
    kept). Raises TargetGone when the process or its mm is gone."""
    a, l, n = _ranges(addrs, lens)
    r = _lib.umgr_checked_readv(pid, mem_fd, canary, local_addr, a, l, n)
    if r == -_errno.EXDEV:
        return None
    if r < 0:
        _fail(-r, "process_vm_readv", pid)
    return r


def process_vm_writev(pid: int, local_addr: int, addrs, lens) -> int:
    """Write the local buffer at local_addr, back to back, to the remote
    ranges. Returns the bytes written."""
    a, l, n = _ranges(addrs, lens)
    r = _lib.umgr_process_vm_writev(pid, local_addr, a, l, n)
    if r < 0:
        _fail(-r, "process_vm_writev", pid)
    return r


def process_madvise(pidfd: int, addrs, lens, advice: int) -> int:
    """Vectored madvise in the process of pidfd. Returns the bytes advised.

    With uffd EVENT_REMOVE on the range, a DONTNEED blocks until the uffd's
    reader has read each REMOVE event: do not call it from that reader.
    """
    a, l, n = _ranges(addrs, lens)
    r = _lib.umgr_process_madvise(pidfd, a, l, n, advice)
    if r < 0:
        _fail(-r, f"process_madvise(advice={advice})")
    return r


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise(2) in this process (the GIL is released during the call)."""
    r = _lib.umgr_madvise(addr, length, advice)
    if r < 0:
        _fail(-r, f"madvise(advice={advice})")


PID_MAX_LIMIT = 1 << 22   # the kernel's largest pid_max (PID_MAX_LIMIT on 64-bit)


def pidfd_open(pid: int, flags: int = 0) -> int:
    r = _lib.umgr_pidfd_open(pid, flags)
    if r < 0:
        _fail(-r, "pidfd_open", pid)
    return r


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """Duplicate the target's fd into this process (the copy is O_CLOEXEC)."""
    r = _lib.umgr_pidfd_getfd(pidfd, fd, 0)
    if r < 0:
        _fail(-r, "pidfd_getfd")
    return r


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    r = _lib.umgr_pidfd_send_signal(pidfd, sig, 0)
    if r < 0:
        _fail(-r, "pidfd_send_signal")


def open_pagemap(pid: int) -> int:
    """An fd of /proc/PID/pagemap for pagemap_scan (the caller closes it)."""
    try:
        return os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone(f"/proc/{pid}/pagemap: process {pid} is gone", pid=pid) from None


# /proc/PID/pagemap entries (Documentation/admin-guide/mm/pagemap.rst):
# one u64 per page. The PFN reads as 0 without CAP_SYS_ADMIN.
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_MMAP_EXCLUSIVE = 1 << 56   # mapped by this process only (not shared COW)
PM_PFN_MASK = (1 << 55) - 1


# Runs that lie within this many times their page count of each other are
# read as one span (one pread, the kernel's page walk over the gaps too)
# rather than a pread each: a batch of scattered victims is hundreds of runs.
SPAN_READ_FACTOR = 16


def pagemap_entries(pid: int, starts, lengths) -> np.ndarray:
    """The pagemap entries of the pages of each run (start vpn, length),
    concatenated in order. Reading it never waits on a userfault."""
    starts, lengths = np.ascontiguousarray(starts, np.int64), np.ascontiguousarray(lengths, np.int64)
    total = int(lengths.sum())
    span = int(starts[-1] + lengths[-1] - starts[0]) if len(starts) else 0
    one_read = len(starts) > 1 and 0 < span <= SPAN_READ_FACTOR * total
    read_starts, read_lengths = (starts[:1], np.array([span], np.int64)) if one_read else (starts, lengths)
    entries = np.empty(span if one_read else total, np.uint64)
    fd = open_pagemap(pid)
    try:
        # A pread a run, in C: a batch of scattered victims is hundreds of runs.
        got = _lib.umgr_pagemap_runs(fd, _ffi.cast("int64_t *", read_starts.ctypes.data),
                                     _ffi.cast("int64_t *", read_lengths.ctypes.data), len(read_starts),
                                     _ffi.cast("uint64_t *", entries.ctypes.data))
    finally:
        os.close(fd)
    if got == -_errno.ESRCH or 0 <= got < len(entries):
        # An open pagemap of a process that has exited reads as empty.
        raise TargetGone(f"process {pid} is gone (pagemap read short)", pid=pid)
    if got < 0:
        raise OSError(-got, f"/proc/{pid}/pagemap: {os.strerror(-got)}")
    if not one_read:
        return entries
    # The runs' pages within the span: each run's offset, then 0..length-1 within it.
    first_of_run = np.repeat(starts - starts[0], lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return entries[first_of_run + within]


_zero_pfn: int | None = None


def zero_pfn() -> int:
    """The PFN of the kernel's shared zero page, 0 when PFNs are hidden
    from us (no CAP_SYS_ADMIN). Found by reading a fresh private page."""
    global _zero_pfn
    if _zero_pfn is None:
        with mmap.mmap(-1, _PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ) as page:
            page[0]  # a read fault on untouched anonymous memory maps the zero page
            addr = np.frombuffer(page, np.uint8).ctypes.data
            entry = int(pagemap_entries(os.getpid(), [addr // _PAGE_SIZE], [1])[0])
        _zero_pfn = entry & PM_PFN_MASK if entry & PM_PRESENT else 0
    return _zero_pfn


def pagemap_scan(pid_or_file, start: int, end: int, category_mask: int, return_mask: int,
                 category_inverted: int = 0, category_anyof: int = 0, max_pages: int = 0,
                 *, flags: int = 0, batch: int = 256) -> list[tuple[int, int, int]]:
    """PAGEMAP_SCAN over [start, end): (start, end, categories) runs.

    pid_or_file: a pid (its /proc/PID/pagemap is opened for the call), or
    an object with fileno() on an open pagemap (see open_pagemap). Runs
    that continue across the kernel's early stops are merged.
    """
    if isinstance(pid_or_file, int):
        fd, owned, pid = open_pagemap(pid_or_file), True, pid_or_file
    else:
        fd, owned, pid = pid_or_file.fileno(), False, None
    try:
        return _scan(fd, pid, start, end, category_mask, return_mask,
                     category_inverted, category_anyof, max_pages, flags, batch)
    finally:
        if owned:
            os.close(fd)


def _scan(fd, pid, start, end, category_mask, return_mask, category_inverted,
          category_anyof, max_pages, flags, batch):
    vec = _ffi.new("struct page_region[]", batch)
    arg = _ffi.new("struct pm_scan_arg *")
    arg.size = _ffi.sizeof("struct pm_scan_arg")
    arg.flags = flags
    arg.vec = int(_ffi.cast("uintptr_t", vec))
    arg.vec_len = batch
    arg.category_inverted = category_inverted
    arg.category_mask = category_mask
    arg.category_anyof_mask = category_anyof
    arg.return_mask = return_mask
    out: list[tuple[int, int, int]] = []
    pages_left = max_pages
    while start < end:
        arg.start = start
        arg.end = end
        arg.max_pages = pages_left
        n = _lib.umgr_pagemap_scan(fd, arg)
        if n < 0:
            _fail(-n, "PAGEMAP_SCAN", pid)
        for i in range(n):
            r = vec[i]
            if out and out[-1][1] == r.start and out[-1][2] == r.categories:
                out[-1] = (out[-1][0], r.end, r.categories)
            else:
                out.append((r.start, r.end, r.categories))
            if max_pages:
                pages_left -= (r.end - r.start) // _PAGE_SIZE
        walk_end = arg.walk_end
        if walk_end <= start or (max_pages and pages_left <= 0):
            break
        start = walk_end
    return out


PF_EXITING = 0x4   # include/linux/sched.h: a task's flags (field 9 of its stat)


def _stat_fields(path: str) -> list[bytes] | None:
    """The fields of a /proc stat file after the command name (which may
    hold spaces and parentheses): field 3 (state) first. None when gone."""
    try:
        with open(path, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def parent_pid(pid: int) -> int | None:
    """The process's parent (field 4 of /proc/PID/stat), or None when it
    is gone."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    return None if fields is None else int(fields[1])


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (field 22 of
    /proc/PID/stat), or None when it is gone."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    return None if fields is None else int(fields[19])


def running_since(pid: int, start_time: int) -> bool:
    """Whether the process that started at start_time (process_start_time)
    is still there, a thread of it not exiting: not ended, not a zombie,
    its pid not taken anew (a main thread that ended with pthread_exit is
    a zombie while the others run: see exiting)."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    return fields is not None and int(fields[19]) == start_time and not exiting(pid)


def exiting(pid: int) -> bool:
    """Whether every thread of the process is exiting (PF_EXITING), or it
    is gone. The main thread alone may be (a main() that ended with
    pthread_exit) while the process lives on."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in threads:
        fields = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        if fields is not None and not int(fields[6]) & PF_EXITING:
            return False
    return True


KSM_RUN = "/sys/kernel/mm/ksm/run"


def ksm_may_merge(pid: int) -> bool:
    """Whether KSM may merge some of the process's memory. A merge maps the
    shared page without the uffd write-protect bit, so a later write to it
    raises no write-protect fault. Where /proc/PID/ksm_stat says
    ("ksm_mergeable" and "ksm_merge_any", Linux 6.15): whether the process
    asked for it (MADV_MERGEABLE on a mapping, or PR_SET_MEMORY_MERGE),
    whether or not KSM runs now (it may be started at any time). Where it
    does not: whether KSM runs (reading smaps for VM_MERGEABLE would walk
    the page tables before every eviction batch). False without KSM."""
    try:
        with open(f"/proc/{pid}/ksm_stat", "rb") as f:
            text = f.read()
    except OSError:
        return False
    if b"ksm_mergeable:" in text:
        return b"ksm_mergeable: yes" in text or b"ksm_merge_any: yes" in text
    try:
        with open(KSM_RUN, "rb") as f:
            return f.read().strip() not in (b"0", b"")
    except OSError:
        return False
