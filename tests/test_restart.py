"""The daemon stops or dies: a managed program never sees wrong memory.

- SIGKILL of a standalone daemon: the shim holds its own uffd reference, so
  faults on paged-out memory wait; after the grace period the program is
  killed with one line on stderr. It never reads zeros.
- umgr exec SIGKILLed with a grandchild holding paged-out memory: the
  grandchild is killed, not left running on zeros.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import DaemonProcess, vm_rss_kb, wait_for
from test_control import UFFD_LINK, fd_links, started, target_status, wait_paging

KILLED_LINE = b"killed: the umgr daemon serving it is gone"
MiB = 1 << 20


def wait_swapped(daemon, pid: int, nbytes: int, timeout: float = 60) -> dict:
    def swapped():
        t = target_status(daemon, pid)
        return t if t is not None and t["swapped_bytes"] >= nbytes else None
    return wait_for(swapped, timeout, f"pid {pid} to have {nbytes >> 20} MiB swapped out")


def ended(pid: int) -> bool:
    """Gone, or a zombie nobody reaps (it may have been reparented to a
    PID 1 that does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def read_ready(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline() == b"ready\n"


# ---- the daemon dies ---------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_target_of_a_killed_daemon_waits_then_is_killed_never_reads_zeros(daemon, shim, programs):
    """SIGKILL the daemon while `pattern 128 mmap srb` is being paged (32 MiB
    or more written out). The target's faults on its swapped pages wait;
    after the grace period (1 s here) its watchdog kills it with one line.
    Before the shim kept its own uffd reference the kernel released the
    context and the target read zeros ("page 0 word 1: 0000000000000000")."""
    env = daemon.env(shim, UMGR_GRACE_SECONDS="1")
    with started([programs["pattern"], "128", "mmap", "srb"], env=env) as target:
        assert wait_paging(daemon, target.pid, pages=8192)["swapped_bytes"] > 0
        daemon.proc.kill()
        daemon.proc.wait(10)
        killed_at = time.monotonic()
        try:
            out, err = target.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the target hung after the grace period")
        waited = time.monotonic() - killed_at
    assert target.returncode == -signal.SIGKILL, (target.returncode, err)
    assert KILLED_LINE in err and b"(UMGR_GRACE_SECONDS)" in err, err
    assert err.count(b"\n") == 1, err            # that line and nothing else: no wrong word was read
    assert b"ok" not in out
    assert waited >= 0.9, "killed before its grace period was over"


# ---- umgr exec dies -----------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_exec_killed_takes_a_grandchild_with_paged_out_memory_down(shim, programs):
    """`umgr exec -- sh -c 'ctl_hold 48 <&3 & ...'`: the shell's child holds
    32 MiB or more swapped out when umgr is SIGKILLed. The shell dies
    (PDEATHSIG); the grandchild, asked to check its bytes, is killed by its
    watchdog (exec's grace is 0), never reports success on zeros."""
    script = f'exec 3<&0; {programs["ctl_hold"]} 48 <&3 & echo $!; wait'
    cmd = [sys.executable, "-m", "umgr", "exec", "--max-resident", "16M", "--swap-size", "1G", "-v",
           "--", "sh", "-c", script]
    umgr = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    grandchild = None
    try:
        grandchild = int(umgr.stdout.readline())
        assert umgr.stdout.readline() == b"ready\n"
        wait_for(lambda: vm_rss_kb(grandchild) < 24 * 1024, 30, "the grandchild to be paged out")
        umgr.kill()
        umgr.wait(10)
        umgr.stdin.close()      # the grandchild checks its bytes now
        wait_for(lambda: ended(grandchild), 30, "the grandchild to end")
        out, err = umgr.stdout.read(), umgr.stderr.read()   # it held the last writers
    finally:
        umgr.kill()
        umgr.wait()
        if grandchild is not None and not ended(grandchild):
            os.kill(grandchild, signal.SIGKILL)
        umgr.stdout.close()
        umgr.stderr.close()
    assert b"ok" not in out, out
    assert KILLED_LINE in err, err
    assert b"want" not in err, err
