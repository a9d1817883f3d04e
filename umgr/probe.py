"""Probing the running kernel by real calls, not version numbers."""
from __future__ import annotations

import errno
import functools
import mmap
import os
import signal

import numpy as np

from umgr.kernel import PAGE_SIZE as _PAGE
from umgr.kernel import procmem
from umgr import protocol


@functools.cache
def remote_zap_supported() -> bool:
    """Does process_madvise(MADV_DONTNEED) work on another process? Upstream
    allows only WILLNEED, COLD, PAGEOUT and COLLAPSE remotely (EINVAL)."""
    page = mmap.mmap(-1, 4096)
    page[0] = 1
    addr = np.frombuffer(page, np.uint8).ctypes.data
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    try:
        pidfd = procmem.pidfd_open(pid)
        try:
            procmem.process_madvise(pidfd, np.array([addr], np.uint64), np.array([4096], np.uint64),
                                    procmem.MADV_DONTNEED)
            return True
        except OSError:
            return False
        finally:
            os.close(pidfd)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        page.close()


def zap_mode() -> protocol.ZapMode:
    return protocol.ZapMode.REMOTE if remote_zap_supported() else protocol.ZapMode.AGENT


# ---- umgr doctor -------------------------------------------------------------------
# Each probe performs the real operation on scratch memory (the way QEMU's
# postcopy_ram_supported_by_host registers a page rather than trusting the
# kernel version) and returns (status, detail). Statuses: ok, supported,
# unsupported, denied, missing, failed.

_PM_UFFD_WP = 1 << 57          # /proc/PID/pagemap entry bit: pte is uffd write-protected
_PM_PRESENT = 1 << 63


