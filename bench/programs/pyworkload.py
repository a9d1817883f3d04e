"""An ordinary CPython workload for bench/bench_shapes.py, about 600 MB at
its peak at scale 1 (nothing in it knows about umgr):

  build    a list of 6 million random Python ints (each its own object)
  sort     sort it (the comparisons chase pointers all over the heap)
  dict     a dict mapping every third of them to a string
  bytes    a 96 MiB bytearray filled with a per-page pattern, hashed as
           it is filled
  verify   the list is sorted and sums as before, every dict entry is
           right, the bytearray hashes as it did and its pages are in place

    python pyworkload.py [SCALE] [SEED]

SCALE multiplies the sizes (0.05 for a smoke run). Prints one JSON line:
{"ok": true, "seconds": total, "phases": {...}, "minflt": {...},
"majflt": {...}, "peak_rss_kb": ..., ...} (minflt and majflt: getrusage
deltas per phase, as bench/programs/shapes.c gives them);
a failed check prints a message on stderr and exits 1.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import resource
import struct
import sys
import time

PAGE = 4096


def fail(msg: str) -> None:
    print(f"pyworkload: {msg}", file=sys.stderr)
    sys.exit(1)


def page_pattern(i: int, block: bytes) -> bytes:
    # Page i: its number, then a slice of the block that depends on i, so a
    # page served from the wrong place (or as zeros) does not hash the same.
    off = (i * 8) % 1024
    return struct.pack("<Q", i + 1) + block[off:off + PAGE - 8]


def main(argv: list[str]) -> int:
    scale = float(argv[1]) if len(argv) > 1 else 1.0
    seed = int(argv[2]) if len(argv) > 2 else 1
    n = max(1000, int(6_000_000 * scale))
    buf_pages = max(16, int(96 * 256 * scale))
    rng = random.Random(seed)
    phases: dict[str, float] = {}
    minflt: dict[str, int] = {}
    majflt: dict[str, int] = {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t_start = t = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t, usage
        now, now_usage = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
        phases[name] = round(now - t, 6)
        minflt[name] = now_usage.ru_minflt - usage.ru_minflt
        majflt[name] = now_usage.ru_majflt - usage.ru_majflt
        t, usage = now, now_usage

    # build: values in 2**30..2**40, so none is a cached small int.
    getrandbits = rng.getrandbits
    ints = [getrandbits(40) | (1 << 30) for _ in range(n)]
    total = sum(ints)
    lap("build")

    ints.sort()
    lap("sort")

    table = {x: f"v{x:x}" for x in ints[::3]}
    lap("dict")

    block = rng.randbytes(PAGE + 1024)
    buf = bytearray(buf_pages * PAGE)
    h = hashlib.sha256()
    for i in range(buf_pages):
        chunk = page_pattern(i, block)
        buf[i * PAGE:(i + 1) * PAGE] = chunk
        h.update(chunk)
    digest = h.hexdigest()
    lap("bytes")

    # verify, in the order the data was made (the list's pages are the
    # coldest by now).
    if len(ints) != n or sum(ints) != total:
        fail(f"list: {len(ints)} items summing to {sum(ints)}, expected {n} summing to {total}")
    prev = -1
    for i, x in enumerate(ints):
        if x < prev:
            fail(f"list: not sorted at index {i}: {prev} > {x}")
        prev = x
    keys = itertools.islice(ints, 0, None, 3)
    distinct = sum(1 for _ in itertools.groupby(keys))  # sorted: equal keys are adjacent
    if len(table) != distinct:
        fail(f"dict: {len(table)} entries, expected {distinct}")
    for k, v in table.items():
        if v != f"v{k:x}":
            fail(f"dict: {k} -> {v!r}")
    for k in rng.sample(ints, min(len(ints), 10000)):
        if k in table and table[k] != f"v{k:x}":
            fail(f"dict: lookup {k} -> {table[k]!r}")
    if hashlib.sha256(buf).hexdigest() != digest:
        for i in range(buf_pages):
            if buf[i * PAGE:(i + 1) * PAGE] != page_pattern(i, block):
                fail(f"bytearray: page {i} of {buf_pages} is wrong")
        fail("bytearray: hash differs")
    lap("verify")

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"ok": True, "seconds": round(time.monotonic() - t_start, 6), "phases": phases,
                      "minflt": minflt, "majflt": majflt, "peak_rss_kb": peak_kb, "scale": scale, "ints": n,
                      "dict_entries": len(table),
                      "bytes_mib": buf_pages * PAGE / (1 << 20)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
