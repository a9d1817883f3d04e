"""`umgr bench [NAME [OPTIONS...]]`: the benchmarks that ship with umgr.

They are the repository's bench/ scripts, installed as the package
umgr.benchmarks together with the C programs they compile (gcc is needed),
so they run the same from a wheel as from a checkout. With no NAME, the two
quick micro-benchmarks run with their defaults; `umgr bench NAME --help`
lists a benchmark's options."""
from __future__ import annotations

import importlib
import sys

from umgr.console import EXIT_UMGR

# name -> (module in umgr.benchmarks, what it compares)
BENCHMARKS = {
    "faults": ("bench_faults", "Python fault service against a C handler (the floor)"),
    "io": ("bench_io", "io_uring against preadv/pwritev, 4 KiB O_DIRECT"),
    "shapes": ("bench_shapes", "access shapes, a CPython and a JVM workload, umgr against kernel swap"),
    "redis": ("bench_redis", "redis-server (a real cache) under umgr against kernel swap, every value checked"),
    "paging": ("bench_paging", "sequential scans under umgr against kernel swap"),
    "zap": ("bench_zap", "zapping evicted pages: REMOVE events and their readers"),
    "backends": ("bench_backends", "random faults served from each backend and chain"),
    "readpath": ("bench_readpath", "the eviction read: process_vm_readv, /proc/PID/mem, the checked read"),
    "persist": ("bench_persist", "saved page tables (a restart can take programs back) against --no-persist"),
    "footprint": ("bench_footprint", "the daemon's memory per managed page and CPU per evicted page"),
    "procs": ("bench_procs", "several processes paging at once, each under its own budget, against kernel swap"),
    "spawn": ("bench_spawn", "starting processes (fork, fork then exec) under umgr against plain"),
}
QUICK = ("faults", "io")


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["usage: umgr bench [NAME [OPTIONS...]]   (no NAME: " + " and ".join(QUICK) + ")", ""]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in BENCHMARKS.items()]
    return "\n".join(lines)


def run_one(name: str, options: list[str]) -> int:
    module = importlib.import_module(f"umgr.benchmarks.{BENCHMARKS[name][0]}")
    sys.argv[0] = f"umgr bench {name}"      # what its argparse usage line calls it
    try:
        status = module.main(options)
    except SystemExit as exc:                # argparse: --help (0) or a usage error (2)
        return EXIT_UMGR if exc.code == 2 else (exc.code or 0)
    return status if isinstance(status, int) else 0   # faults and io return their figures


def main(argv: list[str]) -> int:
    if not argv:
        return max(run_one(name, []) for name in QUICK)
    name, options = argv[0], argv[1:]
    if name in ("-h", "--help"):
        print(usage())
        return 0
    if name not in BENCHMARKS:
        print(f"umgr bench: unknown benchmark {name!r}\n{usage()}", file=sys.stderr)
        return EXIT_UMGR
    try:
        return run_one(name, options)
    except (OSError, RuntimeError) as exc:
        print(f"umgr bench {name}: {exc}", file=sys.stderr)
        return EXIT_UMGR
