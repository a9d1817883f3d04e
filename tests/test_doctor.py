"""`umgr doctor` against the running kernel (Linux 6.18 on this machine:
remote MADV_DONTNEED is refused, a process may zap itself)."""
import subprocess
import sys


def _rows(out: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in out.splitlines():
        # facility names have at most one space; the columns are 2+ spaces apart
        cols = [c.strip() for c in line.split("  ") if c.strip()]
        if len(cols) >= 2:
            rows[cols[0]] = (cols[1], cols[2] if len(cols) > 2 else "")
    return rows


def test_doctor_reports_this_kernel():
    r = subprocess.run([sys.executable, "-m", "umgr", "doctor"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _rows(r.stdout)
    assert rows["remote zap"][0] == "unsupported"
    assert rows["agent zap"][0] == "supported"
    # Both ways of zapping itself work on 6.13+.
    assert "PIDFD_SELF: ok" in rows["agent zap"][1] and "own pidfd: ok" in rows["agent zap"][1]
    assert rows["uffd WP (anon)"][0] == "supported"
    assert rows["io_uring"][0] == "ok"
    assert rows["process_vm_readv"][0] == "ok"
    assert rows["agent move out"][0] == "supported"   # UFFDIO_MOVE: 6.8+
    assert rows["idle poll"][0] == "supported"   # root: a CPU latency request of 0 takes
    assert "zap mode: agent" in r.stdout and "moves evicted pages out" in r.stdout


def test_probe_rows_and_verdict():
    from umgr import probe
    rows = probe.probe()
    assert {r[0] for r in rows} >= {"uffd syscall", "uffd WP (anon)", "io_uring", "remote zap", "agent zap"}
    assert probe.verdict(rows) == []
    # Without a zap path umgr cannot run, and says why.
    broken = [(n, "unsupported" if n in ("remote zap", "agent zap") else s, d) for n, s, d in rows]
    assert any("drop evicted pages" in reason for reason in probe.verdict(broken))
    # zap_mode keeps following remote_zap_supported.
    assert probe.zap_mode().name == "AGENT"


def test_no_userfaultfd_at_all_is_one_reason_not_a_traceback(monkeypatch):
    """Root in a container whose seccomp refuses the syscall and whose /dev
    has no userfaultfd: the probe raises Unsupported (ENOENT), and exec must
    still stop with one line; doctor names that, not fork events."""
    from umgr import probe
    from umgr.errors import Unsupported

    def no_uffd():
        raise Unsupported("userfaultfd: No such file or directory")
    monkeypatch.setattr(probe, "_probe_event_fork", no_uffd)
    assert probe.daemon_refused().startswith("this process gets no userfaultfd (")
    rows = [(n, "unsupported" if n in ("uffd syscall", "/dev/userfaultfd", "EVENT_FORK") else s, d)
            for n, s, d in probe.probe()]
    reasons = probe.verdict(rows)
    assert any("no userfaultfd" in r for r in reasons) and not any("CAP_SYS_PTRACE" in r for r in reasons), reasons
