"""The daemon stops or dies: a managed program never sees wrong memory.

- SIGKILL of a standalone daemon: the shim holds its own uffd reference, so
  faults on paged-out memory wait; after the grace period the program is
  killed with one line on stderr. It never reads zeros.
- SIGTERM / SIGINT: every page comes back, each shim is let go, the daemon
  exits 0 and the programs finish with every byte checked.
- umgr exec SIGKILLed with a grandchild holding paged-out memory: the
  grandchild is killed, not left running on zeros.
"""
from __future__ import annotations

import array
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import DaemonProcess, children, comm, vm_rss_kb, wait_for
from umgr.backends.region import SPAN, Region
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
    with started([programs["pattern"], "128", "mmap", "srb+"], env=env, stdin=subprocess.PIPE) as target:
        assert wait_paging(daemon, target.pid, pages=8192)["swapped_bytes"] > 0
        killed_at = time.monotonic()   # (before: a stall after the kill cannot shorten `waited`)
        daemon.proc.kill()
        daemon.proc.wait(10)
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


@pytest.mark.timeout(90)
def test_forked_child_of_a_killed_daemon_is_killed_too(daemon, shim, programs):
    """`ctl_hold 48 fork`: parent and child share 24 MiB or more of swapped
    pages when the daemon is SIGKILLed. The child's uffd, made by the kernel
    in the daemon with the fork event, came back to its shim with HELLO_ACK,
    so the child waits too; both are killed after the grace period and
    neither reads a zero."""
    env = daemon.env(shim, UMGR_GRACE_SECONDS="1")
    with started([programs["ctl_hold"], "48", "fork"], env=env, stdin=subprocess.PIPE) as target:
        read_ready(target)
        wait_swapped(daemon, target.pid, 24 * MiB)
        targets = wait_for(lambda: [t for t in query_targets(daemon) if t["pid"] != target.pid], 30, "the child")
        child = targets[0]["pid"]
        assert target_status(daemon, child)["swapped_bytes"] >= 24 * MiB
        # Its own reference, from HELLO_ACK (the child is a target from its
        # parent's FORKED on, before its own HELLO is answered).
        wait_for(lambda: UFFD_LINK in fd_links(child), 10, "the child's shim to hold its uffd")
        daemon.proc.kill()
        daemon.proc.wait(10)
        out, err = target.communicate(b"", timeout=30)
    assert target.returncode == -signal.SIGKILL, err
    assert f"pid {child}: killed".encode() in err and f"pid {target.pid}: killed".encode() in err, err
    assert b"want" not in err and b"ok" not in out, (out, err)