def _scratch(pages: int = 1) -> tuple[mmap.mmap, int]:
    # MAP_PRIVATE: Python's default for -1 is MAP_SHARED (shmem), where
    # DONTNEED keeps the data and a forked child shares the page.
    m = mmap.mmap(-1, pages * _PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return m, np.frombuffer(m, np.uint8).ctypes.data


def _pagemap_entry(addr: int) -> int:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // _PAGE * 8)
        return int.from_bytes(f.read(8), "little")


def _feature_names(bits: int) -> str:
    from umgr.kernel import uffd
    names = [n.removeprefix("UFFD_FEATURE_") for n in dir(uffd)
             if n.startswith("UFFD_FEATURE_") and getattr(uffd, n) & bits]
    names.sort(key=lambda n: getattr(uffd, "UFFD_FEATURE_" + n))
    return ", ".join(names)


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _probe_uffd_syscall():
    from umgr.kernel.uffd import Userfaultfd
    with Userfaultfd.create(via="syscall"):
        pass
    sysctl = _read_text("/proc/sys/vm/unprivileged_userfaultfd")
    return "ok", f"userfaultfd(2) works (uid {os.getuid()}, vm.unprivileged_userfaultfd={sysctl})"


def _probe_uffd_dev():
    path = "/dev/userfaultfd"
    if not os.path.exists(path):
        return "missing", f"{path} does not exist"
    st = os.stat(path)
    perms = f"mode {stat_mode(st.st_mode)} uid {st.st_uid} gid {st.st_gid}"
    from umgr.kernel.uffd import Userfaultfd
    with Userfaultfd.create(via="/dev/userfaultfd"):
        pass
    return "ok", f"opened and USERFAULTFD_IOC_NEW works ({perms})"


UFFD_DEVICE = "/dev/userfaultfd"
UNPRIVILEGED_UFFD = "/proc/sys/vm/unprivileged_userfaultfd"
MISC_UFFD = "/sys/class/misc/userfaultfd"   # the device as the kernel has it, where /dev hides it


def uffd_closed_to_group(gid: int, device: str = UFFD_DEVICE, sysctl: str = UNPRIVILEGED_UFFD,
                         misc: str = MISC_UFFD) -> str:
    """Why the members of group gid (not root) cannot create the userfaultfd
    the shim needs, or "" if they can or it cannot be told (an ACL).

    Without vm.unprivileged_userfaultfd=1 an unprivileged process gets only
    a user-mode-only uffd from the syscall, whose range then fails the
    kernel's own accesses (read(2) into a paged-out buffer: EFAULT), so the
    shim does not ask for one. /dev/userfaultfd (Linux 6.1) gives a full one
    to whoever may open it read-write."""
    if _read_text(sysctl) == "1":
        return ""
    try:
        st = os.stat(device)
    except OSError as exc:
        if exc.errno == errno.ENOENT and os.path.exists(misc):
            return ""   # (hidden from this daemon, as systemd's PrivateDevices= does: its mode cannot be told)
        return f"vm.unprivileged_userfaultfd is 0 and {device} cannot be used ({os.strerror(exc.errno)})"
    try:
        if os.getxattr(device, "system.posix_acl_access"):
            return ""
    except OSError:
        pass   # (no ACL, or no xattrs on that filesystem)
    # (For a process in the file's group the group's bits decide, not the others'.)
    bits = st.st_mode >> 3 if st.st_gid == gid else st.st_mode
    if bits & 0o6 == 0o6:
        return ""
    members = _members(gid)
    if st.st_gid != gid and (st.st_mode >> 3) & 0o6 == 0o6 and members and members <= _members(st.st_gid):
        return ""   # (every member of the group is in the device's group too)
    return (f"vm.unprivileged_userfaultfd is 0 and {device} is {stat_mode(st.st_mode)} "
            f"{_user_name(st.st_uid)}:{_group_name(st.st_gid)}")


def _members(gid: int) -> set[str]:
    """The users in group gid: listed in it, or with it as their own group."""
    import grp
    import pwd
    try:
        listed = set(grp.getgrgid(gid).gr_mem)
    except KeyError:
        listed = set()
    return listed | {user.pw_name for user in pwd.getpwall() if user.pw_gid == gid}


def _user_name(uid: int) -> str:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    import grp
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def stat_mode(mode: int) -> str:
    import stat
    return stat.filemode(mode)


def _probe_features():
    from umgr.kernel.uffd import supported_features
    features, ioctls = supported_features()
    return "ok", f"{features:#x}: {_feature_names(features)} (API ioctls {ioctls:#x})"


def _probe_wp():
    from umgr.kernel import uffd as U
    m, addr = _scratch()
    try:
        m[0] = 1                                     # populate: WP applies to present ptes
        with U.Userfaultfd.create() as fd:
            fd.api(U.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
            ioctls = fd.register(addr, _PAGE, U.UFFDIO_REGISTER_MODE_MISSING | U.UFFDIO_REGISTER_MODE_WP)
            if not ioctls & U.IOCTL_WRITEPROTECT:
                return "unsupported", f"register MISSING|WP gave no WRITEPROTECT ioctl (mask {ioctls:#x})"
            err = fd.writeprotect(addr, _PAGE, True)
            if err:
                return "failed", f"UFFDIO_WRITEPROTECT: {os.strerror(err)}"
            protected = bool(_pagemap_entry(addr) & _PM_UFFD_WP)
            fd.writeprotect(addr, _PAGE, False)
            fd.unregister(addr, _PAGE)
        if not protected:
            return "failed", "UFFDIO_WRITEPROTECT returned 0 but pagemap shows no uffd-wp bit"
        return "supported", "registered MISSING|WP, write-protected a page (pagemap uffd-wp bit set)"
    finally:
        m.close()


def _probe_event_fork():
    from umgr.kernel import uffd as U
    from umgr.errors import UffdError
    with U.Userfaultfd.create() as fd:
        try:
            fd.api(U.UFFD_FEATURE_EVENT_FORK)
        except UffdError as exc:
            if exc.errno == errno.EPERM:
                return "denied", "UFFDIO_API with EVENT_FORK: EPERM (needs CAP_SYS_PTRACE)"
            raise
    return "supported", "UFFDIO_API with EVENT_FORK accepted"


def daemon_refused() -> str:
    """Why a daemon run by this process could serve no program, or "".
    The daemon enables fork events on each program's userfaultfd
    (UFFDIO_API), and the kernel allows that only with CAP_SYS_PTRACE
    (checked on the caller, the daemon): without them a forked child would
    find its parent's paged-out memory as zeros."""
    from umgr.errors import Unsupported
    try:
        status, _ = _probe_event_fork()
    except (OSError, Unsupported) as exc:   # (no userfaultfd at all: UffdError, or Unsupported for ENOSYS/ENOENT)
        errnum = getattr(exc, "errno", None)
        return f"this process gets no userfaultfd ({os.strerror(errnum) if errnum else exc})"
    return "" if status == "supported" else "userfaultfd fork events need CAP_SYS_PTRACE, which this process lacks"


def _probe_io_uring():
    import tempfile
    from umgr.kernel.ring import Batch, Op, Ring, address
    disabled = _read_text("/proc/sys/kernel/io_uring_disabled")
    payload = os.urandom(_PAGE)
    with tempfile.TemporaryFile() as f:
        f.write(payload)
        f.flush()
        buf = bytearray(_PAGE)
        with Ring(8) as ring:
            res = ring.submit_and_wait_sync(Batch(Op.READ, f.fileno(), address(buf), _PAGE, 0, keepalive=buf))
    if int(res[0]) != _PAGE or bytes(buf) != payload:
        return "failed", f"read of a temp file returned {int(res[0])}"
    return "ok", f"ring created, 4 KiB read of a temp file verified (io_uring_disabled={disabled})"


def _probe_pagemap_scan():
    pages = 4
    m, addr = _scratch(pages)
    try:
        m[0] = 1
        m[2 * _PAGE] = 1
        runs = procmem.pagemap_scan(os.getpid(), addr, addr + pages * _PAGE,
                                    procmem.PAGE_IS_PRESENT, procmem.PAGE_IS_PRESENT)
        got = [((s - addr) // _PAGE, (e - addr) // _PAGE) for s, e, _ in runs]
        if got != [(0, 1), (2, 3)]:
            return "failed", f"expected present pages [0,1) [2,3), got {got}"
        return "supported", "PAGEMAP_SCAN on own pagemap found exactly the 2 touched pages"
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL):
            return "unsupported", f"PAGEMAP_SCAN ioctl: {os.strerror(exc.errno)}"
        raise
    finally:
        m.close()


def _probe_remote_zap():
    if remote_zap_supported():
        return "supported", "process_madvise(other pidfd, MADV_DONTNEED) accepted: daemon zaps directly"
    return "unsupported", "process_madvise(other pidfd, MADV_DONTNEED) refused (upstream allows only WILLNEED/COLD/PAGEOUT/COLLAPSE remotely)"


def _self_zap(pidfd: int) -> str | None:
    """Zap one unregistered scratch page through pidfd; None if it worked,
    else the reason. (A page in a uffd range with EVENT_REMOVE would block
    until the REMOVE event is read: never use one here.)"""
    m, addr = _scratch()
    try:
        m[0] = 0x5A
        try:
            procmem.process_madvise(pidfd, np.array([addr], np.uint64), np.array([_PAGE], np.uint64),
                                    procmem.MADV_DONTNEED)
        except OSError as exc:
            return os.strerror(exc.errno) if exc.errno else str(exc)
        if m[0] != 0:
            return "call succeeded but the page kept its data"
        return None
    finally:
        m.close()


def _probe_agent_zap():
    via_self = _self_zap(procmem.PIDFD_SELF_PROCESS)
    own = procmem.pidfd_open(os.getpid())
    try:
        via_own = _self_zap(own)
    finally:
        os.close(own)
    parts = [f"PIDFD_SELF: {via_self or 'ok'}", f"own pidfd: {via_own or 'ok'}"]
    status = "supported" if via_self is None or via_own is None else "unsupported"
    return status, "process_madvise(MADV_DONTNEED) on itself, " + "; ".join(parts)


def _probe_move_out():
    """What the shim's agent does with evicted pages: UFFDIO_MOVE a page of
    an unregistered mapping into a scratch page registered on a uffd of its
    own, in its own process."""
    from umgr.kernel import uffd as U
    from umgr.kernel.uffd_extra import Userfaultfd
    source, src = _scratch()
    scratch, dst = _scratch()
    try:
        source[0] = 0x5A
        with Userfaultfd.create(user_mode_only=True) as fd:
            fd.api(U.UFFD_FEATURE_MOVE)
            fd.register(dst, _PAGE, U.UFFDIO_REGISTER_MODE_MISSING)
            moved, err = fd.move(dst, src, _PAGE)
        if err or moved != _PAGE:
            return "failed", f"UFFDIO_MOVE moved {moved} bytes: {os.strerror(err) if err else 'short'}"
        if _pagemap_entry(src) & _PM_PRESENT or scratch[0] != 0x5A:
            return "failed", "UFFDIO_MOVE returned but the page did not move"
        return "supported", "UFFDIO_MOVE of a page into a range of its own uffd: evicted pages leave with no REMOVE event"
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTTY, errno.ENOSYS):
            return "unsupported", f"UFFDIO_MOVE: {os.strerror(exc.errno)} (pages leave by zap: slower)"
        raise
    finally:
        source.close()
        scratch.close()


def _probe_readv():
    m, addr = _scratch()
    pattern = os.urandom(_PAGE)
    m[:] = pattern
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    try:
        out = bytearray(_PAGE)
        local = np.frombuffer(out, np.uint8).ctypes.data
        m[:] = bytes(_PAGE)                        # the child keeps the pattern (COW)
        n = procmem.process_vm_readv(pid, local, np.array([addr], np.uint64), np.array([_PAGE], np.uint64))
        if n != _PAGE or bytes(out) != pattern:
            return "failed", f"read {n} bytes, content {'matches' if bytes(out) == pattern else 'differs'}"
        scope = _read_text("/proc/sys/kernel/yama/ptrace_scope")
        yama = "no yama" if scope is None else f"yama ptrace_scope={scope}"
        return "ok", f"read a forked child's page and verified it ({yama})"
    except OSError as exc:
        if exc.errno == errno.EPERM:
            return "denied", "process_vm_readv: EPERM (needs ptrace access to the target)"
        raise
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        m.close()


def _probe_idle_poll():
    from umgr.kernel.cpulatency import DEVICE, NO_LIMIT, CpuLatencyRequest, cpuidle_driver, current_limit
    before = current_limit()
    request = CpuLatencyRequest()
    request.hold(0)
    try:
        held = current_limit()
    finally:
        request.release()
    if held != 0:
        return "failed", f"a request of 0 us held, the limit read {held}"
    now = "none held" if before == NO_LIMIT else f"{before} us held by another process"
    driver = cpuidle_driver()
    if driver is None:
        return "supported", (f"a CPU latency request of 0 us takes ({DEVICE}; now {now}), but no cpuidle "
                             "driver reads it (current_driver: none): idle CPUs halt whatever is held, "
                             "and --idle-poll changes nothing here")
    return "supported", (f"a CPU latency request of 0 us takes ({DEVICE}); now {now}: "
                         f"--idle-poll keeps idle CPUs polling while programs page busily (cpuidle driver {driver})")

_PROBES = [
    ("uffd syscall", _probe_uffd_syscall),
    ("/dev/userfaultfd", _probe_uffd_dev),
    ("uffd features", _probe_features),
    ("uffd WP (anon)", _probe_wp),
    ("EVENT_FORK", _probe_event_fork),
    ("io_uring", _probe_io_uring),
    ("PAGEMAP_SCAN", _probe_pagemap_scan),
    ("process_vm_readv", _probe_readv),
    ("remote zap", _probe_remote_zap),
    ("agent zap", _probe_agent_zap),
    ("agent move out", _probe_move_out),
    ("idle poll", _probe_idle_poll),
]

_GOOD = ("ok", "supported")


def probe() -> list[tuple[str, str, str]]:
    """Run every probe: (facility, status, detail) rows. A probe that raises
    is reported as failed with the exception; it never aborts the others."""
    rows = []
    for name, fn in _PROBES:
        try:
            status, detail = fn()
        except Exception as exc:  # noqa: BLE001 - the table reports it
            err = getattr(exc, "errno", None)
            if err in (errno.EPERM, errno.EACCES):
                status = "denied"
            elif err in (errno.ENOSYS, errno.ENOENT) or type(exc).__name__ == "Unsupported":
                status = "unsupported"
            else:
                status = "failed"
            detail = f"{type(exc).__name__}: {exc}"
        rows.append((name, status, detail))
    return rows


def verdict(rows) -> list[str]:
    """Why umgr cannot run here ([] when it can)."""
    st = {name: status for name, status, _ in rows}
    reasons = []
    if st["uffd syscall"] not in _GOOD and st["/dev/userfaultfd"] not in _GOOD:
        reasons.append("no userfaultfd (neither the syscall nor /dev/userfaultfd)")
    if st["uffd WP (anon)"] not in _GOOD:
        reasons.append("no write-protect on anonymous memory (needed to track dirty pages)")
    if st["io_uring"] not in _GOOD:
        reasons.append("io_uring unavailable (the swap backend's I/O path)")
    if st["process_vm_readv"] not in _GOOD:
        reasons.append("process_vm_readv not allowed (eviction reads target pages with it)")
    if st["remote zap"] not in _GOOD and st["agent zap"] not in _GOOD:
        reasons.append("no way to drop evicted pages (neither remote nor self process_madvise MADV_DONTNEED)")
    if st["EVENT_FORK"] == "denied":   # (not when there is no userfaultfd at all: said above)
        reasons.append("userfaultfd fork events need CAP_SYS_PTRACE, which this process lacks, so a daemon "
                       "started like it could serve no program (a user's programs can be served by a root daemon's "
                       "--group: README, \"Serving other users\")")
    return reasons


def format_table(rows) -> str:
    w0 = max(len(r[0]) for r in rows + [("facility", "", "")])
    w1 = max(len(r[1]) for r in rows + [("", "status", "")])
    lines = [f"{'facility':<{w0}}  {'status':<{w1}}  detail"]
    lines += [f"{name:<{w0}}  {status:<{w1}}  {detail}" for name, status, detail in rows]
    return "\n".join(lines)


def doctor() -> int:
    """Print the probe table and a verdict; 0 when umgr can run here."""
    rows = probe()
    print(format_table(rows))
    reasons = verdict(rows)
    status = dict((r[0], r[1]) for r in rows)
    mode = "remote (daemon zaps directly)" if status["remote zap"] in _GOOD \
        else "agent (in-target thread zaps via PIDFD_SELF)"
    if status["agent move out"] in _GOOD:
        mode += "; the agent moves evicted pages out with UFFDIO_MOVE, zapping only what cannot move"
    if reasons:
        print("\numgr cannot run here:")
        for r in reasons:
            print(f"  - {r}")
        return 1
    print(f"\numgr can run here; zap mode: {mode}")
    return 0
