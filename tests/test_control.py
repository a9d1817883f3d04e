"""The control socket under bad input, and apps without a (working) daemon.

Bad input (a malformed message, an unknown policy, no first message in time)
drops that connection only, with one log line naming the peer and the reason;
the daemon stays up and every other target keeps being served.
With no daemon the shim leaves the app running unmanaged, with one line on
stderr. Everything here runs against a real daemon, real shims and real
userfaultfds.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import DaemonProcess, MiB, children, comm, fd_links, wait_for
from umgr import protocol
from umgr.backends.file import DEFAULT_STATE_DIR
from umgr.cli import DEFAULT_SOCKET, ask_daemon, format_status, query_status
from umgr.sizes import parse_size

UFFD_LINK = "anon_inode:[userfaultfd]"
PIDFD_LINK = "anon_inode:[pidfd]"
RELEASED = re.compile(r"pid (\d+): released \(faults (\d+), pages in (\d+), out (\d+)\)")

# A client that needs a real userfaultfd runs in a child process: a uffd
# handed to the daemon is registered over the memory of the process that
# created it, which must not be the test runner. The child prints one JSON
# object: its pid, what the daemon answered, and whether it closed the
# connection ("closed": recv gave b"", "reset": ECONNRESET, "open": timeout).
CLIENT = r"""
import ctypes, json, mmap, os, socket, sys
from umgr import protocol
from umgr.kernel.uffd import Userfaultfd

mode, path = sys.argv[1], sys.argv[2]

def outcome(s):
    try:
        data = s.recv(4096)
    except socket.timeout:
        return "open"
    except ConnectionResetError:
        return "reset"
    return "closed" if data == b"" else "data:" + data.hex()

uffd = Userfaultfd.create()
# The page the daemon fills through the uffd and reads back to prove it ours.
probe_map = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
probe = ctypes.addressof(ctypes.c_char.from_buffer(probe_map))
agent, agent_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(5)
s.connect(path)
result = {"pid": os.getpid()}
# A generous budget under a daemon without one: nothing of this process is
# ever evicted, so the agent socket (nobody answers zaps on it) is never used.
budget = 1 << 30
if mode == "second-hello":
    hello = protocol.encode_hello(os.getpid(), max_resident=budget, probe=probe)
    socket.send_fds(s, [hello], [agent.fileno(), uffd.fileno()])
    uffd.close()
    ack = s.recv(4096)
    result["ack_status"] = protocol.HELLO_ACK.unpack(ack)[3] if len(ack) == protocol.HELLO_ACK.size else ack.hex()
    s.send(hello)
elif mode == "lying-pid":
    hello = protocol.encode_hello(int(sys.argv[3]), max_resident=budget)
    socket.send_fds(s, [hello], [agent.fileno(), uffd.fileno()])
elif mode == "pipe-agent":
    r, w = os.pipe()
    result["pipe_inode"] = os.fstat(r).st_ino
    socket.send_fds(s, [protocol.encode_hello(os.getpid(), max_resident=budget)], [r, uffd.fileno()])
else:
    raise SystemExit(f"unknown mode {mode}")
result["outcome"] = outcome(s)
print(json.dumps(result), flush=True)
"""


# ---- helpers ---------------------------------------------------------------------------
def drop_lines(daemon) -> list[str]:
    return [line for line in daemon.log().splitlines() if "dropping connection" in line]


def outcome(sock: socket.socket) -> str:
    try:
        data = sock.recv(4096)
    except socket.timeout:
        return "open"
    except ConnectionResetError:
        return "reset"
    return "closed" if data == b"" else "data:" + data.hex()


def send_raw(path: str, payload: bytes, fds: list[int] = ()) -> str:
    """One message (with descriptors, if any) on a new connection; what the
    daemon then does with the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect(path)
        if fds:
            socket.send_fds(s, [payload], list(fds))
        else:
            s.send(payload)
        return outcome(s)


def run_client(mode: str, path: str, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CLIENT, mode, path, *extra], capture_output=True, timeout=30)
    assert proc.returncode == 0, f"client {mode} failed: {proc.stderr.decode(errors='replace')}"
    return json.loads(proc.stdout)


def wait_nothing_new_held(daemon, held: list[str], timeout: float = 5) -> None:
    """Wait until the daemon holds no descriptor beyond `held` (taken earlier;
    it may include a status connection closing just then)."""
    wait_for(lambda: set(fd_links(daemon.proc.pid)) <= set(held), timeout,
             f"the daemon to hold nothing beyond {sorted(held)} (now {sorted(fd_links(daemon.proc.pid))})")