# ---- the daemon stops cleanly ------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_sigterm_brings_every_page_back_then_exits_0(tmp_path, shim, programs):
    """Three targets of 48 MiB under a 16 MiB budget, most of each swapped
    out, one of them stopped (SIGSTOP). SIGHUP is ignored. SIGTERM: every
    page comes back; the stopped target cannot answer DETACH, and a second
    SIGTERM meanwhile does not cut the stop short; the daemon exits 0. The
    targets, unmanaged now (the stopped one once continued: its DETACH
    waited in its socket), check every byte."""
    daemon = DaemonProcess(tmp_path, "--max-resident", "16M")
    targets = []
    try:
        for _ in range(3):
            targets.append(subprocess.Popen([programs["ctl_hold"], "48"], env=daemon.env(shim),
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for t in targets:
            read_ready(t)
            wait_swapped(daemon, t.pid, 24 * MiB)
        stopped = targets[0]
        # Its eviction done (it ends anywhere between the water marks): a
        # zap in flight when it stops would hold its eviction task, and
        # with it the drain, until it runs again.
        settled_swapped(daemon, stopped.pid)
        stopped.send_signal(signal.SIGSTOP)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP ignored" in daemon.log(), 10, "SIGHUP to be logged")
        assert daemon.alive()
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM: stopping" in daemon.log(), 10, "the stop to begin")
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "already stopping; the drain goes on" in daemon.log(), 10, "the second SIGTERM")
        assert daemon.proc.wait(60) == 0, daemon.log()
        log = daemon.log()
        assert f"pid {stopped.pid}: no answer to DETACH" in log, log
        assert "every page is back" in log, log
        stopped.send_signal(signal.SIGCONT)
        for t in targets:
            # The pages are really back, and the shim dropped its uffd.
            assert vm_rss_kb(t.pid) >= 46 * 1024
            wait_for(lambda: UFFD_LINK not in fd_links(t.pid), 5, f"pid {t.pid} to drop its uffd")
        for t in targets:
            out, err = t.communicate(b"", timeout=30)
            assert t.returncode == 0, err
            assert out == b"ok 12288 pages\n", (out, err)
            assert err == b"", err
    finally:
        for t in targets:
            if t.poll() is None:
                t.send_signal(signal.SIGCONT)
                t.kill()
                t.wait()
        daemon.stop()
    assert not os.path.exists(daemon.socket)


@pytest.mark.timeout(120)
def test_signals_to_a_daemon_serving_faults_interrupt_nothing(tmp_path, shim, programs):
    """SIGHUP (logged, ignored) every 2 ms at a daemon serving a random-access
    program's faults in its C fast path, which reads the nonblocking uffd
    in a loop: a signal that lands in a read(2) fails it with EINTR (the
    kernel looks for a pending signal before it answers EAGAIN). That once
    killed the target as the daemon's internal error. The program checks
    every byte; its pages went out and came back through the fast path."""
    daemon = DaemonProcess(tmp_path, "--max-resident", "12M")
    try:
        with started([programs["scatter"], "32", "30000"], env=daemon.env(shim)) as target:
            sent, seen = 0, None
            while target.poll() is None:
                daemon.proc.send_signal(signal.SIGHUP)
                sent += 1
                time.sleep(0.002)
                if sent % 10 == 0:   # the last figures seen before its exit
                    seen = target_status(daemon, target.pid) or seen
            out, err = target.communicate(timeout=30)
        assert target.returncode == 0 and out.startswith(b"ok "), (out, err, daemon.log()[-3000:])
        assert daemon.alive(), daemon.log()[-3000:]
        log = daemon.log()
        assert "internal error" not in log, log[-3000:]
        assert sent > 200 and "SIGHUP ignored" in log, (sent, log[-3000:])
        assert seen is not None and seen["pages_out"] > 4096 and seen["faults_fast"] > 1000, seen
    finally:
        daemon.stop()


@pytest.mark.timeout(120)
def test_sigterm_with_a_forked_child_brings_both_back(tmp_path, shim, programs):
    """A target that forks after its memory was paged out: the child (whose
    uffd came with the fork event and went back to its shim) is drained and
    let go too; parent and child check every byte after the daemon left."""
    daemon = DaemonProcess(tmp_path, "--max-resident", "16M")
    try:
        cmd = [programs["ctl_hold"], "48", "fork"]
        with started(cmd, env=daemon.env(shim), stdin=subprocess.PIPE) as target:
            read_ready(target)
            wait_for(lambda: len(query_targets(daemon)) == 2, 30, "parent and child to be targets")
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(60) == 0, daemon.log()
            out, err = target.communicate(b"", timeout=30)
            assert target.returncode == 0, (out, err)
            assert out == b"ok 12288 pages\n" * 2, (out, err)
    finally:
        daemon.stop()


def query_targets(daemon) -> list[dict]:
    from umgr.cli import query_status
    return query_status(daemon.socket)["targets"]


@contextlib.contextmanager
def memory_cgroup(limit: int):
    """A memory cgroup (v1's controller, else v2) limited to `limit` bytes;
    yields the file a process writes "0" to, to join it."""
    v1 = "/sys/fs/cgroup/memory"
    root, limit_file = (v1, "memory.limit_in_bytes") if os.path.exists(f"{v1}/memory.limit_in_bytes") \
        else ("/sys/fs/cgroup", "memory.max")
    path = os.path.join(root, f"umgr-test-restart-{os.getpid()}")
    os.mkdir(path)
    try:
        with open(os.path.join(path, limit_file), "w") as f:
            f.write(str(limit))
        yield os.path.join(path, "cgroup.procs")
    finally:
        wait_for(lambda: _rmdir(path), 10, f"{path} to be removed")


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


@pytest.mark.timeout(120)
def test_sigterm_when_the_pages_cannot_fit_keeps_serving(tmp_path, shim, programs):
    """A target in a memory cgroup limited to 24 MiB, with 32 MiB or more
    swapped out: the daemon says the pages cannot fit and keeps serving;
    the target's bytes stay intact."""
    daemon = DaemonProcess(tmp_path, "--max-resident", "8M")
    try:
        with memory_cgroup(24 * MiB) as procs:
            def join_cgroup():
                with open(procs, "w") as f:
                    f.write("0")
            with started([programs["ctl_hold"], "48"], env=daemon.env(shim), stdin=subprocess.PIPE,
                         preexec_fn=join_cgroup) as target:
                read_ready(target)
                wait_swapped(daemon, target.pid, 32 * MiB)
                daemon.proc.send_signal(signal.SIGTERM)
                wait_for(lambda: "cannot stop" in daemon.log(), 20, "the daemon to refuse the stop")
                assert "its cgroup has room for" in daemon.log(), daemon.log()
                time.sleep(0.2)
                assert daemon.alive()
                assert target_status(daemon, target.pid)["swapped_bytes"] >= 32 * MiB
                out, err = target.communicate(b"", timeout=60)
                assert target.returncode == 0, err
                assert out == b"ok 12288 pages\n"
    finally:
        daemon.stop()


# ---- umgr exec dies -----------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_exec_killed_takes_a_grandchild_with_paged_out_memory_down(tmp_path, shim, programs):
    """`umgr exec -- sh -c 'ctl_hold 48 <&3 & ...'`: the shell's child holds
    32 MiB or more swapped out when umgr is SIGKILLed. Its daemon dies with
    it (PDEATHSIG), and so does the shell; the grandchild, asked to check its
    bytes, is killed by its watchdog at once (umgr exec, UMGR_EXEC_PID, is
    gone: no daemon will come back), never reports success on zeros. The
    next umgr exec removes the run directory the killed one left."""
    state = tmp_path / "state"
    script = f'exec 3<&0; {programs["ctl_hold"]} 48 <&3 & echo $!; wait'
    cmd = [sys.executable, "-m", "umgr", "exec", "--max-resident", "16M", "--swap-size", "1G", "-v",
           "--state-dir", str(state), "--", "sh", "-c", script]
    umgr = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    grandchild = None
    try:
        grandchild = int(umgr.stdout.readline())
        assert umgr.stdout.readline() == b"ready\n"
        wait_for(lambda: vm_rss_kb(grandchild) < 24 * 1024, 30, "the grandchild to be paged out")
        umgr.kill()
        umgr.wait(10)
        umgr.stdin.close()      # the grandchild checks its bytes now
        killed_at = time.monotonic()
        wait_for(lambda: ended(grandchild), 30, "the grandchild to end")
        assert time.monotonic() - killed_at < 10   # not after exec's grace period (30 s)
        out, err = umgr.stdout.read(), umgr.stderr.read()   # it held the last writers
    finally:
        umgr.kill()
        umgr.wait()
        if grandchild is not None and not ended(grandchild):
            os.kill(grandchild, signal.SIGKILL)
        umgr.stdout.close()
        umgr.stderr.close()
    assert b"ok" not in out, out
    assert f"umgr exec (pid {umgr.pid}), which ran it, is gone".encode() in err, err
    assert b"want" not in err, err
    left = [p.name for p in state.iterdir() if p.name.startswith("exec-")]
    assert len(left) == 1, left    # its socket, saved tables and swap file
    subprocess.run([sys.executable, "-m", "umgr", "exec", "--swap-size", "1G", "--state-dir", str(state), "--",
                    "true"], check=True, timeout=60)
    assert not [p for p in state.iterdir() if p.name.startswith("exec-")]


@pytest.mark.timeout(120)
# (The program's pages do not compress: the compressed store holds them raw.
# tests/test_compressed_exec.py kills the daemon of a chain, with pages that do.)
@pytest.mark.parametrize("backend", [["file"], ["compressed"]])
def test_exec_restarts_its_daemon_and_the_program_keeps_every_byte(tmp_path, shim, programs, backend):
    """umgr exec's daemon is SIGKILLed twice while the program holds 32 MiB
    or more swapped out: each time umgr exec restarts it, the new daemon
    takes the program back from the saved tables and the store (the swap
    file; the compressed store's memfd, which umgr exec holds), and the
    program checks every byte. --stats-json counts the restarts; the run
    directory is gone afterwards."""
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "umgr", "exec", "--max-resident", "16M", "--swap-size", "1G",
           *(f"--backend={spec}" for spec in backend),
           "--state-dir", str(state), "--stats-json", str(tmp_path / "stats.json"), "--", programs["ctl_hold"], "48"]
    with started(cmd, stdin=subprocess.PIPE) as umgr:
        read_ready(umgr)
        program = wait_for(lambda: [p for p in children(umgr.pid) if comm(p) == "ctl_hold"], 10, "the program")[0]
        sock = str(next(state.glob("exec-*/control.sock")))
        for _ in range(2):
            wait_for(lambda: served(sock, program), 30, "the program to be served (again)")
            wait_for(lambda: vm_rss_kb(program) < 24 * 1024, 30, "the program to be paged out")
            daemon = wait_for(lambda: [p for p in children(umgr.pid) if p != program], 30, "the daemon")[0]
            os.kill(daemon, signal.SIGKILL)
            wait_for(lambda: daemon not in children(umgr.pid), 10, "the daemon to die")
        out, err = umgr.communicate(b"", timeout=60)
    assert umgr.returncode == 0, err
    assert out == b"ok 12288 pages\n", (out, err)
    assert err.count(b"taken back by the umgr daemon restarted") == 2, err
    assert err.count(b"the embedded daemon died (signal SIGKILL); restarting it") == 2, err
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["daemon_restarts"] == 2 and stats["swap_slots_in_use_at_exit"] == 0, stats
    # The last daemon read pages back from the store the others left.
    assert stats["backend_tiers"][0]["tier"] == backend[0] and stats["backend_tiers"][0]["pages_read"] > 0, stats
    assert not [p for p in state.iterdir() if p.name.startswith("exec-")]


