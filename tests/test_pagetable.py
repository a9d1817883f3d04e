"""Pure logic: the page table and the slot allocator (fast, no kernel)."""
import os

import numpy as np
import pytest

from umgr.errors import BackendFull
from umgr.paging.pagetable import NO_SLOT, PageTable, State, runs
from umgr.backends.slots import SlotAllocator


def table_with(vpn=100, npages=10, present=None):
    pt = PageTable()
    pt.add(vpn, npages, present)
    return pt


def test_add_counts_present_pages_resident():
    present = np.zeros(10, bool)
    present[[1, 2, 7]] = True
    pt = table_with(present=present)
    assert pt.resident == 3 and pt.managed == 10
    assert list(pt.states(np.arange(100, 103))) == [State.FRESH, State.RESIDENT, State.RESIDENT]


def test_set_and_counts_follow_transitions():
    pt = table_with()
    vpns = np.arange(102, 106)
    pt.set(vpns, State.RESIDENT)
    assert pt.resident == 4
    pt.set(vpns[:2], State.SWAPPED, np.array([7, 8], np.int32))
    assert pt.resident == 2 and pt.swapped == 2
    assert list(pt.slots(vpns)) == [7, 8, NO_SLOT, NO_SLOT]


def test_remove_splits_region_and_returns_slots():
    pt = table_with()
    pt.set(np.arange(103, 106), State.SWAPPED, np.array([1, 2, 3], np.int32))
    freed = pt.remove(104, 105)
    assert list(freed) == [2]
    assert [(r.vpn, r.npages) for r in pt.regions] == [(100, 4), (105, 5)]
    assert pt.swapped == 2
    assert pt.states(np.array([104]))[0] == State.UNMAPPED


