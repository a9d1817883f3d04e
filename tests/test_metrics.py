"""Prometheus metrics served by a real daemon while a real target pages:
the figures a scrape returns are the daemon's own, per target."""
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import DaemonProcess

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """{(metric sample name, frozenset(labels)): value}"""
    deadline = time.monotonic() + 10
    while True:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def of_pid(samples: dict, name: str, pid: int, **labels) -> float:
    want = {("pid", str(pid)), *labels.items()}
    values = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert len(values) == 1, f"{name} for pid {pid} {labels}: {values}"
    return values[0]


@pytest.mark.timeout(90)
def test_metrics_report_a_paging_target(tmp_path, programs, shim):
    port = free_port()
    daemon = DaemonProcess(tmp_path, "--max-resident", "8M", "--metrics-port", str(port))
    proc = None
    try:
        # 32 MiB in an 8 MiB budget, then held alive so its figures can be read.
        proc = subprocess.Popen([programs["threads"], "32", "0", "1", "sb", "hold"], env=daemon.env(shim),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = proc.stdout.readline().decode()
        assert line.startswith("ok "), line + proc.stderr.read().decode() + daemon.log()
        samples = scrape(port)
        pid = proc.pid
        assert of_pid(samples, "umgr_pages_out_total", pid) >= (32 - 8) * MiB // 4096
        assert of_pid(samples, "umgr_pages_in_total", pid) > 0
        assert of_pid(samples, "umgr_faults_total", pid, kind="missing_swapped") > 0
        assert of_pid(samples, "umgr_budget_bytes", pid) == 8 * MiB
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
