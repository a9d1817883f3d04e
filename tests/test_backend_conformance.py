"""Conformance suite run against every backend and chain, on real I/O and
real memory: round trips, one-page reads, batch edges, a full store, a
failing store, concurrent batches, and (for a store that persists) a
restarted daemon finding it intact. A chain is listed as its --backend
specs, fastest first; a small cap makes the compressed tier demote."""
import ctypes
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import trio

import umgr.backends
from umgr.backends import IO_BUCKETS, NO_READS, Backend, ReadsDone, open_chain, persists
from umgr.backends.compressed import ENTRY_LZ4, ENTRY_OVERHEAD, CompressedBackend
from umgr.backends.region import SPAN, WARM_SPANS
from umgr.backends.tiered import DEMOTE_BATCH, Tiered
from umgr.cli import _backend_value
from umgr.errors import BackendError, BackendFull
from umgr.kernel import uffd as uffdmod
from umgr.kernel.buffers import PageBuffer
from umgr.paging.fastpath import StoreView
from umgr.paging.tuning import EVICT_BATCH

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from redis_cluster import RedisCluster  # noqa: E402

PAGE = 4096
STATE_DIR = "/var/tmp/umgr-test"
BACKENDS = {
    "file": ["file"],
    "compressed": ["compressed"],
    "compressed-zstd": ["compressed:codec=zstd"],
    "compressed+file": ["compressed", "file"],
    # 256 KiB hold ~250 of the test's pages: most writes demote.
    "compressed-small+file": ["compressed:cap=256K", "file"],
    # REDIS: the port of the module's local cluster.
    "redis": ["redis:port=REDIS,wait=1"],
    "compressed-small+redis": ["compressed:cap=256K", "redis:port=REDIS,wait=1"],
    # A store written as the README says (ExampleStore, below), alone and as the lower tier.
    "example": ["example"],
    "compressed-small+example": ["compressed:cap=256K", "example"],
}


