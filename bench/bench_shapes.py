"""Access-shape benchmark: umgr against the kernel's own swap, phase by phase.

One invocation runs, on the same machine, each workload as

  plain          no limit (no paging at all: the reference);
  kernel swap    in a cgroup v1 memory group limited to the budget, with a
                 swapfile of its own (set up here, torn down in `finally`)
                 at the highest swap priority, zswap off meanwhile;
  kernel+poll    (--kernel-idle-poll) kernel swap again, with the CPU
                 latency request umgr's --idle-poll holds held meanwhile
                 (idle CPUs poll): what the kernel makes of the same help;
  umgr VARIANT   `umgr exec --max-resident BUDGET --stats-json ... VARIANT`
                 for each variant: "default" (no extra arguments) and, say,
                 "--policy none" or "--eviction NAME", so two policies are
                 compared in the same run on the same machine.

The workloads:

  shapes   bench/programs/shapes.c: DATA MiB of anonymous memory, first
           touched (phase "touch"), then the phases: seq, random, hot
           (90% of reads in a HOT MiB set scattered over the data), rewrite
           (read, check, write a new version), threads (4 threads of random
           reads), seq2. Every page read is checked.
  python   bench/programs/pyworkload.py: unmodified CPython, ~600 MB at its
           peak at scale 1 (a list of 6M ints sorted, a dict, a 96 MiB
           bytearray, all checked), run at a budget of one third of the
           peak the plain run measured (or --py-budget-mib).
  java     bench/programs/JvmHeap.java on the JDK's `java` (--java-gc
           collector, -Xmx1g): --java-mib MiB of long[] arrays and a HashMap
           of small objects a quarter that size, updated at random while
           the collector runs, all checked; at a third of the plain peak
           (or --java-budget-mib). The kernel's cgroup holds the whole JVM
           (its code, metaspace and collector tables too), umgr's budget
           the anonymous mappings of 1 MiB or more: the heap, mostly.
  sort     GNU sort (LC_ALL=C) of --sort-mib MiB of random base64 lines,
           through bench/programs/sortrun.c, which checks its output as it
           comes down a pipe; at --sort-budget-share of the plain peak
           (0.85: a budget a little under what it would use, the common
           case; sort's comparisons read the text of lines all over its
           buffer, so its working set is its whole buffer), or
           --sort-budget-mib. sortrun itself holds next to nothing.

The table gives seconds per phase for each configuration and umgr/kernel
(lower is better), and umgr/kernel+poll when that ran; the fault table
gives per-phase faults from the program's rusage (kernel swap: major
faults; umgr: minor faults, which is how a userfault counts); then
umgr's --stats-json figures and the kernel cgroup's pgmajfault for the
whole run.

Needs root (swapon, cgroups, userfaultfd), gcc, mkswap/swapon/swapoff and the
cgroup v1 memory controller at /sys/fs/cgroup/memory.

    python bench/bench_shapes.py [--data-mib 1024] [--budget-mib 128] [--variants 'default;--policy none']
    python bench/bench_shapes.py --data-mib 96 --budget-mib 32 --py-scale 0.05 --java-mib 32   # a smoke run
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_paging import (  # noqa: E402  (a script here, or umgr.benchmarks)
    CGROUP_ROOT, MiB, PROGRAMS, BenchError, _run, cgroup_figures, compile_programs, default_umgr_cmd, device_io,
    device_summary, enter_cgroup, idle_poll_summary, idle_polling, kernel_swap, other_swaps, other_swaps_note,
    run_and_report, umgr_exec,
)

# Names of their own: bench_paging.py may be running at the same time, and
# kernel_swap() removes leftovers under its names first.
SWAPFILE = "/var/tmp/umgr-bench-shapes.swap"
CGROUP = os.path.join(CGROUP_ROOT, "umgr-bench-shapes")

PHASES = "seq,random,hot,rewrite,threads,seq2"
# Where umgr's default swap file lives (--state-dir /var/tmp/umgr-UID): the
# device whose I/O is counted for its runs (unless the variant moves it).
UMGR_STATE_PARENT = "/var/tmp"
TIMEOUT = 1800



def fault_breakdown(s: dict) -> str:
    """Where the daemon's fault service time went, in microseconds per fault."""
    faults = max(1, s["faults"])
    parts = {"wait for eviction": s["fault_wait_seconds"], "backend read": s["fault_read_seconds"],
             "copy+wake": s["fault_copy_seconds"]}
    rest = s["fault_batch_seconds"] - sum(parts.values())
    shown = ", ".join(f"{name} {seconds / faults * 1e6:.0f}" for name, seconds in parts.items())
    return (f"per fault: service {s['fault_batch_seconds'] / faults * 1e6:.0f} us = {shown}, "
            f"other {rest / faults * 1e6:.0f}; the uffd went unread for move-outs "
            f"{s['fault_gate_seconds'] / faults * 1e6:.0f}; the fault loop slept "
            f"{s['fault_loop_sleeps'] / faults:.2f} times per fault (each sleep: a wake-up for the next fault)")

