"""`umgr exec --backend compressed` on a real program whose data is 4x its
budget and compresses as a heap does: every byte checked by the program,
the stats prove the pages left for the compressed tier (and, chained, the
file) and came back."""
from __future__ import annotations

import sys

import pytest

MiB = 1 << 20
PAGE = 4096

# Pages by number mod 8: 3 random (incompressible), 7 one repeated word
# (same-filled), the rest text records. Written in order, checked in a
# shuffled order, twice.
HEAP_LIKE = r"""
import hashlib, random, sys

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
random.shuffle(order)
for p in order:
    if data[p * 4096:(p + 1) * 4096] != page(p):
        sys.exit(f"page {p} differs")
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
