"""Memory whose zap would free nothing is never evicted (issue 4, item 7):
pages on the kernel's shared zero page, pages shared copy-on-write with a
forked child, mlocked pages; nor are pages pinned for I/O, whose zap would
lose a device's writes. The program checks every byte; here we check
that the daemon recognised each kind and that the budget still held."""
import ctypes
import json
import os
import subprocess
import sys

import pytest

BUDGET = 16 << 20
SLACK = 2 << 20


@pytest.mark.timeout(120)
def test_zero_page_pages_are_not_counted_or_written(umgr_exec, programs):
    # 64 MiB read while fresh (the zero page), then the first half written.
    result = umgr_exec([programs["unfreeable"], "zero", "64"], max_resident="16M")
    assert result.returncode == 0, result.stderr
    stats = result.stats
    assert stats["zero_mapped"] >= 12 * 256, "read-only fresh pages found on the zero page"
    assert stats["faults_wp"] >= 32 * 256 * 3 // 4, "writes to zero-page pages fault and are counted"
    assert stats["pages_out"] > 0 and stats["peak_resident_bytes"] <= BUDGET + SLACK
    # The zero half is never evicted (not even as a "zero" page): it holds no memory.
    assert stats["zero_pages_out"] < 256
    assert stats["swap_slots_in_use_at_exit"] == 0


@pytest.mark.timeout(120)
def test_mlocked_pages_are_pinned_then_released_by_munlock(umgr_exec, programs):
    result = umgr_exec([programs["unfreeable"], "mlock", "64"], "-v", max_resident="16M")
    assert result.returncode == 0, result.stderr
    stats = result.stats
    assert stats["locked_pinned"] >= 1024, "the 4 MiB mlocked range is pinned"
    assert "mlocked: pinned" in result.stderr
    assert "cannot page it out" not in result.stderr, "4 MiB locked is not worth a warning"
    assert "zap stopped" not in result.stderr, "no eviction keeps failing on locked pages"
    assert stats["pages_out"] >= 2 * (64 - 16) * 256
    assert stats["peak_resident_bytes"] <= BUDGET + SLACK
    assert stats["swap_slots_in_use_at_exit"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["moved", "zapped"])
