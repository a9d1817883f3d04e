"""`umgr exec --backend compressed` on a real program whose data is 4x its
budget and compresses as a heap does: every byte checked by the program,
the stats prove the pages left for the compressed tier (and, chained, the
file) and came back."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import children

MiB = 1 << 20
PAGE = 4096

# Pages by number mod 8: 3 random (incompressible), 7 one repeated word
# (same-filled), the rest text records. Written in order, then checked in
# a shuffled order (PASSES times, default once).
HEAP_LIKE = r"""
import hashlib, os, random, sys

def page(p):
    if p % 8 == 3:
        return hashlib.shake_128(p.to_bytes(8, "little")).digest(4096)
    if p % 8 == 7:
        return (p * 0x9E3779B97F4A7C15 % (1 << 64)).to_bytes(8, "little") * 512
    line = b"record %d: name=alpha%d, value=%d; " % (p, p % 97, p * 31 % 1000)
    return (line * (4096 // len(line) + 1))[:4096]

npages = int(sys.argv[1]) * 1024 * 1024 // 4096
data = bytearray(npages * 4096)
for p in range(npages):
    data[p * 4096:(p + 1) * 4096] = page(p)
order = list(range(npages))
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 1
stop = sys.argv[3] if len(sys.argv) > 3 else None   # and on until a round starts with this file there
done = 0
while True:
    last = done + 1 >= rounds and (stop is None or os.path.exists(stop))
    random.shuffle(order)
    for p in order:
        if data[p * 4096:(p + 1) * 4096] != page(p):
            sys.exit(f"page {p} differs")
    done += 1
    if last:
        break
print("OK", npages)
"""


def explain(result) -> str:
    return f"exit {result.returncode}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-4000:]}\nstats: {result.stats}"


def tiers(result) -> dict:
    return {tier["tier"]: tier for tier in result.stats["backend_tiers"]}


@pytest.mark.timeout(120)
# Chained, the tier's 512 KiB hold a fraction of the pages: it demotes.
@pytest.mark.parametrize("backends", [["compressed"], ["compressed:cap=512K", "file"]], ids=["alone", "chained"])
def test_heap_like_program_32m_in_8m(umgr_exec, tmp_path, backends):
    script = tmp_path / "heap_like.py"
    script.write_text(HEAP_LIKE)
    options = [arg for spec in backends for arg in ("--backend", spec)]
    result = umgr_exec([sys.executable, str(script), "32"], *options, max_resident="8M", timeout=100)
    assert result.returncode == 0, explain(result)
    assert result.stdout.strip() == f"OK {32 * MiB // PAGE}", explain(result)
    stats = result.stats
    # The bytearray is found by the maps scan: allow for its 50 ms of slack.
    assert stats["pages_out"] >= (32 - 8 - 8) * MiB // PAGE, explain(result)
    assert stats["swap_slots_in_use_at_exit"] == 0, explain(result)
    compressed = tiers(result)["compressed"]
    # Pages went to the compressed tier first (evictions of pages read back
    # and not written since keep their copy and write nothing: clean copies).
    assert compressed["pages_written"] >= (32 - 8 - 8) * MiB // PAGE // 2, explain(result)
    assert compressed["pages_written"] >= stats["swap_bytes_written"] // PAGE // 2, explain(result)
    assert compressed["pages_read"] > 0 and compressed["incompressible_pages"] > 0, explain(result)
    assert compressed["pages"] == 0 and compressed["used_bytes"] == 0, explain(result)   # all freed at exit
    # The fault path's C call unpacks them itself (and reads the file's):
    # the old build served only fresh pages and writes there, 10% of these.
    assert stats["faults_fast"] >= 0.8 * stats["faults_swapped"], explain(result)
    if "file" in tiers(result):
        assert compressed["demoted_pages"] > 0, explain(result)
        assert tiers(result)["file"]["pages_read"] > 0, explain(result)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backends", [["compressed"], ["compressed:cap=2M", "file"]], ids=["alone", "chained"])
def test_a_daemon_killed_at_random_moments_finds_the_compressed_store_intact(tmp_path, backends):
    """umgr exec holds the compressed store's memfd: its daemon, SIGKILLed
    at random moments while the heap-like program fills and checks 48 MiB
    under 8 MiB (batches packed, entries installed and dropped, pages
    unpacked: whatever it was doing), is started again, takes the store
    over and the program back, and the program checks every byte, once
    more after the last kill. Each kill comes with pages in the store.
    UMGR_TEST_SEED replays a run."""
    from conftest import wait_for
    seed = int(os.environ.get("UMGR_TEST_SEED", time.time_ns() % 1000000))
    rng = random.Random(seed)
    script = tmp_path / "heap_like.py"
    script.write_text(HEAP_LIKE)
    state, stats, stop = tmp_path / "state", tmp_path / "stats.json", tmp_path / "stop"
    cmd = [sys.executable, "-m", "umgr", "exec", "--max-resident", "8M", "--swap-size", "1G", "--state-dir",
           str(state), "--stats-json", str(stats), *(f"--backend={spec}" for spec in backends), "--",
           sys.executable, str(script), "48", "1", str(stop)]
    umgr = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kills = 0
    try:
        # (The daemon is a fork of umgr exec: its command line names the script too.)
        program = wait_for(lambda: umgr.poll() is not None or [p for p in children(umgr.pid)
                                                               if cmdline(p).startswith(f"{sys.executable} {script}")],
                           20, "the program")
        program = program[0] if isinstance(program, list) else 0
        for _ in range(3):
            sock = wait_for(lambda: umgr.poll() is not None or next(iter(state.glob("exec-*/control.sock")), None),
                            20, "the socket")
            # Taken back (the shim found this daemon: it retries with backoff), with pages in the store.
            wait_for(lambda: umgr.poll() is not None or (serves(sock, program) and stored(sock) > 1000), 30,
                     f"the program served with pages out (seed {seed})")
            time.sleep(rng.uniform(0.1, 0.6))
            daemon = [p for p in children(umgr.pid) if p != program]
            if umgr.poll() is not None or not daemon or program not in children(umgr.pid):
                break
            os.kill(daemon[0], signal.SIGKILL)
            kills += 1
            wait_for(lambda: daemon[0] not in children(umgr.pid), 10, "the daemon to die")
        stop.touch()
        out, err = umgr.communicate(timeout=150)
    finally:
        if umgr.poll() is None:
            umgr.kill()
            umgr.communicate()
    assert umgr.returncode == 0, (seed, err[-3000:])
    assert out.strip() == f"OK {48 * MiB // PAGE}".encode(), (seed, out, err[-3000:])
    assert kills == 3, (seed, err[-3000:])   # (the program checks on until told to stop)
    assert err.count(b"restarting it") == kills and err.count(b"taken back by the umgr daemon") == kills, (seed, err)
    figures = json.loads(stats.read_text())
    assert figures["daemon_restarts"] == kills and figures["swap_slots_in_use_at_exit"] == 0, figures


def stored(sock: str) -> int:
    """Pages in the store of the daemon at sock (0 when it does not answer)."""
    return status_of(sock).get("backend", {}).get("used_pages", 0)


def serves(sock: str, pid: int) -> bool:
    return any(t["pid"] == pid for t in status_of(sock).get("targets", []))


def status_of(sock: str) -> dict:
    from umgr.cli import query_status
    try:
        return query_status(str(sock))
    except (OSError, ValueError):
        return {}


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
