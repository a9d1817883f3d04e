"""One root daemon, many users: the attacks of a group member on a daemon
serving another user's paged-out process, run as real unprivileged users
(created here, removed after). Each attack fails with one log line naming
the attacker's pid and uid; the daemon stays up and the other target keeps
every byte.

The attacker runs the system Python (the checkout's venv may sit in a
directory other users cannot enter) with a script that speaks the protocol
by hand, as an attacker would.
"""
from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import DaemonProcess, wait_for
from umgr.cli import query_status
from umgr.probe import UFFD_DEVICE, UNPRIVILEGED_UFFD, uffd_closed_to_group
from umgr.protocol import VERSION

SYSTEM_PYTHON = "/usr/bin/python3"
GROUP = "umgrsecg"
MEMBER = "umgrseca"      # in the daemon's --group
OUTSIDER = "umgrsecb"    # not in it

ATTACKER = r"""
import ctypes, json, mmap, os, socket, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
MAGIC, HELLO = 0x524D4755, struct.Struct("<IHH Ii QQ 32s 64s Q II")
RANGE, ACK = struct.Struct("<IHH QQ"), struct.Struct("<IHH iI")
mode, path = sys.argv[1], sys.argv[2]

def new_uffd():  # unprivileged users may only ask for user-mode-only uffds
    fd = libc.syscall(323, os.O_CLOEXEC | 1)
    if fd < 0:
        raise SystemExit(f"userfaultfd: {os.strerror(ctypes.get_errno())}")
    return fd

def hello(pid, probe):
    return HELLO.pack(MAGIC, 1, HELLO.size, PROTOCOL_VERSION, pid, 0, 0, b"", b"", probe, 0, 0)

def outcome(s):
    try:
        data = s.recv(4096)
    except socket.timeout:
        return "open"
    except ConnectionResetError:
        return "reset"
    return "closed" if data == b"" else "data:" + data.hex()

probe_map = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
probe = ctypes.addressof(ctypes.c_char.from_buffer(probe_map))
agent, agent_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
result = {"pid": os.getpid(), "uid": os.getuid()}
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(5)
s.connect(path)
if mode == "foreign-uffd":
    # The uffd of a second process whose mm mirrors ours (a fork: the probe
    # page is at the same address there), as in the su attack.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = os.fork()
    if child == 0:
        socket.send_fds(b, [b"u"], [new_uffd()])
        time.sleep(30)
        os._exit(0)
    _, (uffd,), _, _ = socket.recv_fds(a, 1, 1)
    socket.send_fds(s, [hello(os.getpid(), probe)], [agent.fileno(), uffd])
    result["outcome"] = outcome(s)
    os.kill(child, 9)
elif mode == "not-dumpable":
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0, as a setuid program is
    socket.send_fds(s, [hello(os.getpid(), probe)], [agent.fileno(), new_uffd()])
    result["outcome"] = outcome(s)
elif mode == "forked-stranger":
    socket.send_fds(s, [hello(os.getpid(), probe)], [agent.fileno(), new_uffd()])
    ack = s.recv(4096)
    result["hello_status"] = struct.unpack_from("<i", ack, 8)[0]
    s.send(RANGE.pack(MAGIC, 6, RANGE.size, int(sys.argv[3]), 0))  # FORKED <someone else's pid>
    result["forked_status"] = ACK.unpack(s.recv(4096))[3]
    s.send(RANGE.pack(MAGIC, 6, RANGE.size, 1 << 40, 0))  # FORKED <no pid there can be>
    result["huge_forked_status"] = ACK.unpack(s.recv(4096))[3]
    s.send(b"STATUS")  # not a control message: this connection is dropped
    status = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    status.connect(path)
    status.send(b"STATUS")
    result["status_pids"] = [t["pid"] for t in json.loads(status.recv(1 << 20))["targets"]]
elif mode == "budget-stranger":
    # `umgr budget` for someone else's process: 4 KiB would page it all out;
    # then for its own (attached by a HELLO of its own), which it may change.
    s.send(b"BUDGET " + json.dumps({"pid": int(sys.argv[3]), "bytes": 4096}).encode())
    result["reply"] = json.loads(s.recv(4096))
    own = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    own.connect(path)
    socket.send_fds(own, [hello(os.getpid(), probe)], [agent.fileno(), new_uffd()])
    result["hello_status"] = struct.unpack_from("<i", own.recv(4096), 8)[0]
    change = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    change.connect(path)
    change.send(b"BUDGET " + json.dumps({"pid": os.getpid(), "bytes": 8 << 20}).encode())
    result["own_reply"] = json.loads(change.recv(4096))
print(json.dumps(result), flush=True)
""".replace("PROTOCOL_VERSION", str(VERSION))   # the daemon refuses any other