def parse_variants(text: str) -> list[tuple[str, list[str]]]:
    """'default;--policy none;--eviction fifo' -> [(label, umgr args)]."""
    out = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        if part in (label for label, _ in out):
            raise SystemExit(f"variant {part!r} given twice")
        out.append((part, [] if part == "default" else shlex.split(part)))
    return out


# ---- one workload in every configuration --------------------------------------------
@dataclasses.dataclass
class Workload:
    """A program that prints {"phases": {name: seconds, ...}, ...}, the
    budget it runs at, the swap it gets (kernel swapfile, umgr swap) and
    the memory its data takes (shapes: DATA; the others: the plain run's
    peak RSS): a umgr run with a budget below it that paged nothing out
    was not managed (umgr_exec() raises)."""
    name: str
    argv: list[str]
    budget_mib: int
    swap_mib: int
    data_mib: float


def _total(result: dict) -> float:
    return sum(result["phases"].values())


def paired_ratios(numer: list[dict], denom: list[dict]) -> dict[str, tuple[float, float, float]]:
    """Per phase, and "total": numer/denom of the runs of the same round
    (each a dict with "round" and "result"), as (median, lowest, highest).
    Runs of one round are minutes apart, the best rounds of two configs
    may be an hour apart: on a machine whose disk and CPUs change speed
    between runs, the paired ratio is the steadier figure."""
    by_round = {run["round"]: run["result"] for run in denom}
    ratios: dict[str, list[float]] = {}
    for run in numer:
        base = by_round.get(run["round"])
        if base is None:
            continue
        pairs = [(ph, t, base["phases"].get(ph)) for ph, t in run["result"]["phases"].items()]
        pairs.append(("total", _total(run["result"]), _total(base)))
        for ph, t, b in pairs:
            if t is not None and b:
                ratios.setdefault(ph, []).append(t / b)
    return {ph: (statistics.median(rs), min(rs), max(rs)) for ph, rs in ratios.items()}


def run_plain(w: Workload, timeout: float) -> dict:
    return {"result": _run(w.argv, f"{w.name} plain", timeout)}


def run_kernel(w: Workload, timeout: float) -> dict:
    with kernel_swap(w.swap_mib, w.budget_mib * MiB, swapfile=SWAPFILE, cgroup=CGROUP) as cg:
        with device_io(SWAPFILE) as io:
            result = _run(w.argv, f"{w.name} under kernel swap", timeout, preexec_fn=enter_cgroup(cg))
        cgroup = cgroup_figures(cg)
    return {"result": result, "cgroup": cgroup, "swap_mib": w.swap_mib, "device": io}


