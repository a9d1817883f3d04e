"""The policy author's workflow: `umgr exec --record-trace` writes the
faults and evictions of a real run; `umgr replay` replays them offline
against other policies and budgets; `--policy-opt`/`--eviction-opt` reach
the policies; `umgr policies` lists what is installed."""
import importlib.metadata
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from umgr.policies import ENTRY_POINT_GROUP
from umgr.trace import (CLOCK_EVERY, FAULTS, FORMAT, HEADER, MAGIC, RECORD, Kind, TraceError, TraceWriter, read_trace,
                        target_runs)

MiB = 1 << 20
PAGES = 32 * MiB // 4096


def umgr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "umgr", *args], capture_output=True, text=True, timeout=timeout)


def replay(trace, *args: str) -> list[dict]:
    done = umgr("replay", str(trace), "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, programs):
    """32 MiB written, then read back in order, under 8 MiB with no
    prefetch: every page faults fresh once and from swap at least once."""
    out = tmp_path_factory.mktemp("trace")
    trace, stats = out / "run.trace", out / "stats.json"
    done = umgr("exec", "--max-resident", "8M", "--swap-size", "256M", "--policy", "none", "--eviction", "fifo",
                "--record-trace", str(trace), "--stats-json", str(stats), "--", programs["pattern"], "32", "mmap", "s")
    assert done.returncode == 0, done.stderr
    return trace, json.loads(stats.read_text())


@pytest.mark.timeout(120)
def test_trace_holds_the_runs_faults_and_evictions(recorded):
    trace, stats = recorded
    meta, records = read_trace(str(trace))
    assert meta["policy"] == "none" and meta["eviction"] == "fifo" and meta["max_resident"] == 8 * MiB
    assert meta["command"][1:] == ["32", "mmap", "s"]
    (run,) = target_runs(records)
    assert run.budget_pages == 8 * MiB // 4096 and not run.forked
    kinds = records["kind"]
    assert (kinds == Kind.EVICT).sum() == stats["pages_out"] >= PAGES - 8 * MiB // 4096
    # The program is single-threaded: one fault at a time, each one traced
    # as the fault service counted it.
    assert (kinds == Kind.FAULT_FRESH).sum() == stats["faults_fresh"]
    assert (kinds == Kind.FAULT_SWAPPED).sum() == stats["faults_swapped"]
    assert (kinds == Kind.FAULT_WP).sum() == stats["faults_wp"]
    # Every page of the 32 MiB mapping was first touched once, by a write,
    # inside a recorded region.
    fresh = records[kinds == Kind.FAULT_FRESH]
    (lo, hi), = [(lo, hi) for lo, hi in run.regions if hi - lo >= PAGES]
    mine = fresh[(fresh["vpn"] >= lo) & (fresh["vpn"] < hi)]
    assert len(np.unique(mine["vpn"])) == len(mine) == PAGES
    assert (mine["flags"] & 1).all()
    # Time runs forward, in microseconds since the start.
    assert (np.diff(records["time"]) >= 0).all() and 0 < records["time"][-1] < 120e6


@pytest.mark.timeout(120)
def test_replay_compares_policies_and_budgets(recorded):
    trace, stats = recorded
    rows = {r["policy"]: r for r in replay(trace, "--policy", "none", "--policy", "readahead:maximum=32",
                                           "--policy", "reuse")}
    assert list(rows) == ["recorded", "none+fifo", "readahead:maximum=32+fifo", "none+reuse"]
    missing = stats["faults_fresh"] + stats["faults_swapped"]
    # (counted as a replay counts: a write-protect fault is a hit, on a resident page)
    assert rows["recorded"]["faults"] == missing and rows["recorded"]["evicted"] == stats["pages_out"]
    assert rows["recorded"]["hit_rate"] == pytest.approx(1 - missing / (missing + stats["faults_wp"]))
    # The recorded setup replayed takes the recorded faults (the simulation
    # differs from the daemon in batching only).
    as_recorded = rows["none+fifo"]
    assert abs(as_recorded["faults"] - missing) <= 0.02 * missing
    assert abs(as_recorded["from_swap"] - stats["faults_swapped"]) <= 0.02 * stats["faults_swapped"]
    assert as_recorded["read_bytes"] == as_recorded["from_swap"] * 4096
    # Readahead turns this scan's faults into prefetches that are used.
    ahead = rows["readahead:maximum=32+fifo"]
    assert ahead["faults"] < as_recorded["faults"] / 10
    assert ahead["prefetch_used"] > 0.9 * ahead["prefetched"] > 0
    # With room for everything, a page faults once and nothing is written.
    roomy = {r["policy"]: r for r in replay(trace, "--policy", "none", "--max-resident", "64M")}["none+fifo"]
    assert PAGES <= roomy["faults"] < PAGES + 256
    assert roomy["from_swap"] == roomy["written_bytes"] == 0
    assert roomy["hit_rate"] == pytest.approx(1 - roomy["faults"] / sum(stats[k] for k in
                                                                        ("faults_fresh", "faults_swapped", "faults_wp")))
    table = umgr("replay", str(trace), "--policy", "none", "--policy", "readahead").stdout
    assert table.splitlines()[0].split()[:3] == ["POLICY", "FAULTS", "HIT"] and len(table.splitlines()) == 4


def test_replay_refuses_bad_input_in_one_line(recorded, tmp_path):
    trace, _ = recorded
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a trace at all")
    for args, message in [((str(junk),), "not a umgr trace"),
                          ((str(tmp_path / "absent"),), "No such file"),
                          ((str(trace), "--policy", "lru"), "unknown policy 'lru'; installed: fifo, none"),
                          ((str(trace), "--policy", "readahead:bogus=1"), "bogus"),
                          ((str(trace), "--policy", "readahead:maximum"), "not KEY=VALUE"),
                          ((str(trace), "--policy", "none+readahead"), "'none+readahead' names two prefetch "
                                                                        "policies (none, readahead)"),
                          ((str(trace), "--policy", "fifo+reuse"), "names two eviction policies")]:
        done = umgr("replay", *args)
        assert done.returncode == 125 and message in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_record_trace_output_is_checked_before_the_program_runs(tmp_path):
    marker = tmp_path / "ran"
    done = umgr("exec", "--record-trace", str(tmp_path / "no" / "such" / "dir"), "--", "touch", str(marker))
    assert done.returncode == 125 and "--record-trace" in done.stderr and "is not a directory" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_policy_options_reach_the_policies(tmp_path, programs, umgr_exec):
    """A window of one page prefetches one page per fault, where readahead's
    default window grows to 64; a bad option is refused before the run."""
    scan = [programs["pattern"], "16", "mmap", "s"]
    default = umgr_exec(scan, "--policy", "readahead", max_resident="64M")
    narrow = umgr_exec(scan, "--policy", "readahead", "--policy-opt", "initial=1", "--policy-opt", "maximum=1",
                       "--eviction", "reuse", "--eviction-opt", "hot_share=0.5", max_resident="64M")
    assert default.returncode == narrow.returncode == 0, default.stderr + narrow.stderr
    assert default.stats["prefetched"] > 10 * default.stats["faults"]
    assert 0 < narrow.stats["prefetched"] <= narrow.stats["faults"]
    marker = tmp_path / "ran"
    bad = umgr("exec", "--policy-opt", "bogus=1", "--", "touch", str(marker))
    assert bad.returncode == 125 and "bogus" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_policies_lists_every_installed_policy():
    done = umgr("policies")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()}
    assert listed == {"none": "prefetch", "readahead": "prefetch", "stride": "prefetch",
                      "fifo": "eviction", "reuse": "eviction"}
    assert "maximum=256" in done.stdout  # options, with their defaults
    # Every built-in is in the entry-point group too (pyproject.toml).
    assert set(listed) <= {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def test_trace_format_round_trip(tmp_path):
    """Records read back as written; the 32-bit time wraps, and CLOCK
    records give read_trace the full time."""
    path = tmp_path / "t.trace"
    writer = TraceWriter(str(path), {"policy": "none"})
    target = writer.target(1234, 2048)
    target.region(0x1000, 16)
    writer._started -= 3 * CLOCK_EVERY * 1000  # as if the run began 3 * 2**31 us ago
    late = (time.monotonic_ns() - writer._started) // 1000
    target.faults(_PageStates(), [(0x1000 << 12, 1), (0x1001 << 12, 0)])
    target.evicted(np.arange(0x1000, 0x1000 + 70000, dtype=np.int64))  # more than a buffer's worth
    target.budget(512)   # `umgr budget` while it ran: recorded; a replay runs at the first
    writer.close()
    meta, records = read_trace(str(path))
    assert meta == {"policy": "none", "format": FORMAT} and records.dtype.names[:len(RECORD.names)] == RECORD.names
    assert path.stat().st_size % 16 == 0
    kinds = records["kind"].tolist()
    assert kinds[:4] == [Kind.CLOCK, Kind.TARGET, Kind.BUDGET, Kind.REGION]
    faults = records[np.isin(records["kind"], FAULTS)]
    assert faults["vpn"].tolist() == [0x1000, 0x1001] and faults["flags"].tolist() == [1, 0]
    assert faults["kind"].tolist() == [Kind.FAULT_FRESH, Kind.FAULT_FRESH]
    assert late <= faults["time"][0] < late + 10e6 and faults["time"][0] > 1 << 32
    assert (records["kind"] == Kind.EVICT).sum() == 70000
    assert records[records["kind"] == Kind.BUDGET]["vpn"].tolist() == [2048, 512]
    (run,) = target_runs(records)
    assert (run.pid, run.budget_pages, run.regions, run.evictions) == (1234, 2048, [(0x1000, 0x1010)], 70000)


def test_a_trace_of_a_later_format_is_refused_and_one_without_a_format_read(tmp_path):
    """Records of a later format may mean what this umgr does not know: a
    clear refusal, not a replay of wrong kinds. A trace written before
    `format` existed (format 1) is read."""
    def trace_with(meta: dict):
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.trace"
        text = json.dumps(meta).encode()
        size = HEADER.size + len(text)
        size += -size % RECORD.itemsize
        path.write_bytes(HEADER.pack(MAGIC, size, RECORD.itemsize) + text.ljust(size - HEADER.size)
                         + np.zeros(3, RECORD).tobytes())
        return str(path)

    meta, records = read_trace(trace_with({"policy": "none"}))
    assert meta == {"policy": "none"} and len(records) == 3
    with pytest.raises(TraceError, match=f"format {FORMAT + 1}, from a later umgr; this one reads up to format {FORMAT}"):
        read_trace(trace_with({"format": FORMAT + 1}))
    with pytest.raises(TraceError, match="not a JSON object"):
        read_trace(trace_with([1, 2]))


class _PageStates:
    """A page table where every page is FRESH (the format test's faults)."""

    def state_of(self, vpn: int) -> int:
        from umgr.paging.pagetable import State
        return State.FRESH


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode, kind", [("dontneed", Kind.GONE), ("mremap", Kind.MOVED)])
def test_a_replay_follows_what_the_app_did_to_its_memory(tmp_path, programs, mode, kind):
    """`lifecycle` discards a quarter of its 32 MiB (MADV_DONTNEED), or
    mremaps it all away, while most of it is paged out, then reads it all:
    the trace has what it did (GONE, MOVED), and the recorded setup
    replayed reads from swap what the run read from swap (a replay that did
    not know read the discarded pages back from swap, and took the moved
    ones as pages never touched)."""
    trace, stats = tmp_path / "run.trace", tmp_path / "stats.json"
    done = umgr("exec", "--max-resident", "8M", "--swap-size", "256M", "--policy", "none", "--eviction", "fifo",
                "--record-trace", str(trace), "--stats-json", str(stats), "--", programs["lifecycle"], mode, "32")
    assert done.returncode == 0, done.stderr
    stats = json.loads(stats.read_text())
    _, records = read_trace(str(trace))
    assert (records["kind"] == kind).sum() >= 1
    (run,) = target_runs(records)
    assert any(event[1] == kind for event in run.events)
    row = {r["policy"]: r for r in replay(trace, "--policy", "none")}["none+fifo"]
    assert stats["faults_swapped"] > 4096, stats   # (most of it was out when the app did it)
    assert abs(row["from_swap"] - stats["faults_swapped"]) <= 0.02 * stats["faults_swapped"], (row, stats)