@contextlib.contextmanager
def users():
    """A group, a member of it and an outsider, removed afterwards."""
    subprocess.run(["groupadd", GROUP], check=True)
    try:
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-G", GROUP, MEMBER], check=True)
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", OUTSIDER], check=True)
        yield {name: pwd.getpwnam(name) for name in (MEMBER, OUTSIDER)}, grp.getgrnam(GROUP).gr_gid
    finally:
        for name in (MEMBER, OUTSIDER):
            subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", GROUP], capture_output=True)


@pytest.fixture
def shared_daemon():
    """A daemon serving a group, its socket in a root-owned 0755 directory;
    yields (daemon, member and outsider passwd entries, group id)."""
    with users() as (accounts, gid):
        sockdir = Path(tempfile.mkdtemp(prefix="umgr-sec-", dir="/tmp"))
        try:
            os.chmod(sockdir, 0o755)
            daemon = DaemonProcess(sockdir, "--group", GROUP, as_the_service=True)
            try:
                yield daemon, accounts, gid
            finally:
                daemon.stop()
        finally:
            shutil.rmtree(sockdir, ignore_errors=True)


def attack(daemon, account, gid, mode: str, *extra: str) -> dict:
    proc = subprocess.run([SYSTEM_PYTHON, "-c", ATTACKER, mode, daemon.socket, *extra], capture_output=True,
                          timeout=30, user=account.pw_uid, group=account.pw_gid, extra_groups=[gid], cwd="/")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout)


