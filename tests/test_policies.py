"""Policy plug-ins: pure logic, no kernel."""

import logging

import numpy as np
import pytest

from umgr.policies import (
    EvictionPolicy,
    GuardedEviction,
    GuardedPrefetch,
    PrefetchPolicy,
    load_eviction,
    load_prefetch,
)
from umgr.policies.fifo import FifoEviction
from umgr.policies.none import NoPrefetch
from umgr.policies.readahead import Readahead
from umgr.policies.replay import replay, replay_eviction, replay_paging
from umgr.policies.reuse import ReuseEviction
from umgr.policies.stride import Stride

REGION = (0, 1 << 20)


def drive(policy, vpns, region=REGION):
    """The pages a policy returns for each fault, through the guard."""
    guarded = GuardedPrefetch(policy, target="test")
    return [guarded.on_fault(v, *region) for v in vpns]


# --- readahead ---------------------------------------------------------------

def test_readahead_window_doubles_on_sequential_faults_up_to_maximum():
    ra = Readahead()
    # A prefetched page that is used does not fault, so a sequential scan
    # faults on the page just past the previous window.
    vpn, sizes = 1000, []
    for _ in range(10):
        pages = GuardedPrefetch(ra).on_fault(vpn, *REGION)
        sizes.append(len(pages))
        if len(pages):
            assert pages.tolist() == list(range(vpn + 1, vpn + 1 + len(pages)))
        vpn = vpn + len(pages) + 1
    assert sizes == [0, 4, 8, 16, 32, 64, 128, 256, 256, 256]


def test_readahead_strided_window_stops_at_strided_maximum_and_never_past_maximum():
    assert max(len(p) for p in scan(Readahead(), 1000, 2, 10)) == 64
    assert max(len(p) for p in scan(Readahead(strided_maximum=16), 1000, 3, 10)) == 16
    assert max(len(p) for p in scan(Readahead(maximum=8), 1000, 2, 10)) == 8
    with pytest.raises(ValueError):
        Readahead(strided_maximum=0)


def test_readahead_options():
    out = drive(Readahead(initial=2, maximum=8), [10, 11, 14, 19, 28])
    assert [len(p) for p in out] == [0, 2, 4, 8, 8]
    with pytest.raises(ValueError):
        Readahead(initial=16, maximum=8)


def test_the_cluster_the_fast_path_does_is_the_policys_if_it_can_do_it():
    # (umgr/paging/fastpath.py brings the block; test_fastpath.py runs it.)
    assert GuardedPrefetch(Readahead()).cluster == 8
    assert GuardedPrefetch(Readahead(cluster=0)).cluster == 0
    assert GuardedPrefetch(Stride()).cluster == GuardedPrefetch(NoPrefetch()).cluster == 0
    with pytest.raises(ValueError):
        Readahead(cluster=3)

    class Odd(PrefetchPolicy):
        cluster = 16   # more than one C call's group of pages: not done
    assert GuardedPrefetch(Odd()).cluster == 0


def test_readahead_page_by_page_scan_also_grows():
    # Fresh pages the caller did not prefetch fault one by one inside the window.
    sizes = [len(p) for p in drive(Readahead(), range(100, 108))]
    assert sizes == [0, 4, 8, 16, 32, 64, 128, 256]


def test_readahead_random_faults_prefetch_nothing():
    rng = np.random.default_rng(1)
    trace = rng.choice(1 << 20, size=2000, replace=False) * 3  # never adjacent
    assert sum(len(p) for p in drive(Readahead(), trace.tolist())) == 0


def test_readahead_non_sequential_fault_resets_to_initial():
    out = drive(Readahead(), [0, 1, 6, 15, 50_000, 50_001, 50_005])
    assert [len(p) for p in out] == [0, 4, 8, 16, 0, 4, 8]


def test_readahead_interleaved_streams_keep_their_windows():
    ra = GuardedPrefetch(Readahead())
    a, b = 0, 500_000
    sizes = []
    for _ in range(5):
        pa, pb = ra.on_fault(a, *REGION), ra.on_fault(b, *REGION)
        sizes.append((len(pa), len(pb)))
        a, b = a + len(pa) + 1, b + len(pb) + 1
    assert sizes == [(0, 0), (4, 4), (8, 8), (16, 16), (32, 32)]


