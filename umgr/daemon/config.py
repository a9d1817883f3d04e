"""The daemon's settings."""
from __future__ import annotations

from dataclasses import dataclass, field

from umgr import protocol
from umgr.paging.tuning import CLEAN_COPIES

HELLO_TIMEOUT = 5.0      # seconds a new connection may take to send its first message
CHILD_HELLO_WAIT = 10.0  # seconds a forked child's HELLO waits for its parent's FORKED
EXEC_RELEASE_WAIT = 5.0  # seconds a HELLO after exec waits for the old image's target to be released
# A target's maps scan waits at least this many times as long as its last
# scan took, so that scanning takes at most 1/SCAN_COST_RATIO of the daemon's
# time: memory the shim does not see being made is registered later there
# (a budget overshoot for longer), but only in programs of thousands of mappings.
SCAN_COST_RATIO = 50
SCAN_INTERVAL_MAX = 0.5   # seconds: the longest wait between scans, unless they cost more than...
SCAN_SHARE_MAX = 0.1      # ...this share of the daemon's time (umgr/daemon/mapsreads.py)
GRACE_SECONDS = 60       # how long a program whose daemon is gone waits for one before it is killed
MIN_REGION = 1 << 20     # the smallest mapping managed (--min-region), unless a target's smaller ones add up
# Managed virtual memory per process and per user. The page tables cost the
# daemon memory only where pages are touched, but their arrays are still
# sized by what is registered: a 1 TiB region is 1.5 GiB of virtual arrays,
# and a whole-region scan touches them. Past a cap a mapping stays the
# kernel's (unmanaged), which loses nothing.
MAX_MANAGED = 1 << 40
MAX_MANAGED_PER_USER = 4 << 40


@dataclass
class DaemonConfig:
    socket_path: str
    max_resident: int = 0                # bytes per target; 0: no limit
    min_region: int = MIN_REGION
    adapt_min_region: bool = True        # a target's small mappings managed once they hold half its budget
                                         # (umgr/paging/target.py: found_small_mappings); False: --min-region given
    policy: str = "readahead"
    eviction: str = "reuse"
    policy_options: dict = field(default_factory=dict)    # the prefetch policy's (--policy-opt)
    eviction_options: dict = field(default_factory=dict)  # the eviction policy's (--eviction-opt)
    scan_interval: float = 0.05          # seconds between /proc/PID/maps scans (more if one is costly: SCAN_COST_RATIO)
    zap_mode: protocol.ZapMode = protocol.ZapMode.AGENT
    group: str | None = None
    hello_timeout: float = HELLO_TIMEOUT  # drop a connection silent for this long
    clean_copies: str = CLEAN_COPIES      # pages read back keep their swap copy: auto, always, never
    fast_path: bool = True                # plain faults served in C (umgr/paging/fastpath.py)
    move_out: bool = True                 # evicted pages moved out by the agent (umgr/paging/zap.py)
    idle_poll: str = "auto"               # idle CPUs poll while paging is busy (umgr/daemon/idlepoll.py)
    grace_seconds: int = GRACE_SECONDS    # told to each shim in HELLO_ACK (UMGR_GRACE_SECONDS overrides)
    max_managed: int = MAX_MANAGED        # bytes of registered memory per process
    max_managed_per_user: int = MAX_MANAGED_PER_USER   # ... and all of one uid's processes