def target_status(daemon, pid: int) -> dict | None:
    for t in query_status(daemon.socket)["targets"]:
        if t["pid"] == pid:
            return t
    return None


def wait_paging(daemon, pid: int, timeout: float = 30, pages: int = 1) -> dict:
    """The target's status once at least `pages` of it have been paged out."""
    def paged():
        t = target_status(daemon, pid)
        return t if t is not None and t["pages_out"] >= pages else None
    return wait_for(paged, timeout, f"pid {pid} to be attached and paged out")


@contextlib.contextmanager
def started(cmd: list[str], **kwargs):
    """Popen that never leaves a process behind, whatever the test does."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.timeout(60)
def test_status_shows_the_command_line_a_program_rewrote(daemon, shim, programs):
    """Servers rewrite their command line once started (postgres's backends
    read "postgres: USER DB [local] SELECT", their parent's line when they
    connected): status shows it as ps does."""
    with started([programs["ctl_hold"], "8", "rename"], env=daemon.env(shim), stdin=subprocess.PIPE) as target:
        assert target.stdout.readline() == b"ready\n"
        shown = wait_for(lambda: (lambda t: t if t and t["command"] == "ctl_hold: renamed" else None)(
            target_status(daemon, target.pid)), 10, "the new command line in status")
        assert shown["name"] == "ctl_hold"   # (its metrics label stays)
        out, err = target.communicate(b"", timeout=30)
    assert target.returncode == 0 and out == b"ok 2048 pages\n", err


@pytest.mark.timeout(90)
def test_status_of_many_processes_comes_whole(daemon, shim):
    """A STATUS reply larger than one message may be (the socket's send
    buffer, about 208 KiB: some 120 targets) comes in parts, all of it;
    and a command line of 100 KB is shown cut to its first 4 KiB."""
    padding = "x" * 1500
    procs = []
    try:
        for i in range(150):
            procs.append(subprocess.Popen(["sh", "-c", "read line", f"waiter-{i}", padding], env=daemon.env(shim),
                                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL))
        long_line = subprocess.Popen(["sh", "-c", "read line", "long", "y" * 100_000], env=daemon.env(shim),
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        procs.append(long_line)
        pids = {p.pid for p in procs}
        status = wait_for(lambda: (lambda st: st if pids <= {t["pid"] for t in st["targets"]} else None)(
            query_status(daemon.socket)), 30, "every process in status")
        assert len(json.dumps(status)) > 256 << 10, "more than one message's worth"
        command = next(t["command"] for t in status["targets"] if t["pid"] == long_line.pid)
        assert command.endswith(" ...") and len(command) <= 4096 + 4, len(command)
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()


# ---- 1. bad clients while a real target is paged -----------------------------------------
@pytest.fixture
def uncapped_daemon(tmp_path):
    """A daemon with no budget of its own: a HELLO's budget is a cap under
    the daemon's, and the clients below must never be evicted."""
    d = DaemonProcess(tmp_path)
    yield d
    d.stop()


