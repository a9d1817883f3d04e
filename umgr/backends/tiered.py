"""A chain of backends: a memory tier in front of a store that holds every slot.

As zswap sits in front of a swap device, the fast tier (`upper`, e.g.
compressed) uses the slot numbers of the store behind it (`lower`, e.g.
file, or another chain): every slot the daemon allocates has its place in
the lower store, so moving a page down needs no allocation and cannot find
the lower store full. A page is in exactly one tier: the upper one if it
holds the slot, else the lower one.

Writes: the upper tier takes the pages it can compress; when its cap is
reached its oldest pages are demoted (decompressed, written to the lower
store, then dropped) to make room; what it declines (incompressible pages,
or no room left after demotion) is written to the lower store.

Races (all tasks run on one trio thread; state changes only at awaits):
- a demoted page stays in the upper tier, and is read from there, until
  its lower write has completed;
- a slot freed during its demotion is not handed out again until the
  demotion's write has ended (it holds a reference of its own; for good
  if that write may still land);
- a slot written again while it is demoted is left alone by the demotion
  (oldest() gives a token per page, its store's sequence number), and a
  lower write of that slot waits for the demotion's write to finish, so
  the two never race to the same block.
"""
from __future__ import annotations

import numpy as np
import trio

from umgr.backends import NO_READS, Backend, ReadsDone
from umgr.errors import BackendError
from umgr.kernel import PAGE_SIZE
from umgr.kernel.buffers import PageBuffer

DEMOTE_BATCH = 256   # pages moved down per lower write


class Tiered(Backend):
    def __init__(self, upper: Backend, lower: Backend):
        if not hasattr(upper, "stack_on"):
            raise ValueError(f"backend {upper.name!r} cannot sit in front of another; "
                             f"give it last (a chain is fastest first)")
        self.upper, self.lower = upper, lower
        self.name = f"{upper.name}+{lower.name}"
        super().__init__(slots=lower.slots)
        upper.stack_on(lower)
        downstream = lower.slots.on_free
        upper_release = upper.release

        def on_free(released: np.ndarray) -> None:
            upper_release(released)
            if downstream is not None:
                downstream(released)

        self.slots.on_free = on_free
        self._in_flight = np.zeros(self.slots.span, bool)   # slots being demoted
        self._landed = trio.Event()     # set when a demotion's lower write ends
        self._buffers: list[PageBuffer] = []
        self.demoted = 0

    async def write(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        slots, addrs = np.asarray(slots, np.int32), np.asarray(addrs, np.uint64)
        upper = self.upper
        batch = await upper.pack(addrs)
        try:
            while batch.need > upper.room() and await self._demote(batch.need - upper.room()):
                pass
        except BackendError as exc:
            batch.discard()
            # The demotion's own slots and buffer are set aside (_demote);
            # nothing of this batch was written, so its slots are free to go.
            raise BackendError(str(exc), full=exc.full) from exc
        except BaseException:
            batch.discard()
            raise
        kept = upper.keep(slots, batch)
        if not kept.all():
            rest = ~kept
            await self._after_demotions(slots[rest])
            await self.lower.write(slots[rest], addrs[rest])
        self.pages_written += len(slots)

    async def read(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        upper = self.upper
        if len(slots) == 1:   # a fault's one page: no numpy on the way
            if upper.holds_one(int(slots[0])):
                await upper.read(slots, addrs)
            else:
                await self.lower.read(slots, addrs)
        else:
            slots, addrs = np.asarray(slots, np.int32), np.asarray(addrs, np.uint64)
            held = upper.holds(slots)
            if held.any():
                await upper.read(slots[held], addrs[held])
            if not held.all():
                await self.lower.read(slots[~held], addrs[~held])
        self.pages_read += len(slots)

    def sync_read_fd(self) -> int:
        # The lower store's file holds every slot the upper tier does not,
        # unless the lower store has a memory tier of its own.
        return self.lower.sync_read_fd() if self.lower.memory_entries() is None else -1

    def memory_entries(self) -> tuple[np.ndarray, np.ndarray, int] | None:
        return self.upper.memory_entries()

    def reads_done_elsewhere(self, file: ReadsDone, memory: ReadsDone) -> None:
        if memory.pages:
            self.upper.reads_done_elsewhere(NO_READS, memory)
        if file.pages:
            self.lower.reads_done_elsewhere(file, NO_READS)
        self.pages_read += file.pages + memory.pages

    async def _demote(self, nbytes: int) -> bool:
        """Move the upper tier's oldest pages (at least nbytes of them, at
        most DEMOTE_BATCH pages) down. False when there was none to move."""
        upper = self.upper
        victims, tokens = upper.oldest(nbytes, DEMOTE_BATCH, self._in_flight)
        # (A slot at the most references a count holds, 65535 forks' worth, has no room for the demotion's.)
        room = self.slots.counts[victims] < np.iinfo(self.slots.counts.dtype).max
        victims, tokens = victims[room], tokens[room]
        if len(victims) == 0:
            return False
        buf = self._buffers.pop() if self._buffers else PageBuffer(DEMOTE_BATCH)
        addrs = buf.addrs(np.arange(len(victims)))
        try:
            upper.unpack(victims, addrs)
        except BaseException:
            self._buffers.append(buf)
            raise
        self._in_flight[victims] = True
        # The demotion holds a reference of its own on each victim's slot
        # until its write has ended: a page freed meanwhile (faulted in)
        # does not free its slot for another page, which a late write
        # (below) would overwrite, in this tier or once demoted itself.
        self.slots.set_aside(victims)
        landing, stuck = False, victims[:0]
        try:
            await self.lower.write(victims, addrs)
        except BackendError as exc:
            # Part of the write may still land: its buffer is not used again,
            # and its slots keep the demotion's reference for good, so that
            # no later page of theirs is overwritten by it. The pages still
            # held stay in flight for good: never demoted again, as the
            # late write could land after the next demotion's.
            landing = exc.may_land
            if landing:
                stuck = victims[upper.still_held(victims, tokens)]
            raise
        finally:
            self._in_flight[victims] = False
            if landing:
                self._in_flight[stuck] = True
            self._landed.set()
            self._landed = trio.Event()
            if not landing:
                self._buffers.append(buf)
                self.slots.free(victims)   # (a victim freed meanwhile is free now: this tier forgets it)
        upper.drop_if_held(victims, tokens)
        self.demoted += len(victims)
        return True

    async def _after_demotions(self, slots: np.ndarray) -> None:
        while self._in_flight[slots].any():
            await self._landed.wait()

    def slots_adopted(self) -> None:
        self.upper.slots_adopted()
        self.lower.slots_adopted()

    def remove(self) -> None:
        self.upper.remove()
        self.lower.remove()

    def close(self) -> None:
        self.upper.close()
        self.lower.close()
        for buf in self._buffers:
            buf.close()
        self._buffers.clear()

    def statistics(self) -> dict:
        stats = super().statistics()
        stats["errors"] = self.errors + self.upper.errors + self.lower.statistics()["errors"]
        return stats

    def tier_statistics(self) -> list[dict]:
        upper = self.upper.tier_statistics()
        upper[0]["demoted_pages"] = self.demoted
        lower = self.lower.tier_statistics()
        if not isinstance(self.lower, Tiered):
            # Every slot in use is held above or here.
            lower[0]["pages"] = max(self.slots.used - self.upper.pages_held, 0)
            lower[0]["used_bytes"] = lower[0]["pages"] * PAGE_SIZE
        return upper + lower
