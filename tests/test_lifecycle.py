"""Process life-cycle events on memory that is paged out when they happen:
fork (shared, refcounted slots), munmap of a hole, mremap move+grow+shrink,
the app's own MADV_DONTNEED, and exit. The program checks every byte; here
we check that pages really left and that no slot is left over."""
import pytest

MODES = {
    # mode: the counter that proves the event reached the daemon
    "fork": "forks",
    "munmap": "unmaps",
    "mremap": "remaps",
    "dontneed": "app_removes",
    "exit": None,
}


KNOWN_HANG = pytest.mark.xfail(
    run=False, strict=False,
    reason="known bug, under investigation: mremap move+grow of paged-out memory sometimes leaves "
           "one fault read but never answered (target hangs); about 4 runs in 5 on an idle machine")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", [m if m != "mremap" else pytest.param(m, marks=KNOWN_HANG) for m in MODES])
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