@pytest.mark.timeout(120)
def test_bad_clients_are_dropped_while_a_real_target_runs(uncapped_daemon, shim, programs):
    daemon = uncapped_daemon
    me = os.getpid()
    baseline = fd_links(daemon.proc.pid)
    # "srb+": the target pages until its stdin closes (communicate()), so it
    # outlasts the bad clients, three of which are Python processes that
    # import numpy, however slow the machine.
    with started([programs["pattern"], "128", "mmap", "srb+"], stdin=subprocess.PIPE,
                 env=daemon.env(shim, UMGR_MAX_RESIDENT="16M")) as target:
        before = wait_paging(daemon, target.pid)

        pipes = []

        def pipe() -> tuple[int, int]:
            r, w = os.pipe()
            pipes.append((r, w))
            return r, w

        def with_pipes(payload: bytes, count: int = 1, socket_first: bool = False):
            def send():
                fds = [fd for _ in range(count) for fd in pipe()]
                if socket_first:
                    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    with a, b:
                        return send_raw(daemon.socket, payload, [a.fileno(), fds[0]]), me
                return send_raw(daemon.socket, payload, fds), me
            return send

        def in_process(payload: bytes):
            return lambda: (send_raw(daemon.socket, payload), me)

        def client(mode: str, *extra: str):
            def send():
                result = run_client(mode, daemon.socket, *extra)
                if "pipe_inode" in result:
                    child_pipes.append(result["pipe_inode"])
                if mode == "second-hello":
                    assert result["ack_status"] == 0, f"the first HELLO was not accepted: {result}"
                return result["outcome"], result["pid"]
            return send

        child_pipes: list[int] = []
        hello = protocol.encode_hello(me)
        cases = [
            ("garbage bytes", in_process(b"\xde\xad\xbe\xef" * 16), "bad magic"),
            ("truncated HELLO", in_process(hello[:10]), f"size field {len(hello)} but 10 bytes received"),
            ("HELLO without descriptors", in_process(hello), "must carry 2 descriptors"),
            ("HELLO with two pipe fds", with_pipes(hello), "not a userfaultfd"),
            ("HELLO with a socket and a pipe", with_pipes(hello, socket_first=True), "not a userfaultfd"),
            ("HELLO with a pipe as agent and a real uffd", client("pipe-agent"), "not a socket"),
            ("HELLO claiming the real target's pid", client("lying-pid", str(target.pid)),
             f"claims pid {target.pid}"),
            ("wrong protocol version", in_process(protocol.encode_hello(me, version=protocol.VERSION + 1)),
             f"protocol version {protocol.VERSION + 1}"),
            ("HELLO with an unknown flag", in_process(protocol.encode_hello(me, flags=2)), "unknown HELLO flags 0x2"),
            ("second HELLO on an accepted connection", client("second-hello"), "second HELLO"),
            ("REGION before HELLO", in_process(protocol.encode_region(0x10000, 1 << 20)), "must be HELLO"),
            ("datagram larger than any message", in_process(b"\0" * 8192), "truncated"),
            ("more descriptors than a HELLO carries", with_pipes(hello, count=4), "truncated"),
        ]

        failures = []
        try:
            for name, send, reason in cases:
                seen = len(drop_lines(daemon))
                how, peer = send()
                if how not in ("closed", "reset"):
                    failures.append(f"{name}: connection not closed by the daemon ({how})")
                try:
                    line = wait_for(lambda: drop_lines(daemon)[seen:], 5, f"a drop line for {name}")[0]
                except AssertionError as exc:
                    failures.append(f"{name}: {exc}")
                else:
                    if reason not in line or f"pid {peer} uid " not in line:
                        failures.append(f"{name}: log line {line!r} does not name pid {peer} and {reason!r}")
                if not daemon.alive():
                    failures.append(f"{name}: the daemon died")
                    break
                if target.poll() is not None:
                    failures.append(f"{name}: the real target exited early ({target.returncode})")
                held = set(fd_links(daemon.proc.pid))
                sent = {f"pipe:[{os.fstat(r).st_ino}]" for r, _ in pipes} | {f"pipe:[{i}]" for i in child_pipes}
                if held & sent:
                    failures.append(f"{name}: the daemon still holds {sorted(held & sent)}")
        finally:
            for r, w in pipes:
                os.close(r)
                os.close(w)
        assert not failures, "\n".join(failures) + "\n--- daemon log:\n" + daemon.log()[-3000:]

        status = query_status(daemon.socket)
        assert status["rejected_connections"] == len(cases)
        during = target_status(daemon, target.pid)
        assert during is not None, "the real target is no longer managed"
        assert target.poll() is None, "the real target finished before the bad clients were done"
        assert during["pages_out"] > before["pages_out"] > 0, "the real target stopped being paged"

        out, err = target.communicate(timeout=100)
    assert target.returncode == 0, err.decode(errors="replace")
    assert out.decode().startswith("ok 32768 pages"), out
    def log_once_released():
        text = daemon.log()
        return text if f"pid {target.pid}: released" in text else None
    log = wait_for(log_once_released, 5, "the target's release")
    assert f"pid {target.pid}: attached (" in log
    released = [m for m in RELEASED.finditer(log) if int(m.group(1)) == target.pid]
    assert len(released) == 1 and int(released[0].group(4)) > 0, log

    # Nothing a dropped connection brought stays open in the daemon: once
    # every target is gone (the second-HELLO client was attached until it
    # exited) it holds what it held before the first client came.
    wait_for(lambda: not query_status(daemon.socket)["targets"], 10, "every target to be released")
    wait_for(lambda: sorted(fd_links(daemon.proc.pid)) == sorted(baseline), 5,
             f"the daemon's descriptors to return to {sorted(baseline)} (now {sorted(fd_links(daemon.proc.pid))})")
    assert UFFD_LINK not in fd_links(daemon.proc.pid)
    assert daemon.alive()


