"""The control socket server: accept, identify the peer, dispatch messages.

Shims connect on a SOCK_SEQPACKET socket (0600, or 0660 with a group); the
peer is identified with SO_PEERCRED and a pidfd taken at connect, its
process and uffd are checked (umgr/daemon/peer.py), and a valid HELLO
becomes a target (umgr/daemon/lifecycle.py). A malformed message, a missing or wrong
descriptor, an unknown policy name, a second HELLO, or no first message
within HELLO_TIMEOUT drops that connection only, with one log line (text
that comes from a peer, such as a command line, is escaped so it cannot
forge lines).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import resource
import socket
import struct

import trio

from umgr import cpuclock, protocol
from umgr.backends import Backend
from umgr.daemon.config import HELLO_TIMEOUT, DaemonConfig
from umgr.daemon.forks import Orphan
from umgr.daemon.lifecycle import Lifecycle
from umgr.daemon.listener import ControlSocket
from umgr.daemon.peer import Memory, Peer, Refused, peer_of
from umgr.daemon.status import snapshot
from umgr.errors import TargetGone, UmgrError
from umgr.kernel import procmem
from umgr.kernel import uffd as uffdmod
from umgr.paging.budget import MIN_BUDGET_BYTES
from umgr.paging.pagetable import PAGE_SHIFT, PAGE_SIZE
from umgr.paging.target import Target, read_cmdline

__all__ = ["BUDGET_REQUEST", "Daemon", "DaemonConfig", "HELLO_TIMEOUT", "STATUS_REQUEST", "printable"]

log = logging.getLogger("umgr.daemon")

API_FEATURES = (uffdmod.UFFD_FEATURE_PAGEFAULT_FLAG_WP | uffdmod.ALL_EVENTS
                | uffdmod.UFFD_FEATURE_THREAD_ID)
MSG_MAX = 4096
# Open connections (one per attached process, plus those not past HELLO):
# a flood of silent connections from one user meets its cap, not the
# daemon's descriptor limit (raised at start, raise_fd_limit(); the caps
# shrink to what that limit leaves room for).
MAX_CONNECTIONS = 4096
MAX_CONNECTIONS_PER_UID = 512
# Descriptors a connection may hold: its socket, the peer's pidfd and up to
# four received (a pending one); or socket, pidfd, uffd, /proc/PID/mem and
# agent socket, plus a /proc file opened for a moment (an attached one).
FDS_PER_CONNECTION = 8
FD_RESERVE = 64          # for the backend, metrics, logs and /proc reads
ACCEPT_RETRY = 0.1       # seconds to wait when accept() finds no descriptor left
STATUS_REQUEST = b"STATUS"
# A STATUS reply goes in messages of at most this many bytes, the connection
# closed after the last: one SEQPACKET message may be no larger than the
# socket's send buffer (about 208 KiB by default: some 120 targets).
REPLY_PART = 64 << 10
COMMAND_READ_SECONDS = 1.0   # a STATUS waits this long at most for the targets' command lines
# `umgr budget`: this, then JSON {"pid": PID, "bytes": BUDGET} (0: the
# daemon's --max-resident, or none). The reply is JSON: the target's new
# and old budget, or {"error": why}.
BUDGET_REQUEST = b"BUDGET "


class Daemon:
    def __init__(self, config: DaemonConfig, backend: Backend, trace=None, state=None, on_crash: str = ""):
        """`trace`: a umgr.trace.TraceWriter recording every target's faults.
        `state`: a umgr.daemon.statedir.StateDir (tables persist, and a
        dead daemon's targets may come back), or None. `on_crash`: what
        becomes of the targets if this daemon dies, for `umgr status`."""
        self.config = config
        self.on_crash = on_crash
        self.backend = backend
        self.lifecycle = Lifecycle(config, backend, trace, state)
        self.rejected_connections = 0
        self._open: dict = {}                  # connections being served: their peer's uid
        self._open_by_uid: dict[int, int] = {}
        self.max_connections = MAX_CONNECTIONS   # lowered by serve() to fit the descriptor limit
        self.max_per_uid = MAX_CONNECTIONS_PER_UID
        self.internal_errors_on_connections = 0
        self.stopping = False    # a clean stop is under way: no new process is taken (forked children are)

    # ---- what callers read ----------------------------------------------------
    @property
    def targets(self) -> dict[int, Target]:
        return self.lifecycle.targets

    @property
    def idle(self) -> trio.Event:
        return self.lifecycle.idle

    @property
    def targets_seen(self) -> int:
        return self.lifecycle.targets_seen

    @property
    def internal_errors(self) -> int:
        return self.lifecycle.internal_errors + self.internal_errors_on_connections

    def visible_targets(self, uid: int = 0) -> list[Target]:
        """Root sees every target; another user only their own."""
        return [t for t in self.targets.values() if uid == 0 or t.owner_uid == uid]

    def status(self, uid: int = 0) -> dict:
        return {
            "targets": [snapshot(t) for t in self.visible_targets(uid)],
            "backend": self.backend.statistics(),
            "targets_seen": self.targets_seen,
            "rejected_connections": self.rejected_connections,
            "internal_errors": self.internal_errors,
            "on_crash": self.on_crash,
        }

    def set_budget(self, request: bytes, peer: Peer) -> dict:
        """A BUDGET request: root may set any budget of any target; another
        user only their own processes', up to --max-resident (a HELLO's
        cap). Raises ProtocolError for a malformed request."""
        try:
            fields = json.loads(request)
            pid, budget = fields["pid"], fields["bytes"]
        except (ValueError, TypeError, KeyError):
            raise protocol.ProtocolError("malformed BUDGET request") from None
        if not (type(pid) is int and type(budget) is int and 0 <= budget < 1 << 63):
            raise protocol.ProtocolError("malformed BUDGET request: pid and bytes must be integers, "
                                         "0 <= bytes < 2**63")
        target = self.targets.get(pid)
        if target is None or target.gone or (peer.uid != 0 and target.owner_uid != peer.uid):
            if target is not None and not target.gone:
                log.warning("control: %s: refused: a new budget for pid %d, not theirs", peer.name, pid)
            return {"error": f"pid {pid} is not a process of yours that this daemon manages"}
        if self.stopping:
            return {"error": "the daemon is stopping: its processes go on unmanaged"}
        if 0 < budget < MIN_BUDGET_BYTES:
            return {"error": f"a budget is at least {_size(MIN_BUDGET_BYTES)}, or 0 for the daemon's"}
        cap = self.config.max_resident
        budget = (budget or cap) >> PAGE_SHIFT << PAGE_SHIFT
        if cap and peer.uid != 0 and budget > cap:
            return {"error": f"the daemon's --max-resident caps budgets at {_size(cap)}"}
        was = target.budget_pages << PAGE_SHIFT
        self.lifecycle.set_budget(target, budget)
        log.info("%s: budget %s (was %s), set by %s", target.label, _size(budget), _size(was), peer.name)
        return {"pid": pid, "budget_bytes": budget, "was_bytes": was,
                "resident_bytes": target.core.pt.resident << PAGE_SHIFT}

    def run_totals(self) -> dict:
        return self.lifecycle.run_totals()

    # ---- server ---------------------------------------------------------------
    async def serve(self, *, control: ControlSocket | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. `control`: the socket to serve (made from
        the config if None); its file is removed on the way out."""
        cpuclock.install()
        fd_limit = raise_fd_limit()
        self.max_connections = min(MAX_CONNECTIONS, max(1, (fd_limit - FD_RESERVE) // FDS_PER_CONNECTION))
        self.max_per_uid = min(MAX_CONNECTIONS_PER_UID, self.max_connections)
        if control is None:
            control = ControlSocket(self.config.socket_path, self.config.group)
        log.info("listening on %s", self.config.socket_path)
        listener = trio.socket.from_stdlib_socket(control.sock)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.lifecycle.run)
                task_status.started()
                try:
                    while True:
                        conn = await self._accept(listener)
                        if conn is not None:
                            nursery.start_soon(self._connection, conn)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            control.close()  # removes the socket file, if it is still ours

    async def _accept(self, listener):
        """The next connection, or None when it was refused: over the caps
        on open connections (per uid and in all), or no descriptor left
        (EMFILE, ENFILE: the daemon waits a little and goes on, its
        targets are not touched)."""
        try:
            conn, _ = await listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            self.rejected_connections += 1
            log.warning("control: accept: %s; new connections wait", exc.strerror)
            await trio.sleep(ACCEPT_RETRY)
            return None
        uid = _peer_uid(conn)
        over = None
        if len(self._open) >= self.max_connections:
            over = f"{self.max_connections} connections open"
        elif uid != 0 and self._open_by_uid.get(uid, 0) >= self.max_per_uid:
            over = f"{self.max_per_uid} connections of this uid open"
        if over:
            self.rejected_connections += 1
            log.warning("control: %s: %s; dropping connection", _name(None, conn), over)
            conn.close()
            return None
        self._open[conn] = uid
        self._open_by_uid[uid] = self._open_by_uid.get(uid, 0) + 1
        return conn

    def _closed(self, conn) -> None:
        uid = self._open.pop(conn)
        left = self._open_by_uid[uid] - 1
        if left:
            self._open_by_uid[uid] = left
        else:
            del self._open_by_uid[uid]

    async def _connection(self, conn) -> None:
        fds: list[int] = []
        peer = None
        try:
            peer = peer_of(conn)
            with trio.move_on_after(self.config.hello_timeout) as waiting:
                data, fds = await _recv_with_fds(conn)
            if waiting.cancelled_caught:
                raise protocol.ProtocolError(f"no first message within {self.config.hello_timeout:g} s")
            if not data and not fds:
                # Closed unheard: a probe for a live daemon (a second one
                # starting at this socket does it), or a client that gave up.
                log.debug("control: %s: closed before its first message", _name(peer, conn))
                return
            if data == STATUS_REQUEST:
                peer.close()  # before the reply: a client that has it sees no pidfd held for it
                await refresh_commands(self.visible_targets(peer.uid))
                await _send_in_parts(conn, json.dumps(self.status(peer.uid)).encode())
                return
            if data.startswith(BUDGET_REQUEST):
                reply = self.set_budget(data[len(BUDGET_REQUEST):], peer)
                peer.close()
                await conn.send(json.dumps(reply).encode())
                return
            hello = protocol.decode_control(data)
            if not isinstance(hello, protocol.Hello):
                raise protocol.ProtocolError(f"first message must be HELLO, got {type(hello).__name__}")
            if hello.pid != peer.pid:
                raise protocol.ProtocolError(f"HELLO claims pid {hello.pid}, peer is pid {peer.pid}")
            target = await self._attach(hello, fds, conn, peer)
            if target is not None:
                await self._control_loop(target, conn, peer)
        except (protocol.ProtocolError, UmgrError, OSError) as exc:
            if peer is not None and peer.ended():
                # Killed or exited while it attached (a program's children
                # killed as they fork, as strace does with its probes): the
                # checks then fail for want of a process, nothing was refused.
                log.info("control: %s: ended while it attached (%s)", _name(peer, conn), printable(str(exc)))
                return
            self.rejected_connections += 1
            log.warning("control: %s: %s; dropping connection", _name(peer, conn), printable(str(exc)))
        except Exception:
            # A bug met on one connection drops that connection, never the
            # daemon and every target it serves.
            self.internal_errors_on_connections += 1
            log.exception("control: %s: internal error; dropping connection", _name(peer, conn))
        finally:
            for fd in fds:
                os.close(fd)
            if peer is not None:
                peer.close()
            conn.close()
            self._closed(conn)

    async def _control_loop(self, target: Target, conn, peer: Peer) -> None:
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
            status = await self._request(target, msg, peer)
            await conn.send(protocol.encode_ack(status))

    async def _request(self, target: Target, msg, peer: Peer) -> int:
        if isinstance(msg, protocol.Region):
            wanted = msg.length >= target.smallest_region(self.config.min_region) or target.extends_managed(msg.start, msg.length)
            if wanted and not target.gone:
                return 0 if target.register(msg.start, msg.length) else errno.EINVAL
            return 0
        if isinstance(msg, protocol.Forked):
            if msg.child_pid == 0:
                target.drop_unnamed_forks()
                return 0
            return self.lifecycle.adopt_child(target, msg.child_pid, peer.name)
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
        if gaps:  # malloc'd memory may not have been found yet: look (once a look is not too dear)
            try:
                await self.lifecycle.look_for_new_memory(target)
            except (OSError, TargetGone):
                return errno.ESRCH
            gaps = target.pt.gaps(lo, hi)
            if gaps == [(lo, hi)]:
                return errno.ENOMEM  # nothing of it is managed
        await target.advise(lo, hi, msg.advice)
        return errno.ENOMEM if gaps else 0

    # ---- attaching --------------------------------------------------------------
    async def _attach(self, hello: protocol.Hello, fds: list[int], conn, peer: Peer) -> Target | None:
        if len(fds) == 1:
            return await self._attach_child(hello, fds, conn, peer)
        if len(fds) != 2:
            raise protocol.ProtocolError(f"HELLO must carry 2 descriptors (agent socket, uffd), got {len(fds)}")
        if hello.flags & protocol.HELLO_RESUME:
            return await self._resume(hello, fds, conn, peer)
        if self.stopping:
            await self._refuse_while_stopping(hello, conn)
            return None
        # The HELLO's options are checked before anything is acquired; until
        # the target starts, whatever was received stays in `fds`, which the
        # caller closes if this raises.
        prefetch = self.lifecycle.prefetch(hello.policy, f"pid {hello.pid}")
        agent_fd, uffd_fd = fds
        _require_uffd(uffd_fd)
        _require_socket(agent_fd)
        uffd = uffdmod.Userfaultfd(uffd_fd)
        fds.remove(uffd_fd)  # owned by `uffd` now
        try:
            features = _api(uffd)
            memory = Memory(peer.pidfd, peer.pid, peer.uid, peer.gid)
            try:
                memory.prove_uffd(uffd, hello.probe)
            except BaseException:
                memory.close()
                raise
            target = await self.lifecycle.create(peer, memory.take_mem_fd(), uffd, hello.max_resident, prefetch,
                                                 hello.name)
        except BaseException:
            uffd.close()
            raise
        fds.remove(agent_fd)
        target.read_with_canary(hello.probe)
        target.attach_zapper(self.lifecycle.zapper(target, agent_fd))
        try:
            self.lifecycle.register_found(target)
            await conn.send(protocol.encode_hello_ack(0, self.config.zap_mode, features, self.config.grace_seconds))
        except BaseException:
            target.mark_gone()
            raise
        finally:
            self.lifecycle.start(target)
        log.info("%s: attached (%s), budget %s, policy %s", target.label, printable(target.command),
                 _size(target.budget_pages << PAGE_SHIFT), target.prefetch.name)
        return target

    async def _resume(self, hello: protocol.Hello, fds: list[int], conn, peer: Peer) -> Target | None:
        """A process whose daemon died asks to be taken back with the uffd
        that daemon set up. Only a process whose saved state is here, with
        the same pid, start time and ids, is (ESTALE otherwise: its shim
        kills it, its swapped pages being nowhere)."""
        prefetch = self.lifecycle.prefetch(hello.policy, f"pid {hello.pid}")
        agent_fd, uffd_fd = fds
        _require_uffd(uffd_fd)
        _require_socket(agent_fd)
        uffd = uffdmod.Userfaultfd(uffd_fd)
        fds.remove(uffd_fd)
        try:
            memory = Memory(peer.pidfd, peer.pid, peer.uid, peer.gid)
            try:
                # Events the dead daemon left unread (a zap's REMOVE, an
                # munmap) make the probe's UFFDIO_COPY answer EAGAIN until
                # this daemon reads them: then the process is known by its
                # pidfd, start time and ids alone, and a uffd that is not its
                # own could only be one it may already write through.
                memory.prove_uffd(uffd, hello.probe, events_pending_ok=True)
            except BaseException:
                memory.close()
                raise
            target = self.lifecycle.resume(peer, memory.take_mem_fd(), uffd, hello.max_resident, prefetch,
                                           hello.name)
        except BaseException:
            uffd.close()
            raise
        if target is None:
            uffd.close()
            log.warning("%s: asks to be taken back, but no state of it is left here", peer.name)
            await conn.send(protocol.encode_hello_ack(errno.ESTALE, self.config.zap_mode, 0))
            return None
        fds.remove(agent_fd)
        target.attach_zapper(self.lifecycle.zapper(target, agent_fd))
        try:
            target.recover(agent_may_zap=self.config.zap_mode == protocol.ZapMode.AGENT)
            self.lifecycle.register_found(target)
            await conn.send(protocol.encode_hello_ack(0, self.config.zap_mode, target.uffd.features,
                                                      self.config.grace_seconds))
        except BaseException:
            target.mark_gone()
            raise
        finally:
            self.lifecycle.start(target)
        log.info("%s: taken back after a restart (%s): %d pages swapped, %d resident", target.label,
                 printable(target.command), target.pt.swapped, target.pt.resident)
        return target

    async def _attach_child(self, hello: protocol.Hello, fds: list[int], conn, peer: Peer) -> Target | None:
        """A forked child's shim brings its agent socket; its uffd came with
        the fork event, which its parent reports (FORKED) right after fork
        (or, if the parent died first, the child claims the fork it left).
        Without one, the child is told to attach with a uffd of its own.
        The child itself proves the fork event's uffd is its own; if not,
        that uffd is not this process's and its target is stopped."""
        _require_socket(fds[0])
        found = await self.lifecycle.child_hello(hello.pid, (peer.uid, peer.gid))
        if isinstance(found, Orphan):
            target = self._adopt_orphan(found, hello, peer)
        elif found is not None:
            target = found
            self._prove_child(target, hello, peer)
        else:
            os.close(fds.pop())
            await conn.send(protocol.encode_hello_ack(errno.ENOENT, self.config.zap_mode, 0))
            return None
        if not target.manages(hello.probe):  # a managed page is no canary: it is evicted and served
            target.read_with_canary(hello.probe)
        target.attach_zapper(self.lifecycle.zapper(target, fds.pop()))
        # The child's uffd goes back with the answer: the shim keeps a
        # reference, so that if the daemon dies its faults wait, not zeros.
        ack = protocol.encode_hello_ack(0, self.config.zap_mode, target.uffd.features, self.config.grace_seconds)
        await conn.sendmsg([ack], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", target.uffd.fileno()))])
        return target

    def _prove_child(self, target: Target, hello: protocol.Hello, peer: Peer) -> None:
        """The target made from the parent's FORKED is the peer's own, or it is stopped."""
        try:
            if target.owner_uid != peer.uid:
                raise Refused(f"the child target belongs to uid {target.owner_uid}")
            memory = Memory(peer.pidfd, peer.pid, peer.uid, peer.gid)
            registered = target.manages(hello.probe)
            try:
                memory.prove_uffd(target.uffd, hello.probe, registered=registered)
            finally:
                memory.close()
        except (Refused, TargetGone, OSError):
            self.lifecycle.stop(target)
            raise

    def _adopt_orphan(self, orphan: Orphan, hello: protocol.Hello, peer: Peer) -> Target:
        """The fork a dead parent left, once the child proves it is its own
        (if not, the fork waits on for its child and this one is refused)."""
        vpn = hello.probe >> PAGE_SHIFT
        try:
            memory = Memory(peer.pidfd, peer.pid, peer.uid, peer.gid)
            try:
                memory.prove_uffd(orphan.fork.uffd, hello.probe, registered=not orphan.fork.pages.gaps(vpn, vpn + 1))
            except BaseException:
                memory.close()
                raise
        except (Refused, TargetGone, OSError):
            self.lifecycle.orphans.give_back(orphan)
            raise
        return self.lifecycle.adopt_orphan(orphan, peer.pid, peer.take_pidfd(), memory.take_mem_fd())

    async def _refuse_while_stopping(self, hello: protocol.Hello, conn) -> None:
        """A new process while the daemon stops: it runs unmanaged (nothing
        of it is registered yet)."""
        log.info("pid %d: not attached: the daemon is stopping", hello.pid)
        await conn.send(protocol.encode_hello_ack(errno.ESHUTDOWN, self.config.zap_mode, 0))


def _peer_uid(conn) -> int:
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one (each target holds a
    few: uffd, pidfd, /proc/PID/mem, agent and control sockets). Returns
    the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def refresh_commands(targets: list[Target]) -> None:
    """Each target's command line as ps shows it now: servers rewrite
    theirs (postgres's backends read "postgres: USER DB [local] SELECT",
    their parent's command line at connect). A line the kernel cannot read
    now keeps the one read before: a process gone, a zombie's (empty), or one
    a program put in managed memory that is paged out (PR_SET_MM_MAP; the
    kernel's read of another process's memory does not wait for a
    userfault: it comes back empty). Read in a worker thread of its own,
    as a /proc read per target stalls the faults of a daemon serving
    thousands; a reply waits COMMAND_READ_SECONDS for it at most."""
    live = [t for t in targets if not t.gone]
    if not live:
        return
    with trio.move_on_after(COMMAND_READ_SECONDS):
        lines = await trio.to_thread.run_sync(lambda: [read_cmdline(t.pid) for t in live],
                                              abandon_on_cancel=True, limiter=_COMMAND_READER)
        for target, line in zip(live, lines):
            if line and line != "?" and not target.gone and _still_running(target):
                target.command = line


_COMMAND_READER = trio.CapacityLimiter(1)   # (not trio's default pool, which eviction's reads share)


def _still_running(target: Target) -> bool:
    """Whether the target's process is still the one its pid named (its
    pid may have been reused since the read)."""
    try:
        procmem.pidfd_send_signal(target.pidfd, 0)
    except PermissionError:   # (it lives: a daemon without CAP_KILL may not signal it)
        return True
    except (TargetGone, OSError):   # (gone; or released, its pidfd closed)
        return False
    return True


def _name(peer: Peer | None, conn) -> str:
    """The peer as log lines name it: pid and uid."""
    if peer is not None:
        return peer.name
    try:
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        return "unknown peer"
    return f"pid {pid} uid {uid}"


def _api(uffd: uffdmod.Userfaultfd) -> int:
    try:
        return uffd.api(API_FEATURES)
    except OSError as exc:
        raise protocol.ProtocolError(f"UFFDIO_API on the received uffd failed: {exc}") from exc


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


def _fd_kind(fd: int) -> str:
    """What a received descriptor is, as /proc/self/fd names it."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise protocol.ProtocolError(f"bad descriptor: {exc}") from exc


def _require_uffd(fd: int) -> None:
    kind = _fd_kind(fd)
    if kind != "anon_inode:[userfaultfd]":
        raise protocol.ProtocolError(f"descriptor is {kind}, not a userfaultfd")


async def _send_in_parts(conn, reply: bytes) -> None:
    """The reply in messages of REPLY_PART bytes; the reader reads until the
    connection closes (cli.ask_daemon)."""
    for at in range(0, len(reply), REPLY_PART):
        await conn.send(reply[at:at + REPLY_PART])


def _require_socket(fd: int) -> None:
    kind = _fd_kind(fd)
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
