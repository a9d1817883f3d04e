"""Where the CPU of paging goes: the daemon's eviction timed on its own
(evict_cpu_seconds, umgr/cpuclock.py), apart from the faults it serves; and
the shim's agent thread, which moves evicted pages out inside the program,
named so that its share can be read there."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import DaemonProcess
from test_control import started
from test_daemon_memory import finish, wait_ready_and_swapped

MiB = 1 << 20
PAGE = 4096


@pytest.mark.timeout(240)
def test_eviction_cpu_is_counted_apart_from_the_faults(umgr_exec, programs):
    # The same 96 MiB written and read back in two runs: under a budget that
    # evicts most of it, and with room for all of it. The fills of the
    # fresh pages are the faults' (the daemon's whole CPU), not eviction's.
    tight = umgr_exec([programs["pattern"], "96", "mmap", "ss"], max_resident="16M")
    roomy = umgr_exec([programs["pattern"], "96", "mmap", "ss"], max_resident="512M")
    for result in (tight, roomy):
        assert result.returncode == 0, result.stderr[-3000:]
    assert tight.stats["pages_out"] >= 2 * (96 - 16) * MiB // PAGE, tight.stats   # the data really left
    assert roomy.stats["pages_out"] == 0, roomy.stats
    evicting, total = tight.stats["evict_cpu_seconds"], tight.stats["daemon_cpu_seconds"]
    # Eviction is a real share of the work here, and not all of it (the
    # daemon served 50k faults besides): a clock that counted every task,
    # or none, fails one side.
    assert 0.1 * total < evicting < 0.9 * total, tight.stats
    assert roomy.stats["evict_cpu_seconds"] < 0.05 * roomy.stats["daemon_cpu_seconds"] + 0.01, roomy.stats


@pytest.mark.timeout(120)
def test_the_shims_threads_are_named_in_the_program(tmp_path, programs, shim):
    daemon = DaemonProcess(tmp_path, "--max-resident", "8M")
    try:
        with started([programs["reserve"], "1", "32"], env=daemon.env(shim), stdin=subprocess.PIPE) as proc:
            wait_ready_and_swapped(daemon, proc, 16 * MiB)
            names = set()
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                with open(f"/proc/{proc.pid}/task/{tid}/comm") as f:
                    names.add(f.read().strip())
            assert {"umgr-agent", "umgr-watchdog"} <= names, names
            finish(proc)
    finally:
        daemon.stop()