@pytest.mark.timeout(90)
def test_silent_client_is_dropped_while_a_real_target_runs(tmp_path, shim, programs):
    """A client that connects and sends nothing is dropped after the daemon's
    --hello-timeout, with one log line, and leaves nothing behind; meanwhile
    the daemon answers others and a real target keeps being paged."""
    daemon = DaemonProcess(tmp_path, "--max-resident", "16M", "--hello-timeout", "1")
    try:
        with started([programs["pattern"], "128", "mmap", "srb+"], stdin=subprocess.PIPE,
                     env=daemon.env(shim)) as target:
            before = wait_paging(daemon, target.pid)
            held = sorted(fd_links(daemon.proc.pid))
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as silent:
                silent.settimeout(10)
                silent.connect(daemon.socket)
                connected = time.monotonic()
                assert target_status(daemon, target.pid) is not None, "a silent client blocks the daemon"
                how = outcome(silent)
                waited = time.monotonic() - connected
            assert how in ("closed", "reset"), how
            assert 0.8 < waited < 5, f"dropped after {waited:.1f}s, --hello-timeout is 1s"
            line = wait_for(lambda: drop_lines(daemon), 5, "a drop line")[0]
            assert f"pid {os.getpid()} uid 0: no first message within 1 s" in line, line
            assert daemon.alive()
            # One that closes unheard (a probe for a live daemon, as a second
            # daemon starting at this socket makes) is no bad client.
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
                probe.connect(daemon.socket)
            time.sleep(0.5)   # (it may not have been accepted yet: nothing is to come of it)
            wait_nothing_new_held(daemon, held)
            status = query_status(daemon.socket)
            assert status["rejected_connections"] == 1
            assert len(drop_lines(daemon)) == 1, drop_lines(daemon)
            assert target.poll() is None, "the real target finished before the silent client was dropped"
            during = wait_paging(daemon, target.pid, pages=before["pages_out"] + 1)
            assert during["pages_out"] > before["pages_out"], "the real target stopped being paged"
            out, err = target.communicate(timeout=80)
        assert target.returncode == 0, err.decode(errors="replace")
        assert out.decode().startswith("ok 32768 pages"), out
    finally:
        daemon.stop()


@pytest.mark.timeout(60)
def test_shim_refused_by_the_daemon_runs_unmanaged(daemon, shim, programs):
    """The daemon drops a real shim whose HELLO is malformed (a policy name
    that is not ASCII): the app runs unmanaged, with one line on stderr."""
    with started([programs["pattern"], "8"], env=daemon.env(shim, UMGR_POLICY="caf\u00e9")) as proc:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.decode().startswith("ok 2048 pages"), out
    lines = err.decode().splitlines()
    assert len(lines) == 1 and "unmanaged" in lines[0], lines
    line = wait_for(lambda: drop_lines(daemon), 5, "a drop line")[0]
    assert f"pid {proc.pid} uid 0: policy name is not ASCII" in line, line
    assert daemon.alive()


