"""Targets from birth to release: build one from a HELLO or a fork, run its
tasks, watch its exit, release it. A bug met while serving one target kills
that target, never the daemon and the others."""
from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time

import trio

from umgr import protocol
from umgr.backends import Backend
from umgr.daemon.config import CHILD_HELLO_WAIT, EXEC_RELEASE_WAIT, DaemonConfig
from umgr.daemon.forks import Orphan, OrphanForks, ParentSettings
from umgr.daemon.idlepoll import IdlePoll, paging_load
from umgr.daemon.mapsreads import MapsReads
from umgr.daemon.names import target_name
from umgr.daemon.peer import Memory, Peer, Refused
from umgr.daemon.status import Totals, snapshot
from umgr.errors import BackendError, TargetGone
from umgr.kernel import maps, procmem
from umgr.kernel import uffd as uffdmod
from umgr.daemon.statedir import SavedTarget, StateDir
from umgr.paging.events import ForkedMemory
from umgr.paging.budget import MIN_BUDGET_BYTES
from umgr.paging.core import room_to_resume
from umgr.paging.joint import JointRounds
from umgr.paging.pagetable import PAGE_SHIFT, PageTable
from umgr.paging.target import Target
from umgr.paging.tuning import MAX_FILL_PAGES, RESUME_INTERVAL
from umgr.paging.zap import AgentZapper, RemoteZapper
from umgr.policies import GuardedPrefetch, load_eviction, load_prefetch
from umgr.sizes import format_size

log = logging.getLogger("umgr.daemon")

SAVED_MARGIN = 10.0   # seconds past the grace period a dead daemon's target may still come back


