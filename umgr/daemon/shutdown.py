"""Stopping the daemon without losing a byte.

`umgr daemon` serves until SIGTERM or SIGINT. Then it takes no new process
(a forked child of a target still attaches), stops evicting, brings every
swapped page back in, tells each shim to go on unmanaged (DETACH: the shim
drops its uffd reference), releases the targets and exits. Pages that are
in memory again are the program's own: once the last uffd reference is
closed the kernel unregisters every range and serves later faults itself.

If the swapped pages would not fit in memory (MemAvailable, or a target's
cgroup memory.max), or they stop coming back (a backend read error), the
stop is given up with one log line and the daemon goes on serving. Another
signal during the drain never cuts it short. SIGHUP is logged and ignored.
"""
from __future__ import annotations

import functools
import logging
import os
import signal

import trio

from umgr.daemon.config import CHILD_HELLO_WAIT
from umgr.errors import TargetGone
from umgr.paging.pagetable import PAGE_SHIFT
from umgr.paging.target import Target
from umgr.protocol import ProtocolError

log = logging.getLogger("umgr.daemon")

MEMORY_RESERVE = 64 << 20   # bytes left available after the drain
DRAIN_POLL = 0.05           # seconds between looks at a draining target
STALL_SECONDS = 10.0        # a drain that brings nothing back for this long is given up
PROGRESS_INTERVAL = 1.0     # seconds between progress lines
DETACH_TIMEOUT = 5.0        # seconds a shim may take to answer DETACH (a stopped process does not)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def serve_until_stopped(daemon, control=None, on_serving=lambda: None) -> None:
    """Serve until a stop signal, then drain and return (exit 0). A stop
    that cannot complete is logged and serving goes on. `control`: the
    listening ControlSocket (daemon.serve removes its file on the way out);
    `on_serving` is called once the socket listens."""
    with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(daemon.serve, control=control))
            on_serving()
            stopped = trio.Event()
            draining = False

            async def stop(signame: str) -> None:
                nonlocal draining
                try:
                    if await stop_cleanly(daemon, signame):
                        stopped.set()
                finally:
                    draining = False

            nursery.start_soon(_until_set, stopped, nursery.cancel_scope)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.warning("%s ignored: nothing to reload", name)
                elif draining:
                    log.warning("%s: already stopping; the drain goes on", name)
                else:
                    draining = True
                    nursery.start_soon(stop, name)
        # Every target is let go: a late stop signal must not turn exit 0 into a kill.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


async def _until_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def stop_cleanly(daemon, why: str) -> bool:
    """Bring every page back and let every target go. False (and the daemon
    serves on, as before) when that cannot be done."""
    targets = [t for t in daemon.targets.values() if not t.gone]
    coming_back = _saved(daemon)
    swapped = (sum(t.pt.swapped for t in targets) + sum(s.table.swapped for s in coming_back)) << PAGE_SHIFT
    refusal = _why_pages_cannot_fit(targets, swapped)
    if refusal:
        log.warning("%s: cannot stop: %s; still serving", why, refusal)
        return False
    log.warning("%s: stopping: bringing back %s swapped out by %d targets", why, _mib(swapped), len(targets))
    if coming_back:
        log.warning("%s: %d programs of the previous daemon have not come back yet; their pages come back "
                    "when they do (within their grace period)", why, len(coming_back))
    daemon.stopping = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_report_progress, daemon, swapped)
        failed = await _drain_all(daemon)
        nursery.cancel_scope.cancel()
    if failed:
        for target in daemon.targets.values():
            target.resume_evicting()
        daemon.stopping = False
        log.warning("%s: cannot stop: %s; still serving", why, failed)
        return False
    with trio.move_on_after(CHILD_HELLO_WAIT):
        await daemon.idle.wait()
    log.warning("%s: every page is back; %d targets go on unmanaged; exiting", why, daemon.targets_seen)
    return True


def _why_pages_cannot_fit(targets: list[Target], swapped: int) -> str:
    available = _mem_available()
    if swapped > available - MEMORY_RESERVE:
        return f"{_mib(swapped)} swapped out, {_mib(available)} available"
    for target in targets:
        room = _cgroup_room(target.pid)
        need = target.pt.swapped << PAGE_SHIFT
        if room is not None and need > room:
            return f"{target.label} has {_mib(need)} swapped out, its cgroup has room for {_mib(room)}"
    return ""