@pytest.mark.timeout(60)
def test_unknown_policy_in_hello_drops_only_that_connection(daemon, shim, programs):
    """UMGR_POLICY with a typo is bad input like any other: that shim runs
    unmanaged, the daemon stays up, keeps none of what the HELLO brought
    (uffd, agent socket) nor a pidfd for it, and a target already paged out
    keeps its data."""
    with started(["./ctl_hold", "48"], cwd=os.path.dirname(programs["ctl_hold"]), env=daemon.env(shim),
                 stdin=subprocess.PIPE) as holder:
        assert holder.stdout.readline() == b"ready\n"
        wait_paging(daemon, holder.pid)
        held = sorted(fd_links(daemon.proc.pid))
        assert held.count(UFFD_LINK) == 1 and held.count(PIDFD_LINK) == 1, held
        typo = subprocess.Popen([programs["pattern"], "8"], env=daemon.env(shim, UMGR_POLICY="readahaed"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = typo.communicate(timeout=30)
        assert typo.returncode == 0, err
        assert out.decode().startswith("ok 2048 pages"), out
        lines = err.decode().splitlines()
        assert len(lines) == 1 and "unmanaged" in lines[0], lines
        assert daemon.alive(), "the daemon died of one HELLO with an unknown policy:\n" + daemon.log()[-3000:]
        line = wait_for(lambda: drop_lines(daemon), 5, "a drop line")[0]
        assert f"pid {typo.pid} uid 0: policy 'readahaed'" in line and "unknown prefetch policy" in line, line
        wait_nothing_new_held(daemon, held)
        assert query_status(daemon.socket)["rejected_connections"] == 1
        out, err = holder.communicate(b"", timeout=30)
    assert holder.returncode == 0, err
    assert out == b"ok 12288 pages\n"


@pytest.mark.timeout(30)
def test_command_line_cannot_forge_log_lines(daemon, shim, programs):
    """A target's argv is the target's to choose: one log line per event
    whatever it contains, with control characters escaped."""
    forged = "2026-01-01T00:00:00.000Z INFO umgr.daemon: pid 1: released (faults 0, pages in 0, out 0)"
    proc = subprocess.run([f"pattern\n{forged}", "8\r\x1b[2K"], executable=programs["pattern"],
                          env=daemon.env(shim), capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: "released" in daemon.log(), 5, "the target's release")
    assert not [line for line in daemon.log().splitlines() if line.startswith(forged)], daemon.log()
    attached = [line for line in daemon.log().splitlines() if ": attached (" in line]
    assert len(attached) == 1, daemon.log()
    assert f"attached (pattern\\n{forged} 8\\r\\x1b[2K)" in attached[0], attached


def test_status_escapes_command_lines():
    """`umgr status` prints one row per target whatever its command line,
    and leaves ordinary ones (spaces, accents) as they are."""
    def target(pid: int, command: str) -> dict:
        return {"pid": pid, "command": command, "name": command.split()[0], "budget_bytes": 16 << 20,
                "resident_bytes": 0, "swapped_bytes": 0, "faults": 0, "pages_in": 0, "pages_out": 0}
    snapshot = {"targets": [target(7, "evil\nforged row\x1b[31m"), target(8, "./café --x 1"),
                            target(9, "a-name-longer-than-the-column")],
                "backend": {"backend": "file", "used_pages": 0, "capacity_pages": 1024},
                "on_crash": "state in /var/lib/\nforged"}
    lines = format_status(snapshot, snapshot, 1.0).splitlines()
    assert len(lines) == 6, lines
    assert lines[5] == "on a crash: state in /var/lib/\\nforged", lines[5]
    assert lines[1].endswith("  evil\\nforged row\\x1b[31m"), lines[1]
    assert lines[2].endswith("  ./café            ./café --x 1"), lines[2]
    assert lines[3].endswith("  a-name-longer-t~  a-name-longer-than-the-column"), lines[3]


# ---- 2. no daemon ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["missing", "stale", "unset", "empty"])
@pytest.mark.timeout(30)
def test_no_daemon_app_runs_unmanaged(shim, programs, tmp_path, where):
    """missing: nothing at UMGR_SOCKET; stale: a socket file nobody listens on
    (what a killed daemon leaves); unset / empty: no UMGR_SOCKET at all."""
    env = dict(os.environ, LD_PRELOAD=shim)
    env.pop("UMGR_SOCKET", None)
    path = tmp_path / "umgr.sock"
    if where == "stale":
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.bind(str(path))
    if where in ("missing", "stale"):
        env["UMGR_SOCKET"] = str(path)
    elif where == "empty":
        env["UMGR_SOCKET"] = ""
    proc = subprocess.run([programs["pattern"], "8"], env=env, capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith("ok 2048 pages"), proc.stdout
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "unmanaged" in lines[0], lines
    if where in ("missing", "stale"):
        assert str(path) in lines[0], lines


@pytest.mark.timeout(30)
def test_status_without_daemon_says_so(tmp_path):
    path = tmp_path / "nobody.sock"
    proc = subprocess.run([sys.executable, "-m", "umgr", "status", "--socket", str(path), "--interval", "0.05"],
                          capture_output=True, timeout=20)
    assert proc.returncode == 125
    assert proc.stderr.decode().splitlines() == [f"umgr status: no daemon at {path}: No such file or directory"]


# ---- 3. the daemon dies mid-run: tests/test_restart.py ------------------------------------


# ---- 4. umgr exec passes the exit status on ---------------------------------------------------
@pytest.mark.parametrize("program, status", [
    (["sh", "-c", "exit 0"], 0),
    (["sh", "-c", "exit 7"], 7),
    (["sh", "-c", "exit 200"], 200),
    (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM),
    (["sh", "-c", "kill -KILL $$"], 128 + signal.SIGKILL),
], ids=["exit0", "exit7", "exit200", "sigterm", "sigkill"])
@pytest.mark.timeout(60)
def test_exec_passes_the_exit_status_on(umgr_exec, program, status):
    result = umgr_exec(program, timeout=50)
    assert result.returncode == status, result.stderr
    assert result.stats["exit_code"] == status


@pytest.mark.parametrize("program, message", [
    ("umgr-no-such-program", "command not found"),
    ("/nonexistent/umgr-program", "No such file or directory"),
    ("bad-interpreter", "No such file or directory"),
], ids=["name", "path", "bad-interpreter"])
@pytest.mark.timeout(60)
def test_exec_missing_program_is_127(umgr_exec, tmp_path, program, message):
    """As a shell: nothing to run (or a #! interpreter that is not there)."""
    if program == "bad-interpreter":
        script = tmp_path / program
        script.write_text("#!/nonexistent/umgr-sh\nexit 0\n")
        script.chmod(0o755)
        program = str(script)
    result = umgr_exec([program, "arg"], timeout=50)
    assert result.returncode == 127, result.stderr
    assert result.stderr.splitlines() == [f"umgr: {program}: {message}"]


@pytest.mark.parametrize("kind, message", [("not-executable", "Permission denied"),
                                           ("directory", "Is a directory")])
@pytest.mark.timeout(60)
def test_exec_program_that_cannot_run_is_126(umgr_exec, tmp_path, kind, message):
    """As a shell: the program is there but cannot be executed."""
    path = tmp_path / kind
    if kind == "directory":
        path.mkdir()
    else:
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o644)
    result = umgr_exec([str(path)], timeout=50)
    assert result.returncode == 126, result.stderr
    assert result.stderr.splitlines() == [f"umgr: {path}: {message}"]


# ---- 5. umgr status ----------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_status_shows_a_running_target(daemon, shim, programs):
    with started(["./ctl_hold", "48"], cwd=os.path.dirname(programs["ctl_hold"]), env=daemon.env(shim),
                 stdin=subprocess.PIPE) as holder:
        assert holder.stdout.readline() == b"ready\n"
        wait_paging(daemon, holder.pid)
        proc = subprocess.run([sys.executable, "-m", "umgr", "status", "--socket", daemon.socket,
                               "--interval", "0.2"], capture_output=True, timeout=20)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.decode().splitlines()
        assert lines[0].split() == ["PID", "BUDGET", "RESIDENT", "SWAPPED", "FAULTS/s", "IN/s", "OUT/s", "NAME",
                                    "COMMAND"]
        rows = {fields[0]: fields for fields in (line.split(None, 8) for line in lines[1:-2])}
        assert set(rows) == {str(holder.pid)}, lines
        _, budget, resident, swapped, *_rates, name, command = rows[str(holder.pid)]
        assert (name, command) == ("ctl_hold", "./ctl_hold 48")
        assert budget == "16M"
        assert 0 < parse_size(resident, minimum=0) <= 16.5 * MiB, resident
        assert parse_size(swapped, minimum=0) >= (48 - 16.5) * MiB, swapped
        assert lines[-2].startswith("backend file: "), lines[-2]
        assert lines[-1].startswith("on a crash: programs wait "), lines[-1]
        out, err = holder.communicate(b"", timeout=30)
    assert holder.returncode == 0, err
    assert out == b"ok 12288 pages\n"

    wait_for(lambda: not query_status(daemon.socket)["targets"], 5, "the target's release")
    proc = subprocess.run([sys.executable, "-m", "umgr", "status", "--socket", daemon.socket, "--interval", "0.05"],
                          capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 3 and lines[0].startswith("    PID") and lines[1].startswith("backend file: "), lines


@contextlib.contextmanager
def stale_socket(path: str):
    """A socket file at `path` that no one listens on, for the time of the
    block; taken away after it unless something replaced it meanwhile."""
    made_dir = not os.path.isdir(os.path.dirname(path))
    inode = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.bind(path)
        inode = os.stat(path).st_ino
        yield
    finally:
        with contextlib.suppress(OSError):
            if inode is not None and os.stat(path).st_ino == inode:
                os.unlink(path)
            if made_dir:
                os.rmdir(os.path.dirname(path))


@pytest.mark.timeout(90)
def test_status_finds_a_umgr_exec_by_its_state_dir(tmp_path, programs):
    """umgr exec runs its daemon on a socket in its run directory. With no
    daemon at the default socket (none there, or a stale one), `umgr
    status` looks under exec's default state directory, and `--state-dir
    DIR` under DIR."""
    assert not os.path.exists(DEFAULT_SOCKET), "a daemon runs at the default socket: this test needs it absent"

    def status(*args):
        return subprocess.run([sys.executable, "-m", "umgr", "status", "--interval", "0.05", *args],
                              capture_output=True, timeout=20)

    def execed(*program):   # (exec's default --state-dir, as a user's)
        return started([sys.executable, "-m", "umgr", "exec", "--max-resident", "16M", "--swap-size", "1G", "--",
                        *program], cwd=os.path.dirname(programs["ctl_hold"]), stdin=subprocess.PIPE)

    empty = tmp_path / "state"
    none = status("--state-dir", str(empty))
    assert none.returncode == 125
    assert none.stderr.decode().splitlines() == [f"umgr status: no umgr exec runs under {empty}"]
    with execed("./ctl_hold", "48") as holder:
        assert holder.stdout.readline() == b"ready\n"

        def paged():
            shown = status("--json")
            targets = json.loads(shown.stdout)["targets"] if shown.returncode == 0 else []
            return targets if targets and targets[0]["pages_out"] > 0 else None
        targets = wait_for(paged, 30, "the exec's program to be found and paged out")
        assert [t["command"] for t in targets] == ["./ctl_hold 48"], targets
        for found in (status(), status("--state-dir", DEFAULT_STATE_DIR)):
            assert found.returncode == 0, found.stderr
            assert "./ctl_hold 48" in found.stdout.decode()
        if os.access(os.path.dirname(os.path.dirname(DEFAULT_SOCKET)), os.W_OK):   # (root may make /run/umgr)
            with stale_socket(DEFAULT_SOCKET):   # (a killed daemon's, no systemd to clean it up)
                found = status()
                assert found.returncode == 0 and "./ctl_hold 48" in found.stdout.decode(), found.stderr
        with execed("./ctl_hold", "4") as other:
            assert other.stdout.readline() == b"ready\n"
            # Two execs: the table shows each, under its socket; --json, one shape a script
            # reads, wants one named; budget finds the exec that manages the pid.
            both = wait_for(lambda: (lambda r: r if r.stdout.count(b"umgr exec at ") == 2 else None)(status()), 20,
                            "the second umgr exec's run directory")
            assert both.returncode == 0 and both.stdout.count(b"control.sock:\n") == 2, both
            assert b"./ctl_hold 48" in both.stdout and b"./ctl_hold 4" in both.stdout, both.stdout
            one = status("--json")
            assert one.returncode == 125 and one.stderr.decode().startswith(
                f"umgr status --json: 2 umgr execs run under {DEFAULT_STATE_DIR}; name one with --socket: "), one
            assert one.stderr.decode().count("control.sock") == 2, one.stderr
            budget = lambda pid: subprocess.run([sys.executable, "-m", "umgr", "budget", str(pid), "20M"],
                                                capture_output=True, timeout=20)
            for umgr_exec in (holder, other):   # (the first one's and the second one's)
                program = [p for p in children(umgr_exec.pid) if comm(p) == "ctl_hold"][0]
                moved = budget(program)
                assert moved.returncode == 0 and moved.stdout == f"pid {program}: budget 20M (was 16M)\n".encode(), \
                    moved
            nobody = budget(os.getpid())
            assert nobody.returncode == 125 and nobody.stderr.decode() == (
                f"umgr budget: pid {os.getpid()} is managed by none of the 2 umgr execs running under "
                f"{DEFAULT_STATE_DIR}\n"), nobody
            other.communicate(b"", timeout=30)
            assert other.returncode == 0
        out, err = holder.communicate(b"", timeout=30)
    assert holder.returncode == 0, err
    assert out == b"ok 12288 pages\n"
    gone = wait_for(lambda: (lambda r: r if r.returncode == 125 else None)(status()), 20, "the runs to end")
    assert gone.stderr.decode().splitlines() == [
        f"umgr status: no daemon at {DEFAULT_SOCKET} and no umgr exec under {DEFAULT_STATE_DIR}"]


@pytest.mark.timeout(60)
def test_status_watch_refreshes_until_interrupted(daemon, shim, programs):
    """`umgr status --watch`: a table per interval (not one snapshot), sizes
    as people read them, and Ctrl-C ends it with status 0."""
    with started(["./ctl_hold", "48"], cwd=os.path.dirname(programs["ctl_hold"]), env=daemon.env(shim),
                 stdin=subprocess.PIPE) as holder:
        assert holder.stdout.readline() == b"ready\n"
        wait_paging(daemon, holder.pid)
        # Ctrl-C at a terminal: SIGINT at its default disposition, even when
        # the suite itself was started in the background (which ignores it).
        with started([sys.executable, "-m", "umgr", "status", "--watch", "--socket", daemon.socket,
                      "--interval", "0.2"], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as watch:
            headers = []
            while len(headers) < 3:
                line = watch.stdout.readline().decode()
                assert line, watch.stderr.read()
                if line.startswith("umgr status "):
                    headers.append(line)
                    assert watch.stdout.readline().split()[0] == b"PID"
                    row = watch.stdout.readline().decode().split(None, 8)
                    assert row[0] == str(holder.pid) and row[1] == "16M", row
                    assert row[7:] == ["ctl_hold", "./ctl_hold 48\n"], row
                    assert parse_size(row[3], minimum=0) >= (48 - 16.5) * MiB, row
            watch.send_signal(signal.SIGINT)
            assert watch.wait(10) == 0
            assert watch.stderr.read() == b""
        holder.communicate(b"", timeout=30)
    assert holder.returncode == 0


# ---- 6. umgr budget ----------------------------------------------------------------------
def umgr_budget(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "umgr", "budget", "--socket", daemon.socket, *args],
                          capture_output=True, text=True, timeout=20)


@pytest.mark.timeout(90)
def test_budget_of_a_running_process_changes_at_once(daemon, shim, programs):
    """`umgr budget PID SIZE`: lower, the idle process is paged down to it
    at once; 'none' gives it the daemon's --max-resident back; root may go
    above that. The process then checks every byte."""
    with started(["./ctl_hold", "48"], cwd=os.path.dirname(programs["ctl_hold"]), env=daemon.env(shim),
                 stdin=subprocess.PIPE) as holder:
        assert holder.stdout.readline() == b"ready\n"
        before = wait_paging(daemon, holder.pid)
        wait_for(lambda: target_status(daemon, holder.pid)["resident_bytes"] > 8 * MiB, 10, "16 MiB resident")
        lowered = umgr_budget(daemon, str(holder.pid), "4M")
        assert lowered.returncode == 0, lowered.stderr
        assert re.fullmatch(rf"pid {holder.pid}: budget 4M \(was 16M\); [\d.]+M resident, paging down to it\n",
                            lowered.stdout), lowered.stdout
        # Nothing touches its memory now: only the new budget sends pages out.
        down = wait_for(lambda: (lambda t: t if t["resident_bytes"] <= 4 * MiB else None)(
            target_status(daemon, holder.pid)), 10, "the target to be paged down to 4M")
        assert down["budget_bytes"] == 4 * MiB
        assert down["pages_out"] - before["pages_out"] >= (8 * MiB) // 4096, (before, down)
        assert "budget 4.0 MiB (was 16.0 MiB), set by pid " in daemon.log()

        raised = umgr_budget(daemon, str(holder.pid), "64M")
        assert raised.returncode == 0 and raised.stdout == f"pid {holder.pid}: budget 64M (was 4M)\n", raised
        reset = umgr_budget(daemon, str(holder.pid), "none")
        assert reset.returncode == 0 and reset.stdout == f"pid {holder.pid}: budget 16M (was 64M)\n", reset
        assert target_status(daemon, holder.pid)["budget_bytes"] == 16 * MiB
        out, err = holder.communicate(b"", timeout=30)
    assert holder.returncode == 0, err
    assert out == b"ok 12288 pages\n"


@pytest.mark.timeout(30)
def test_budget_refusals_say_why(daemon):
    unknown = umgr_budget(daemon, "999999999", "8M")
    assert unknown.returncode == 125
    assert unknown.stderr == "umgr budget: pid 999999999 is not a process of yours that this daemon manages\n"
    for args, why in ((("12x", "8M"), "'12x' is not a process id"), (("1", "1k"), "'1k' is too small"),
                      (("--", "1", "-8M"), "'-8M' is negative")):
        bad = umgr_budget(daemon, *args)
        assert bad.returncode == 125 and why in bad.stderr, bad.stderr
    # A budget no metric can show (prometheus-client's float() of it
    # raised at every scrape) is a malformed request: that connection goes.
    assert ask_daemon(daemon.socket, b"BUDGET " + json.dumps({"pid": 1, "bytes": 10 ** 30}).encode()) == b""
    assert "0 <= bytes < 2**63" in daemon.log()
    assert daemon.alive()