def test_readahead_backward_scan_prefetches_downward():
    out = drive(Readahead(), [1000, 999, 994, 985])
    assert [p.tolist() for p in out[:3]] == [[], list(range(995, 999)), list(range(986, 994))]
    assert out[3].tolist() == list(range(969, 985))


def test_readahead_clamps_to_region():
    region = (100, 110)
    out = drive(Readahead(), [104, 105, 106], region)
    assert out[1].tolist() == [106, 107, 108, 109]
    assert out[2].tolist() == [107, 108, 109]
    down = drive(Readahead(), [105, 104, 103], region)
    assert down[1].tolist() == [100, 101, 102, 103]
    assert down[2].tolist() == [100, 101, 102]


def test_repeated_fault_on_same_page_changes_nothing():
    out = drive(Readahead(), [7, 8, 8, 13])
    assert [len(p) for p in out] == [0, 4, 0, 8]


def scan(policy, vpn, stride, faults, region=REGION):
    """The windows a policy returns for a scan by ``stride`` where every
    prefetched page is used, so the next fault is one stride past the window."""
    guarded, out = GuardedPrefetch(policy), []
    for _ in range(faults):
        pages = guarded.on_fault(vpn, *region)
        out.append(pages)
        vpn += stride * (len(pages) + 1)
    return out


def test_readahead_stride_two_prefetches_along_the_stride_with_a_growing_window():
    out = scan(Readahead(), 1000, 2, 9)
    # Two equal gaps lock the stride (third fault); then the window doubles.
    assert [len(p) for p in out] == [0, 0, 4, 8, 16, 32, 64, 64, 64]
    assert out[2].tolist() == [1006, 1008, 1010, 1012]
    assert out[3].tolist() == list(range(1016, 1032, 2))
    for pages in out[2:]:
        assert (np.diff(pages) == 2).all()


def test_readahead_backward_stride_prefetches_downward():
    out = drive(Readahead(), [5000, 4998, 4996, 4986])
    assert [p.tolist() for p in out[:3]] == [[], [], [4988, 4990, 4992, 4994]]
    assert out[3].tolist() == list(range(4970, 4986, 2))
    sizes = [len(p) for p in scan(Readahead(), 900_000, -7, 8)]
    assert sizes == [0, 0, 4, 8, 16, 32, 64, 64]


@pytest.mark.parametrize("stride, locks", [(2, True), (64, True), (65, False), (-64, True), (-65, False)])
def test_readahead_stride_limit(stride, locks):
    sizes = [len(p) for p in scan(Readahead(), 500_000, stride, 4)]
    assert sizes == ([0, 0, 4, 8] if locks else [0, 0, 0, 0])


def test_readahead_stride_needs_two_equal_gaps_and_max_stride_1_is_sequential_only():
    assert [len(p) for p in drive(Readahead(), [0, 2, 5, 9, 14, 20])] == [0] * 6
    assert [len(p) for p in scan(Readahead(max_stride=1), 0, 2, 5)] == [0] * 5
    with pytest.raises(ValueError):
        Readahead(max_stride=0)


def test_readahead_stride_window_clamps_to_region():
    region = (100, 120)
    out = drive(Readahead(), [104, 107, 110, 113], region)
    assert out[2].tolist() == [113, 116, 119]
    assert out[3].tolist() == [116, 119]
    down = drive(Readahead(), [110, 108, 106], region)
    assert down[2].tolist() == [100, 102, 104]


def test_readahead_stride_fault_inside_the_window_keeps_the_stream():
    # A page of the window evicted before use faults again: the stream goes on.
    out = drive(Readahead(), [0, 3, 6, 12, 39, 90])  # 12 is inside [9, 18]
    assert [len(p) for p in out] == [0, 0, 4, 8, 16, 32]
    assert out[4].tolist() == list(range(42, 90, 3))
    # Up to a quarter window past the window's end (4 strides of 16 here:
    # those pages were resident, so no fault) continues the stream; further,
    # or off the stride, does not.
    assert len(drive(Readahead(), [0, 3, 6, 12, 39, 102])[-1]) == 32
    assert len(drive(Readahead(), [0, 3, 6, 12, 39, 105])[-1]) == 0
    assert len(drive(Readahead(), [0, 3, 6, 12, 39, 89])[-1]) == 0