def run_kernel_tries(w: Workload, timeout: float, attempts: int, tag: str, log) -> dict | None:
    """run_kernel() up to `attempts` times. At a tight budget the memcg OOM
    killer ends some runs and not others (at a third of the CPython
    workload's peak, half of them here, with swap free): a result to
    report, not a crash. None when every try failed."""
    failures = []
    for _ in range(attempts):
        try:
            return {**run_kernel(w, timeout), "failures": failures}
        except BenchError as exc:
            failures.append(str(exc))
            log(f"{tag}: kernel swap failed ({exc})")
    return None


def run_umgr(w: Workload, label: str, args: list[str], umgr_cmd: list[str], work: str, timeout: float,
             attempts: int) -> dict:
    stats_file = os.path.join(work, f"umgr-{w.name}.json")
    with device_io(UMGR_STATE_PARENT) as io:   # (a retried attempt's I/O counts too)
        result, stats, failures = umgr_exec(umgr_cmd, w.budget_mib, w.swap_mib, args, w.argv, stats_file,
                                            f"{w.name} under umgr ({label})", attempts, timeout, data_mib=w.data_mib)
    return {"result": result, "umgr": stats, "failures": failures, "args": args, "device": io}


def run_workload(w: Workload, variants, *, kernel: bool, rounds: int, umgr_cmd: list[str], work: str,
                 timeout: float, attempts: int, plain: dict | None = None, kernel_poll: bool = False,
                 log=print) -> dict:
    """Every configuration `rounds` times, interleaved; each keeps its
    fastest round (by total time) and the totals of all; and umgr/kernel
    paired by round (paired_ratios)."""
    runs: dict[str, list[dict]] = {}
    if plain is not None:
        runs["plain"] = [{**plain, "round": 0}]

    def kernel_run(r: int, tag: str) -> None:
        nonlocal kernel
        if not kernel:
            return
        log(f"{tag}: kernel swap (swapfile {w.swap_mib} MiB + cgroup limit {w.budget_mib} MiB) ...")
        result = run_kernel_tries(w, timeout, attempts, tag, log)
        if result is None:
            log(f"{tag}: no kernel column for {w.name}")
            runs.pop("kernel", None)
            kernel = False
            return
        runs.setdefault("kernel", []).append({**result, "round": r})
        if kernel_poll:
            log(f"{tag}: kernel swap, idle CPUs polling ...")
            with idle_polling():
                result = run_kernel_tries(w, timeout, attempts, tag, log)
            if result is not None:
                runs.setdefault("kernel+poll", []).append({**result, "round": r})

    def umgr_run(label: str, args: list[str], r: int, tag: str) -> None:
        log(f"{tag}: umgr {label} ...")
        runs.setdefault(f"umgr {label}", []).append(
            {**run_umgr(w, label, args, umgr_cmd, work, timeout, attempts), "round": r})

    # Each round starts one configuration later, so that none always runs
    # right after kernel swap's (whose swapfile's writeback and swapoff may
    # still be going on) or always first.
    steps = [kernel_run] + [lambda r, tag, label=label, args=args: umgr_run(label, args, r, tag)
                            for label, args in variants]
    for r in range(rounds):
        tag = f"{w.name} round {r + 1}/{rounds}" if rounds > 1 else w.name
        if plain is None or r > 0:
            log(f"{tag}: plain ...")
            runs.setdefault("plain", []).append({**run_plain(w, timeout), "round": r})
        for step in steps[r % len(steps):] + steps[:r % len(steps)]:
            step(r, tag)
    configs = {}
    for name, rs in runs.items():
        best = min(rs, key=lambda x: _total(x["result"]))
        configs[name] = {**best, "round_totals": [_total(x["result"]) for x in rs],
                         "failures": [f for x in rs for f in x.get("failures", [])]}
    paired = {}
    for base in ("kernel", "kernel+poll"):
        for name in runs:
            if name.startswith("umgr ") and base in runs:
                paired[f"{name} / {base}"] = paired_ratios(runs[name], runs[base])
    return {"budget_mib": w.budget_mib, "swap_mib": w.swap_mib, "argv": w.argv, "configs": configs,
            "paired": paired, "rounds": rounds}


