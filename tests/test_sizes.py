"""One size grammar (umgr/sizes.py) for the command line, the config file and
the shim: the same table of cases goes through the Python parser, `umgr
exec --max-resident` and, with UMGR_MAX_RESIDENT, the shim inside a real
program whose budget the daemon then reports."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import DaemonProcess, wait_for
from umgr.cli import query_status
from umgr.sizes import SizeError, format_size, parse_size

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# text -> bytes, or None where the text is refused (minimum: one page)
CASES = {
    "4096": 4096,
    "4K": 4 * K,
    "512M": 512 * M,
    "512m": 512 * M,
    "1.5G": 3 * G // 2,
    "1.5g": 3 * G // 2,
    "2GB": 2 * G,
    "2GiB": 2 * G,
    "64kib": 64 * K,
    "3T": 3 * T,
    "1P": 1 << 50,
    " 16M\t": 16 * M,
    "0.25M": 256 * K,
    "1.000000001G": G + 1,        # 1.073741825 bytes dropped to 1
    "0000000000000000000000008M": 8 * M,
    "4097": 4097,
    "4096B": 4096,
    "7.999999999E": None,         # no E unit: 8E is the limit
    "8191P": 8191 << 50,
    "8192P": None,                # 2^63: too large
    "99999999999999999999": None,
    "0": None,
    "0M": None,
    "4095": None,                 # under a page
    "3.9K": None,
    "1k": None,
    "-1M": None,
    "-5M": None,
    "inf": None,
    "nan": None,
    "1e9": None,
    "1.5": None,                  # 1 byte
    "1.": None,
    ".5G": None,
    "1.0000000001G": None,        # more than 9 decimals
    "1.5X": None,
    "M": None,
    "1 M": None,
    "1MB2": None,
    "1iB": None,
    "0x1000": None,
    "+4M": None,
    "١٢M": None,                  # Arabic-Indic digits: not ASCII
}


@pytest.mark.parametrize("text, expected", CASES.items(), ids=repr)
def test_python_grammar(text, expected):
    if expected is None:
        with pytest.raises(SizeError) as refused:
            parse_size(text)
        assert "\n" not in str(refused.value) and repr(text) in str(refused.value)
    else:
        assert parse_size(text) == expected


def test_minimum_and_messages():
    assert parse_size("0", minimum=0) == 0
    with pytest.raises(SizeError, match="negative"):
        parse_size("-1M")
    with pytest.raises(SizeError, match="zero"):
        parse_size("0K")
    with pytest.raises(SizeError, match="too small: the least is 4K"):
        parse_size("1k")
    with pytest.raises(SizeError, match="too large"):
        parse_size("8192P")
    with pytest.raises(SizeError, match="not a size"):
        parse_size("")  # the shim reads an empty variable as unset
    with pytest.raises(SizeError, match="too small: the least is 1M"):
        parse_size("512K", minimum=M)


def test_format_size():
    assert [format_size(n) for n in (0, 4095, 4096, 4 * K + 1, 3 * G // 2, 512 * M, 100 * M + 1, 1023 * K, M - 1)] == \
        ["0", "3.9K", "4K", "4K", "1.5G", "512M", "100M", "1023K", "1023K"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text", ["-5M", "inf", "1.5X", "0", "1k"])
def test_cli_refuses_with_one_line_before_the_program_runs(text, tmp_path):
    marker = tmp_path / "ran"
    proc = subprocess.run([sys.executable, "-m", "umgr", "exec", f"--max-resident={text}", "--",
                           "touch", str(marker)], capture_output=True, timeout=30)
    assert proc.returncode == 125, proc.stderr
    assert len(proc.stderr.decode().splitlines()) == 1, proc.stderr
    assert repr(text) in proc.stderr.decode(), proc.stderr
    assert not marker.exists()


def held_under_shim(daemon, shim, programs, budget_text: str):
    """Run `ctl_hold` with UMGR_MAX_RESIDENT=budget_text: its target as
    `umgr status` showed it while it waited (None if unmanaged), and its
    stderr."""
    with subprocess.Popen([programs["ctl_hold"], "1"], env=daemon.env(shim, UMGR_MAX_RESIDENT=budget_text),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            assert proc.stdout.readline() == b"ready\n", budget_text
            target = next((t for t in query_status(daemon.socket)["targets"] if t["pid"] == proc.pid), None)
            out, err = proc.communicate(b"", timeout=10)
        finally:
            proc.kill()
    assert proc.returncode == 0 and out == b"ok 256 pages\n", (budget_text, out, err)
    return target, err


LARGEST = "8191P"   # the largest size the grammar accepts


@pytest.fixture
def largest_cap_daemon(tmp_path):
    """A daemon capping budgets at the largest size there is: a HELLO's
    budget is capped by --max-resident, so under this cap every size the
    shim reads is the budget the daemon reports."""
    assert parse_size(LARGEST) == max(v for v in CASES.values() if v is not None)
    d = DaemonProcess(tmp_path, "--max-resident", LARGEST)
    yield d
    d.stop()


@pytest.mark.timeout(120)
def test_shim_reads_the_same_grammar(largest_cap_daemon, shim, programs):
    """Each case is UMGR_MAX_RESIDENT for `ctl_hold`, a program that waits
    under the shim: a size becomes the budget the daemon reports for it
    (in whole pages, and at least MIN_BUDGET_BYTES: below it two pages one
    instruction needs could evict each other for ever), a refused text
    leaves it unmanaged with one line."""
    from umgr.paging.budget import MIN_BUDGET_BYTES
    daemon = largest_cap_daemon
    for text, expected in CASES.items():
        target, err = held_under_shim(daemon, shim, programs, text)
        if expected is None:
            assert target is None, (text, target)
            lines = err.decode().splitlines()
            assert len(lines) == 1 and f"UMGR_MAX_RESIDENT={text} " in lines[0] and "unmanaged" in lines[0], lines
        else:
            assert target is not None and target["budget_bytes"] == max(expected // 4096 * 4096, MIN_BUDGET_BYTES), \
                (text, target)
            assert err == b"", (text, err)
    wait_for(lambda: not query_status(daemon.socket)["targets"], 10, "every target's release")


@pytest.mark.timeout(60)
def test_daemon_budget_caps_the_shims(daemon, shim, programs):
    """--max-resident 16M is a cap: a program asking for more gets 16M, one
    asking for less keeps what it asked for."""
    for text, expected in (("512M", 16 * M), ("8M", 8 * M), ("1P", 16 * M)):
        target, err = held_under_shim(daemon, shim, programs, text)
        assert target is not None and target["budget_bytes"] == expected, (text, target)
        assert err == b"", (text, err)


@pytest.mark.timeout(30)
def test_shim_refuses_a_bad_min_region(daemon, shim, programs):
    proc = subprocess.run([programs["pattern"], "8"], env=daemon.env(shim, UMGR_MIN_REGION="-1M"),
                          capture_output=True, timeout=20)
    assert proc.returncode == 0 and proc.stdout.startswith(b"ok 2048 pages"), proc
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and "UMGR_MIN_REGION=-1M" in lines[0] and "unmanaged" in lines[0], lines