def test_readahead_scan_past_resident_pages_keeps_its_window():
    # A sequential scan through data where one page in 16 stayed resident (a
    # hot set): whenever the page just past a window is one of them, the next
    # fault comes a page later, and the window must not start over.
    ra, vpn, sizes = GuardedPrefetch(Readahead()), 10_000, []
    for i in range(12):
        pages = ra.on_fault(vpn, *REGION)
        sizes.append(len(pages))
        vpn += len(pages) + 1 + (i % 2)
    assert sizes == [0, 4, 8, 16, 32, 64, 128, 256, 256, 256, 256, 256]


def test_readahead_stride_and_sequential_streams_interleave():
    ra = GuardedPrefetch(Readahead())
    a, b, sizes = 0, 500_000, []
    for _ in range(6):
        pa, pb = ra.on_fault(a, *REGION), ra.on_fault(b, *REGION)
        sizes.append((len(pa), len(pb)))
        a, b = a + 4 * (len(pa) + 1), b + len(pb) + 1
    assert sizes == [(0, 0), (0, 4), (4, 8), (8, 16), (16, 32), (32, 64)]


def test_readahead_dense_random_faults_prefetch_little():
    # Random faults within a small range often lie within max_stride of each
    # other, yet rarely repeat a gap: few locks, small windows.
    rng = np.random.default_rng(2)
    trace = rng.integers(0, 4096, size=5000).tolist()
    out = drive(Readahead(), trace)
    assert sum(len(p) for p in out) <= 0.1 * len(trace)
    assert sum(len(p) > 0 for p in out) <= 0.03 * len(trace)


# --- stride ------------------------------------------------------------------

def test_stride_locks_after_two_equal_gaps_and_follows():
    out = drive(Stride(depth=4), [0, 10, 20, 70, 120])
    assert [p.tolist() for p in out] == [
        [], [], [30, 40, 50, 60], [80, 90, 100, 110], [130, 140, 150, 160],
    ]
    assert [len(p) for p in drive(Stride(), [0, 10, 25, 31])] == [0, 0, 0, 0]


# --- guarded wrappers --------------------------------------------------------

class Exploding(PrefetchPolicy):
    name = "exploding"

    def __init__(self):
        self.calls = 0

    def on_fault(self, vpn, region_start, region_end):
        self.calls += 1
        raise RuntimeError("boom")


def test_guard_disables_a_raising_policy_and_logs_once(caplog):
    policy = Exploding()
    guarded = GuardedPrefetch(policy, target="pid 42")
    with caplog.at_level(logging.ERROR, logger="umgr.policy"):
        for vpn in range(10):
            out = guarded.on_fault(vpn, *REGION)
            assert out.dtype == np.int64 and out.size == 0
    assert policy.calls == 1 and guarded.disabled
    records = [r for r in caplog.records if r.name == "umgr.policy"]
    assert len(records) == 1
    assert "pid 42" in records[0].getMessage() and "exploding" in records[0].getMessage()
    assert records[0].exc_info is not None


class Fixed(PrefetchPolicy):
    def __init__(self, pages):
        self.pages = pages

    def on_fault(self, vpn, region_start, region_end):
        return self.pages


def test_guard_validates_output():
    guarded = GuardedPrefetch(Fixed([5, 9, 9, 3, -1, 50, 10, 20, 7, 49]))
    out = guarded.on_fault(10, 0, 50)
    assert out.dtype == np.int64
    assert out.tolist() == [3, 5, 7, 9, 20, 49]  # sorted; no dup, no 10, in [0, 50)


def test_guard_caps_keeping_the_policys_first_choices():
    descending = np.arange(999, 899, -1)  # a backward window, nearest first
    out = GuardedPrefetch(Fixed(descending), max_pages=8).on_fault(1000, *REGION)
    assert out.tolist() == list(range(992, 1000))


