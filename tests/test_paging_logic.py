"""Unit tests for the paging engine's pure logic: what the kernel tests only
reach through timing (REMOVE attribution, the clean-part split, the order
runs are copied in, the water marks, the read gate) and the one counter list."""
from __future__ import annotations

import errno
import socket
import threading
import time

import numpy as np
import pytest
import trio
import trio.testing

from umgr import protocol
from umgr.daemon.status import SUMMED, Totals
from umgr.metrics import EXPORTED, FAULT_KINDS
from umgr.paging.budget import Budget
from umgr.paging.core import Share
from umgr.paging.faults import clean_parts, runs_faulting_last
from umgr.paging.readgate import ReadGate
from umgr.paging.removes import RemoveAttribution
from umgr.paging.stats import COUNTERS, TargetStats
from umgr.paging.tuning import EVICT_BATCH, EVICT_BATCH_MAX, RUSHED_TAIL_SHARE
from umgr.paging.zap import AgentZapper


# ---- REMOVE attribution ---------------------------------------------------------
def zap(*vpns: int) -> RemoveAttribution:
    attribution = RemoveAttribution()
    attribution.begin(np.array(vpns, np.int64))
    return attribution


def test_no_zap_in_flight_means_the_app():
    assert not RemoveAttribution().count(10, 12)


def test_each_run_of_the_zap_is_ours_once():
    attribution = zap(10, 11, 12, 20, 21)
    assert attribution.count(10, 13)
    assert attribution.count(20, 22)
    assert list(attribution.end()) == []
    assert not attribution.active


def test_a_second_cover_is_the_apps_and_its_pages_read_zero():
    attribution = zap(10, 11, 12)
    assert attribution.count(10, 13)       # the zap's own event
    assert not attribution.count(11, 12)   # the app discards page 11 too
    assert list(attribution.end()) == [11]


def test_the_app_first_then_the_zap():
    # The event does not say whose it is: the app's discard, read first,
    # looks like the zap's; the zap's own event then covers page 11 twice.
    # Either way round, page 11 is the one that must read zero.
    attribution = zap(10, 11, 12)
    attribution.count(11, 12)
    assert not attribution.count(10, 13)
    assert list(attribution.end()) == [11]


def test_an_event_reaching_outside_the_zap_is_the_apps():
    attribution = zap(10, 11)
    assert not attribution.count(9, 12)
    assert list(attribution.end()) == []   # covered once each: still the zap's copies


def test_the_kernels_repeated_tail_after_a_vma_split_is_not_a_discard():
    attribution = zap(*range(10, 20))
    assert attribution.count(10, 20)
    assert attribution.count(15, 20)       # same end, later start: the kernel's repeat
    assert list(attribution.end()) == []


def test_a_batch_of_events_is_attributed_as_one_by_one():
    """count_many() (a zap's events read in a batch, attributed with array
    operations when they are disjoint) answers as count() in order, and
    leaves the same pages discarded, whatever the batch holds: the zap's
    own runs, the app's discards inside and across them, repeats, and the
    kernel's repeated tails."""
    rng = np.random.default_rng(7)
    for trial in range(300):
        vpns = np.unique(rng.integers(0, 200, rng.integers(1, 60)))
        starts, ends = [], []
        run_start = vpns[0]
        for prev, vpn in zip(vpns, list(vpns[1:]) + [None]):
            if vpn != prev + 1:
                starts.append(int(run_start))
                ends.append(int(prev) + 1)
                run_start = vpn
        events = list(zip(starts, ends))
        for _ in range(rng.integers(0, 4)):   # the app's discards, and the kernel's tails
            lo = int(rng.integers(0, 200))
            events.insert(int(rng.integers(0, len(events) + 1)), (lo, lo + int(rng.integers(1, 6))))
        if rng.random() < 0.3:
            lo, hi = events[int(rng.integers(0, len(events)))]
            events.append((min(lo + 1, hi - 1), hi))
        one, many = RemoveAttribution(), RemoveAttribution()
        one.begin(vpns)
        many.begin(vpns)
        expected = [one.count(lo, hi) for lo, hi in events]
        got, at = [], 0
        while at < len(events):   # batches of random sizes, as reads return them
            size = int(rng.integers(1, 8))
            got += many.count_many([lo for lo, _ in events[at:at + size]], [hi for _, hi in events[at:at + size]])
            at += size
        assert got == expected, (trial, vpns.tolist(), events)
        assert list(many.end()) == list(one.end()), trial


def test_a_zaps_own_batch_takes_the_array_path():
    attribution = zap(10, 12, 13, 20)
    assert attribution.count_many([10, 12, 20], [11, 14, 21]) == [True, True, True]
    assert attribution.count_many([12], [13]) == [False]   # a second cover: the app's
    assert list(attribution.end()) == [12]
    assert RemoveAttribution().count_many([1, 5], [2, 6]) == [False, False]


def test_pages_moved_out_raise_no_event_so_every_remove_over_them_is_the_apps():
    """The agent's UFFDIO_MOVE raises no REMOVE: during a move, each event
    over the batch is an app discard, one by one or in a batch, and its
    pages must read zero afterwards."""
    for batched in (False, True):
        attribution = RemoveAttribution()
        attribution.begin(np.array([10, 11, 12, 20], np.int64), own_events=False)
        events = [(10, 13), (20, 21), (30, 31)]   # would be the zap's own runs, and one outside
        if batched:
            got = attribution.count_many([lo for lo, _ in events], [hi for _, hi in events])
        else:
            got = [attribution.count(lo, hi) for lo, hi in events]
        assert got == [False, False, False], batched
        assert list(attribution.end()) == [10, 11, 12, 20], batched


# ---- the clean-part split ----------------------------------------------------------
# ---- the read gate (no uffd read while a move out is in flight) ---------------
def test_a_hold_waits_for_the_round_in_progress_and_keeps_the_next_out():
    gate, log = ReadGate(), []

    async def fault_loop(rounds: int):
        for i in range(rounds):
            await gate.enter()
            log.append(f"round {i}")
            await trio.sleep(0.01)   # a round awaits (a backend read) and still holds the holder off
            log.append(f"round {i} done")
            gate.leave()
            await trio.sleep(0)

    async def move():
        await trio.sleep(0.005)        # during round 0
        async with gate.hold():
            log.append("move")
            await trio.sleep(0.02)
            log.append("move done")

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fault_loop, 2)
            nursery.start_soon(move)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))   # timers in order, however slow the machine
    assert log == ["round 0", "round 0 done", "move", "move done", "round 1", "round 1 done"]


def test_the_gate_opens_when_the_last_of_two_holders_lets_go():
    gate, log = ReadGate(), []

    async def holder(name: str, seconds: float):
        async with gate.hold():
            await trio.sleep(seconds)
            log.append(name)

    async def reader():
        await trio.sleep(0.001)
        await gate.enter()
        log.append("read")
        gate.leave()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder, "short", 0.005)
            nursery.start_soon(holder, "long", 0.02)
            nursery.start_soon(reader)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert log == ["short", "long", "read"]


def test_a_hold_with_no_fault_loop_in_a_round_goes_at_once():
    gate = ReadGate()

    async def main():
        with trio.fail_after(1):
            async with gate.hold():
                pass
            await gate.enter()   # open again

    trio.run(main)


def test_without_keep_clean_a_run_is_one_writable_part():
    swapped = np.ones(4, bool)
    assert clean_parts(100, swapped, {101: False}, keep_clean=False) == [(100, 4, False)]


def test_swapped_pages_read_come_in_protected_zeros_writable():
    swapped = np.array([True, True, False, True, True])
    assert clean_parts(100, swapped, {100: False}, keep_clean=True) == [
        (100, 2, True), (102, 1, False), (103, 2, True)]