@pytest.mark.timeout(120)
def test_a_sigterm_to_exec_s_process_group_ends_the_program_not_the_daemon(tmp_path, shim, programs):
    """timeout(1) and `kill -TERM -PGID` signal umgr exec's whole process
    group. The program ends; the daemon, in a group of its own, is not
    killed and restarted on the way, so the run's figures are its own."""
    stats_file = tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "umgr", "exec", "-v", "--max-resident", "16M", "--swap-size", "1G",
           "--state-dir", str(tmp_path / "state"), "--stats-json", str(stats_file), "--", programs["ctl_hold"], "48"]
    with started(cmd, stdin=subprocess.PIPE, start_new_session=True) as umgr:
        read_ready(umgr)
        program = wait_for(lambda: [p for p in children(umgr.pid) if comm(p) == "ctl_hold"], 10, "the program")[0]
        wait_for(lambda: vm_rss_kb(program) < 24 * 1024, 30, "the program to be paged out")
        daemon = [p for p in children(umgr.pid) if p != program][0]
        assert os.getpgid(program) == umgr.pid and os.getpgid(daemon) == daemon
        # Out of the terminal's foreground group, it ignores SIGTTOU (`stty tostop` would stop its writes).
        assert ignored_signals(daemon) >> (signal.SIGTTOU - 1) & 1
        os.killpg(umgr.pid, signal.SIGTERM)
        _, err = umgr.communicate(timeout=60)
    assert umgr.returncode == 128 + signal.SIGTERM, err
    assert b"daemon died" not in err, err
    stats = json.loads(stats_file.read_text())
    assert stats["daemon_restarts"] == 0 and stats["targets"] == 1, stats
    assert stats["pages_out"] >= 6144 and stats["swap_slots_in_use_at_exit"] == 0, stats
    assert b"1 process, peak resident 16M" in err, err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("restartable", [True, False], ids=["restartable", "record-trace"])
def test_a_sigterm_to_every_process_of_the_run_stops_the_program_with_its_daemon_serving(
        tmp_path, shim, programs, restartable):
    """systemd's default stop (KillMode=control-group) and `pkill -f`
    signal every process of the run, the daemon too. The daemon ignores it:
    the program shuts down, reading back every page it had paged out, with
    its daemon serving; nothing is restarted. With --record-trace exec
    cannot restart its daemon, and the program was SIGKILLed."""
    stats_file = tmp_path / "stats.json"
    trace = [] if restartable else ["--record-trace", str(tmp_path / "run.trace")]
    cmd = [sys.executable, "-m", "umgr", "exec", "-v", "--max-resident", "16M", "--swap-size", "1G",
           "--state-dir", str(tmp_path / "state"), "--stats-json", str(stats_file), *trace,
           "--", programs["ctl_hold"], "48", "term"]
    stdin, keep_open = os.pipe()   # (the program is to end of the signal, not of its stdin's end)
    with contextlib.closing(os.fdopen(keep_open, "wb")), \
            started(cmd, stdin=stdin, start_new_session=True) as umgr:
        os.close(stdin)
        read_ready(umgr)
        program = wait_for(lambda: [p for p in children(umgr.pid) if comm(p) == "ctl_hold"], 10, "the program")[0]
        wait_for(lambda: vm_rss_kb(program) < 24 * 1024, 30, "the program to be paged out")
        daemon = [p for p in children(umgr.pid) if p != program][0]
        assert ignored_signals(daemon) >> (signal.SIGTERM - 1) & 1
        for pid in (umgr.pid, program, daemon):   # (systemd: the main process first)
            os.kill(pid, signal.SIGTERM)
        out, err = umgr.communicate(timeout=60)
    assert umgr.returncode == 0, err
    assert out == b"term\nok 12288 pages\n", (out, err)
    assert b"daemon died" not in err, err
    stats = json.loads(stats_file.read_text())
    assert stats["daemon_restarts"] == 0 and stats["targets"] == 1, stats
    # Its shutdown read back what had gone out.
    assert stats["pages_out"] >= 6144 and stats["pages_in"] >= 6144, stats
    assert stats["swap_slots_in_use_at_exit"] == 0, stats