def log_line_for(daemon, pid: int, uid: int, reason: str) -> str:
    def found():
        return [line for line in daemon.log().splitlines() if f"pid {pid} uid {uid}" in line and reason in line]
    lines = wait_for(found, 5, f"a log line naming pid {pid} uid {uid}: {reason}")
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.timeout(180)
def test_group_member_attacks_fail_and_the_victim_keeps_every_byte(shared_daemon, shim, programs):
    daemon, accounts, gid = shared_daemon
    member = accounts[MEMBER]
    victim_env = daemon.env(shim, UMGR_MAX_RESIDENT="16M")
    # "srb+": the victim pages until its stdin closes (communicate()), after the attacks.
    with subprocess.Popen([programs["pattern"], "96", "mmap", "srb+"], env=victim_env, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as victim:
        wait_for(lambda: any(t["pid"] == victim.pid and t["pages_out"] > 0
                             for t in query_status(daemon.socket)["targets"]), 30, "the victim to be paged out")

        # Finding 1: a uffd from another process never serves this one.
        got = attack(daemon, member, gid, "foreign-uffd")
        assert got["outcome"] == "closed", got
        log_line_for(daemon, got["pid"], member.pw_uid, "does not belong to the process that connected")

        # A process that is not dumpable (setuid, or said so) is never read.
        got = attack(daemon, member, gid, "not-dumpable")
        assert got["outcome"] == "closed", got
        log_line_for(daemon, got["pid"], member.pw_uid, "not dumpable")

        # Finding 2: FORKED naming someone else's process is refused; STATUS
        # shows a member only their own targets (finding 9).
        got = attack(daemon, member, gid, "forked-stranger", str(victim.pid))
        assert got["hello_status"] == 0 and got["forked_status"] == 1, got  # EPERM
        assert got["huge_forked_status"] == 3, got  # ESRCH, and the connection goes on
        log_line_for(daemon, got["pid"], member.pw_uid, f"FORKED {victim.pid} refused")
        assert victim.pid not in got["status_pids"] and got["pid"] in got["status_pids"], got

        # A new budget for someone else's process is refused, as for a pid
        # the daemon does not manage (nothing said of whose it is).
        got = attack(daemon, member, gid, "budget-stranger", str(victim.pid))
        assert got["reply"] == {"error": f"pid {victim.pid} is not a process of yours that this daemon manages"}, got
        log_line_for(daemon, got["pid"], member.pw_uid, f"refused: a new budget for pid {victim.pid}, not theirs")
        assert got["hello_status"] == 0 and got["own_reply"]["budget_bytes"] == 8 << 20, got
        budget = [t["budget_bytes"] for t in query_status(daemon.socket)["targets"] if t["pid"] == victim.pid]
        assert budget == [16 << 20], budget

        assert daemon.alive()
        assert victim.poll() is None, "the victim finished before the attacks were done"
        out, err = victim.communicate(timeout=100)
    assert victim.returncode == 0, err.decode(errors="replace")
    assert out.decode().startswith("ok 24576 pages"), out


@pytest.mark.timeout(60)
def test_outsider_cannot_connect(shared_daemon):
    daemon, accounts, gid = shared_daemon
    outsider = accounts[OUTSIDER]
    proc = subprocess.run([SYSTEM_PYTHON, "-c", ATTACKER, "not-dumpable", daemon.socket], capture_output=True,
                          timeout=30, user=outsider.pw_uid, group=outsider.pw_gid, cwd="/")
    assert proc.returncode != 0 and b"PermissionError" in proc.stderr, proc.stderr


# ---- the socket's file (findings 4 and 5) --------------------------------------------------
def start_daemon(socket_path: str, state_dir, *options: str) -> subprocess.CompletedProcess | subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "umgr", "daemon", "--socket", socket_path, "--swap-size", "16M",
                             "--state-dir", str(state_dir), *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def refused(socket_path: str, state_dir) -> str:
    """The daemon's one-line refusal to start at socket_path."""
    proc = start_daemon(socket_path, state_dir, "-q")
    _, err = proc.communicate(timeout=30)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 125 and len(lines) == 1, err.decode()
    return lines[0]


@pytest.mark.timeout(120)
def test_socket_set_up_refuses_what_others_could_have_touched(tmp_path):
    state = tmp_path / "state"
    with users() as (accounts, _gid):
        member = accounts[MEMBER]
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, member.pw_uid, member.pw_gid)
        assert "belongs to uid" in refused(str(theirs / "umgr.sock"), state)
        open_to_all = tmp_path / "open"
        open_to_all.mkdir()
        os.chmod(open_to_all, 0o1777)
        assert "writable by others" in refused(str(open_to_all / "umgr.sock"), state)

    # A root file at the socket's name, straight or through a symlink, is
    # never deleted, chmod'ed or chown'ed.
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    (tmp_path / "link.sock").symlink_to(secret)
    assert "is not a socket" in refused(str(tmp_path / "link.sock"), state)
    assert "is not a socket" in refused(str(secret), state)
    assert secret.read_text() == "root only" and (secret.stat().st_mode & 0o777) == 0o600
    assert secret.stat().st_gid == 0

    # A second daemon leaves the first one's socket alone; the first removes
    # its socket when stopped.
    path = str(tmp_path / "umgr.sock")
    first = start_daemon(path, state)
    try:
        wait_for(lambda: os.path.exists(path), 20, "the first daemon's socket")
        wait_for(lambda: _answers(path), 10, "the first daemon to answer")
        assert "another daemon" in refused(path, state)
        assert _answers(path), "the second daemon took the first one's socket"
    finally:
        first.terminate()
        first.communicate(timeout=30)
    assert first.returncode == 0 and not os.path.exists(path)
    # A daemon refused before it served left no state (no swap file) behind.
    assert not list(state.glob("daemon-*")), list(state.glob("daemon-*/*"))


def _answers(path: str) -> bool:
    try:
        query_status(path)
    except OSError:
        return False
    return True


# ---- the shim's trust in its daemon (finding 6) ---------------------------------------------
FAKE_DAEMON = r"""
import json, socket, sys
listener = socket.socket(fileno=int(sys.argv[1]))
listener.listen(4)
print("ready", flush=True)
listener.settimeout(20)
conn, _ = listener.accept()
conn.settimeout(3)
try:
    data, ancdata, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(64))
except (socket.timeout, ConnectionResetError):
    data, ancdata = b"", []
print(json.dumps({"bytes": len(data), "fds": sum(len(c[2]) // 4 for c in ancdata)}), flush=True)
"""


