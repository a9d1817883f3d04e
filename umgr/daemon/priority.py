"""The daemon's CPU priority (--nice).

A managed program waits for the daemon at each fault it takes: the
faulting thread runs again only once the daemon's UFFDIO_COPY wakes it.
Kernel swap serves a fault in the faulting thread; umgr's daemon is one
more process asking for a CPU. When the programs it serves keep every CPU
busy, a daemon at their priority gets its turn behind them, and every
fault waits out their time slices too. So the daemon runs at a lower nice
value than they do, the way the kernel's own work would go first.
Measured on 2 vCPUs (make -j2 and -j4 of six C files under 40 MiB per
compiler): 0.93x the time at nice -10; alone on the machine (a CPython
workload, the shapes benchmark) it changed nothing.

Not on one CPU: there the daemon's busy-poll for the next fault, above the
program's priority, holds the CPU the program needs to make that fault
(`taskset -c 0 umgr exec`: the shapes' random, hot and rewrite phases
1.05-1.3x the time). A daemon that may use a single CPU runs no lower
than the programs' usual level, nice 0, even if started lower. (A
sched_yield() between polls gave that CPU back, but cost the parallel
compiles 1.03x.)

Linux keeps a nice value per thread, and a new thread takes its creator's:
every thread the daemon has is set, and those it starts later (the fast
path's, trio's workers, a store's) inherit it.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("umgr.daemon")

NICE = -10       # the daemon's nice value unless --nice says otherwise (or it runs lower already)
NICE_RANGE = range(-20, 20)


def set_priority(nice: int | None) -> None:
    """Run this process's threads at `nice`; None: default_nice()."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    wanted = default_nice(current, len(os.sched_getaffinity(0))) if nice is None else nice
    if wanted == current:
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), wanted)
        except ProcessLookupError:   # (a thread that ended meanwhile)
            continue
        except PermissionError:
            (log.info if nice is None else log.warning)(
                "the daemon runs at nice %d: nice %d needs CAP_SYS_NICE (under systemd, the unit's Nice= gives "
                "it); faults wait longer while managed programs keep every CPU busy", current, wanted)
            return


def default_nice(current: int, cpus: int) -> int:
    """The nice value of a daemon started at `current` that may use `cpus`
    CPUs: NICE, or `current` if lower (a service manager's Nice=, which has
    the privilege a lower value needs where the daemon may lack it); on
    one CPU, no lower than 0."""
    if cpus < 2:
        return max(current, 0)
    return min(current, NICE)
