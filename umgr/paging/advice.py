"""Application hints: umgr_advise() from the shim (README "Hints").

The daemon validates a hint and calls advise(); the ACK goes back when it
returns:
- COLD and WILLNEED are queued for the evictor task, which runs them in
  order before its over-budget work: COLD evicts the range's resident
  pages (whatever the budget), WILLNEED reads the range's swapped pages
  and UFFDIO_COPYs them in. Running them there keeps one eviction batch
  at a time (they share its buffer and zap bookkeeping).
- DISCARDABLE takes effect before the ACK: swapped pages of the range
  are dropped at once (slot freed, FRESH), resident ones are
  write-protected and flagged (Flag.DISCARDABLE). The evictor does not
  write a flagged page (it is zapped and becomes FRESH); a write to it
  WP-faults and clears the flag (_on_wp_fault), and so does anything
  that unprotects it (_unprotect). A write after the hint thus always
  keeps its page.

A mixin of umgr.paging.target.Target.
"""
from __future__ import annotations

import collections
import errno
import logging

import numpy as np
import trio

from umgr.backends import io_to_the_end
from umgr.kernel.buffers import PageBuffer
from umgr.errors import BackendError
from umgr.paging.pagetable import NO_SLOT, PAGE_SHIFT, Flag, State, runs
from umgr.protocol import Advice
from umgr.paging.tuning import EVICT_BATCH, MAX_FILL_PAGES

log = logging.getLogger("umgr.paging.target")


