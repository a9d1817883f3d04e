"""The service: deploy/umgr.service run as systemd would run it (its
ExecStart= arguments, the environment systemd gives it, a NOTIFY_SOCKET made
here), the config file, the generated man page and bash completion."""
from __future__ import annotations

import configparser
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SERVICE_UNIT as UNIT
from conftest import wait_for
from umgr.cli import query_status
from umgr.daemon.priority import default_nice

UMGR_BIN = Path(sys.executable).parent / "umgr"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unit_service() -> dict[str, list[str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return {key: [value] for key, value in parser["Service"].items()}


def started_as_the_unit(tmp_path: Path, wrapper: tuple[str, ...] = ()) -> tuple[subprocess.Popen, socket.socket,
                                                                               dict[str, str], Path]:
    """The daemon started with the unit's ExecStart= and the environment
    systemd would give it (under wrapper, e.g. strace); returns it, the
    notify socket, that environment and its log."""
    service = unit_service()
    assert service["Type"] == ["notify"]
    argv = shlex.split(service["ExecStart"][0])
    assert argv[0] == "/usr/local/bin/umgr"
    runtime = tmp_path / "run" / service["RuntimeDirectory"][0]
    state = tmp_path / "lib" / service["StateDirectory"][0]
    runtime.mkdir(parents=True, mode=int(service["RuntimeDirectoryMode"][0], 8))
    state.mkdir(parents=True, mode=int(service["StateDirectoryMode"][0], 8))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    env = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
           "RUNTIME_DIRECTORY": str(runtime), "STATE_DIRECTORY": str(state), "INVOCATION_ID": "0" * 32}
    log_path = tmp_path / "daemon.log"
    nice = int(service["Nice"][0])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*wrapper, str(UMGR_BIN), *argv[1:]], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd="/", start_new_session=True, preexec_fn=lambda: os.nice(nice - os.nice(0)))
    return proc, notify, env, log_path


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(90)
def test_unit_starts_the_daemon_and_reports_ready_once_it_accepts(tmp_path, shim, programs):
    proc, notify, env, log_path = started_as_the_unit(tmp_path)
    try:
        notify.settimeout(30)
        message, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
        # At READY=1 the socket accepts at once: no retry here.
        control = os.path.join(env["RUNTIME_DIRECTORY"], "control.sock")
        status = query_status(control)
        assert status["targets"] == [], status
        fields = dict(line.split("=", 1) for line in message.decode().splitlines())
        assert fields["READY"] == "1", message
        assert fields["STATUS"].startswith("umgr ") and f"serving {control}:" in fields["STATUS"], fields
        assert f"backend file (4G in {env['STATE_DIRECTORY']})" in fields["STATUS"], fields
        # NotifyAccess=main: the message comes from the process systemd started.
        (level, kind, creds), = ancillary
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        assert struct.unpack("3i", creds)[0] == proc.pid
        assert os.stat(control).st_mode & 0o777 == 0o600
        # Nice= is the daemon's priority: it asks for no other.
        assert "CAP_SYS_NICE" not in log_path.read_text()
        nice = int(Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == default_nice(-10, len(os.sched_getaffinity(0)))

        # It serves: a program under the shim pages through it.
        run = subprocess.run([programs["pattern"], "32", "mmap", "srb"], capture_output=True, timeout=60,
                             env=dict(os.environ, LD_PRELOAD=shim, UMGR_SOCKET=control, UMGR_MAX_RESIDENT="4M"))
        assert run.returncode == 0 and run.stdout.startswith(b"ok 8192 pages"), run
        wait_for(lambda: "released" in log_path.read_text(), 10, "the target's release")
        out = re.search(r"released \(faults \d+, pages in (\d+), out (\d+)\)", log_path.read_text())
        assert out and int(out.group(2)) >= (32 - 4) * 256, log_path.read_text()
        # The swap file is named in a directory of this socket's, kept for a
        # restart after a crash; the exited target's saved table is gone.
        saved, = Path(env["STATE_DIRECTORY"]).iterdir()
        assert sorted(p.name for p in saved.iterdir()) == ["backend", "boot", "lock", "swap"]
    finally:
        stop(proc)
        notify.close()
    assert not saved.exists(), "a clean stop removes the swap file and its directory"
    lines = log_path.read_text().splitlines()
    assert any(" INFO umgr: umgr " in line and " serving " in line for line in lines), lines


def test_unit_file_is_valid_for_systemd(tmp_path):
    """systemd's own checker (directives, values) on the unit, pointed at
    this umgr."""
    unit = tmp_path / "umgr.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/local/bin/umgr", f"ExecStart={UMGR_BIN}"))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def syscalls_allowed_by(filter_sets: list[str]) -> set[str]:
    """The system calls a SystemCallFilter= list allows, as this systemd
    expands its @sets (they differ between systemd versions)."""
    listing = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    members: dict[str, list[str]] = {}
    for line in listing.splitlines():
        if line.startswith("@"):
            current = members.setdefault(line.split()[0], [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.split()[0])

    def expand(name: str) -> set[str]:
        return set().union(*(expand(m) for m in members[name])) if name.startswith("@") else {name}
    return set().union(*(expand(name) for name in filter_sets))


PAGING_WITH_FORK = """
import os
data = bytearray(32 << 20)
data[::4096] = b"u" * (len(data) // 4096)
child = os.fork()
if child == 0:
    os._exit(0 if data.count(b"u") == 8192 else 1)
assert os.waitpid(child, 0)[1] == 0 and data.count(b"u") == 8192
print("ok")
"""


@pytest.mark.timeout(180)
def test_system_call_filter_allows_every_call_the_daemon_makes(tmp_path, shim):
    """The unit's SystemCallFilter= (expanded by systemd-analyze) holds every
    system call the daemon made, traced with strace from start-up through
    paging, a forked target, status and the SIGTERM drain. A call outside it
    would fail with EPERM (SystemCallErrorNumber=) under systemd."""
    service = unit_service()
    allowed = syscalls_allowed_by(service["SystemCallFilter"][0].split())
    trace = tmp_path / "strace.out"
    proc, notify, env, log_path = started_as_the_unit(
        tmp_path, ("strace", "-f", "-qq", "-e", "signal=none", "-o", str(trace)))
    try:
        notify.settimeout(60)
        assert b"READY=1" in notify.recv(4096)
        control = os.path.join(env["RUNTIME_DIRECTORY"], "control.sock")
        target = dict(os.environ, LD_PRELOAD=shim, UMGR_SOCKET=control, UMGR_MAX_RESIDENT="4M")
        run = subprocess.run([sys.executable, "-c", PAGING_WITH_FORK], env=target, capture_output=True, timeout=120)
        assert run.returncode == 0 and run.stdout == b"ok\n", run
        query_status(control)
        with subprocess.Popen([sys.executable, "-c", "import sys, time; d = bytearray(16 << 20); "
                               "d[::4096] = b'v' * 4096; print('ready', flush=True); sys.stdin.read()"],
                              env=target, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as held:
            assert held.stdout.readline() == b"ready\n"
            daemon_pid = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
            os.kill(daemon_pid, signal.SIGTERM)        # strace itself would only detach
            assert proc.wait(60) == 0, log_path.read_text()
            held.stdin.close()
    finally:
        stop(proc)
        notify.close()
    made = {m.group(1) for m in re.finditer(r"^\d+ +([a-z0-9_]+)\(", trace.read_text(), re.M)}
    assert {"io_uring_enter", "process_vm_readv", "pwrite64", "pidfd_open", "accept4"} <= made, sorted(made)  # pwrite64: the canary
    assert "every page is back" in log_path.read_text()
    assert made <= allowed, f"outside SystemCallFilter=: {sorted(made - allowed)}"


# ---- the config file --------------------------------------------------------------
def daemon_startup_line(tmp_path: Path, config: str, *options: str) -> subprocess.CompletedProcess:
    """`umgr daemon --config FILE OPTIONS` until its start-up line; then stopped."""
    path = tmp_path / "umgr.toml"
    path.write_text(config)
    proc = subprocess.Popen([sys.executable, "-m", "umgr", "daemon", "--config", str(path), *options],
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        while not lines or (lines[-1] and " serving " not in lines[-1]):
            lines.append(proc.stderr.readline())
    finally:
        stop(proc)
        rest = proc.stderr.read()
        proc.stderr.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", "".join(lines) + rest)


@pytest.mark.timeout(60)
def test_config_file_settings_and_command_line_overrides(tmp_path):
    sock = tmp_path / "c.sock"
    config = (f'socket = "{sock}"\nmax-resident = "8M"\nswap-size = "64M"\nstate-dir = "{tmp_path}"\n'
              f'keep-clean = true\neviction = "reuse"\nmetrics-port = 0\n')
    refused = daemon_startup_line(tmp_path, config)
    assert refused.returncode == 125 and refused.stderr.count("\n") == 1, refused.stderr
    assert "metrics-port: '0' is not a port" in refused.stderr

    config = config.replace("metrics-port = 0\n", "")
    ran = daemon_startup_line(tmp_path, config, "--max-resident", "4M")
    assert f"serving {sock}: budget 4M per process, backend file (64M in {tmp_path}), policy readahead, " \
           "eviction reuse" in ran.stderr, ran.stderr
    # A list the file sets is replaced by the command line's, not appended to;
    # a secret option's value is not shown.
    chained = config + 'backend = ["compressed:cap=8M", "file"]\n'
    ran = daemon_startup_line(tmp_path, chained, "--backend", "compressed:cap=4M,level=2")
    assert "backend compressed:cap=4M,level=2 (64M in" in ran.stderr, ran.stderr
    ran = daemon_startup_line(tmp_path, chained)
    assert "backend compressed:cap=8M + file (64M in" in ran.stderr, ran.stderr
    ran = daemon_startup_line(tmp_path, config, "--backend", "file:size=32M")   # (the store's size as opened)
    assert "backend file:size=32M (32M in" in ran.stderr, ran.stderr
    # `umgr status` finds the socket in the same file.
    proc = subprocess.run([sys.executable, "-m", "umgr", "status", "--config", str(tmp_path / "umgr.toml"),
                           "--interval", "0.05"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 125 and f"no daemon at {sock}" in proc.stderr, proc.stderr


def daemon_settings(tmp_path: Path, config: str, *options: str):
    """The DaemonConfig and arguments `umgr daemon --config FILE OPTIONS` would run with."""
    from umgr.cli import _config, _with_config_file, build_parser
    path = tmp_path / "umgr.toml"
    path.write_text(config)
    argv = ["daemon", "--config", str(path), *options]
    parser = build_parser()
    args = _with_config_file(parser, parser.parse_args(argv), argv)
    return _config(args, str(tmp_path / "s.sock")), args


@pytest.mark.parametrize("setting, undo, field, set_value, default", [
    ("keep-clean = true", ["--clean-copies", "auto"], "clean_copies", "always", "auto"),
    ("no-fast-path = true", ["--fast-path"], "fast_path", False, True),
    ("no-move-out = true", ["--move-out"], "move_out", False, True),
    ("metrics-per-pid = true", ["--no-metrics-per-pid"], "metrics_per_pid", True, False),
    ("no-persist = true", ["--persist"], "no_persist", True, False),
], ids=["keep-clean", "no-fast-path", "no-move-out", "metrics-per-pid", "no-persist"])
def test_a_switch_the_config_file_sets_is_undone_on_the_command_line(tmp_path, setting, undo, field, set_value,
                                                                   default):
    """Command-line options win over the file's settings, switches too: each
    switch a file may set has an option that sets it back."""
    def value(config, args):
        return getattr(config, field) if hasattr(config, field) else getattr(args, field)
    assert value(*daemon_settings(tmp_path, setting + "\n")) == set_value
    assert value(*daemon_settings(tmp_path, setting + "\n", *undo)) == default
    assert value(*daemon_settings(tmp_path, setting.replace("true", "false") + "\n")) == default


def test_min_region_given_anywhere_turns_off_taking_up_small_mappings(tmp_path):
    """Unless --min-region gives a size (in the file or on the command line),
    a target's maps scans take up its small mappings once they add up
    (Target.found_small_mappings); given, that size alone is managed."""
    config, _ = daemon_settings(tmp_path, "")
    assert (config.min_region, config.adapt_min_region) == (1 << 20, True)
    config, _ = daemon_settings(tmp_path, 'min-region = "512K"\n')
    assert (config.min_region, config.adapt_min_region) == (512 << 10, False)
    config, _ = daemon_settings(tmp_path, "", "--min-region", "1M")
    assert (config.min_region, config.adapt_min_region) == (1 << 20, False)
    # `auto` is the default, which the command line can give back.
    config, _ = daemon_settings(tmp_path, 'min-region = "512K"\n', "--min-region", "auto")
    assert (config.min_region, config.adapt_min_region) == (1 << 20, True)
    config, _ = daemon_settings(tmp_path, 'min-region = "auto"\n')
    assert (config.min_region, config.adapt_min_region) == (1 << 20, True)


@pytest.mark.parametrize("config, message", [
    ('max-resident = "-5M"\n', "max-resident: '-5M' is negative"),
    ("swap-size = 0\n", "swap-size: '0' is zero"),
    ('budget = "1G"\n', "unknown setting 'budget'"),
    ('keep-clean = "yes"\n', "keep-clean is true or false, not 'yes'"),
    ('clean-copies = "never"\nkeep-clean = true\n', "clean-copies and keep-clean are the same setting: give one"),
    ("no-persist = true\npersist = true\n", "no-persist and persist are the same setting: give one"),
    ('backend = "tape"\n', "backend: unknown backend 'tape'"),
    ("max-resident = [1]\n", "max-resident = [1] is not a string or number"),
    ("max-resident = \n", "not TOML"),
], ids=["negative", "zero", "unknown", "switch", "same-setting", "switch-and-undo", "choice", "list", "syntax"])
def test_config_file_refusals(tmp_path, config, message):
    path = tmp_path / "umgr.toml"
    path.write_text(config)
    proc = subprocess.run([sys.executable, "-m", "umgr", "daemon", "--config", str(path), "--socket",
                           str(tmp_path / "s.sock")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 125, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and f"{path}: " in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr


def test_status_and_budget_given_a_socket_do_not_read_the_config_file(tmp_path):
    """They take only the socket from the file: given one, a file they
    could not use (root's, unreadable; broken) does not stop them."""
    path = tmp_path / "umgr.toml"
    path.write_text("socket = [\n")
    sock = str(tmp_path / "none.sock")
    for command in (["status"], ["budget", "1", "8M"]):
        proc = subprocess.run([sys.executable, "-m", "umgr", *command, "--config", str(path), "--socket", sock],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 125 and "not TOML" not in proc.stderr and f"no daemon at {sock}" in proc.stderr, \
            proc.stderr
    proc = subprocess.run([sys.executable, "-m", "umgr", "status", "--config", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 125 and "not TOML" in proc.stderr, proc.stderr


def test_missing_config_file_given_by_name(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "umgr", "daemon", "--config", str(tmp_path / "nope.toml")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 125 and proc.stderr == f"umgr: --config {tmp_path / 'nope.toml'}: no such file\n"


# ---- man page and completion --------------------------------------------------------
def test_manpage_documents_every_option():
    from umgr.cli import build_parser
    page = subprocess.run([sys.executable, "-m", "umgr", "manpage"], capture_output=True, text=True,
                          check=True, timeout=30).stdout
    lint = subprocess.run(["groff", "-man", "-ww", "-z"], input=page, capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0 and lint.stderr == "", lint.stderr
    for name, sub in build_parser().subcommands.items():
        assert f".SS umgr {name}" in page
        for action in sub._actions:
            for option in action.option_strings:
                assert f"\\fB{option.replace('-', chr(92) + '-')}\\fR" in page, (name, option)
    for section in ("FILES", "ENVIRONMENT", "EXIT STATUS", "SIZES"):
        assert f".SH {section}" in page
    for variable in ("UMGR_SOCKET", "UMGR_MAX_RESIDENT", "UMGR_POLICY", "UMGR_MIN_REGION", "UMGR_NAME",
                     "UMGR_WRAP_MALLOC", "UMGR_GRACE_SECONDS", "NOTIFY_SOCKET"):
        assert f"\\fB{variable}" in page, variable
    # The same page for every user: the default state directory names no uid.
    assert f"umgr\\-{os.geteuid()})" not in page and "/var/tmp/umgr\\-UID" in page


@pytest.mark.parametrize("words, expected", [
    ("umgr dae", {"daemon"}),
    ("umgr -v st", {"status"}),
    ("umgr daemon --so", {"--socket"}),
    ("umgr status --w", {"--watch"}),
    ("umgr exec --backend ''", {"compressed", "file", "redis"}),
    ("umgr completion ''", {"-h", "--help", "-v", "--verbose", "-q", "--quiet", "bash"}),
    ("umgr exec -- umgr-no-such-comm", set()),
], ids=["command", "after-v", "option", "watch", "choice", "positional", "program"])
def test_bash_completion(tmp_path, words, expected):
    script = tmp_path / "umgr.bash"
    script.write_text(subprocess.run([sys.executable, "-m", "umgr", "completion", "bash"], capture_output=True,
                                     text=True, check=True, timeout=30).stdout)
    program = (f"source {script}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); "
               "_umgr; printf '%s\\n' \"${COMPREPLY[@]}\"")
    proc = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == expected, proc.stdout


def test_what_is_shown_and_kept_of_a_backend_chain():
    """A spec as logs, `umgr status` and systemd's STATUS= show it: the
    password hidden. The chain a restarted daemon must match (state
    directory): the names in order; options do not change how the pages
    already stored read, so changing them keeps the tables."""
    from umgr.backends import chain_identity, shown
    from umgr.cli import _backend_value
    assert shown("redis:host=h,password=s3cret,port=7000") == "redis:host=h,password=***,port=7000"
    assert shown("compressed:cap=1G") == "compressed:cap=1G"
    base = chain_identity(["compressed:cap=1G", "file"], _backend_value)
    assert base == "compressed + file"
    assert chain_identity(["compressed:cap=512M,level=3,codec=zstd", "file:size=8G"], _backend_value) == base
    assert chain_identity(["file"], _backend_value) != base
    assert chain_identity(["file", "compressed"], _backend_value) != base
    for bad in (["compressed:cap=lots"], ["compressed:colour=red"], ["tape"]):
        with pytest.raises(ValueError):
            chain_identity(bad, _backend_value)
