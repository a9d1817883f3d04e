"""Prometheus metrics served by a real daemon while real targets page: the
figures a scrape returns are the daemon's own, per name by default (bounded
series: a gone process's counters stay in its name's), per pid on request."""
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import DaemonProcess, wait_for
from umgr.cli import query_status

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_text(port: int) -> str:
    deadline = time.monotonic() + 10
    while True:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def scrape(port: int) -> dict:
    """{(metric sample name, frozenset(labels)): value}"""
    text = scrape_text(port)
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def of_pid(samples: dict, metric: str, pid: int, **labels) -> float:
    want = {("pid", str(pid)), *labels.items()}
    values = [v for (n, ls), v in samples.items() if n == metric and want <= ls]
    assert len(values) == 1, f"{metric} for pid {pid} {labels}: {values}"
    return values[0]


def of_name(samples: dict, metric: str, name: str, **labels) -> float:
    want = frozenset({("name", name), *labels.items()})
    assert (metric, want) in samples, f"{metric} for {name} {labels}: not in {sorted(k for k in samples if k[0] == metric)}"
    return samples[(metric, want)]


def hold(programs, env: dict, mib: int, executable: str | None = None) -> subprocess.Popen:
    """`threads` (or a link to it, or a copy) paging through `mib` MiB, then
    held alive (until EOF on stdin) so its figures can be read."""
    proc = subprocess.Popen([executable or programs["threads"], str(mib), "0", "1", "sb", "hold"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline().decode()
    if not line.startswith("ok "):
        proc.kill()
        raise AssertionError(line + proc.communicate()[1].decode())
    return proc


@pytest.mark.timeout(90)
def test_metrics_per_name_are_bounded_and_monotonic(tmp_path, programs, shim):
    """Processes sharing a name share one set of series with no pid label;
    one that exits leaves its counts in its name's counters (they never go
    down) and its memory out of the gauges."""
    port = free_port()
    daemon = DaemonProcess(tmp_path, "--max-resident", "8M", "--metrics-port", str(port))
    procs = []
    try:
        procs = [hold(programs, daemon.env(shim, UMGR_NAME="batch"), 16) for _ in range(2)]
        unnamed = hold(programs, daemon.env(shim), 12)
        procs.append(unnamed)
        samples = scrape(port)
        assert not [k for k in samples if "pid" in dict(k[1])], "a pid label without --metrics-per-pid"
        assert of_name(samples, "umgr_targets", "batch") == 2
        assert of_name(samples, "umgr_targets", "threads") == 1  # no UMGR_NAME: the executable's name
        out_before = of_name(samples, "umgr_pages_out_total", "batch")
        assert out_before >= 2 * (16 - 8) * MiB // 4096
        assert 8 * MiB < of_name(samples, "umgr_resident_bytes", "batch") <= 2 * 8 * MiB
        assert of_name(samples, "umgr_budget_bytes", "batch") == 2 * 8 * MiB
        assert of_name(samples, "umgr_eviction_paused", "batch") == 0
        assert samples[("umgr_targets_started_total", frozenset())] == 3
        build = [ls for n, ls in samples if n == "umgr_build_info"]
        assert len(build) == 1 and ("version", __import__("umgr").__version__) in build[0]
        assert samples[("process_resident_memory_bytes", frozenset())] > 0  # the daemon's own
        assert samples[("process_open_fds", frozenset())] > 0

        first = procs.pop(0)
        first.communicate(timeout=30)  # EOF on stdin: it exits
        assert first.returncode == 0
        wait_for(lambda: of_name(scrape(port), "umgr_targets", "batch") == 1, 10, "the target's release")
        samples = scrape(port)
        assert of_name(samples, "umgr_pages_out_total", "batch") >= out_before
        assert 0 < of_name(samples, "umgr_resident_bytes", "batch") <= 8 * MiB
        assert of_name(samples, "umgr_fault_service_seconds_count", "batch") > 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        daemon.stop()


@pytest.mark.timeout(90)
def test_metrics_report_a_paging_target(tmp_path, programs, shim):
    port = free_port()
    daemon = DaemonProcess(tmp_path, "--max-resident", "8M", "--metrics-port", str(port), "--metrics-per-pid")
    proc = None
    try:
        # 32 MiB in an 8 MiB budget, then held alive so its figures can be read.
        proc = subprocess.Popen([programs["threads"], "32", "0", "1", "sb", "hold"],
                                env=daemon.env(shim, UMGR_NAME="named"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = proc.stdout.readline().decode()
        assert line.startswith("ok "), line + proc.stderr.read().decode() + daemon.log()
        samples = scrape(port)
        pid = proc.pid
        assert of_pid(samples, "umgr_pages_out_total", pid) >= (32 - 8) * MiB // 4096
        assert of_pid(samples, "umgr_pages_in_total", pid) > 0
        assert of_pid(samples, "umgr_faults_total", pid, kind="missing_swapped") > 0
        assert of_pid(samples, "umgr_budget_bytes", pid, name="named") == 8 * MiB
        assert 0 < of_pid(samples, "umgr_resident_bytes", pid) <= 8 * MiB
        assert of_pid(samples, "umgr_swapped_bytes", pid) > 0
        assert of_pid(samples, "umgr_managed_bytes", pid) >= 32 * MiB
        served = of_pid(samples, "umgr_fault_service_seconds_count", pid)
        assert served > 0 and of_pid(samples, "umgr_fault_service_seconds_bucket", pid, le="+Inf") == served
        assert samples[("umgr_backend_used_bytes", frozenset())] > 0
        assert samples[("umgr_backend_io_seconds_count", frozenset())] > 0
        assert samples[("umgr_internal_errors_total", frozenset())] == 0
        proc.communicate(timeout=30)  # EOF on stdin: it exits
        assert proc.returncode == 0
        # Gone targets leave the per-target families; the swap is all free again.
        deadline = time.monotonic() + 10
        while samples[("umgr_backend_used_bytes", frozenset())] and time.monotonic() < deadline:
            time.sleep(0.2)
            samples = scrape(port)
        assert samples[("umgr_backend_used_bytes", frozenset())] == 0
        assert not [k for k in samples if ("pid", str(pid)) in k[1]]
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        daemon.stop()


def systemd_cgroup_root() -> Path:
    """Where the hierarchy that names systemd units is mounted: cgroup2, or
    on a legacy or hybrid host systemd's own v1 hierarchy."""
    v1 = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            kind = fields[fields.index("-") + 1]
            if kind == "cgroup2":
                return Path(fields[4])
            if kind == "cgroup" and "name=systemd" in fields[-1]:
                v1 = Path(fields[4])
    assert v1 is not None, "no cgroup hierarchy names systemd units here"
    return v1


@pytest.mark.timeout(60)
def test_target_names(tmp_path, programs, shim):
    """A target's name is its UMGR_NAME, else its systemd service, else
    the file name it was run by: a symbolic link's own (as redis-server,
    a link to redis-check-rdb), and whole where the kernel's comm cuts it
    to 15 characters."""
    unit = systemd_cgroup_root() / f"umgr-test-{os.getpid()}.service"
    unit.mkdir()
    link, long_named = tmp_path / "db-server", tmp_path / "threads-with-a-long-name"
    link.symlink_to(programs["threads"])
    shutil.copy(programs["threads"], long_named)
    # comm keeps 15 bytes, which cut this name inside a character; a file name need not be UTF-8.
    cyrillic, not_utf8 = tmp_path / "xсервер-данных", tmp_path / os.fsdecode(b"bad\xffname")
    shutil.copy(programs["threads"], cyrillic)
    shutil.copy(programs["threads"], not_utf8)
    daemon = DaemonProcess(tmp_path, "--max-resident", "4M")
    procs = []
    try:
        procs.append(hold(programs, daemon.env(shim, UMGR_NAME="my\x1bjob"), 2))
        procs.append(hold(programs, daemon.env(shim), 2))
        procs.append(hold(programs, daemon.env(shim), 2, str(link)))
        procs.append(hold(programs, daemon.env(shim), 2, str(long_named)))
        procs.append(hold(programs, daemon.env(shim), 2, str(cyrillic)))
        procs.append(hold(programs, daemon.env(shim), 2, str(not_utf8)))
        in_unit = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {unit}/cgroup.procs && exec "$0" 2 0 1 sb hold', programs["threads"]],
            env=daemon.env(shim), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(in_unit)
        assert in_unit.stdout.readline().startswith(b"ok "), in_unit.stderr.read()
        names = {t["pid"]: t["name"] for t in query_status(daemon.socket)["targets"]}
        assert names == {procs[0].pid: "my?job", procs[1].pid: "threads", procs[2].pid: "db-server",
                         procs[3].pid: "threads-with-a-long-name", procs[4].pid: "xсервер-данных",
                         procs[5].pid: "bad?name", in_unit.pid: unit.name}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        daemon.stop()
        unit.rmdir()


def test_service_names_from_cgroup_lines():
    from umgr.daemon.names import service_in
    assert service_in("0::/system.slice/db.service\n") == "db.service"
    assert service_in("12:memory:/x\n1:name=systemd:/system.slice/getty@tty1.service\n0::/\n") == "getty@tty1.service"
    assert service_in("0::/user.slice/user-0.slice/session-4.scope\n") == ""  # a fresh name per session
    assert service_in("0::/\n") == service_in("") == service_in("garbage") == ""


def test_names_of_ended_targets_past_the_bound_count_as_other(monkeypatch):
    """A program names itself (UMGR_NAME, its comm), so a loop of new names
    would add series for the daemon's life: past RETIRED_NAMES_MAX names,
    ended targets count under OTHER_NAME; a name kept goes on counting.
    (Pure logic: the collector with a stand-in daemon.)"""
    from types import SimpleNamespace

    from umgr import metrics
    from umgr.paging.stats import TargetStats
    monkeypatch.setattr(metrics, "RETIRED_NAMES_MAX", 3)
    daemon = SimpleNamespace(targets={}, lifecycle=SimpleNamespace(release_watchers=[]))
    collector = metrics.DaemonCollector(daemon)

    class Ended:   # (hashable, as targets are)
        def __init__(self, name: str, pid: int):
            self.name, self.pid, self.stats = name, pid, TargetStats()
            self.stats.pages_out = 10
    for pid, name in enumerate(["a", "b", "c", "d", "e", "a"], 1):
        collector._retire(Ended(name, pid))
    assert sorted(collector._retired) == ["(other)", "a", "b", "c"]
    assert collector._retired["a"].counters["pages_out"] == 20
    assert collector._retired["(other)"].counters["pages_out"] == 20
    names = sorted(group.labels[0] for group in collector._groups())
    assert names == ["(other)", "a", "b", "c"]
    # A name a live target still shows keeps its series when another of
    # that name ends: moved to (other), its counts would drop from the sum.
    live = Ended("w", 10)
    daemon.targets[10] = live
    collector._retire(Ended("w", 11))
    assert collector._retired["w"].counters["pages_out"] == 10
