"""Forked children whose parent died before naming them.

A managed parent's fork() blocks until the daemon has read the fork event,
which carries the child's userfaultfd; the parent's shim then names the
child (FORKED). A parent killed between the two leaves a child whose
paged-out memory only that uffd can serve: closing it with the parent
would let the child read zeros where its data was. So the parent's
unclaimed forks outlive it here for ORPHAN_WAIT seconds, and the child's
own HELLO claims its fork: same owner, and a fork event read about when
the child was born (could_be_its_fork). The caller then proves the uffd is
the child's (peer.Memory.prove_uffd) before serving it; exactly one
candidate or none is offered, and none to a child whose parent is a live
target with a fork still to name (its own FORKED is on the way:
Lifecycle.child_hello), so no other process's memory is probed.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import trio

from umgr.kernel.procmem import process_start_time
from umgr.paging.events import ForkedMemory

log = logging.getLogger("umgr.daemon")

ORPHAN_WAIT = 10.0       # seconds an unclaimed fork outlives its parent
# A fork event's stamp (ForkedMemory.born) against its child's start time
# (/proc/PID/stat, in clock ticks, rounded down). The kernel sets a child's
# start time once its parent runs again after its fork event was read
# (dup_mmap() waits for the read; copy_process() sets the start time
# after it), and the daemon stamps the event once it has copied the
# parent's page table (ForkedMemory.at_fork), which takes a while for a
# large one. So the stamp comes up to BORN_BEFORE_STAMP after the birth
# (the copy), or up to BORN_AFTER_STAMP before it (a parent slow to run
# again, as on a busy machine), give or take a tick.
BORN_BEFORE_STAMP = 2.0
BORN_AFTER_STAMP = 1.0
TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def could_be_its_fork(stamp: float, born: float) -> bool:
    """Whether a fork event stamped at `stamp` may be that of a child born
    at `born` (both CLOCK_BOOTTIME seconds)."""
    return -BORN_AFTER_STAMP - TICK <= stamp - born <= BORN_BEFORE_STAMP + TICK


@dataclass(frozen=True)
class ParentSettings:
    """What a forked child's target takes from its parent."""
    pid: int
    owner: tuple[int, int]
    budget_pages: int
    name: str
    prefetch_name: str
    stopping: bool = False   # the parent was being drained by a clean stop
    scan_min_region: int | None = None   # the smallest mapping its maps scans take up, if lowered

    @classmethod
    def of(cls, target) -> "ParentSettings":
        return cls(target.pid, target.owner, target.budget_pages, target.name, target.prefetch.name,
                   target.stopping, target.scan_min_region)


@dataclass(eq=False)
class Orphan:
    parent: ParentSettings
    fork: ForkedMemory


class OrphanForks:
    """Unclaimed forks of dead parents, each kept ORPHAN_WAIT seconds."""

    def __init__(self):
        self._waiting: list[Orphan] = []
        self.changed = trio.Event()      # set when an orphan arrives (a child's HELLO may wait for it)

    def keep(self, parent: ParentSettings, forks: list[ForkedMemory], nursery: trio.Nursery) -> None:
        for fork in forks:
            orphan = Orphan(parent, fork)
            self._waiting.append(orphan)
            nursery.start_soon(self._expire, orphan)
            log.warning("pid %d: died before naming its forked child; its memory waits %g s for the child",
                        parent.pid, ORPHAN_WAIT)
        if forks:
            self.changed.set()
            self.changed = trio.Event()

    def claim(self, pid: int, owner: tuple[int, int]) -> Orphan | None:
        """The one fork that can be process `pid`'s, or None (none, or
        more than one: then none is probed, and the child cannot be served)."""
        ticks = process_start_time(pid)
        if ticks is None:
            return None
        born = ticks * TICK
        mine = [o for o in self._waiting if o.parent.owner == owner and could_be_its_fork(o.fork.born, born)]
        if len(mine) != 1:
            if mine:
                log.warning("pid %d: %d unclaimed forks could be its own; serving none", pid, len(mine))
            return None
        self._waiting.remove(mine[0])
        return mine[0]

    def give_back(self, orphan: Orphan) -> None:
        """A claimed fork that did not prove to be the claimant's."""
        self._waiting.append(orphan)

    async def _expire(self, orphan: Orphan) -> None:
        await trio.sleep(ORPHAN_WAIT)
        if orphan in self._waiting:
            self._waiting.remove(orphan)
            orphan.fork.close()
            log.warning("pid %d: no child claimed the memory of its last fork; released", orphan.parent.pid)

    def close(self) -> None:
        for orphan in self._waiting:
            orphan.fork.close()
        self._waiting.clear()
