"""The daemon's CPU time spent evicting, per target (evict_cpu_seconds).

Every target's tasks run on the one trio thread, so the process's CPU time
(daemon_cpu_seconds) cannot tell a target's eviction from the faults it
serves; the fills of a first touch alone took half of it. So the thread's
CPU clock is read around each step of a task evicting for a target (its
eviction loop sets EVICTING_FOR; the tasks it starts inherit their
context, trio's copy of the starting task's), and the work such a task
hands to a worker thread is timed in that thread (to_thread).

A clock read costs about 0.6 us here, two a step of an evicting task; the
instrument sees every task's steps, but the daemon takes few (4.4k in a run
that served 77k random faults: the fault loop serves whole batches a step).
The agent's moves run in the target's own thread: they are not in it.
"""
from __future__ import annotations

import contextvars
import time
from typing import Callable, TypeVar

import trio

T = TypeVar("T")

# The TargetStats of the target a task is evicting for (None: not evicting).
EVICTING_FOR: contextvars.ContextVar = contextvars.ContextVar("umgr_evicting_for", default=None)


class EvictionClock(trio.abc.Instrument):
    """Adds each step of an evicting task to its target's evict_cpu_seconds.
    (trio runs one step at a time: after_task_step follows its before.)"""

    def __init__(self):
        self._stats = None
        self._started = 0.0

    def before_task_step(self, task) -> None:
        self._stats = task.context.get(EVICTING_FOR)
        if self._stats is not None:
            self._started = time.thread_time()

    def after_task_step(self, task) -> None:
        if self._stats is not None:
            self._stats.evict_cpu_seconds += time.thread_time() - self._started
            self._stats = None


def install() -> None:
    """Start counting, in this trio run (once per run)."""
    trio.lowlevel.add_instrument(EvictionClock())


async def to_thread(fn: Callable[[], T], *, abandon_on_cancel: bool = False) -> T:
    """trio.to_thread.run_sync(fn), its thread's CPU time added to the target
    the calling task evicts for. Added here, on the trio thread: a worker's
    `+=` could lose a concurrent update. (An abandoned call adds nothing.)"""
    stats = EVICTING_FOR.get()
    if stats is None:
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=abandon_on_cancel)
    spent = [0.0]

    def timed() -> T:
        started = time.thread_time()
        try:
            return fn()
        finally:
            spent[0] = time.thread_time() - started

    try:
        return await trio.to_thread.run_sync(timed, abandon_on_cancel=abandon_on_cancel)
    finally:
        stats.evict_cpu_seconds += spent[0]
