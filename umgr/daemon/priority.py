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
    """Run this process's threads at `nice`; None: at NICE, or where they
    are if that is lower (a service manager's Nice=, which has the
    privilege a lower value needs where the daemon may lack it)."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    wanted = min(current, NICE) if nice is None else nice
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