def fake_daemon(sock_path: str, account) -> subprocess.Popen:
    """A listener another user runs: root binds it (the directory is root's)
    and hands it over; SO_PEERCRED names whoever called listen()."""
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(sock_path)
    os.chmod(sock_path, 0o666)
    try:
        return subprocess.Popen([SYSTEM_PYTHON, "-c", FAKE_DAEMON, str(sock.fileno())], pass_fds=[sock.fileno()],
                                stdout=subprocess.PIPE, user=account.pw_uid, group=account.pw_gid, cwd="/")
    finally:
        sock.close()


@pytest.mark.timeout(120)
def test_shim_hands_nothing_to_a_daemon_it_cannot_trust(tmp_path, shim, programs):
    with users() as (accounts, _gid):
        member = accounts[MEMBER]
        for where, mode in (("root's directory", 0o755), ("a directory open to all", 0o1777)):
            sockdir = tmp_path / f"d{mode:o}"
            sockdir.mkdir()
            os.chmod(sockdir, mode)
            sock_path = str(sockdir / "umgr.sock")
            fake = fake_daemon(sock_path, member)
            assert fake.stdout.readline() == b"ready\n"
            env = dict(os.environ, LD_PRELOAD=shim, UMGR_SOCKET=sock_path)
            victim = subprocess.run([programs["pattern"], "4"], env=env, capture_output=True, timeout=60)
            out = fake.communicate(timeout=30)[0]
            assert out, (where, victim.stderr)
            got = json.loads(out)
            assert victim.returncode == 0 and victim.stdout.startswith(b"ok"), victim
            lines = victim.stderr.decode().splitlines()
            assert len(lines) == 1 and "trust check" in lines[0] and "unmanaged" in lines[0], (where, lines)
            assert got == {"bytes": 0, "fds": 0}, (where, got)


# ---- fuzzed control messages -------------------------------------------------------------
FUZZER = r"""
import ctypes, json, mmap, os, random, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
path, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
MAGIC, HELLO = 0x524D4755, struct.Struct("<IHH Ii QQ 32s 64s Q II")
RANGE, ADVISE, ACK = struct.Struct("<IHH QQ"), struct.Struct("<IHH QQ II"), struct.Struct("<IHH iI")
me = os.getpid()

def new_uffd():
    return libc.syscall(323, os.O_CLOEXEC | 1)  # user mode only: all an unprivileged user gets

def some_fds():
    kinds = [lambda: list(os.pipe()), lambda: [s.detach() for s in socket.socketpair()],
             lambda: [os.open("/dev/null", os.O_RDONLY)], lambda: [os.eventfd(0)], lambda: [new_uffd()]]
    fds = []
    for _ in range(rng.choice([0, 0, 1, 2, 2, 3, 6])):
        fds += rng.choice(kinds)()
    return [fd for fd in fds if fd >= 0]

def valid():
    n = rng.random
    return rng.choice([
        HELLO.pack(MAGIC, 1, HELLO.size, PROTOCOL_VERSION, rng.choice([me, 1, 0, -1]), rng.getrandbits(64), rng.getrandbits(64),
                   bytes(rng.getrandbits(8) for _ in range(rng.randrange(33))),
                   bytes(rng.getrandbits(8) for _ in range(rng.randrange(65))), rng.getrandbits(64),
                   rng.choice([0, 1, rng.getrandbits(32)]), 0),
        RANGE.pack(MAGIC, rng.choice([3, 6]), RANGE.size, rng.getrandbits(64), rng.getrandbits(64)),
        ADVISE.pack(MAGIC, 5, ADVISE.size, rng.getrandbits(64), rng.getrandbits(64), rng.randrange(8), 0),
        b"STATUS"])

def mutate(msg):
    how = rng.randrange(6)
    if how == 0:
        return msg[:rng.randrange(len(msg) + 1)]
    if how == 1:
        b = bytearray(msg)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
        return bytes(b)
    if how == 2:
        return msg + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))
    if how == 3:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
    if how == 4:
        return struct.pack("<IHH", MAGIC, rng.randrange(20), len(msg)) + msg[8:]
    return msg

outcomes = {}
for _ in range(rounds):
    fds = some_fds()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(3)
    try:
        s.connect(path)
        for msg in [mutate(valid()) for _ in range(rng.choice([1, 1, 2, 3]))]:
            socket.send_fds(s, [msg or b"\0"], fds) if fds else s.send(msg or b"\0")
            fds, got = [], s.recv(1 << 16)
            if not got:
                break
        outcome = "answered"
        while s.recv(1 << 16):
            pass
        outcome = "closed"
    except socket.timeout:
        outcome = "open"
    except (BrokenPipeError, ConnectionResetError):
        outcome = "closed"
    finally:
        s.close()
        for fd in fds:
            os.close(fd)
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
print(json.dumps({"pid": me, "uid": os.getuid(), "outcomes": outcomes}), flush=True)
""".replace("PROTOCOL_VERSION", str(VERSION))   # the daemon refuses any other


