"""Several processes paging at once, each under its own budget: umgr
against kernel swap.

PROCS copies of bench/programs/shapes.c (DATA MiB each, different seeds)
first-touch their data and then read OPS uniform random pages, all at
once:

  kernel swap  each in a cgroup v1 memory group of its own, limited to
               BUDGET, with a swapfile (as bench_shapes.py sets it up: the
               highest swap priority, zswap off);
  kernel+poll  (--kernel-idle-poll) kernel swap again, with the CPU latency
               request umgr's --idle-poll holds held meanwhile (idle CPUs
               poll): what the kernel makes of the same help;
  umgr         one `umgr exec --max-resident BUDGET` running them all:
               one daemon, a target and a budget per process.

Rounds alternate which goes first. Per round it takes, for each phase,
the longest any process took (they start together, and the phases of
different processes overlap only roughly), and prints
umgr/kernel paired by round (median and range), with the daemon's CPU
seconds, the faults and how long umgr held idle CPUs polling (per round,
against its wall time). One process (--procs 1) is the same measurement
as bench_shapes.py's random phase; the gap that grows with PROCS is what
serving every target on one daemon thread costs, where the kernel serves
each process's faults on its own CPU time and keeps their reads in
flight together.

Needs root (swapon, cgroups, userfaultfd), gcc, and the cgroup v1 memory
controller. Run it under the suite lock.

    python bench/bench_procs.py [--procs 4] [--data-mib 256] [--budget-mib 32] [--ops 20000] [--rounds 3]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_paging import (CGROUP_ROOT, RUN_TIMEOUT, BenchError, _remove_cgroup, _write,  # noqa: E402
                          compile_programs, default_umgr_cmd, idle_poll_summary, idle_polling, kernel_swap,
                          other_swaps, other_swaps_note, run_and_report)

# Names of their own: bench_paging.py may be running at the same time, and
# kernel_swap() removes leftovers under its names first (killing what is in
# the cgroup).
SWAPFILE = "/var/tmp/umgr-bench-procs.swap"
CGROUP = os.path.join(CGROUP_ROOT, "umgr-bench-procs")
PHASES = ("touch", "random")


def shapes_cmd(shapes: str, args, index: int) -> list[str]:
    return [shapes, str(args.data_mib), "random", str(index + 1), str(args.ops)]


def _results(outputs: list[str], what: str) -> list[dict]:
    results = []
    for text in outputs:
        lines = [line for line in text.splitlines() if line.startswith("{")]
        if not lines:
            raise BenchError(f"{what}: a process printed no result")
        result = json.loads(lines[-1])
        if not result.get("ok"):
            raise BenchError(f"{what}: a process's data check failed")
        results.append(result)
    return results


def slowest(results: list[dict]) -> dict:
    return {phase: max(r["phases"][phase] for r in results) for phase in PHASES}


@contextlib.contextmanager
def more_cgroups(count: int, limit_bytes: int):
    """`count` more memory cgroups beside kernel_swap()'s (CGROUP-2, ...),
    each limited to limit_bytes; removed on the way out."""
    made = []
    try:
        for i in range(count):
            cgroup = f"{CGROUP}-{i + 2}"
            _remove_cgroup(cgroup)   # a leftover of an interrupted run
            os.mkdir(cgroup)
            made.append(cgroup)
            memsw = os.path.join(cgroup, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):   # (as kernel_swap() sets the first)
                _write(memsw, -1)
            _write(os.path.join(cgroup, "memory.limit_in_bytes"), limit_bytes)
        yield made
    finally:
        for cgroup in made:
            _remove_cgroup(cgroup)


def run_kernel(shapes: str, args, cgroups: list[str]) -> dict:
    procs = []
    try:
        for i, cgroup in enumerate(cgroups):
            def enter(cgroup=cgroup) -> None:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            procs.append(subprocess.Popen(shapes_cmd(shapes, args, i), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, preexec_fn=enter))
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
            if proc.returncode != 0:
                raise BenchError(f"shapes under kernel swap exited {proc.returncode}: {err.strip()[-500:]}")
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"phases": slowest(_results(outputs, "kernel swap"))}


def run_umgr(shapes: str, args, umgr: list[str], work: str) -> dict:
    outs = [os.path.join(work, f"out{i}.json") for i in range(args.procs)]
    stats_path = os.path.join(work, "stats.json")
    for path in (*outs, stats_path):   # (nothing of the round before may stand in for this one's)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    # Each started in the background, each waited for: the shell exits 1 if any failed.
    starts = "".join(f"{shlex.join(shapes_cmd(shapes, args, i))} > {shlex.quote(out)} & pids=\"$pids $!\"; "
                     for i, out in enumerate(outs))
    script = f"pids=; {starts}rc=0; for p in $pids; do wait $p || rc=1; done; exit $rc"
    cmd = [*umgr, "exec", "--max-resident", f"{args.budget_mib}M", "--swap-size",
           f"{args.procs * args.data_mib + args.budget_mib}M", "--stats-json", stats_path, "--", "sh", "-c", script]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    if done.returncode != 0:
        raise BenchError(f"umgr exec exited {done.returncode}: {done.stderr.strip()[-500:]}")
    outputs = []
    for out in outs:
        with open(out) as f:
            outputs.append(f.read())
    with open(stats_path) as f:
        stats = json.load(f)
    results = _results(outputs, "umgr")
    # The shell, and each process at its fork and again after its exec.
    if stats["targets"] < 1 + 2 * args.procs or stats.get("daemon_restarts"):
        raise BenchError(f"the daemon managed {stats['targets']} targets of {1 + 2 * args.procs} "
                         f"({stats.get('daemon_restarts', 0)} restarts)")
    if any(r.get("agent_cpu_seconds", 0) <= 0 for r in results):
        raise BenchError("a process ran without umgr's agent thread: it was not paged by umgr")
    return {"phases": slowest(results), "daemon_cpu_seconds": stats["daemon_cpu_seconds"],
            "faults": stats["faults"], "zap_batches": stats["zap_batches"],
            "idle_poll_seconds": stats.get("idle_poll_seconds"), "wall_seconds": stats["wall_seconds"]}


def run_kind(kind: str, shapes: str, args, cgroups: list[str], umgr: list[str], work: str) -> dict:
    """One run of configuration `kind`: kernel, kernel+poll or umgr."""
    if kind == "umgr":
        return run_umgr(shapes, args, umgr, work)
    with idle_polling() if kind == "kernel+poll" else contextlib.nullcontext():
        return run_kernel(shapes, args, cgroups)


def paired(numer: list[dict], denom: list[dict]) -> dict:
    """Per phase, numer/denom of the runs of the same round: (median, lowest, highest)."""
    ratios = {phase: [n["phases"][phase] / d["phases"][phase] for n, d in zip(numer, denom)] for phase in PHASES}
    return {phase: (statistics.median(rs), min(rs), max(rs)) for phase, rs in ratios.items()}


def measure(args) -> dict:
    umgr = shlex.split(args.umgr) if args.umgr else default_umgr_cmd()
    kinds = ("kernel", "kernel+poll", "umgr") if args.kernel_idle_poll else ("kernel", "umgr")
    runs = {kind: [] for kind in kinds}
    env = {"other_swaps": other_swaps(SWAPFILE)}
    with tempfile.TemporaryDirectory(prefix="umgr-bench-procs-") as work:
        shapes = compile_programs(work, names=("shapes",))["shapes"]
        limit = args.budget_mib << 20
        with kernel_swap(args.procs * args.data_mib + args.budget_mib, limit, swapfile=SWAPFILE,
                         cgroup=CGROUP) as first, more_cgroups(args.procs - 1, limit) as others:
            cgroups = [first, *others]
            for r in range(args.rounds):
                for kind in kinds if r % 2 == 0 else kinds[::-1]:
                    print(f"round {r + 1}/{args.rounds}: {kind} ...", file=sys.stderr)
                    runs[kind].append(run_kind(kind, shapes, args, cgroups, umgr, work))
    result = {"params": {k: v for k, v in vars(args).items()}, "env": env, "runs": runs,
              "ratios": paired(runs["umgr"], runs["kernel"])}
    if "kernel+poll" in runs:
        result["ratios_poll"] = paired(runs["umgr"], runs["kernel+poll"])
    return result


def report(result: dict) -> str:
    p, runs = result["params"], result["runs"]
    polled = "kernel+poll" in runs
    lines = [f"{p['procs']} processes at once, {p['data_mib']} MiB each under {p['budget_mib']} MiB each, "
             f"{p['ops']} random reads each, {p['rounds']} rounds (the slowest process's phase times, medians)"
             + other_swaps_note(result.get("env", {})),
             f"{'phase':8} {'kernel s':>9} {'umgr s':>8} {'umgr/kernel':>12} {'(range)':>12}"
             + (f" {'k+poll s':>9} {'umgr/k+poll':>12} {'(range)':>12}" if polled else "")]

    def median(kind: str, phase: str) -> float:
        return statistics.median(r["phases"][phase] for r in runs[kind])

    for phase in PHASES:
        ratio, lo, hi = result["ratios"][phase]
        line = (f"{phase:8} {median('kernel', phase):9.3f} {median('umgr', phase):8.3f} {ratio:12.2f} "
                f"{f'({lo:.2f}-{hi:.2f})':>12}")
        if polled:
            ratio, lo, hi = result["ratios_poll"][phase]
            line += f" {median('kernel+poll', phase):9.3f} {ratio:12.2f} {f'({lo:.2f}-{hi:.2f})':>12}"
        lines.append(line)
    cpu = statistics.median(r["daemon_cpu_seconds"] for r in runs["umgr"])
    faults = statistics.median(r["faults"] for r in runs["umgr"])
    lines.append(f"umgr: the daemon's CPU {cpu:.2f} s, {faults:.0f} faults, "
                 f"{statistics.median(r['zap_batches'] for r in runs['umgr']):.0f} eviction batches")
    for i, r in enumerate(runs["umgr"]):
        lines.append(f"umgr round {i + 1}: {idle_poll_summary(r)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--data-mib", type=int, default=256)
    parser.add_argument("--budget-mib", type=int, default=32)
    parser.add_argument("--ops", type=int, default=20000, help="random page reads per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kernel-idle-poll", action="store_true",
                        help="also run kernel swap with idle CPUs polling (as umgr's --idle-poll has them)")
    parser.add_argument("--umgr", help="the umgr command (default: this interpreter's)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    if args.procs < 1 or args.budget_mib >= args.data_mib:
        parser.error("need --procs >= 1 and --budget-mib < --data-mib")
    if not os.path.isdir(CGROUP_ROOT):
        parser.error(f"no cgroup v1 memory controller at {CGROUP_ROOT}")
    return run_and_report(lambda: measure(args), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