def test_a_write_fault_makes_the_whole_run_writable():
    swapped = np.ones(3, bool)
    assert clean_parts(100, swapped, {101: True}, keep_clean=True) == [(100, 3, False)]


def test_a_run_of_fresh_pages_has_no_copy_to_keep():
    assert clean_parts(100, np.zeros(3, bool), {101: False}, keep_clean=True) == [(100, 3, False)]


# ---- run ordering --------------------------------------------------------------------
def test_runs_with_a_faulting_page_are_copied_last():
    vpns = np.array([10, 11, 20, 30, 31, 32], np.int64)
    order = runs_faulting_last(vpns, {20: False})
    assert [first for first, _ in order] == [10, 30, 20]
    assert {first: (seg.start, seg.stop) for first, seg in order} == {10: (0, 2), 20: (2, 3), 30: (3, 6)}


def test_run_order_is_stable_among_equals():
    vpns = np.array([1, 5, 9], np.int64)
    assert [first for first, _ in runs_faulting_last(vpns, {})] == [1, 5, 9]


# ---- water marks ---------------------------------------------------------------------
def test_no_budget_means_no_limit():
    budget = Budget(0)
    assert not budget.over(10 ** 9) and not budget.full(10 ** 9)
    assert budget.prefetch_allowed(10 ** 9, 100)
    assert budget.room(5, otherwise=256) == 256


@pytest.mark.parametrize("pages", [32, 100, 4096, 16384, 1 << 20])
def test_marks_sit_below_the_budget_in_order(pages):
    budget = Budget(pages)
    assert 0 <= budget.low_water <= budget.high_water < pages
    assert not budget.over(budget.high_water) and budget.over(budget.high_water + 1)
    assert budget.full(pages) and not budget.full(pages - 1)
    assert 0 < budget.evict_goal(budget.high_water + 1) <= budget.batch <= EVICT_BATCH_MAX
    assert 0 <= budget.rushed_low_water <= budget.low_water
    assert 0 < budget.evict_goal(budget.high_water + 1, rushed=True) <= budget.rushed_batch <= EVICT_BATCH_MAX


@pytest.mark.parametrize("pages, batch", [(64, 512), (4096, 512), (8192, 512), (16384, 1024), (32768, 2048),
                                          (65536, 2048), (1 << 20, 2048)])