async def _drain_all(daemon) -> str:
    """Drain and detach every target, forked children that appear meanwhile
    included. Returns why it failed, or ""."""
    handled: set[Target] = set()
    failures: list[str] = []
    while not failures:
        pending = [t for t in daemon.targets.values() if t not in handled and not t.gone]
        if not pending:
            if await _one_comes_back(daemon, handled):
                continue
            return ""
        handled.update(pending)
        async with trio.open_nursery() as nursery:
            for target in pending:
                nursery.start_soon(_drain_and_detach, daemon, target, failures)
    return failures[0]


def _saved(daemon) -> list:
    """The targets of a dead daemon that may still come back here (their
    pages are in its stores, their tables in its state directory)."""
    state = daemon.lifecycle.state
    return [] if state is None else list(state.saved.values())


async def _one_comes_back(daemon, handled: set[Target]) -> bool:
    """Whether a target of a dead daemon came back (to be drained too),
    waiting while one may: until each is taken back, has ended, or is
    given up (at the end of the grace period). A clean stop that went on
    without them would remove the stores that hold their pages."""
    while True:
        if any(t not in handled and not t.gone for t in daemon.targets.values()):
            return True
        daemon.lifecycle.forget_the_ended()
        if not _saved(daemon) and not daemon.lifecycle.coming_back:
            return False
        await trio.sleep(DRAIN_POLL)


async def _drain_and_detach(daemon, target: Target, failures: list[str]) -> None:
    target.stop_evicting()
    why = await _drain(target)
    if why:
        failures.append(f"{target.label}: {why}")
        return
    with trio.move_on_after(CHILD_HELLO_WAIT):
        # A forked child's agent comes after its fork event; and a child
        # forked during the drain must become a target (its FORKED claims
        # the uffd) before this one is released, which would close it.
        while (not target.has_zapper or target.unclaimed_forks) and not target.gone:
            await trio.sleep(DRAIN_POLL)
    if target.has_zapper and not target.gone:
        with trio.move_on_after(DETACH_TIMEOUT) as waiting:
            try:
                await target.detach()
            except (TargetGone, ProtocolError) as exc:
                log.warning("%s: detach failed (%s)", target.label, exc)
        if waiting.cancelled_caught:
            # Stopped (SIGSTOP, a debugger): the DETACH waits in its socket
            # and the shim reads it when it runs again (its watchdog waits
            # for that at least a second).
            log.warning("%s: no answer to DETACH within %g s; it detaches when it runs again",
                        target.label, DETACH_TIMEOUT)
    daemon.lifecycle.stop(target)


async def _drain(target: Target) -> str:
    """Wait until none of the target's pages is out. Returns why not, or ""."""
    last = None
    stalled_since = trio.current_time()
    while not target.gone:
        if target.pages_in_flight == 0:
            swapped = target.pt.swapped
            if swapped == 0:
                return ""
            target.bring_all_in()
            if swapped != last:
                last, stalled_since = swapped, trio.current_time()
            elif trio.current_time() - stalled_since > STALL_SECONDS:
                return f"{swapped} pages did not come back in {STALL_SECONDS:g} s (backend errors?)"
        await trio.sleep(DRAIN_POLL)
    return ""  # it exited: nothing to bring back


async def _report_progress(daemon, total: int) -> None:
    while True:
        await trio.sleep(PROGRESS_INTERVAL)
        left = sum(t.pt.swapped for t in daemon.targets.values() if not t.gone) << PAGE_SHIFT
        log.warning("stopping: %s of %s back in, %d targets left", _mib(max(total - left, 0)), _mib(total),
                    len(daemon.targets))


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    return 0


# Where a memory cgroup's limit and usage are: v1's memory controller, v2.
CGROUP_MEMORY_FILES = (
    ("memory", "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"),
    ("", "/sys/fs/cgroup", "memory.max", "memory.current"),
    ("", "/sys/fs/cgroup/unified", "memory.max", "memory.current"),
)
UNLIMITED = 1 << 62   # v1 says "no limit" with a number near 2**63


def _cgroup_room(pid: int) -> int | None:
    """Bytes the process's memory cgroup may still charge, or None if it
    has no limit (or none is found). Only its own cgroup is looked at."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            paths = dict(line.rstrip("\n").split(":", 2)[1:] for line in f)
    except (OSError, ValueError):
        return None
    for controller, root, limit_file, usage_file in CGROUP_MEMORY_FILES:
        if controller not in paths:
            continue
        base = os.path.join(root, paths[controller].lstrip("/"))
        try:
            with open(os.path.join(base, limit_file)) as f:
                limit = f.read().strip()
            with open(os.path.join(base, usage_file)) as f:
                usage = int(f.read())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= UNLIMITED:
            return None
        return int(limit) - usage
    return None


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"
