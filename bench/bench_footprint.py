"""What the daemon itself costs: memory per managed page, CPU per evicted page.

bench/programs/shapes.c first-touches DATA MiB under a BUDGET (the touch
writes every page once, so at least DATA - BUDGET pages are evicted), under
`umgr exec --stats-json`, at a small and a large DATA with the same budget:

  memory  the daemon's peak resident memory (daemon_peak_rss_bytes) at
          each size; the difference over the difference in pages is what a
          managed page costs the daemon (its page table, slot counts and
          eviction clock, policy queues, and whatever numpy and malloc keep
          around), without the fixed cost of the interpreter and buffers;
  CPU     at the large size, pages evicted (pages_out) per second of CPU
          spent evicting them: the daemon's on eviction (evict_cpu_seconds:
          its evicting tasks' steps and their worker threads, timed by
          umgr/cpuclock.py) plus the shim's agent thread in the program
          (agent_cpu_seconds: its moves and zaps). The issue's target is
          for this figure. Beside it, pages evicted per second of all of
          the daemon's CPU (daemon_cpu_seconds: the fills of the fresh
          pages the touch faults in are about half of it), and the
          wall-clock rate of the touch.

The issue's targets are printed beside them (16 bytes per managed page,
200k pages a second on one core); each size runs --rounds times and keeps
its median. The swap file is sized with the data (DATA + BUDGET), so the
slot arrays scale as they would for a user.

    python bench/bench_footprint.py [--small-mib 256] [--large-mib 1024] [--budget-mib 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_paging import compile_programs  # noqa: E402

PAGE = 4096
MiB = 1 << 20
TARGET_BYTES_PER_PAGE = 16
TARGET_PAGES_PER_CPU_SECOND = 200_000


def run_touch(shapes: str, work: str, data_mib: int, budget_mib: int) -> dict:
    """One first touch under umgr exec: its stats, with the touch's seconds."""
    stats_path = os.path.join(work, f"stats-{data_mib}.json")
    cmd = [sys.executable, "-m", "umgr", "exec", "--max-resident", f"{budget_mib}M",
           "--swap-size", f"{data_mib + budget_mib}M", "--stats-json", stats_path, "--", shapes, str(data_mib), ""]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"umgr exec shapes {data_mib} exited {done.returncode}: {done.stderr.strip()}")
    with open(stats_path) as f:
        stats = json.load(f)
    program = json.loads(done.stdout.strip().splitlines()[-1])
    stats["touch_seconds"] = program["phases"]["touch"]
    stats["agent_cpu_seconds"] = program["agent_cpu_seconds"]
    if stats["moved_out"] and not stats["agent_cpu_seconds"]:   # the eviction rate would leave the moves out
        raise RuntimeError("the program found no CPU time of its umgr-agent thread (/proc/self/task/*/schedstat)")
    least_out = (data_mib - budget_mib) * MiB // PAGE
    if stats["pages_out"] < least_out:   # a daemon doing nothing measures nothing
        raise RuntimeError(f"only {stats['pages_out']} pages evicted of at least {least_out}")
    return stats


def measure(shapes: str, work: str, args) -> dict:
    runs = {size: [] for size in (args.small_mib, args.large_mib)}
    for _ in range(args.rounds):
        for size in runs:
            runs[size].append(run_touch(shapes, work, size, args.budget_mib))

    def median(size: int, key: str) -> float:
        return statistics.median(run[key] for run in runs[size])

    pages = {size: size * MiB // PAGE for size in runs}
    rss = {size: median(size, "daemon_peak_rss_bytes") for size in runs}
    large = args.large_mib
    out_per_cpu = statistics.median(run["pages_out"] / run["daemon_cpu_seconds"] for run in runs[large])
    out_per_evict_cpu = statistics.median(run["pages_out"] / (run["evict_cpu_seconds"] + run["agent_cpu_seconds"])
                                          for run in runs[large])
    out_per_wall = statistics.median(run["pages_out"] / run["touch_seconds"] for run in runs[large])
    return {
        "params": vars(args),
        "peak_rss_mib": {str(size): rss[size] / MiB for size in runs},
        "bytes_per_managed_page": (rss[large] - rss[args.small_mib]) / (pages[large] - pages[args.small_mib]),
        "pages_out_per_cpu_second": out_per_cpu,
        "pages_out_per_eviction_cpu_second": out_per_evict_cpu,
        "evict_cpu_seconds": median(large, "evict_cpu_seconds"),
        "agent_cpu_seconds": median(large, "agent_cpu_seconds"),
        "pages_out_per_wall_second": out_per_wall,
        "daemon_cpu_seconds": {str(size): median(size, "daemon_cpu_seconds") for size in runs},
    }


def report(result: dict) -> str:
    p = result["params"]
    per_page = result["bytes_per_managed_page"]
    per_cpu = result["pages_out_per_cpu_second"]
    per_evict_cpu = result["pages_out_per_eviction_cpu_second"]
    rss = ", ".join(f"{size} MiB: {mib:.1f} MiB" for size, mib in result["peak_rss_mib"].items())
    return "\n".join([
        f"first touch under a {p['budget_mib']} MiB budget, medians of {p['rounds']} rounds",
        f"daemon peak RSS: {rss}",
        f"memory per managed page: {per_page:.1f} bytes (target {TARGET_BYTES_PER_PAGE}: "
        f"{per_page / TARGET_BYTES_PER_PAGE:.2f}x)",
        f"eviction at {p['large_mib']} MiB: {per_evict_cpu:,.0f} pages per CPU-second spent evicting (target "
        f"{TARGET_PAGES_PER_CPU_SECOND:,}: {per_evict_cpu / TARGET_PAGES_PER_CPU_SECOND:.2f}x; the daemon's "
        f"{result['evict_cpu_seconds']:.2f} s and the agent's {result['agent_cpu_seconds']:.2f} s)",
        f"  {per_cpu:,.0f} pages per second of all the daemon's CPU (fills included: "
        f"{result['daemon_cpu_seconds'][str(p['large_mib'])]:.2f} s), "
        f"{result['pages_out_per_wall_second']:,.0f} pages per second of the touch",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-mib", type=int, default=256)
    parser.add_argument("--large-mib", type=int, default=1024)
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    if not args.budget_mib < args.small_mib < args.large_mib:
        parser.error("need --budget-mib < --small-mib < --large-mib")
    with tempfile.TemporaryDirectory(prefix="umgr-bench-footprint-") as work:
        shapes = compile_programs(work, names=("shapes",))["shapes"]
        result = measure(shapes, work, args)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