def test_guard_accepts_empty_and_none_and_numpy_ints():
    assert GuardedPrefetch(Fixed([])).on_fault(1, *REGION).size == 0
    assert GuardedPrefetch(Fixed(None)).on_fault(1, *REGION).size == 0
    pages = [np.int32(2), np.uint64(3)]
    assert GuardedPrefetch(Fixed(pages)).on_fault(np.int64(1), *REGION).tolist() == [2, 3]


@pytest.mark.parametrize("bad", [[1.5, 2.0], ["3"], [object()]])
def test_guard_disables_a_policy_returning_non_integers(bad, caplog):
    guarded = GuardedPrefetch(Fixed(bad))
    with caplog.at_level(logging.ERROR, logger="umgr.policy"):
        assert guarded.on_fault(1, *REGION).size == 0
    assert guarded.disabled


def test_guard_on_faults_answers_as_on_fault_does_for_each_fault():
    faults = [1000, 1001, 1006, 5000, 5001, 5002, 7, 1015, 900]
    one_by_one = [(vpn, pages) for vpn, pages in zip(faults, drive(Readahead(), faults)) if pages.size]
    batched = GuardedPrefetch(Readahead()).on_faults((vpn, *REGION) for vpn in faults)
    assert [vpn for vpn, _ in batched] == [vpn for vpn, _ in one_by_one] == [1001, 1006, 5001, 5002, 1015]
    for (_, got), (_, expected) in zip(batched, one_by_one):
        assert got.dtype == np.int64 and got.tolist() == expected.tolist()


def test_guard_on_faults_clips_each_fault_to_its_own_region():
    guarded = GuardedPrefetch(Fixed([5, 9, 9, 3, -1, 50, 10, 20, 7, 49]))
    out = guarded.on_faults([(10, 0, 50), (20, 8, 30), (99, 0, 1)])
    assert [(vpn, pages.tolist()) for vpn, pages in out] == [(10, [3, 5, 7, 9, 20, 49]), (20, [9, 10])]


def test_guard_on_faults_disables_a_failing_policy_and_keeps_what_came_before(caplog):
    class FailsThird(PrefetchPolicy):
        calls = 0

        def on_fault(self, vpn, region_start, region_end):
            self.calls += 1
            if self.calls == 3:
                return [1.5]
            return [vpn + 1]

    policy = FailsThird()
    guarded = GuardedPrefetch(policy, target="pid 7")
    with caplog.at_level(logging.ERROR, logger="umgr.policy"):
        out = guarded.on_faults((vpn, *REGION) for vpn in (10, 20, 30, 40))
    assert [(vpn, pages.tolist()) for vpn, pages in out] == [(10, [11]), (20, [21])]
    assert guarded.disabled and policy.calls == 3
    assert guarded.on_faults([(50, *REGION)]) == [] and policy.calls == 3


def test_guard_disables_on_raising_feedback_hook():
    class BadFeedback(NoPrefetch):
        def on_prefetch_hit(self, vpn):
            raise KeyError(vpn)

    guarded = GuardedPrefetch(BadFeedback())
    guarded.on_prefetch_hit(3)
    assert guarded.disabled and guarded.on_fault(3, *REGION).size == 0


class ExplodingEviction(EvictionPolicy):
    name = "exploding"

    def on_resident(self, vpns):
        pass

    def choose(self, n):
        raise RuntimeError("boom")


def test_guarded_eviction_falls_back_to_fifo_seeded_from_page_table(caplog):
    guarded = GuardedEviction(ExplodingEviction(), target="pid 7", resident=lambda: np.arange(5, 10))
    guarded.on_resident(np.array([100, 101]))
    with caplog.at_level(logging.ERROR, logger="umgr.policy"):
        assert guarded.choose(3).tolist() == [5, 6, 7]
        assert guarded.choose(10).tolist() == [8, 9]
    assert guarded.fell_back and isinstance(guarded.policy, FifoEviction)
    assert len([r for r in caplog.records if r.name == "umgr.policy"]) == 1
    guarded.on_resident(np.array([11]))
    assert guarded.choose(5).tolist() == [11]


