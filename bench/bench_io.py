"""4 KiB random I/O on an O_DIRECT file: umgr.kernel.ring (io_uring, batches of 64
through trio) against os.preadv / os.pwritev one request at a time.

    python bench/bench_io.py --seconds 3 --size-mib 256

The file is created under /var/tmp (on the disk: /tmp may be tmpfs, which
refuses O_DIRECT), filled with real data (unwritten extents would read back
without any I/O) and deleted afterwards.
"""
import argparse
import mmap
import os
import tempfile
import time

import numpy as np
import trio

from umgr.kernel.ring import Batch, Op, Ring, address

PAGE = 4096


def _fill(fd, size):
    chunk = mmap.mmap(-1, 1 << 20)
    rng = np.random.default_rng(0)
    for off in range(0, size, len(chunk)):
        chunk[:] = rng.integers(0, 256, len(chunk), dtype=np.uint8).tobytes()
        n = min(len(chunk), size - off)
        assert os.pwritev(fd, [memoryview(chunk)[:n]], off) == n
    os.fsync(fd)


def _sync_ops(fd, npages, seconds, write):
    buf = mmap.mmap(-1, PAGE)
    rng = np.random.default_rng(1)
    offs = (rng.integers(0, npages, 1 << 16) * PAGE).tolist()
    call = os.pwritev if write else os.preadv
    ops = 0
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    while True:
        for off in offs[:256]:
            if call(fd, [buf], off) != PAGE:
                raise OSError("short transfer")
        ops += 256
        offs = offs[256:] + offs[:256]
        if time.perf_counter() >= end:
            break
    return ops / (time.perf_counter() - start)


def _uring_ops(ring, fd, npages, seconds, write, depth):
    buf = mmap.mmap(-1, depth * PAGE)
    ring.register_buffers([buf])
    addrs = address(buf) + np.arange(depth, dtype=np.uint64) * PAGE
    op = Op.WRITE_FIXED if write else Op.READ_FIXED
    rng = np.random.default_rng(2)

    async def main():
        ops = 0
        end = time.perf_counter() + seconds
        start = time.perf_counter()
        while time.perf_counter() < end:
            offs = rng.integers(0, npages, depth) * PAGE
            res = await ring.submit_and_wait(Batch(op, fd, addrs, PAGE, offs, 0))
            if (res != PAGE).any():
                raise OSError(-int(res[res != PAGE][0]), "io_uring request failed")
            ops += depth
        return ops / (time.perf_counter() - start)

    try:
        return trio.run(main)
    finally:
        ring.unregister_buffers()


def run(seconds: float = 3.0, size: int = 256 << 20, depth: int = 64,
        directory: str = "/var/tmp") -> dict:
    """Measure and return ops/s for each mode and the io_uring/psync ratios."""
    size -= size % PAGE
    npages = size // PAGE
    fd_dir = tempfile.mkdtemp(prefix="umgr-bench-io-", dir=directory)
    path = os.path.join(fd_dir, "data")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _fill(fd, size)
        os.close(fd)
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        with Ring(max(depth, 64)) as ring:
            out = {
                "size": size,
                "seconds": seconds,
                "depth": depth,
                "uring_read_ops": _uring_ops(ring, fd, npages, seconds, False, depth),
                "preadv_ops": _sync_ops(fd, npages, seconds, False),
                "uring_write_ops": _uring_ops(ring, fd, npages, seconds, True, depth),
                "pwritev_ops": _sync_ops(fd, npages, seconds, True),
            }
            out["ring"] = ring.statistics()
    finally:
        os.close(fd)
        os.unlink(path)
        os.rmdir(fd_dir)
    out["read_ratio"] = out["uring_read_ops"] / out["preadv_ops"]
    out["write_ratio"] = out["uring_write_ops"] / out["pwritev_ops"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--depth", type=int, default=64, help="rows per io_uring batch")
    p.add_argument("--dir", default="/var/tmp")
    a = p.parse_args(argv)
    r = run(seconds=a.seconds, size=a.size_mib << 20, depth=a.depth, directory=a.dir)
    print(f"O_DIRECT 4 KiB random I/O, {r['size'] >> 20} MiB file, "
          f"{r['seconds']:g} s each, io_uring batches of {r['depth']}")
    print(f"  read : io_uring {r['uring_read_ops']:10.0f} ops/s   "
          f"os.preadv  {r['preadv_ops']:10.0f} ops/s   ratio {r['read_ratio']:.2f}x")
    print(f"  write: io_uring {r['uring_write_ops']:10.0f} ops/s   "
          f"os.pwritev {r['pwritev_ops']:10.0f} ops/s   ratio {r['write_ratio']:.2f}x")
    return r


if __name__ == "__main__":
    main()