def test_a_batch_is_a_16th_of_the_budget_within_bounds(pages, batch):
    budget = Budget(pages)
    assert budget.batch == batch
    # A round takes one batch (half the budget at most) from the high mark.
    assert budget.high_water - budget.low_water == min(batch, pages // 2)
    assert budget.evict_goal(budget.high_water + 1) == min(batch, budget.high_water + 1 - budget.low_water)


@pytest.mark.parametrize("pages, headroom", [(16384, 512), (32768, 1024), (51200, 1600), (1 << 17, 2048),
                                             (1 << 20, 2048), (1 << 22, 2048)])
def test_the_headroom_is_a_32nd_of_the_budget_within_the_batches_bounds(pages, headroom):
    budget = Budget(pages)   # 64 MiB, 128 MiB, 200 MiB, 512 MiB, 4 GiB, 16 GiB
    assert pages - budget.high_water == headroom
    assert pages - budget.low_water == headroom + budget.batch
    # Bigger than the headroom below 256 MiB: a batch's fixed cost is paid
    # less often, and the target's average holding (in rounds of one batch)
    # stays close to its budget: all but the headroom and half a batch,
    # 93.75% of it at 64 and 128 MiB, more above.
    assert budget.batch >= headroom
    assert (budget.high_water + budget.low_water) / 2 >= 0.9375 * pages


def test_a_round_keeps_two_batches_in_flight_only_when_faults_outrun_one():
    budget = Budget(32768)   # 128 MiB: a headroom of 1024 pages, batches of 2048
    # Random faults: the round begins just past the high mark, one batch.
    assert budget.over(budget.high_water + 100) and not budget.rushed(budget.high_water + 100)
    # A burst used half the headroom first: a second batch goes out while
    # the first is put away, down to the rushed low mark (from 128 MiB up
    # the low mark).
    assert budget.rushed(32768 - 512)
    assert budget.rushed_low_water == budget.low_water
    assert budget.above_rushed_low(32768 - 2048) and not budget.above_rushed_low(32768 - 3072)


@pytest.mark.parametrize("pages, rushed_batch", [(64, 512), (4096, 512), (8192, 1024), (16384, 2048),
                                                 (32768, 2048), (1 << 20, 2048)])
def test_a_rushed_round_takes_batches_of_an_8th_of_the_budget_within_bounds(pages, rushed_batch):
    # Faults that outrun one batch (a first touch, a scan) wait at the
    # budget for each: there a batch's fixed cost is their time, so a
    # rushed round's batches are up to an 8th of the budget (twice a batch
    # at 32 and 64 MiB), and it goes one of them below the high mark.
    budget = Budget(pages)
    assert budget.rushed_batch == rushed_batch
    assert budget.batch <= budget.rushed_batch
    assert budget.high_water - budget.rushed_low_water == min(rushed_batch, pages // 2)
    if pages < EVICT_BATCH:
        return
    at_budget = pages - 1
    assert budget.evict_goal(at_budget, rushed=True) == rushed_batch
    assert budget.evict_goal(at_budget) == budget.batch
    # The round's last batch takes what is left above the rushed low mark,
    # and at least a quarter of a batch: a batch's fixed cost is not paid
    # for a few pages.
    assert budget.evict_goal(budget.rushed_low_water + rushed_batch // 2, rushed=True) == rushed_batch // 2
    assert budget.evict_goal(budget.rushed_low_water + 10, rushed=True) == rushed_batch // RUSHED_TAIL_SHARE
    assert budget.evict_goal(budget.high_water + 10) == budget.batch   # (a round of one batch: always a whole one)
    assert budget.above_rushed_low(budget.rushed_low_water + 1)
    assert not budget.above_rushed_low(budget.rushed_low_water)


@pytest.mark.parametrize("pages", [16, 64, 100, 256, 512, 1024, 4096, 8192, 16384, 1 << 20])
def test_a_rushed_round_s_last_batch_goes_at_most_a_quarter_of_its_span_below_its_mark(pages):
    # The last batch takes at least a quarter of the round's span (a rushed
    # batch, at most half the budget): at small budgets that quarter is of
    # half the budget, never all that is resident.
    budget = Budget(pages)
    span = budget.high_water - budget.rushed_low_water
    for above in (1, span // 8, span // 4, span // 2):
        resident = budget.rushed_low_water + max(above, 1)
        goal = budget.evict_goal(resident, rushed=True)
        assert 0 < goal <= resident
        assert resident - goal >= budget.rushed_low_water - span // RUSHED_TAIL_SHARE
        assert goal >= min(span // RUSHED_TAIL_SHARE, resident)


def test_marks_of_a_16_mib_budget():
    budget = Budget(4096)   # 16 MiB of 4 KiB pages: the headroom is a 16th
    assert budget.high_water == 4096 - 256
    assert budget.low_water == 4096 - 256 - 512
    assert budget.evict_goal(4096) == 512


def test_a_small_budget_keeps_a_minimum_headroom():
    budget = Budget(64)
    assert budget.high_water == 64 - 16
    assert budget.low_water == 64 - 16 - 32


def test_prefetch_stops_at_the_budget():
    budget = Budget(100)
    assert budget.prefetch_allowed(90, 9)
    assert not budget.prefetch_allowed(90, 10)


# ---- one counter list ----------------------------------------------------------------
def test_every_counter_reaches_stats_totals_and_metrics():
    stats = TargetStats()
    assert set(stats.counters()) == set(COUNTERS)
    assert set(SUMMED) == {"faults", *COUNTERS}
    assert set(EXPORTED) | set(FAULT_KINDS) | {"faults_missing"} == set(COUNTERS)


def test_totals_sum_counters_and_keep_the_peak():
    totals = Totals()
    snap = {key: 1 for key in SUMMED} | {"peak_resident_bytes": 10, "largest_batch_pages": 3}
    totals.add(snap)
    totals.add(snap | {"peak_resident_bytes": 4, "largest_batch_pages": 7})
    assert totals.counters["pages_in"] == 2
    assert totals.counters["peak_resident_bytes"] == 10
    assert totals.counters["largest_batch_pages"] == 7


# ---- clean copies: auto -------------------------------------------------------------
def test_auto_clean_copies_stop_when_kept_pages_get_written_and_come_back():
    from umgr.paging.cleancopies import SAMPLE_EVERY, CleanCopies
    clean = CleanCopies("auto")
    clean.came_in_clean(2000)     # reads: kept pages are not written
    assert clean.keep()
    for _ in range(1000):         # read-modify-write: every page kept is written
        clean.came_in_clean(1)
        clean.dirtied()
    assert clean.dirty_share > 0.8
    kept = sum(clean.keep() for _ in range(10 * SAMPLE_EVERY))
    assert kept == 10             # only the samples that go on measuring
    clean.came_in_clean(500)      # reads again: the share falls within a few hundred pages
    assert clean.keep()


def test_auto_clean_copies_resume_within_a_few_dozen_samples_after_writes():
    # While not keeping, only one fill in SAMPLE_EVERY is kept and measured:
    # over the last 256 samples the share took ~11k fills of reads to fall.
    from umgr.paging.cleancopies import SAMPLE_EVERY, SAMPLED_PAGES, CleanCopies
    clean = CleanCopies("auto")
    for _ in range(5000):         # read-modify-write, every page kept and written
        if clean.keep():
            clean.came_in_clean(1)
            clean.dirtied()
    assert clean.keep_period() != 1
    fills = 0
    while clean.keep_period() != 1:   # reads: the sampled pages stay clean
        fills += 1
        if clean.keep():
            clean.came_in_clean(1)
    assert fills <= SAMPLED_PAGES * SAMPLE_EVERY


def test_fixed_clean_copy_modes_do_not_adapt():
    from umgr.paging.cleancopies import CleanCopies
    always, never = CleanCopies("always"), CleanCopies("never")
    for _ in range(1000):
        always.dirtied()
    assert always.keep() and not never.keep()
    assert always.keep_period() == 1 and never.keep_period() == 0
    with pytest.raises(ValueError):
        CleanCopies("sometimes")


def test_keep_period_is_keep_for_a_run_of_fills():
    # The fast path decides once per call: every page, none, or a sample.
    from umgr.paging.cleancopies import SAMPLE_EVERY, CleanCopies
    clean = CleanCopies("auto")
    assert clean.keep_period() == 1
    for _ in range(1000):
        clean.came_in_clean(1)
        clean.dirtied()
    assert clean.keep_period() == SAMPLE_EVERY


# ---- the fast path's view of the table: which regions its C call may write ---------
def _fast_path_over(pt, budget_pages: int = 0):
    from types import SimpleNamespace

    from umgr.paging.clusternotes import ClusterNotes
    from umgr.paging.fastpath import FastPath
    from umgr.trace import NO_TRACE
    core = SimpleNamespace(pt=pt, trace=NO_TRACE, budget=Budget(budget_pages), fill_budget=Budget(budget_pages),
                           cluster_notes=ClusterNotes())
    return FastPath(core, spin=0.0)


def _c_regions(fast) -> list[tuple[int, int, int, int]]:
    """What the C call would see: (vpn, end, state pointer, slot pointer) per region."""
    from umgr.kernel.uffd import _ffi
    return [(int(c.vpn), int(c.end), int(_ffi.cast("uintptr_t", c.state)), int(_ffi.cast("uintptr_t", c.slot)))
            for c in list(fast._regions)[:fast._nregions]]


def _table_regions(pt) -> list[tuple[int, int, int, int]]:
    return [(r.vpn, r.end, r.state.ctypes.data, r.slot.ctypes.data) for r in pt.regions]


def test_the_fast_path_sees_every_region_as_the_table_has_it():
    from umgr.paging.pagetable import MemoryArrays, PageTable

    class MovingArrays(MemoryArrays):
        def holding_slots(self, region):     # what a persistent table does: arrays in a file
            region.state, region.slot = region.state.copy(), region.slot.copy()

    pt = PageTable(arrays=MovingArrays())
    fast = _fast_path_over(pt)
    assert not fast.ready()                  # no region yet
    for i in range(40):                      # more than the C array first holds: it grows
        pt.add(0x1000 * (i + 1), 256)
    assert fast.ready() and _c_regions(fast) == _table_regions(pt)
    pt.remove(0x1080, 0x1090)                # a cut: two regions where there was one
    assert fast.ready() and _c_regions(fast) == _table_regions(pt)
    region = pt.find(0x2010)
    before = region.state
    pt.set_state(0x2010, 4, slot=7)
    assert region.state is not before
    assert fast.ready() and _c_regions(fast) == _table_regions(pt)


def test_the_fast_path_notes_where_a_stream_goes_next():
    from umgr.paging.pagetable import PageTable
    fast = _fast_path_over(PageTable())
    fast.prefetching(100, np.arange(101, 109))              # ascending, step 1: next fault at 109
    fast.prefetching(500, np.arange(436, 500, 4))           # descending by 4: far end 436
    fast.prefetching(900, np.array([901, 901 + (1 << 31)]))  # a plug-in's scattered pages: not a stream
    log = fast._log
    assert [(int(log.streams[i]), int(log.stream_step[i])) for i in range(3)] == [(108, 1), (436, -4), (0, 0)]


def test_the_fast_path_stops_at_the_budget():
    from umgr.paging.pagetable import PageTable, State
    pt = PageTable()
    pt.add(0x1000, 16)
    fast = _fast_path_over(pt, budget_pages=8)
    assert fast.ready()
    pt.set(np.arange(0x1000, 0x1008), State.RESIDENT)   # the budget's 8 pages are in
    assert not fast.ready()


def test_emptied_zapping_pages_keep_their_slot_unless_the_app_discarded_them():
    """A zap's (or a move's) emptied pages: SWAPPED in their slot; one the
    app discarded meanwhile reads zero: FRESH, its slot freed and gone from
    the table (a stale slot there would be read back as its content)."""
    from types import SimpleNamespace

    from umgr.backends.slots import SlotAllocator
    from umgr.paging.core import TargetCore
    from umgr.paging.pagetable import NO_SLOT, PageTable, State

    pt = PageTable()
    pt.add(100, 8)
    slots = SlotAllocator(16)
    core = TargetCore(pid=0, label="t", uffd=None, backend=SimpleNamespace(slots=slots), budget=Budget(0),
                      eviction=None, clean_copies="never", pt=pt)
    vpns = np.arange(100, 104)
    pt.set(vpns, State.ZAPPING, slots.alloc(4))
    named = pt.slots(vpns)
    core.emptied(vpns, np.array([102]))
    assert pt.states(vpns).tolist() == [State.SWAPPED, State.SWAPPED, State.FRESH, State.SWAPPED]
    assert pt.slots(vpns).tolist() == [named[0], named[1], NO_SLOT, named[3]]
    assert slots.refs(named).tolist() == [1, 1, 0, 1] and slots.free_count == 13
    # With nothing discarded every page keeps its slot (no isin is made then).
    more = np.arange(104, 108)
    pt.set(more, State.ZAPPING, slots.alloc(4))
    core.emptied(more, np.empty(0, np.int64))
    assert pt.states(more).tolist() == [State.SWAPPED] * 4 and (pt.slots(more) != NO_SLOT).all()


def test_a_stale_missing_fault_leaves_a_present_pages_clean_copy_alone():
    """Threads that fault on one absent page each queue a MISSING message,
    and the first fill wakes them all: the others' messages are read with
    the page present, maybe EVICTING as a clean copy (taken out unread, its
    slot all it has). The zero COPY answers EEXIST and the copy must stay:
    dropped, the page left as zeros (`threads 56 8 24` under --keep-clean
    read a zero word in about one run of 13). A page absent indeed (the COPY
    placed zeros) no longer holds its copy's content: that copy goes.
    (The real uffd's side is tests/test_keep_clean.py.)"""
    import errno
    from types import SimpleNamespace

    from umgr.backends.slots import SlotAllocator
    from umgr.paging.core import TargetCore
    from umgr.paging.faults import FaultService
    from umgr.paging.pagetable import NO_SLOT, PageTable, State

    answers = []
    uffd = SimpleNamespace(copy_fast=lambda *args: answers.pop(0), wake=lambda address, length: None)
    pt = PageTable()
    pt.add(100, 8)
    slots = SlotAllocator(16)
    core = TargetCore(pid=0, label="t", uffd=uffd, backend=SimpleNamespace(slots=slots), budget=Budget(0),
                      eviction=None, clean_copies="always", pt=pt)
    faults = SimpleNamespace(core=core, _zeros=SimpleNamespace(addr=0), drain=lambda: None)
    faults._retry_eagain = lambda ioctl: FaultService._retry_eagain(faults, ioctl)
    kept = slots.alloc(3)
    pt.set(np.array([100, 101, 102]), State.EVICTING, kept)
    pt.set_state(101, State.RESIDENT)

    answers += [errno.EEXIST, errno.EEXIST]   # present after all: stale messages
    FaultService._serve_absent(faults, 100, State.EVICTING)
    FaultService._serve_absent(faults, 101, State.RESIDENT)
    assert pt.slots(np.array([100, 101])).tolist() == kept[:2].tolist()
    assert slots.refs(kept).tolist() == [1, 1, 1]
    answers += [errno.EAGAIN, 0]              # an event first, then absent indeed: zeros placed
    FaultService._serve_absent(faults, 102, State.EVICTING)
    assert pt.slot_of(102) == NO_SLOT and slots.refs(kept).tolist() == [1, 1, 0]


def test_a_fill_stops_at_an_event_read_while_it_copies():
    """A copy that answers EAGAIN because an event is queued: the event is
    read (here: the app's discard of the run), and once it is read the
    kernel lets copies through again while the app's MADV_DONTNEED has yet
    to empty the range; a copy going on could land after it, and the app
    would read the old page where it asked for zeros. So the fill copies
    nothing more, this run or the next. A short copy stopped by a present
    page (EAGAIN, no event) goes on. (Real races of discards and faults:
    tests/test_lifecycle.py, dontneed-race.)"""
    import errno
    from types import SimpleNamespace

    from umgr.backends.slots import SlotAllocator
    from umgr.paging.core import TargetCore
    from umgr.paging.faults import FaultService
    from umgr.paging.pagetable import PAGE_SHIFT, PageTable

    copies, answers = [], []

    def copy_fast(dst, src, length, mode):
        copies.append((dst >> PAGE_SHIFT, length >> PAGE_SHIFT))
        return answers.pop(0) if answers else 0

    uffd = SimpleNamespace(copy_fast=copy_fast, wake=lambda address, length: None)
    pt = PageTable()
    pt.add(100, 16)
    core = TargetCore(pid=0, label="t", uffd=uffd, backend=SimpleNamespace(slots=SlotAllocator(16)),
                      budget=Budget(0), eviction=None, clean_copies="never", pt=pt)
    faults = SimpleNamespace(core=core, _fill=SimpleNamespace(addr=0), events_read=0)
    faults._drain_and_go_on = lambda: FaultService._drain_and_go_on(faults)
    vpns = np.array([100, 101, 102, 103, 110, 111], np.int64)   # two runs
    swapped, valid = np.ones(6, bool), np.ones(6, bool)

    def read_an_event():
        faults.events_read += 1

    def read_nothing():
        pass

    faults.drain = read_nothing   # a short copy: 2 pages, then the next try goes on
    answers += [(2 << PAGE_SHIFT << 16) | errno.EAGAIN]
    done, _ = FaultService._copy_in(faults, vpns, swapped, valid, True, {})
    assert done.all() and copies == [(100, 4), (102, 2), (110, 2)], copies

    copies.clear()
    faults.drain = read_an_event   # an event: nothing more is copied
    answers += [(1 << PAGE_SHIFT << 16) | errno.EAGAIN]
    done, _ = FaultService._copy_in(faults, vpns, swapped, valid, True, {})
    assert done.tolist() == [True, False, False, False, False, False] and copies == [(100, 4)], copies


def test_a_discardable_hint_flags_only_pages_it_saw_write_protected():
    """An eviction batch's pages are EVICTING before they are protected,
    and protecting them may yield (EAGAIN). A DISCARDABLE hint meanwhile
    must not take them for protected: a write to one then goes unseen and
    the batch drops it. The hint protects every page it flags."""
    from types import SimpleNamespace

    from umgr.backends.slots import SlotAllocator
    from umgr.paging.advice import Hints
    from umgr.paging.core import TargetCore
    from umgr.paging.pagetable import PAGE_SHIFT, Flag, PageTable, State

    protected = set()

    def writeprotect(address, length, protect):
        pages = range(address >> PAGE_SHIFT, (address + length) >> PAGE_SHIFT)
        (protected.update if protect else protected.difference_update)(pages)
        return 0

    pt = PageTable()
    pt.add(100, 16)
    core = TargetCore(pid=0, label="t", uffd=SimpleNamespace(writeprotect=writeprotect),
                      backend=SimpleNamespace(slots=SlotAllocator(16)), budget=Budget(0), eviction=None,
                      clean_copies="never", pt=pt)
    pt.set(np.arange(100, 108), State.EVICTING)   # a batch whose protection has not come yet
    pt.set(np.arange(108, 112), State.RESIDENT)
    hints = Hints(core, evictor=None)
    trio.run(hints._advise_discardable, 100, 116)
    flagged = np.arange(100, 116)[pt.has_flag(np.arange(100, 116), Flag.DISCARDABLE)]
    assert flagged.tolist() == list(range(100, 112))
    assert set(flagged.tolist()) <= protected


def evictor_around(backend, clean_copies: str):
    """An Evictor of a target of 8 pages (vpns 100-107) around a real
    store, with a uffd whose write-protect calls all succeed: (its page
    table, core, evictor)."""
    from types import SimpleNamespace

    from umgr.paging.core import TargetCore
    from umgr.paging.evictor import Evictor
    from umgr.paging.pagetable import PageTable
    from umgr.policies import GuardedEviction
    from umgr.policies.fifo import FifoEviction

    pt = PageTable()
    pt.add(100, 8)
    uffd = SimpleNamespace(writeprotect_runs=lambda starts, lengths, protect: (len(starts), 0))
    core = TargetCore(pid=0, label="t", uffd=uffd, backend=backend, budget=Budget(0),
                      eviction=GuardedEviction(FifoEviction()), clean_copies=clean_copies, pt=pt)
    return pt, core, Evictor(core, pinning=None, removes=None)

def test_a_write_that_could_not_all_be_submitted_sets_its_slots_aside(tmp_path):
    """io_uring may refuse a request part way through a batch, with the
    ones before it already in the kernel: the file store says the write may
    still land (BackendError.may_land), and the evictor keeps the batch
    resident without freeing its slots, which a later page could otherwise
    get and then find overwritten. (The real ring: test_backend_conformance.)"""
    from umgr.backends.file import FileBackend
    from umgr.errors import BackendError
    from umgr.kernel.buffers import PageBuffer
    from umgr.paging.evictor import BatchReleased
    from umgr.paging.pagetable import State

    backend = FileBackend(size=1 << 20, directory=str(tmp_path / "state"))
    try:
        async def refuse(batch):
            raise OSError(12, "Cannot allocate memory")
        backend.ring.submit_and_wait = refuse
        buf = PageBuffer(4)
        slots = backend.slots.alloc(4)
        with pytest.raises(BackendError) as raised:
            trio.run(backend.write, slots, buf.addrs(np.arange(4)))
        assert raised.value.may_land
        backend.slots.free(slots)

        pt, core, evictor = evictor_around(backend, "never")
        vpns = np.arange(100, 104)
        pt.set(vpns, State.EVICTING)
        with pytest.raises(BatchReleased):
            trio.run(evictor._write, vpns, np.ones(4, bool), buf.addrs(np.arange(4)))
        assert backend.slots.used == 4, "the slots it may still write are not handed out again"
        assert (pt.states(vpns) == State.RESIDENT).all()
    finally:
        backend.close()


def test_a_store_short_of_a_batch_takes_what_it_has_room_for_and_warns_once(tmp_path, caplog):
    """A store with fewer free slots than a batch needs stores as many pages
    as it has slots for and keeps the rest resident, and eviction pauses
    (before, it took none of the batch, and every retry write-protected and
    copied a whole batch for nothing). A pause is warned of once a minute at
    most, however often the daemon retries. (A real program:
    test_swap_full.)"""
    import logging

    from umgr.backends.file import FileBackend
    from umgr.kernel.buffers import PageBuffer
    from umgr.paging.evictor import BatchReleased
    from umgr.paging.pagetable import State

    backend = FileBackend(size=8 << 12, directory=str(tmp_path / "state"))
    try:
        taken = backend.slots.alloc(5)   # 3 of 8 left
        pt, core, evictor = evictor_around(backend, "never")
        vpns = np.arange(100, 105)
        pt.set(vpns, State.EVICTING)
        buf = PageBuffer(5)
        for page in range(5):
            buf.bytes[page * 4096:(page + 1) * 4096] = page + 1
        caplog.set_level(logging.INFO, logger="umgr.target")

        async def store(store):
            store = await evictor._fit_in_store(vpns, store)
            return store, await evictor._write(vpns, store, buf.addrs(np.flatnonzero(store)))

        kept, slots = trio.run(store, np.ones(5, bool))
        assert kept.tolist() == [True] * 3 + [False] * 2 and backend.slots.free_count == 0
        assert pt.states(vpns).tolist() == [State.EVICTING] * 3 + [State.RESIDENT] * 2
        assert core.eviction_paused.startswith("swap full")
        back = PageBuffer(3)
        trio.run(backend.read, slots, back.addrs(np.arange(3)))
        assert (back.bytes.reshape(3, 4096) == np.array([[1], [2], [3]], np.uint8)).all()

        # Retried with no slot free: the batch stays resident, nothing is told again.
        evictor.resume()
        pt.set(vpns[3:], State.EVICTING)
        with pytest.raises(BatchReleased):
            trio.run(store, np.array([False] * 3 + [True] * 2))
        assert (pt.states(vpns[3:]) == State.RESIDENT).all() and core.eviction_paused
        assert len([r for r in caplog.records if "swap full" in r.getMessage()]) == 1
        # Slots freed, a batch stored, the store full again: still once.
        backend.slots.free(taken)
        evictor.resume()
        pt.set(vpns[3:], State.EVICTING)
        trio.run(store, np.array([False] * 3 + [True] * 2))
        assert not core.eviction_paused
        backend.slots.alloc(backend.slots.free_count)
        evictor.resume()
        pt.set(vpns[3:], State.EVICTING)
        with pytest.raises(BatchReleased):
            trio.run(store, np.array([False] * 3 + [True] * 2))
        assert len([r for r in caplog.records if "swap full" in r.getMessage()]) == 1
    finally:
        backend.close()


def test_a_compressed_store_at_its_cap_pauses_as_a_full_one_and_its_clean_copies_give_their_room_back(monkeypatch):
    """The compressed store alone, at its memory cap, is out of room, not
    failing: the pause drops the clean copies (whose entries held the
    room; kept, nothing freed any while the program only read) and keeps
    none until eviction resumes, which it tries again after
    BACKEND_RETRY_SECONDS (a retry packs a batch), not at each freed slot."""
    from umgr.backends.compressed import CompressedBackend
    from umgr.kernel.buffers import PageBuffer
    from umgr.paging import evictor as evictor_module
    from umgr.paging.core import STORE_FULL
    from umgr.paging.evictor import BatchReleased
    from umgr.paging.pagetable import State
    from umgr.paging.tuning import BACKEND_RETRY_SECONDS

    clock = [100.0]
    monkeypatch.setattr(evictor_module.time, "monotonic", lambda: clock[0])
    store = CompressedBackend(size=1 << 20, cap=6 * 4096)
    try:
        buf = PageBuffer(8)
        rng = np.random.default_rng(3)
        buf.bytes[:] = rng.integers(0, 256, len(buf.bytes), dtype=np.uint8)   # incompressible
        pt, core, evictor = evictor_around(store, "always")
        kept = store.slots.alloc(4)   # four pages read back as clean copies: their entries hold the cap
        trio.run(store.write, kept, buf.addrs(np.arange(4)))
        pt.set(np.arange(100, 104), State.RESIDENT, kept)
        vpns = np.arange(104, 108)
        pt.set(vpns, State.EVICTING)
        held = store.held_bytes
        with pytest.raises(BatchReleased):
            trio.run(evictor._write, vpns, np.ones(4, bool), buf.addrs(np.arange(4, 8)))
        assert core.eviction_paused.startswith(STORE_FULL) and core.clean.suspended
        assert core.clean.keep_period() == 0
        assert (pt.states(vpns) == State.RESIDENT).all()
        assert store.held_bytes < held and store.slots.used == 0, "the clean copies gave their room back"
        assert not evictor.resume(slots_free=True), "not at once: a retry packs a batch"
        clock[0] += BACKEND_RETRY_SECONDS * 1.01
        assert evictor.resume(slots_free=False) and not core.eviction_paused and not core.clean.suspended
    finally:
        store.close()


def test_fills_are_held_to_the_budget_but_while_no_slot_can_be_had():
    """TargetCore.fill_budget: paused on a swap with too few free slots to
    try again (room_to_resume), fills are not held to the budget (no page
    can leave, and held to it every fault came in alone); with enough free,
    paused on a store out of room of another kind (a retry may come any
    time) or on a failing one, or not paused, they are."""
    from types import SimpleNamespace

    from umgr.backends.slots import SlotAllocator
    from umgr.paging.core import BACKEND_ERROR, FULL, NO_BUDGET, STORE_FULL, TargetCore, room_to_resume
    from umgr.paging.pagetable import PageTable
    from umgr.paging.tuning import RESUME_MIN_SLOTS

    slots = SlotAllocator(4096)
    core = TargetCore(pid=0, label="t", uffd=None, backend=SimpleNamespace(slots=slots), budget=Budget(256),
                      eviction=None, clean_copies="never", pt=PageTable())
    assert core.fill_budget == core.budget
    taken = slots.alloc(4096 - (RESUME_MIN_SLOTS - 1))
    core.eviction_paused, core.pause_kind = "swap full (512 slots wanted, 63 free)", FULL
    assert not room_to_resume(slots) and core.fill_budget == NO_BUDGET
    for kind in (STORE_FULL, BACKEND_ERROR):
        core.eviction_paused, core.pause_kind = f"{kind} (...)", kind
        assert core.fill_budget == core.budget, kind
    slots.free(taken[:1])
    core.eviction_paused, core.pause_kind = "swap full (512 slots wanted, 64 free)", FULL
    assert room_to_resume(slots) and core.fill_budget == core.budget
    small = SlotAllocator(40)   # a store under 512 slots resumes at an eighth of it free
    small.alloc(35)
    assert room_to_resume(small)
    small.alloc(1)
    assert not room_to_resume(small)


def test_busy_pages_wait_longer_each_time_they_come_back_busy(monkeypatch):
    """Pages a move found busy (pinned for I/O) are tried again after a
    second, then after twice as long each time they come back busy soon
    after a try (each try reads and stores them again; io_uring keeps its
    registered buffers pinned for the ring's life), and after a quiet
    while from a second again."""
    from types import SimpleNamespace

    from umgr.backends.slots import SlotAllocator
    from umgr.paging import pinning as pinning_module
    from umgr.paging.core import TargetCore
    from umgr.paging.pagetable import PageTable, State
    from umgr.policies import GuardedEviction
    from umgr.policies.fifo import FifoEviction

    clock = [0.0]
    monkeypatch.setattr(pinning_module.time, "monotonic", lambda: clock[0])
    uffd = SimpleNamespace(writeprotect_runs=lambda starts, lengths, protect: (len(starts), 0))
    pt = PageTable()
    pt.add(100, 4)
    pt.add(104, 4)   # (two regions: the table's lookups want sorted vpns)
    core = TargetCore(pid=0, label="t", uffd=uffd, backend=SimpleNamespace(slots=SlotAllocator(16)),
                      budget=Budget(0), eviction=GuardedEviction(FifoEviction()), clean_copies="never", pt=pt)
    pinning = pinning_module.Pinning(core)
    busy = np.arange(100, 104)

    def busy_again(at: float) -> None:
        clock[0] = at
        pt.set(busy, State.ZAPPING)
        trio.run(pinning.pin_busy, busy)
        assert (pt.states(busy) == State.PINNED).all()

    def tried_at(at: float) -> bool:
        clock[0] = at
        pinning._rechecked = -1e9   # (recheck's own pace is not what is tested)
        pinning.recheck()
        return bool((pt.states(busy) == State.RESIDENT).all())

    busy_again(0.0)
    assert not tried_at(0.9) and tried_at(1.0)
    busy_again(1.1)                 # busy again at once: 2 s
    assert not tried_at(3.0) and tried_at(3.1)
    busy_again(3.2)                 # 4 s
    assert not tried_at(7.1) and tried_at(7.2)
    busy_again(100.0)               # after a quiet while: 1 s again
    assert tried_at(101.0)
    # Two batches' busy pages, the later one lower: all are tried again.
    clock[0] = 200.0
    pt.set(np.arange(100, 108), State.ZAPPING)
    trio.run(pinning.pin_busy, np.arange(104, 108))
    trio.run(pinning.pin_busy, np.arange(100, 104))
    clock[0] = 201.0
    pinning._rechecked = -1e9
    pinning.recheck()
    assert (pt.states(np.arange(100, 108)) == State.RESIDENT).all()


def test_victims_in_a_batch_in_flight_are_found_as_isin_finds_them():
    """Evictor._among (searchsorted on two sorted arrays) against np.isin,
    edges included: before the first, past the last, equal ends."""
    from umgr.paging.evictor import _among

    rng = np.random.default_rng(7)
    for _ in range(200):
        vpns = np.unique(rng.integers(0, 64, rng.integers(1, 40)))
        others = np.unique(rng.integers(0, 64, rng.integers(1, 40)))
        assert (_among(vpns, others) == np.isin(vpns, others)).all(), (vpns, others)
    assert _among(np.array([0, 5, 9]), np.array([5])).tolist() == [False, True, False]


def test_a_share_speaks_of_the_latest_events_once_there_are_enough():
    # (The bar a lone fault's block must clear: the share of faults that
    # brought back a page evicted less than a resident set ago.)
    share = Share()
    share.count(63, 63)
    assert share.percent(unknown=100) == 100   # too few to judge: the caller's answer
    share.count(1, 0)
    assert share.percent(unknown=100) == 98
    for _ in range(100):   # a long run of far refaults outweighs what came before
        share.count(64, 0)
    assert share.events <= Share.MEMORY and share.percent(unknown=100) <= 2


def test_a_prefetch_window_takes_a_16th_of_a_small_budget_nearest_the_fault_first():
    # (At 4 MiB, four threads' windows of 256 pages pushed out each other's
    # before use: tests/programs/threads.c took 30-60 s instead of 2, one run in 15.)
    up, down = np.arange(101, 357), np.arange(0, 100)
    assert Budget(1024).window(100, up).tolist() == list(range(101, 165))     # 64 pages, ascending
    assert Budget(1024).window(100, down).tolist() == list(range(36, 100))    # the 64 below, not the far end
    assert Budget(4096).window(100, up) is up and Budget(0).window(100, up) is up
    # Never one page: a strided stream's window says its step (of 3 here).
    assert Budget(20).window(100, np.arange(103, 200, 3)).tolist() == [103, 106]


def test_windows_cut_to_the_room_under_the_budget_keep_the_pages_nearest_their_faults():
    from umgr.paging.budget import nearest_first
    up, down = (100, np.arange(101, 111)), (500, np.arange(490, 500))   # an ascending and a descending stream
    assert nearest_first([up, down], 100).tolist() == list(range(101, 111)) + list(range(490, 500))
    # Room for 6: the 3 nearest of each, not the 6 lowest (the far end of the descending one's).
    assert nearest_first([up, down], 6).tolist() == [101, 102, 103, 497, 498, 499]
    assert nearest_first([down], 4).tolist() == [496, 497, 498, 499]
    assert nearest_first([up, (105, np.arange(106, 110))], 3).tolist() == [101, 102, 106]   # (a page in both: once)
    assert nearest_first([up], 0).tolist() == [] and nearest_first([], 5).tolist() == []


# ---- an orphaned fork's claim by birth time --------------------------------------
def test_a_fork_is_claimed_by_a_child_born_about_when_its_event_was_stamped():
    from umgr.daemon.forks import BORN_AFTER_STAMP, BORN_BEFORE_STAMP, TICK, could_be_its_fork
    stamp = 1000.0
    # The daemon stamps the event after copying the table (later than the
    # birth), or the parent runs again late and the child is born after it.
    assert could_be_its_fork(stamp, stamp - 0.5) and could_be_its_fork(stamp, stamp - BORN_BEFORE_STAMP)
    assert could_be_its_fork(stamp, stamp + 0.05) and could_be_its_fork(stamp, stamp + BORN_AFTER_STAMP)
    # Start times are whole ticks, rounded down: a tick either way more.
    assert could_be_its_fork(stamp, stamp + BORN_AFTER_STAMP + TICK / 2)
    # Farther off it is another child's.
    assert not could_be_its_fork(stamp, stamp - BORN_BEFORE_STAMP - 2 * TICK)
    assert not could_be_its_fork(stamp, stamp + BORN_AFTER_STAMP + 2 * TICK)


# ---- the agent's conversation -------------------------------------------------------
def _done(seq: int, nbytes: int, changed: int = 0, changed_at: int = 0) -> bytes:
    return protocol.ZAP_DONE.pack(protocol.MAGIC, protocol.MsgType.ZAP_DONE, protocol.ZAP_DONE.size, seq, 0, nbytes,
                                  changed, 0, changed_at)


def _hashes(lengths) -> np.ndarray:
    return np.zeros(int(np.sum(lengths)) >> 12, np.uint64)


async def _no_changed_pages(changed_at: int, count: int):
    raise AssertionError("no page changed")


def test_an_answer_already_there_is_read_with_no_schedule_point():
    # A move out holds its target's uffd unread until the answer is read;
    # a schedule point there let every other task (other targets' rounds)
    # run first. Only a wait for the socket may yield. (The agent's end
    # answered before the request: the first request's seq is 1.)
    ours, agents = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    agents.send(_done(1, 8192))

    async def main():
        zapper = AgentZapper(ours)   # (a trio socket: made and closed in the loop)
        try:
            with trio.testing.assert_no_checkpoints():
                moved = await zapper.move_out(np.array([1 << 30], np.uint64), np.array([8192], np.uint64),
                                              _hashes([8192]), _no_changed_pages)
                return moved.bytes, moved.error
        finally:
            zapper.close()

    with agents:
        assert trio.run(main) == (8192, 0)
        assert protocol.ZAP_HEAD.unpack_from(agents.recv(1 << 16))[1] == protocol.MsgType.MOVE_OUT


def _talk(agent, main):
    """main(zapper)'s result, run by trio while agent(its socket end) answers
    in a thread, as the shim's agent does."""
    ours, agents = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    async def run():
        zapper = AgentZapper(ours)   # (a trio socket: made and closed in the loop)
        try:
            with trio.fail_after(5):
                return await main(zapper)
        finally:
            zapper.close()

    thread = threading.Thread(target=agent, args=(agents,), daemon=True)
    thread.start()
    with agents:
        try:
            return trio.run(run)
        finally:
            thread.join(5)
            assert not thread.is_alive()


def _seq_of(request: bytes) -> int:
    return protocol.ZAP_HEAD.unpack_from(request)[3]


def test_an_answer_not_there_yet_is_waited_for():
    def agent(sock):
        seq = _seq_of(sock.recv(1 << 16))
        time.sleep(0.05)
        sock.send(_done(seq, 4096))

    async def main(zapper):
        return await zapper.zap(np.array([1 << 30], np.uint64), np.array([4096], np.uint64))

    assert _talk(agent, main) == 4096


def test_the_answer_of_a_cancelled_request_is_not_taken_for_the_next():
    # A move out cancelled while it waited (its target stopping) leaves the
    # agent's answer on the way; the next request reads and drops it first.
    cancelled = threading.Event()

    def agent(sock):
        first = _seq_of(sock.recv(1 << 16))
        cancelled.wait(5)
        sock.send(_done(first, 4096))   # late: its request was given up
        sock.send(_done(_seq_of(sock.recv(1 << 16)), 8192))

    async def main(zapper):
        with trio.move_on_after(0.05):
            await zapper.move_out(np.array([1 << 30], np.uint64), np.array([4096], np.uint64), _hashes([4096]),
                                  _no_changed_pages)
        cancelled.set()
        moved = await zapper.move_out(np.array([1 << 31], np.uint64), np.array([8192], np.uint64),
                                      _hashes([8192]), _no_changed_pages)
        return moved.bytes, moved.error

    assert _talk(agent, main) == (8192, 0)


def test_a_move_reads_the_changed_pages_of_each_request_before_the_next():
    # The agent's changed-page area is reused by its next MOVE_OUT: a move
    # split in two requests (more ranges than one carries) has the first
    # one's changed pages read before the second is sent, each named by
    # its index among all the pages of the move.
    ranges = protocol.ZAP_MAX_RANGES + 2
    starts = (np.arange(ranges, dtype=np.uint64) * 2 + 1) << 30   # (one page each, apart)
    lengths = np.full(ranges, 4096, np.uint64)
    sent, read = [], []

    def agent(sock):
        for changed_at in (0xA000, 0xB000):
            request = sock.recv(1 << 20)
            count = protocol.ZAP_HEAD.unpack_from(request)[4]
            hashes = np.frombuffer(request, "<u8", offset=protocol.ZAP_HEAD.size + 16 * count)
            sent.append((count, hashes.copy(), len(read)))
            sock.send(_done(_seq_of(request), count * 4096, changed=1, changed_at=changed_at))

    async def read_changed(changed_at: int, count: int):
        read.append(changed_at)
        return np.array([1 if changed_at == 0xA000 else 0], np.int64), f"content at {changed_at:x}"

    async def main(zapper):
        return await zapper.move_out(starts, lengths, np.arange(1, ranges + 1, dtype=np.uint64), read_changed)

    moved = _talk(agent, main)
    assert [(count, list(hashes[:2]), reads) for count, hashes, reads in sent] == [
        (protocol.ZAP_MAX_RANGES, [1, 2], 0), (2, [protocol.ZAP_MAX_RANGES + 1, protocol.ZAP_MAX_RANGES + 2], 1)]
    assert (moved.bytes, moved.error) == (ranges * 4096, 0)
    assert [(list(at), content) for at, content in moved.changed] == [
        ([1], "content at a000"), ([protocol.ZAP_MAX_RANGES], "content at b000")]


def test_an_agent_naming_a_changed_page_it_did_not_move_is_refused():
    def agent(sock):
        sock.send(_done(_seq_of(sock.recv(1 << 16)), 4096, changed=1, changed_at=0xA000))

    async def read_changed(changed_at: int, count: int):
        return np.array([1], np.int64), None   # the second page: it moved one

    async def main(zapper):
        await zapper.move_out(np.array([1 << 30], np.uint64), np.array([8192], np.uint64), _hashes([8192]),
                              read_changed)

    with pytest.raises(protocol.ProtocolError):
        _talk(agent, main)


def test_a_device_written_page_that_cannot_go_back_in_leaves_with_what_the_device_wrote(tmp_path):
    """Evictor._keep_device_writes: a page that UFFDIO_COPY put back in is
    resident with no slot; one it could not (EAGAIN: an event of the app's
    queued, unread under the read gate) is written with the device's
    content: over its stale copy where the slot is its own, to a new slot
    where it has none (a zero page) or a fork shares it. It settles SWAPPED
    with the rest of its move. With no slot left the target is given up
    (BackendError), never served the stale copy. (The kernel's side:
    test_unfreeable's device test.)"""
    import errno as errno_module
    from types import SimpleNamespace

    from umgr.backends.file import FileBackend
    from umgr.errors import BackendError
    from umgr.kernel.buffers import PageBuffer
    from umgr.paging.core import TargetCore
    from umgr.paging.evictor import Evictor
    from umgr.paging.pagetable import NO_SLOT, PageTable, State
    from umgr.policies import GuardedEviction
    from umgr.policies.fifo import FifoEviction

    backend = FileBackend(size=16 << 12, directory=str(tmp_path / "state"))
    try:
        refused = {101, 102, 103}   # the vpns whose copy back meets EAGAIN
        uffd = SimpleNamespace(
            copy_fast=lambda dst, src, length, mode: errno_module.EAGAIN if dst >> 12 in refused else 0,
            wake=lambda start, length: None)
        pt = PageTable()
        pt.add(100, 8)
        core = TargetCore(pid=0, label="t", uffd=uffd, backend=backend, budget=Budget(0),
                          eviction=GuardedEviction(FifoEviction()), clean_copies="never", pt=pt)
        vpns = np.array([100, 101, 102, 103])
        stale = backend.slots.alloc(3)
        backend.slots.incref(stale[2:])   # 102's is shared with a forked child
        pt.set(vpns, State.ZAPPING, np.append(stale, NO_SLOT))   # 103 went out as a zero page
        content = PageBuffer(4)
        for page in range(4):
            content.bytes[page * 4096:(page + 1) * 4096] = page + 1
        evictor = Evictor(core, pinning=None, removes=None)
        trio.run(evictor._keep_device_writes, vpns, content)
        assert pt.states(vpns).tolist() == [State.RESIDENT] + [State.ZAPPING] * 3
        assert pt.slots(vpns[:1])[0] == NO_SLOT and core.stats.device_written == 4
        slots = pt.slots(vpns[1:])
        assert slots[0] == stale[1], "its own slot is written over"
        assert slots[1] not in stale and backend.slots.refs(stale[2:])[0] == 1, "a shared one is left to the child"
        assert slots[2] != NO_SLOT
        assert backend.slots.used == 4, "the first page's stale copy is freed"
        back = PageBuffer(3)
        trio.run(backend.read, slots, back.addrs(np.arange(3)))
        assert (back.bytes.reshape(3, 4096) == np.array([[2], [3], [4]], np.uint8)).all(), "what the device wrote"

        backend.slots.alloc(backend.slots.capacity - backend.slots.used)   # the store full
        pt.set(vpns[3:], State.ZAPPING, np.array([NO_SLOT]))
        with pytest.raises(BackendError, match="device wrote"):
            trio.run(evictor._keep_device_writes, vpns[3:], content)
    finally:
        backend.close()


def test_changed_pages_are_named_among_the_whole_batch_when_a_busy_run_was_skipped():
    # _move_around_busy sends what is left of the batch after a busy run
    # (vpns[at:], with its hashes): the pages a device changed come back
    # named among that rest, and are named among the whole batch.
    from types import SimpleNamespace

    from umgr.paging.evictor import Evictor
    from umgr.paging.zap import Moved

    calls = []

    class Zapper:
        moves = True

        async def move_out(self, starts, lengths, hashes, read_changed):
            calls.append(hashes.tolist())
            if len(calls) == 1:   # the first run moves, the second is busy
                return Moved(int(lengths[0]), errno.EBUSY, [(np.array([1]), "first")])
            return Moved(int(lengths.sum()), 0, [(np.array([0, 2]), "second")])

    evictor = Evictor(SimpleNamespace(zapper=Zapper()), pinning=None, removes=None)
    vpns = np.array([10, 11, 12, 20, 21, 30, 31, 32])   # three runs
    moved, busy, error, changed = trio.run(evictor._move_around_busy, vpns, np.arange(1, 9, dtype=np.uint64))
    assert calls == [list(range(1, 9)), [6, 7, 8]]
    assert moved.tolist() == [1, 1, 1, 0, 0, 1, 1, 1] and busy.tolist() == [0, 0, 0, 1, 1, 0, 0, 0] and error == 0
    assert [(at.tolist(), content) for at, content in changed] == [([1], "first"), ([5, 7], "second")]


def test_the_prefetch_policy_hears_of_a_fault_when_no_window_may_come():
    """At the budget (or with the fill full) no window comes, but the
    policy still hears of the fault, as from the C fast path and in an
    offline replay: it was not told, and its streams went stale."""
    from types import SimpleNamespace

    from umgr.paging.faults import FaultService
    from umgr.paging.pagetable import PageTable

    heard = []
    pt = PageTable()
    pt.add(100, 8)
    budget = SimpleNamespace(prefetch_allowed=lambda resident, filling: False)
    faults = SimpleNamespace(core=SimpleNamespace(pt=pt, fill_budget=budget),
                             prefetch=SimpleNamespace(on_fault=lambda *fault: heard.append(fault) or []))
    FaultService._plan_prefetch(faults, 103, {103: -1})
    assert heard == [(103, 100, 108)]


def test_pages_moved_by_mremap_are_queued_for_eviction_once():
    """mremap moves an EVICTING page and a RESIDENT one: each is queued
    once at its new address (the EVICTING one, back to RESIDENT, was queued
    twice: a duplicate entry could evict it again early)."""
    from types import SimpleNamespace

    from umgr.backends.slots import SlotAllocator
    from umgr.kernel.uffd import RemapEvent
    from umgr.paging.core import TargetCore
    from umgr.paging.events import MemoryEvents
    from umgr.paging.pagetable import NO_SLOT, PageTable, State

    queued = []
    eviction = SimpleNamespace(on_resident=lambda vpns: queued.extend(vpns.tolist()), on_removed=lambda vpns: None)
    pt = PageTable()
    pt.add(100, 4)
    slots = SlotAllocator(16)
    core = TargetCore(pid=0, label="t", uffd=None, backend=SimpleNamespace(slots=slots), budget=Budget(0),
                      eviction=eviction, clean_copies="always", pt=pt)
    pt.set(np.array([100]), State.EVICTING, slots.alloc(1))
    pt.set(np.array([101]), State.RESIDENT, np.array([NO_SLOT], np.int32))
    events = SimpleNamespace(core=core, removes=SimpleNamespace(active=False))
    MemoryEvents._on_remap(events, RemapEvent(100 << 12, 200 << 12, 4 << 12))
    assert sorted(queued) == [200, 201]
    assert pt.states(np.array([200, 201])).tolist() == [State.RESIDENT, State.RESIDENT]


def test_what_a_fast_call_served_before_its_read_failed_is_settled():
    """The C call served faults, then its read of the uffd failed (a FORK
    event with no descriptor left for the child's uffd: EMFILE): what it
    served is settled before the error goes on (its freed slots stayed
    counted as used for the daemon's life)."""
    from types import SimpleNamespace

    from umgr.errors import UffdError
    from umgr.paging.faults import FaultService

    settled = []

    def serve():
        raise UffdError(24, "read of the uffd failed")

    faults = SimpleNamespace(fast=SimpleNamespace(colocated=lambda: False, serve=serve, finish_background=None),
                             _settle_fast=lambda: settled.append(True) or [])
    faults._settled_if_failed = lambda call, **options: FaultService._settled_if_failed(faults, call, **options)
    with pytest.raises(UffdError):
        FaultService._serve_fast(faults)
    assert settled == [True]


def test_inside_matches_a_test_against_each_range():
    """pinning._inside (a binary search over merged ranges) says what a test
    of each vpn against each [lo, hi) range says: overlapping, touching,
    empty and unsorted ranges included."""
    import random

    from umgr.paging.pinning import _inside

    def each_range(vpns, ranges):
        inside = np.zeros(len(vpns), bool)
        for lo, hi in ranges:
            inside |= (vpns >= lo) & (vpns < hi)
        return inside

    rng = random.Random(7)
    for _ in range(2000):
        ranges = [(lo, lo + rng.randint(0, 12)) for lo in (rng.randint(0, 60) for _ in range(rng.randint(0, 8)))]
        vpns = np.array(sorted(rng.sample(range(90), rng.randint(0, 40))), np.int64)
        assert (_inside(vpns, ranges) == each_range(vpns, ranges)).all(), (ranges, vpns)


def test_a_full_slot_reference_count_is_refused_not_wrapped():
    """A slot's count is 16 bits: one more reference than it holds would
    wrap it to 0, the slot free while pages still name it."""
    from umgr.backends.slots import SlotAllocator
    slots = SlotAllocator(16)
    got = slots.alloc(2)
    slots.incref(np.array([got[0], got[0], got[1]]))   # (a slot named twice counts twice)
    assert slots._refs[got].tolist() == [3, 2]
    slots._refs[got[1]] = np.iinfo(slots._refs.dtype).max
    with pytest.raises(ValueError, match="reference count is full"):
        slots.incref(np.array([got[0], got[1]]))
    assert slots._refs[got[0]] == 3   # (nothing taken)


def test_the_least_budget_keeps_its_marks_above_zero():
    """Below MIN_BUDGET_BYTES the high mark fell to zero or below (a 1-page
    budget: -15): every page was evicted as it came in."""
    from umgr.paging.budget import MIN_BUDGET_BYTES, Budget
    least = Budget(MIN_BUDGET_BYTES >> 12)
    assert 0 < least.low_water < least.high_water < least.pages