def test_guarded_eviction_validates_choose():
    class Sloppy(EvictionPolicy):
        def choose(self, n):
            return [4, 4, 2, 9, 8]

    assert GuardedEviction(Sloppy()).choose(3).tolist() == [4, 2, 9]   # more than asked: its first choices
    assert GuardedEviction(Sloppy()).choose(5).tolist() == [2, 4, 8, 9]   # all of them: sorted, once each
    assert GuardedEviction(Sloppy()).choose(0).size == 0


# --- FIFO --------------------------------------------------------------------

def test_fifo_order():
    fifo = FifoEviction()
    fifo.on_resident(np.array([5, 3, 9]))
    fifo.on_resident(np.array([1]))
    assert len(fifo) == 4
    assert fifo.choose(2).tolist() == [5, 3]
    assert fifo.choose(10).tolist() == [9, 1]
    assert fifo.choose(1).dtype == np.int64 and len(fifo) == 0


def test_fifo_wraparound_and_growth():
    fifo = FifoEviction(capacity=4)
    fifo.on_resident(np.arange(3))
    assert fifo.choose(2).tolist() == [0, 1]
    fifo.on_resident(np.arange(3, 6))  # wraps: head at 2, tail at 1
    assert fifo.capacity == 4
    fifo.on_resident(np.arange(6, 20))  # grows past the wrap
    assert fifo.capacity >= 18
    assert fifo.choose(3).tolist() == [2, 3, 4]
    fifo.on_resident(np.arange(20, 25))
    assert fifo.choose(100).tolist() == list(range(5, 25))


def test_fifo_compaction_keeps_live_in_order_and_bounds_growth():
    live = np.zeros(1000, dtype=bool)
    fifo = FifoEviction(capacity=8)
    fifo.on_resident(np.arange(10))
    live[[2, 5, 7]] = True
    assert fifo.compact(lambda v: live[v]) == 7
    assert fifo.choose(10).tolist() == [2, 5, 7]

    # The same 64 pages fault in again and again (unmapped in between, so
    # on_removed was never called): with is_live the queue stays small.
    live[:] = False
    live[:64] = True
    fifo = FifoEviction(capacity=128, is_live=lambda v: live[v])
    for _ in range(100):
        fifo.on_resident(np.arange(64))
    assert fifo.capacity <= 2048 and len(fifo) <= 2048
    fifo.compact()
    assert fifo.choose(100).tolist() == list(range(64))


def test_fifo_compaction_keeps_the_newest_entry_of_a_page():
    fifo = FifoEviction()
    fifo.on_resident(np.array([1, 2, 3, 2, 4, 1]))
    assert fifo.compact() == 2
    assert fifo.choose(10).tolist() == [3, 2, 4, 1]


def test_fifo_holds_millions_of_pages_in_int64():
    fifo = FifoEviction()
    fifo.on_resident(np.arange(4_000_000))
    assert fifo._buf.dtype == np.int64 and fifo._buf.nbytes <= 2 * 8 * 4_000_000
    assert fifo.choose(3).tolist() == [0, 1, 2]


# --- loading -----------------------------------------------------------------

def test_load_builtins_by_name():
    assert isinstance(load_prefetch("none"), NoPrefetch)
    ra = load_prefetch("readahead", initial=8, maximum=32)
    assert isinstance(ra, Readahead) and (ra.initial, ra.maximum) == (8, 32)
    assert isinstance(load_prefetch("stride", depth=2), Stride)
    assert isinstance(load_eviction("fifo"), FifoEviction)


def test_load_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown prefetch policy 'leap'.*none.*readahead"):
        load_prefetch("leap")
    with pytest.raises(ValueError, match=r"unknown eviction policy 'clock'.*fifo"):
        load_eviction("clock")
    with pytest.raises(ValueError, match="unknown eviction policy 'readahead'"):
        load_eviction("readahead")