class Hints:
    def _init_hints(self) -> None:
        self._hints: collections.deque[tuple[int, int, int]] = collections.deque()  # (advice, lo, hi) vpns
        self._hint_buf: PageBuffer | None = None      # WILLNEED staging, made on first use
        self._fill_reading = False                    # the fault loop's backend read is in flight

    async def advise(self, vpn_lo: int, vpn_hi: int, advice: int) -> None:
        """Apply a validated hint to the managed pages of [vpn_lo, vpn_hi)."""
        if advice == Advice.DISCARDABLE:
            self.stats.hint_discardable += 1
            await self._advise_discardable(vpn_lo, vpn_hi)
            return
        if advice == Advice.COLD:
            self.stats.hint_cold += 1
        else:
            self.stats.hint_willneed += 1
        self._hints.append((advice, vpn_lo, vpn_hi))
        self._evict_wanted.set()

    async def _advise_discardable(self, vpn_lo: int, vpn_hi: int) -> None:
        # Swapped pages: drop the copy now, as MADV_FREE drops swap entries.
        # A fill reading the slot meanwhile sees the page changed and skips it.
        swapped, _ = self.pt.find_state(vpn_lo, vpn_hi, State.SWAPPED)
        if len(swapped):
            slots = self.pt.slots(swapped)
            self.pt.set(swapped, State.FRESH, NO_SLOT)
            self.backend.slots.free(slots[slots != NO_SLOT])
            self.stats.discarded += len(swapped)
        # Pages being evicted are write-protected already: flag them as they are.
        evicting, _ = self.pt.find_state(vpn_lo, vpn_hi, State.EVICTING)
        self.pt.set_flag(evicting, Flag.DISCARDABLE)
        # Resident pages: write-protect, then flag, with no await in between,
        # so that any write after the hint WP-faults after the flag is set.
        resident, _ = self.pt.find_state(vpn_lo, vpn_hi, State.RESIDENT)
        starts, lengths = runs(resident)
        for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
            while True:
                err = self.uffd.writeprotect(run_vpn << PAGE_SHIFT, run_len << PAGE_SHIFT, True)
                if err != errno.EAGAIN:
                    break
                await trio.sleep(0)  # a queued event: the fault loop reads it
            if not err:  # else ENOENT: unmapped meanwhile
                # Sticks only on pages still resident (or since picked for eviction).
                self.pt.set_flag(np.arange(run_vpn, run_vpn + run_len, dtype=np.int64), Flag.DISCARDABLE)

    def _discardable(self, vpns: np.ndarray) -> np.ndarray:
        """Which victims (sorted vpns) the evictor may drop instead of writing."""
        return self.pt.has_flag(vpns, Flag.DISCARDABLE)

    async def _serve_hints(self) -> None:
        """Run queued COLD/WILLNEED hints, in order (on the evictor task)."""
        while self._hints and not self.gone:
            advice, lo, hi = self._hints.popleft()
            if advice == Advice.COLD:
                await self._evict_cold(lo, hi)
            else:
                await self._prefetch_willneed(lo, hi)

    async def _evict_cold(self, lo: int, hi: int) -> None:
        while lo < hi and self.zapper is not None and not self.eviction_paused:
            victims, lo = self.pt.find_state(lo, hi, State.RESIDENT, EVICT_BATCH)
            if len(victims) == 0:
                return
            self.stats.cold_evicted += len(victims)
            if not await self.evict_batch(victims):
                return
            await trio.sleep(0)

    async def _prefetch_willneed(self, lo: int, hi: int) -> None:
        """Bring the swapped pages of [lo, hi) in, as much as the budget has
        room for (beyond that they would only push other pages out)."""
        if self._hint_buf is None:
            self._hint_buf = PageBuffer(MAX_FILL_PAGES)
        while lo < hi and not self.gone:
            room = self.high_water - self.pt.resident if self.budget_pages else MAX_FILL_PAGES
            if room <= 0:
                return
            vpns, lo = self.pt.find_state(lo, hi, State.SWAPPED, min(room, MAX_FILL_PAGES))
            if len(vpns) == 0:
                return
            slots = self.pt.slots(vpns)
            # Our own reference: a slot freed meanwhile (the page faulted in,
            # discarded, unmapped) is not reused while we read it, so a page
            # still SWAPPED in the same slot afterwards has exactly this copy.
            self.backend.slots.incref(slots)
            try:
                try:
                    await io_to_the_end(self.backend.read, slots, self._hint_buf.addrs(np.arange(len(vpns))))
                except BackendError as exc:
                    self.stats.backend_errors += 1
                    log.warning("%s: WILLNEED read failed (%s); pages stay swapped", self.label, exc)
                    return
                await self._copy_willneed(vpns, slots)
            finally:
                self.backend.slots.free(slots)
            await trio.sleep(0)

    async def _copy_willneed(self, vpns: np.ndarray, slots: np.ndarray) -> None:
        pending = np.ones(len(vpns), bool)
        while pending.any():
            # Never change a page's state while the fault loop's read of a
            # slot is in flight: it checks the page afterwards by state and
            # slot, which must not have been freed and reused in between.
            while self._fill_reading:
                await trio.sleep(0.0002)
            pending &= (self.pt.states(vpns) == State.SWAPPED) & (self.pt.slots(vpns) == slots)
            done = np.zeros(len(vpns), bool)
            again = False
            positions = np.flatnonzero(pending)
            starts, lengths = runs(vpns[positions])
            at = 0
            for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
                first = int(positions[at])
                at += run_len
                i = 0
                while i < run_len:
                    copied, err = self.uffd.copy((run_vpn + i) << PAGE_SHIFT,
                                                 self._hint_buf.addr + ((first + i) << PAGE_SHIFT),
                                                 (run_len - i) << PAGE_SHIFT)
                    ok = max(copied, 0) >> PAGE_SHIFT
                    done[first + i:first + i + ok] = True
                    i += ok
                    if err == 0:
                        break
                    if err == errno.EEXIST:  # present already (as _copy_run treats it)
                        done[first + i] = True
                        i += 1
                        continue
                    if err == errno.EAGAIN:  # an event is queued (or a short copy): go round
                        again = True
                    pending[first + i:first + run_len] &= err == errno.EAGAIN  # ENOENT: gone
                    break
                if again:
                    break
            # Settle what went in now, before any await.
            filled = vpns[done]
            if len(filled):
                self.backend.slots.free(slots[done])       # the page table's references
                self.pt.set(filled, State.RESIDENT, NO_SLOT)
                self.eviction.on_resident(filled)
                self.stats.pages_in += len(filled)
                self.stats.willneed_in += len(filled)
                self._note_resident()
            pending &= ~done
            if not again:
                return
            await trio.sleep(0)  # let the fault loop read the queued event
