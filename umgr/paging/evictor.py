"""The evictor: keeps a target's resident pages under its budget.

A batch of victims goes write-protect -> process_vm_readv (in a worker
thread: on the fault-serving thread it would deadlock on a userfault) ->
backend write (durable before the zap) -> zap -> SWAPPED. A mixin of
umgr.paging.target.Target: it works on the target's page table, uffd, backend and
zapper, and runs as the target's second trio task beside the fault loop
(trio runs one at a time; state changes only between awaits). Rules and
kernel facts: shared/DESIGN.md, "Paging out".
"""
from __future__ import annotations

import errno
import logging

import numpy as np
import trio

from umgr.kernel import procmem
from umgr.backends import io_to_the_end
from umgr.errors import BackendError, BackendFull, TargetGone
from umgr.paging.pagetable import NO_SLOT, PAGE_SHIFT, Flag, State, runs
from umgr.paging.tuning import EVICT_BATCH

log = logging.getLogger("umgr.paging.target")


class Evictor:
    async def evictor(self) -> None:
        try:
            while True:
                await self._evict_wanted.wait()
                self._evict_wanted = trio.Event()
                await self._serve_hints()  # application hints: COLD, WILLNEED
                while self.over_budget() and self.zapper is not None and not self.eviction_paused:
                    # No victim (all pinned, or unknown to the policy): faults
                    # must not wait at the budget for an eviction that cannot come.
                    self.no_victims = not await self.evict_batch()
                    if self.no_victims:
                        break
                    await trio.sleep(0)
        except TargetGone:
            self.gone = True

    def _choose_victims(self) -> np.ndarray:
        want = min(EVICT_BATCH, self.pt.resident - self.low_water)
        chosen: list[np.ndarray] = []
        count = 0
        for _ in range(8):
            if count >= want or len(self.eviction) == 0:
                break
            candidates = np.unique(self.eviction.choose(want - count))
            candidates = candidates[self.pt.states(candidates) == State.RESIDENT]
            chosen.append(candidates)
            count += len(candidates)
        if not chosen:
            return np.empty(0, np.int64)
        return np.unique(np.concatenate(chosen))[:EVICT_BATCH]

    async def evict_batch(self, victims: np.ndarray | None = None) -> bool:
        """One batch: WP -> read -> store -> zap. False when nothing could go.
        `victims` (sorted RESIDENT vpns, at most EVICT_BATCH): a COLD hint's."""
        vpns = self._choose_victims() if victims is None else victims
        if len(vpns) == 0:
            return False
        self.pt.set(vpns, State.EVICTING)
        starts, lengths = runs(vpns)
        for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
            err = await self._writeprotect(run_vpn, run_len, True)
            if err:  # ENOENT: unmapped meanwhile; the UNMAP event drops them
                self._release(np.arange(run_vpn, run_vpn + run_len), State.EVICTING)
        vpns, settled = await self._keep_freeable(vpns)
        if len(vpns) == 0:
            return settled
        starts, lengths = runs(vpns)
        try:
            nbytes = await self._read_victims(starts, lengths)
        except TargetGone:
            raise
        except OSError:  # EFAULT on the first range: unmapped meanwhile, or unreadable
            nbytes = 0
        nread = nbytes >> PAGE_SHIFT
        if nread < len(vpns):
            rest = vpns[nread:]
            self._release(rest, State.EVICTING)
            await self._unprotect(rest)
            self._pin_unreadable(rest[:1])
            vpns = vpns[:nread]
        zero = self._victims.zero_pages(len(vpns))
        live = self.pt.states(vpns) == State.EVICTING
        drop = self._discardable(vpns)  # application hints: zapped unwritten, read back as zero
        # Clean pages (unwritten since they came in) go out as they are: their slot holds them.
        clean_slots = self.pt.slots(vpns)
        self._drop_clean_copies(vpns[drop & (clean_slots != NO_SLOT)])
        clean = live & ~drop & (clean_slots != NO_SLOT)
        zero &= ~clean
        store = live & ~zero & ~drop & ~clean
        try:
            slots = self.backend.slots.alloc(int(store.sum()))
        except BackendFull as exc:
            if self._free_clean_copies():  # slots kept only to save a write: take them back
                self._release(vpns, State.EVICTING)
                await self._unprotect(vpns)
                return True
            await self._abort(vpns, f"swap full ({exc}); eviction paused until slots are freed")
            return False
        try:
            await io_to_the_end(self.backend.write, slots, self._victims.addrs(np.flatnonzero(store)))
        except BackendError as exc:
            self.backend.slots.free(slots)
            self.stats.backend_errors += 1
            await self._abort(vpns, f"backend error ({exc}); pages stay resident")
            return False
        except BaseException:  # the table does not hold these yet; no write to them is in flight
            self.backend.slots.free(slots)
            raise
        page_slots = np.full(len(vpns), NO_SLOT, np.int32)
        page_slots[store] = slots
        page_slots[clean] = clean_slots[clean]
        # Pages that were written to (WP fault), discarded or unmapped while
        # their copy was in flight have left EVICTING: their copy is dropped.
        still = self.pt.states(vpns) == State.EVICTING
        self.stats.discarded += int((still & drop & ~zero).sum())
        self.backend.slots.free(page_slots[~still & store])
        vpns, page_slots, zero = vpns[still], page_slots[still], zero[still]
        if len(vpns) == 0:
            return True
        self.pt.set(vpns, State.ZAPPING, page_slots)
        await self._zap(vpns)
        self.stats.zero_pages_out += int(zero.sum())
        return True

    async def _read_victims(self, starts: np.ndarray, lengths: np.ndarray) -> int:
        """process_vm_readv in a worker thread. Abandoned on cancel: a read
        blocked on a userfault of a target that is going away is woken only
        when its uffd is closed, after this task has finished. The thread
        holds the buffer, so it stays mapped until the read returns."""
        buf, pid = self._victims, self.pid
        addrs, lens = (starts << PAGE_SHIFT).astype(np.uint64), (lengths << PAGE_SHIFT).astype(np.uint64)
        return await trio.to_thread.run_sync(
            lambda: procmem.process_vm_readv(pid, buf.addr, addrs, lens), abandon_on_cancel=True)

    async def _zap(self, vpns: np.ndarray) -> None:
        starts, lengths = runs(vpns)
        byte_starts, byte_lengths = starts << PAGE_SHIFT, lengths << PAGE_SHIFT
        self._zap_vpns, self._zap_hits, self._zap_removes = vpns, np.zeros(len(vpns), np.uint8), []
        try:
            zapped = await self.zapper.zap(byte_starts.astype(np.uint64), byte_lengths.astype(np.uint64))
        finally:
            self._zap_vpns = None
        # The zap has returned, so every REMOVE it caused has been read (the
        # zapping thread waits in the kernel until its event is read).
        discarded = vpns[self._zap_hits >= 2]
        nzapped = zapped >> PAGE_SHIFT
        done, failed = vpns[:nzapped], vpns[nzapped:]
        # Only pages still ZAPPING are ours to settle: an UNMAP or REMAP in
        # between has dealt with the others (and their slots).
        done = done[self.pt.states(done) == State.ZAPPING]
        slots = self.pt.slots(done)
        gone = np.isin(done, discarded)  # the app discarded them too: they read as zero
        self.backend.slots.free(slots[gone & (slots != NO_SLOT)])
        slots[gone] = NO_SLOT
        self.pt.set(done, State.ZAPPING, slots)
        self.pt.set(done[slots == NO_SLOT], State.FRESH)
        self.pt.set(done[slots != NO_SLOT], State.SWAPPED)
        self.stats.pages_out += len(done)
        if self._waiting is not None:
            self._waiting.cancel()
        self.stats.zap_batches += 1
        self.stats.zap_ranges += len(starts)
        # Pages an mremap or munmap took away meanwhile are not ours to settle.
        failed = failed[self.pt.states(failed) == State.ZAPPING]
        failed = await self._pin_locked(failed)
        if len(failed):
            log.warning("%s: zap stopped after %d of %d pages", self.label, nzapped, len(vpns))
            self._release(failed, State.ZAPPING)
            await self._unprotect(failed)
        # Writers blocked on a WP fault during the zap retry now: a MISSING
        # fault, served from the copy.
        for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
            self.uffd.wake(run_vpn << PAGE_SHIFT, run_len << PAGE_SHIFT)

    def _release(self, vpns: np.ndarray, from_state: int) -> None:
        """Pages leave an eviction batch and are resident again."""
        vpns = np.asarray(vpns, np.int64)
        vpns = vpns[self.pt.states(vpns) == from_state]
        slots = self.pt.slots(vpns)
        self.backend.slots.free(slots[slots != NO_SLOT])
        self.pt.set(vpns, State.RESIDENT, NO_SLOT)
        self.eviction.on_resident(vpns)

    async def _abort(self, vpns: np.ndarray, why: str) -> None:
        if why != self.eviction_paused:
            log.warning("%s: %s", self.label, why)
        self.eviction_paused = why
        self._release(vpns, State.EVICTING)
        await self._unprotect(vpns)

    def resume_eviction(self) -> None:
        """Slots were freed or the backend recovered: try again."""
        if self.eviction_paused:
            self.eviction_paused = ""
            self._note_resident()

    def _free_clean_copies(self) -> int:
        """The swap is full: resident pages give back the slots they kept
        (they stay write-protected; their next write just faults). Returns
        how many slots were freed."""
        freed = 0
        for region in self.pt.regions:
            kept = (region.state == State.RESIDENT) & (region.slot != NO_SLOT)
            if kept.any():
                self.backend.slots.free(region.slot[kept])
                region.slot[kept] = NO_SLOT
                freed += int(kept.sum())
        return freed

    def _drop_clean_copies(self, vpns: np.ndarray) -> None:
        """Pages whose writes umgr will not see any more (or that were just
        written) drop the swap copy they kept since they came in clean.
        Swapped and zapping pages keep theirs: it is their content."""
        vpns = np.asarray(vpns, np.int64)
        states, slots = self.pt.states(vpns), self.pt.slots(vpns)
        stale = (slots != NO_SLOT) & (states != State.SWAPPED) & (states != State.ZAPPING)
        if stale.any():
            self.backend.slots.free(slots[stale])
            for state in np.unique(states[stale]).tolist():
                self.pt.set(vpns[stale & (states == state)], state, NO_SLOT)

    async def _unprotect(self, vpns: np.ndarray) -> None:
        self.pt.set_flag(np.asarray(vpns, np.int64), Flag.DISCARDABLE, False)  # unprotected: writes unseen
        self._drop_clean_copies(vpns)
        starts, lengths = runs(np.asarray(vpns, np.int64))
        for run_vpn, run_len in zip(starts.tolist(), lengths.tolist()):
            await self._writeprotect(run_vpn, run_len, False)

    async def _writeprotect(self, vpn: int, npages: int, protect: bool) -> int:
        while True:
            err = self.uffd.writeprotect(vpn << PAGE_SHIFT, npages << PAGE_SHIFT, protect)
            if err != errno.EAGAIN:
                return err
            # A non-cooperative event is queued: the fault loop reads it.
            await trio.sleep(0)