def test_load_third_party_entry_point(monkeypatch):
    from importlib.metadata import EntryPoint

    import umgr.policies as policies

    eps = [EntryPoint("mine", "umgr.policies.none:NoPrefetch", policies.ENTRY_POINT_GROUP)]
    looks = []
    monkeypatch.setattr(policies.importlib.metadata, "entry_points", lambda group: looks.append(group) or eps)
    monkeypatch.setattr(policies, "_plugins", {})
    assert isinstance(load_prefetch("mine"), NoPrefetch)
    with pytest.raises(ValueError, match="not a EvictionPolicy"):
        load_eviction("mine")
    # Found once, a plug-in loads again (for each new target) without a
    # look through the entry points; a name not found is looked for anew.
    assert isinstance(load_prefetch("mine"), NoPrefetch) and len(looks) == 1
    with pytest.raises(ValueError, match="unknown prefetch policy 'yours'"):
        load_prefetch("yours")
    assert len(looks) == 2


def test_a_plug_in_factory_that_cannot_be_hashed_still_has_its_options_checked(monkeypatch):
    # Signatures are kept per factory; a callable instance without
    # __hash__ (a dataclass, say) is a factory too, read each time.
    import umgr.policies as policies

    class Factory:
        __hash__ = None

        def __call__(self, depth: int = 4):
            return NoPrefetch()

    monkeypatch.setattr(policies, "_plugins", {"unhashable": Factory()})
    assert isinstance(load_prefetch("unhashable", depth=2), NoPrefetch)
    with pytest.raises(ValueError, match="has no option 'width'"):
        load_prefetch("unhashable", width=2)


# --- offline replay ----------------------------------------------------------

def test_replay_sequential_readahead_cuts_faults_eightfold():
    trace = np.arange(10_000, 14_096)
    base = replay(NoPrefetch(), trace, resident_capacity=1024)   # room for a 256-page window
    ra = replay(Readahead(), trace, resident_capacity=1024)
    assert base.faults == 4096 and base.prefetched == 0
    assert ra.faults * 8 <= base.faults
    # The region is the trace's span, so every prefetched page gets used.
    assert ra.faults + ra.prefetched == 4096 and ra.prefetch_used == ra.prefetched


def test_replay_stride_two_readahead_cuts_faults():
    trace = np.tile(np.arange(0, 16_384, 2), 2)  # every other page, twice
    base = replay(NoPrefetch(), trace, resident_capacity=1024)
    seq_only = replay(Readahead(max_stride=1), trace, resident_capacity=1024)  # readahead before strides
    ra = replay(Readahead(), trace, resident_capacity=1024)
    assert base.faults == seq_only.faults == 16_384 and seq_only.prefetched == 0
    assert ra.faults * 32 <= base.faults
    assert ra.prefetch_used == ra.prefetched  # only pages on the stride


def test_replay_backward_stride_readahead_cuts_faults():
    trace = np.arange(50_000, 10_000, -5)
    ra = replay(Readahead(), trace, resident_capacity=512)
    assert ra.faults * 32 <= len(trace) and ra.prefetch_used == ra.prefetched


def test_replay_random_trace():
    rng = np.random.default_rng(0)
    trace = rng.integers(0, 100_000, size=5000)
    base = replay(NoPrefetch(), trace, resident_capacity=1024)
    ra = replay(Readahead(), trace, resident_capacity=1024)
    assert base.faults > 4500
    assert ra.faults <= base.faults + 10       # readahead does not make it worse
    assert ra.prefetched <= 0.05 * ra.faults   # and hardly prefetches at all


def test_replay_survives_a_raising_policy(caplog):
    with caplog.at_level(logging.ERROR, logger="umgr.policy"):
        result = replay(Exploding(), np.arange(100), resident_capacity=10)
    assert result.faults == 100 and result.prefetched == 0


def hot_set_trace(seed: int = 1, pages: int = 20_000, hot: int = 1_000, accesses: int = 60_000) -> np.ndarray:
    """90% of accesses to a scattered hot set, 10% uniform: a cache's shape."""
    rng = np.random.default_rng(seed)
    hot_pages = rng.choice(pages, size=hot, replace=False)
    in_hot = rng.random(accesses) < 0.9
    return np.where(in_hot, hot_pages[rng.integers(0, hot, accesses)], rng.integers(0, pages, accesses))


