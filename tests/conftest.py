"""Shared fixtures: test programs compiled from tests/programs, `umgr exec`
runs, and a standalone daemon. Everything runs against the real kernel."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PROGRAMS = HERE / "programs"
MiB = 1 << 20


def pytest_configure(config):
    # `make test` runs the suite against the wheel installed in a fresh venv:
    # make sure that is the umgr imported here, not the source tree.
    if os.environ.get("UMGR_TEST_INSTALLED"):
        import umgr
        if HERE.parent in Path(umgr.__file__).resolve().parents:
            raise pytest.UsageError(f"UMGR_TEST_INSTALLED is set but umgr comes from the checkout: {umgr.__file__}")


@pytest.fixture(scope="session")
def programs(tmp_path_factory) -> dict[str, str]:
    """Every tests/programs/*.c compiled once: name -> executable path."""
    out = tmp_path_factory.mktemp("programs")
    built = {}
    for source in sorted(PROGRAMS.glob("*.c")):
        exe = out / source.stem
        libs = ["-luring"] if "#include <liburing.h>" in source.read_text() else []
        subprocess.run(["gcc", "-O2", "-pthread", "-Wall", "-o", str(exe), str(source), *libs], check=True)
        built[source.stem] = str(exe)
    return built


def fd_links(pid: int) -> list[str]:
    """What the process's descriptors point at, sorted; but for the
    daemon's CPU latency request, which comes and goes with its targets'
    fault rate (--idle-poll) and belongs to no connection, and for package
    metadata files, which it reads a moment (importlib.metadata: plug-ins,
    its version) and which a snapshot may catch open."""
    from umgr.kernel import cpulatency
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return sorted(link for link in links if link != cpulatency.DEVICE and ".dist-info/" not in link)


@pytest.fixture(scope="session")
def shim() -> str:
    from umgr.cli import shim_path
    return shim_path()


@dataclass
class ExecResult:
    returncode: int
    stdout: str
    stderr: str
    stats: dict


@pytest.fixture
def umgr_exec(tmp_path):
    """Run `umgr exec OPTIONS -- PROGRAM...` and return its outcome and figures."""
    def run(program: list[str], *options: str, max_resident: str = "16M", timeout: float = 240,
            stdin: bytes | None = None) -> ExecResult:
        stats_file = tmp_path / f"stats-{time.monotonic_ns()}.json"
        cmd = [sys.executable, "-m", "umgr", "exec", "--max-resident", max_resident,
               "--stats-json", str(stats_file), "--swap-size", "1G", *options, "--", *program]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        return ExecResult(proc.returncode, proc.stdout.decode(errors="replace"),
                          proc.stderr.decode(errors="replace"), stats)
    return run


SERVICE_UNIT = HERE.parent / "deploy" / "umgr.service"


def with_the_service_s_capabilities(command: list[str]) -> list[str]:
    """command, run as root with only the capabilities deploy/umgr.service
    leaves the daemon (CapabilityBoundingSet=)."""
    line, = [line for line in SERVICE_UNIT.read_text().splitlines() if line.startswith("CapabilityBoundingSet=")]
    caps = [cap.lower().removeprefix("cap_") for cap in line.split("=", 1)[1].split()]
    return ["setpriv", "--bounding-set", ",".join(["-all", *(f"+{cap}" for cap in caps)]), "--inh-caps", "-all",
            "--", *command]


class DaemonProcess:
    def __init__(self, tmp_path: Path, *options: str, as_the_service: bool = False):
        """`as_the_service`: with the capabilities the service unit leaves it."""
        self.socket = str(tmp_path / "umgr.sock")
        self.log_path = tmp_path / "daemon.log"
        self._log = open(self.log_path, "wb")
        # A state directory of its own: a killed daemon leaves its swap file
        # there for a restart, and tests must not fill /var/tmp with them.
        state = [] if "--state-dir" in options else ["--state-dir", str(tmp_path / "state")]
        cmd = [sys.executable, "-m", "umgr", "daemon", "-v", "--socket", self.socket, "--swap-size", "1G", *state,
               *options]
        if as_the_service:
            cmd = with_the_service_s_capabilities(cmd)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                self._log.close()
                raise RuntimeError(f"daemon did not start: {self.log()}")
            time.sleep(0.02)

    def env(self, shim: str, **extra: str) -> dict[str, str]:
        env = dict(os.environ, LD_PRELOAD=shim, UMGR_SOCKET=self.socket)
        env.update(extra)
        return env

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def daemon(tmp_path):
    """A standalone `umgr daemon` with a 16 MiB budget per target."""
    d = DaemonProcess(tmp_path, "--max-resident", "16M")
    yield d
    d.stop()


def children(pid: int) -> list[int]:
    """Its child processes ([] once it has ended)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError("no VmRSS")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """predicate()'s first true value, polling; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
