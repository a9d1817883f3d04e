"""How often a target's /proc/PID/maps is read: the periodic scan for
memory the shim did not report (malloc, brk), and an ADVISE naming memory
not managed yet. A read costs the daemon's one thread about 2 us per line,
and a program decides how many lines there are (up to vm.max_map_count,
65530 by default: ~130 ms a read), so reads are paced by what the last one
cost."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from umgr.daemon.config import SCAN_COST_RATIO, SCAN_INTERVAL_MAX, SCAN_SHARE_MAX
from umgr.kernel import maps


@dataclass
class MapsReads:
    pid: int
    at: float = -math.inf   # monotonic time of the last read
    cost: float = 0.0       # its CPU seconds on this thread (a wait for the GIL is not the read's)

    def read(self) -> list[tuple[int, int]]:
        """The anonymous private mappings (maps.anonymous_private), read now."""
        started = time.thread_time()
        mappings = list(maps.anonymous_private(self.pid))
        self.cost = time.thread_time() - started
        self.at = time.monotonic()
        return mappings

    def interval(self, least: float) -> float:
        """The time from one read to the next: at least `least`, else
        SCAN_COST_RATIO times the last read's cost up to SCAN_INTERVAL_MAX,
        and never so short that reading takes more than SCAN_SHARE_MAX of
        the daemon's time."""
        return max(min(max(least, SCAN_COST_RATIO * self.cost), SCAN_INTERVAL_MAX), self.cost / SCAN_SHARE_MAX)

    def until_due(self, least: float = 0.0) -> float:
        """Seconds until the next read: the periodic scan's (`least`: its
        interval), or an ADVISE's (0: only within SCAN_SHARE_MAX of the
        daemon's time)."""
        wait = self.interval(least) if least else self.cost / SCAN_SHARE_MAX
        return max(wait - (time.monotonic() - self.at), 0.0)
