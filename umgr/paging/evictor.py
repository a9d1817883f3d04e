"""The evictor: keeps a target's resident pages under its budget.

A batch of victims is taken out (write-protect -> process_vm_readv proven
by a canary token to reach the checked process, else /proc/PID/mem; in a
worker thread so the fault-serving thread never waits on the copy) and put
away (backend write, durable before the zap -> zap -> SWAPPED). When faults
had used half the headroom before the round began (Budget.rushed), two
batches (of up to Budget.rushed_batch pages) are in flight down to the
rushed low mark: the next is taken out while the previous one is put away,
so the copy-out overlaps the write and the zap; a round of one batch runs
on the eviction task alone. It runs as the target's eviction task beside
the fault loop; the race rules (a write during EVICTING wins, a write
during ZAPPING waits) are in docs/architecture.md.
"""
from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import trio

from umgr import cpuclock, protocol
from umgr.arrays import union, unique
from umgr.backends import io_to_the_end
from umgr.errors import BackendError, BackendFull, TargetGone
from umgr.kernel import procmem
from umgr.kernel.buffers import PageBuffer
from umgr.paging.core import BACKEND_ERROR, FULL, STORE_FULL, TargetCore
from umgr.paging.pagetable import NO_SLOT, PAGE_SHIFT, PAGE_SIZE, Flag, State, runs
from umgr.paging.pinning import Pinning
from umgr.paging.removes import RemoveAttribution
from umgr.paging.tuning import BACKEND_RETRY_SECONDS, EVICT_BATCH_MAX

EMPTY = np.empty(0, np.int64)

log = logging.getLogger("umgr.target")

# The least time between two warnings of one kind of eviction pause.
PAUSE_WARN_SECONDS = 60.0

# How many times the policy is asked for more when its candidates are stale.
CHOOSE_ROUNDS = 8
# Runs with a busy page (EBUSY) a move-out skips in a batch before it leaves
# the rest resident: each costs a round trip to the agent.
MOVE_BUSY_MAX = 16


class BatchReleased(Exception):
    """The batch went back to resident before its zap. `progress`: the
    evictor may go on at once (slots were freed), else eviction is paused."""

    def __init__(self, progress: bool):
        super().__init__()
        self.progress = progress


@dataclass
class Batch:
    vpns: np.ndarray       # sorted; EVICTING, write-protected
    buffer: PageBuffer     # the copied ones' content, in order
    # Which vpns were copied into `buffer`; the others are clean copies (their slot holds them).
    copied: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    # For each vpn, its copy's umgr_page_hash (0 for one not copied): the
    # agent's move checks the page against it (_move_out).
    hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    progress: bool = True  # for an empty batch: whether pages left the resident count anyway


def _read_ranges(pid: int, mem_fd: int, canary: int, local: int, addrs: np.ndarray,
                 lens: np.ndarray) -> tuple[int, bool]:
    """(bytes read, whether the canary proof held). See _read_victims."""
    done, proven = 0, True
    if canary:
        got = procmem.checked_readv(pid, mem_fd, canary, local, addrs, lens)
        proven = got is not None
        done = got or 0
    if done == int(lens.sum()):
        return done, proven
    ends = np.cumsum(lens)
    first = int(np.searchsorted(ends, done, side="right"))
    rest_addrs, rest_lens = addrs[first:].copy(), lens[first:].copy()
    skip = done - (int(ends[first - 1]) if first else 0)
    rest_addrs[0] += skip
    rest_lens[0] -= skip
    try:
        return done + procmem.mem_readv(mem_fd, local + done, rest_addrs, rest_lens, pid), proven
    except OSError:   # the first page left cannot be read at all (TargetGone is not an OSError: it goes up)
        if done:
            return done, proven
        raise


