"""The eviction read: how the daemon copies victims out of a target.

A batch of victims (512 pages, as the evictor takes) is read from another
process by

  process_vm_readv  by pid, one call per batch: what umgr did before it
                    bound reads to the checked process. Unsafe: after an
                    exec the pid runs another program, which it reads.
  mem               one pread per contiguous run through /proc/PID/mem
                    opened at attach (reaches only that mm; copies through a
                    kernel page, one page walk per page).
  checked           the evictor's read: a random token written at a canary
                    page through /proc/PID/mem, then one process_vm_readv
                    that reads the token back ahead of the batch.

shaped as one 512-page run ("runs") or 512 scattered single pages
("scattered"), alternating the methods in rounds; median µs per page and
the ratio to process_vm_readv in the same run.

With --compare NAME=UMGR ..., it also runs a sequential scan
(bench/programs/scan.c) under `UMGR exec --max-resident BUDGET` for each
umgr executable (each a build: its own venv's bin/umgr), alternating, and
prints wall and phase times as ratios to the first. A scan that was not
managed (no target, or no page out) fails the comparison.

    python bench/bench_readpath.py [--rounds 7] [--batches 64]
    python bench/bench_readpath.py --compare old=../old/.venv/bin/umgr new=.venv/bin/umgr
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_paging import compile_programs, umgr_exec  # noqa: E402  (bench/ is not a package)

PAGE = 4096
BATCH = 512
METHODS = ("process_vm_readv", "mem", "checked")
SHAPES = ("runs", "scattered")

HOLDER = r"""
import mmap, sys
data = mmap.mmap(-1, int(sys.argv[1]) << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, len(data), 4096):
    data[off] = off >> 12 & 0xFF or 1
canary = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
import ctypes
print(ctypes.addressof(ctypes.c_char.from_buffer(data)), ctypes.addressof(ctypes.c_char.from_buffer(canary)), flush=True)
sys.stdin.read()
"""


def batches(shape: str, base: int, npages: int, count: int, rng) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _ in range(count):
        if shape == "runs":
            first = int(rng.integers(0, npages - BATCH))
            addrs, lens = np.array([base + first * PAGE], np.uint64), np.array([BATCH * PAGE], np.uint64)
        else:
            pages = np.sort(rng.choice(npages, BATCH, replace=False))
            pages = pages[np.diff(pages, prepend=-2) > 1]  # single pages: no two adjacent
            addrs, lens = (base + pages * PAGE).astype(np.uint64), np.full(len(pages), PAGE, np.uint64)
        out.append((addrs, lens))
    return out


def read_micro(rounds: int, nbatches: int, data_mib: int) -> dict:
    from umgr.kernel import procmem
    from umgr.kernel.buffers import PageBuffer

    with subprocess.Popen([sys.executable, "-c", HOLDER, str(data_mib)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            base, canary = map(int, holder.stdout.readline().split())
            mem_fd = procmem.open_mem(holder.pid)
            buf = PageBuffer(BATCH)
            read = {
                "process_vm_readv": lambda a, l: procmem.process_vm_readv(holder.pid, buf.addr, a, l),
                "mem": lambda a, l: procmem.mem_readv(mem_fd, buf.addr, a, l, holder.pid),
                "checked": lambda a, l: procmem.checked_readv(holder.pid, mem_fd, canary, buf.addr, a, l),
            }
            rng = np.random.default_rng(1)
            per_page = {(s, m): [] for s in SHAPES for m in METHODS}
            for r in range(rounds):
                for shape in SHAPES:
                    work = batches(shape, base, (data_mib << 20) // PAGE, nbatches, rng)
                    pages = sum(int(l.sum()) // PAGE for _, l in work)
                    for method in METHODS[r % 3:] + METHODS[:r % 3]:
                        started = time.perf_counter()
                        for addrs, lens in work:
                            if read[method](addrs, lens) != int(lens.sum()):
                                raise RuntimeError(f"{method}: short read")
                        per_page[shape, method].append((time.perf_counter() - started) / pages * 1e6)
            buf.close()
            os.close(mem_fd)
        finally:
            holder.kill()
    return {f"{s} {m}": statistics.median(v) for (s, m), v in per_page.items()}


def scan_compare(builds: list[tuple[str, str]], runs: int, data_mib: int, budget_mib: int, passes: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="umgr-readpath-") as work:
        scan = compile_programs(work, ("scan",))["scan"]
        results = {name: [] for name, _ in builds}
        for _ in range(runs):
            for name, umgr in builds:
                started = time.perf_counter()
                result, stats, _ = umgr_exec([umgr], budget_mib, data_mib + 256, [],
                                             [scan, str(data_mib), str(passes)], os.path.join(work, "s.json"),
                                             f"scan under {name}", data_mib=data_mib)
                results[name].append({"wall": time.perf_counter() - started, "first_touch": result["first_touch_s"],
                                      "passes": sum(result["pass_s"]), "pages_out": stats["pages_out"]})
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batches", type=int, default=64, help="batches of 512 pages per shape and round")
    p.add_argument("--data-mib", type=int, default=256, help="the read target's memory")
    p.add_argument("--compare", nargs="*", default=[], metavar="NAME=UMGR")
    p.add_argument("--runs", type=int, default=3, help="scans per build (--compare)")
    p.add_argument("--scan-mib", type=int, default=512)
    p.add_argument("--budget-mib", type=int, default=64)
    p.add_argument("--passes", type=int, default=2)
    args = p.parse_args(argv)

    micro = read_micro(args.rounds, args.batches, args.data_mib)
    print(f"eviction read, {BATCH}-page batches, median µs per page over {args.rounds} rounds (ratio to process_vm_readv)")
    for shape in SHAPES:
        base = micro[f"{shape} process_vm_readv"]
        print(f"  {shape:<10} " + "  ".join(f"{m} {micro[f'{shape} {m}']:.2f} ({micro[f'{shape} {m}'] / base:.2f}x)"
                                            for m in METHODS), flush=True)
    if args.compare:
        builds = [tuple(item.split("=", 1)) for item in args.compare]
        scans = scan_compare(builds, args.runs, args.scan_mib, args.budget_mib, args.passes)
        first = scans[builds[0][0]]
        print(f"scan {args.scan_mib} MiB at {args.budget_mib} MiB, {args.passes} passes, median of {args.runs} "
              f"(ratio to {builds[0][0]})")
        for name, s in scans.items():
            print(f"  {name:<10} wall {s['wall']:.2f} s ({s['wall'] / first['wall']:.3f}x)  first touch "
                  f"{s['first_touch']:.2f} s ({s['first_touch'] / first['first_touch']:.3f}x)  passes "
                  f"{s['passes']:.2f} s ({s['passes'] / first['passes']:.3f}x)  pages out {s['pages_out']:.0f}")
        micro["scan"] = scans
    print(json.dumps(micro))
    return 0


if __name__ == "__main__":
    sys.exit(main())