def test_reuse_keeps_a_hot_set_smaller_than_the_budget_resident():
    trace = hot_set_trace()
    fifo = replay_eviction(FifoEviction(), trace, resident_capacity=2_000)
    reuse = replay_eviction(ReuseEviction(), trace, resident_capacity=2_000)
    # First touches are the same for both; what FIFO adds is refaults of the hot set.
    assert reuse.refaults * 2 < fifo.refaults and reuse.faults < fifo.faults, (reuse, fifo)


def test_reuse_is_no_worse_than_fifo_on_a_scan_and_on_uniform_random():
    scan = np.tile(np.arange(10_000), 3)
    assert replay_eviction(ReuseEviction(), scan, 2_000).faults <= replay_eviction(FifoEviction(), scan, 2_000).faults
    uniform = np.random.default_rng(2).integers(0, 10_000, 40_000)
    fifo = replay_eviction(FifoEviction(), uniform, 2_000).faults
    assert replay_eviction(ReuseEviction(), uniform, 2_000).faults <= fifo * 1.05


def test_reuse_promotes_near_refaults_that_fit_in_the_hot_share():
    policy = ReuseEviction(hot_share=0.5, adapt=False)
    policy.on_resident(np.arange(10))
    # The hot share is 5 of 10 pages: distance 7 is near (under 10) but does not fit.
    policy.on_refault(np.array([100, 101, 102]), np.array([3, 7, 50]))
    policy.on_resident(np.array([100, 101, 102]))
    assert policy.hot_pages == 1
    assert list(policy.choose(3)) == [0, 1, 2]                   # the cold queue is over its share: its oldest
    # 9 cold of 10: 4 over the share, then the hot queue's oldest.
    assert sorted(policy.choose(5).tolist()) == [3, 4, 5, 6, 100]


def test_reuse_gives_what_is_asked_when_the_hot_queue_runs_out():
    # Uniform random faults leave the hot queue empty and the cold share
    # near 1: the cold queue is barely over its share, and the rest must
    # come from it too (the evictor asked up to 8 times, for a few each).
    policy = ReuseEviction(hot_share=0.5, adapt=False)
    policy.cold_share = 0.999
    policy.on_resident(np.arange(8000))
    assert policy.hot_pages == 0
    assert policy.choose(512).tolist() == list(range(512))
    policy.on_refault(np.array([9000]), np.array([1]))   # one page goes hot
    policy.on_resident(np.array([9000]))
    victims = policy.choose(600).tolist()
    assert len(victims) == 600 and 9000 in victims and len(set(victims)) == 600


def test_reuse_split_moves_toward_the_queue_whose_evictions_were_mistakes():
    policy = ReuseEviction(hot_share=0.75)   # cold share 0.25 to start
    policy.on_resident(np.arange(100))
    # While the hot queue fills, near refaults are how it fills: no verdict.
    policy.on_refault(np.arange(1000, 1300), np.zeros(300, np.int64))
    policy.on_resident(np.arange(1000, 1300))
    assert policy.cold_share == 0.25 and policy.hot_pages == 300
    # Now a near refault of a page never hot: the cold queue was too short.
    policy.on_refault(np.arange(5000, 5040), np.zeros(40, np.int64))
    policy.on_resident(np.arange(5000, 5040))
    grown = policy.cold_share
    assert grown == pytest.approx(0.25 + 40 / 400)
    # Below its share the cold queue keeps its pages: the hot queue's oldest
    # go, and their near refaults say the hot queue was too short.
    victims = policy.choose(10)
    assert victims.tolist() == list(range(1000, 1010))
    policy.on_refault(victims, np.zeros(10, np.int64))
    assert policy.cold_share == pytest.approx(grown - 10 / 430, abs=1e-3)


def group_rewrite_trace(threads=4, group=512, groups=8, rounds=2, sweeps=10) -> np.ndarray:
    """Threads each rewriting their own group of pages, sweep after sweep,
    group after group, their accesses interleaved: the write hammer's shape."""
    sweep = np.arange(group)
    out = []
    for _ in range(rounds):
        for g in range(groups):
            pages = np.stack([(t * groups + g) * group + sweep for t in range(threads)], axis=1).ravel()
            out.extend([pages] * sweeps)
    return np.concatenate(out)


