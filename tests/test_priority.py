"""The daemon's CPU priority (umgr/daemon/priority.py): ahead of the
programs it serves, which keep their own."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import DaemonProcess, wait_for
from umgr.daemon.priority import NICE, default_nice

# Under umgr exec the daemon is the program's sibling: exec's other child.
# The program pages 48 MiB through its 16 MiB budget first, so that the
# daemon's threads (the fast path's, trio's workers) have been started.
REPORT_NICE = textwrap.dedent("""
    import os
    data = bytearray(48 << 20)
    data[::4096] = b"n" * (len(data) // 4096)
    assert data.count(b"n") == len(data) // 4096
    def nice(pid, tid):
        return int(open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()[16])
    parent = os.getppid()
    daemon, = [int(p) for p in open(f"/proc/{parent}/task/{parent}/children").read().split() if int(p) != os.getpid()]
    threads = os.listdir(f"/proc/{daemon}/task")
    print(os.getpriority(os.PRIO_PROCESS, 0), len(threads), *sorted({nice(daemon, t) for t in threads}))
""")


def nice_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


@pytest.mark.timeout(120)
def test_exec_s_daemon_runs_ahead_of_its_program_which_keeps_its_own_nice(umgr_exec, tmp_path):
    script = tmp_path / "report.py"
    script.write_text(REPORT_NICE)
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    default = umgr_exec(["python3", str(script)], timeout=60)
    assert default.returncode == 0, default.stderr
    program, threads, *daemon = map(int, default.stdout.split())
    assert program == ours
    assert threads > 1 and daemon == [default_nice(ours, len(os.sched_getaffinity(0)))], default.stdout
    assert default.stats["pages_out"] >= (32 << 20) // 4096, default.stats

    given = umgr_exec(["python3", str(script)], "--nice", "5", timeout=60)
    assert given.returncode == 0, given.stderr
    program, threads, *daemon = map(int, given.stdout.split())
    assert program == ours and daemon == [5], given.stdout

    refused = umgr_exec(["true"], "--nice", "-21", timeout=60)
    assert refused.returncode == 125
    assert "argument --nice: '-21' is not a nice value (a whole number from -20 to 19)" in refused.stderr


@pytest.mark.timeout(60)
def test_on_one_cpu_the_daemon_stays_at_the_programs_level(tmp_path):
    # Its busy-poll above the program's priority would hold the CPU the
    # program needs to make its next fault; started lower, it comes up to 0.
    script = tmp_path / "report.py"
    script.write_text(REPORT_NICE)
    for start in (0, -15):
        run = subprocess.run(["nice", "-n", str(start), "taskset", "-c", "0", sys.executable, "-m", "umgr", "exec",
                              "--max-resident", "16M", "--swap-size", "1G", "--", "python3", str(script)],
                             capture_output=True, text=True, timeout=50)
        assert run.returncode == 0, run.stderr
        program, threads, *daemon = map(int, run.stdout.split())
        assert program == start and daemon == [0], run.stdout


def test_default_nice():
    assert NICE == -10
    assert [default_nice(current, 2) for current in (0, 5, -10, -15)] == [-10, -10, -10, -15]
    assert [default_nice(current, 1) for current in (0, 5, -10)] == [0, 5, 0]


@pytest.mark.timeout(60)
def test_a_daemon_without_cap_sys_nice_says_so_and_serves(tmp_path, shim, programs):
    # The service unit leaves the daemon no CAP_SYS_NICE (its Nice= sets the
    # value instead); a daemon started so without it keeps the nice it has.
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    daemon = DaemonProcess(tmp_path, "--max-resident", "4M", as_the_service=True)
    try:
        wait_for(lambda: "CAP_SYS_NICE" in daemon.log(), 10, "the daemon's word on its priority")
        assert f"the daemon runs at nice {ours}: nice -10 needs CAP_SYS_NICE" in daemon.log()
        assert nice_of(daemon.proc.pid) == ours
        run = subprocess.run([programs["pattern"], "16", "mmap", "srb"], env=daemon.env(shim, UMGR_MAX_RESIDENT="4M"),
                             capture_output=True, timeout=40)
        assert run.returncode == 0 and run.stdout.startswith(b"ok 4096 pages"), run
        wait_for(lambda: "released" in daemon.log(), 10, "the target's release")
        out = re.search(r"released \(faults \d+, pages in (\d+), out (\d+)\)", daemon.log())
        assert out and int(out.group(2)) >= (16 - 4) * 256, daemon.log()
    finally:
        daemon.stop()