def ignored_signals(pid: int) -> int:
    """The mask of the signals the process ignores (/proc/PID/status SigIgn)."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("SigIgn:")), 16)


def served(sock: str, pid: int) -> bool:
    from umgr.cli import query_status
    try:
        return any(t["pid"] == pid for t in query_status(sock)["targets"])
    except OSError:
        return False


# ---- a restarted daemon takes its programs back ----------------------------------------------
# What a service manager gives a daemon: only the tests that play one set them.
MANAGER_VARIABLES = ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class RestartableDaemon:
    """`umgr daemon` that can be SIGKILLed and started again with the same
    --socket and --state-dir (a log file per start)."""

    def __init__(self, tmp_path, *options: str, first_env: dict[str, str] | None = None):
        self.tmp_path = tmp_path
        self.socket = str(tmp_path / "umgr.sock")
        self.options = ["--socket", self.socket, "--state-dir", str(tmp_path / "state"), "--swap-size", "1G",
                        *options]
        self.starts = 0
        self.proc = None
        self.start(**(first_env or {}))

    def start(self, wrapper: tuple[str, ...] = (), pass_fds: tuple[int, ...] = (), **env: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)   # a killed daemon's: wait for the new one's
        self.starts += 1
        with open(self.tmp_path / f"daemon-{self.starts}.log", "wb") as log:
            base = {key: value for key, value in os.environ.items() if key not in MANAGER_VARIABLES}
            self.proc = subprocess.Popen([*wrapper, sys.executable, "-m", "umgr", "daemon", "-v", *self.options],
                                         stdout=log, stderr=subprocess.STDOUT, env=dict(base, **env),
                                         pass_fds=pass_fds)
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None, 20, "the daemon")
        assert self.proc.poll() is None, self.log()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return (self.tmp_path / f"daemon-{self.starts}.log").read_text(errors="replace")

    def env(self, shim: str, **extra: str) -> dict[str, str]:
        return dict(os.environ, LD_PRELOAD=shim, UMGR_SOCKET=self.socket, **extra)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def saved_targets(daemon: RestartableDaemon) -> list[str]:
    state = daemon.tmp_path / "state"
    return [p.name for d in state.iterdir() if d.name.startswith("daemon-") for p in d.iterdir()
            if p.name.startswith("t-")]


@pytest.mark.timeout(180)
def test_daemon_killed_at_random_moments_takes_its_programs_back(tmp_path, shim, programs):
    """Two targets under a 16 MiB budget each (`pattern 48 mmap srbsrb`, and
    `pattern 48 malloc srbsrb 2` with two threads: fill, then sequential,
    random and backward passes rewriting every page); the daemon SIGKILLed
    at random moments (during fill, eviction, zap, page-in) and started
    again with the same --socket and --state-dir: each time both are taken
    back (their blocked faults served from the saved page tables and swap
    file), and each checks every byte of every pass. Every slot is free at
    the end and no saved table is left. UMGR_TEST_SEED replays a run."""
    seed = int(os.environ.get("UMGR_TEST_SEED", time.time_ns() % 1000000))
    rng = random.Random(seed)
    daemon = RestartableDaemon(tmp_path, "--max-resident", "16M", "--grace", "60")
    cmds = [[programs["pattern"], "48", "mmap", "srbsrb"], [programs["pattern"], "48", "malloc", "srbsrb", "2"]]
    targets = []
    try:
        for cmd in cmds:
            targets.append(subprocess.Popen(cmd, env=daemon.env(shim), stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE))
        for t in targets:
            wait_for(lambda: target_status_of(daemon, t.pid) is not None, 20, "the targets")
        for round_ in range(4):
            time.sleep(rng.uniform(0.1, 1.0))
            running = [t for t in targets if t.poll() is None]
            if not running:
                break
            daemon.kill()
            time.sleep(rng.uniform(0, 0.5))
            daemon.start()
            for t in running:
                wait_for(lambda: t.poll() is not None or target_status_of(daemon, t.pid) is not None,
                         30, f"pid {t.pid} to be taken back (round {round_}, seed {seed})")
        for t in targets:
            out, err = t.communicate(timeout=120)
            assert t.returncode == 0, (seed, out, err, daemon.log())
            assert out.startswith(b"ok 12288 pages"), (seed, out)
            assert KILLED_LINE not in err and b"want" not in err, (seed, err)
            assert 1 <= err.count(b"taken back by the umgr daemon") <= daemon.starts - 1, (seed, err)
        assert daemon.starts >= 2
        # Not a daemon doing nothing: pages were out when it was killed.
        logs = "".join((tmp_path / f"daemon-{n}.log").read_text() for n in range(2, daemon.starts + 1))
        assert max(int(n) for n in re.findall(r"taken back after a restart .*: (\d+) pages swapped", logs)) > 1000
        wait_for(lambda: not saved_targets(daemon), 10, "the targets' saved tables to go")
        assert query_status_of(daemon)["backend"]["used_pages"] == 0
    finally:
        for t in targets:
            if t.poll() is None:
                t.kill()
                t.communicate()
        daemon.stop()


def target_status_of(daemon, pid: int) -> dict | None:
    try:
        return target_status(daemon, pid)
    except OSError:
        return None


@contextlib.contextmanager
def a_stop_waiting_for_a_stopped_program(tmp_path, shim, programs):
    """`ctl_hold 48` under 16 MiB, most of it swapped out, is stopped
    (SIGSTOP) when its daemon is SIGKILLed; a new daemon (grace 60 s) gets
    SIGTERM and waits for it to come back. Yields (daemon, program)."""
    daemon = RestartableDaemon(tmp_path, "--max-resident", "16M", "--grace", "60")
    program = subprocess.Popen([programs["ctl_hold"], "48"], env=daemon.env(shim), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_ready(program)
        wait_swapped(daemon, program.pid, 24 * MiB)
        settled_swapped(daemon, program.pid)
        program.send_signal(signal.SIGSTOP)
        daemon.kill()
        daemon.start()
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "1 programs of the previous daemon have not come back yet" in daemon.log(), 10,
                 "the stop to wait")
        yield daemon, program
    finally:
        if program.poll() is None:
            program.send_signal(signal.SIGCONT)
            program.kill()
            program.wait()
        daemon.stop()


@pytest.mark.timeout(120)
def test_a_stop_soon_after_a_restart_waits_for_the_programs_not_back_yet(tmp_path, shim, programs):
    """A program stopped when its daemon is killed cannot come back before
    the new daemon gets SIGTERM: the stop waits for it, brings its pages
    back once it is taken back, and exits 0; the program keeps every byte.
    (The stop went on without it and removed the swap file that held its
    pages.)"""
    with a_stop_waiting_for_a_stopped_program(tmp_path, shim, programs) as (daemon, program):
        time.sleep(0.5)
        assert daemon.proc.poll() is None, daemon.log()
        program.send_signal(signal.SIGCONT)
        assert daemon.proc.wait(60) == 0, daemon.log()
        assert "every page is back" in daemon.log()
        assert vm_rss_kb(program.pid) >= 46 * 1024
        out, err = program.communicate(b"", timeout=30)
        assert program.returncode == 0 and out == b"ok 12288 pages\n", (out, err)
        assert b"taken back by the umgr daemon" in err and KILLED_LINE not in err, err
        assert not saved_targets(daemon)


@pytest.mark.timeout(60)
def test_a_stop_soon_after_a_restart_does_not_wait_for_a_program_that_has_ended(tmp_path, shim, programs):
    """A program of the dead daemon that is killed while a stop waits for
    it to come back will not come back: the stop does not wait out the
    grace period (60 s here) for it, and drops its saved pages."""
    with a_stop_waiting_for_a_stopped_program(tmp_path, shim, programs) as (daemon, program):
        program.kill()
        program.communicate()
        started = time.monotonic()
        assert daemon.proc.wait(30) == 0, daemon.log()
        assert time.monotonic() - started < 20, daemon.log()
        assert f"pid {program.pid}: ended before it was taken back" in daemon.log()


@pytest.mark.timeout(120)
def test_a_restart_takes_back_more_programs_than_its_inherited_descriptor_limit(tmp_path, shim, programs):
    """Each saved target the restarted daemon loads holds its directory
    open: with a soft limit of 24 descriptors (as inherited; the hard one
    is high) it raises the limit before loading, and takes all 30 programs
    back (those past the limit were deleted as unreadable, and killed)."""
    low_limit = ("prlimit", "--nofile=24:", "--")   # (soft:hard, the hard one left)
    daemon = RestartableDaemon(tmp_path, "--max-resident", "2M", "--grace", "60")
    held = []
    try:
        for _ in range(30):
            held.append(subprocess.Popen([programs["ctl_hold"], "4"], env=daemon.env(shim), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for program in held:
            read_ready(program)
            wait_swapped(daemon, program.pid, 1 * MiB)
        daemon.kill()
        daemon.start(wrapper=low_limit)
        for program in held:
            wait_for(lambda: target_status_of(daemon, program.pid) is not None, 30,
                     f"pid {program.pid} to be taken back: {daemon.log()[-2000:]}")
        for program in held:
            out, err = program.communicate(b"", timeout=30)
            assert program.returncode == 0 and out == b"ok 1024 pages\n", (out, err)
    finally:
        for program in held:
            if program.poll() is None:
                program.kill()
                program.wait()
        daemon.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fork", ["fork", "fork-clearenv"])
def test_forked_parent_and_child_sharing_slots_are_both_taken_back(tmp_path, shim, programs, fork):
    """`ctl_hold 48 fork`: parent and child share 24 MiB or more of swapped
    pages (one slot, a reference from each table) when the daemon is
    SIGKILLed. The restarted daemon rebuilds the slot references from both
    saved tables and takes both back; each checks every byte, and when both
    have exited every slot is free. With fork-clearenv the parent cleared
    its environment before the fork: the child attaches all the same (by
    the socket its parent used; by UMGR_SOCKET, it ran on unattached, and
    read zeros after the crash)."""
    daemon = RestartableDaemon(tmp_path, "--max-resident", "16M")
    try:
        with started([programs["ctl_hold"], "48", fork], env=daemon.env(shim), stdin=subprocess.PIPE) as target:
            read_ready(target)
            wait_swapped(daemon, target.pid, 24 * MiB)
            child = wait_for(lambda: [t["pid"] for t in query_targets(daemon) if t["pid"] != target.pid],
                             30, "the child")[0]
            wait_for(lambda: UFFD_LINK in fd_links(child), 10, "the child's shim to hold its uffd")
            assert target_status(daemon, child)["swapped_bytes"] >= 24 * MiB
            used = settled_used_pages(daemon)
            daemon.kill()
            daemon.start()
            for pid in (target.pid, child):
                wait_for(lambda: target_status_of(daemon, pid) is not None, 30, f"pid {pid} to be taken back")
            # The shared slots are counted once each, as before the crash.
            assert settled_used_pages(daemon) == used
            out, err = target.communicate(b"", timeout=60)
        assert target.returncode == 0, (out, err, daemon.log())
        assert out == b"ok 12288 pages\n" * 2, (out, err)
        assert err.count(b"taken back by the umgr daemon") == 2, err
        wait_for(lambda: not query_targets(daemon), 10, "both targets to be released")
        assert query_status_of(daemon)["backend"]["used_pages"] == 0
        assert not saved_targets(daemon)
    finally:
        daemon.stop()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode, point", [("dontneed", "app-remove"), ("mremap", "remap"), ("munmap", "unmap")])
def test_a_message_read_but_not_applied_is_applied_by_the_restarted_daemon(tmp_path, shim, programs, mode, point):
    """The daemon dies (a crash point: UMGR_TEST_CRASH_AT) right after it
    read the app's MADV_DONTNEED, mremap or munmap of paged-out memory and
    before its table says so; the app's call has returned. The restarted
    daemon finds the message in the target's journal and applies it first:
    the discarded pages read zero (not their old bytes), the moved ones
    keep theirs at the new address, and the program checks every byte.
    The pages resident at the take-back are evicted like any other: the
    eviction order must name moved pages at their new addresses. (Left
    naming the old ones, it held none of the 4096 resident pages: the
    program ran on what room was left, with no room at all one fault per
    page, for minutes.)"""
    # FIFO, named: the pages-in count below follows from its order.
    daemon = RestartableDaemon(tmp_path, "--max-resident", "16M", "--eviction", "fifo",
                               first_env={"UMGR_TEST_CRASH_AT": point})
    try:
        with started([programs["lifecycle"], mode, "64"], env=daemon.env(shim)) as target:
            wait_for(lambda: daemon.proc.poll() is not None, 60, f"the daemon to die at {point}")
            assert daemon.proc.returncode == -signal.SIGKILL, daemon.log()
            daemon.start()
            out, err = target.communicate(timeout=90)
        assert target.returncode == 0, (out, err, daemon.log())
        assert b"taken back by the umgr daemon restarted" in err, err
        assert re.search(r"applying \d+ message\(s\) the dead daemon read", daemon.log()), daemon.log()
        wait_for(lambda: "released (faults" in daemon.log(), 10, "the target to be released")
        if mode == "mremap":
            # The program reads its 16384 moved pages, then the 8192 its
            # shrink keeps, in order, each resident page evicted (FIFO)
            # before it is read again: 24576 pages come in, where the
            # resident pages left out of the eviction order made it 20.5k.
            pages_in = int(re.search(r"released \(faults \d+, pages in (\d+)", daemon.log()).group(1))
            assert pages_in > 24576 - 2048, daemon.log()
    finally:
        daemon.stop()


@pytest.mark.timeout(60)
def test_restarted_daemon_without_its_state_kills_the_program_at_once(tmp_path, shim, programs):
    """The daemon is restarted with another --state-dir (its saved state is
    not there): it answers the program's request to be taken back ESTALE,
    and the shim kills the program with one line at once, without waiting
    out its grace period. It never runs on zeros."""
    daemon = RestartableDaemon(tmp_path, "--max-resident", "16M")
    try:
        with started([programs["ctl_hold"], "48"], env=daemon.env(shim), stdin=subprocess.PIPE) as target:
            read_ready(target)
            wait_swapped(daemon, target.pid, 24 * MiB)
            on_crash = query_status_of(daemon)["on_crash"]
            assert on_crash.startswith("programs wait 60 s") and "takes them back (state in " in on_crash, on_crash
            daemon.kill()
            daemon.options[daemon.options.index("--state-dir") + 1] = str(tmp_path / "elsewhere")
            daemon.start()
            out, err = target.communicate(b"", timeout=30)
        assert target.returncode == -signal.SIGKILL, (out, err)
        assert b"and the one restarted at" in err and b"has none of its paged-out memory" in err, err
        assert err.count(b"\n") == 1, err
        assert "no state of it is left here" in daemon.log()
    finally:
        daemon.stop()


def settled_swapped(daemon, pid: int) -> int:
    """The target's swapped bytes once two readings half a second apart agree."""
    readings = []

    def settled():
        readings.append(target_status(daemon, pid)["swapped_bytes"])
        return len(readings) > 1 and readings[-1] == readings[-2]
    wait_for(settled, 30, f"pid {pid}'s eviction to settle", interval=0.5)
    return readings[-1]