class Evictor:
    def __init__(self, core: TargetCore, pinning: Pinning, removes: RemoveAttribution):
        self.core = core
        self.pinning = pinning
        self.removes = removes
        # Two batch buffers, the second mapped at the first pipelined round.
        # Never unmapped: an abandoned readv may still write one. Sized for
        # the largest batch; only the pages a batch uses take memory, until
        # release_buffers().
        self._buffers = [PageBuffer(EVICT_BATCH_MAX)]
        self._in_flight = 0   # pages taken out and not yet put away
        self._putting_away = EMPTY   # the vpns of the batch being put away: never in the next one
        self._held_for_late_writes: list[PageBuffer] = []   # buffers of writes that may still land
        self._warned: dict[str, float] = {}   # kind of pause ("swap full", ...) -> when last warned of
        self._paused_at = 0.0   # when eviction last paused

    async def evict_over_budget(self) -> None:
        """Evict while the target is over its high water mark. Where faults
        come slower than a batch makes room (the round begins with half the
        headroom left), one batch is taken out and put away here; otherwise
        (a rushed round) two batches are in flight, of up to
        Budget.rushed_batch pages each, down to the rushed low mark: this
        task takes the next batch out while a second task puts the previous
        one away."""
        core = self.core
        if not core.budget.rushed(core.pt.resident):
            await self._evict_one()
            return
        if len(self._buffers) < 2:
            self._buffers.append(PageBuffer(EVICT_BATCH_MAX))
        self._in_flight = 0
        send, receive = trio.open_memory_channel(0)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._put_away_all, receive)
                async with send:
                    await self._take_out_all(send)
        except BaseExceptionGroup as group:
            raise first_of(group) from None   # TargetGone is caught as such by the eviction loop

    def release_buffers(self) -> None:
        """The batch buffers' memory goes back to the kernel. Only between
        rounds: then no backend write reads them (each round waits for its
        writes, io_to_the_end), and a readv abandoned on cancel could only
        put pages back in them."""
        for buffer in self._buffers:
            buffer.release()

    async def _evict_one(self) -> None:
        """One batch (if over the high mark), on this task. Each hand-over
        between the two tasks of the pipeline waits for a step of the fault
        loop (1-4 ms under random faults, which bring pages in one at a
        time): there a round of one batch took 11 ms on average, 4.4 of
        them its own work, and faults waited at the budget meanwhile."""
        core = self.core
        if not (core.budget.over(core.pt.resident) and core.can_evict()):
            return
        batch = await self._take_out(self._buffers[0])
        core.no_victims = not (len(batch.vpns) or batch.progress)   # (see _take_out_all)
        if len(batch.vpns):
            await self._put_away(batch)

    async def _take_out_all(self, send: trio.MemorySendChannel) -> None:
        core = self.core
        turn = 0   # the buffer to fill: the other one may be being put away
        while core.budget.above_rushed_low(core.pt.resident - self._in_flight) and core.can_evict():
            batch = await self._take_out(self._buffers[turn], rushed=True)
            if not (len(batch.vpns) or batch.progress):
                # No victim (all pinned, or unknown to the policy): faults
                # must not wait at the budget for an eviction that cannot
                # come. Unless a batch is in flight: its zap will make room
                # (and its pages are why the policy has none to offer).
                core.no_victims = self._in_flight == 0
                return
            core.no_victims = False
            if len(batch.vpns):
                self._in_flight += len(batch.vpns)
                # A zero-size channel: this returns once the other task has
                # put the batch before away, so the other buffer is free.
                await send.send(batch)
                turn ^= 1
            await trio.sleep(0)

    async def _put_away_all(self, receive: trio.MemoryReceiveChannel) -> None:
        async with receive:
            async for batch in receive:
                self._putting_away = batch.vpns
                try:
                    await self._put_away(batch)   # a pause stops the taking out (can_evict)
                finally:
                    self._in_flight -= len(batch.vpns)
                    self._putting_away = EMPTY

    def _choose_victims(self, rushed: bool) -> np.ndarray:
        """Up to a batch of victims (a rushed round's batch: Budget.evict_goal)."""
        core = self.core
        want = core.budget.evict_goal(core.pt.resident - self._in_flight, rushed)
        chosen: list[np.ndarray] = []
        count = 0
        for _ in range(CHOOSE_ROUNDS):
            if count >= want or len(core.eviction) == 0:
                break
            candidates = np.sort(core.eviction.choose(want - count))   # (no duplicates: GuardedEviction)
            candidates = candidates[core.pt.states(candidates) == State.RESIDENT]
            if len(self._putting_away):
                # A page of the batch in flight that went back to RESIDENT
                # (written, or moved by mremap and back) is not taken again
                # until that batch is done: its _store() would find it
                # EVICTING and zap it with that batch's stale copy. It goes
                # back in the queue: choose() handed it out once, and no
                # other on_resident would come for a page that stays.
                in_flight = _among(candidates, self._putting_away)
                if in_flight.any():
                    core.eviction.on_resident(candidates[in_flight])
                    candidates = candidates[~in_flight]
            chosen.append(candidates)
            count += len(candidates)
        if not chosen:
            return np.empty(0, np.int64)
        if len(chosen) == 1:
            return chosen[0][:want]
        return unique(np.concatenate(chosen))[:want]

    async def evict_batch(self, victims: np.ndarray) -> bool:
        """One batch from start to end: `victims` (sorted RESIDENT vpns, at
        most EVICT_BATCH, a COLD hint's). False when nothing could go."""
        batch = await self._take_out(self._buffers[0], victims)
        if len(batch.vpns) == 0:
            return batch.progress
        return await self._put_away(batch)

    async def _take_out(self, buffer: PageBuffer, victims: np.ndarray | None = None, rushed: bool = False) -> Batch:
        """Victims (the policy's if not given) write-protected and copied
        into `buffer`, but for clean copies; those whose zap would free
        nothing leave the batch."""
        vpns = self._choose_victims(rushed) if victims is None else victims
        if len(vpns) == 0:
            return Batch(vpns, buffer, progress=False)
        self.core.keep_no_copies_if_merged()
        await self._protect(vpns)
        vpns, settled = await self.pinning.keep_freeable(vpns)
        if len(vpns) == 0:
            return Batch(vpns, buffer, progress=settled)
        # A clean copy's slot holds the page (it came in write-protected and
        # was not written since): _store writes none, so none is read.
        clean = self.core.pt.slots(vpns) != NO_SLOT
        dirty = np.flatnonzero(~clean)
        copy_hashes = await self._read(vpns[dirty], buffer) if len(dirty) else np.empty(0, np.uint64)
        kept = clean.copy()
        kept[dirty[:len(copy_hashes)]] = True   # (after a short read the rest went back to RESIDENT)
        hashes = np.zeros(len(vpns), np.uint64)
        hashes[dirty[:len(copy_hashes)]] = copy_hashes
        return Batch(vpns[kept], buffer, ~clean[kept], hashes[kept])

    async def _put_away(self, batch: Batch) -> bool:
        """Store and zap a batch taken out. False when eviction paused."""
        try:
            vpns, page_slots, zero, hashes = await self._store(batch)
        except BatchReleased as released:
            return released.progress
        if len(vpns):
            # No await may come between _store's last look at the states and
            # this: a page written meanwhile (RESIDENT again, unprotected)
            # would be zapped with its stale copy. (A checkpoint here made
            # the CPython workload read back corrupt objects.)
            self.core.pt.set(vpns, State.ZAPPING, page_slots)
            await self._zap(vpns, hashes)
            self.core.stats.zero_pages_out += int(zero.sum())
        return True

    async def _protect(self, vpns: np.ndarray) -> None:
        """EVICTING, write-protected: from now on a write faults. A page
        that kept its slot (a clean copy) is write-protected already: it
        came in so, and whatever unprotects a page drops its copy
        (core.unprotect, and a write fault's service). Protecting it again
        cost a UFFDIO_WRITEPROTECT per run, and a batch of random clean
        pages is hundreds of one-page runs."""
        core = self.core
        unprotected = vpns[core.pt.slots(vpns) == NO_SLOT]
        core.pt.set(vpns, State.EVICTING)
        if len(unprotected) == 0:   # (a batch of clean pages)
            return
        starts, lengths = runs(unprotected)
        for i in await core.writeprotect_runs(starts, lengths, True):
            # Unmapped meanwhile; the UNMAP event drops them
            core.release(np.arange(starts[i], starts[i] + lengths[i]), State.EVICTING)

    async def _read(self, vpns: np.ndarray, buffer: PageBuffer) -> np.ndarray:
        """Copy the victims into the batch buffer; returns the hash of each
        page read (the first ones: the pages after a short read stay
        resident, and are pinned if unreadable)."""
        core = self.core
        try:
            nbytes, hashes = await self._read_victims(buffer, *runs(vpns))
        except TargetGone:
            raise
        except OSError:  # EFAULT on the first range: unmapped meanwhile, or unreadable
            nbytes, hashes = 0, np.empty(0, np.uint64)
        nread = nbytes >> PAGE_SHIFT
        core.stats.copied_out += nread
        if nread < len(vpns):
            rest = vpns[nread:]
            core.release(rest, State.EVICTING)
            await core.unprotect(rest)
            self.pinning.pin_unreadable(rest[:1])
        return hashes

    async def _store(self, batch: Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Write what must be written; returns (vpns still EVICTING, their
        slots, which are zero pages, their hashes). Raises BatchReleased."""
        core, vpns, copied = self.core, batch.vpns, batch.copied
        zero = np.zeros(len(vpns), bool)
        zero[copied] = batch.buffer.zero_pages(int(copied.sum()))
        live = core.pt.states(vpns) == State.EVICTING
        drop = core.pt.has_flag(vpns, Flag.DISCARDABLE)  # zapped unwritten, read back as zero
        # Clean pages (unwritten since they came in) go out as they are: their slot holds them.
        clean_slots = core.pt.slots(vpns)
        core.drop_clean_copies(vpns[drop & (clean_slots != NO_SLOT)])
        clean = live & ~drop & (clean_slots != NO_SLOT)
        zero &= ~clean
        # A page not copied is never stored. It had a clean copy at take-out:
        # written since, it is not live; if it is live without its copy, it
        # was found absent (FaultService._serve_absent: zeros) and leaves
        # with no slot, to read as zeros (FRESH).
        store = live & ~zero & ~drop & ~clean & copied
        buffered = np.cumsum(copied) - 1   # where each copied page is in the buffer
        store = await self._fit_in_store(vpns, store)
        slots = await self._write(vpns, store, batch.buffer.addrs(buffered[store]))
        page_slots = np.full(len(vpns), NO_SLOT, np.int32)
        page_slots[store] = slots
        page_slots[clean] = clean_slots[clean]
        core.slots.evicted_at[page_slots[store | clean]] = core.evictions & 0xFFFFFFFF
        # Pages that were written to (WP fault), discarded or unmapped while
        # their copy was in flight have left EVICTING: their copy is dropped.
        still = live & (core.pt.states(vpns) == State.EVICTING)
        core.stats.discarded += int((still & drop & ~zero).sum())
        core.slots.free(page_slots[~still & store])
        return vpns[still], page_slots[still], zero[still], batch.hashes[still]

    async def _fit_in_store(self, vpns: np.ndarray, store: np.ndarray) -> np.ndarray:
        """`store`, cut to the pages the store has free slots for (after
        dropping the slots kept for clean copies): the rest are resident
        again. A store short of a batch's slots took none of it, and every
        retry write-protected and copied a whole batch for nothing."""
        core = self.core
        need = int(store.sum())
        if need <= core.slots.free_count or (core.free_clean_copies() and need <= core.slots.free_count):
            return store
        free = core.slots.free_count
        if free == 0:
            return store   # (_write pauses eviction and releases the batch)
        over = np.flatnonzero(store)[free:]
        core.release(vpns[over], State.EVICTING)
        await core.unprotect(vpns[over])
        store = store.copy()
        store[over] = False
        self._pause(FULL, f"{FULL} ({need} slots wanted, {free} free: the rest of the batch stays resident); eviction "
                    f"paused until slots are freed; --swap-size makes it larger")
        return store

    async def _write(self, vpns: np.ndarray, store: np.ndarray, addrs: np.ndarray) -> np.ndarray:
        """Slots for the pages to store (their content at `addrs`), written
        and durable. A full or failing backend releases the batch
        (BatchReleased): nothing is lost."""
        core = self.core
        if not store.any():   # all clean (or zero, or dropped): no backend call (a store may
            return np.empty(0, np.int32)   # queue even an empty batch behind another)
        try:
            slots = core.slots.alloc(int(store.sum()))
        except BackendFull as exc:
            if core.free_clean_copies():  # slots kept only to save a write: take them back
                core.release(vpns, State.EVICTING)
                await core.unprotect(vpns)
                raise BatchReleased(progress=True) from None
            await self._abort(vpns, FULL,
                              f"{FULL} ({exc}); eviction paused until slots are freed; --swap-size makes it larger")
            raise BatchReleased(progress=False) from None
        try:
            await io_to_the_end(core.backend.write, slots, addrs)
        except BackendError as exc:
            if exc.full:   # out of room, not failing
                core.slots.free(slots)
                await self._abort(vpns, STORE_FULL, f"{STORE_FULL} ({exc}); eviction paused until room is freed")
                raise BatchReleased(progress=False) from None
            if exc.may_land:   # (a write landing in a slot handed out again would overwrite its page)
                log.warning("%s: %d swap slots are set aside for good: a failed write may still land in them",
                            core.label, len(slots))
            else:
                core.slots.free(slots)
            core.stats.backend_failures += 1
            await self._abort(vpns, BACKEND_ERROR, f"{BACKEND_ERROR} ({exc}); pages stay resident")
            raise BatchReleased(progress=False) from None
        except BaseException:  # the table does not hold these yet; no write to them is in flight
            core.slots.free(slots)
            raise
        return slots

    async def _read_victims(self, buf: PageBuffer, starts: np.ndarray,
                            lengths: np.ndarray) -> tuple[int, np.ndarray]:
        """Read in a worker thread, never from a program the target exec'd:
        with process_vm_readv proven by the canary token (one copy, one call
        per batch), and what that did not read (an unreadable page, a failed
        proof) through the target's /proc/PID/mem, which reaches only the
        mm its uffd serves. Returns the bytes read and each page's hash
        (taken there too: 0.18 us a page with AVX2). Abandoned on cancel; the thread
        holds the buffer, so it stays mapped until the read returns."""
        pid, mem_fd, canary = self.core.pid, self.core.mem_fd, self.core.canary
        addrs, lens = (starts << PAGE_SHIFT).astype(np.uint64), (lengths << PAGE_SHIFT).astype(np.uint64)

        def read_and_hash() -> tuple[int, bool, np.ndarray]:
            nbytes, proven = _read_ranges(pid, mem_fd, canary, buf.addr, addrs, lens)
            return nbytes, proven, buf.hashes(nbytes >> PAGE_SHIFT)
        nbytes, proven, hashes = await cpuclock.to_thread(read_and_hash, abandon_on_cancel=True)
        self._note_proof(proven)
        return nbytes, hashes

    def _note_proof(self, proven: bool) -> None:
        core = self.core
        if not proven and core.canary:
            core.canary = 0
            log.info("%s: its canary page no longer reads back; pages are read through /proc/PID/mem", core.label)

    async def _read_changed(self, changed_at: int, count: int) -> tuple[np.ndarray, PageBuffer]:
        """The indices and content of the pages an agent's move found
        changed (zap.ReadChanged), read from its changed-page area."""
        pid, mem_fd, canary = self.core.pid, self.core.mem_fd, self.core.canary
        indices = np.empty(count, np.uint32)
        content = PageBuffer(count)
        parts = ((indices.ctypes.data, changed_at, count * 4),
                 (content.addr, changed_at + protocol.CHANGED_INDEX_BYTES, count * PAGE_SIZE))

        def read() -> bool:
            proven = True
            for local, remote, nbytes in parts:
                done, ok = _read_ranges(pid, mem_fd, canary, local, np.array([remote], np.uint64),
                                        np.array([nbytes], np.uint64))
                if done != nbytes:
                    raise protocol.ProtocolError(f"the agent's changed pages cannot be read ({done} of {nbytes} bytes)")
                proven &= ok
            return proven
        self._note_proof(await cpuclock.to_thread(read))
        return indices.astype(np.int64), content

    async def _zap(self, vpns: np.ndarray, hashes: np.ndarray) -> None:
        """Take the pages out of the target: moved out by the agent where it
        can (no REMOVE event to wait for; each page with a hash checked
        against it), the rest zapped."""
        core = self.core
        rest, discarded = vpns, EMPTY
        if core.zapper.moves:
            rest, discarded = await self._move_out(vpns, hashes)
        if len(rest):
            # An app discard of a page seen during the move counts for the zap's settling too.
            left = await self._zap_runs(rest, discarded)
            await self._settle_unzapped(left, len(rest) - len(left), len(rest))
        core.evicted.wake()
        core.stats.zap_batches += 1
        core.stats.largest_batch = max(core.stats.largest_batch, len(vpns))
        # Threads whose faults were left blocked meanwhile (a write, or a
        # read that came before the zap's end) retry now: a MISSING fault,
        # served from the copy. Only those: a wake per run of the batch cost
        # an ioctl per page of a random batch. (One zap at a time: every
        # ZAPPING page is this batch's, or one mremap moved, woken anyway.)
        if core.zap_waiters:
            waiting = np.array(sorted(core.zap_waiters), np.int64)
            core.zap_waiters.clear()
            core.uffd.wake_runs(*runs(waiting))

    async def _move_out(self, vpns: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The agent moves the pages out (MOVE_OUT) while the fault loop
        reads nothing (readgate.py). Returns the pages to zap (where the
        move stopped) and those the app discarded meanwhile."""
        core = self.core
        # A move raises no REMOVE: any read before the hold is the app's.
        self.removes.begin(vpns, own_events=False)
        try:
            async with core.reads.hold():
                held = time.monotonic()
                # Events read while the fault loop finished its round may
                # have moved pages of the batch (REMAP) or unmapped them.
                zapping = core.pt.states(vpns) == State.ZAPPING
                vpns, hashes = vpns[zapping], hashes[zapping]
                moved, busy, error, changed = await self._move_around_busy(vpns, hashes)
                for indices, content in changed:
                    await self._keep_device_writes(vpns[indices], content)
                core.stats.fault_gate_seconds += time.monotonic() - held
        finally:
            discarded = self.removes.end()
        self._settle_zapped(vpns[moved], discarded)
        self._settle_moved_away(discarded)
        core.stats.moved_out += int(moved.sum())
        await self.pinning.pin_busy(vpns[busy])
        rest = vpns[~moved & ~busy]
        rest = rest[core.pt.states(rest) == State.ZAPPING]   # (pin_busy may have let an event be read)
        if error in (errno.ENOENT, errno.EAGAIN, errno.EBUSY, errno.ENOSPC):
            # A mapping gone (ENOENT), an event of the app's queued
            # (EAGAIN: an munmap, mremap, discard or fork in between, its
            # event read next), more busy pages than a batch skips
            # (EBUSY: never zapped, see _move_around_busy), or more pages
            # a device changed than the agent keeps at once (ENOSPC: the
            # rest may have been written by a device too). The rest stays
            # resident, to be chosen again: a zap would come later, when
            # the app may have mapped new memory there.
            core.release(rest, State.ZAPPING)
            await core.unprotect(rest)
            return EMPTY, discarded
        return rest, discarded

    async def _move_around_busy(self, vpns: np.ndarray, hashes: np.ndarray
                                ) -> tuple[np.ndarray, np.ndarray, int, list[tuple[np.ndarray, PageBuffer]]]:
        """The agent moves the pages out in order. Where it finds a page
        busy (EBUSY: pinned for I/O, by an O_DIRECT read in flight or
        io_uring's registered buffers, or shared copy-on-write since the
        batch was checked), that page and the rest of its run are skipped
        (a pinned buffer is pages in a row), and the move goes on with the
        next run, for up to MOVE_BUSY_MAX such runs. Returns which pages
        moved, which were skipped as busy, the errno that stopped the move
        (0: none), and the pages moved that a device changed since their
        copy (their indices among vpns, their content)."""
        moved = np.zeros(len(vpns), bool)
        busy = np.zeros(len(vpns), bool)
        changed: list[tuple[np.ndarray, PageBuffer]] = []
        run_ends = np.flatnonzero(np.diff(vpns) != 1) + 1   # where each run after the first starts
        at, skipped = 0, 0
        while at < len(vpns):
            result = await self.core.zapper.move_out(*_byte_ranges(vpns[at:]), hashes[at:], self._read_changed)
            changed += [(indices + at, content) for indices, content in result.changed]
            done = result.bytes >> PAGE_SHIFT
            moved[at:at + done] = True
            at += done
            if result.error != errno.EBUSY or at >= len(vpns) or skipped >= MOVE_BUSY_MAX:
                return moved, busy, result.error, changed
            next_run = run_ends[np.searchsorted(run_ends, at, side="right"):]
            end = int(next_run[0]) if len(next_run) else len(vpns)
            busy[at:end] = True
            skipped += 1
            at = end
        return moved, busy, 0, changed

    async def _keep_device_writes(self, vpns: np.ndarray, content: PageBuffer) -> None:
        """Pages the agent moved out whose content is not their copy: a
        device wrote them after the copy was made, through a pin taken
        before _protect (an O_DIRECT or io_uring read in flight; the
        write-protect bit does not stop a device) and dropped before the
        move (the move refuses a pinned page). What the device wrote is
        the page now: it goes back in, resident and writable, its stale
        copy dropped, as a write during EVICTING keeps its page (and, a
        write, it ends a DISCARDABLE hint). Where UFFDIO_COPY cannot put it
        back (EAGAIN: an event of the app's is queued, unread under the
        gate) it leaves with the device's content in its slot instead.
        Under the gate: no event is read, so the pages are still ZAPPING
        where the move took them."""
        core = self.core
        core.stats.device_written += len(vpns)
        log.info("%s: %d pages were written by a device (I/O pinned before their eviction) after their copy: "
                 "kept with what it wrote", core.label, len(vpns))
        back = np.zeros(len(vpns), bool)
        for i, vpn in enumerate(vpns.tolist()):
            in_place, _, _ = core.copy_run(vpn, 1, content.addr + i * PAGE_SIZE, on_eagain=lambda: False)
            back[i] = in_place[0]
        core.pt.set_flag(vpns, Flag.DISCARDABLE, False)
        core.release(vpns[back], State.ZAPPING)
        if not back.all():
            await self._store_device_writes(vpns[~back], content, np.flatnonzero(~back))

    async def _store_device_writes(self, vpns: np.ndarray, content: PageBuffer, positions: np.ndarray) -> None:
        """The device's content of ZAPPING pages (the pages of `content` at
        `positions`) written to their slots, over the stale copy where the
        slot is theirs alone (under the gate no event can free it
        meanwhile), else (a zero page's, which has none, or one that
        another reference holds: a forked child's, a demotion's, a WILLNEED
        read's) to a new slot; they settle as SWAPPED with the rest of the
        move. If the store cannot take them, no right copy is left anywhere
        but here: the target is killed (BackendError) rather than served
        the stale one."""
        core = self.core
        addrs = content.addrs(positions)
        slots = core.pt.slots(vpns)
        shared = slots[(slots != NO_SLOT) & (core.slots.counts[slots] > 1)]
        new = (slots == NO_SLOT) | np.isin(slots, shared)
        if new.any():
            slots[new] = self._slots_for_device_writes(int(new.sum()))
        try:
            await io_to_the_end(core.backend.write, slots, addrs)
        except BackendError as exc:
            core.stats.backend_failures += 1
            if exc.may_land:   # (its slots and buffer are never used again: the write may land later)
                core.slots.set_aside(slots[~new])
                self._held_for_late_writes.append(content)
            else:
                core.slots.free(slots[new])
            raise BackendError(f"a page a device wrote during its eviction cannot be stored ({exc})") from exc
        except BaseException:
            core.slots.free(slots[new])
            raise
        old = core.pt.slots(vpns[new])
        core.slots.free(old[old != NO_SLOT])
        core.pt.set(vpns, State.ZAPPING, slots)
        core.slots.evicted_at[slots] = core.evictions & 0xFFFFFFFF

    def _slots_for_device_writes(self, count: int) -> np.ndarray:
        core = self.core
        try:
            return core.slots.alloc(count)
        except BackendFull:
            core.free_clean_copies()   # (slots kept only to save a write)
        try:
            return core.slots.alloc(count)
        except BackendFull as exc:
            raise BackendError(f"no swap slot for a page a device wrote during its eviction ({exc})") from None

    async def _zap_runs(self, vpns: np.ndarray, discarded_before: np.ndarray) -> np.ndarray:
        """Zap the runs of vpns and settle the pages zapped. Returns the
        pages the zap left in place (still ZAPPING)."""
        addrs, sizes = _byte_ranges(vpns)
        self.removes.begin(vpns)
        try:
            nbytes = await self.core.zapper.zap(addrs, sizes)
        finally:
            # zap() has returned, so every REMOVE it caused has been read
            # (the zapping thread waits in the kernel until its event is read).
            discarded = self.removes.end()
        if len(discarded_before):
            discarded = union(discarded, discarded_before)
        done = nbytes >> PAGE_SHIFT
        self._settle_zapped(vpns[:done], discarded)
        left = vpns[done:]
        if len(left):
            # The zap stopped in a range: the kernel counts whole ranges
            # only, and MADV_DONTNEED goes mapping by mapping, stopping at
            # one it refuses (mlocked: EINVAL) after emptying those before
            # it. So the pages of the range gone from the page tables were
            # emptied: their copy is all there is.
            left = left[self.core.pt.states(left) == State.ZAPPING]
            gone = ~self.core.still_mapped(left)
            self._settle_zapped(left[gone], discarded)
            left = left[~gone]
        self._settle_moved_away(discarded)
        self.core.stats.zap_ranges += int(np.searchsorted(np.cumsum(sizes), nbytes, side="right"))   # done whole
        return left

    def _settle_zapped(self, done: np.ndarray, discarded: np.ndarray) -> None:
        """Zapped pages become SWAPPED (FRESH if they had no content to keep,
        or if the app discarded them too: they read as zero)."""
        core, pt = self.core, self.core.pt
        # Only pages still ZAPPING are ours to settle: an UNMAP or REMAP in
        # between has dealt with the others (and their slots).
        done = done[pt.states(done) == State.ZAPPING]
        core.emptied(done, discarded)
        core.left_residency(done)
        core.trace.evicted(done)
        core.stats.pages_out += len(done)
        core.evictions += len(done)

    def _settle_moved_away(self, discarded: np.ndarray) -> None:
        """Pages of the batch that mremap moved while the zap or move was in
        flight stayed ZAPPING where they went (events.py); it has returned,
        so nothing can land on them any more: settle those still ZAPPING."""
        core = self.core
        for moved in core.zapping_moved:
            core.settle_moved_zapping(moved[core.pt.states(moved) == State.ZAPPING], discarded)
            # A writer blocked there meanwhile (a write to a ZAPPING page
            # waits) faults again: on the copy, or on a resident page.
            core.uffd.wake_runs(*runs(moved))
        core.zapping_moved.clear()

    async def _settle_unzapped(self, failed: np.ndarray, nzapped: int, total: int) -> None:
        """The zap left these in place (ZAPPING): locked pages are pinned,
        the rest stay resident."""
        core = self.core
        failed = await self.pinning.pin_locked(failed)
        if len(failed):
            log.warning("%s: zap stopped after %d of %d pages", core.label, nzapped, total)
            core.release(failed, State.ZAPPING)
            await core.unprotect(failed)

    async def _abort(self, vpns: np.ndarray, kind: str, why: str) -> None:
        core = self.core
        core.release(vpns, State.EVICTING)
        await core.unprotect(vpns)
        self._pause(kind, why)

    def _pause(self, kind: str, why: str) -> None:
        """Eviction stops until resume(). Each kind of pause is warned of at
        most every PAUSE_WARN_SECONDS: the daemon retries as slots are
        freed, and a store that stayed full (or filled again at each
        retry) warned ten times a second."""
        core, now = self.core, time.monotonic()
        if now - self._warned.get(kind, -PAUSE_WARN_SECONDS) >= PAUSE_WARN_SECONDS:
            log.warning("%s: %s", core.label, why)
            self._warned[kind] = now
        self._paused_at = now
        # Full: slots kept only to save a write go back (and the room their
        # entries take), and pages read back meanwhile give theirs up. Kept,
        # they held the store full, and nothing freed a slot for eviction to
        # go on.
        core.clean.suspended = kind in (FULL, STORE_FULL)
        if core.clean.suspended:
            core.free_clean_copies()
        core.eviction_paused, core.pause_kind = why, kind
        core.on_pause()

    def resume(self, slots_free: bool = True) -> bool:
        """Try again: paused on a store out of slots, once slots are free;
        on one out of room of another kind or failing, once it was left
        alone for BACKEND_RETRY_SECONDS (a retry packs a batch). False when
        that time is still to come (ask again later)."""
        core = self.core
        if not core.eviction_paused:
            return True
        if core.pause_kind == FULL:
            if not slots_free:
                return True   # (the next freed slot asks again)
        elif time.monotonic() - self._paused_at < BACKEND_RETRY_SECONDS:
            return False
        core.eviction_paused = core.pause_kind = ""
        core.clean.suspended = False
        core.note_resident()
        return True


def _byte_ranges(vpns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs of sorted vpns as (start addresses, lengths in bytes)."""
    starts, lengths = runs(vpns)
    return (starts << PAGE_SHIFT).astype(np.uint64), (lengths << PAGE_SHIFT).astype(np.uint64)


def _among(vpns: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Which of the sorted vpns are in the sorted, non-empty `others` (np.isin
    sorts both again: ~25 us a call)."""
    at = np.minimum(np.searchsorted(others, vpns), len(others) - 1)
    return others[at] == vpns


def first_of(group: BaseExceptionGroup) -> BaseException:
    """A nursery's first exception, unwrapped from its group(s)."""
    first = group.exceptions[0]
    return first_of(first) if isinstance(first, BaseExceptionGroup) else first
