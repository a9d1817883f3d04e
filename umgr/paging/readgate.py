"""Holding a target's uffd unread while the agent moves pages out.

Reading a non-cooperative event (REMAP, UNMAP, REMOVE, FORK) from a uffd is
what lets the app's mremap, munmap, madvise or fork return: the kernel
makes the calling thread wait until its event is read. A move out
(MOVE_OUT, zap.py) names the pages by the addresses the page table gives;
if the fault loop read a REMAP while the request was on its way, the app
could move the pages away and back again before the agent's UFFDIO_MOVE
runs, and the move would take pages the table had just made resident.
With the uffd unread for the whole move, an mremap or munmap that comes in
between stays blocked after its first step: the move finds nothing at the
old addresses (ENOENT), or stops at once (EAGAIN: the agent moves through
the target's own uffd, which refuses a move while an event is queued, so
another thread cannot have mapped new memory there meanwhile), and the
event, read afterwards, settles the pages as it does for a zap. Pages
moved away and back are also covered without the gate (events.py keeps
them ZAPPING while a request is in flight); what only the gate covers is a
thread that unmaps memory and maps something new at the same address (an
allocator freeing and reusing a big block): its munmap cannot return, so
its new data cannot be under the move (a thread doing that 300 times lost
a page in 1 run of 8 without the gate, none of 12 with it:
docs/architecture.md, "mremap during eviction").

The fault loop reads only between enter() and leave(); hold() waits until
it has left (it finishes the round it is in: a round never waits for the
evictor) and keeps it out until the move is done. A move raises no event
and never waits for one, so nothing the agent does needs the loop.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

import trio


class ReadGate:
    def __init__(self):
        self._holders = 0
        self._opened: trio.Event | None = None   # set when the last holder lets go
        self._reading = False                    # the fault loop is in a round
        self._left: trio.Event | None = None     # set when it leaves the round a holder waits on

    @property
    def held(self) -> bool:
        """Whether a holder keeps the fault loop from reading."""
        return self._holders > 0

    async def enter(self) -> None:
        """The fault loop, before a round that may read the uffd."""
        while self._holders:
            await self._opened.wait()
        self._reading = True

    def leave(self) -> None:
        """The fault loop, before it waits for anything between rounds."""
        self._reading = False
        if self._left is not None:
            self._left.set()
            self._left = None

    @asynccontextmanager
    async def hold(self):
        """No uffd message is read inside: the fault loop finishes its round
        first, and enters no other until the last holder lets go."""
        if not self._holders:
            self._opened = trio.Event()
        self._holders += 1
        try:
            while self._reading:
                if self._left is None:
                    self._left = trio.Event()
                await self._left.wait()
            yield
        finally:
            self._holders -= 1
            if not self._holders:
                self._opened.set()
