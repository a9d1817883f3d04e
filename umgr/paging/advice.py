"""Application hints: umgr_advise() from the shim (README "Hints").

The daemon validates a hint and calls advise(); the ACK goes back when it
returns:
- COLD and WILLNEED are queued for the target's eviction task, which runs
  them in order before its over-budget work: COLD evicts the range's
  resident pages (whatever the budget), WILLNEED reads the range's swapped
  pages and UFFDIO_COPYs them in. Running them there keeps one eviction
  batch at a time (they share its buffer and zap bookkeeping).
- DISCARDABLE takes effect before the ACK: swapped pages of the range
  are dropped at once (slot freed, FRESH), resident ones are
  write-protected and flagged (Flag.DISCARDABLE). The evictor does not
  write a flagged page (it is zapped and becomes FRESH); a write to it
  WP-faults and clears the flag, and so does anything that unprotects it.
  A write after the hint thus always keeps its page.
"""
from __future__ import annotations

import collections
import logging

import numpy as np
import trio

from umgr import cpuclock
from umgr.backends import io_to_the_end
from umgr.errors import BackendError
from umgr.kernel.buffers import PageBuffer
from umgr.paging.core import TargetCore
from umgr.paging.evictor import Evictor
from umgr.paging.pagetable import NO_SLOT, PAGE_SHIFT, Flag, State, runs
from umgr.paging.tuning import EVICT_BATCH, MAX_FILL_PAGES
from umgr.protocol import Advice

log = logging.getLogger("umgr.target")

# COLD and WILLNEED hints queued per target: a program whose eviction task
# is held up (its agent not answering) would otherwise grow the queue
# without bound, one ACK'd message at a time. Past it, advise() waits for
# room before its ACK, so the sender waits, not the daemon.
QUEUED_MAX = 64


