"""What starting a process costs under umgr: a fork, and a fork then exec.

bench/programs/spawn.c writes DATA MiB of its own memory, then starts
COUNT processes one after another, each waited for:

  fork  children that read 8 pages of that memory, check them and exit
        (a forking server, a worker pool): the daemon adopts each one's
        copy of the parent's memory from the kernel's fork event;
  exec  children that exec /bin/true at once (a shell running commands):
        each is adopted at its fork, then attaches anew after its exec.

Each mode runs plain and under `umgr exec` in each round, alternating. It
prints the time per process (the program's own clock, so the daemon's
start is not in it), umgr's over plain paired by round, what umgr adds to
each process, and the daemon's CPU time per process (its
daemon_cpu_seconds over a run that starts no process, per process). The
daemon's count of targets is checked: every process started was managed.

    python bench/bench_spawn.py [--count 1000] [--data-mib 16] [--budget-mib 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_paging import BenchError, _run, compile_programs, default_umgr_cmd, umgr_exec  # noqa: E402

MODES = ("fork", "exec")
# Targets the daemon starts per process: a fork's child; an exec's child,
# adopted at its fork and attached anew after it.
TARGETS_PER_PROCESS = {"fork": 1, "exec": 2}


def run_umgr(umgr: list[str], program: list[str], args, work: str) -> tuple[dict, dict]:
    """The program under `umgr exec`: its result and the daemon's stats."""
    result, stats, _ = umgr_exec(umgr, args.budget_mib, args.data_mib + args.budget_mib, [], program,
                                 os.path.join(work, "stats.json"), f"{program[1]} under umgr", attempts=1,
                                 data_mib=args.data_mib)
    return result, stats


def measure(spawn: str, umgr: list[str], args, work: str) -> dict:
    runs = {mode: {"plain": [], "umgr": [], "cpu": []} for mode in args.modes}
    for r in range(args.rounds):
        _, idle = run_umgr(umgr, [spawn, "fork", "0", str(args.data_mib)], args, work)
        for mode in args.modes:
            program = [spawn, mode, str(args.count), str(args.data_mib)]
            print(f"round {r + 1}/{args.rounds}: {mode} ...", file=sys.stderr)
            plain = _run(program, mode)
            managed, stats = run_umgr(umgr, program, args, work)
            expected = 1 + TARGETS_PER_PROCESS[mode] * args.count
            if stats["targets"] < expected:
                raise BenchError(f"{mode}: the daemon managed {stats['targets']} processes of {expected}")
            runs[mode]["plain"].append(plain["us_per_process"])
            runs[mode]["umgr"].append(managed["us_per_process"])
            runs[mode]["cpu"].append((stats["daemon_cpu_seconds"] - idle["daemon_cpu_seconds"]) / args.count * 1e6)
    return runs


def summary(runs: dict) -> dict:
    out = {}
    for mode, r in runs.items():
        ratios = [u / p for u, p in zip(r["umgr"], r["plain"])]
        added = [u - p for u, p in zip(r["umgr"], r["plain"])]
        out[mode] = {"plain_us": statistics.median(r["plain"]), "umgr_us": statistics.median(r["umgr"]),
                     "ratio": statistics.median(ratios), "ratio_range": (min(ratios), max(ratios)),
                     "added_us": statistics.median(added), "daemon_cpu_us": statistics.median(r["cpu"])}
    return out


def report(result: dict, args) -> str:
    lines = [f"{args.count} processes started one at a time by a process of {args.data_mib} MiB, budget "
             f"{args.budget_mib} MiB, medians of {args.rounds} rounds",
             f"{'mode':6} {'plain us':>9} {'umgr us':>9} {'umgr/plain':>11} {'(range)':>13} {'added us':>9} "
             f"{'daemon CPU us':>14}"]
    for mode, s in result.items():
        lo, hi = s["ratio_range"]
        lines.append(f"{mode:6} {s['plain_us']:9.0f} {s['umgr_us']:9.0f} {s['ratio']:11.2f} "
                     f"{f'({lo:.2f}-{hi:.2f})':>13} {s['added_us']:9.0f} {s['daemon_cpu_us']:14.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="processes started per run")
    parser.add_argument("--data-mib", type=int, default=16, help="memory of the process that starts them")
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES),
                        help="fork, exec or both (comma-separated)")
    parser.add_argument("--umgr", help="the umgr command (default: this interpreter's)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    if not set(args.modes) <= set(MODES) or args.count < 1:
        parser.error(f"--modes takes {', '.join(MODES)}; --count at least 1")
    umgr = shlex.split(args.umgr) if args.umgr else default_umgr_cmd()
    with tempfile.TemporaryDirectory(prefix="umgr-bench-spawn-") as work:
        spawn = compile_programs(work, names=("spawn",))["spawn"]
        runs = measure(spawn, umgr, args, work)
    result = summary(runs)
    print(report(result, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": vars(args), "runs": runs, "summary": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
