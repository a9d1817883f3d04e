"""Who is at the other end of a control connection, and proof that the
memory the daemon is handed is that process's own.

The daemon runs as root and reads, stores and writes the memory of the
processes it serves, so it acts on a process only where the peer could
have acted itself: a process whose real, effective, saved and filesystem
ids are the connection's, that is dumpable (not setuid, setgid or
PR_SET_DUMPABLE 0), reached through a pidfd taken when it connected, and
whose memory is read through a /proc/PID/mem opened once and bound to the
mm it had then. A received userfaultfd is tied to that mm by a probe: a
random value copied in through the uffd must read back through that file.

Kernel facts (Linux 6.18):
- SO_PEERPIDFD (6.5) is a pidfd of the process that called connect(),
  taken then: it never names a process that reused the pid.
- PIDFD_GET_INFO (6.13) reports a live process's pid, parent and ids;
  ESRCH once it has exited, so what it reports belongs to the pidfd's
  process.
- /proc/PID/mem and /proc/PID/maps hold the mm the process had at open():
  after an exec they read as empty, never the new program.
- The files in /proc/PID (not the directory itself) belong to root while
  the process is not dumpable; otherwise to its effective uid.
- A killed process loses its mm (/proc/PID/mem reads nothing, its maps are
  empty, its uffd refuses ioctls) before its pidfd polls readable; in
  between the flags of each of its threads hold PF_EXITING.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import select
import socket
import struct
from dataclasses import dataclass

import numpy as np

from umgr.errors import TargetGone, UmgrError
from umgr.kernel import PAGE_SIZE, procmem
from umgr.kernel import uffd as uffdmod
from umgr.kernel.buffers import PageBuffer

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
# include/uapi/linux/pidfd.h: struct pidfd_info up to fsgid, exit_code
# (PIDFD_INFO_SIZE_VER0); PIDFD_GET_INFO = _IOWR(0xFF, 11, that struct).
PIDFD_INFO = struct.Struct("<QQ 11I i")
PIDFD_INFO_PID = 1 << 0
PIDFD_INFO_CREDS = 1 << 1
PIDFD_GET_INFO = (3 << 30) | (PIDFD_INFO.size << 16) | (0xFF << 8) | 11
PROBE_TOKEN_BYTES = 16


class Refused(UmgrError):
    """A peer asked for something it may not have."""


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    ppid: int
    uids: tuple[int, int, int, int]   # real, effective, saved, filesystem
    gids: tuple[int, int, int, int]


@dataclass(slots=True)
class Peer:
    """The process that connected: SO_PEERCRED's pid, uid and gid (the
    effective ids at connect time) and a pidfd of that very process."""
    pid: int
    uid: int
    gid: int
    pidfd: int

    @property
    def name(self) -> str:
        return f"pid {self.pid} uid {self.uid}"

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def ended(self) -> bool:
        """Whether the process has exited or is exiting. A pidfd polls
        readable only once the exit is done, after the process has lost
        its mm; meanwhile each of its threads has PF_EXITING in its flags.
        False once the pidfd is taken."""
        if self.pidfd < 0:
            return False
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        # (not exited yet, so the pid is still this process's)
        return bool(poller.poll(0)) or procmem.exiting(self.pid)

    def take_pidfd(self) -> int:
        """The pidfd, now owned by the caller."""
        fd, self.pidfd = self.pidfd, -1
        return fd


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise Refused(f"SO_PEERPIDFD: {exc.strerror}") from None
        # Kernels before 6.5: the pid may have been reused since connect();
        # the credential checks below then see the other process's ids.
        pidfd = procmem.pidfd_open(pid)
    return Peer(pid, uid, gid, pidfd)


def process_info(pidfd: int) -> ProcessInfo:
    buf = bytearray(PIDFD_INFO.size)
    struct.pack_into("<Q", buf, 0, PIDFD_INFO_PID | PIDFD_INFO_CREDS)
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, buf)
    except ProcessLookupError:
        raise TargetGone("process is gone") from None
    _, _, pid, _tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid, _ = PIDFD_INFO.unpack(buf)
    return ProcessInfo(pid, ppid, (ruid, euid, suid, fsuid), (rgid, egid, sgid, fsgid))


def check_process(pidfd: int, pid: int, uid: int, gid: int) -> ProcessInfo:
    """Refused unless the pidfd's process is `pid`, runs with only `uid`
    and `gid`, and is dumpable."""
    try:
        owner = os.stat(f"/proc/{pid}/status").st_uid
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone(f"process {pid} is gone", pid=pid) from None
    info = process_info(pidfd)  # after the stat: the process is still alive, so it was this one
    if info.pid != pid:
        raise Refused(f"pidfd names pid {info.pid}, not {pid}")
    if set(info.uids) != {uid} or set(info.gids) != {gid}:
        raise Refused(f"process ids (uid {'/'.join(map(str, info.uids))}, gid "
                      f"{'/'.join(map(str, info.gids))}) are not the connection's {uid}/{gid}")
    if owner != uid:
        raise Refused("process is not dumpable (setuid, setgid or PR_SET_DUMPABLE 0)")
    return info


class Memory:
    """A process's memory as the daemon may touch it: /proc/PID/mem and
    /proc/PID/maps opened together, before the process's ids are checked,
    so both hold an mm that belonged to a checked process."""

    def __init__(self, pidfd: int, pid: int, uid: int, gid: int):
        self.pid = pid
        self.mem_fd = procmem.open_mem(pid)
        try:
            self._maps_fd = os.open(f"/proc/{pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(self.mem_fd)
            raise TargetGone(f"process {pid} is gone", pid=pid) from None
        try:
            self.info = check_process(pidfd, pid, uid, gid)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self.mem_fd, self._maps_fd):
            if fd >= 0:
                os.close(fd)
        self.mem_fd = self._maps_fd = -1

    def take_mem_fd(self) -> int:
        """/proc/PID/mem, now owned by the caller (the maps file is closed)."""
        fd, self.mem_fd = self.mem_fd, -1
        self.close()
        return fd

    def private_anonymous(self, addr: int) -> bool:
        """Whether addr lies in a private anonymous mapping of the mm: a page
        only that mm can hold (a shared or file page could be filled
        through another process's mapping)."""
        os.lseek(self._maps_fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(self._maps_fd), "rb") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in fields[0].split(b"-"))
                if lo <= addr < hi:
                    path = fields[5].strip() if len(fields) > 5 else b""
                    return (fields[1][3:4] == b"p" and fields[3] == b"00:00" and fields[4] == b"0"
                            and (not path.startswith(b"/")))
        return False

    def prove_uffd(self, uffd: uffdmod.Userfaultfd, probe: int, registered: bool = False,
                   events_pending_ok: bool = False) -> None:
        """Refused unless `uffd` belongs to this mm: a random value
        UFFDIO_COPY'd at `probe` (an untouched private anonymous page the
        shim set aside) must read back through /proc/PID/mem. `registered`:
        the uffd already covers the page (a forked child's inherited range),
        so it is neither registered nor unregistered here.
        `events_pending_ok`: a uffd whose COPY answers EAGAIN (events wait
        to be read) passes unproven (a daemon taking a process back)."""
        if not probe or probe % PAGE_SIZE:
            raise Refused(f"bad probe page address {probe:#x}")
        if not self.private_anonymous(probe):
            raise Refused(f"probe page {probe:#x} is not private anonymous memory of the process")
        if not registered:
            try:
                uffd.register(probe, PAGE_SIZE, uffdmod.UFFDIO_REGISTER_MODE_MISSING)
            except OSError as exc:
                raise Refused(f"the uffd cannot register the probe page ({exc.strerror or exc})") from None
        token = secrets.token_bytes(PROBE_TOKEN_BYTES)
        try:
            source = PageBuffer(1)
            source.bytes[:len(token)] = np.frombuffer(token, np.uint8)
            _, err = uffd.copy(probe, source.addr, PAGE_SIZE)
            source.close()
            if err == errno.EAGAIN and events_pending_ok:
                return
            if err:
                raise Refused(f"probe page cannot be filled ({errno.errorcode.get(err, err)})")
            try:
                seen = os.pread(self.mem_fd, len(token), probe)
            except OSError:
                seen = b""
        finally:
            if not registered:
                try:
                    uffd.unregister(probe, PAGE_SIZE)
                except OSError:
                    pass
        if seen != token:
            raise Refused("the userfaultfd does not belong to the process that connected")
