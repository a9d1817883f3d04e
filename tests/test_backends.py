"""Conformance suite run against every backend, on real I/O."""
import numpy as np
import pytest
import trio

from umgr.backends import open_backend
from umgr.kernel.buffers import PageBuffer
from umgr.errors import BackendError, BackendFull

BACKENDS = ["file"]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    b = open_backend(request.param, size=4 << 20, directory="/var/tmp/umgr-test")
    yield b
    b.close()


def pattern(buf: PageBuffer, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    buf.bytes[: n * 4096] = rng.integers(0, 256, n * 4096, dtype=np.uint8)


@pytest.mark.timeout(60)
def test_pages_come_back_exactly(backend):
    n = 300
    out, back = PageBuffer(n), PageBuffer(n)
    pattern(out, n, 1)
    slots = backend.slots.alloc(n)
    order = np.random.default_rng(2).permutation(n)   # scattered slots and buffer pages

    async def roundtrip():
        await backend.write(slots[order], out.addrs(order))
        await backend.read(slots, back.addrs(np.arange(n)))

    trio.run(roundtrip)
    assert np.array_equal(out.bytes, back.bytes)
    assert backend.statistics()["pages_written"] == n


@pytest.mark.timeout(60)
def test_concurrent_batches(backend):
    n = 64
    bufs = [PageBuffer(n) for _ in range(4)]
    backs = [PageBuffer(n) for _ in range(4)]
    slot_sets = [backend.slots.alloc(n) for _ in range(4)]
    for i, b in enumerate(bufs):
        pattern(b, n, 10 + i)

    async def one(i):
        await backend.write(slot_sets[i], bufs[i].addrs(np.arange(n)))
        await backend.read(slot_sets[i], backs[i].addrs(np.arange(n)))

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)

    trio.run(main)
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
        trio.run(read_past_end)


@pytest.mark.timeout(60)
def test_pages_read_one_at_a_time_come_back_exactly(backend):
    """A fault reads one page: the file backend does that with a pread while
    reads stay fast, through io_uring once they are slow; both exact."""
    n = 32
    out, back = PageBuffer(n), PageBuffer(n)
    pattern(out, n, 3)
    slots = backend.slots.alloc(n)

    async def roundtrip():
        await backend.write(slots, out.addrs(np.arange(n)))
        for i in range(n):
            if backend.name == "file" and i == n // 2:
                backend._slow_share = 1.0   # as if the device had turned slow
            await backend.read(slots[i:i + 1], back.addrs(np.array([i])))

    trio.run(roundtrip)
    assert np.array_equal(out.bytes, back.bytes)
    assert backend.statistics()["pages_read"] == n
