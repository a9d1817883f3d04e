"""`umgr exec` on C and Python programs whose data is 8x their budget:
every byte is checked by the program; pages must really have left."""
import re

import pytest

MiB = 1 << 20
BUDGET = 16 * MiB


@pytest.mark.timeout(180)
@pytest.mark.parametrize("passes,threads", [("s", 1), ("r", 1), ("b", 1), ("srb", 8)])
def test_c_pattern_eight_times_budget(umgr_exec, programs, passes, threads):
    result = umgr_exec([programs["pattern"], "128", "mmap", passes, str(threads)], max_resident="16M")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok 32768 pages")
    stats = result.stats
    assert stats["pages_out"] >= (128 - 16) * MiB // 4096
    assert stats["pages_in"] > 0 and stats["swap_bytes_written"] > 0
    assert stats["peak_resident_bytes"] <= BUDGET + 2 * MiB
    # The program's own RSS at the end: the managed part within budget, plus
    # what is not managed (libc, stacks, page tables: ~2-9 MiB here).
    rss_kb = int(re.search(r"rss_kb (\d+)", result.stdout).group(1))
    assert rss_kb * 1024 <= BUDGET + 12 * MiB
    assert stats["swap_slots_in_use_at_exit"] == 0