class ExampleStore(Backend):
    """A backend as README.md's "A backend" describes it, and no more:
    pages in a dict by slot."""
    name = "example"

    def __init__(self, size: int):
        super().__init__(size // PAGE)
        self.pages: dict[int, bytes] = {}

    async def write(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        for slot, addr in zip(slots.tolist(), addrs.tolist()):
            self.pages[slot] = ctypes.string_at(addr, PAGE)
        self.pages_written += len(slots)

    async def read(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        for slot, addr in zip(slots.tolist(), addrs.tolist()):
            if slot not in self.pages:
                raise BackendError(f"example: slot {slot} holds no page")
            ctypes.memmove(addr, self.pages[slot], PAGE)
        self.pages_read += len(slots)

    def release(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            self.pages.pop(slot, None)


@pytest.fixture(autouse=True)
def example_store_installed(monkeypatch):
    """ExampleStore found as if its package registered it in the group."""
    installed = umgr.backends.available_backends()
    example = SimpleNamespace(name="example", load=lambda: ExampleStore)
    monkeypatch.setattr(umgr.backends, "available_backends", lambda: {**installed, "example": example})


def open_specs(specs: list[str], size: int = 8 << 20):
    return open_chain(specs, {"size": size, "directory": STATE_DIR}, _backend_value)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    cluster = RedisCluster(tmp_path_factory.mktemp("redis"))
    yield cluster
    cluster.stop()


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    specs = BACKENDS[request.param]
    if any("REDIS" in spec for spec in specs):
        port = str(request.getfixturevalue("redis_cluster").port)
        specs = [spec.replace("REDIS", port) for spec in specs]
    b = open_specs(specs)
    yield b
    b.close()


def mixed_pages(buf: PageBuffer, n: int, seed: int) -> None:
    """Pages as a heap has them, by position mod 4: random bytes
    (incompressible), text (words drawn from a few), one repeated word
    (same-filled; some zero), small integers."""
    rng = np.random.default_rng(seed)
    words = [b"alpha ", b"beta ", b"gamma:", b"{delta}, ", b"epsilon", b"\"zeta\" "]
    pages = buf.bytes[: n * PAGE].reshape(n, PAGE)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            pages[i] = rng.integers(0, 256, PAGE, dtype=np.uint8)
        elif kind == 1:
            text = b"".join(words[k] for k in rng.integers(0, len(words), PAGE // 4))
            pages[i] = np.frombuffer(text[:PAGE], np.uint8)
        elif kind == 2:
            pages[i].view(np.uint64)[:] = 0 if i % 8 == 2 else rng.integers(1, 1 << 62)
        else:
            pages[i].view(np.uint64)[:] = rng.integers(0, 1000, PAGE // 8)


def run_io(coroutine, *args):
    trio.run(coroutine, *args)


@pytest.mark.timeout(60)
def test_pages_come_back_exactly(backend):
    n = 600
    out, back = PageBuffer(n), PageBuffer(n)
    mixed_pages(out, n, 1)
    slots = backend.slots.alloc(n)
    order = np.random.default_rng(2).permutation(n)   # scattered slots and buffer pages

    async def roundtrip():
        for part in np.array_split(order, 3):
            await backend.write(slots[part], out.addrs(part))
        await backend.read(slots, back.addrs(np.arange(n)))

    run_io(roundtrip)
    assert np.array_equal(out.bytes, back.bytes)
    assert backend.statistics()["pages_written"] == n


@pytest.mark.timeout(60)
def test_pages_read_one_at_a_time_come_back_exactly(backend):
    """A fault reads one page: the file backend does that with a pread while
    reads stay fast, through io_uring once they are slow; both exact."""
    n = 32
    out, back = PageBuffer(n), PageBuffer(n)
    mixed_pages(out, n, 3)
    slots = backend.slots.alloc(n)
    file = backend.lower if isinstance(backend, Tiered) else backend

    async def roundtrip():
        await backend.write(slots, out.addrs(np.arange(n)))
        for i in range(n):
            if file.name == "file" and i == n // 2:
                file._slow_share = 1.0   # as if the device had turned slow
            await backend.read(slots[i:i + 1], back.addrs(np.array([i])))

    run_io(roundtrip)
    assert np.array_equal(out.bytes, back.bytes)
    assert backend.statistics()["pages_read"] == n


def test_reads_done_elsewhere_are_counted_by_the_tier_that_holds_them(backend):
    """The fast path's C call reads pages itself and reports them by tier
    (ReadsDone); the file store also learns whether its preads turned slow."""
    buckets = np.zeros(len(IO_BUCKETS) + 1, np.int64)
    buckets[1] = 3
    file = backend.lower if isinstance(backend, Tiered) else backend
    if file.name == "file":
        for _ in range(12):   # every pread slow: the share passes one half
            backend.reads_done_elsewhere(ReadsDone(3, 3 * 600e-6, 3, buckets), NO_READS)
        assert file.statistics()["pages_read"] == 36 and file.io_latency[1] == 36
        assert file.sync_read_fd() == -1   # one-page reads go through io_uring now
    memory = backend.upper if isinstance(backend, Tiered) else backend
    if memory.name == "compressed":
        backend.reads_done_elsewhere(NO_READS, ReadsDone(3, 3e-6, 0, buckets))
        assert memory.statistics()["pages_read"] == 3 and memory.io_latency[1] == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [0, 1, DEMOTE_BATCH + 1, EVICT_BATCH])
def test_batch_edges(backend, n):
    out, back = PageBuffer(max(n, 1)), PageBuffer(max(n, 1))
    mixed_pages(out, n, 4)
    slots = backend.slots.alloc(n)

    async def roundtrip():
        await backend.write(slots, out.addrs(np.arange(n)))
        await backend.read(slots, back.addrs(np.arange(n)))

    run_io(roundtrip)
    assert np.array_equal(out.bytes, back.bytes)


@pytest.mark.timeout(60)
def test_concurrent_batches(backend):
    """Four writers and readers at once; with a small cap their writes
    demote each other's pages while they are read."""
    n = 160
    bufs = [PageBuffer(n) for _ in range(4)]
    backs = [PageBuffer(n) for _ in range(4)]
    slot_sets = [backend.slots.alloc(n) for _ in range(4)]
    for i, b in enumerate(bufs):
        mixed_pages(b, n, 10 + i)

    async def one(i):
        for part in np.array_split(np.arange(n), 4):
            await backend.write(slot_sets[i][part], bufs[i].addrs(part))
            await trio.sleep(0)
        await backend.read(slot_sets[i], backs[i].addrs(np.arange(n)))

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)

    run_io(main)
    for b, back in zip(bufs, backs):
        assert np.array_equal(b.bytes, back.bytes)


def test_full_backend_refuses_and_recovers(backend):
    capacity = backend.slots.capacity
    slots = backend.slots.alloc(capacity)
    with pytest.raises(BackendFull):
        backend.slots.alloc(1)
    backend.slots.free(slots[:10])
    assert len(backend.slots.alloc(10)) == 10


@pytest.mark.timeout(60)
def test_io_error_is_reported_not_swallowed(backend):
    buf = PageBuffer(1)
    bad_slot = np.array([backend.slots.capacity + 1_000_000], np.int32)   # far past the end

    async def read_past_end():
        await backend.read(bad_slot, buf.addrs(np.arange(1)))

    with pytest.raises(BackendError):
        run_io(read_past_end)


@pytest.mark.timeout(60)
def test_freed_slots_give_their_memory_back(backend):
    n = 300
    out = PageBuffer(n)
    mixed_pages(out, n, 5)
    slots = backend.slots.alloc(n)
    run_io(backend.write, slots, out.addrs(np.arange(n)))
    backend.slots.free_one(int(slots[0]))   # a fault's one slot
    backend.slots.free(slots[1:])
    assert backend.slots.used == 0
    lowest = backend.lower if isinstance(backend, Tiered) else backend
    if isinstance(lowest, ExampleStore):
        assert lowest.pages == {}   # release() heard of every freed slot
    for tier in backend.statistics()["tiers"]:
        assert tier["pages"] == 0, tier
        if tier["tier"] == "compressed":
            assert tier["used_bytes"] == tier["heap_bytes"] == 0, tier


@pytest.mark.timeout(60)
def test_the_compressed_heap_gives_emptied_spans_back_to_the_kernel():
    """The region is a memfd: its pages are the store's memory. Spans
    emptied by freed slots go back (MADV_REMOVE), not only to the heap,
    but for the few it keeps for the next pages stored."""
    n = 8000
    out = PageBuffer(n)
    mixed_pages(out, n, 14)
    held = os.memfd_create("umgr-test", os.MFD_CLOEXEC)
    store = CompressedBackend(size=64 << 20, region_fd=held)
    try:
        def backed() -> int:
            return os.fstat(held).st_blocks * 512
        index = backed()   # the header and the index pages touched so far
        slots = store.slots.alloc(n)
        run_io(store.write, slots, out.addrs(np.arange(n)))
        full = backed()
        assert full - index >= store.held_bytes - ENTRY_OVERHEAD * store.pages_held > 4 * WARM_SPANS * SPAN
        store.slots.free(slots)
        assert store.tier_statistics()[0]["heap_bytes"] == 0
        index_bytes = 12 * store.slots.span   # the index's pages the writes touched (length, where)
        assert backed() - index <= WARM_SPANS * SPAN + index_bytes, (index, full, backed())
    finally:
        store.close()
        os.close(held)


# ---- the compressed store ---------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec, least_ratio", [("lz4", 3), ("zstd", 4)])
def test_compressed_holds_same_filled_pages_as_a_word_and_declines_random_ones(codec, least_ratio):
    n = 400
    out, back = PageBuffer(n), PageBuffer(n)
    mixed_pages(out, n, 6)
    chain = open_specs([f"compressed:codec={codec}", "file"])
    try:
        slots = chain.slots.alloc(n)
        run_io(chain.write, slots, out.addrs(np.arange(n)))
        upper = chain.tier_statistics()[0]
        assert upper["same_filled_pages"] == n // 4
        assert upper["incompressible_pages"] == n // 4   # the random pages went to the file
        assert upper["pages"] == 3 * n // 4
        assert chain.lower.pages_written == n // 4
        assert upper["ratio"] > least_ratio, upper
        run_io(chain.read, slots, back.addrs(np.arange(n)))
        assert np.array_equal(out.bytes, back.bytes)
    finally:
        chain.close()


@pytest.mark.timeout(60)
def test_a_chain_whose_last_tier_is_out_of_room_says_so():
    """A compressed last tier at its cap is out of room, not failing
    (BackendError.full): a chain in front of it says the same, so that
    eviction pauses as on a full store (its clean copies give their room
    back) rather than as on a failing one."""
    n = 256
    out = PageBuffer(n)
    mixed_pages(out, n, 9)
    chain = open_specs(["compressed:cap=64K", "compressed:cap=64K"])
    try:
        slots = chain.slots.alloc(n)
        with pytest.raises(BackendError) as raised:
            for part in np.array_split(np.arange(n), 8):
                run_io(chain.write, slots[part], out.addrs(part))
        assert raised.value.full and "compressed store full" in str(raised.value)
    finally:
        chain.close()


@pytest.mark.timeout(60)
def test_compressed_alone_full_refuses_the_batch_and_keeps_what_it_holds():
    n = 64
    out, back = PageBuffer(n), PageBuffer(n)
    mixed_pages(out, n, 7)
    store = CompressedBackend(size=8 << 20, cap=20 * PAGE)   # room for one half, not both
    first = store.slots.alloc(n // 2)
    run_io(store.write, first, out.addrs(np.arange(n // 2)))
    held = store.held_bytes
    second = store.slots.alloc(n // 2)
    with pytest.raises(BackendError, match="compressed store full") as raised:
        run_io(store.write, second, out.addrs(np.arange(n // 2, n)))
    assert raised.value.full   # out of room, not failing: eviction pauses as on a full store
    assert store.held_bytes == held <= store.cap
    run_io(store.read, first, back.addrs(np.arange(n // 2)))
    assert np.array_equal(out.bytes[: n // 2 * PAGE], back.bytes[: n // 2 * PAGE])
    store.slots.free(first)   # room again
    run_io(store.write, second, out.addrs(np.arange(n // 2, n)))
    run_io(store.read, second, back.addrs(np.arange(n // 2, n)))
    assert np.array_equal(out.bytes, back.bytes)


@pytest.mark.timeout(60)
def test_chain_demotes_the_oldest_pages_and_stays_under_its_cap():
    n = 1024
    out, back = PageBuffer(n), PageBuffer(n)
    mixed_pages(out, n, 8)
    chain = open_specs(["compressed:cap=128K", "file"])
    try:
        slots = chain.slots.alloc(n)
        for part in np.array_split(np.arange(n), 8):
            run_io(chain.write, slots[part], out.addrs(part))
            assert chain.upper.held_bytes <= chain.upper.cap
        assert chain.demoted > 0
        # The newest pages are the ones still in memory.
        held = chain.upper.holds(slots)
        assert held[-16:].any() and not held[:n // 2].any()
        run_io(chain.read, slots, back.addrs(np.arange(n)))
        assert np.array_equal(out.bytes, back.bytes)
    finally:
        chain.close()


@pytest.mark.timeout(60)
def test_a_page_written_again_lives_in_one_tier_only():
    """A slot written again without a free: the new page replaces the old
    one, also when the new one is declined (it goes below) or does not fit."""
    n = 64
    text, noise, back = PageBuffer(n), PageBuffer(n), PageBuffer(n)
    mixed_pages(text, n, 14)
    noise.bytes[:] = np.random.default_rng(15).integers(0, 256, n * PAGE, dtype=np.uint8)
    chain = open_specs(["compressed", "file"])
    try:
        slots = chain.slots.alloc(n)
        run_io(chain.write, slots, text.addrs(np.arange(n)))
        assert chain.upper.holds(slots).sum() == 3 * n // 4
        run_io(chain.write, slots, noise.addrs(np.arange(n)))
        assert not chain.upper.holds(slots).any() and chain.upper.pages_held == 0
        assert chain.upper.held_bytes == 0 and chain.upper.same_filled == 0
        run_io(chain.read, slots, back.addrs(np.arange(n)))
        assert np.array_equal(noise.bytes, back.bytes)
    finally:
        chain.close()


@pytest.mark.timeout(60)
def test_the_age_queue_of_a_chain_forgets_freed_pages():
    """Pages stored and freed over and over (read back, never demoted)
    leave no trace in the order a chain demotes by."""
    n = 256
    out = PageBuffer(n)
    mixed_pages(out, n, 16)
    chain = open_specs(["compressed", "file"])
    try:
        for _ in range(100):
            slots = chain.slots.alloc(n)
            run_io(chain.write, slots, out.addrs(np.arange(n)))
            chain.slots.free(slots)
        upper = chain.upper
        assert upper.pages_held == 0 and upper.held_bytes == 0
        assert upper._aged <= 4096 + 3 * n // 4, "dropped entries pile up in the age queue"
        victims, _ = upper.oldest(1 << 20, 64, np.zeros(chain.slots.span, bool))
        assert len(victims) == 0
    finally:
        chain.close()


@pytest.mark.timeout(60)
def test_slot_freed_during_its_demotion_is_not_reused_before_the_write_ends():
    """A demotion writes old pages to the file while their slots are freed,
    and a batch of pages that go to the file too takes every slot free: no
    slot still being demoted is among them, and the new pages are what
    reads back."""
    n = 128
    old, more, new, back = PageBuffer(n), PageBuffer(n), PageBuffer(n), PageBuffer(n)
    mixed_pages(more, n, 9)
    words = np.random.default_rng(19)
    old.bytes[:] = np.repeat(words.integers(0, 256, n * PAGE // 64, dtype=np.uint8), 64)  # compressible
    new.bytes[:] = words.integers(0, 256, n * PAGE, dtype=np.uint8)                       # incompressible
    chain = open_specs(["compressed:cap=64K", "file"])
    try:
        slots = chain.slots.alloc(n)

        async def race():
            await chain.write(slots, old.addrs(np.arange(n)))
            assert chain.upper.holds(slots).all()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chain.write, chain.slots.alloc(n), more.addrs(np.arange(n)))
                while not chain._in_flight[slots].any():   # `more` demotes `slots`
                    await trio.sleep(0)
                chain.slots.free(slots)
                # Slots are swept ascending: take every other free slot
                # first, so that the next batch gets the freed ones.
                others = chain.slots.alloc(chain.slots.free_count - n)
                again = chain.slots.alloc(n)
                chain.slots.free(others)
                assert chain._in_flight[slots].any() and not chain._in_flight[again].any()
                await chain.write(again, new.addrs(np.arange(n)))
            await chain.read(again, back.addrs(np.arange(n)))

        run_io(race)
        assert np.array_equal(new.bytes, back.bytes)
        assert chain.demoted > 0
    finally:
        chain.close()


@pytest.mark.timeout(60)
def test_failing_lower_store_fails_the_write_and_loses_nothing_held():
    n = 64
    out, back = PageBuffer(n), PageBuffer(n)
    mixed_pages(out, n, 11)
    chain = open_specs(["compressed", "file"])
    try:
        first = chain.slots.alloc(n)
        run_io(chain.write, first, out.addrs(np.arange(n)))
        file = chain.lower
        readonly = os.open(f"/proc/self/fd/{file.fd}", os.O_RDONLY)
        writable, file.fd = file.fd, readonly   # the kernel now refuses its writes (EBADF)
        try:
            second = chain.slots.alloc(n)
            with pytest.raises(BackendError):
                run_io(chain.write, second, out.addrs(np.arange(n)))   # random pages go to the file
        finally:
            file.fd = writable
            os.close(readonly)
        chain.slots.free(second)
        run_io(chain.read, first, back.addrs(np.arange(n)))
        assert np.array_equal(out.bytes, back.bytes)
    finally:
        chain.close()


def half_random_pages(n: int, seed: int) -> PageBuffer:
    """n pages, half random: about 2 KiB each compressed."""
    out = PageBuffer(n)
    pages = out.bytes.reshape(n, PAGE)
    pages[:, :PAGE // 2] = np.random.default_rng(seed).integers(0, 256, (n, PAGE // 2), dtype=np.uint8)
    pages[:, PAGE // 2:] = 0
    return out


def compressed_full_over_file(out: PageBuffer):
    """A compressed tier (a 160K cap) in front of a file, holding out's
    pages (128 KiB compressed: a next batch demotes): the chain and their slots."""
    chain = open_specs(["compressed:cap=160K", "file"])
    first = chain.slots.alloc(len(out.bytes) // PAGE)
    run_io(chain.write, first, out.addrs(np.arange(len(first))))
    return chain, first


@pytest.mark.timeout(60)
def test_a_demotion_whose_write_may_still_land_sets_its_slots_and_buffer_aside():
    """A demotion's lower write that io_uring refused part way (the file
    store's BackendError.may_land): its pages stay in the upper tier, and
    its slots keep a reference for good and its buffer is not used again,
    so the rest of that write, landing later, overwrites nothing of a
    later page's."""
    n = 64
    out, back = half_random_pages(n, 23), PageBuffer(n)
    chain, first = compressed_full_over_file(out)
    try:

        async def refuse(batch):
            raise OSError(12, "Cannot allocate memory")
        chain.lower.ring.submit_and_wait = refuse
        buffers = len(chain._buffers)
        more = chain.slots.alloc(n)
        with pytest.raises(BackendError) as raised:
            run_io(chain.write, more, out.addrs(np.arange(n)))   # the cap is full: `first` goes down
        # (This batch was never written, so the caller may free its slots;
        # the demotion's own are set aside here.)
        assert not raised.value.may_land
        demoted = first[chain.slots.refs(first) == 2]
        assert len(demoted), "the refused demotion's slots keep a reference of their own"
        assert len(chain._buffers) == buffers, "its buffer is not used again"
        run_io(chain.read, first, back.addrs(np.arange(n)))   # still held above
        assert np.array_equal(out.bytes, back.bytes)
    finally:
        chain.close()


@pytest.mark.timeout(60)
def test_a_demotion_whose_write_may_still_land_keeps_slots_freed_meanwhile_and_never_goes_again():
    """As above, but a victim's page was faulted back in (its slot freed)
    while the write was out: its slot keeps the demotion's reference for
    good (a reference taken after the write once raised "incref of a free
    slot", and the evictor killed its target); and the victims still held
    are not demoted again (the late write could land after the next
    demotion's)."""
    n = 64
    out, back = half_random_pages(n, 29), PageBuffer(n)
    chain, first = compressed_full_over_file(out)
    try:
        free_before = chain.slots.free_count

        async def refuse(batch):
            await trio.sleep(0)
            chain.slots.free(first[:1])   # its page came back from the upper tier meanwhile
            raise OSError(12, "Cannot allocate memory")
        chain.lower.ring.submit_and_wait = refuse
        more = chain.slots.alloc(n)
        with pytest.raises(BackendError) as raised:
            run_io(chain.write, more, out.addrs(np.arange(n)))
        assert not raised.value.may_land   # (this batch's own slots were never written)
        assert chain.slots.refs(first[:1])[0] == 1, "the freed victim's slot stays taken"
        assert chain.slots.free_count == free_before - n, "(more's slots taken, first[0]'s still taken)"
        stuck = first[1:][chain.slots.refs(first[1:]) == 2]
        assert len(stuck)
        victims, _ = chain.upper.oldest(1 << 30, 1 << 20, chain._in_flight)
        assert not np.isin(stuck, victims).any(), "a refused demotion's pages are not demoted again"
        run_io(chain.read, first[1:], back.addrs(np.arange(n - 1)))   # still held above
        assert np.array_equal(out.bytes.reshape(n, PAGE)[1:], back.bytes.reshape(n, PAGE)[:n - 1])
    finally:
        chain.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("write", ["lands", "may-land"])
def test_a_slot_freed_while_its_page_is_demoted_is_not_handed_out_before_the_write_ends(write):
    """A victim's page faulted back in (its slot freed) while the demotion's
    lower write is out: the slot stays taken until the write has ended. A
    page given it meanwhile would be overwritten by a write that lands late
    (may-land: never handed out again), in this tier or once demoted. A
    write that lands frees it then, and the upper tier forgets it."""
    n = 64
    out, back = half_random_pages(n, 31), PageBuffer(n)
    chain, first = compressed_full_over_file(out)
    try:
        seen = []
        real_write = chain.lower.write

        async def lower_write(slots, addrs):
            chain.slots.free(first[:1])   # its page came back from the upper tier meanwhile
            seen.append(int(chain.slots.refs(first[:1])[0]))
            await trio.sleep(0)
            if write == "may-land":
                raise BackendError("refused part way", may_land=True)
            await real_write(slots, addrs)
        chain.lower.write = lower_write
        more = chain.slots.alloc(n)
        if write == "may-land":
            with pytest.raises(BackendError):
                run_io(chain.write, more, out.addrs(np.arange(n)))
        else:
            run_io(chain.write, more, out.addrs(np.arange(n)))
        assert seen[0] == 1, "the demotion's own reference keeps the freed slot taken while its write is out"
        if write == "may-land":
            assert chain.slots.refs(first[:1])[0] == 1, "and for good, as the write may still land"
        else:
            assert chain.slots.refs(first[:1])[0] == 0 and not chain.upper.holds(first[:1])[0]
            run_io(chain.read, first[1:], back.addrs(np.arange(n - 1)))   # the others, wherever they went
            assert np.array_equal(out.bytes.reshape(n, PAGE)[1:], back.bytes.reshape(n, PAGE)[:n - 1])
    finally:
        chain.close()


@pytest.mark.timeout(60)
def test_the_compressed_store_at_its_cap_takes_a_page_written_again_to_a_slot_it_holds():
    """A slot written again (the evictor stores a page a device changed
    during its eviction over its stale copy) gives its old entry back
    first: at the cap, a page of the same size still fits."""
    n = 128
    out, back = half_random_pages(n, 37), PageBuffer(1)
    store = open_specs(["compressed:cap=160K"])
    try:
        slots = store.slots.alloc(n)
        held = 0
        with pytest.raises(BackendError):
            for held in range(n):
                run_io(store.write, slots[held:held + 1], out.addrs(np.arange(held, held + 1)))
        assert 0 < held < n, "the cap was reached"
        run_io(store.write, slots[:1], out.addrs(np.arange(1, 2)))   # the second page's content, in the first slot
        run_io(store.read, slots[:1], back.addrs(np.arange(1)))
        assert np.array_equal(back.bytes, out.bytes[4096:8192])
    finally:
        store.close()


def test_bad_specs_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        open_specs(["nope"])
    with pytest.raises(ValueError, match="no option 'colour'; it takes: size, cap, codec, level$"):
        open_specs(["compressed:colour=blue"])   # (not region_fd or reuse: umgr sets them)
    with pytest.raises(ValueError, match="not key=value"):
        open_specs(["compressed:cap"])
    with pytest.raises(ValueError, match="cannot sit in front"):
        open_specs(["file", "compressed"])
    for internal in ("region_fd=0", "reuse=1"):   # a descriptor of umgr's own; what a restart takes over
        with pytest.raises(ValueError, match="is set by umgr itself"):
            open_specs([f"compressed:{internal}"])


def test_umgr_exec_refuses_a_bad_backend_in_one_line():
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "umgr", "exec", "--backend", "compressed:level", "--", "true"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 125
    assert result.stderr.strip() == ("umgr exec: argument --backend: backend option 'level' in 'compressed:level' "
                                     "is not key=value (see umgr exec --help)")


@pytest.mark.timeout(60)
def test_tier_metrics_report_what_each_tier_holds():
    from umgr.metrics import _tier_families
    n = 200
    out = PageBuffer(n)
    mixed_pages(out, n, 12)
    chain = open_specs(["compressed:cap=64K", "file"])
    try:
        slots = chain.slots.alloc(n)
        for part in np.array_split(np.arange(n), 2):   # the second half demotes
            run_io(chain.write, slots[part], out.addrs(part))
        samples = {(sample.name, sample.labels["tier"]): sample.value
                   for family in _tier_families(chain.statistics()["tiers"]) for sample in family.samples}
        assert samples[("umgr_backend_tier_used_bytes", "compressed")] == chain.upper.held_bytes
        assert samples[("umgr_backend_tier_capacity_bytes", "compressed")] == 64 << 10
        assert samples[("umgr_backend_tier_compression_ratio", "compressed")] > 1
        heap = samples[("umgr_backend_tier_heap_bytes", "compressed")]   # whole spans, holding every chunk
        assert heap % SPAN == 0 and heap >= chain.upper.held_bytes - ENTRY_OVERHEAD * chain.upper.pages_held > 0
        assert samples[("umgr_backend_tier_demoted_pages_total", "compressed")] == chain.demoted > 0
        assert samples[("umgr_backend_tier_pages", "file")] == n - chain.upper.pages_held
    finally:
        chain.close()


def test_two_tiers_of_one_store_have_metrics_of_their_own():
    """A chain of two compressed tiers: each tier's series is its own
    ("compressed", "compressed#2"); with one name, Prometheus kept one."""
    from umgr.metrics import _tier_families
    chain = open_specs(["compressed:cap=64K", "compressed:cap=64K,codec=zstd", "file"])
    try:
        names = [tier["tier"] for tier in chain.statistics()["tiers"]]
        assert names == ["compressed", "compressed#2", "file"]
        caps = [sample for family in _tier_families(chain.statistics()["tiers"]) for sample in family.samples
                if sample.name == "umgr_backend_tier_capacity_bytes"]
        assert len({sample.labels["tier"] for sample in caps}) == len(caps) == 3
    finally:
        chain.close()


def test_status_shows_each_tier_of_a_chain():
    from umgr.cli import format_status
    chain = open_specs(["compressed:cap=64K", "file"])
    try:
        n = 64
        out = PageBuffer(n)
        mixed_pages(out, n, 13)
        run_io(chain.write, chain.slots.alloc(n), out.addrs(np.arange(n)))
        snapshot = {"targets": [], "backend": chain.statistics()}
        lines = format_status(snapshot, snapshot, 1.0).splitlines()
        assert lines[1].startswith("backend compressed+file: 256K of 8M used")
        assert lines[2].startswith(f"  compressed: {chain.upper.pages_held} pages in ")
        heap = chain.statistics()["tiers"][0]["heap_bytes"]   # the spans its chunks took (a class a span)
        assert f"(heap {heap >> 10}K) of 64K" in lines[2], lines[2]
        assert lines[3].startswith(f"  file: {n - chain.upper.pages_held} pages in ")
    finally:
        chain.close()


# ---- a restart with the store intact ------------------------------------------------------
# Every store: a compressed one in a memfd held for it (as umgr exec holds one).
PERSISTENT = [name for name, specs in BACKENDS.items()
              if persists([s.replace("REDIS", "1") for s in specs], memory_held=True)]


@pytest.mark.parametrize("name", PERSISTENT)
def test_a_restarted_daemon_finds_the_store_intact(request, tmp_path, name):
    """What a restarted daemon does (umgr/cli.py, _open_backend): the store
    reopened under the same name (the file's, the keys' instance) with
    `reuse`, the saved tables' slots adopted. Every page written before
    reads back, no adopted slot is handed out again, and remove() (a clean
    stop) leaves nothing of it."""
    specs = BACKENDS[name]
    if any("REDIS" in spec for spec in specs):
        port = str(request.getfixturevalue("redis_cluster").port)
        specs = [spec.replace("REDIS", port) for spec in specs]
    held = os.memfd_create("umgr-test", os.MFD_CLOEXEC)
    request.addfinalizer(lambda: os.close(held))
    options = {"size": 8 << 20, "directory": str(tmp_path), "swap_name": "swap", "instance": "conformance",
               "region_fd": held}
    n = 300
    out = PageBuffer(n)
    mixed_pages(out, n, 21)
    first = open_chain(specs, {**options, "reuse": False}, _backend_value)
    try:
        slots = first.slots.alloc(n + 20)
        run_io(first.write, slots, out.addrs(np.arange(n + 20) % n))
        first.slots.free(slots[n:])
        slots = slots[:n]
    finally:
        first.close()   # a crash leaves it so too: the writes were durable when write() returned
    again = open_chain(specs, {**options, "reuse": True}, _backend_value)
    try:
        assert again.slots.capacity == first.slots.capacity
        again.slots.adopt([slots[:-10]])   # the last 10: a saved table that did not come back
        again.slots_adopted()
        slots = slots[:-10]
        if "compressed" in name:
            assert again.statistics()["tiers"][0]["pages"] > 0
        # Pages written after the restart take no chunk a page from before holds.
        more = again.slots.alloc(n)
        run_io(again.write, more, out.addrs(np.arange(n)[::-1]))
        back = PageBuffer(n)
        order = np.random.default_rng(3).permutation(n - 10)
        run_io(again.read, slots[order], back.addrs(order))
        assert np.array_equal(out.bytes[:(n - 10) * PAGE], back.bytes[:(n - 10) * PAGE])
        run_io(again.read, more, back.addrs(np.arange(n)[::-1]))
        assert np.array_equal(out.bytes, back.bytes)
        again.slots.free(more)
        fresh = again.slots.alloc(again.slots.capacity - len(slots))
        assert not np.isin(fresh, slots).any() and 0 not in fresh
        again.slots.free(fresh)
        assert again.slots.used == len(slots)
        for tier in again.statistics()["tiers"][:1]:
            if tier["tier"] == "compressed":   # nothing held but the adopted slots' pages
                assert tier["pages"] <= len(slots), tier
        again.remove()
        if name == "redis":
            assert request.getfixturevalue("redis_cluster").keys("umgr:conformance:*") == 0
        else:
            assert not (tmp_path / "swap").exists()
    finally:
        again.close()


@pytest.mark.timeout(60)
def test_the_fast_path_finds_every_page_where_the_store_says(backend):
    """The fault path's C call reads a swapped page itself where the store
    tells it how (umgr/paging/fastpath.py StoreView): unpacked from a memory
    tier's entries, or a pread of its file. Each page it would read so
    comes back exactly; a freed slot leaves the memory tier's entries."""
    n = 400
    out, back = PageBuffer(n), PageBuffer(n)
    mixed_pages(out, n, 8)
    slots = backend.slots.alloc(n)
    run_io(backend.write, slots, out.addrs(np.arange(n)))
    view = StoreView()
    store = view.follow(backend)
    entries = backend.memory_entries()
    in_memory = entries is not None and entries[0][slots] != 0
    from_memory = from_file = 0
    for i, slot in enumerate(slots.tolist()):
        page = back.addrs(np.array([i]))[0]
        if entries is not None and entries[0][slot]:
            assert uffdmod.unpack_entry(store, slot, int(page)), f"slot {slot} did not unpack"
            from_memory += 1
        elif store.fd >= 0:
            assert os.preadv(store.fd, [back.bytes[i * PAGE:(i + 1) * PAGE]], slot * PAGE) == PAGE
            from_file += 1
        else:
            continue   # the full path's (a Redis store)
        assert np.array_equal(out.bytes[i * PAGE:(i + 1) * PAGE], back.bytes[i * PAGE:(i + 1) * PAGE]), i
    if "compressed" in backend.name:
        assert from_memory > 0 and in_memory.sum() == from_memory
    if backend.name.endswith("file"):
        assert from_memory + from_file == n   # every page: nothing for the full path
    backend.slots.free(slots)
    if entries is not None:
        assert not entries[0].any()
        assert not uffdmod.unpack_entry(store, int(slots[0]), int(back.addr))


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_a_damaged_entry_does_not_unpack(codec):
    """C refuses what does not decompress to exactly one page: the fault
    goes to the full path, which reports the store's error."""
    n = 4
    out, back = PageBuffer(n), PageBuffer(n)
    mixed_pages(out, n, 9)   # page 1: text, compressed
    store = CompressedBackend(size=1 << 20, codec=codec)
    slots = store.slots.alloc(n)
    run_io(store.write, slots, out.addrs(np.arange(n)))
    length, where, _ = store.memory_entries()
    text = int(slots[1])
    assert 0 < length[text] % ENTRY_LZ4 < PAGE
    assert (length[text] > ENTRY_LZ4) == (codec == "lz4")   # an entry says which codec made it
    view = StoreView()
    length[text] -= 1   # a truncated frame
    assert not uffdmod.unpack_entry(view.follow(store), text, int(back.addr))
    length[text] += 1
    assert uffdmod.unpack_entry(view.follow(store), text, int(back.addr))
    assert np.array_equal(out.bytes[PAGE:2 * PAGE], back.bytes[:PAGE])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("specs", [["compressed"], ["compressed", "file"]])
def test_a_store_taken_over_loses_entries_its_heap_could_not_have_made(tmp_path, specs):
    """A restarted daemon's store trusts no entry blindly: one naming a
    chunk off its class's grid, or with a length C never makes, is marked
    lost, and so are both entries naming one chunk. Their pages cannot come back: reading one is an
    error, never another page's bytes, nor the older copy of the slot the
    file behind holds (a chain's lower store has every slot). The rest
    read back, and new pages take no chunk of theirs."""
    n = 64
    out, back, older = PageBuffer(n), PageBuffer(n), PageBuffer(n)
    mixed_pages(out, n, 12)
    mixed_pages(older, n, 13)
    held = os.memfd_create("umgr-test", os.MFD_CLOEXEC)
    options = {"size": 1 << 20, "directory": str(tmp_path), "swap_name": "swap", "region_fd": held}
    try:
        first = open_chain(specs, {**options, "reuse": False}, _backend_value)
        slots = first.slots.alloc(n)
        if len(specs) > 1:   # the file holds an older page in every slot
            run_io(first.lower.write, slots, older.addrs(np.arange(n)))
        run_io(first.write, slots, out.addrs(np.arange(n)))
        length, where, _ = first.memory_entries()
        text = [int(s) for i, s in enumerate(slots) if i % 4 == 1]   # compressed: each owns a chunk
        assert (length[text] > 0).all()
        where[text[0]] += 8                                      # off the grid
        length[text[1]], where[text[1]] = length[text[2]], where[text[2]]   # the same chunk as text[2]
        length[text[3]] = -7                                     # no length C makes
        first.close()
        again = open_chain(specs, {**options, "reuse": True}, _backend_value)
        store = again.upper if len(specs) > 1 else again
        assert store._region.lost == 4
        again.slots.adopt([slots])
        again.slots_adopted()
        for lost in text[:4]:
            with pytest.raises(BackendError, match=f"lost the page in slot {lost}"):
                run_io(again.read, np.array([lost], np.int32), back.addrs(np.arange(1)))
            assert not uffdmod.unpack_entry(StoreView().follow(again), lost, int(back.addr))
        kept = np.array([s for s in slots if s not in text[:4]], np.int32)
        more = again.slots.alloc(n)
        run_io(again.write, more, out.addrs(np.arange(n)))
        index = {int(s): i for i, s in enumerate(slots)}
        run_io(again.read, kept, back.addrs(np.arange(len(kept))))
        for k, slot in enumerate(kept.tolist()):
            i = index[slot]
            assert np.array_equal(out.bytes[i * PAGE:(i + 1) * PAGE], back.bytes[k * PAGE:(k + 1) * PAGE]), slot
        again.close()
        os.pwrite(held, b"not a store", 0)
        with pytest.raises(BackendError, match="holds no store"):
            CompressedBackend(size=1 << 20, region_fd=held, reuse=True)
    finally:
        os.close(held)


def test_a_chain_taken_over_demotes_its_oldest_pages_first(tmp_path):
    """The compressed tier keeps when each entry was stored in its region
    (seq), so a chain a restarted daemon takes over demotes in the order
    the pages came, as the dead daemon would have: batches stored in the
    order A, B, C into slots numbered the other way come back oldest first
    from oldest(), not in slot order."""
    held = os.memfd_create("umgr-test", os.MFD_CLOEXEC)
    options = {"size": 8 << 20, "directory": str(tmp_path), "swap_name": "swap", "region_fd": held}
    out = PageBuffer(96)
    mixed_pages(out, 96, 5)
    first = open_chain(["compressed", "file"], {**options, "reuse": False}, _backend_value)
    try:
        slots = first.slots.alloc(96)
        batches = [slots[64:], slots[32:64], slots[:32]]   # A (the highest slots), B, C: stored in this order
        for i, batch in enumerate(batches):
            run_io(first.write, batch, out.addrs(np.arange(32) + 32 * i))
    finally:
        first.close()
    again = open_chain(["compressed", "file"], {**options, "reuse": True}, _backend_value)
    try:
        again.slots.adopt([slots])
        again.slots_adopted()
        upper = again.upper
        kept = [batch[upper.holds(batch)] for batch in batches]   # (what did not compress went to the file)
        assert all(len(k) for k in kept), kept
        oldest, _ = upper.oldest(1 << 30, sum(map(len, kept)), np.zeros(again.slots.span, bool))
        assert np.array_equal(oldest, np.concatenate(kept)), (oldest, kept)
        back = PageBuffer(96)
        run_io(again.read, slots, back.addrs(np.arange(96)))
        expected = np.concatenate([out.bytes[(64 + i) * PAGE:(65 + i) * PAGE] for i in range(32)] +
                                  [out.bytes[(32 + i) * PAGE:(33 + i) * PAGE] for i in range(32)] +
                                  [out.bytes[i * PAGE:(i + 1) * PAGE] for i in range(32)])
        assert np.array_equal(back.bytes[:96 * PAGE], expected)
        again.remove()
    finally:
        again.close()
        os.close(held)


def test_a_store_whose_constructor_needs_a_size_gets_one_without_swap_size(example_store_installed, tmp_path):
    """Without --swap-size each store takes its own default size (the
    file's depends on its disk); a store written as the README says, whose
    `size` has no default, gets 4 GiB rather than a TypeError."""
    from umgr.backends import DEFAULT_SIZE, open_backend
    store = open_backend("example", directory=str(tmp_path))
    try:
        assert store.slots.capacity == DEFAULT_SIZE // PAGE
    finally:
        store.close()