def test_slots_of_large_regions_come_out_whole_in_steps():
    """Past one step (SLOT_STEP pages) the slots a munmap returns, and
    those slot_steps() and clear() hand out, are exactly the named ones,
    in page order."""
    rng = np.random.default_rng(5)
    pt = PageTable()
    for vpn, npages in ((1000, 200_000), (300_000, 70_000)):
        pt.add(vpn, npages)
        swapped = np.sort(rng.choice(npages, npages // 3, replace=False)) + vpn
        pt.set(swapped, State.SWAPPED, rng.integers(1, 1 << 30, len(swapped)).astype(np.int32))
    named = np.concatenate([r.slot[r.slot != NO_SLOT] for r in pt.regions])
    assert np.array_equal(np.concatenate(list(pt.slot_steps())), named)
    gone = pt.copy()
    first = pt.regions[0]
    expected = first.slot[50_000:180_000][first.slot[50_000:180_000] != NO_SLOT].copy()
    assert np.array_equal(pt.remove(1000 + 50_000, 1000 + 180_000), expected)
    freed = []
    gone.clear(freed.append)
    assert np.array_equal(np.concatenate(freed), named)
    assert not gone.regions and gone.swapped == 0


def test_discard_is_idempotent_and_keeps_zapping_pages():
    pt = table_with()
    pt.set(np.array([100, 101]), State.SWAPPED, np.array([5, 6], np.int32))
    pt.set(np.array([102]), State.ZAPPING, np.array([9], np.int32))
    assert sorted(pt.discard(100, 110, keep=(State.ZAPPING,))) == [5, 6]
    assert len(pt.discard(100, 110, keep=(State.ZAPPING,))) == 0
    assert pt.states(np.array([100, 102])).tolist() == [State.FRESH, State.ZAPPING]
    assert pt.slots(np.array([102]))[0] == 9


def test_move_carries_states_and_slots():
    pt = table_with()
    pt.set(np.array([101]), State.SWAPPED, np.array([4], np.int32))
    pt.set(np.array([102]), State.RESIDENT)
    pt.move(100, 500, 10)
    assert pt.states(np.array([101, 501, 502])).tolist() == [State.UNMAPPED, State.SWAPPED, State.RESIDENT]
    assert pt.slots(np.array([501]))[0] == 4
    assert pt.resident == 1 and pt.swapped == 1


def test_move_over_registered_range_returns_its_slots():
    # A maps scan may register the destination before the REMAP event comes.
    pt = table_with()
    pt.add(500, 20)
    pt.set(np.array([503]), State.SWAPPED, np.array([8], np.int32))
    pt.set(np.array([101]), State.SWAPPED, np.array([4], np.int32))
    replaced = pt.move(100, 500, 10)
    assert replaced.tolist() == [8]
    assert [(r.vpn, r.npages) for r in pt.regions] == [(500, 10), (510, 10)]
    assert pt.slots(np.array([501, 503])).tolist() == [4, NO_SLOT]
    assert pt.swapped == 1 and pt.managed == 20


def test_copy_is_independent():
    pt = table_with()
    child = pt.copy()
    child.set(np.array([100]), State.RESIDENT)
    assert pt.resident == 0 and child.resident == 1


def test_runs():
    starts, lengths = runs(np.array([1, 2, 3, 7, 9, 10]))
    assert starts.tolist() == [1, 7, 9] and lengths.tolist() == [3, 1, 2]


def test_slots_alloc_contiguous_and_refcounted():
    slots = SlotAllocator(8)
    a = slots.alloc(3)
    assert a.tolist() == [1, 2, 3]   # slot 0 is NO_SLOT, never handed out
    slots.incref(a[:1])
    slots.free(a)
    assert slots.used == 1          # slot 1 still has a reference
    slots.free(a[:1])
    assert slots.used == 0
    with pytest.raises(ValueError):
        slots.free(a[:1])


@pytest.mark.parametrize("count", [3, 40])   # the few slots' path and numpy's
def test_slots_named_twice_in_one_free_need_two_references(count):
    """A slot shared after a fork may be named twice in one free(), and
    then goes; named twice with one reference is a double free, raised
    before the counts of its step of the call change (it wrapped to 65535,
    or was clipped at 0, and the slot was never free again)."""
    slots = SlotAllocator(64)
    a = slots.alloc(count)
    slots.incref(a[:1])
    slots.free(np.concatenate((a, a[:1])))
    assert slots.used == 0
    b = slots.alloc(count)
    with pytest.raises(ValueError, match="double free"):
        slots.free(np.concatenate((b, b[:1])))
    assert slots.used == count and slots.refs(b).tolist() == [1] * count


def test_slots_free_one_matches_free():
    """The one-slot path of a random fault: same reference counting."""
    slots = SlotAllocator(4)
    released = []
    slots.on_release = lambda: released.append(slots.used)
    a = slots.alloc(2)
    slots.incref(a[1:])
    slots.free_one(int(a[1]))
    assert slots.used == 2 and released == []    # slot 2 still shared
    slots.free(a[1:])                            # one-element free() takes the same path
    assert slots.used == 1 and released == [1]
    with pytest.raises(ValueError):
        slots.free_one(int(a[1]))
    assert slots.alloc(1).tolist() == [3]   # the sweep goes on past the slot freed


def test_slots_are_swept_in_runs_past_those_in_use_and_wrap():
    """alloc() hands out ascending slots from where the last one ended,
    skipping slots in use, wrapping at the end: scattered frees leave
    runs for the next batch instead of scattered slots."""
    slots = SlotAllocator(16)
    first = slots.alloc(10)
    slots.free(first[[1, 3, 4, 8]])            # slots 2, 4, 5, 9 free again
    assert slots.alloc(4).tolist() == [11, 12, 13, 14]
    assert slots.alloc(4).tolist() == [15, 16, 2, 4]   # wraps; slot 0 never
    assert slots.alloc(2).tolist() == [5, 9]
    with pytest.raises(BackendFull):
        slots.alloc(1)


def test_slots_sweep_agrees_with_a_model_under_random_use():
    rng = np.random.default_rng(7)
    slots = SlotAllocator(1000)
    held: set[int] = set()
    for _ in range(400):
        if held and rng.random() < 0.5:
            drop = rng.choice(sorted(held), size=min(len(held), int(rng.integers(1, 60))), replace=False)
            slots.free(drop.astype(np.int32))
            held -= set(drop.tolist())
        n = int(rng.integers(0, 120))
        if n > 1000 - len(held):
            with pytest.raises(BackendFull):
                slots.alloc(n)
            continue
        got = slots.alloc(n).tolist()
        assert len(set(got)) == n and not set(got) & held and 0 not in got
        assert all(1 <= slot <= 1000 for slot in got)
        held |= set(got)
        assert slots.used == len(held) == int(np.count_nonzero(slots.refs(np.arange(1, 1001))))


@pytest.mark.parametrize("many", [False, True])
def test_slots_free_of_a_few_matches_free_of_many(many):
    """free() of at most FEW_SLOTS slots runs on plain integers: the same
    counts, duplicates and errors as the numpy path."""
    from umgr.backends.slots import FEW_SLOTS
    slots = SlotAllocator(64)
    freed = []
    slots.on_free = lambda released: freed.append(released.tolist())
    a = slots.alloc(FEW_SLOTS + 2 if many else 4)
    slots.incref(a[:1])                      # slot 1 shared (after a fork), named twice below
    slots.free(np.concatenate((a[:1], a)))
    assert slots.used == 0 and freed == [a.tolist()]
    b = slots.alloc(3)
    never = np.setdiff1d(np.arange(1, 65, dtype=np.int32), b)[-1:]   # a free slot
    with pytest.raises(ValueError):
        slots.free(np.concatenate((b, never)))    # nothing changes
    assert slots.used == 3 and slots.refs(b).tolist() == [1, 1, 1]


def test_slots_full_allocates_nothing():
    slots = SlotAllocator(4)
    slots.alloc(3)
    with pytest.raises(BackendFull):
        slots.alloc(2)
    assert slots.used == 3


def test_slots_adopt_counts_references_from_pieces_in_place():
    """A restarted daemon's saved tables name slots in pieces; a slot named
    twice (shared after a fork) has two references. The counts of a 64 GiB
    store are made in place: a whole-store bincount raised the peak by
    50 MB and left every count backed (32 MB) for good."""
    slots = SlotAllocator(1 << 24)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # VmHWM back to the current RSS
    rss = vm_kb("VmRSS")
    slots.adopt(iter([np.array([5, 7, 5], np.int32), np.array([7, 1 << 23], np.int32)]))
    assert vm_kb("VmHWM") - rss < 16 << 10
    assert slots.refs(np.array([5, 7, 1 << 23, 6])).tolist() == [2, 2, 1, 0]
    assert slots.used == 3
    slots.free(np.array([5, 5, 7], np.int32))
    assert slots.used == 2 and slots.refs(np.array([5, 7])).tolist() == [0, 1]
    for bad in (0, 1 << 24 | 1):
        with pytest.raises(ValueError):
            slots.adopt([np.array([3, bad])])


def vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_batch_lookups_over_many_regions_and_gaps_agree_page_by_page():
    """states/slots/set over sorted vpns spanning many regions (an
    interpreter's arenas), with pages before, between and after them,
    answer as state_of/slot_of do one page at a time."""
    rng = np.random.default_rng(3)
    for trial in range(50):
        pt = PageTable()
        at = 1000
        for _ in range(int(rng.integers(1, 40))):
            at += int(rng.integers(0, 5))          # a gap, or none (adjacent regions)
            npages = int(rng.integers(1, 20))
            pt.add(at, npages)
            at += npages
        vpns = np.unique(rng.integers(990, at + 10, int(rng.integers(1, 200)))).astype(np.int64)
        inside = vpns[pt.states(vpns) != State.UNMAPPED]
        pt.set(inside, State.SWAPPED, (inside % 1000 + 1).astype(np.int32))
        assert pt.states(vpns).tolist() == [pt.state_of(int(v)) for v in vpns], trial
        assert pt.slots(vpns).tolist() == [pt.slot_of(int(v)) for v in vpns], trial
        assert pt.count(State.SWAPPED) == len(inside), trial


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_by_region_finds_each_pages_region_and_index_as_find_does(dtype):
    # Tables of many small regions with gaps (node's and CPython's heaps),
    # sorted vpns inside, between and past them: by_region must give each
    # page that find() places its region and index, in order, and nothing
    # for the others; and see a region added since its last call.
    assert list(PageTable().by_region(np.array([1, 2], dtype))) == []
    rng = np.random.default_rng(7)
    for _ in range(200):
        pt = PageTable()
        at = int(rng.integers(0, 50))
        for _ in range(int(rng.integers(1, 40))):
            at += int(rng.integers(0, 5))
            size = int(rng.integers(1, 9))
            pt.add(at, size)
            at += size
        vpns = np.unique(rng.integers(0, at + 10, int(rng.integers(1, 60)))).astype(dtype)
        got = [(region.vpn, p, i) for region, pos, idx in pt.by_region(vpns)
               for p, i in zip(range(len(vpns))[pos], idx.tolist())]
        assert all(idx.dtype == vpns.dtype for _, _, idx in pt.by_region(vpns))
        want = [(pt.find(int(v)).vpn, p, int(v) - pt.find(int(v)).vpn)
                for p, v in enumerate(vpns) if pt.find(int(v)) is not None]
        assert got == want
        pt.add(at + 100, 3)
        assert [region.vpn for region, _, _ in pt.by_region(np.array([at + 101, at + 200], dtype))] == [at + 100]


@pytest.mark.parametrize("limit", [None, 0, 1, 5, 13, 40])
def test_find_state_in_steps_finds_what_one_scan_does(monkeypatch, limit):
    # Regions scanned CHUNK pages at a time (no temporary of a region's
    # size): the pages found, and where to go on, are one scan's.
    from umgr.paging import pagetable
    rng = np.random.default_rng(3)
    pt = PageTable()
    for vpn in (100, 400, 1000):
        pt.add(vpn, 200)
    resident = np.sort(rng.choice(np.concatenate([np.arange(v, v + 200) for v in (100, 400, 1000)]), 60,
                                  replace=False))
    pt.set(resident, State.RESIDENT)
    whole = pt.find_state(150, 1150, State.RESIDENT, limit)
    monkeypatch.setattr(pagetable, "CHUNK", 7)
    stepped = pt.find_state(150, 1150, State.RESIDENT, limit)
    inside = resident[(resident >= 150) & (resident < 1150)]
    expected = inside if limit is None else inside[:limit]
    assert stepped[0].tolist() == whole[0].tolist() == expected.tolist()
    assert stepped[1] == whole[1]


def test_sparse_zeros_are_zeros_backed_4_kib_at_a_time():
    from umgr.arrays import SPARSE_BYTES, sparse_zeros
    small = sparse_zeros(10, np.int32)
    assert small.dtype == np.int32 and small.tolist() == [0] * 10
    n = 64 << 20   # 64 MiB of bytes, once written in one place each 2 MiB
    big = sparse_zeros(n, np.uint8)
    assert n >= SPARSE_BYTES and big.dtype == np.uint8 and len(big) == n and big.flags.writeable
    big[::2 << 20] = 1
    rss_kb = mapping_rss_kb(big.ctypes.data, big.nbytes)
    # Not 32 huge pages: numpy asks for them (MADV_HUGEPAGE) for its large
    # arrays, and transparent_hugepage=always gives them unasked.
    assert rss_kb <= 32 * 4, f"{rss_kb} kB backed for 32 pages written"
    assert int(big.sum()) == 32 and not big[1:2 << 20].any()


def mapping_rss_kb(address: int, nbytes: int) -> int:
    """Rss of the mappings of this process over [address, address + nbytes)
    (smaps; numpy's own madvise splits a large array's mapping in two)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    total = 0
    for at, line in enumerate(lines):
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            lo, hi = (int(x, 16) for x in first.split("-"))
            if lo < address + nbytes and address < hi:
                total += next(int(line.split()[1]) for line in lines[at + 1:] if line.startswith("Rss:"))
    return total


def test_sparse_zeros_without_a_mapping_or_huge_pages_are_zeros_still(monkeypatch):
    # A kernel without transparent huge pages answers MADV_NOHUGEPAGE with
    # EINVAL; a mapping may be refused (ENOMEM: commit limit, map count).
    import errno
    import mmap as mmap_module
    from umgr import arrays
    real_mmap = mmap_module.mmap

    class NoHugePages(real_mmap):
        def madvise(self, *args):
            raise OSError(errno.EINVAL, "Invalid argument")

    def no_mapping(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    n = arrays.SPARSE_BYTES // 4
    for stand_in in (NoHugePages, no_mapping):
        monkeypatch.setattr(arrays.mmap, "mmap", stand_in)
        zeros = arrays.sparse_zeros(n, np.int32)
        assert zeros.dtype == np.int32 and len(zeros) == n and not zeros.any() and zeros.flags.writeable


@pytest.mark.parametrize("zapping", [False, True])
def test_settling_a_saved_table_in_steps_follows_its_rules_page_by_page(monkeypatch, zapping):
    # recovery.settle, CHUNK pages at a time (7 here), against the rules of
    # umgr/paging/recovery.py's table applied to each page on its own.
    from umgr.paging import recovery
    monkeypatch.setattr(recovery, "CHUNK", 7)
    rng = np.random.default_rng(11)
    pt = PageTable()
    for vpn, npages in ((100, 40), (300, 23)):
        pt.add(vpn, npages)
    vpns = np.concatenate([np.arange(100, 140), np.arange(300, 323)])
    states = rng.choice([State.FRESH, State.RESIDENT, State.EVICTING, State.ZAPPING, State.SWAPPED, State.PINNED,
                         State.ZERO, State.SHARED], len(vpns))
    slots = np.where(rng.random(len(vpns)) < 0.5, np.arange(1, len(vpns) + 1), NO_SLOT).astype(np.int32)
    slots[states == State.SWAPPED] = np.arange(1000, 1000 + int((states == State.SWAPPED).sum()))
    for state in np.unique(states):
        chosen = states == state
        pt.set(vpns[chosen], int(state), slots[chosen])
    present = rng.random(len(vpns)) < 0.5
    present_of = dict(zip(vpns.tolist(), present.tolist()))
    freed, newly_resident = recovery.settle(pt, lambda vpn, n: np.array([present_of[v] for v in range(vpn, vpn + n)]),
                                            zapping)
    want_state, want_freed, want_new = [], [], []
    for vpn, state, slot, here in zip(vpns.tolist(), states.tolist(), slots.tolist(), present.tolist()):
        if not here:
            new = (State.SWAPPED if state == State.SWAPPED or (state == State.ZAPPING and slot != NO_SLOT)
                   else State.FRESH)
        elif state in (State.PINNED, State.ZERO, State.SHARED) or (state == State.ZAPPING and not zapping):
            new = state
        else:
            new = State.RESIDENT
        if new in (State.RESIDENT, State.FRESH) and slot != NO_SLOT:   # (the kernel's copy, or none, is the page)
            want_freed.append(slot)
        if new == State.RESIDENT and state != State.RESIDENT:
            want_new.append(vpn)
        want_state.append(new)
    assert pt.states(vpns).tolist() == want_state
    assert sorted(freed.tolist()) == sorted(want_freed)
    assert newly_resident.tolist() == want_new


# ---- a saved table's holes --------------------------------------------------------
def _file_and_memory_tables(tmp_path, npages):
    """The same 1k pages set in a region of `npages`, one table in files
    (umgr/paging/tablefile.py), one in memory."""
    from umgr.paging.tablefile import FileArrays
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)   # (kept open: the table's files are opened through it)
    tables = (PageTable(arrays=FileArrays(dir_fd)), PageTable())
    rng = np.random.default_rng(5)
    # (at both ends: a 4 KiB page of the slot array covers 1024 pages)
    vpns = np.unique(np.concatenate((rng.integers(0, 1 << 16, 1500), npages - rng.integers(1, 1 << 16, 1500)))) + 1000
    for pt in tables:
        pt.add(1000, npages)
        pt.set(vpns[:1000], State.RESIDENT)
        pt.set(vpns[1000:2000], State.SWAPPED, np.arange(1, 1001, dtype=np.int32))
        pt.set(vpns[2000:2200], State.RESIDENT, np.arange(2001, 2201, dtype=np.int32))   # clean copies
    assert tables[0].regions[0].backing is not None and tables[1].regions[0].backing is None
    return tables, dir_fd


def test_a_saved_table_is_scanned_where_its_files_hold_data(tmp_path):
    # A region of 16M pages (a 64 GiB reservation) with a few thousand
    # pages set: every scan gives what the same table in memory gives, and
    # none reads the files' holes (through a shared mapping that fills
    # them in the page cache: 84 MB at the exit of such a reservation).
    npages = 1 << 24
    (saved, memory), dir_fd = _file_and_memory_tables(tmp_path, npages)
    steps = list(saved.regions[0].steps(0, npages))
    assert 0 < sum(hi - lo for lo, hi in steps) <= 1 << 18, steps[:4]
    for state in (State.RESIDENT, State.SWAPPED):
        assert np.array_equal(saved.vpns_in(state), memory.vpns_in(state))
    for state in (State.RESIDENT, State.SWAPPED, State.FRESH):
        for start in (1000, 1000 + npages // 2):
            found, went_on = saved.find_state(start, 1000 + npages, state, 500)
            assert np.array_equal(found, memory.find_state(start, 1000 + npages, state, 500)[0])
            assert went_on == memory.find_state(start, 1000 + npages, state, 500)[1]
    assert np.array_equal(np.concatenate(list(saved.slot_steps())), np.concatenate(list(memory.slot_steps())))
    saved.recount()
    assert np.array_equal(saved.counts, memory.counts)
    assert np.array_equal(saved.take_kept_slots(), memory.take_kept_slots())
    assert np.array_equal(saved.forked().counts, memory.forked().counts)
    lo, hi = 1000 + npages // 4, 1000 + npages // 2
    assert np.array_equal(np.sort(saved.discard(lo, hi)), np.sort(memory.discard(lo, hi)))
    assert np.array_equal(saved.counts, memory.counts)
    src, dst = 1000 + npages - (1 << 17), 1000 + 2 * npages   # (mremap of its last 128k pages, away)
    assert np.array_equal(saved.move(src, dst, 1 << 17), memory.move(src, dst, 1 << 17))
    assert np.array_equal(saved.counts, memory.counts)
    for state in (State.RESIDENT, State.SWAPPED):
        assert np.array_equal(saved.vpns_in(state), memory.vpns_in(state))
    assert np.array_equal(np.sort(saved.remove(1000 + npages // 8, 1000 + npages - 5)),
                          np.sort(memory.remove(1000 + npages // 8, 1000 + npages - 5)))
    assert np.array_equal(saved.counts, memory.counts)
    for state in (State.RESIDENT, State.SWAPPED):
        assert np.array_equal(saved.vpns_in(state), memory.vpns_in(state))
    os.close(dir_fd)


def test_a_saved_table_whose_file_cannot_be_looked_at_is_scanned_whole(tmp_path):
    # (a region's file unlinked under it: every step, as in memory)
    (saved, memory), dir_fd = _file_and_memory_tables(tmp_path, 1 << 20)
    os.unlink(saved.regions[0].backing.name, dir_fd=dir_fd)
    assert list(saved.regions[0].steps(0, 1 << 20)) == [(0, 1 << 20)]
    assert np.array_equal(np.sort(saved.remove(1000, 1000 + (1 << 20))), np.sort(memory.remove(1000, 1000 + (1 << 20))))
    assert np.array_equal(saved.counts, memory.counts)
    os.close(dir_fd)


def _cached_pages(array: np.ndarray) -> int:
    """Pages of the file mapping under `array` in the page cache (mincore)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    start = array.ctypes.data & ~4095
    length = array.ctypes.data + array.nbytes - start
    vec = (ctypes.c_ubyte * ((length + 4095) // 4096))()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
    return sum(byte & 1 for byte in vec)


@pytest.mark.parametrize("zapping", [False, True])
def test_settling_a_saved_table_reads_its_holes_by_presence_only(tmp_path, zapping):
    # A saved region of 4M pages, 64 pages at its start and 64 in its middle
    # set in every state, the rest FRESH (the file's holes), some pages
    # present anywhere: settled as the same table in memory is, and the
    # file's holes are not read (reading them through the mapping puts
    # them in the page cache: 20 MB of 4M pages' arrays).
    from umgr.paging import recovery
    from umgr.paging.tablefile import FileArrays
    npages = 1 << 22
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    saved, memory = tables = (PageTable(arrays=FileArrays(dir_fd)), PageTable())
    rng = np.random.default_rng(3)
    for pt in tables:
        pt.add(5000, npages)
    vpns = np.concatenate((np.arange(5000, 5064), np.arange(5000 + npages // 2, 5064 + npages // 2)))
    states = rng.choice([State.FRESH, State.RESIDENT, State.EVICTING, State.ZAPPING, State.SWAPPED, State.PINNED,
                         State.ZERO, State.SHARED], len(vpns))
    slots = np.where(rng.random(len(vpns)) < 0.5, np.arange(1, len(vpns) + 1), NO_SLOT).astype(np.int32)
    slots[states == State.SWAPPED] = np.arange(1000, 1000 + int((states == State.SWAPPED).sum()))
    slots[0] = 7   # (a slot at the start makes the region's arrays a file)
    for pt in tables:
        for state in np.unique(states):
            chosen = states == state
            pt.set(vpns[chosen], int(state), slots[chosen])
    region = saved.regions[0]
    assert region.backing is not None and memory.regions[0].backing is None
    present = np.union1d(rng.choice(np.arange(5000, 5000 + npages), 300, replace=False), vpns[::3])
    present_pages = lambda vpn, n: np.isin(np.arange(vpn, vpn + n), present)   # noqa: E731
    steps = list(region.steps(0, npages))
    assert 2 <= len(steps) <= 4 and sum(hi - lo for lo, hi in steps) <= 1 << 14, steps   # (cut at CHUNK too)
    cached = _cached_pages(region.state) + _cached_pages(region.slot)
    got = recovery.settle(saved, present_pages, zapping)
    # (each page that became RESIDENT writes its entries: a file page of
    # each array; reading the holes put 5k in the cache)
    assert _cached_pages(region.state) + _cached_pages(region.slot) <= cached + 2 * len(present) + 8
    want = recovery.settle(memory, present_pages, zapping)
    assert np.array_equal(np.sort(got[0]), np.sort(want[0])) and np.array_equal(got[1], want[1])
    assert np.array_equal(saved.counts, memory.counts)
    for state in (State.RESIDENT, State.SWAPPED, State.PINNED, State.ZERO, State.SHARED, State.ZAPPING):
        assert np.array_equal(saved.vpns_in(state), memory.vpns_in(state))
    assert len(saved.vpns_in(State.RESIDENT)) >= 300
    os.close(dir_fd)


def test_a_saved_table_with_a_file_of_another_format_is_not_loaded(tmp_path):
    """A file a crash cut short (its header, written last, is zeros) holds
    nothing and is dropped; one of another format (a magic of another
    version) or damaged refuses the table, whose program then cannot come
    back: loaded without it, its swapped pages would read as zeros."""
    from umgr.paging.tablefile import HEADER_BYTES, MAGIC, FileArrays
    (saved, _), dir_fd = _file_and_memory_tables(tmp_path, 1 << 16)
    name = saved.regions[0].backing.name
    cut_short = tmp_path / "r1"
    cut_short.write_bytes(bytes(2 * HEADER_BYTES))
    assert len(FileArrays(dir_fd).load().regions) == 1 and not cut_short.exists()
    header = np.memmap(tmp_path / name, np.int64, "r+", shape=(4,))
    for magic, npages, why in ((MAGIC + 1, 1 << 16, "not a page table file of this umgr"),
                               (MAGIC, 1 << 17, "a damaged header")):
        header[0], header[2] = magic, npages
        with pytest.raises(ValueError, match=why):
            FileArrays(dir_fd).load()
    assert (tmp_path / name).exists()
    os.close(dir_fd)


# ---- a REMAP the dead daemon read: replayed ------------------------------------------
def _saved_table(tmp_path) -> tuple[int, PageTable]:
    """A table in files of tmp_path (its directory's descriptor, kept open)."""
    from umgr.paging.tablefile import FileArrays
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    return dir_fd, PageTable(arrays=FileArrays(dir_fd))


def _add_swapped(pt: PageTable, vpn: int, npages: int, first_slot: int) -> None:
    """A region of swapped pages, in slots first_slot, first_slot + 1, ..."""
    pt.add(vpn, npages)
    pt.set(np.arange(vpn, vpn + npages, dtype=np.int64), State.SWAPPED,
           np.arange(first_slot, first_slot + npages, dtype=np.int32))


def _remap(src: int, dst: int, npages: int) -> np.ndarray:
    """The journal's row of a REMAP message (recovery.replay's input)."""
    from umgr.kernel.uffd import EVENT_REMAP
    return np.array([[EVENT_REMAP, src << 12, dst << 12, npages << 12]], dtype=np.uint64)


def _dies_after_one_move(monkeypatch, table: PageTable) -> None:
    """The daemon holding `table` is killed once it has given one piece
    its new place (FileArrays.moved: a header rewritten)."""
    from umgr.paging.tablefile import FileArrays
    moved = []

    def moved_then_killed(region, vpn):
        if moved:
            raise SystemExit("killed")
        moved.append(vpn)
        FileArrays.moved(table.arrays, region, vpn)
    monkeypatch.setattr(table.arrays, "moved", moved_then_killed)


def test_a_remap_the_dead_daemon_applied_in_part_is_finished_by_the_replay(tmp_path, monkeypatch):
    """mremap of a range over two saved regions: the dead daemon moved one
    region's piece to the destination and died before the other's
    (PageTable.move rewrites each piece's header in turn). The replayed
    REMAP moves the piece left behind and keeps the one already there:
    every page's state and slot is found at the destination (the replay
    moved the whole range again, and emptying the destination first threw
    out the piece already moved, freeing its slots)."""
    from umgr.paging import recovery
    from umgr.paging.tablefile import FileArrays

    dir_fd, pt = _saved_table(tmp_path)
    src, dst, npages = 1000, 50_000, 64
    _add_swapped(pt, src, 32, 1)
    _add_swapped(pt, src + 32, 32, 33)
    _dies_after_one_move(monkeypatch, pt)
    with pytest.raises(SystemExit):
        pt.move(src, dst, npages)
    saved = FileArrays(dir_fd).load()
    assert saved.gaps(src, src + npages) == [(src + 32, src + npages)]   # one piece moved, one left
    freed = recovery.replay(saved, _remap(src, dst, npages))
    assert len(freed) == 0
    assert saved.gaps(src, src + npages) == [(src, src + npages)]
    at_dst = np.arange(dst, dst + npages, dtype=np.int64)
    assert saved.states(at_dst).tolist() == [State.SWAPPED] * npages
    assert saved.slots(at_dst).tolist() == list(range(1, npages + 1))
    os.close(dir_fd)


@pytest.mark.parametrize("hole", [0, 16])
def test_a_remap_not_applied_moves_the_whole_range_over_what_was_at_the_destination(tmp_path, hole):
    """The dead daemon read the REMAP and applied none of it: a region it
    had at the destination (registered after the source's: newer) is
    replaced, its slots freed, and the source's pages are found moved;
    also where the source has a hole in front of it (`hole` pages: the
    region there held no slot, and had no file)."""
    from umgr.paging import recovery
    from umgr.paging.tablefile import FileArrays

    dir_fd, pt = _saved_table(tmp_path)
    src, dst, npages = 1000, 50_000, 64
    _add_swapped(pt, src + hole, npages - hole, 1 + hole)
    _add_swapped(pt, dst, 16, 100)
    saved = FileArrays(dir_fd).load()
    assert sorted(recovery.replay(saved, _remap(src, dst, npages)).tolist()) == list(range(100, 116))
    assert saved.slots(np.arange(dst + hole, dst + npages, dtype=np.int64)).tolist() == list(range(1 + hole,
                                                                                                  npages + 1))
    assert saved.gaps(src, src + npages) == [(src, src + npages)]
    assert saved.gaps(dst, dst + hole) == ([(dst, dst + hole)] if hole else [])
    os.close(dir_fd)


def test_a_remap_finished_by_a_daemon_that_dies_too_is_finished_by_the_next(tmp_path, monkeypatch):
    """Three pieces: the first daemon moves one and dies, the second
    daemon's replay moves one more and dies; the third's replay moves the
    last, and every page's slot is at the destination (the second daemon's
    replay made new pieces, newer than the one already moved, and the
    third redid the whole move over it, freeing its slots)."""
    from umgr.paging import recovery
    from umgr.paging.tablefile import FileArrays

    dir_fd, pt = _saved_table(tmp_path)
    src, dst, npages = 1000, 50_000, 96
    for start in range(src, src + npages, 32):
        _add_swapped(pt, start, 32, 1 + start - src)
    _dies_after_one_move(monkeypatch, pt)
    with pytest.raises(SystemExit):
        pt.move(src, dst, npages)
    second = FileArrays(dir_fd).load()
    _dies_after_one_move(monkeypatch, second)
    with pytest.raises(SystemExit):
        recovery.replay(second, _remap(src, dst, npages))
    third = FileArrays(dir_fd).load()
    assert len(third.gaps(src, src + npages)) == 1   # one piece left at the source
    assert len(recovery.replay(third, _remap(src, dst, npages))) == 0
    assert third.gaps(src, src + npages) == [(src, src + npages)]
    assert third.slots(np.arange(dst, dst + npages, dtype=np.int64)).tolist() == list(range(1, npages + 1))
    os.close(dir_fd)
