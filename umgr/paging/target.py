"""One managed process: its shared state (TargetCore) and the parts that
work on it, each with one job:

    FaultService  the fault loop: reads messages, serves faults (faults.py)
    MemoryEvents  REMOVE, UNMAP, REMAP, FORK from the app      (events.py)
    Evictor       keeps resident pages under the budget     (evictor.py)
    Pinning       pages whose zap would free nothing        (pinning.py)
    Hints         umgr_advise: COLD, WILLNEED, DISCARDABLE  (advice.py)
    RemoveAttribution  own zap's REMOVE events vs the app's (removes.py)

Target builds them, wires each one's dependencies through its constructor,
and runs two trio tasks: the fault loop and the eviction task (queued hints
first, then eviction while over budget). The daemon's lifecycle starts and
stops those tasks (umgr/daemon/lifecycle.py). docs/architecture.md has the
data flow, page states and race rules.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import trio

from umgr import cpuclock
from umgr.errors import TargetGone
from umgr.kernel import uffd as uffdmod
from umgr.paging.advice import Hints
from umgr.paging.budget import Budget
from umgr.paging.core import TargetCore
from umgr.paging.events import ForkedMemory, MemoryEvents
from umgr.paging.evictor import Evictor
from umgr.paging.faults import FaultService
from umgr.paging.pagetable import PAGE_SHIFT, PageTable, State, page_up
from umgr.paging.pinning import Pinning
from umgr.paging import recovery
from umgr.paging.removes import RemoveAttribution
from umgr.paging.tuning import BUFFERS_IDLE_SECONDS, CLEAN_COPIES, SMALLEST_ADOPTED_REGION, SPIN_SECONDS
from umgr.policies import GuardedEviction, GuardedPrefetch
from umgr.sizes import format_size

log = logging.getLogger("umgr.target")

REGISTER_MODE = uffdmod.UFFDIO_REGISTER_MODE_MISSING | uffdmod.UFFDIO_REGISTER_MODE_WP
# Where check_mm() probes: 1 MiB, above mmap_min_addr and below where x86-64
# programs map anything; any page no region covers would do.
MM_PROBE_VPN = 0x100


def _size_covering(sizes: list[int], share: float) -> int:
    """The largest size s such that the sizes (sorted) of s or more add up
    to `share` of their total."""
    total, held = sum(sizes), 0
    for size in reversed(sizes):
        held += size
        if held >= share * total:
            return size
    return sizes[0]


class Target:
    def __init__(self, *, pid: int, uffd: uffdmod.Userfaultfd, pidfd: int, mem_fd: int, budget_pages: int,
                 backend, prefetch: GuardedPrefetch, eviction, label: str, owner: tuple[int, int] = (0, 0),
                 spin: float = SPIN_SECONDS, clean_copies: str = CLEAN_COPIES,
                 pages: PageTable | None = None, on_pause=lambda: None, name: str = "", fast_path: bool = True,
                 joint=None):
        """`mem_fd`: the process's /proc/PID/mem, opened when it was
        checked (pages are read through it, so never from a program it
        exec'd). `owner`: its uid and gid. `eviction`: an EvictionPolicy
        (guarded here). `pages`: the page table to start from (a forked
        child's, from PageTable.forked(); its slots must already hold the
        child's references). `on_pause`: called when eviction pauses (full
        or failing backend). `name`: its metrics label (umgr.daemon.names).
        `fast_path`: plain faults are served in C (umgr/paging/fastpath.py).
        `joint`: the daemon's JointRounds (umgr/paging/joint.py), None: this
        target's faults are served alone."""
        self.pid = pid
        self.name = name
        self.pidfd = pidfd
        self.mem_fd = mem_fd
        self.owner = owner
        self.label = label
        self.command = read_cmdline(pid)
        self.started = time.monotonic()
        self.released = trio.Event()
        pt = pages if pages is not None else PageTable()
        guarded = GuardedEviction(eviction, target=label, resident=lambda: pt.vpns_in(State.RESIDENT))
        guarded.attach(pt.is_in_state)
        self.core = TargetCore(pid=pid, mem_fd=mem_fd, label=label, uffd=uffd, backend=backend, budget=Budget(budget_pages),
                               eviction=guarded, clean_copies=clean_copies, pt=pt, on_pause=on_pause)
        self._budget_before_stop = self.core.budget   # (what a clean stop lifts, and puts back if given up)
        # Why a new region may not be managed (a cap), or None: set by the
        # daemon (umgr/daemon/lifecycle.py), which sees every target.
        self.refuse_region: Callable[[int], str | None] = lambda npages: None
        self._refusal_logged = False
        self._small_mappings_told = False
        # The smallest mapping its maps scans manage, once found_small_mappings
        # lowered it for this target; None: the daemon's --min-region.
        self.scan_min_region: int | None = None
        self.removes = RemoveAttribution()
        self.events = MemoryEvents(self.core, self.removes)
        self.pinning = Pinning(self.core)
        self.faults = FaultService(self.core, self.events, self.pinning, prefetch, spin=spin, fast_path=fast_path,
                                   joint=joint)
        self.evictor = Evictor(self.core, self.pinning, self.removes)
        self.hints = Hints(self.core, self.evictor)
        self._zaps_to_settle = False   # taken back after a crash while the agent may still zap
        self._release_failed = False   # (logged once)
        self._eviction_idle_since: float | None = None   # when the eviction task began to wait, while it waits
        self._released_at: dict[str, float] = {}   # task -> the wait whose buffers went back
        self._journal = None           # where uffd messages are read (tables saved for a restart)
        if pages is not None:
            self.core.became_resident(pt.vpns_in(State.RESIDENT))
            self.core.may_share_pages = bool(pt.regions)   # a forked child's or a restarted daemon's

    # ---- what the daemon reads ----------------------------------------------
    @property
    def pt(self) -> PageTable:
        return self.core.pt

    @property
    def stats(self):
        return self.core.stats

    @property
    def uffd(self) -> uffdmod.Userfaultfd:
        return self.core.uffd

    @property
    def stopping(self) -> bool:
        """A clean stop is draining it (stop_evicting)."""
        return self.core.stopping

    @property
    def budget_pages(self) -> int:
        """Its budget: during a clean stop, the one it had before (the stop
        lifts it to let every page in, and a child forked meanwhile, the
        status and a restarted daemon are to see the real one)."""
        return (self._budget_before_stop if self.core.stopping else self.core.budget).pages

    @property
    def prefetch(self) -> GuardedPrefetch:
        return self.faults.prefetch

    @property
    def gone(self) -> bool:
        return self.core.gone

    @property
    def eviction_paused(self) -> str:
        return self.core.eviction_paused

    @property
    def owner_uid(self) -> int:
        return self.owner[0]

    def read_with_canary(self, addr: int) -> None:
        """Victims are read with process_vm_readv, proven to reach this
        process's mm by a token written at addr (the shim's probe page,
        which it keeps mapped and never uses) through mem_fd."""
        self.core.canary = addr

    def manages(self, addr: int) -> bool:
        """Whether the page at addr is in a managed (registered) region."""
        vpn = addr >> PAGE_SHIFT
        return not self.core.pt.gaps(vpn, vpn + 1)

    @property
    def has_zapper(self) -> bool:
        return self.core.zapper is not None

    # ---- what the daemon tells it ---------------------------------------------
    def attach_zapper(self, zapper) -> None:
        """The target's agent connected (a forked child's comes after its
        fork event): eviction can zap from now on. A forked child may come
        over its high mark (its parent's resident pages, counted in a budget
        of its own): it evicts now, not at its next fault."""
        self.core.zapper = zapper
        self.command = read_cmdline(self.pid)
        self.core.note_resident()

    def take_fork(self) -> ForkedMemory | None:
        """The oldest fork event's child uffd and memory, or None."""
        return self.events.forks.pop(0) if self.events.forks else None

    def drop_unnamed_forks(self) -> None:
        """The process's last fork made no child it could name (FORKED of
        pid 0): it failed after the kernel copied the child's memory (EAGAIN
        at a pids cgroup's limit), or a child made inside glibc died at
        once. The fork event the kernel sent for it, if any, names no child:
        left queued, it was taken by the next FORKED, whose child then
        failed its proof and was killed, and so was every later child. The
        shim makes one fork at a time and names each child before the next,
        so every fork event still queued is that one's, or one no FORKED
        will ever name (a raw clone's): all go."""
        dropped, self.events.forks = self.events.forks, []
        for fork in dropped:
            fork.close()
        if dropped:
            log.info("%s: a fork made no child to name; %d fork event(s) dropped", self.label, len(dropped))

    @property
    def unclaimed_managed(self) -> int:
        """Pages in the tables of its forks not named yet (daemon memory too)."""
        return sum(fork.pages.managed for fork in self.events.forks)

    def take_unclaimed_forks(self) -> list[ForkedMemory]:
        """Every fork whose child is not known yet: the target is going
        (its process died, perhaps between fork() and its FORKED)."""
        forks, self.events.forks = self.events.forks, []
        return forks

    def register(self, start: int, length: int) -> bool:
        """Register [start, start+length) in the target's mm and manage it.
        Pages already present start RESIDENT (PAGEMAP_SCAN says which)."""
        core = self.core
        start_vpn, npages = start >> PAGE_SHIFT, length >> PAGE_SHIFT
        known = core.pt.find(start_vpn)
        if known is not None and known.end >= start_vpn + npages:   # (the maps scan's mappings, mostly)
            return True
        # Only what no region covers is new: a covered page may be swapped
        # (e.g. moved here by mremap before a maps scan sees the mapping).
        for lo, hi in core.pt.gaps(start_vpn, start_vpn + npages) if npages > 0 else []:
            refusal = self.refuse_region(hi - lo)
            if refusal is not None:
                self._log_refusal(lo, hi, refusal)
                return False
            try:
                core.uffd.register(lo << PAGE_SHIFT, (hi - lo) << PAGE_SHIFT, REGISTER_MODE)
            except TargetGone:
                raise
            except OSError as exc:
                log.debug("%s: cannot register %#x-%#x: %s", self.label, lo << PAGE_SHIFT, hi << PAGE_SHIFT, exc)
                return False
            present = core.present_pages(lo, hi - lo)
            core.pt.add(lo, hi - lo, present)
            core.trace.region(lo, hi - lo)
            core.became_resident((np.flatnonzero(present) + lo).astype(np.int64))
        core.note_resident()
        return True

    def extends_managed(self, start: int, length: int) -> bool:
        """Whether [start, start+length) borders a managed region: a heap
        growing by small pieces (the shim reports mappings placed at a
        fixed address whatever their size) is managed piece by piece, as
        each is made, where the maps scan would find the merged mapping
        only after the app had filled it past its budget."""
        pt = self.core.pt
        end_vpn = page_up(start + length)
        return length > 0 and (pt.find((start >> PAGE_SHIFT) - 1) is not None or pt.find(end_vpn) is not None)

    def _log_refusal(self, lo: int, hi: int, refusal: str) -> None:
        """Once per target (the maps scan would repeat it every interval)."""
        level = logging.DEBUG if self._refusal_logged else logging.WARNING
        self._refusal_logged = True
        log.log(level, "%s: %s at %#x is not managed: %s", self.label, format_size((hi - lo) << PAGE_SHIFT),
                lo << PAGE_SHIFT, refusal)

    def smallest_region(self, min_region: int) -> int:
        """The smallest mapping managed for this target: scan_min_region,
        else the daemon's `min_region`."""
        return self.scan_min_region or min_region

    def found_small_mappings(self, ranges: list[tuple[int, int]], min_region: int, adapt: bool) -> bool:
        """The maps scan found these private anonymous mappings (start,
        end) below the smallest it manages. When those no region covers
        hold half the budget or more, the budget is a promise umgr does
        not keep. A program that opens its heap in small pieces does this:
        node's V8 reserves about 512 KiB at a time and opens 256 KiB of it
        with mprotect, so its heap is hundreds of 256 KiB mappings,
        bordered by PROT_NONE, that the kernel cannot merge. With `adapt`
        (--min-region not given) this target's scans then manage mappings
        down to the size that covers most of that memory, if it is
        SMALLEST_ADOPTED_REGION or more, starting with these (True: the
        daemon keeps that in the target's record); otherwise a warning,
        once, names the --min-region that would."""
        core = self.core
        if not core.budget.worth_a_warning(sum(hi - lo for lo, hi in ranges)):
            return False   # (the common case: no lookups)
        if self._small_mappings_told and not (adapt and self.scan_min_region is None):
            return False
        # (a piece of a managed region that mprotect split off is managed)
        unmanaged = [(lo, hi) for lo, hi in ranges if core.pt.find(lo >> PAGE_SHIFT) is None]
        nbytes = sum(hi - lo for lo, hi in unmanaged)
        if not core.budget.worth_a_warning(nbytes):
            return False
        covering = _size_covering(sorted(hi - lo for lo, hi in unmanaged), 0.9)
        if adapt and self.scan_min_region is None and covering >= SMALLEST_ADOPTED_REGION:
            self.scan_min_region = covering
            log.warning("%s: %s of its memory is in %d anonymous mappings smaller than --min-region (%s); "
                        "umgr manages those of %s and up from now on, so that its budget holds (--min-region "
                        "%s leaves them to the kernel, faster)", self.label, format_size(nbytes), len(unmanaged),
                        format_size(min_region), format_size(covering), format_size(min_region))
            for lo, hi in unmanaged:
                if hi - lo >= covering:
                    self.register(lo, hi - lo)
            return True
        if self._small_mappings_told:
            return False   # (with `adapt`, looked at again: the pieces may grow)
        self._small_mappings_told = True
        smallest = (f"{format_size(self.scan_min_region)}, the smallest it takes up for it" if self.scan_min_region
                    else f"--min-region ({format_size(min_region)})")
        log.warning("%s: %s of its memory is in %d anonymous mappings smaller than %s, which umgr does not "
                    "manage: its budget does not cover them. --min-region %s manages most of it", self.label,
                    format_size(nbytes), len(unmanaged), smallest, format_size(covering))
        return False

    def check_mm(self) -> None:
        """Raise TargetGone once the target's mm is gone. An exec of a
        program without the shim says so nowhere (the pidfd fires only at
        exit), but uffd ioctls answer ESRCH from then on. The probe is a
        WRITEPROTECT of a page no region covers: ENOENT while the mm lives
        (measured on Linux 6.18). It protects, never unprotects, so even a
        page mapped there could only take a harmless WP fault."""
        gaps = self.core.pt.gaps(MM_PROBE_VPN, MM_PROBE_VPN + 1)
        if gaps:
            self.core.uffd.writeprotect(MM_PROBE_VPN << PAGE_SHIFT, 1 << PAGE_SHIFT, True)

    async def advise(self, vpn_lo: int, vpn_hi: int, advice: int) -> None:
        await self.hints.advise(vpn_lo, vpn_hi, advice)

    def recheck(self) -> None:
        self.pinning.recheck()

    def resume_eviction(self, slots_free: bool = True) -> bool:
        return self.evictor.resume(slots_free)

    # ---- a clean stop (umgr/daemon/shutdown.py) ------------------------------------
    def stop_evicting(self) -> None:
        """Nothing is evicted from now on (a batch in flight finishes) and
        no fill waits at the budget."""
        core = self.core
        if not core.stopping:
            self._budget_before_stop = core.budget
            core.stopping = True
            core.budget = Budget(0)
            core.evicted.wake()

    def set_budget(self, budget_pages: int) -> None:
        """A new budget (0: none), at once: a lower one wakes the evictor,
        a higher one the faults waiting at the old one. (Never during a
        clean stop: the daemon refuses new budgets then.)"""
        core = self.core
        core.budget = Budget(budget_pages)
        core.trace.budget(budget_pages)
        core.note_resident()
        core.evicted.wake()

    def resume_evicting(self) -> None:
        """The stop was given up: the budget holds again."""
        core = self.core
        if core.stopping:
            core.stopping = False
            core.budget = self._budget_before_stop
            core.note_resident()

    @property
    def pages_in_flight(self) -> int:
        """Pages an eviction batch is taking out now."""
        return self.pt.count(State.EVICTING) + self.pt.count(State.ZAPPING)

    def bring_all_in(self) -> None:
        """Queue every swapped page to come back, on the eviction task (it
        owns the staging buffer), unless that is queued already."""
        if self.hints.queued == 0:
            for region in list(self.pt.regions):
                self.hints.bring_in(region.vpn, region.end)

    @property
    def unclaimed_forks(self) -> int:
        """Child uffds from fork events whose FORKED has not come yet."""
        return len(self.events.forks)

    async def detach(self) -> None:
        """Tell the shim to go on unmanaged (every page must be back)."""
        await self.core.zapper.detach()

    # ---- taken back after a daemon crash (umgr/paging/recovery.py) ----------------
    def recover(self, agent_may_zap: bool) -> None:
        """Settle the table a dead daemon left by what the kernel says, and
        make every blocked thread fault again. Pages whose zap the shim's
        agent may still be doing (`agent_may_zap`) stay ZAPPING until the
        eviction task has seen the agent finish (settle_zaps)."""
        if self._journal is not None:
            unhandled = self._journal.unhandled()
            if len(unhandled):
                log.info("%s: applying %d message(s) the dead daemon read and had not applied", self.label,
                         len(unhandled))
                self._replay(unhandled)
            self._journal.clear()
        self._zaps_to_settle = agent_may_zap and self.pt.count(State.ZAPPING) > 0
        self._settle(zapping=not self._zaps_to_settle)

    def _replay(self, messages) -> None:
        """Apply the dead daemon's unapplied messages. The eviction order,
        seeded from the saved table, names pages by address: a replayed
        REMAP moves resident pages, and the order must name them where they
        are now (as the live handler does, events.py). Left naming the old
        addresses, it would hold none of them: every later fault would
        evict the page it had just brought in, one page at a time."""
        core = self.core
        before = self.pt.vpns_in(State.RESIDENT)
        core.slots.free(recovery.replay(self.pt, messages))
        after = self.pt.vpns_in(State.RESIDENT)
        core.left_residency(np.setdiff1d(before, after, assume_unique=True))
        core.became_resident(np.setdiff1d(after, before, assume_unique=True))

    def read_events_into(self, journal) -> None:
        """Read uffd messages into `journal` (a tablefile.EventJournal), so
        that a message read when the daemon dies outlives it. A journal
        holding a dead daemon's messages is replayed by recover() first."""
        self._journal = journal
        self.core.uffd.read_into(journal.address, journal.messages)

    def _settle(self, zapping: bool) -> None:
        core = self.core
        freed, resident = recovery.settle(core.pt, core.present_pages, zapping)
        core.slots.free(freed)
        core.became_resident(resident)
        recovery.wake_all(core.pt, core.uffd)
        core.note_resident()

    async def settle_zaps(self) -> None:
        """The agent answers in order: once it answers an empty ZAP, a zap
        it was doing for the dead daemon is over, and the pages it left
        ZAPPING can be settled."""
        if self._zaps_to_settle:
            await self.core.zapper.barrier()
            self._zaps_to_settle = False
            self._settle(zapping=True)

    # ---- its tasks ----------------------------------------------------------------
    async def fault_loop(self) -> None:
        await self.faults.run()

    async def eviction_loop(self) -> None:
        core = self.core
        cpuclock.EVICTING_FOR.set(core.stats)   # (this task's context, and that of those it starts)
        try:
            await self.settle_zaps()
            while True:
                self._eviction_idle_since = time.monotonic()
                try:
                    await core.eviction_wanted()
                finally:
                    self._eviction_idle_since = None
                await self.hints.serve_queued()
                await self.evictor.evict_over_budget()
        except TargetGone:
            core.gone = True

    def release_idle_buffers(self, now: float) -> None:
        """The buffers of the fault loop and of the eviction task give
        their memory back once the task has waited for BUFFERS_IDLE_SECONDS
        between rounds (once a wait). Called from another task (the maps
        scan), so only a task parked between its rounds is touched: then
        nothing of its buffers is in flight (a round waits for its backend
        I/O, io_to_the_end, and for its C call; a readv abandoned on cancel
        ends the task). A refusal only keeps the memory."""
        if self.core.gone:   # (its buffers may be closed)
            return
        if self._idle_long(self.faults.asleep_since, now, "faults"):
            self._release(self.faults.release_buffers)
        if self._idle_long(self._eviction_idle_since, now, "eviction"):
            self._release(self.evictor.release_buffers)
            self._release(self.hints.release_buffers)

    def _release(self, release: Callable[[], None]) -> None:
        try:
            release()
        except (OSError, ValueError) as exc:   # (ValueError: a closed mapping)
            if not self._release_failed:
                log.warning("%s: buffers' memory not given back: %s", self.label, exc)
            self._release_failed = True

    def _idle_long(self, since: float | None, now: float, task: str) -> bool:
        """The task has waited long enough, and this wait's release is not done yet."""
        if since is None or now - since < BUFFERS_IDLE_SECONDS or self._released_at.get(task) == since:
            return False
        self._released_at[task] = since
        return True

    # ---- teardown ----------------------------------------------------------------
    def mark_gone(self) -> None:
        self.core.gone = True

    def release_all(self) -> None:
        """The target's mm is gone: free every slot and descriptor."""
        core = self.core
        core.gone = True
        core.pt.clear(core.slots.free)
        self.faults.close()   # the evictor's batch buffer stays mapped: an abandoned readv may still write it
        self.events.close()
        self.hints.close()
        core.uffd.close()
        if core.zapper is not None:
            core.zapper.close()
        self.released.set()


# The most of a command line kept (for status, logs and metrics): a
# program's arguments may be megabytes.
CMDLINE_MAX = 4096


def read_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            line = f.read(CMDLINE_MAX + 1)
    except OSError:
        return "?"
    cut = len(line) > CMDLINE_MAX
    text = line[:CMDLINE_MAX].replace(b"\0", b" ").decode(errors="replace").strip()
    return text + " ..." if cut else text