def settled_used_pages(daemon) -> int:
    """The backend's used slots once two readings half a second apart agree:
    the reclaimer may still be evicting a target that has just connected."""
    readings = []

    def settled():
        readings.append(query_status_of(daemon)["backend"]["used_pages"])
        return len(readings) > 1 and readings[-1] == readings[-2]
    wait_for(settled, 30, "the backend's used slots to settle", interval=0.5)
    return readings[-1]


def query_status_of(daemon) -> dict:
    from umgr.cli import query_status
    return query_status(daemon.socket)


@pytest.mark.timeout(90)
def test_a_budget_changed_while_running_is_kept_by_the_restarted_daemon(tmp_path, shim, programs):
    """`umgr budget` lowers a target's budget; the daemon is SIGKILLed and
    started again: the target comes back with the budget it was given, not
    the one its HELLO asked for, and then checks every byte. It keeps its
    name too, though it renamed itself meanwhile (its metrics series stay
    its own)."""
    daemon = RestartableDaemon(tmp_path, "--max-resident", "16M", "--grace", "60")
    try:
        with started([programs["ctl_hold"], "48", "rename"], env=daemon.env(shim), stdin=subprocess.PIPE) as target:
            read_ready(target)
            assert target_status(daemon, target.pid)["name"] == "ctl_hold"
            wait_for(lambda: comm(target.pid) == "renamed", 10, "the program to rename itself")
            wait_swapped(daemon, target.pid, 24 * MiB)
            changed = subprocess.run([sys.executable, "-m", "umgr", "budget", "--socket", daemon.socket,
                                      str(target.pid), "8M"], capture_output=True, text=True, timeout=20)
            assert changed.returncode == 0, changed.stderr
            wait_for(lambda: target_status(daemon, target.pid)["resident_bytes"] <= 8 * MiB, 10, "8M resident")
            daemon.kill()
            daemon.start()
            back = wait_for(lambda: target_status_of(daemon, target.pid), 30, "the target to be taken back")
            assert back["budget_bytes"] == 8 * MiB and back["name"] == "ctl_hold", back
            out, err = target.communicate(b"", timeout=60)
        assert target.returncode == 0, (err, daemon.log())
        assert out == b"ok 12288 pages\n"
        assert b"taken back by the umgr daemon" in err, err
    finally:
        daemon.stop()