@pytest.mark.timeout(240)
def test_fuzzed_control_messages_drop_only_their_connection(shared_daemon, shim, programs):
    daemon, accounts, gid = shared_daemon
    member = accounts[MEMBER]
    with subprocess.Popen([programs["pattern"], "96", "mmap", "srb+"], env=daemon.env(shim, UMGR_MAX_RESIDENT="16M"),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as victim:
        wait_for(lambda: any(t["pid"] == victim.pid and t["pages_out"] > 0
                             for t in query_status(daemon.socket)["targets"]), 30, "the victim to be paged out")
        held = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
        rejected = query_status(daemon.socket)["rejected_connections"]
        proc = subprocess.run([SYSTEM_PYTHON, "-c", FUZZER, daemon.socket, "1234", "300"], capture_output=True,
                              timeout=180, user=member.pw_uid, group=member.pw_gid, extra_groups=[gid], cwd="/")
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        got = json.loads(proc.stdout)
        assert daemon.alive(), daemon.log()[-3000:]
        assert got["outcomes"].get("closed", 0) > 250, got
        dropped = query_status(daemon.socket)["rejected_connections"] - rejected
        lines = [line for line in daemon.log().splitlines() if "dropping connection" in line
                 and f"pid {got['pid']} uid {member.pw_uid}:" in line]
        assert dropped > 250 and len(lines) == dropped, (dropped, len(lines), got)
        assert "internal error" not in daemon.log()
        wait_for(lambda: len(os.listdir(f"/proc/{daemon.proc.pid}/fd")) <= held + 1, 10,
                 "the daemon to close every descriptor the fuzzer sent")
        out, err = victim.communicate(timeout=120)
    assert victim.returncode == 0, err.decode(errors="replace")
    assert out.decode().startswith("ok 24576 pages"), out


# ---- connection floods (finding 3) ---------------------------------------------------------
FLOOD = r"""
import json, os, socket, sys, time
path, count, turned_away = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks, refused = [], 0
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(path)
    except OSError:
        refused += 1
        s.close()
        continue
    socks.append(s)
    s.setblocking(False)
closed = set()

def look():
    for s in socks:
        if s in closed:
            continue
        try:
            if s.recv(16) == b"":
                closed.add(s)
        except BlockingIOError:
            pass
        except ConnectionResetError:
            closed.add(s)

# Connections past the cap sit in the listen backlog until the daemon
# accepts and closes them: wait for as many as the test expects (a busy
# daemon takes a while), then a little longer for any it closes beyond.
deadline = time.monotonic() + 20
while len(closed) + refused < turned_away and time.monotonic() < deadline:
    time.sleep(0.05)
    look()
time.sleep(0.5)
look()
print(json.dumps({"pid": os.getpid(), "held": len(socks) - len(closed), "closed": len(closed), "refused": refused}))
"""


def flood(daemon, count: int, turned_away: int, **user) -> dict:
    """count connections to the daemon; turned_away of them are expected
    to be refused or closed by it."""
    proc = subprocess.run([SYSTEM_PYTHON, "-c", FLOOD, daemon.socket, str(count), str(turned_away)],
                          capture_output=True, timeout=60, cwd="/", **user)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout)