class Lifecycle:
    def __init__(self, config: DaemonConfig, backend: Backend, trace=None, state: StateDir | None = None):
        """`state`: where page tables persist, and the dead daemon's
        targets that may come back (None: tables in memory only)."""
        self.config = config
        self.backend = backend
        self.trace = trace                # a umgr.trace.TraceWriter, or None
        self.state = state
        self._saved: dict[Target, SavedTarget] = {}
        self._maps_reads: dict[Target, MapsReads] = {}   # the targets being scanned
        self.coming_back: set[int] = set()   # pids taken back (resume) and not yet started
        self.targets: dict[int, Target] = {}
        self.totals = Totals()
        self.targets_seen = 0
        self.internal_errors = 0          # targets killed because serving them failed
        self.idle = trio.Event()          # set whenever no target is left
        self.idle.set()
        self._children_waiting: dict[int, trio.Event] = {}
        self.orphans = OrphanForks()      # forks of parents that died before naming the child
        self._scopes: dict[Target, trio.CancelScope] = {}
        self._resume_wanted = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.release_watchers: list = []  # called with each target as it is released (metrics)
        backend.slots.on_release = self._want_resume
        self.idle_poll = IdlePoll(config.idle_poll)
        self.joint = JointRounds() if config.fast_path else None   # targets' faults served at once
        if config.fast_path:
            uffdmod.fast_io()   # the fast path's AIO context and eventfd, now rather than at the first fault

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The nursery every target runs in (until cancelled)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._resume_paused)
                nursery.start_soon(self.idle_poll.run, self._paging_load)
                if self.state is not None and self.state.saved:
                    nursery.start_soon(self._expire_saved)
                task_status.started()
                await trio.sleep_forever()
        finally:
            if self.joint is not None:
                self.joint.close()

    # ---- building targets -----------------------------------------------------
    def prefetch(self, name: str, label: str) -> GuardedPrefetch:
        """The prefetch policy a HELLO asks for (empty: the daemon's); a name
        that does not load is a bad HELLO, not the daemon's end."""
        name = name or self.config.policy
        options = self.config.policy_options if name == self.config.policy else {}
        try:
            return GuardedPrefetch(load_prefetch(name, **options), target=label, max_pages=MAX_FILL_PAGES,
                                   loaded_as=name)
        except Exception as exc:
            raise protocol.ProtocolError(f"policy {name!r} does not load: {exc}") from exc

    async def create(self, peer: Peer, mem_fd: int, uffd: uffdmod.Userfaultfd, max_resident: int,
                     prefetch: GuardedPrefetch, name: str = "") -> Target:
        """A target for a process's first HELLO (or its HELLO after exec,
        which ends the old image's target first). Takes mem_fd (the peer's
        checked /proc/PID/mem) and the peer's pidfd."""
        pidfd = peer.take_pidfd()
        try:
            old = self.targets.get(peer.pid)
            if old is not None:
                self.stop(old)
                with trio.move_on_after(EXEC_RELEASE_WAIT):
                    await old.released.wait()
            owner = (peer.uid, peer.gid)
            return self._new_target(peer.pid, owner, uffd, pidfd, mem_fd, self.budget(max_resident), prefetch,
                                    name=target_name(peer.pid, name))
        except BaseException:
            os.close(mem_fd)
            os.close(pidfd)
            raise

    def budget(self, asked: int) -> int:
        """A HELLO's budget: the daemon's --max-resident is a cap it may
        lower, never raise (0 asks for the daemon's), and MIN_BUDGET_BYTES
        the least it gets."""
        cap = self.config.max_resident
        if not asked:
            return cap
        return max(min(asked, cap) if cap else asked, MIN_BUDGET_BYTES)

    def _new_target(self, pid: int, owner: tuple[int, int], uffd, pidfd: int, mem_fd: int, budget: int,
                    prefetch: GuardedPrefetch, forked: PageTable | None = None, name: str = "",
                    saved: SavedTarget | None = None) -> Target:
        """A target, its table in files when tables persist (`saved`: one
        of the dead daemon's, loaded); a forked child's starts from
        `forked` (its slots already referenced for it)."""
        if saved is None:
            saved = self._save(pid, uffd, owner, budget, name)
        if saved is not None and saved.table is not None:
            pages = saved.table
        elif forked is not None:
            pages = forked if saved is None else _into_files(forked, saved.arrays)
        else:
            pages = PageTable(arrays=saved.arrays) if saved is not None else None
        eviction = load_eviction(self.config.eviction, **self.config.eviction_options)
        target = Target(pid=pid, owner=owner, uffd=uffd, pidfd=pidfd, mem_fd=mem_fd,
                        budget_pages=budget >> PAGE_SHIFT, backend=self.backend, prefetch=prefetch,
                        eviction=eviction, label=prefetch.target, clean_copies=self.config.clean_copies, pages=pages,
                        fast_path=self.config.fast_path, joint=self.joint,
                        on_pause=self._want_resume, name=name)
        target.refuse_region = lambda npages: self._past_managed_caps(target, npages)
        target.events.refuse_fork = lambda: self._fork_past_caps(target)
        if saved is not None:
            self._saved[target] = saved
            target.read_events_into(saved.journal)
        if self.trace is not None:
            target.core.trace = self.trace.target(pid, target.budget_pages, pages)
        return target

    def set_budget(self, target: Target, budget: int) -> None:
        """A running target's new budget in bytes (0: none), kept in its
        saved record so that a restarted daemon keeps it too."""
        target.set_budget(budget >> PAGE_SHIFT)
        self._keep(target, "its new budget", "give it the old one", budget_bytes=budget)

    def _keep(self, target: Target, what: str, otherwise: str, **info) -> None:
        """A setting a restarted daemon is to give the target too, kept in
        its saved record (if it has one); `what` and `otherwise` say what
        is lost if it cannot be."""
        saved = self._saved.get(target)
        if saved is None:
            return
        try:
            self.state.update_info(saved, dict(saved.info, **info))
        except OSError as exc:
            log.warning("%s: %s cannot be saved in %s (%s); a restarted daemon would %s", target.label, what,
                        self.state.path, exc.strerror or exc, otherwise)

    def _keep_scan_min_region(self, target: Target) -> None:
        self._keep(target, "that it manages small mappings", "leave them to the kernel until they add up again",
                   scan_min_region=target.scan_min_region)

    def _past_managed_caps(self, target: Target, npages: int) -> str | None:
        """Why `npages` more of `target` may not be managed, or None. A
        client chooses how much it registers, and the daemon's page tables
        are sized by it: the caps bound what any user can make it hold."""
        cap = self.config.max_managed >> PAGE_SHIFT
        if target.core.pt.managed + npages > cap:
            return f"the process would pass --max-managed {format_size(self.config.max_managed)}"
        return self._past_user_cap(target, npages)

    def _past_user_cap(self, target: Target, npages: int) -> str | None:
        """Why `npages` more tables of target's user may not be held, or
        None: its processes' and their unnamed forks' (target's own too:
        a new one registers its maps before it is started)."""
        uid = target.owner_uid
        users = sum(t.core.pt.managed + t.unclaimed_managed for t in self.targets.values()
                    if t.owner_uid == uid and t is not target)
        users += target.core.pt.managed + target.unclaimed_managed
        if users + npages > self.config.max_managed_per_user >> PAGE_SHIFT:
            return (f"uid {uid}'s processes would pass --max-managed-per-user "
                    f"{format_size(self.config.max_managed_per_user)}")
        return None

    def _fork_past_caps(self, parent: Target) -> str | None:
        """Why a fork of parent's may not be served, or None: its child's
        table is a copy of the parent's, daemon memory as much as a
        registration is, and a user forking a process of a large table
        over and over would pass --max-managed-per-user with no region
        registered."""
        return self._past_user_cap(parent, parent.core.pt.managed)

    def _save(self, pid: int, uffd, owner: tuple[int, int], budget: int, name: str) -> SavedTarget | None:
        """Files for a new target's table, or None (in memory: it cannot
        be taken back after a crash, and says so)."""
        if self.state is None:
            return None
        try:
            return self.state.new_target(pid, {"features": uffd.features, "owner": list(owner),
                                               "budget_bytes": budget, "name": name})
        except OSError as exc:
            log.warning("pid %d: its page table cannot be saved in %s (%s); it cannot be taken back after a "
                        "crash", pid, self.state.path, exc.strerror or exc)
            return None

    # ---- after a crash -------------------------------------------------------------
    def resume(self, peer: Peer, mem_fd: int, uffd: uffdmod.Userfaultfd, max_resident: int,
               prefetch: GuardedPrefetch, name: str = "") -> Target | None:
        """Take back a process of the daemon that died (its HELLO_RESUME):
        None if no state of it was left here: the same pid, start time
        (read while the peer's pidfd pins the process) and owner. `uffd` is
        the one the dead daemon set up (no UFFDIO_API again: the kernel
        refuses a second). Takes mem_fd and, when it returns a target, the
        peer's pidfd."""
        saved = None
        if self.state is not None:
            saved = self.state.take(peer.pid, procmem.process_start_time(peer.pid), (peer.uid, peer.gid))
        if saved is None:
            os.close(mem_fd)
            return None
        self.coming_back.add(peer.pid)   # (until start(): a clean stop waits for it)
        uffd.features = int(saved.info.get("features", 0))
        # The budget it had (`umgr budget` may have changed it since its HELLO),
        # and its name (its comm may have changed since: its series stay its own).
        budget = int(saved.info.get("budget_bytes", self.budget(max_resident)))
        budget = max(budget, MIN_BUDGET_BYTES) if budget else 0   # (a record from before the least budget)
        name = str(saved.info.get("name") or target_name(peer.pid, name))
        pidfd = peer.take_pidfd()
        try:
            target = self._new_target(peer.pid, (peer.uid, peer.gid), uffd, pidfd, mem_fd, budget,
                                      prefetch, name=name, saved=saved)
            # The size its small mappings were taken up from (not if --min-region is given now).
            smallest = saved.info.get("scan_min_region")
            target.scan_min_region = int(smallest) if smallest and self.config.adapt_min_region else None
            return target
        except BaseException:
            self.coming_back.discard(peer.pid)
            os.close(mem_fd)
            os.close(pidfd)
            self._forget(saved)
            raise

    async def _expire_saved(self) -> None:
        """Targets of the dead daemon that did not come back within the
        grace period (and a margin: shims retry with backoff) are given up:
        their shims have killed them by then."""
        await trio.sleep(self.config.grace_seconds + SAVED_MARGIN)
        for saved in self.state.unclaimed():
            log.info("pid %d: not taken back within the grace period; its saved pages are dropped", saved.pid)
            self._forget(saved)

    def forget_the_ended(self) -> None:
        """The dead daemon's targets whose process has ended since (or
        is a zombie) will not come back: their saved pages go now, not at
        the end of the grace period (a clean stop waits for the others)."""
        if self.state is None:
            return
        for saved in list(self.state.saved.values()):
            if not procmem.running_since(saved.pid, saved.start_time):
                log.info("pid %d: ended before it was taken back; its saved pages are dropped", saved.pid)
                del self.state.saved[saved.pid]
                self._forget(saved)

    def _forget(self, saved: SavedTarget) -> None:
        if saved.table is not None:
            saved.table.clear(self.backend.slots.free)
        self.state.forget(saved)

    def zapper(self, target: Target, agent_fd: int):
        agent = socket.socket(fileno=agent_fd)
        if self.config.zap_mode == protocol.ZapMode.REMOTE:
            return RemoteZapper(target.pidfd, agent)
        return AgentZapper(agent, moves=self.config.move_out)

    async def look_for_new_memory(self, target: Target) -> None:
        """Register what its maps show, read once a read is due
        (MapsReads.until_due: an ADVISE a message would read them as often
        as it liked; its sender waits instead)."""
        reads = self._maps_reads.get(target)
        if reads is None:   # (its scan has not begun)
            self.register_found(target)
            return
        await trio.sleep(reads.until_due())
        if not target.gone:
            self.register_found(target, reads.read())

    def register_found(self, target: Target, mappings: list[tuple[int, int]] | None = None) -> None:
        """Manage the anonymous memory /proc/PID/maps shows (malloc, brk),
        or these of its mappings (maps.anonymous_private, read already);
        the target hears of the mappings too small for that."""
        small = []
        smallest = target.smallest_region(self.config.min_region)
        for lo, hi in maps.anonymous_private(target.pid) if mappings is None else mappings:
            if hi - lo >= smallest:
                target.register(lo, hi - lo)
            else:
                small.append((lo, hi))
        if target.found_small_mappings(small, self.config.min_region, self.config.adapt_min_region):
            self._keep_scan_min_region(target)

    # ---- fork ---------------------------------------------------------------------
    def adopt_child(self, parent: Target, child_pid: int, reporter: str) -> int:
        """The parent reports a child (FORKED): pair it with the oldest fork
        event's uffd. Only a live child of the parent, running with the
        parent's ids and dumpable, is adopted; the child then proves the
        uffd is its own when it connects (server._attach_child). Returns 0
        or an errno for the ACK."""
        if not 0 < child_pid <= procmem.PID_MAX_LIMIT:   # (no such pid: the C call takes an int)
            return errno.ESRCH
        try:
            pidfd = procmem.pidfd_open(child_pid)
        except (OSError, TargetGone):  # gone already, or no such pid
            return errno.ESRCH
        try:
            memory = Memory(pidfd, child_pid, *parent.owner)
            if memory.info.ppid != parent.pid:
                memory.close()
                raise Refused(f"pid {child_pid} is not a child of pid {parent.pid}")
        except (Refused, TargetGone, OSError) as exc:
            os.close(pidfd)
            log.warning("control: %s: FORKED %d refused: %s", reporter, child_pid, exc)
            return errno.EPERM if isinstance(exc, Refused) else errno.ESRCH
        self._child_reported(child_pid)
        forked = parent.take_fork()
        if forked is None:
            # No registered range at fork time: the kernel sends no fork
            # event, and the child's shim attaches with a uffd of its own.
            memory.close()
            os.close(pidfd)
            return errno.ENOENT
        if forked.refused:
            self._kill_refused_child(child_pid, pidfd, forked)
            memory.close()
            os.close(pidfd)
            return errno.EPERM
        child = self._child_target(child_pid, ParentSettings.of(parent), forked, pidfd, memory.take_mem_fd())
        log.info("%s: forked %s", parent.label, child.label)
        return 0

    def _child_target(self, pid: int, parent: ParentSettings, forked: ForkedMemory, pidfd: int,
                      mem_fd: int) -> Target:
        """A forked child's target, started: the parent's settings, the
        memory as it was at the fork (its slots already hold the child's
        references)."""
        label = f"pid {pid}"
        try:
            forked.fit_to_child(pid)
        except OSError as exc:   # (gone: its loop finds out; else it goes on as the parent's table says)
            log.warning("%s: its mappings cannot be read (%s): MADV_WIPEONFORK and MADV_DONTFORK memory is "
                        "taken as the parent's", label, exc.strerror or exc)
        try:
            prefetch = self.prefetch(parent.prefetch_name, label)
        except protocol.ProtocolError as exc:
            log.warning("%s: %s; it runs without prefetch", label, exc)
            prefetch = self.prefetch("none", label)
        child = self._new_target(pid, parent.owner, forked.uffd, pidfd, mem_fd, parent.budget_pages << PAGE_SHIFT,
                                 prefetch, forked.pages, name=parent.name)
        child.scan_min_region = parent.scan_min_region
        if child.scan_min_region:
            self._keep_scan_min_region(child)
        if parent.stopping:   # (forked during a clean stop's drain: it drains too)
            child.stop_evicting()
        self.start(child)
        return child

    def _child_reported(self, pid: int) -> None:
        """Wake the child's HELLO if it waits; the entry expires unused
        after CHILD_HELLO_WAIT, so reports of children that never connect
        do not pile up."""
        event = self._children_waiting.setdefault(pid, trio.Event())
        event.set()

        async def expire():
            await trio.sleep(CHILD_HELLO_WAIT)
            if self._children_waiting.get(pid) is event:
                del self._children_waiting[pid]
        self._nursery.start_soon(expire)

    async def child_hello(self, pid: int, owner: tuple[int, int]) -> Target | Orphan | None:
        """A forked child's HELLO: its target, made from its parent's FORKED
        report (waited for); or, if the parent died before sending it, the
        fork it left (to be proven the child's, then adopt_orphan); or None
        when there is neither to attach to."""
        reported = self._children_waiting.setdefault(pid, trio.Event())
        with trio.move_on_after(CHILD_HELLO_WAIT):
            while not reported.is_set():
                orphan = None if self._parent_will_name(pid) else self.orphans.claim(pid, owner)
                if orphan is not None:
                    self._children_waiting.pop(pid, None)
                    return orphan
                orphans_changed = self.orphans.changed
                async with trio.open_nursery() as either:
                    for event in (reported, orphans_changed):
                        either.start_soon(_set_then_cancel, event, either.cancel_scope)
        self._children_waiting.pop(pid, None)
        target = self.targets.get(pid)
        if target is None or target.has_zapper:
            return None
        return target

    def _parent_will_name(self, pid: int) -> bool:
        """Whether the child's parent is a live target with a fork it has
        not named yet: its FORKED is on the way (its atfork handlers or a
        busy machine may hold it up), and the child is not to claim another
        parent's orphan meanwhile (its proof would probe that orphan's
        memory at the child's probe address, and fail: the child killed)."""
        parent = self.targets.get(procmem.parent_pid(pid))
        return parent is not None and not parent.gone and parent.unclaimed_forks > 0

    @staticmethod
    def _kill_refused_child(pid: int, pidfd: int, forked: ForkedMemory) -> None:
        """A child whose fork was refused (its table not kept): killed, as
        its paged-out pages cannot be served, then its uffd closed."""
        log.warning("pid %d: killed: %s", pid, forked.refused)
        try:
            procmem.pidfd_send_signal(pidfd, signal.SIGKILL)
        except (OSError, TargetGone):
            pass
        forked.close()

    def adopt_orphan(self, orphan: Orphan, pid: int, pidfd: int, mem_fd: int) -> Target:
        """A dead parent's fork, proven to be process pid's: its target
        (Refused for a fork refused at the time: the child is killed)."""
        if orphan.fork.refused:
            self._kill_refused_child(pid, pidfd, orphan.fork)
            os.close(mem_fd)
            os.close(pidfd)
            raise Refused(orphan.fork.refused)
        child = self._child_target(pid, orphan.parent, orphan.fork, pidfd, mem_fd)
        log.info("pid %d: adopted %s, forked just before its parent died", orphan.parent.pid, child.label)
        return child

    # ---- running -------------------------------------------------------------------
    def start(self, target: Target) -> None:
        self.coming_back.discard(target.pid)
        self.targets[target.pid] = target
        self.targets_seen += 1
        self.idle = trio.Event() if self.idle.is_set() else self.idle
        self._nursery.start_soon(self._run, target)

    def stop(self, target: Target) -> None:
        """The mm is gone (exit, exec): stop serving now."""
        target.mark_gone()
        scope = self._scopes.get(target)
        if scope is not None:
            scope.cancel()

    async def _run(self, target: Target) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scopes[target] = nursery.cancel_scope

                async def until_gone(fn, what: str):
                    try:
                        await fn()
                    finally:
                        if not nursery.cancel_scope.cancel_called:
                            log.debug("%s: %s ended; stopping", target.label, what)
                        nursery.cancel_scope.cancel()
                nursery.start_soon(until_gone, target.fault_loop, "fault loop")
                nursery.start_soon(until_gone, target.eviction_loop, "eviction")
                nursery.start_soon(until_gone, lambda: trio.lowlevel.wait_readable(target.pidfd), "process")
                nursery.start_soon(self._scan_maps, target)
        except Exception as exc:
            self._kill(target, exc)
        finally:
            self._scopes.pop(target, None)
        self._release(target)

    def _kill(self, target: Target, exc: Exception) -> None:
        # That target cannot be served correctly any more: once its uffd is
        # closed its swapped pages would read as zeros, so it is killed
        # rather than left running on wrong data.
        lost = _backend_error(exc)
        if lost is not None:   # not a bug: the store cannot give a page back
            log.error("%s: killing the target: a page it needs cannot be read back (%s)", target.label, lost)
        else:
            log.exception("%s: internal error; killing the target (its swapped pages cannot be served)",
                          target.label)
        self.internal_errors += 1
        try:
            procmem.pidfd_send_signal(target.pidfd, signal.SIGKILL)
        except (OSError, TargetGone):
            pass

    async def _scan_maps(self, target: Target) -> None:
        """Register anonymous memory the shim did not report (malloc, brk),
        every scan_interval, or less often where its maps cost more to
        read (MapsReads): a program of thousands of mappings (node's heap
        under --min-region 256K: 3000 lines of maps, 5-7 ms to read) would
        otherwise have a tenth of the daemon's time spent on it."""
        reads = self._maps_reads[target] = MapsReads(target.pid, at=time.monotonic())   # (read at attach)
        try:
            await self._scan_maps_with(target, reads)
        finally:
            del self._maps_reads[target]

    async def _scan_maps_with(self, target: Target, reads: MapsReads) -> None:
        while not target.gone:
            # The pace is set by reading the maps, not by registering what
            # they show, which a burst of new mappings makes dear just
            # when scanning often matters.
            await trio.sleep(reads.until_due(self.config.scan_interval))
            try:
                target.check_mm()
                if reads.until_due(self.config.scan_interval) == 0:   # (else an ADVISE read them meanwhile)
                    self.register_found(target, reads.read())
                target.recheck()
                target.release_idle_buffers(time.monotonic())
            except (OSError, TargetGone):
                # The mm is gone: the process exited (its pidfd says so too)
                # or exec'd a program without the shim (nothing else says so).
                self.stop(target)
                return

    def _want_resume(self) -> None:
        self._resume_wanted.set()

    async def _resume_paused(self) -> None:
        """Targets paused on a full backend try again once RESUME_MIN_SLOTS
        are free (each freed slot asks), at most every RESUME_INTERVAL: a
        retry write-protects and copies a whole batch, and stores only what
        the free slots take. Those paused on a failing backend try again
        after BACKEND_RETRY_SECONDS."""
        while True:
            await self._resume_wanted.wait()
            self._resume_wanted = trio.Event()
            await trio.sleep(RESUME_INTERVAL)
            slots_free = room_to_resume(self.backend.slots)
            for target in list(self.targets.values()):
                if not target.resume_eviction(slots_free):
                    self._resume_wanted.set()   # (not yet: look again)

    def _release(self, target: Target) -> None:
        snap = snapshot(target)
        for watch in self.release_watchers:
            watch(target)
        self.orphans.keep(ParentSettings.of(target), target.take_unclaimed_forks(), self._nursery)
        target.release_all()
        saved = self._saved.pop(target, None)
        if saved is not None:
            try:
                self.state.forget(saved)
            except OSError as exc:   # (its files stay behind; the daemon and its other targets go on)
                log.warning("%s: its saved state could not be removed: %s", target.label, exc)
        self.totals.add(snap)
        os.close(target.pidfd)
        os.close(target.mem_fd)
        if self.targets.get(target.pid) is target:
            del self.targets[target.pid]
        log.info("%s: released (faults %d, pages in %d, out %d)", target.label, snap["faults"],
                 snap["pages_in"], snap["pages_out"])
        if not self.targets:
            self.idle.set()

    def _paging_load(self) -> int:
        """The live targets' faults and eviction batches so far, in faults
        (idle polling follows its rate)."""
        return sum(paging_load(t.stats.faults_missing + t.stats.faults_wp, t.stats.zap_batches)
                   for t in self.targets.values())

    def run_totals(self) -> dict:
        totals = Totals(self.totals.counters)
        for target in self.targets.values():
            totals.add(snapshot(target))
        return totals.counters


def _backend_error(exc: BaseException) -> BackendError | None:
    """The BackendError that ended a target's tasks, if that is what did."""
    if isinstance(exc, BackendError):
        return exc
    for inner in getattr(exc, "exceptions", ()):   # from a nursery: an ExceptionGroup
        found = _backend_error(inner)
        if found is not None:
            return found
    return None


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _into_files(table: PageTable, arrays) -> PageTable:
    """A copy of `table` whose arrays are made by `arrays` (a saved
    target's), regions with a page in a slot in files."""
    copy = table.copy(arrays)
    for region in copy.regions:
        if region.slot.any():   # NO_SLOT is 0
            arrays.holding_slots(region)
    return copy