class Hints:
    def __init__(self, core: TargetCore, evictor: Evictor):
        self.core = core
        self.evictor = evictor
        self._queue: collections.deque[tuple[int, int, int]] = collections.deque()  # (advice, lo, hi) vpns
        self._room = trio.Event()   # set (and made anew) each time a queued hint is taken
        self._buf: PageBuffer | None = None      # WILLNEED staging, made on first use

    async def advise(self, vpn_lo: int, vpn_hi: int, advice: int) -> None:
        """Apply a validated hint to the managed pages of [vpn_lo, vpn_hi)."""
        stats = self.core.stats
        if advice == Advice.DISCARDABLE:
            stats.hint_discardable += 1
            await self._advise_discardable(vpn_lo, vpn_hi)
            return
        if advice == Advice.COLD:
            stats.hint_cold += 1
        else:
            stats.hint_willneed += 1
        while len(self._queue) >= QUEUED_MAX and not self.core.gone:
            with trio.move_on_after(1):   # (a target gone takes nothing more)
                await self._room.wait()
        self._queue.append((advice, vpn_lo, vpn_hi))
        self.core.want_eviction()

    def bring_in(self, vpn_lo: int, vpn_hi: int) -> None:
        """Queue the swapped pages of the range to come back, as WILLNEED
        does (a clean stop uses it; not counted as a hint)."""
        self._queue.append((Advice.WILLNEED, vpn_lo, vpn_hi))
        self.core.want_eviction()

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def _advise_discardable(self, vpn_lo: int, vpn_hi: int) -> None:
        core, pt = self.core, self.core.pt
        # Swapped pages: drop the copy now, as MADV_FREE drops swap entries.
        # A fill reading the slot meanwhile sees the page changed and skips it.
        swapped, _ = pt.find_state(vpn_lo, vpn_hi, State.SWAPPED)
        if len(swapped):
            slots = pt.slots(swapped)
            pt.set(swapped, State.FRESH, NO_SLOT)
            core.slots.free(slots[slots != NO_SLOT])
            core.stats.discarded += len(swapped)
        if core.ksm_mergeable:   # (a write to a page KSM merged raises no write-protect fault)
            return
        # Resident pages and pages being evicted: write-protect, then flag,
        # with no await in between, so that any write after the hint
        # WP-faults after the flag is set. (A batch's pages are EVICTING
        # before they are protected, and its protection may yield: one
        # flagged as it was could be written unseen, then dropped.)
        for state in (State.EVICTING, State.RESIDENT):
            pages, _ = pt.find_state(vpn_lo, vpn_hi, state)
            starts, lengths = runs(pages)
            for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
                if not await core.writeprotect(run_vpn, run_len, True):  # else ENOENT: unmapped meanwhile
                    # Sticks only on pages still resident or being evicted.
                    pt.set_flag(np.arange(run_vpn, run_vpn + run_len, dtype=np.int64), Flag.DISCARDABLE)

    async def serve_queued(self) -> None:
        """Run queued COLD/WILLNEED hints, in order (on the eviction task)."""
        while self._queue and not self.core.gone:
            advice, lo, hi = self._queue.popleft()
            self._room.set()
            self._room = trio.Event()
            await trio.sleep(0)   # (a hint that finds nothing to do does not await: others' turn)
            if advice == Advice.COLD:
                await self._evict_cold(lo, hi)
                continue
            not_evicting = cpuclock.EVICTING_FOR.set(None)   # (bringing pages in: not eviction's CPU)
            try:
                await self._prefetch_willneed(lo, hi)
            finally:
                cpuclock.EVICTING_FOR.reset(not_evicting)

    async def _evict_cold(self, lo: int, hi: int) -> None:
        core = self.core
        while lo < hi and core.can_evict():
            victims, lo = core.pt.find_state(lo, hi, State.RESIDENT, EVICT_BATCH)
            if len(victims) == 0:
                return
            core.stats.cold_evicted += len(victims)
            if not await self.evictor.evict_batch(victims):
                return
            await trio.sleep(0)

    async def _prefetch_willneed(self, lo: int, hi: int) -> None:
        """Bring the swapped pages of [lo, hi) in, as much as the budget has
        room for (beyond that they would only push other pages out)."""
        core = self.core
        if self._buf is None:
            self._buf = PageBuffer(MAX_FILL_PAGES)
        while lo < hi and not core.gone:
            room = core.budget.room(core.pt.resident, otherwise=MAX_FILL_PAGES)
            if room <= 0:
                return
            vpns, lo = core.pt.find_state(lo, hi, State.SWAPPED, min(room, MAX_FILL_PAGES))
            if len(vpns) == 0:
                return
            if not await self._read_and_copy(vpns):
                return
            await trio.sleep(0)

    async def _read_and_copy(self, vpns: np.ndarray) -> bool:
        core = self.core
        slots = core.pt.slots(vpns)
        # Our own reference: a slot freed meanwhile (the page faulted in,
        # discarded, unmapped) is not reused while we read it, so a page
        # still SWAPPED in the same slot afterwards has exactly this copy.
        core.slots.incref(slots)
        try:
            try:
                await io_to_the_end(core.backend.read, slots, self._buf.addrs(np.arange(len(vpns))))
            except BackendError as exc:
                core.stats.backend_failures += 1
                log.warning("%s: WILLNEED read failed (%s); pages stay swapped", core.label, exc)
                if exc.may_land:   # (a read still on its way would write into the next one's pages)
                    self._buf = None
                return False
            await self._copy_willneed(vpns, slots)
        finally:
            core.slots.free(slots)
        return True

    async def _copy_willneed(self, vpns: np.ndarray, slots: np.ndarray) -> None:
        core = self.core
        pending = np.ones(len(vpns), bool)
        while pending.any():
            # Never change a page's state while the fault loop's read of a
            # slot is in flight: it checks the page afterwards by state and
            # slot, which must not have been freed and reused in between.
            await core.fill_reads.until_idle()
            pending &= (core.pt.states(vpns) == State.SWAPPED) & (core.pt.slots(vpns) == slots)
            done, again = self._copy_pending(vpns, pending)
            self._settle(vpns[done], slots[done])
            pending &= ~done
            if not again:
                return
            await trio.sleep(0)  # let the fault loop read the queued event

    def _copy_pending(self, vpns: np.ndarray, pending: np.ndarray) -> tuple[np.ndarray, bool]:
        """Copy the pending pages in, run by run. Returns which went in, and
        whether a queued event stopped it (EAGAIN: only the fault loop reads
        events, so go round after yielding to it)."""
        done = np.zeros(len(vpns), bool)
        positions = np.flatnonzero(pending)
        starts, lengths = runs(vpns[positions])
        at = 0
        for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
            first = int(positions[at])
            at += run_len
            run = slice(first, first + run_len)
            done[run], _, again = self.core.copy_run(run_vpn, run_len, self._buf.addr + (first << PAGE_SHIFT),
                                                     on_eagain=lambda: False)
            if again:
                return done, True
            pending[run] = False  # copied, present already, or gone (ENOENT)
        return done, False

    def _settle(self, filled: np.ndarray, slots: np.ndarray) -> None:
        """Settle what went in now, before any await."""
        core = self.core
        if len(filled):
            core.slots.free(slots)       # the page table's references
            core.pt.set(filled, State.RESIDENT, NO_SLOT)
            core.became_resident(filled)
            core.stats.pages_in += len(filled)
            core.stats.willneed_in += len(filled)
            core.note_resident()

    def release_buffers(self) -> None:
        """The WILLNEED buffer's memory goes back (between hints: on the
        eviction task, which runs them)."""
        if self._buf is not None:
            self._buf.release()

    def close(self) -> None:
        if self._buf is not None:
            self._buf.close()
