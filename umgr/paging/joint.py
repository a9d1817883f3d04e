"""Joint rounds: several targets' faults served at once.

The daemon's thread runs every target's fault loop in turn, and a loop's C
call (fastpath.py) serves its own target's faults only. With several
targets faulting at once, their reads from the swap file were in flight
one at a time: four processes of random reads under their own budgets
took 1.9x the kernel's swap, against 1.2x for one alone, with the daemon's
thread busy all the time, more than half of it in a read polled to its end.

A joint round lets them overlap. When a fault loop (the leader) is about
to serve, its calls read the swap file lately, and other targets whose
calls did are parked (their loop asleep on its uffd, or paused between two
rounds), each member's call runs in its own background thread
(FastPath.serve_in_background), with AIO and zstd contexts of its own
(uffd.joint_io), while the daemon's thread waits for the first call to
end, for the event loop to have work, or for the round's time slice to
pass. Then it stops the others, settles each
call, takes each call's handoff (the events and faults it read and left
for the full path), and hands a parked loop what its call served: the loop
goes on from there when it next runs (FaultService.carry).

Why that is safe: nothing else in the daemon runs during a round. The
round goes from the first call started to the last one settled with no
await, as a call in the background does (fastpath.py), so no task touches
a member's table, buffers or uffd meanwhile, and
- the members share only the slot reference counts, which the calls drop
  atomically (and nothing else changes meanwhile), the slots' eviction
  stamps and the store, which they read;
- a parked loop is outside its ReadGate: a member is one whose gate is
  not held, and no holder can come during the round. Every event a
  member's call read is handled before the round ends, as the loop itself
  would before it awaits anything, so no move out starts with an event
  read and not handled (readgate.py);
- a member asleep on its uffd is woken first (its wait cancelled), which
  takes its uffd out of the event loop's epoll set: its faults would
  otherwise end the round (the round watches that set).
"""
from __future__ import annotations

import os
import select
import time

from umgr.kernel import uffd as uffdmod
from umgr.paging.fastpath import IDLE as FAST_IDLE
from umgr.paging.fastpath import SLICE_SECONDS, event_loop_fd, slice_seconds

# A target joins (or leads) only if its calls read the swap file this
# recently (FaultService.reads_files_lately): waking an idle one's loop for
# nothing costs the daemon's thread a round of it.
JOIN_RECENT_SECONDS = 20e-3
# Members of one round at most (each one's call is a thread of its own, and
# needs an AIO context of its own).
MAX_MEMBERS = 8


class JointRounds:
    """The daemon's targets' fault services (FaultService, faults.py), and
    the rounds that serve several of them at once."""

    def __init__(self):
        """Made as the daemon starts, with every descriptor a round needs (a
        descriptor that appears later looks like a leak): the members' I/O
        contexts too."""
        self._services: list = []
        self._ended_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)   # each member's call adds 1 as it ends
        self._poll = select.poll()
        self._poll.register(self._ended_fd, select.POLLIN)
        self._watch_fd: int | None = None   # the event loop's epoll set (event_loop_fd), at the first round
        uffdmod.joint_io(MAX_MEMBERS)

    def add(self, service) -> None:
        self._services.append(service)

    def remove(self, service) -> None:
        if service in self._services:
            self._services.remove(service)

    def run(self, leader):
        """A round with `leader` (about to serve) and the parked targets
        whose calls read the swap file lately; leader's (outcome, prefetch windows), as its
        own call's would be, or None when no other target may join (then
        leader serves alone)."""
        if len(self._services) < 2:
            return None
        now = time.monotonic()
        if not leader.reads_files_lately(now):
            return None
        partners = [s for s in self._services if s is not leader and _may_join(s, now)][:MAX_MEMBERS - 1]
        if not partners or not leader.fast.has_background():
            return None
        self._watch_event_loop()
        members = [leader] + partners
        slice_s = self._slice(members)
        for member in partners:
            member.wake_to_join()
        ended, interrupted = self._serve(members, slice_s)
        result = None
        for member, outcome in ended:
            carried = _settle(member, outcome)
            if member is leader:
                result = carried
            else:
                member.carry(carried)
        if interrupted is not None:
            raise interrupted
        if isinstance(result, BaseException):
            raise result
        return result

    def _watch_event_loop(self) -> None:
        if self._watch_fd is None:   # (one event loop for the daemon's life)
            self._watch_fd = event_loop_fd()
            if self._watch_fd >= 0:
                self._poll.register(self._watch_fd, select.POLLIN)

    def _slice(self, members: list) -> float:
        """As a call's: short once a member is past its high water mark
        (its evictor is to run: woken, it may be in the batch trio is
        running, which no count of runnable tasks shows), or while another
        task is ready to run (the members' own loops, paused between two
        rounds, are runnable tasks, but the round's: with them counted, 4
        processes' random reads took 1.07x the time)."""
        if any(member.fast.core.over_budget() for member in members):
            return SLICE_SECONDS
        return slice_seconds(self._watch_fd, frozenset(member.task for member in members))

    def _serve(self, members: list, slice_s: float) -> tuple[list, BaseException | None]:
        """Every member's call at once, until one ends, the event loop has
        work, or slice_s passes; then all are stopped. Each member's
        outcome (FAST_*), or the exception its call failed with (its own
        loop raises it, not the leader's); and what interrupted the wait
        (KeyboardInterrupt), to raise once every member is settled."""
        started, ended, interrupted = [], [], None
        try:
            for member, io in zip(members, uffdmod.joint_io(len(members))):
                try:
                    member.fast.serve_in_background((slice_s, io, self._ended_fd))
                except Exception as exc:
                    ended.append((member, exc))
                else:
                    started.append(member)
            if started:
                self._poll.poll(max(1, round(slice_s * 1e3)))
        except BaseException as exc:   # (the calls started end and are settled first)
            interrupted = exc
        for member in started:
            member.fast.stop_background()
        for member in started:
            try:
                ended.append((member, member.fast.finish_background(stop=True)))
            except Exception as exc:   # (a failed read of its uffd: what it served is settled all the same)
                ended.append((member, _Failed(exc)))
        try:
            os.eventfd_read(self._ended_fd)
        except BlockingIOError:
            pass
        return ended, interrupted

    def close(self) -> None:
        if self._ended_fd >= 0:
            os.close(self._ended_fd)
            self._ended_fd = -1


def _may_join(service, now: float) -> bool:
    """joinable(), whose failure (a thread or a descriptor not to be had)
    is the partner's, not the leader's: its own loop meets it when it serves."""
    try:
        return service.joinable(now)
    except Exception:
        return False


def _settle(member, outcome):
    """A member's call settled: (outcome, windows); or, for its own loop to
    raise (not the leader's), the exception its call failed with (what it
    served settled first) or that settling raised."""
    if isinstance(outcome, _Failed):
        try:
            member.settle_joined(FAST_IDLE)
        except Exception as exc:
            outcome.exc.__context__ = exc   # (the call's failure is what its loop raises)
        return outcome.exc
    try:
        if isinstance(outcome, BaseException):   # (no call started: nothing to settle)
            return outcome
        return member.settle_joined(outcome)
    except Exception as exc:
        return exc


class _Failed:
    """A member's call that ended with an exception (a failed read of its
    uffd), its log to be settled all the same."""
    __slots__ = ("exc",)

    def __init__(self, exc: Exception):
        self.exc = exc