@pytest.mark.timeout(180)
def test_connection_floods_meet_caps_and_the_victim_keeps_every_byte(shim, programs):
    """A member's silent connections stop at the per-user cap; under a
    256-descriptor limit root's stop at the overall cap the limit leaves
    room for; either way the daemon and its target go on."""
    with users() as (accounts, gid):
        member = accounts[MEMBER]
        sockdir = Path(tempfile.mkdtemp(prefix="umgr-sec-", dir="/tmp"))
        os.chmod(sockdir, 0o755)
        # (--hello-timeout: the flood's held connections must not be dropped as silent while it counts)
        daemon = DaemonProcess(sockdir, "--group", GROUP, "--hello-timeout", "60")
        try:
            got = flood(daemon, 600, 88, user=member.pw_uid, group=member.pw_gid, extra_groups=[gid])
            assert got["held"] == 512 and got["closed"] + got["refused"] == 88, got
            lines = [line for line in daemon.log().splitlines()
                     if f"pid {got['pid']} uid {member.pw_uid}: 512 connections of this uid open" in line]
            assert len(lines) == got["closed"], (len(lines), got)
            wait_for(lambda: _answers(daemon.socket), 10, "the daemon to answer again")
        finally:
            daemon.stop()
            shutil.rmtree(sockdir, ignore_errors=True)

    sockdir = Path(tempfile.mkdtemp(prefix="umgr-sec-", dir="/tmp"))
    path = str(sockdir / "umgr.sock")
    limited = subprocess.Popen([sys.executable, "-m", "umgr", "daemon", "--socket", path, "--swap-size", "256M",
                                "--hello-timeout", "60"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    try:
        wait_for(lambda: _answers(path), 20, "the limited daemon")
        env = dict(os.environ, LD_PRELOAD=shim, UMGR_SOCKET=path, UMGR_MAX_RESIDENT="16M")
        with subprocess.Popen([programs["pattern"], "64", "mmap", "srb"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) as victim:
            wait_for(lambda: any(t["pid"] == victim.pid and t["pages_out"] > 0
                                 for t in query_status(path)["targets"]), 30, "the victim to be paged out")
            cap = (256 - 64) // 8     # server.FD_RESERVE, FDS_PER_CONNECTION
            got = flood(type("D", (), {"socket": path}), 100, 100 - (cap - 1))
            assert got["held"] == cap - 1 and got["closed"] + got["refused"] == 100 - (cap - 1), got
            assert limited.poll() is None
            # The flood's connections closed as it exited; the daemon counts
            # them gone as it reads each EOF, between the victim's faults.
            wait_for(lambda: _answers(path), 10, "the limited daemon to answer again")
            out, err = victim.communicate(timeout=120)
        assert victim.returncode == 0, err.decode(errors="replace")
        assert out.decode().startswith("ok 16384 pages"), out
    finally:
        limited.terminate()
        limited.communicate(timeout=30)
        shutil.rmtree(sockdir, ignore_errors=True)


# ---- a member's own programs: the userfaultfd they need --------------------------------------
MEMBER_PROGRAM = r"""
import mmap
n = 48 << 20
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, n, 4096):
    m[i:i + 8] = (i // 4096 + 1).to_bytes(8, "little")
bad = sum(m[i:i + 8] != (i // 4096 + 1).to_bytes(8, "little") for i in range(0, n, 4096))
print(f"ok {n // 4096} pages" if not bad else f"{bad} pages wrong")
"""


@contextlib.contextmanager
def uffd_open_to(gid: int | None):
    """/dev/userfaultfd open read-write to group gid (None: to root alone)
    and no full userfaultfds for unprivileged users from the syscall, as a
    default kernel has it; both put back afterwards."""
    st = os.stat(UFFD_DEVICE)
    with open(UNPRIVILEGED_UFFD) as f:
        sysctl = f.read().strip()
    try:
        with open(UNPRIVILEGED_UFFD, "w") as f:
            f.write("0")
        os.chown(UFFD_DEVICE, 0, 0 if gid is None else gid)
        os.chmod(UFFD_DEVICE, 0o600 if gid is None else 0o660)
        yield
    finally:
        os.chown(UFFD_DEVICE, st.st_uid, st.st_gid)
        os.chmod(UFFD_DEVICE, st.st_mode & 0o7777)
        with open(UNPRIVILEGED_UFFD, "w") as f:
            f.write(sysctl)


def run_as_member(daemon, shim_copy: str, member, gid: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, LD_PRELOAD=shim_copy, UMGR_SOCKET=daemon.socket, UMGR_MAX_RESIDENT="16M")
    return subprocess.run([SYSTEM_PYTHON, "-c", MEMBER_PROGRAM], env=env, capture_output=True, timeout=120,
                          user=member.pw_uid, group=member.pw_gid, extra_groups=[gid], cwd="/")


@pytest.mark.timeout(180)
def test_a_member_s_program_is_managed_once_the_group_may_open_the_uffd_device(shim):
    """A default kernel gives an unprivileged process no userfaultfd the
    shim can use: the daemon says so when it starts, the program runs
    unmanaged with one line saying why, and the daemon is not troubled by
    it. With /dev/userfaultfd open to the group, the program is paged."""
    wanted = "members of group umgrsecg cannot create a userfaultfd"
    with users() as (accounts, gid):
        member = accounts[MEMBER]
        sockdir = Path(tempfile.mkdtemp(prefix="umgr-sec-", dir="/tmp"))
        os.chmod(sockdir, 0o755)   # (the member reads the shim's copy here)
        shim_copy = str(sockdir / "libumgr_preload.so")
        shutil.copy(shim, shim_copy)
        os.chmod(shim_copy, 0o755)
        try:
            with uffd_open_to(None):
                daemon = DaemonProcess(sockdir, "--group", GROUP)
                try:
                    wait_for(lambda: wanted in daemon.log(), 10, "the daemon's warning")
                    warned = [line for line in daemon.log().splitlines() if wanted in line]
                    assert len(warned) == 1 and f"chgrp {GROUP} {UFFD_DEVICE}" in warned[0], warned
                    unmanaged = run_as_member(daemon, shim_copy, member, gid)
                    assert unmanaged.returncode == 0 and unmanaged.stdout == b"ok 12288 pages\n", unmanaged
                    said = unmanaged.stderr.decode().splitlines()
                    assert len(said) == 1 and "may not create a userfaultfd" in said[0] \
                        and "running unmanaged" in said[0], said
                    assert query_status(daemon.socket)["rejected_connections"] == 0
                    assert "WARNING" not in daemon.log().split(wanted, 1)[1], daemon.log()
                finally:
                    daemon.stop()
            with uffd_open_to(gid):
                (sockdir / "again").mkdir(mode=0o755)
                # (with no capability but the service unit's: a member's
                # /proc/PID/mem is opened with CAP_DAC_OVERRIDE)
                daemon = DaemonProcess(sockdir / "again", "--group", GROUP, as_the_service=True)
                try:
                    assert wanted not in daemon.log()
                    managed = run_as_member(daemon, shim_copy, member, gid)
                    assert managed.returncode == 0 and managed.stdout == b"ok 12288 pages\n", managed
                    assert managed.stderr == b"", managed.stderr
                    released = wait_for(lambda: [line for line in daemon.log().splitlines() if "released" in line],
                                        10, "the member's program to be released")
                    pages_out = int(released[0].split("out ")[1].rstrip(")"))
                    assert pages_out > 12288 - 4096, released   # 48 MiB written under 16 MiB
                finally:
                    daemon.stop()
        finally:
            shutil.rmtree(sockdir, ignore_errors=True)


def test_uffd_closed_to_group_reads_the_sysctl_and_the_device_s_group_and_mode(tmp_path):
    sysctl, device = tmp_path / "unprivileged_userfaultfd", tmp_path / "userfaultfd"
    sysctl.write_text("1\n")
    assert uffd_closed_to_group(4242, str(device), str(sysctl)) == ""   # any user gets a full one
    sysctl.write_text("0\n")
    misc = tmp_path / "misc-userfaultfd"
    closed = uffd_closed_to_group(4242, str(device), str(sysctl), str(misc))
    assert "cannot be used (No such file or directory)" in closed, closed
    misc.mkdir()   # the kernel has the device; this daemon's /dev hides it (PrivateDevices=): no telling
    assert uffd_closed_to_group(4242, str(device), str(sysctl), str(misc)) == ""
    device.touch()
    os.chown(device, 0, 4242)
    for mode, open_to_4242, open_to_4243 in ((0o600, False, False), (0o640, False, False), (0o660, True, False),
                                             (0o606, False, True), (0o666, True, True)):
        os.chmod(device, mode)
        for gid, expected in ((4242, open_to_4242), (4243, open_to_4243)):
            why = uffd_closed_to_group(gid, str(device), str(sysctl))
            assert (why == "") == expected, (oct(mode), gid, why)
    os.chmod(device, 0o640)
    assert uffd_closed_to_group(4242, str(device), str(sysctl)) == \
        "vm.unprivileged_userfaultfd is 0 and %s is -rw-r----- root:4242" % device
