"""Memory whose zap would free nothing is never evicted (issue 4, item 7):
pages on the kernel's shared zero page, pages shared copy-on-write with a
forked child, mlocked pages; nor are pages pinned for I/O, whose zap would
lose a device's writes. The program checks every byte; here we check
that the daemon recognised each kind and that the budget still held."""
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
