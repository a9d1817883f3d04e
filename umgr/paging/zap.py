"""Zapping evicted pages out of a target.

Upstream kernels refuse process_madvise(MADV_DONTNEED) on another process
(only WILLNEED, COLD, PAGEOUT, COLLAPSE are allowed remotely), so by default
the shim's agent thread zaps for the daemon: since 6.13 a process may apply
any advice to itself. Where `umgr doctor` finds that the kernel accepts the
remote call (a patched kernel), the daemon zaps directly.

Either way each range of a zap becomes one UFFD_EVENT_REMOVE that the zapping
thread waits on until the daemon reads it: callers pass contiguous runs.

Faster, tried first: the agent moves the pages out (MOVE_OUT, with
UFFDIO_MOVE into a scratch area registered on the target's uffd,
bindings/shim/preload.c), which raises no event at all. The fault loop
reads no event meanwhile (readgate.py), and the kernel refuses the move
(EAGAIN) while one is queued. Where a move stops (a page the kernel still
shares copy-on-write, one pinned for I/O, a read-only mapping), the rest is
zapped; where a mapping is gone or an event is queued (an mremap, munmap,
discard or fork in between), the rest stays resident. --no-move-out zaps
only.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import socket
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterator

import numpy as np
import trio

from umgr.kernel import procmem
from umgr.kernel.buffers import PageBuffer
from umgr.kernel import PAGE_SHIFT
from umgr import cpuclock, protocol
from umgr.errors import TargetGone

MADV_DONTNEED = 4

log = logging.getLogger("umgr.target")


# read_changed(changed_at, count): the indices (among a MOVE_OUT's pages)
# and content of the pages its agent found changed, read from its memory.
ReadChanged = Callable[[int, int], Awaitable[tuple[np.ndarray, PageBuffer]]]


@dataclass
class Moved:
    """What a move_out() did."""
    bytes: int    # moved out, from the start of the list
    error: int    # the errno that stopped it, or 0
    # Pages a device changed since their hash was taken: (their indices
    # among the list's pages, their content), a pair per MOVE_OUT.
    changed: list[tuple[np.ndarray, PageBuffer]] = field(default_factory=list)


def _move_chunks(first_page: np.ndarray) -> Iterator[slice]:
    """Slices of ranges (first_page: each range's first page among all of
    them, and the total at the end) that fit one MOVE_OUT: at most
    ZAP_MAX_RANGES ranges and MOVE_MAX_PAGES pages. (The evictor's largest
    batch is MOVE_MAX_PAGES pages.)"""
    nranges, at = len(first_page) - 1, 0
    while at < nranges:
        fit = int(np.searchsorted(first_page, first_page[at] + protocol.MOVE_MAX_PAGES, side="right")) - 1
        end = min(at + protocol.ZAP_MAX_RANGES, fit, nranges)
        if end <= at:
            raise ValueError(f"a range of more than {protocol.MOVE_MAX_PAGES} pages cannot move out at once")
        yield slice(at, end)
        at = end


class CannotMove(Exception):
    """The agent cannot move pages out in this process (no UFFDIO_MOVE)."""


class AgentZapper:
    """Sends ZAP and MOVE_OUT requests to the shim's agent thread over its socket."""

    def __init__(self, sock: socket.socket, moves: bool = True):
        sock.setblocking(False)
        self._raw = sock   # (sent to and read from directly: _exchange)
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.moves = moves     # whether to try move_out(): off once the agent says it cannot move here
        self._seq = 0
        self._unanswered = 0   # requests sent whose answer is not read yet (_exchange)
        self._lock = trio.Lock()

    async def zap(self, starts: np.ndarray, lengths: np.ndarray) -> int:
        """Zap the ranges; returns the bytes zapped from the start of the list
        (less than the total only if the kernel stopped early)."""
        nbytes, _ = await self._request(starts, lengths)
        return nbytes

    async def move_out(self, starts: np.ndarray, lengths: np.ndarray, hashes: np.ndarray,
                       read_changed: ReadChanged) -> Moved:
        """Have the agent move the ranges out (byte addresses and lengths),
        checking each page whose hash is not 0 (one per page, in order)
        against the content it moved. What a device changed since the hash
        was taken is read back through read_changed(changed_at, count),
        before the agent's next MOVE_OUT reuses its area. Nothing moves
        where moving is impossible: then self.moves goes off and zap()
        does it all."""
        if not self.moves:
            return Moved(0, 0)
        try:
            async with self._held():
                return await self._move(starts, lengths, hashes, read_changed)
        except CannotMove as exc:
            log.warning("pages leave by zap only: the agent cannot move them out (%s)", exc)
            self.moves = False
            return Moved(0, 0)

    async def _move(self, starts: np.ndarray, lengths: np.ndarray, hashes: np.ndarray,
                    read_changed: ReadChanged) -> Moved:
        moved = Moved(0, 0)
        first_page = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(np.asarray(lengths, np.int64) >> PAGE_SHIFT, out=first_page[1:])
        for chunk in _move_chunks(first_page):
            pages = slice(int(first_page[chunk.start]), int(first_page[chunk.stop]))
            result = await self._ask(protocol.encode_move_out(self._next_seq(), starts[chunk], lengths[chunk],
                                                              hashes[pages]))
            if result.error < 0:
                why = errno.errorcode.get(-result.error, str(-result.error))
                if moved.bytes or moved.changed:   # (what earlier requests moved is told all the same)
                    log.warning("pages leave by zap only: the agent cannot move them out any more (%s)", why)
                    self.moves = False
                    break
                raise CannotMove(why)
            if result.changed:
                at, content = await read_changed(result.changed_at, result.changed)
                if at[0] < 0 or at[-1] >= result.bytes >> PAGE_SHIFT or (np.diff(at) <= 0).any():
                    raise protocol.ProtocolError("the agent names changed pages it did not move")
                moved.changed.append((at + pages.start, content))
            moved.bytes += result.bytes
            if result.error or result.bytes < int(lengths[chunk].sum()):
                moved.error = result.error
                break
        return moved

    async def _request(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[int, int]:
        """A ZAP of the ranges, in requests of at most ZAP_MAX_RANGES: (bytes
        done from the start of the list, the errno that stopped it or 0)."""
        done = 0
        async with self._held():
            for i in range(0, len(starts), protocol.ZAP_MAX_RANGES):
                chunk = slice(i, i + protocol.ZAP_MAX_RANGES)
                result = await self._ask(protocol.encode_zap(self._next_seq(), starts[chunk], lengths[chunk]))
                done += result.bytes
                if result.error or result.bytes < int(lengths[chunk].sum()):
                    return done, max(result.error, 0)
        return done, 0

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    async def _ask(self, request: bytes) -> protocol.ZapDone:
        """The agent's answer to a ZAP or MOVE_OUT of sequence number self._seq."""
        result = protocol.decode_zap_done(await self._exchange(request))
        if result.seq != self._seq:
            raise protocol.ProtocolError(f"agent answered zap {result.seq}, expected {self._seq}")
        if result.error == errno.ESRCH:
            raise TargetGone("agent: target gone")
        return result

    async def barrier(self) -> None:
        """An empty ZAP: answered once every zap sent before it is done."""
        async with self._held():
            reply = await self._exchange(protocol.encode_zap(self._next_seq(), np.empty(0, np.uint64),
                                                             np.empty(0, np.uint64)))
            if protocol.decode_zap_done(reply).seq != self._seq:
                raise protocol.ProtocolError("agent answered another zap than the empty one")

    @contextlib.asynccontextmanager
    async def _held(self):
        """The lock of the agent's one conversation, taken at once when free:
        trio.Lock's acquire() is a schedule point even then."""
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    async def _exchange(self, request: bytes) -> bytes:
        """Send a request and return the agent's answer, yielding to other
        tasks only to wait for the socket. A move out holds the target's
        fault loop off its uffd (readgate.py) until the answer is read, and
        trio's socket calls end with a schedule point each: with several
        targets paging, every other task's turn (joint rounds of the
        others' faults included) came in between: four processes' moves
        held their loops 8.8 ms a batch (3.5-3.9 ms without those turns),
        one process's 0.76 ms. So a request answered at once is no
        checkpoint. A request whose answer went unread (its task cancelled
        while waiting) has that answer read and dropped first: it would
        otherwise answer this one."""
        await self._drop_unread_answers()
        try:
            while True:
                try:
                    self._raw.send(request)   # (SEQPACKET: all of it or nothing)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self._raw)
        except OSError as exc:
            raise TargetGone(f"agent connection lost: {exc}") from exc
        self._unanswered += 1
        reply = await self._answer()
        self._unanswered -= 1
        return reply

    async def _drop_unread_answers(self) -> None:
        while self._unanswered:
            await self._answer()
            self._unanswered -= 1

    async def _answer(self) -> bytes:
        try:
            while True:
                try:
                    reply = self._raw.recv(64)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._raw)
        except OSError as exc:
            raise TargetGone(f"agent connection lost: {exc}") from exc
        if not reply:
            raise TargetGone("agent connection closed")
        return reply

    async def detach(self) -> None:
        """Let the target go (every page is back): the shim drops its uffd
        reference and runs on unmanaged."""
        async with self._held():
            await self._drop_unread_answers()
            await detach_agent(self.sock)

    def close(self) -> None:
        self.sock.close()


