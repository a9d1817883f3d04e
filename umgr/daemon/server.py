"""The umgr daemon: control socket, targets, and their life cycle.

One trio run. The control server accepts shims on a SOCK_SEQPACKET socket
(0600, or 0660 with a group), identifies peers with SO_PEERCRED and turns each
valid HELLO into a Target. A malformed message, a missing or wrong
descriptor, an unknown policy name, a second HELLO, or no first message within
HELLO_TIMEOUT drops that connection only, with one log line (text that comes
from a peer, such as a command line, is escaped so it cannot forge lines).
"""
from __future__ import annotations

import errno
import grp
import json
import logging
import os
import signal
import socket
import struct
from dataclasses import dataclass, field

import numpy as np
import trio

from umgr.kernel import maps, procmem, uffd as uffdmod
from umgr import protocol
from umgr.backends import Backend
from umgr.errors import TargetGone, UmgrError
from umgr.paging.pagetable import NO_SLOT, PAGE_SHIFT, PAGE_SIZE, State
from umgr.policies import GuardedEviction, GuardedPrefetch, load_eviction, load_prefetch
from umgr.paging.target import Target, read_cmdline
from umgr.paging.tuning import KEEP_CLEAN_COPIES
from umgr.paging.zap import AgentZapper, RemoteZapper

log = logging.getLogger("umgr.daemon")

API_FEATURES = (uffdmod.UFFD_FEATURE_PAGEFAULT_FLAG_WP | uffdmod.ALL_EVENTS
                | uffdmod.UFFD_FEATURE_THREAD_ID)
MSG_MAX = 4096
STATUS_REQUEST = b"STATUS"
CHILD_HELLO_WAIT = 10.0
HELLO_TIMEOUT = 5.0     # seconds a new connection may take to send its first message


@dataclass
class DaemonConfig:
    socket_path: str
    max_resident: int = 0                # bytes per target; 0: no limit
    min_region: int = 1 << 20
    policy: str = "readahead"
    eviction: str = "fifo"
    scan_interval: float = 0.05          # seconds between /proc/PID/maps scans
    zap_mode: protocol.ZapMode = protocol.ZapMode.AGENT
    group: str | None = None
    hello_timeout: float = HELLO_TIMEOUT  # drop a connection silent for this long
    keep_clean: bool = KEEP_CLEAN_COPIES  # prefetched pages keep their swap copy until written


SUMMED = ("faults", "faults_missing", "faults_wp", "pages_in", "pages_out", "prefetched",
          "zero_pages_out", "zero_mapped", "shared_skipped", "locked_pinned",
          "zap_batches", "zap_ranges", "app_removes", "unmaps", "remaps", "forks",
          "hint_cold", "hint_willneed", "hint_discardable", "cold_evicted", "willneed_in", "discarded")


@dataclass
class Totals:
    """Figures summed over targets, kept when targets are gone."""
    counters: dict = field(default_factory=dict)

    def add(self, snapshot: dict) -> None:
        for key in SUMMED:
            self.counters[key] = self.counters.get(key, 0) + snapshot[key]
        peak = max(self.counters.get("peak_resident_bytes", 0), snapshot["peak_resident_bytes"])
        self.counters["peak_resident_bytes"] = peak


