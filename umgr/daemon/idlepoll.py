"""Idle CPUs poll while paging is busy (--idle-poll).

A fault served by the daemon is two wake-ups: the kernel wakes the daemon
(or the daemon, spinning, sees the fault) and UFFDIO_COPY wakes the
faulting thread. A thread waking on an idle CPU that has gone to sleep
waits for that CPU to come out of its sleep state: on a VM whose idle vCPUs
halt, an exit to the host and back. Measured with a C handler and one page
per fault on this kind of machine, a fault cost 95 us with both sides
blocking on different vCPUs and 30 us with the handler spinning; with a
CPU latency request of 0 held (umgr.kernel.cpulatency), 11 and 7.5 us.
A random-read program over compressed swap ran 2.2x faster with it.

Evicting wakes threads too: a batch's read of the victims in a worker
thread, its write's completion, the agent's move-out and its answer. A
first touch of 512 MiB under 64 MiB, which brings fresh pages in windows
(519 faults) and puts 260 batches away (of 512 pages, as batches were at
that budget then), made 3.5k wake-ups; held, its touch phase took 0.71 s
instead of 0.77 (6 alternating runs each). So a batch counts as
BATCH_FAULTS faults.

The price is that idle CPUs spin rather than sleep while it is held (all
of them: the request is system-wide), so `auto` holds it only while
managed programs fault (batches counted so) at BUSY_RATE or more, and
drops it after LINGER seconds below that. `always` holds it while the
daemon runs, `never` never. Holding it needs root; without it the daemon
runs as before, with one log line.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import trio

from umgr.kernel.cpulatency import CpuLatencyRequest

log = logging.getLogger("umgr.daemon")

MODES = ("auto", "always", "never")
INTERVAL = 0.05     # seconds between looks at the paging load (paging_load)
# Faults per second at which their wake-ups cost about 10% of a CPU: 95 us a
# fault unheld (above). At 2000 a first touch under a budget, which evicts a
# batch every few milliseconds and counts 1.8-1.9k a second, sat at the line
# and was held in some runs and not in others.
BUSY_RATE = 1000
LINGER = 1.0        # seconds below that rate before the request is dropped
BATCH_FAULTS = 5    # the faults an eviction batch counts as (about ten wake-ups)


def paging_load(faults: int, batches: int) -> int:
    """Faults and eviction batches so far, in faults (what BUSY_RATE counts)."""
    return faults + BATCH_FAULTS * batches


class IdlePoll:
    def __init__(self, mode: str = "auto", request: CpuLatencyRequest | None = None):
        if mode not in MODES:
            raise ValueError(f"idle poll: no mode {mode!r} (one of {', '.join(MODES)})")
        self.mode = mode
        self.request = request or CpuLatencyRequest()
        self.held_seconds = 0.0       # how long the request has been held, in all
        self._held_since: float | None = None
        self.unavailable: str | None = None   # why it cannot be held, once tried

    @property
    def held(self) -> bool:
        return self.request.held

    def seconds_held(self) -> float:
        if self._held_since is None:
            return self.held_seconds
        return self.held_seconds + time.monotonic() - self._held_since

    async def run(self, load_so_far: Callable[[], int]) -> None:
        """Hold the request as the mode says until cancelled.
        load_so_far(): the managed programs' paging_load() until now
        (it may go down as programs end)."""
        try:
            if self.mode == "always":
                if self._hold():
                    await trio.sleep_forever()
            elif self.mode == "auto":
                await self._follow(load_so_far)
        finally:
            self._release()

    async def _follow(self, load_so_far: Callable[[], int]) -> None:
        last, last_at = load_so_far(), trio.current_time()
        busy_at = last_at - LINGER
        while True:
            await trio.sleep(INTERVAL)
            now, load = trio.current_time(), load_so_far()
            if load - last >= BUSY_RATE * (now - last_at):
                busy_at = now
                if not self.held and not self._hold():
                    return
            elif self.held and now - busy_at >= LINGER:
                self._release()
            last, last_at = load, now

    def _hold(self) -> bool:
        try:
            self.request.hold(0)
        except OSError as exc:
            self.unavailable = f"{self.request.path}: {exc.strerror or exc}"
            log.info("idle CPUs cannot be kept polling (%s): faults pay CPU wake-ups", self.unavailable)
            return False
        self._held_since = time.monotonic()
        return True

    def _release(self) -> None:
        if self._held_since is not None:
            self.held_seconds += time.monotonic() - self._held_since
            self._held_since = None
        self.request.release()