def test_a_zap_stopped_by_locked_pages_keeps_the_pages_it_emptied(umgr_exec, programs, how):
    # Eviction runs that cross from unlocked pages into mlocked ones: the
    # kernel empties the unlocked part of a range, then refuses the locked
    # mapping and counts nothing of that range. Those pages' copies are all
    # that is left of them: the program reads every byte back.
    options = ["-v"] + (["--no-move-out"] if how == "zapped" else [])
    result = umgr_exec([programs["unfreeable"], "mlock-late", "64"], *options, max_resident="16M")
    assert result.returncode == 0, result.stderr[-4000:]
    stats = result.stats
    assert stats["locked_pinned"] >= 512, stats
    assert stats["pages_out"] >= (64 + 32 - 16) * 256 - 1000, stats
    assert "zap stopped" not in result.stderr, "the pages a zap emptied are not taken for pages it left"
    assert stats["swap_slots_in_use_at_exit"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mappings", ["one", "split"])
def test_pages_pinned_for_io_stay_in_memory_and_get_the_devices_writes(umgr_exec, programs, tmp_path, mappings):
    # io_uring's registered buffer (4 MiB, pinned) in a region far over
    # the budget: the agent cannot move its pages out (EBUSY), and a zap
    # would leave a later READ_FIXED's data in pages the program no longer
    # sees. They stay, and the program reads the file's bytes there.
    # "split": the region is 32 mappings, and a move across the end of one
    # is refused (EINVAL); the agent moves such runs a part at a time, as
    # a zap of the rest of the batch took the buffer's pages with it.
    program = [programs["pinned"], "64", str(tmp_path / "file")] + (["split"] if mappings == "split" else [])
    result = umgr_exec(program, "-v", max_resident="16M")
    assert result.returncode == 0, result.stderr[-4000:]
    stats = result.stats
    assert stats["busy_pinned"] >= 1024, stats
    assert stats["pages_out"] >= (64 - 16 - 4) * 256 and stats["zap_ranges"] == 0, stats
    assert "pinned for I/O" in result.stderr
    assert stats["swap_slots_in_use_at_exit"] == 0


class ThreadStop:
    """One thread of another process held in a ptrace stop (the rest of
    its process runs on), until resume()."""
    PTRACE_DETACH, PTRACE_SEIZE, PTRACE_INTERRUPT = 17, 0x4206, 0x4207
    WALL = 0x40000000

    def __init__(self, tid: int):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self.tid = tid
        self._call(self.PTRACE_SEIZE)
        self._call(self.PTRACE_INTERRUPT)
        os.waitpid(tid, self.WALL)

    def _call(self, request: int) -> None:
        if self.libc.ptrace(request, self.tid, None, None) != 0:
            raise OSError(ctypes.get_errno(), f"ptrace {request} of thread {self.tid}")

    def resume(self) -> None:
        self._call(self.PTRACE_DETACH)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pages", [16, 80])
def test_a_page_a_device_writes_during_its_eviction_keeps_what_it_wrote(programs, tmp_path, pages):
    # An I/O pin taken before the daemon write-protects a page lets the
    # device write it after the daemon's copy; dropped before the agent's
    # move, nothing stopped the move, and the page left with its old copy.
    # io_uring's READ_FIXED from a pipe is the device; the agent thread is
    # held (ptrace) so that the write lands between copy and move
    # (tests/programs/devicewrite.c says how). The agent's check of each
    # moved page against its copy's hash finds them, and they stay. 80:
    # more than the agent keeps at once (64); it stops its move there, and
    # the rest of the batch stays resident.
    stats_file = tmp_path / "stats.json"
    proc = subprocess.Popen([sys.executable, "-m", "umgr", "exec", "--max-resident", "16M", "--swap-size", "1G",
                             "--stats-json", str(stats_file), "-v", "--", programs["devicewrite"], str(pages)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        word, tid = proc.stdout.readline().split()
        assert word == "agent" and int(tid) > 0, "the program found its umgr agent thread"
        stopped = ThreadStop(int(tid))
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "landed\n"
        stopped.resume()
        stopped = None
        proc.stdin.write("resumed\n")
        proc.stdin.flush()
        _, stderr = proc.communicate(timeout=60)
    finally:
        if stopped is not None:
            stopped.resume()
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    stats = json.loads(stats_file.read_text())
    assert stats["device_written"] == min(pages, 64), "the buffer's pages moved were found written by the device"
    assert stats["cold_evicted"] >= 56 + pages and stats["pages_in"] >= pages, "and it left, and came back, after that"
    assert stats["swap_slots_in_use_at_exit"] == 0


@pytest.mark.timeout(120)
def test_memory_locked_past_the_budget_is_told_once_and_paged_once_unlocked(umgr_exec, programs):
    # 48 MiB mlocked under 16 MiB: the budget cannot hold, and the program's
    # user hears it without -v; unlocked, the pages go as any others.
    result = umgr_exec([programs["unfreeable"], "mlock-all", "48"], max_resident="16M")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "so umgr cannot page it out" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "budget of 16M" in warnings[0], result.stderr
    stats = result.stats
    assert stats["locked_pinned"] >= (48 - 16) * 256
    assert stats["pages_out"] >= (48 - 16) * 256   # after munlock
    assert stats["swap_slots_in_use_at_exit"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["shared", "shared-clean"])
def test_pages_shared_with_a_forked_child_are_not_evicted(umgr_exec, programs, mode):
    # The child holds the parent's first 64 MiB shared while the parent
    # writes 64 MiB more: the parent's budget must hold without evicting
    # (pointlessly) the pages it shares. In shared-clean the parent's
    # resident pages at the fork were read back from swap (clean copies):
    # before any fork such pages are known to be the target's own, and no
    # pagemap read checks them; after it they must be checked again.
    result = umgr_exec([programs["unfreeable"], mode, "64"], max_resident="16M")
    assert result.returncode == 0, result.stderr
    stats = result.stats
    assert stats["targets"] == 2
    if mode == "shared-clean":
        assert stats["pages_in"] >= (64 - 16) * 256, "the first region came back from swap before the fork"
    # The parent had 16 MiB (4096 pages) resident at the fork: half of them at least.
    assert stats["shared_skipped"] >= 8 * 256, "victims shared with the child were recognised"
    assert stats["pages_out"] >= (64 - 16) * 256 * 2
    assert stats["peak_resident_bytes"] <= BUDGET + SLACK
    assert stats["swap_slots_in_use_at_exit"] == 0