class Daemon:
    def __init__(self, config: DaemonConfig, backend: Backend):
        self.config = config
        self.backend = backend
        self.targets: dict[int, Target] = {}
        self.totals = Totals()
        self.targets_seen = 0
        self.rejected_connections = 0
        self.internal_errors = 0          # targets killed because serving them failed
        self._children_waiting: dict[int, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self.idle = trio.Event()       # set whenever no target is left
        self.idle.set()

    # ---- server ------------------------------------------------------------
    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = self._listen()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._connection, conn)
            finally:
                listener.close()
                nursery.cancel_scope.cancel()

    def _listen(self) -> trio.socket.SocketType:
        path = self.config.socket_path
        if os.path.exists(path):
            os.unlink(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old_umask = os.umask(0o177)
        try:
            sock._sock.bind(path)
        finally:
            os.umask(old_umask)
        if self.config.group:
            os.chown(path, -1, grp.getgrnam(self.config.group).gr_gid)
            os.chmod(path, 0o660)
        sock.listen(128)
        log.info("listening on %s", path)
        return sock

    async def _connection(self, conn) -> None:
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        fds: list[int] = []
        target = None
        try:
            with trio.move_on_after(self.config.hello_timeout) as waiting:
                data, fds = await _recv_with_fds(conn)
            if waiting.cancelled_caught:
                raise protocol.ProtocolError(f"no first message within {self.config.hello_timeout:g} s")
            if data == STATUS_REQUEST:
                await conn.send(json.dumps(self.status()).encode())
                return
            hello = protocol.decode_control(data)
            if not isinstance(hello, protocol.Hello):
                raise protocol.ProtocolError(f"first message must be HELLO, got {type(hello).__name__}")
            if hello.pid != pid:
                raise protocol.ProtocolError(f"HELLO claims pid {hello.pid}, peer is pid {pid}")
            target = await self._attach(hello, fds, conn)
            if target is not None:
                await self._control_loop(target, conn)
        except (protocol.ProtocolError, UmgrError, OSError) as exc:
            self.rejected_connections += 1
            log.warning("control: pid %d: %s; dropping connection", pid, printable(str(exc)))
        except Exception:
            # A bug met on one connection drops that connection, never the
            # daemon and every target it serves.
            self.internal_errors += 1
            log.exception("control: pid %d: internal error; dropping connection", pid)
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    async def _control_loop(self, target: Target, conn) -> None:
        while not target.gone:
            data, fds = await _recv_with_fds(conn)
            for fd in fds:
                os.close(fd)
            if not data:
                return
            if fds:
                raise protocol.ProtocolError("unexpected descriptors after HELLO")
            msg = protocol.decode_control(data)
            if isinstance(msg, protocol.Hello):
                raise protocol.ProtocolError("second HELLO on one connection")
            status = await self._request(target, msg)
            await conn.send(protocol.encode_ack(status))

    async def _request(self, target: Target, msg) -> int:
        if isinstance(msg, protocol.Region):
            if msg.length >= self.config.min_region and not target.gone:
                return 0 if target.register(msg.start, msg.length) else errno.EINVAL
            return 0
        if isinstance(msg, protocol.Forked):
            return self._adopt_child(target, msg.child_pid)
        if isinstance(msg, protocol.Advise):
            return await self._advise(target, msg)
        return errno.EINVAL

    async def _advise(self, target: Target, msg: protocol.Advise) -> int:
        """umgr_advise(): 0, or an errno as madvise(2) would set it: EINVAL
        for an unknown advice, an unaligned start or a range that wraps;
        ENOMEM when part of the range is not managed (the hint still applies
        to the managed part). The ACK goes back once the hint has taken
        effect (DISCARDABLE) or been queued (COLD, WILLNEED: they run in the
        background)."""
        if not isinstance(msg.advice, protocol.Advice):
            return errno.EINVAL
        if msg.start & (PAGE_SIZE - 1) or msg.start + msg.length > 1 << 64:
            return errno.EINVAL
        if msg.length == 0:
            return 0
        lo, hi = msg.start >> PAGE_SHIFT, (msg.start + msg.length + PAGE_SIZE - 1) >> PAGE_SHIFT
        gaps = target.pt.gaps(lo, hi)
        if gaps:  # malloc'd memory may not have been found yet: look now
            try:
                for start, end in maps.anonymous_private(target.pid, self.config.min_region):
                    if start < hi << PAGE_SHIFT and end > lo << PAGE_SHIFT:
                        target.register(start, end - start)
            except (OSError, TargetGone):
                return errno.ESRCH
            gaps = target.pt.gaps(lo, hi)
            if gaps == [(lo, hi)]:
                return errno.ENOMEM  # nothing of it is managed
        await target.advise(lo, hi, msg.advice)
        return errno.ENOMEM if gaps else 0

    # ---- targets -------------------------------------------------------------
    async def _attach(self, hello: protocol.Hello, fds: list[int], conn) -> Target:
        if len(fds) == 1:
            return await self._attach_child(hello, fds, conn)
        if len(fds) != 2:
            raise protocol.ProtocolError(f"HELLO must carry 2 descriptors (agent socket, uffd), got {len(fds)}")
        # The HELLO's options are checked before anything is acquired; until
        # the target starts, whatever was received stays in `fds`, which the
        # caller closes if this raises.
        label = f"pid {hello.pid}"
        prefetch = self._prefetch(hello.policy, label)
        agent_fd, uffd_fd = fds
        _require_uffd(uffd_fd)
        _require_socket(agent_fd)
        uffd = uffdmod.Userfaultfd(uffd_fd)
        fds.remove(uffd_fd)  # owned by `uffd` now
        pidfd = -1
        try:
            try:
                features = uffd.api(API_FEATURES)
            except OSError as exc:
                raise protocol.ProtocolError(f"UFFDIO_API on the received uffd failed: {exc}") from exc
            old = self.targets.get(hello.pid)
            if old is not None:  # the program exec'd and its new shim says hello
                old.stop()
                await self._wait_released(hello.pid)
            pidfd = procmem.pidfd_open(hello.pid)
            target = self._new_target(hello.pid, uffd, pidfd, hello.max_resident, prefetch)
        except BaseException:
            uffd.close()
            if pidfd >= 0:
                os.close(pidfd)
            raise
        fds.remove(agent_fd)
        target.zapper = self._zapper(target, agent_fd)
        try:
            for lo, hi in maps.anonymous_private(hello.pid, self.config.min_region):
                target.register(lo, hi - lo)
            await conn.send(protocol.encode_hello_ack(0, self.config.zap_mode, features))
        except BaseException:
            target.gone = True
            raise
        finally:
            self._start(target)
        log.info("%s: attached (%s), budget %s, policy %s", target.label, printable(target.command),
                 _size(target.budget_pages << PAGE_SHIFT), target.prefetch.name)
        return target

    def _prefetch(self, name: str, label: str) -> GuardedPrefetch:
        """The prefetch policy a HELLO asks for (empty: the daemon's); a name
        that does not load is a bad HELLO, not the daemon's end."""
        name = name or self.config.policy
        try:
            return GuardedPrefetch(load_prefetch(name), target=label)
        except Exception as exc:
            raise protocol.ProtocolError(f"policy {name!r} does not load: {exc}") from exc

    def _zapper(self, target: Target, agent_fd: int):
        agent = socket.socket(fileno=agent_fd)
        if self.config.zap_mode == protocol.ZapMode.REMOTE:
            agent.close()
            return RemoteZapper(target.pidfd)
        return AgentZapper(agent)

    def _new_target(self, pid: int, uffd, pidfd: int, max_resident: int, prefetch: GuardedPrefetch) -> Target:
        budget = max_resident or self.config.max_resident
        label = prefetch.target
        target = Target(pid=pid, uffd=uffd, pidfd=pidfd, budget_pages=budget >> PAGE_SHIFT,
                        backend=self.backend, prefetch=prefetch, eviction=None, label=label,
                        keep_clean=self.config.keep_clean)
        # FIFO compacts its queue of stale entries with the page table's help.
        options = {"is_live": target.is_resident} if self.config.eviction == "fifo" else {}
        policy_obj = load_eviction(self.config.eviction, **options)
        target.eviction = GuardedEviction(policy_obj, target=label, resident=target.resident_vpns)
        return target

    def _start(self, target: Target) -> None:
        self.targets[target.pid] = target
        self.targets_seen += 1
        self.idle = trio.Event() if self.idle.is_set() else self.idle
        self._nursery.start_soon(self._run_target, target)

    async def _run_target(self, target: Target) -> None:
        try:
            async with trio.open_nursery() as nursery:
                target.cancel_scope = nursery.cancel_scope

                async def until_gone(fn):
                    try:
                        await fn()
                    finally:
                        nursery.cancel_scope.cancel()
                nursery.start_soon(until_gone, target.fault_loop)
                nursery.start_soon(until_gone, target.evictor)
                nursery.start_soon(until_gone, lambda: self._watch_exit(target))
                nursery.start_soon(self._scan_maps, target)
                nursery.start_soon(self._watch_slots, target)
        except Exception:
            # A bug met while serving one target must not take the others
            # down. That target cannot be served correctly any more: once its
            # uffd is closed its swapped pages would read as zeros, so it is
            # killed rather than left running on wrong data.
            log.exception("%s: internal error; killing the target (its swapped pages cannot be served)",
                          target.label)
            self.internal_errors += 1
            try:
                procmem.pidfd_send_signal(target.pidfd, signal.SIGKILL)
            except (OSError, TargetGone):
                pass
        self._release(target)

    async def _watch_exit(self, target: Target) -> None:
        while not target.gone:
            with trio.move_on_after(0.5):
                await trio.lowlevel.wait_readable(target.pidfd)
                return  # the process exited
            if target.gone:
                return

    async def _scan_maps(self, target: Target) -> None:
        """Register anonymous memory the shim did not report (malloc, brk)."""
        while not target.gone:
            await trio.sleep(self.config.scan_interval)
            try:
                for lo, hi in maps.anonymous_private(target.pid, self.config.min_region):
                    target.register(lo, hi - lo)
                target.recheck()
            except (OSError, TargetGone):
                return

    async def _watch_slots(self, target: Target) -> None:
        """A target paused on a full backend resumes once slots free up."""
        while not target.gone:
            await trio.sleep(0.1)
            if target.eviction_paused and self.backend.slots.free_count > 0:
                target.resume_eviction()

    def _release(self, target: Target) -> None:
        snapshot = target.snapshot()
        target.release_all()
        self.totals.add(snapshot)
        os.close(target.pidfd)
        if self.targets.get(target.pid) is target:
            del self.targets[target.pid]
        log.info("%s: released (faults %d, pages in %d, out %d)", target.label, snapshot["faults"],
                 snapshot["pages_in"], snapshot["pages_out"])
        if not self.targets:
            self.idle.set()

    async def _wait_released(self, pid: int) -> None:
        with trio.move_on_after(5):
            while pid in self.targets:
                await trio.sleep(0.01)

    # ---- fork ------------------------------------------------------------------
    def _adopt_child(self, parent: Target, child_pid: int) -> int:
        """The parent reports a child: pair it with the oldest fork event."""
        if not parent.fork_events:
            # No registered range at fork time: the kernel sends no fork
            # event, and the child's shim attaches with a uffd of its own.
            self._fork_reported(child_pid)
            return errno.ENOENT
        self._fork_reported(child_pid)
        label = f"pid {child_pid}"
        try:  # a plug-in's class name may not be its entry-point name
            prefetch = self._prefetch(parent.prefetch.name, label)
        except protocol.ProtocolError as exc:
            log.warning("%s: %s; it runs without prefetch", label, exc)
            prefetch = self._prefetch("none", label)
        uffd = parent.fork_events.pop(0)
        try:
            pidfd = procmem.pidfd_open(child_pid)
        except OSError as exc:  # the child is already gone
            uffd.close()
            return exc.errno or errno.ESRCH
        child = self._new_target(child_pid, uffd, pidfd, parent.budget_pages << PAGE_SHIFT, prefetch)
        _inherit_pages(parent, child)
        self._start(child)
        log.info("%s: forked %s", parent.label, child.label)
        return 0

    def _fork_reported(self, child_pid: int) -> None:
        self._children_waiting.setdefault(child_pid, trio.Event()).set()

    async def _attach_child(self, hello: protocol.Hello, fds: list[int], conn) -> Target | None:
        """A forked child's shim brings its agent socket; its uffd came with
        the fork event, which its parent reports (FORKED) right after fork.
        Without one, the child is told to attach with a uffd of its own."""
        _require_socket(fds[0])
        with trio.move_on_after(CHILD_HELLO_WAIT):
            await self._children_waiting.setdefault(hello.pid, trio.Event()).wait()
        self._children_waiting.pop(hello.pid, None)
        target = self.targets.get(hello.pid)
        if target is None or target.zapper is not None:
            os.close(fds.pop())
            await conn.send(protocol.encode_hello_ack(errno.ENOENT, self.config.zap_mode, 0))
            return None
        target.zapper = self._zapper(target, fds.pop())
        target.command = read_cmdline(hello.pid)
        await conn.send(protocol.encode_hello_ack(0, self.config.zap_mode, target.uffd.features))
        return target

    # ---- status ------------------------------------------------------------------
    def status(self) -> dict:
        return {
            "targets": [t.snapshot() for t in self.targets.values()],
            "backend": self.backend.statistics(),
            "targets_seen": self.targets_seen,
            "rejected_connections": self.rejected_connections,
            "internal_errors": self.internal_errors,
        }

    def run_totals(self) -> dict:
        totals = Totals(dict(self.totals.counters))
        for target in self.targets.values():
            totals.add(target.snapshot())
        return totals.counters


def _inherit_pages(parent: Target, child: Target) -> None:
    """A forked child starts with its parent's pages: swapped pages share the
    parent's slots (one more reference each); pages in an eviction batch are
    resident in the child (still present there, or, if the zap came first,
    swapped in the shared slot)."""
    child.pt = parent.pt.copy()
    for region in child.pt.regions:
        region.flags[:] = 0  # application hints are the parent's
        evicting = region.state == State.EVICTING
        zapping = region.state == State.ZAPPING
        region.state[evicting] = State.RESIDENT
        region.state[zapping] = np.where(region.slot[zapping] == NO_SLOT, State.FRESH, State.SWAPPED)
    child.pt.counts[:] = 0
    for region in child.pt.regions:
        child.pt._count_in(region.state)
    child.backend.slots.incref(child.pt.all_slots())
    child.eviction.on_resident(child.resident_vpns())


async def _recv_with_fds(conn) -> tuple[bytes, list[int]]:
    data, ancdata, flags, _ = await conn.recvmsg(MSG_MAX, socket.CMSG_SPACE(4 * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise protocol.ProtocolError("message or descriptors truncated")
    return data, fds


def _require_uffd(fd: int) -> None:
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise protocol.ProtocolError(f"bad descriptor: {exc}") from exc
    if kind != "anon_inode:[userfaultfd]":
        raise protocol.ProtocolError(f"descriptor is {kind}, not a userfaultfd")


def _require_socket(fd: int) -> None:
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise protocol.ProtocolError(f"bad descriptor: {exc}") from exc
    if not kind.startswith("socket:"):
        raise protocol.ProtocolError(f"agent descriptor is {kind}, not a socket")


def printable(text: str) -> str:
    """Text from a target (a command line, a file name) fit for one log line
    or table row: characters that are not printable (newlines, escapes, other
    control and format characters) become repr-style escapes such as \\n,
    \\x1b or \\u202e; everything else, accented letters included, stays."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _size(nbytes: int) -> str:
    if not nbytes:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)
