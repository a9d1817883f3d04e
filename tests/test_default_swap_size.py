"""Without --swap-size the swap file takes 4 GiB, or half the space free
where it goes if that is less: the README's first command works on a small
disk, and a disk with no room for a useful file is a one-line error."""
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager

import pytest

from umgr.backends.file import DEFAULT_SIZE, default_size

MiB = 1 << 20
PAGE = 4096


def test_default_size_is_four_gib_or_half_the_free_space():
    assert default_size(100 << 30) == DEFAULT_SIZE
    assert default_size(2 * DEFAULT_SIZE) == DEFAULT_SIZE
    assert default_size(3 << 30) == 3 << 29
    assert default_size(100 * MiB + 12345) == 50 * MiB   # whole MiB
    assert default_size(0) == 0


@contextmanager
def small_filesystem(path, size: str):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def exec_without_swap_size(tmp_path, state_dir, program):
    stats_file = tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "umgr", "exec", "-v", "--state-dir", str(state_dir), "--max-resident", "8M",
           "--stats-json", str(stats_file), "--", *program]
    proc = subprocess.run(cmd, capture_output=True, timeout=100)
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    return proc, stats


@pytest.mark.timeout(120)
def test_a_small_disk_gets_a_smaller_swap_file_and_pages_go_out_and_back(tmp_path, programs):
    # 160 MiB free: the default 4 GiB would not fit (it failed with "cannot
    # preallocate"); half of it does, and 48 MiB under 8 MiB page through it.
    with small_filesystem(tmp_path / "small", "160m") as small:
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        proc, stats = exec_without_swap_size(tmp_path, small / "state", [programs["pattern"], "48", "mmap", "srb"])
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, stderr
    said = re.search(r"swap file: (\d+) MiB, half the (\d+) MiB free in ", stderr)
    assert said, stderr
    assert int(said[1]) == default_size(int(said[2]) << 20) >> 20 and int(said[2]) << 20 <= free, said[0]
    assert stats["pages_out"] >= (48 - 8) * MiB // PAGE, stats   # (pattern checked every byte that came back)
    assert stats["pages_in"] > 0, stats


@pytest.mark.timeout(60)
def test_a_disk_with_no_room_for_a_swap_file_is_a_clear_error(tmp_path, programs):
    with small_filesystem(tmp_path / "tiny", "24m") as tiny:
        proc, _ = exec_without_swap_size(tmp_path, tiny / "state", [programs["pattern"], "4"])
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0
    assert "no room for a swap file in" in stderr and "MiB free" in stderr, stderr
    assert "Traceback" not in stderr, stderr
