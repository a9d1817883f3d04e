"""What every part of one target shares: its uffd, page table, backend,
budget, eviction policy and stats, and the page operations more than one
part needs (release from an eviction batch, write-protect, the clean-copy
bookkeeping, copying a run in).

Each part (fault service, evictor, pinning, hints) takes a TargetCore by
reference in its constructor. All run as trio tasks of one thread: state
changes only between awaits, so no locks.
"""
from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import numpy as np
import trio

from umgr.arrays import sparse_zeros, unique
from umgr.kernel import procmem
from umgr.kernel import uffd as uffdmod
from umgr.kernel.uffd import Userfaultfd
from umgr.paging.budget import Budget
from umgr.paging.cleancopies import CleanCopies
from umgr.paging.clusternotes import ClusterNotes
from umgr.paging.pagetable import NO_SLOT, PAGE_SHIFT, PAGE_SIZE, Flag, PageTable, State, runs
from umgr.paging.readgate import ReadGate
from umgr.paging.stats import TargetStats
from umgr.paging.tuning import RESUME_MIN_SLOTS
from umgr.trace import NO_TRACE

log = logging.getLogger("umgr.target")

# Mapped, but with no memory of the target's own: not counted resident.
UNCOUNTED = (State.ZERO, State.SHARED)

NO_BUDGET = Budget(0)   # (TargetCore.fill_budget while eviction is paused)
# Kinds of eviction pause (TargetCore.pause_kind; eviction_paused starts with one).
FULL = "swap full"                # the store has no free slot
STORE_FULL = "store full"         # the store is out of room of another kind (a memory cap)
BACKEND_ERROR = "backend error"   # a write failed


