"""umgr's own failures: one line on stderr, no traceback, exit 125, and
found before the program runs; logs with time and level; -v/-q anywhere."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

UMGR = [sys.executable, "-m", "umgr"]
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) umgr[.\w]*: ")


def umgr(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*UMGR, *args], capture_output=True, timeout=timeout, text=True)


@pytest.fixture
def port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


CASES = {
    "swap-zero": (["--swap-size", "0"], "'0' is zero"),
    "swap-1k": (["--swap-size", "1k"], "'1k' is too small"),
    "swap-over-free": (["--swap-size", "{over_free}M", "--state-dir", "{tmp}"], "MiB free"),
    "swap-over-slots": (["--swap-size", "9T"], "more than the 8388607 MiB a file backend addresses"),
    "budget-inf": (["--max-resident", "inf"], "'inf' is not a size"),
    "budget-negative": (["--max-resident=-5M"], "'-5M' is negative"),
    "budget-negative-spaced": (["--max-resident", "-5M"], "'-5M' is negative"),
    "swap-negative-spaced": (["--swap-size", "-1.5G"], "'-1.5G' is negative"),
    "port-range": (["--metrics-port", "70000"], "'70000' is not a port"),
    "grace-range": (["--grace", "4294967296"], "'4294967296' is not a whole number of seconds from 0 to 4294967295"),
    "port-in-use": (["--metrics-port", "{port}"], "metrics on 127.0.0.1 port {port}: Address already in use"),
    "metrics-address": (["--metrics-port", "{port}", "--metrics-address", "umgr-nope.invalid"],
                        "metrics on umgr-nope.invalid port {port}: "),
    "state-dir-file": (["--state-dir", "/etc/hostname"], "state directory /etc/hostname is not a directory"),
    "state-dir-link": (["--state-dir", "{tmp}/link"],
                       "state directory {tmp}/link is a symbolic link, which umgr does not follow: "
                       "give the directory itself ({tmp}/open)"),
    "state-dir-link-slash": (["--state-dir", "{tmp}/link/"],
                             "state directory {tmp}/link is a symbolic link, which umgr does not follow"),
    "state-dir-proc": (["--state-dir", "/proc/umgr-nope"], "--state-dir /proc/umgr-nope: No such file"),
    "state-dir-open": (["--state-dir", "{tmp}/open"], "state directory {tmp}/open must belong to uid 0 with mode 0700"),
    "stats-json-dir": (["--stats-json", "/proc/umgr-nope/x.json"], "/proc/umgr-nope is not a directory"),
    "stats-json-is-dir": (["--stats-json", "{tmp}"], "--stats-json {tmp}: is a directory"),
    "policy": (["--policy", "umgr-nope"], "unknown prefetch policy 'umgr-nope'"),
    "policy-option": (["--policy-opt", "bogus=1"], "policy 'readahead' has no option 'bogus'; it takes: initial, "),
    "policy-hook": (["--eviction-opt", "is_live=x", "--eviction", "fifo"], "policy 'fifo' has no option 'is_live'"),
    "policy-number": (["--eviction-opt", "hot_share=abc"], "policy 'reuse' option hot_share: 'abc' is not a number"),
    "policy-whole": (["--policy-opt", "maximum=2.5"], "policy 'readahead' option maximum: 2.5 is not a whole number"),
    "policy-switch": (["--eviction-opt", "adapt=maybe"], "policy 'reuse' option adapt: 'maybe' is not true or false"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("options, message", CASES.values(), ids=CASES.keys())
def test_exec_refuses_before_the_program_runs(options, message, tmp_path, port_in_use):
    fs = os.statvfs(tmp_path)
    fill = {"port": port_in_use, "tmp": tmp_path, "over_free": (fs.f_bavail * fs.f_frsize >> 20) + 1024}
    marker = tmp_path / "ran"
    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(tmp_path / "open", 0o777)
    (tmp_path / "link").symlink_to(tmp_path / "open")
    proc = umgr("exec", *(o.format(**fill) for o in options), "--", "touch", str(marker))
    assert proc.returncode == 125, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("umgr exec: "), lines
    assert message.format(**fill) in lines[0], lines
    assert not marker.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, message", [
    (["daemon", "--group", "umgr-no-such-group"], "umgr daemon: --group umgr-no-such-group: no such group"),
    (["daemon", "--hello-timeout", "0"], "'0' is not a number of seconds above 0"),
    (["status", "--interval", "0"], "umgr status: argument --interval: '0' is not a number of seconds above 0"),
    (["status", "--interval", "nan"], "'nan' is not a number of seconds above 0"),
    (["status", "--watch", "--json"], "umgr status: --json shows one snapshot; --watch refreshes a table"),
    (["status", "--state-dir", "/tmp"], "umgr status: argument --socket: not allowed with argument --state-dir"),
    (["budget", "1", "-1M"], "umgr budget: argument SIZE: '-1M' is negative"),
    (["budget", "1", "4K"], "umgr budget: argument SIZE: '4K': a budget is at least 256K"),
    (["exec", "--max-resident", "16K", "--", "true"], "umgr exec: argument --max-resident: '16K': a budget is at least 256K"),
    (["exec"], "umgr exec: no program given"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
], ids=["group", "hello-timeout", "interval-0", "interval-nan", "watch-json", "socket-and-state-dir", "negative-budget",
        "tiny-budget", "tiny-max-resident", "no-program",
        "command"])
def test_other_refusals(args, message, tmp_path):
    proc = umgr(*args, "--socket" if args[0] in ("daemon", "status") else "-q",
                *([str(tmp_path / "s.sock")] if args[0] in ("daemon", "status") else []))
    assert proc.returncode == 125, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_a_program_keeps_its_own_negative_looking_arguments(tmp_path):
    # `--opt -VALUE` is read as a value for umgr's own options only: never
    # after '--' or after the program's name.
    out = tmp_path / "args"
    for program in (["--", "sh"], ["sh"]):
        proc = umgr("exec", "--max-resident", "8M", *program, "-c", 'echo "$@" > "$0"', str(out),
                    "--max-resident", "-5M", "-q")
        assert proc.returncode == 0, proc.stderr
        assert out.read_text() == "--max-resident -5M -q\n"


def test_version():
    proc = umgr("--version")
    assert proc.returncode == 0 and re.fullmatch(r"umgr \d+\.\d+\.\d+\S*\n", proc.stdout), proc


@pytest.mark.timeout(60)
def test_verbosity_anywhere_and_exec_summary(tmp_path):
    """-v before or after the subcommand: the start-up line (INFO) and the
    summary; -q: nothing but the program's own output."""
    run = ["exec", "--max-resident", "4M", "--swap-size", "64M", "--state-dir", str(tmp_path), "--",
           sys.executable, "-c", "x = bytearray(32 << 20); x[::4096] = b'x' * (len(x) // 4096); "
                                 "print(x.count(b'x'))"]
    for where in ("before", "after"):
        args = ["-v", *run] if where == "before" else [run[0], "-v", *run[1:]]
        proc = umgr(*args)
        assert proc.returncode == 0 and proc.stdout == "8192\n", proc.stderr
        lines = proc.stderr.splitlines()
        startup = [line for line in lines if " serving " in line]
        assert len(startup) == 1 and LOG_LINE.match(startup[0]) and " INFO " in startup[0], lines
        assert "budget 4M per process, backend file (64M in " in startup[0], startup
        assert "policy readahead, eviction reuse, metrics off" in startup[0], startup
        summary = re.fullmatch(r"umgr: exit 0 after [\d.]+ s; 1 process, peak resident ([\d.]+[KM]), (\d+) faults, "
                               r"(\d+) pages out, (\d+) in; swap written (\S+), read (\S+)", lines[-1])
        assert summary, lines[-1]
        assert int(summary.group(3)) >= (32 - 4) * 256, "pages really left"
    proc = umgr("-q", *run)
    assert proc.returncode == 0 and proc.stdout == "8192\n" and proc.stderr == "", proc.stderr