# ---- under a service manager: its descriptor store keeps the compressed store -----------------
# Run argv[2:] in this process with the descriptors argv[1] lists at 3 on
# and $LISTEN_PID this process's, as systemd's start of a unit does.
PASS_FDS = """import fcntl, os, sys
given = [int(fd) for fd in sys.argv[1].split(",") if fd]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in given]   # (out of the way of 3..)
for fd in given:
    os.close(fd)
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


class ServiceManager:
    """What systemd does for a Type=notify unit with FileDescriptorStoreMax=
    set: a notify socket, the descriptors a daemon stores there
    (FDSTORE=1, FDNAME=; FDSTOREREMOVE=1 takes them out), and a start that
    passes them back as sd_listen_fds(3) describes: at descriptor 3 on,
    $LISTEN_FDS and $LISTEN_FDNAMES, for the process $LISTEN_PID."""

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.stored: dict[str, int] = {}

    def receive(self) -> None:
        """Take in every message sent so far."""
        while True:
            try:
                message, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            fds = [fd for level, kind, data in ancillary if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                   for fd in array.array("i", data[:len(data) - len(data) % 4])]
            fields = dict(line.split("=", 1) for line in message.decode().splitlines())
            if fields.get("FDSTOREREMOVE") == "1" and fields["FDNAME"] in self.stored:
                os.close(self.stored.pop(fields["FDNAME"]))
            if fields.get("FDSTORE") == "1":
                assert len(fds) == 1 and fields.get("FDPOLL") == "0", (fields, fds)
                self.stored[fields["FDNAME"]] = fds.pop()
            for fd in fds:
                os.close(fd)

    def start(self, daemon: RestartableDaemon) -> None:
        """Start the daemon again with the stored descriptors."""
        names = list(self.stored)
        fds = ",".join(str(self.stored[name]) for name in names)
        daemon.start(wrapper=(sys.executable, "-c", PASS_FDS, fds), pass_fds=tuple(self.stored.values()),
                     NOTIFY_SOCKET=self.path,
                     LISTEN_FDS=str(len(names)), LISTEN_FDNAMES=":".join(names))

    def close(self) -> None:
        self.sock.close()
        for fd in self.stored.values():
            os.close(fd)


# A program whose pages compress, but one in four (in a chain, those go to
# the file): fills MIB, says "ready", and checks every byte at stdin's EOF.
COMPRESSIBLE_HOLD = r"""
import hashlib, sys