def room_to_resume(slots) -> bool:
    """Whether a store's free slots are enough for eviction paused on it
    being full to try again: RESUME_MIN_SLOTS, or an eighth of a smaller
    store (slots set aside for good must not keep it paused)."""
    return slots.free_count >= min(RESUME_MIN_SLOTS, max(slots.capacity // 8, 1))


class Wakeup:
    """One task waits (with a timeout) for something another task signals."""

    def __init__(self):
        self._scope: trio.CancelScope | None = None

    async def wait(self, until: Callable, timeout: float) -> None:
        """Await until(), for at most `timeout`, or until wake()."""
        with trio.move_on_after(timeout) as self._scope:
            await until()
        self._scope = None

    def wake(self) -> None:
        if self._scope is not None:
            self._scope.cancel()


class Busy:
    """Counts operations in flight; others can wait until there are none."""

    def __init__(self):
        self._count = 0
        self._idle = trio.Event()
        self._idle.set()

    def __enter__(self):
        if self._count == 0:
            self._idle = trio.Event()
        self._count += 1

    def __exit__(self, *exc):
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    async def until_idle(self) -> None:
        while self._count:
            await self._idle.wait()


class Share:
    """Of the latest events (the counts halve past MEMORY events), how many
    were of a kind."""
    MEMORY = 4096

    def __init__(self):
        self.events = 0
        self.of_kind = 0

    def count(self, events: int, of_kind: int) -> None:
        self.events += events
        self.of_kind += of_kind
        if self.events > self.MEMORY:
            self.events //= 2
            self.of_kind //= 2

    def percent(self, unknown: int) -> int:
        """The share in percent, or `unknown` before 64 events."""
        return self.of_kind * 100 // self.events if self.events >= 64 else unknown


class TargetCore:
    def __init__(self, *, pid: int, label: str, uffd: Userfaultfd, backend, budget: Budget,
                 eviction, clean_copies: str, pt: PageTable, on_pause: Callable[[], None] = lambda: None,
                 mem_fd: int = -1):
        self.pid = pid
        self.mem_fd = mem_fd              # /proc/PID/mem of the mm the uffd belongs to (daemon/peer.py)
        self.canary = 0                   # the shim's set-aside page: evictions read with checked_readv (0: through mem_fd)
        self.label = label
        self.uffd = uffd
        self.backend = backend
        self.slots = backend.slots
        self.budget = budget
        self.eviction = eviction          # a policies.GuardedEviction
        self.pt = pt
        self.stats = TargetStats()
        self.clean = CleanCopies(clean_copies, self.stats)   # whether pages read back keep their slot (cleancopies.py)
        self.trace = NO_TRACE             # umgr.trace: faults and evictions, if recorded
        self.zapper = None                # set when the agent attaches (or remote zap)
        self.gone = False
        self.eviction_paused = ""         # why eviction cannot run now, "" if it can
        self.pause_kind = ""              # its kind (FULL, ...), "" when it runs
        self.stopping = False             # the daemon stops cleanly: nothing is evicted any more
        self.on_pause = on_pause          # told when eviction pauses (the daemon retries it)
        self.no_victims = False           # the evictor's last try found nothing to evict
        # Whether a resident page may be shared copy-on-write with another
        # process: once this one forked, or if its table was made elsewhere
        # (a forked child's, a restarted daemon's). Until then a page that came
        # in by UFFDIO_COPY is a private page of its own (pinning.py).
        self.may_share_pages = False
        self.reads = ReadGate()           # the fault loop reads the uffd only while it is open
        self.zapping_moved: list[np.ndarray] = []   # where mremap put ZAPPING pages while their zap was in flight
        self.zap_waiters: set[int] = set()   # pages whose faults were left blocked while they were ZAPPING
        # vpn ranges the app discarded since the pinning's last recheck: an
        # MADV_FREE among them may have left pages in use with no fault.
        self.app_discarded: list[tuple[int, int]] = []
        self.ksm_mergeable = False        # KSM may merge its pages: write-protection sees no write there
        self.evictions = 0                # pages evicted so far: the clock of refault distances
        self.refaults = Share()           # of the latest faults on swapped pages, those back soon (near)
        self.cluster_notes = ClusterNotes()   # whether lone faults' blocks are wanted (fastpath.py)
        self.fill_reads = Busy()          # the fault path's backend reads in flight
        self.evicted = Wakeup()           # the fault path waiting at the budget, woken by a zap
        self._evict_wanted = trio.Event()

    # ---- budget -------------------------------------------------------------
    @property
    def fill_budget(self) -> Budget:
        """The budget pages coming in are held to (fast-path calls,
        prefetch): none while eviction is paused on a full store with too
        few slots free to try again (room_to_resume). No page can leave
        then, and held to the budget every fault came in alone through the
        full path: a program whose swap filled ran 7x slower. Once pages
        read back have freed enough slots, fills are held to the budget
        again until eviction resumes. Backpressure and eviction go by
        `budget`."""
        if self.pause_kind == FULL and not room_to_resume(self.slots):
            return NO_BUDGET
        return self.budget

    def over_budget(self) -> bool:
        return self.budget.over(self.pt.resident)

    def note_resident(self) -> None:
        """After pages came in: track the peak, wake the evictor if needed."""
        resident = self.pt.resident
        if resident > self.stats.peak_resident:
            self.stats.peak_resident = resident
        if self.over_budget():
            self._evict_wanted.set()

    def want_eviction(self) -> None:
        self._evict_wanted.set()

    async def eviction_wanted(self) -> None:
        await self._evict_wanted.wait()
        self._evict_wanted = trio.Event()

    def can_evict(self) -> bool:
        return self.zapper is not None and not self.eviction_paused and not self.stopping

    # ---- residency ----------------------------------------------------------
    def became_resident(self, vpns: np.ndarray) -> None:
        """Pages (sorted) are now RESIDENT candidates for the eviction policy."""
        self.eviction.on_resident(np.asarray(vpns, np.int64))

    def refaulted(self, vpns: np.ndarray, slots: np.ndarray) -> None:
        """Faulting pages (sorted) came back from these slots: tell the
        eviction policy how long they were out (pages evicted since), and
        count those back soon (self.refaults)."""
        if len(vpns):
            now = np.uint32(self.evictions & 0xFFFFFFFF)
            distances = (now - self.slots.evicted_at[slots]).astype(np.int64)
            near = int((distances <= self.pt.resident).sum())
            self.stats.near_refaults += near
            self.refaults.count(len(vpns), near)
            self.cluster_notes.came_back(vpns, self.pt.resident)
            if self.eviction.wants_refaults:
                self.eviction.on_refault(vpns, distances)

    def left_residency(self, vpns: np.ndarray) -> None:
        """Pages left the resident set (evicted, unmapped, discarded, moved)."""
        if len(vpns):
            self.eviction.on_removed(np.asarray(vpns, np.int64))

    def present_pages(self, start_vpn: int, npages: int) -> np.ndarray:
        """Which pages of the range are in memory (PAGEMAP_SCAN). A region's
        size of bools, backed only where pages are present."""
        present = sparse_zeros(npages, bool)
        # category_mask requires every bit; anyof is "present or (kernel-)swapped".
        in_memory = procmem.PAGE_IS_PRESENT | procmem.PAGE_IS_SWAPPED
        ranges = procmem.pagemap_scan(self.pid, start_vpn << PAGE_SHIFT, (start_vpn + npages) << PAGE_SHIFT,
                                      0, in_memory, category_anyof=in_memory)
        for lo, hi, _ in ranges:
            present[(lo >> PAGE_SHIFT) - start_vpn:(hi >> PAGE_SHIFT) - start_vpn] = True
        return present

    def still_mapped(self, vpns: np.ndarray) -> np.ndarray:
        """Which of the sorted vpns have a page (present, or swapped by the
        kernel): present_pages over their span."""
        if not len(vpns):
            return np.zeros(0, bool)
        first = int(vpns[0])
        return self.present_pages(first, int(vpns[-1]) - first + 1)[vpns - first]

    def settle_moved_zapping(self, zapping: np.ndarray, discarded: np.ndarray) -> None:
        """ZAPPING pages that mremap moved away from the addresses their zap
        names (sorted vpns, where they are now), once no zap can land on
        them: a present one was missed (RESIDENT again), an absent one was
        emptied first (SWAPPED, or FRESH without a slot or if the app
        discarded it too)."""
        if not len(zapping):
            return
        present = self.still_mapped(zapping)
        self.release(zapping[present], State.ZAPPING)
        self.emptied(zapping[~present], discarded)

    def emptied(self, zapped: np.ndarray, discarded: np.ndarray) -> None:
        """ZAPPING pages (sorted) the zap or move emptied become SWAPPED in
        their slot, or FRESH (no content to keep, or discarded by the app
        too: they read as zero, and the slot is freed)."""
        slots = self.pt.slots(zapped)
        if len(discarded):
            gone = np.isin(zapped, discarded)
            self.slots.free(slots[gone & (slots != NO_SLOT)])
            slots[gone] = NO_SLOT
        held = slots != NO_SLOT
        self.pt.set(zapped[~held], State.FRESH, NO_SLOT)   # (a discarded one's freed slot goes too)
        self.pt.set(zapped[held], State.SWAPPED, slots[held])

    def release(self, vpns: np.ndarray, from_state: int) -> None:
        """Pages leave an eviction batch and are resident again."""
        vpns = np.asarray(vpns, np.int64)
        vpns = vpns[self.pt.states(vpns) == from_state]
        slots = self.pt.slots(vpns)
        self.slots.free(slots[slots != NO_SLOT])
        self.pt.set(vpns, State.RESIDENT, NO_SLOT)
        self.became_resident(vpns)

    # ---- clean copies (pages that kept their swap slot) ---------------------
    def drop_clean_copies(self, vpns: np.ndarray) -> None:
        """Pages whose writes umgr will not see any more (or that were just
        written) drop the swap copy they kept since they came in clean.
        Swapped and zapping pages keep theirs: it is their content."""
        vpns = np.asarray(vpns, np.int64)
        states, slots = self.pt.states(vpns), self.pt.slots(vpns)
        stale = (slots != NO_SLOT) & (states != State.SWAPPED) & (states != State.ZAPPING)
        if stale.any():
            self.slots.free(slots[stale])
            for state in unique(states[stale]).tolist():
                self.pt.set(vpns[stale & (states == state)], state, NO_SLOT)

    def keep_no_copies_if_merged(self) -> None:
        """Once the process lets KSM merge its memory, no write-protect bit
        is trusted to see a write: KSM maps a merged page without it, so a
        write to it raises no fault. Clean copies end for good, and those
        kept are dropped (a page taken for clean would leave with its old
        copy, the write lost), and so do DISCARDABLE hints on resident
        pages (one written unseen would be dropped). Asked before each
        eviction batch takes its pages as clean or discardable: a merge
        comes only after the process asked for it (or KSM was started)."""
        if self.ksm_mergeable or not procmem.ksm_may_merge(self.pid):
            return
        self.ksm_mergeable = True
        self.clean.mode = "never"
        freed = self.free_clean_copies()
        self.pt.clear_flag_everywhere(Flag.DISCARDABLE)
        log.info("%s: lets KSM merge its memory: pages read back keep no swap copy (%d dropped), and DISCARDABLE "
                 "hints leave resident pages alone", self.label, freed)

    def free_clean_copies(self) -> int:
        """The swap is full: resident pages give back the slots they kept
        (they stay write-protected; their next write just faults). Returns
        how many slots were freed."""
        taken = self.pt.take_kept_slots()
        self.slots.free(taken)
        return len(taken)

    # ---- write protection ---------------------------------------------------
    async def writeprotect(self, vpn: int, npages: int, protect: bool) -> int:
        """UFFDIO_WRITEPROTECT from a task other than the fault loop: while a
        non-cooperative event is queued the kernel answers EAGAIN, and the
        fault loop is the one that reads events, so yield to it and retry."""
        while True:
            err = self.uffd.writeprotect(vpn << PAGE_SHIFT, npages << PAGE_SHIFT, protect)
            if err != errno.EAGAIN:
                return err
            await trio.sleep(0)

    async def writeprotect_runs(self, starts: np.ndarray, lengths: np.ndarray, protect: bool) -> list[int]:
        """writeprotect() of each run (runs()' arrays), in one C call per
        stretch between EAGAINs; returns the indices of the runs no longer
        mapped (ENOENT)."""
        unmapped, at = [], 0
        while at < len(starts):
            done, err = self.uffd.writeprotect_runs(starts[at:], lengths[at:], protect)
            at += done
            if err == errno.EAGAIN:
                await trio.sleep(0)
            elif err:
                unmapped.append(at)
                at += 1
        return unmapped

    async def unprotect(self, vpns: np.ndarray) -> None:
        vpns = np.asarray(vpns, np.int64)
        self.pt.set_flag(vpns, Flag.DISCARDABLE, False)  # unprotected: writes unseen
        self.drop_clean_copies(vpns)
        await self.writeprotect_runs(*runs(vpns), False)

    # ---- copying in ---------------------------------------------------------
    def copy_run(self, vpn: int, npages: int, src: int, *, zeros: bool = False, protect: bool = False,
                 on_eagain: Callable[[], bool]) -> tuple[np.ndarray, np.ndarray, bool]:
        """UFFDIO_COPY (ZEROPAGE with `zeros`) pages [vpn, vpn+npages) from
        `src`, page by page past EEXIST, write-protected with `protect`.

        EAGAIN means a queued event or a short copy stopped by a present
        page: on_eagain() reads events where the caller can (the fault loop)
        and returns True to go on (the next try answers EEXIST for a present
        page), or False to stop. ENOENT: the range went away (its UNMAP
        follows). Returns (in place, put there by this call, stopped on EAGAIN)."""
        done = np.zeros(npages, bool)
        ours = np.zeros(npages, bool)
        mode = uffdmod.UFFDIO_COPY_MODE_WP if protect else 0
        i = 0
        while i < npages:
            dst, length = (vpn + i) << PAGE_SHIFT, (npages - i) << PAGE_SHIFT
            if zeros:
                packed = self.uffd.zeropage_fast(dst, length)
            else:
                packed = self.uffd.copy_fast(dst, src + (i << PAGE_SHIFT), length, mode)
            if not packed:  # the whole rest of the run
                done[i:] = ours[i:] = True
                break
            copied, err = uffdmod.unpack(packed)
            ok = copied >> PAGE_SHIFT
            done[i:i + ok] = ours[i:i + ok] = True
            i += ok
            if err == errno.EAGAIN:
                if on_eagain():
                    continue
                return done, ours, True
            if err == errno.EEXIST:
                done[i] = True  # present already: the page is there, wake its waiters
                self.uffd.wake((vpn + i) << PAGE_SHIFT, PAGE_SIZE)
                i += 1
            else:
                self.uffd.wake(dst, length)
                break
        return done, ours, False
