"""Process life-cycle events on memory that is paged out when they happen:
fork (shared, refcounted slots), munmap of a hole, mremap move+grow+shrink,
mremap moves racing eviction, the app's own MADV_DONTNEED (also of pages
being evicted), and exit. The program checks every byte; here we check that
pages really left and that no slot is left over."""
import pytest

MODES = {
    # mode: the counter that proves the event reached the daemon
    "fork": "forks",
    "munmap": "unmaps",
    "mremap": "remaps",
    "mremap-race": "remaps",   # 24 moves while eviction batches are in flight
    "dontneed": "app_removes",
    "dontneed-race": "app_removes",  # the app discards pages while they are being evicted
    "exit": None,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_event_on_paged_out_memory(umgr_exec, programs, mode):
    result = umgr_exec([programs["lifecycle"], mode, "64"], max_resident="16M")
    assert result.returncode == 0, result.stderr
    stats = result.stats
    assert stats["pages_out"] >= (64 - 16) * 256, "pages must really have left before the event"
    if MODES[mode]:
        assert stats[MODES[mode]] >= 1
    assert stats["swap_slots_in_use_at_exit"] == 0, "every slot is freed once all targets are gone"
    if mode == "fork":
        assert stats["targets"] == 2 and stats["pages_in"] > 0