def page(p):
    if p % 4 == 3:
        return hashlib.shake_128(p.to_bytes(8, "little")).digest(4096)
    line = b"record %d: value=%d; " % (p, p * 31 % 1000)
    return (line * (4096 // len(line) + 1))[:4096]

npages = int(sys.argv[1]) * 256
data = bytearray(npages * 4096)
for p in range(npages):
    data[p * 4096:(p + 1) * 4096] = page(p)
print("ready", flush=True)
sys.stdin.read()
wrong = [p for p in range(npages) if data[p * 4096:(p + 1) * 4096] != page(p)]
print(f"wrong pages {wrong[:8]}" if wrong else f"ok {npages} pages")
"""


@contextlib.contextmanager
def compressible_program(tmp_path, daemon: RestartableDaemon, shim: str):
    """COMPRESSIBLE_HOLD of 48 MiB under the daemon, filled, with 24 MiB or
    more swapped out; it checks every byte once its stdin is closed."""
    script = tmp_path / "hold.py"
    script.write_text(COMPRESSIBLE_HOLD)
    with started([sys.executable, str(script), "48"], env=daemon.env(shim), stdin=subprocess.PIPE) as target:
        read_ready(target)
        wait_swapped(daemon, target.pid, 24 * MiB)
        yield target


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", [["compressed"], ["compressed", "file"]])
def test_a_service_managers_descriptor_store_keeps_the_compressed_store_for_a_restarted_daemon(
        tmp_path, shim, programs, backend):
    """`umgr daemon` with a compressed store (alone, or in front of the
    file) under a service manager: it hands the store's memfd to the
    manager's descriptor store; SIGKILLed while the program holds 24 MiB
    or more swapped out and started again with the memfd passed back, it
    takes the program back, which checks every byte. A clean stop takes
    the memfd out of the store."""
    manager = ServiceManager(tmp_path)
    daemon = RestartableDaemon(tmp_path, "--max-resident", "16M", "--grace", "60",
                               *(f"--backend={spec}" for spec in backend), first_env={"NOTIFY_SOCKET": manager.path})
    try:
        with compressible_program(tmp_path, daemon, shim) as target:
            on_crash = query_status_of(daemon)["on_crash"]
            assert "takes them back" in on_crash and "kept only if the unit sets FileDescriptorStoreMax=" in on_crash, \
                on_crash
            manager.receive()
            assert os.readlink(f"/proc/self/fd/{manager.stored['umgr-store']}").startswith("/memfd:umgr-store")
            stored = os.fstat(manager.stored["umgr-store"]).st_ino
            daemon.kill()
            # Other options (each entry names its codec): the tables are kept.
            daemon.options[daemon.options.index("--backend=compressed")] = \
                "--backend=compressed:cap=128M,codec=zstd,level=3"
            manager.start(daemon)
            wait_for(lambda: target_status_of(daemon, target.pid), 30, "the target to be taken back")
            assert "compressed store's memory kept by the service manager" in query_status_of(daemon)["on_crash"]
            out, err = target.communicate(b"", timeout=60)
        assert target.returncode == 0, (err, daemon.log())
        assert out == b"ok 12288 pages\n"
        assert b"taken back by the umgr daemon" in err, err
        assert "memory came back from the service manager" in daemon.log()
        # The pages came back from the store the dead daemon left.
        tier = query_status_of(daemon)["backend"]["tiers"][0]
        assert tier["tier"] == "compressed" and tier["pages_read"] >= (16 * MiB) // 4096, tier
        manager.receive()
        assert os.fstat(manager.stored["umgr-store"]).st_ino == stored   # (taken over, not replaced)
        daemon.stop()
        manager.receive()
        assert "umgr-store" not in manager.stored   # every page came back: nothing to keep
    finally:
        daemon.stop()
        manager.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("restart", ["store dropped", "blank store", "another store", "other backend"])
def test_a_compressed_store_that_did_not_come_back_kills_the_program_at_once(tmp_path, shim, programs, restart):
    """The restarted daemon finds saved tables but not the store they name,
    and forgets them: the program, asking to be taken back, is killed at
    once with one line; it never runs on zeros. Four ways: a unit without
    FileDescriptorStoreMax= (systemd drops the memfd the daemon stores); a
    memfd of that name holding no store, or another daemon's store; and a
    daemon restarted with another --backend chain (the file behind the
    compressed tier, alone: the pages in the compressed tier are not in
    it), which lets the memfd go. With the tables kept, the first two
    could not start (no store to take over), the third would take over
    another program's pages and the last read slots the file never held.
    A memfd passed back and not taken over is not used: the restarted
    daemon stores a new one."""
    manager = ServiceManager(tmp_path)
    daemon = RestartableDaemon(tmp_path, "--max-resident", "16M", "--grace", "60", "--backend=compressed",
                               *(["--backend=file"] if restart == "other backend" else []),
                               first_env={"NOTIFY_SOCKET": manager.path})
    try:
        with compressible_program(tmp_path, daemon, shim) as target:
            daemon.kill()
            manager.receive()
            if restart == "other backend":
                daemon.options = [o for o in daemon.options if o != "--backend=compressed"]
            else:
                os.close(manager.stored.pop("umgr-store"))
                if restart != "store dropped":
                    manager.stored["umgr-store"] = os.memfd_create("umgr-store")
                if restart == "another store":   # (of another daemon: a store, not the one the tables name)
                    Region(1 << 16, 64 * SPAN, manager.stored["umgr-store"]).close()
            passed_back = os.fstat(manager.stored["umgr-store"]).st_ino if "umgr-store" in manager.stored else -1
            manager.start(daemon)
            out, err = target.communicate(b"", timeout=30)
        assert target.returncode == -signal.SIGKILL, (out, err)
        assert b"has none of its paged-out memory" in err and err.count(b"\n") == 1, err
        why = {"store dropped": "did not come back from the service manager",
               "blank store": "passed back holds no compressed store of theirs",
               "another store": "passed back holds no compressed store of theirs",
               "other backend": "saved with the stores compressed + file, not file"}[restart]
        assert why in daemon.log(), daemon.log()
        manager.receive()
        if restart == "other backend":
            assert "umgr-store" not in manager.stored   # (nothing takes it over)
        else:   # the restarted daemon's, for its next restart: a new memfd, never the one passed back
            assert "umgr-store" in manager.stored and os.fstat(manager.stored["umgr-store"]).st_ino != passed_back
    finally:
        daemon.stop()
        manager.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("options, why", [(["--backend", "compressed"], "its compressed store dies with it"),
                                          (["--no-persist"], "--no-persist")])
def test_status_says_what_a_crash_does_when_nothing_is_saved(tmp_path, options, why):
    """`umgr status` tells what becomes of the programs if the daemon
    dies: with nothing saved (a compressed store and no service manager
    to keep it, or --no-persist), they are killed after the grace period."""
    daemon = RestartableDaemon(tmp_path, "--grace", "7", *options)
    try:
        on_crash = query_status_of(daemon)["on_crash"]
        assert on_crash == f"programs wait 7 s (or their UMGR_GRACE_SECONDS), then are killed: nothing is saved ({why}" \
            + (": no service manager keeps it)" if why != "--no-persist" else ")"), on_crash
        shown = subprocess.run([sys.executable, "-m", "umgr", "status", "--socket", daemon.socket],
                               capture_output=True, text=True, timeout=20)
        assert f"on a crash: {on_crash}\n" in shown.stdout, shown
    finally:
        daemon.stop()


# Descriptors at 3 and 4 as systemd passes them (sd_listen_fds(3)), then fdstore.take().
TAKE_PASSED = r"""
import os, sys
from umgr.daemon import fdstore
fds = [os.memfd_create(name) for name in ("umgr-store", "left-over")]
moved = [os.dup(fd) for fd in fds]
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="umgr-store:left-over")
found = fdstore.take("umgr-store")
print(found, os.readlink(f"/proc/self/fd/{found}"), os.path.exists("/proc/self/fd/4"))
"""


def test_a_passed_descriptor_of_another_name_is_closed_and_taken_out_of_the_store(tmp_path):
    """umgr keeps one descriptor in the store: another the service manager
    passes back (left by an older version, or by hand) is closed and
    removed from the store, so it does not take a place there for ever."""
    manager = ServiceManager(tmp_path)
    try:
        manager.stored["left-over"] = os.memfd_create("left-over")
        manager.stored["umgr-store"] = kept = os.memfd_create("umgr-store")
        done = subprocess.run([sys.executable, "-c", TAKE_PASSED], capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, NOTIFY_SOCKET=manager.path))
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[:2] == ["3", "/memfd:umgr-store"] and done.stdout.split()[-1] == "False", \
            done.stdout
        manager.receive()
        assert "left-over" not in manager.stored and manager.stored.get("umgr-store") == kept
    finally:
        manager.close()


def test_a_state_directory_knows_its_stores_memfd_by_a_name_no_other_has(tmp_path):
    """Inode numbers of memfds come from one 32-bit counter and may come
    round; each memfd umgr makes has a random part in its name, and the
    state directory recognises its store's memfd by that name."""
    from umgr.backends.region import memfd_name, new_memfd
    from umgr.daemon.statedir import StateDir
    state = StateDir(str(tmp_path / "state"), str(tmp_path / "s.sock"))
    ours, other = new_memfd("umgr-store"), new_memfd("umgr-store")
    try:
        assert memfd_name(ours).startswith("umgr-store-") and memfd_name(ours) != memfd_name(other)
        state.note_memory(ours)
        assert state.memory_is_theirs(ours) and not state.memory_is_theirs(other)
    finally:
        os.close(ours)
        os.close(other)


def test_an_exec_s_new_record_outlives_the_old_image_s_release(tmp_path, caplog):
    """After an exec the new image's target is made while the old one may
    still be being released (the same pid and start time, so the same
    directory name): the new one clears the old directory and makes its
    own, and the old target's release must leave that one alone."""
    from umgr.daemon.statedir import StateDir
    state = StateDir(str(tmp_path / "state"), str(tmp_path / "s.sock"))
    try:
        old = state.new_target(os.getpid(), {"name": "old"})
        new = state.new_target(os.getpid(), {"name": "new"})
        assert new.dir_name == old.dir_name
        with caplog.at_level("WARNING", logger="umgr.daemon"):
            state.forget(old)
        assert not caplog.records
        names = os.listdir(os.path.join(state.path, new.dir_name))
        assert "target.json" in names and "events" in names
        state.forget(new)
        assert not os.path.exists(os.path.join(state.path, new.dir_name))
    finally:
        state.close(clean=True)