async def detach_agent(sock) -> None:
    try:
        await sock.send(protocol.encode_detach())
        reply = await sock.recv(64)
    except OSError as exc:
        raise TargetGone(f"agent connection lost: {exc}") from exc
    if not reply:
        raise TargetGone("agent connection closed")
    protocol.decode_detach_done(reply)


class RemoteZapper:
    """process_madvise(pidfd, MADV_DONTNEED) from the daemon, on kernels that allow it.
    The agent socket is kept all the same: while it is open the shim knows
    the daemon lives, and a clean stop detaches through it."""

    def __init__(self, pidfd: int, agent: socket.socket | None = None):
        self.pidfd = pidfd
        self.sock = None
        if agent is not None:
            agent.setblocking(False)
            self.sock = trio.socket.from_stdlib_socket(agent)

    async def detach(self) -> None:
        if self.sock is not None:
            await detach_agent(self.sock)

    async def barrier(self) -> None:
        """Nothing to wait for: the dead daemon's zaps died with its threads."""

    moves = False   # (UFFDIO_MOVE works only from inside the target: the agent's)

    async def move_out(self, starts: np.ndarray, lengths: np.ndarray, hashes: np.ndarray,
                       read_changed: ReadChanged) -> Moved:
        return Moved(0, 0)

    async def zap(self, starts: np.ndarray, lengths: np.ndarray) -> int:
        # Blocks until the daemon has read each REMOVE event: off the trio thread.
        starts, lengths = starts.astype(np.uint64), lengths.astype(np.uint64)
        return await cpuclock.to_thread(lambda: procmem.process_madvise(self.pidfd, starts, lengths, MADV_DONTNEED))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