def test_reuse_is_fifo_when_the_pages_in_use_fill_the_budget():
    # Four groups of 512 pages in use under a 2048-page budget: every page
    # evicted is a mistake. A fixed 2Q split (hot_share 0.75) reads back a
    # quarter more than FIFO here; on the daemon, 4-6x more.
    trace = group_rewrite_trace()
    regions = [(0, int(trace.max()) + 1)]
    fifo = replay_paging(Readahead(), FifoEviction(), trace, 2048, regions, batch=512)
    policy = ReuseEviction()
    reuse = replay_paging(Readahead(), policy, trace, 2048, regions, batch=512)
    assert reuse.pages_in <= fifo.pages_in, (reuse, fifo)
    assert policy.cold_share > 0.5


def test_first_unique_keeps_first_occurrences_in_order():
    from umgr.policies import _first_unique
    rng = np.random.default_rng(7)
    for arr in (np.arange(10, 600, dtype=np.int64), np.array([3, 1, 3, 2, 1]), np.array([5]), np.array([1, 2, 2, 3]),
                np.array([4, 3, 2]), rng.integers(0, 50, 200)):
        seen, expected = set(), []
        for v in arr.tolist():
            if v not in seen:
                seen.add(v)
                expected.append(v)
        assert _first_unique(arr).tolist() == expected


def test_a_forked_child_s_target_loads_its_parent_s_plug_in_by_its_entry_point_name(monkeypatch):
    # A plug-in need not set `name` (the README does not ask it to): the
    # name a target's policy goes by is the one it was loaded by, which a
    # forked child's target loads again (it got "base", which does not load,
    # and ran without prefetch).
    from types import SimpleNamespace

    import umgr.policies as policies
    from umgr.daemon.forks import ParentSettings
    from umgr.daemon.lifecycle import Lifecycle

    class Mine(PrefetchPolicy):
        def on_fault(self, vpn, region_start, region_end):
            return [vpn + 1]

    monkeypatch.setattr(policies, "_plugins", {"mine": Mine})
    lifecycle = Lifecycle.__new__(Lifecycle)
    lifecycle.config = SimpleNamespace(policy="readahead", policy_options={})
    parent = SimpleNamespace(pid=1, owner=(0, 0), budget_pages=1, name="", prefetch=lifecycle.prefetch("mine", "pid 1"),
                             stopping=False, scan_min_region=None)
    settings = ParentSettings.of(parent)
    assert settings.prefetch_name == "mine"
    child = lifecycle.prefetch(settings.prefetch_name, "pid 2")
    assert isinstance(child.policy, Mine) and child.name == "mine"
    assert lifecycle.prefetch("", "pid 3").name == "readahead"   # the daemon's own


def test_replay_paging_follows_discards_and_moves():
    """Pure logic of replay_paging's events: a discarded page reads as
    zero again (a fault, not from swap), a moved one goes with its content
    (from swap at its new place), and the event kinds are the trace's."""
    from umgr.trace import Kind
    from umgr.policies import replay as replay_module
    assert (replay_module.GONE, replay_module.MOVED) == (Kind.GONE, Kind.MOVED)
    # 0..3 touched under 2 pages: 0 and 1 go out; then 0 is discarded and
    # 0..3 move to 100..103; 100 (was 0: discarded) faults fresh, 101 (was 1)
    # from swap.
    events = [(4, Kind.GONE, 0, 1, 1), (4, Kind.MOVED, 0, 4, 100)]
    got = replay_paging(NoPrefetch(), FifoEviction(), [0, 1, 2, 3, 100, 101], 2, batch=1, events=events)
    assert got.faults == 6 and got.from_swap == 1
    plain = replay_paging(NoPrefetch(), FifoEviction(), [0, 1, 2, 3, 100, 101], 2, batch=1)
    assert plain.from_swap == 0   # (100 and 101 never seen: fresh)