@pytest.mark.timeout(60)
def test_a_program_that_cannot_load_the_shim_is_said_to_run_unmanaged(tmp_path):
    # A statically linked program has no dynamic loader, so LD_PRELOAD
    # cannot bring the shim in: it runs, unmanaged, and exec says so.
    source, exe = tmp_path / "static.c", tmp_path / "static"
    source.write_text('#include <stdio.h>\nint main(void) { puts("ran"); return 3; }\n')
    subprocess.run(["gcc", "-static", "-o", str(exe), str(source)], check=True)
    proc = umgr("exec", "--max-resident", "8M", "--", str(exe))
    assert proc.returncode == 3 and proc.stdout == "ran\n", proc
    assert proc.stderr == (f"umgr: warning: {exe} ran unmanaged: none of its processes attached to the daemon "
                           "(statically linked and set-user-ID programs cannot load the shim, nor can one whose "
                           "LD_PRELOAD was cleared)\n"), proc.stderr
    assert umgr("exec", "-q", "--", str(exe)).stderr == ""
    # A dynamically linked one attaches: no warning.
    proc = umgr("exec", "--max-resident", "8M", "--", "/bin/true")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.timeout(30)
def test_status_from_a_daemon_that_drops_the_request_says_so(tmp_path):
    # A daemon that reads the request and closes (its log would say why):
    # one line, not a traceback from an empty reply.
    import threading
    path = str(tmp_path / "drops.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen()

    def drop_one():
        conn, _ = server.accept()
        conn.recv(4096)
        conn.close()
    dropper = threading.Thread(target=drop_one, daemon=True)
    dropper.start()
    try:
        proc = umgr("status", "--socket", path)
    finally:
        server.close()
    assert proc.returncode == 125, proc.stderr
    assert proc.stderr == f"umgr status: the daemon at {path} dropped the request (its log says why)\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["exec", "daemon"])
def test_without_cap_sys_ptrace_umgr_refuses_before_anything_runs(command, tmp_path):
    """The daemon enables fork events on every program's userfaultfd, which
    the kernel allows only with CAP_SYS_PTRACE (a root shell in a container
    often lacks it, and every other user does): every program would have
    run unmanaged, each with a line about a reset connection."""
    marker = tmp_path / "ran"
    where = ["--socket", str(tmp_path / "s.sock")] if command == "daemon" else ["--", "touch", str(marker)]
    proc = subprocess.run(["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace", "--", *UMGR,
                           command, "--state-dir", str(tmp_path / "state"), *where],
                          capture_output=True, timeout=30, text=True)
    assert proc.returncode == 125, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"umgr {command}: userfaultfd fork events need CAP_SYS_PTRACE, "
                                                   "which this process lacks"), lines
    assert not marker.exists() and not (tmp_path / "s.sock").exists()
    doctor = subprocess.run(["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace", "--", *UMGR,
                             "doctor"], capture_output=True, timeout=60, text=True)
    assert doctor.returncode == 1 and "fork events need CAP_SYS_PTRACE" in doctor.stdout, doctor.stdout