# ---- the run ---------------------------------------------------------------------------
def run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    if os.geteuid() != 0:
        raise BenchError("needs root (swapon, cgroups, userfaultfd)")
    umgr_cmd = shlex.split(args.umgr) if args.umgr else default_umgr_cmd()
    variants = parse_variants(args.variants)
    hot_mib = args.hot_mib if args.hot_mib is not None else min(64, args.budget_mib // 2)
    others = other_swaps(SWAPFILE)
    results: dict = {
        "params": {"data_mib": args.data_mib, "budget_mib": args.budget_mib, "phases": args.phases,
                   "seed": args.seed, "ops": args.ops, "hot_mib": hot_mib, "variants": [lbl for lbl, _ in variants],
                   "rounds": args.rounds, "py_scale": None if args.no_python else args.py_scale,
                   "java_mib": None if args.no_java else args.java_mib,
                   "sort_mib": None if args.no_sort else args.sort_mib,
                   "umgr": umgr_cmd},
        "env": {"kernel": platform.release(), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
                "other_swaps": others},
        "workloads": {},
    }
    if others:
        log(f"note: other swap areas are active ({', '.join(others)}): the kernel-swap swapfile goes above "
            f"them, but one of its priority (32767) would share its writes")
    with tempfile.TemporaryDirectory(prefix="umgr-bench-shapes-") as work:
        exe = compile_programs(work, ("shapes",))["shapes"]
        shapes = Workload("shapes", [exe, str(args.data_mib), args.phases, str(args.seed), str(args.ops or 0),
                                     str(hot_mib)], args.budget_mib, args.data_mib + 256, args.data_mib)
        common = dict(kernel=not args.no_kernel_swap, kernel_poll=args.kernel_idle_poll, rounds=args.rounds,
                      umgr_cmd=umgr_cmd, work=work, timeout=args.timeout, attempts=args.attempts, log=log)
        results["workloads"]["shapes"] = run_workload(shapes, variants, **common)
        if not args.no_python:
            py_argv = [args.python, str(PROGRAMS / "pyworkload.py"), str(args.py_scale), str(args.seed)]
            results["workloads"]["python"] = run_under_its_peak(
                "python", py_argv, args.py_budget_mib, variants, common, args.timeout, log)
        if not args.no_java:
            results["workloads"]["java"] = run_under_its_peak(
                "java", java_argv(args, work), args.java_budget_mib, variants, common, args.timeout, log)
        if not args.no_sort:
            results["workloads"]["sort"] = run_under_its_peak(
                "sort", sort_argv(args, work), args.sort_budget_mib, variants, common, args.timeout, log,
                share=args.sort_budget_share)
    results["env"]["loadavg_after"] = os.getloadavg()
    return results


def run_under_its_peak(name: str, argv: list[str], budget_mib: int | None, variants, common: dict,
                       timeout: float, log, share: float = 1 / 3) -> dict:
    """A workload run plain first, then at `budget_mib`, or by default at
    `share` (a third) of the peak RSS that plain run measured."""
    log(f"{name}: plain ...")
    plain = {"result": _run(argv, f"{name} plain", timeout)}
    peak_mib = plain["result"]["peak_rss_kb"] / 1024
    workload = Workload(name, argv, budget_mib or max(8, round(peak_mib * share)), int(peak_mib) + 256, peak_mib)
    return {**run_workload(workload, variants, plain=plain, **common), "peak_mib": peak_mib}


def java_argv(args, work: str) -> list[str]:
    """The JVM workload, compiled into `work`, and how to run it."""
    subprocess.run(["javac", "-d", work, str(PROGRAMS / "JvmHeap.java")], check=True, timeout=120)
    # The same JVM in every configuration: in the kernel's cgroup it would
    # otherwise size its heap and young generation from the limit (a heap of
    # a few MiB to start, many more collections: kernel swap took 14.7 s
    # where it took 7.0 s with the heap umgr's run gets).
    return ["java", f"-XX:+Use{args.java_gc}GC", "-XX:-UseContainerSupport", "-Xmx1g", "-cp", work, "JvmHeap",
            str(args.java_mib), str(args.java_rounds), str(args.seed)]


def sort_argv(args, work: str) -> list[str]:
    """The sort workload's input, made in `work` (76 characters of base64 a
    line, from --seed), and how to run it."""
    exe = compile_programs(work, ("sortrun",))["sortrun"]
    path = os.path.join(work, "sort-input.txt")
    rng = np.random.default_rng(args.seed)
    with open(path, "wb") as f:
        for _ in range(args.sort_mib):
            f.write(base64.encodebytes(rng.bytes(MiB * 3 // 4)))
    return [exe, path]


# ---- the tables ---------------------------------------------------------------------------
def _fmt(x, width, prec=3):
    if x is None:
        return f"{'-':>{width}}"
    if isinstance(x, float):
        return f"{x:>{width}.{prec}f}"
    return f"{x:>{width}}"


def umgr_summary(label: str, s: dict, budget_mib: int) -> list[str]:
    """A umgr run's --stats-json figures as report lines (how long it held
    idle CPUs polling among them), with a warning where it paged nothing
    out or went over its budget."""
    lines = [f"  {label}: faults={s['faults']} (missing {s.get('faults_missing', '?')}, wp {s.get('faults_wp', '?')}) "
             f"pages_in={s['pages_in']} pages_out={s['pages_out']} prefetched={s['prefetched']} "
             f"peak_resident={s['peak_resident_bytes'] / MiB:.1f} MiB "
             f"swap written={s['swap_bytes_written'] / MiB:.0f} MiB read={s['swap_bytes_read'] / MiB:.0f} MiB "
             f"wall={s['wall_seconds']}s"]
    lines.append(f"  {label}: {idle_poll_summary(s)}")
    if "fault_batch_seconds" in s:
        lines.append(f"  {label}: {fault_breakdown(s)}")
    if s["pages_out"] == 0:
        lines.append(f"  {label}: WARNING: umgr paged nothing out (was the program managed at all?)")
    if s["peak_resident_bytes"] > budget_mib * MiB * 1.1:
        lines.append(f"  {label}: WARNING: peak resident {s['peak_resident_bytes'] / MiB:.1f} MiB "
                     f"over the {budget_mib} MiB budget")
    return lines


def format_workload(name: str, wl: dict) -> list[str]:
    configs = wl["configs"]
    kernel, polled = configs.get("kernel"), configs.get("kernel+poll")
    umgrs = [c for c in configs if c.startswith("umgr ")]
    phases = list(configs["plain"]["result"]["phases"])
    # Columns: plain, kernel, kernel+poll, then each umgr variant and its
    # ratios to kernel and kernel+poll.
    cols = [("plain", 9), ("kernel", 9)] if kernel else [("plain", 9)]
    cols += [("kernel+poll", 11)] if polled else []
    lines = []
    header = f"{'phase':<10}" + "".join(f"{c:>{w + 1}}" for c, w in cols)
    for c in umgrs:
        label = c[len("umgr "):]
        width = max(9, len(label))
        header += f" {label:>{width}}" + (f" {'/kernel':>7}" if kernel else "")
        header += f" {'/k+poll':>7}" if polled else ""
    lines += [header + "   (seconds)"]

    def row(label, get):
        line = f"{label:<10}"
        for c, w in cols:
            line += " " + _fmt(get(configs[c]), w)
        for c in umgrs:
            width = max(9, len(c) - len("umgr "))
            v = get(configs[c])
            line += " " + _fmt(v, width)
            for base in (kernel, polled):
                if base:
                    k = get(base)
                    line += " " + _fmt(v / k if v is not None and k else None, 7, 2)
        return line

    for ph in phases:
        lines.append(row(ph, lambda cfg, ph=ph: cfg["result"]["phases"].get(ph)))
    lines.append(row("total", lambda cfg: _total(cfg["result"])))

    # Per-phase faults, from the program's rusage.
    if "minflt" in configs["plain"]["result"]:
        widths = {c: max(9, len(c) - len("umgr ")) for c in umgrs}
        lines += ["", f"{'faults':<10}" + (f" {'kern maj':>9}" if kernel else "")
                  + "".join(f" {c[len('umgr '):]:>{widths[c]}}" for c in umgrs)
                  + "   (kernel: majflt; umgr: minflt = userfaults)"]
        for ph in phases:
            line = f"{ph:<10}"
            if kernel:
                line += " " + _fmt(kernel["result"]["majflt"].get(ph), 9)
            for c in umgrs:
                line += " " + _fmt(configs[c]["result"]["minflt"].get(ph), widths[c])
            lines.append(line)

    lines += ["", "  peak RSS (ru_maxrss): " + ", ".join(
        f"{c} {cfg['result']['peak_rss_kb'] / 1024:.0f} MiB" for c, cfg in configs.items())]
    if kernel:
        cg = kernel["cgroup"]
        lines.append(f"  kernel: swapfile {kernel['swap_mib']} MiB, cgroup pgmajfault={cg['pgmajfault']} "
                     f"pgfault={cg['pgfault']} max_usage={cg['max_usage_bytes'] / MiB:.1f} MiB failcnt={cg['failcnt']}")
    for c in ["kernel", *umgrs]:
        io = configs.get(c, {}).get("device")
        if io:
            lines.append(f"  {c}: device {io['device']}: {device_summary(io)}")
    for c in umgrs:
        lines += umgr_summary(c, configs[c]["umgr"], wl["budget_mib"])
    if wl.get("rounds", 1) > 1:
        for pair, ratios in wl.get("paired", {}).items():
            n = wl["rounds"]
            lines.append(f"  {pair} paired by round (median, lowest-highest of {n}): " + ", ".join(
                f"{ph} {med:.2f} ({lo:.2f}-{hi:.2f})" for ph, (med, lo, hi) in ratios.items()))
    for c, cfg in configs.items():
        if cfg.get("failures"):
            lines.append(f"  {c}: {len(cfg['failures'])} failed run(s), retried: {cfg['failures'][0]}")
        if len(cfg["round_totals"]) > 1:
            lines.append(f"  {c}: round totals " + ", ".join(f"{t:.3f}" for t in cfg["round_totals"]) + " (fastest shown)")
    return lines


def format_report(results: dict) -> str:
    p, env = results["params"], results["env"]
    lines = [f"kernel {env['kernel']}, {env['cpus']} CPUs, loadavg before {env['loadavg_before'][0]:.2f} "
             f"after {env['loadavg_after'][0]:.2f}; umgr: {' '.join(p['umgr'])}" + other_swaps_note(env)]
    if "shapes" in results["workloads"]:
        wl = results["workloads"]["shapes"]
        r = wl["configs"]["plain"]["result"]
        lines += ["", f"shapes: {p['data_mib']} MiB of data, budget {p['budget_mib']} MiB, {r['ops']} ops per "
                      f"random phase, hot set {r['hot_pages'] * 4096 // MiB} MiB, seed {p['seed']}"
                      + (f", best of {p['rounds']} rounds" if p["rounds"] > 1 else "")]
        lines += format_workload("shapes", wl)
    if "python" in results["workloads"]:
        wl = results["workloads"]["python"]
        r = wl["configs"]["plain"]["result"]
        lines += ["", f"python: scale {p['py_scale']} ({r['ints']} ints, {r['dict_entries']} dict entries, "
                      f"{r['bytes_mib']:.0f} MiB bytearray), plain peak RSS {wl['peak_mib']:.0f} MiB, "
                      f"budget {wl['budget_mib']} MiB"]
        lines += format_workload("python", wl)
    if "java" in results["workloads"]:
        wl = results["workloads"]["java"]
        r = wl["configs"]["plain"]["result"]
        lines += ["", f"java: {p['java_mib']} MiB of arrays, {r['map_entries']} map entries, collector {r['gc']}, "
                      f"plain peak RSS {wl['peak_mib']:.0f} MiB, budget {wl['budget_mib']} MiB"]
        lines += format_workload("java", wl)
    if "sort" in results["workloads"]:
        wl = results["workloads"]["sort"]
        r = wl["configs"]["plain"]["result"]
        lines += ["", f"sort: {r['input_mib']:.0f} MiB in {r['lines']} lines, plain peak RSS {wl['peak_mib']:.0f} MiB, "
                      f"budget {wl['budget_mib']} MiB"]
        lines += format_workload("sort", wl)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-mib", type=int, default=1024)
    parser.add_argument("--budget-mib", type=int, default=128)
    parser.add_argument("--phases", default=PHASES, help=f"shapes phases, in order (default {PHASES})")
    parser.add_argument("--ops", type=int, default=None,
                        help="page reads per random phase (default min(65536, data pages / 4))")
    parser.add_argument("--hot-mib", type=int, default=None, help="hot set of the hot phase (default min(64, budget/2))")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--variants", default="default",
                        help="umgr variants, ';'-separated umgr exec arguments, 'default' for none "
                             "(e.g. 'default;--policy none;--eviction fifo')")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each config keeps its fastest")
    parser.add_argument("--no-python", action="store_true", help="skip the CPython workload")
    parser.add_argument("--py-scale", type=float, default=1.0, help="CPython workload size (1: ~600 MB peak)")
    parser.add_argument("--py-budget-mib", type=int, default=None,
                        help="budget of the CPython workload (default: a third of its plain peak RSS, ~192 at scale 1)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the CPython workload")
    parser.add_argument("--no-java", action="store_true", help="skip the JVM workload")
    parser.add_argument("--java-mib", type=int, default=256, help="JVM workload's arrays (plain peak ~1.8x that)")
    parser.add_argument("--java-rounds", type=int, default=2, help="JVM workload's random updates, times the arrays")
    parser.add_argument("--java-gc", default="Serial", choices=["Serial", "Parallel", "G1"],
                        help="collector of the JVM workload (default Serial: what the JVM picks on a machine, "
                             "or in a container, of under 2 CPUs or 1792 MiB)")
    parser.add_argument("--java-budget-mib", type=int, default=None,
                        help="budget of the JVM workload (default: a third of its plain peak RSS)")
    parser.add_argument("--no-sort", action="store_true", help="skip the GNU sort workload")
    parser.add_argument("--sort-mib", type=int, default=80, help="GNU sort workload's input (plain peak ~1.9x that)")
    parser.add_argument("--sort-budget-share", type=float, default=0.85,
                        help="budget of the sort workload, as a share of its plain peak RSS (default 0.85)")
    parser.add_argument("--sort-budget-mib", type=int, default=None,
                        help="budget of the sort workload in MiB (instead of --sort-budget-share)")
    parser.add_argument("--no-kernel-swap", action="store_true", help="skip the swapfile + cgroup baseline")
    parser.add_argument("--kernel-idle-poll", action="store_true",
                        help="also run kernel swap with idle CPUs polling (as umgr's --idle-poll has them)")
    parser.add_argument("--umgr", default=None, help="umgr command (default: this python -m umgr)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per program run")
    parser.add_argument("--attempts", type=int, default=2,
                        help="tries of a failing umgr or kernel swap run (failures are reported)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.data_mib < 1 or args.budget_mib < 1 or args.sort_mib < 1:
        parser.error("--rounds, --data-mib, --budget-mib and --sort-mib must be at least 1")
    if not 0 < args.sort_budget_share <= 1:
        parser.error("--sort-budget-share must be more than 0 and at most 1")
    return run_and_report(lambda: run(args), format_report, args.json)


if __name__ == "__main__":
    sys.exit(main())
