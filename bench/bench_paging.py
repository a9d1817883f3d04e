"""Paging benchmark: a sequential scan of data several times the budget.

One invocation measures, on the same machine and in the same run:

  plain          the scan with no limit (no paging at all: the reference);
  kernel swap    the scan in a cgroup v1 memory group limited to the budget,
                 with a swapfile (set up here and torn down in `finally`) at
                 the highest swap priority, zswap off meanwhile;
  kernel+poll    (--kernel-idle-poll; "kernel-swap+poll") kernel swap again,
                 with the CPU latency request umgr's --idle-poll holds held
                 meanwhile (idle CPUs poll): what the kernel makes of the
                 same help;
  umgr           `umgr exec --max-resident BUDGET` with the readahead and
                 none prefetch policies;
  floor          a minimal C userfaultfd handler (bench/programs/floor.c):
                 the cost of a fault served from userspace with no I/O, one
                 page and 16 pages per UFFDIO_COPY, under several thread
                 placements.

The workload is bench/programs/scan.c: first touch (write every word), then
PASSES sequential read passes that touch every page; it checks its sums and
reports per-phase times, rusage fault counts and /proc/vmstat pswpin/pswpout
deltas. Under umgr a userfault shows up as a minor fault in rusage, so the
per-pass minflt delta is the number of userfaults of that pass.

Needs root (swapon, cgroups, userfaultfd), gcc, mkswap/swapon/swapoff and the
cgroup v1 memory controller at /sys/fs/cgroup/memory.

    python bench/bench_paging.py [--data-mib 512] [--budget-mib 64] [--passes 2]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROGRAMS = HERE / "programs"
PAGE = 4096
MiB = 1 << 20

SWAPFILE = "/var/tmp/umgr-bench.swap"
CGROUP_ROOT = "/sys/fs/cgroup/memory"
CGROUP = os.path.join(CGROUP_ROOT, "umgr-bench")
ZSWAP_ENABLED = "/sys/module/zswap/parameters/enabled"
ZSWAP_COMPRESSOR = "/sys/module/zswap/parameters/compressor"
# The highest swap priority: the kernel fills the highest-priority area
# first, so the bench's swapfile goes before any zram or disk swap active.
SWAP_PRIORITY = 32767
RUN_TIMEOUT = 900

FLOOR_PLACEMENTS = ("any", "same", "cross", "spin")
FLOOR_COPIES = (1, 16)


class BenchError(RuntimeError):
    pass


# ---- building and running the programs ------------------------------------------
def compile_programs(out_dir: str, names=("scan", "floor")) -> dict[str, str]:
    """gcc each bench/programs/NAME.c into out_dir; NAME -> executable."""
    built = {}
    for name in names:
        exe = os.path.join(out_dir, name)
        subprocess.run(["gcc", "-O2", "-pthread", "-Wall", "-o", exe, str(PROGRAMS / f"{name}.c")], check=True)
        built[name] = exe
    return built


def _last_json_line(text: str, what: str) -> dict:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise BenchError(f"{what}: no JSON line in its output")


def _run(cmd: list[str], what: str, timeout: float = RUN_TIMEOUT, **kwargs) -> dict:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} timed out after {timeout:.0f}s") from None
    if proc.returncode != 0:
        raise BenchError(f"{what} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    result = _last_json_line(proc.stdout, what)
    if result.get("ok") is False:
        raise BenchError(f"{what}: data check failed: {proc.stderr.strip()[-2000:]}")
    result["stderr"] = proc.stderr.strip()[-2000:]
    return result


def run_plain(scan: str, data_mib: int, passes: int) -> dict:
    return {"scan": _run([scan, str(data_mib), str(passes)], "plain scan")}


# ---- kernel swap: swapfile + cgroup v1 memory limit ------------------------------------
def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


def _read_kv(path: str) -> dict[str, int]:
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[key] = int(value)
    return out


def _active_swaps() -> list[str]:
    with open("/proc/swaps") as f:
        return [line.split()[0] for line in f.readlines()[1:] if line.strip()]


def other_swaps(swapfile: str) -> list[str]:
    """The swap areas active beside `swapfile`, as "NAME (priority P)".
    kernel_swap() puts its swapfile above them, but one of the same
    priority shares the writes with it (round robin)."""
    with open("/proc/swaps") as f:
        rows = [line.split() for line in f.readlines()[1:] if line.strip()]
    return [f"{row[0]} (priority {row[-1]})" for row in rows if row[0] != swapfile]


def _remove_swapfile(swapfile: str = SWAPFILE) -> None:
    if swapfile in _active_swaps():
        subprocess.run(["swapoff", swapfile], check=False, capture_output=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(swapfile)


def _remove_cgroup(cgroup: str = CGROUP) -> None:
    if not os.path.isdir(cgroup):
        return
    # Anything left in it (a scan killed by Ctrl-C) is killed first.
    for attempt in range(50):
        with open(os.path.join(cgroup, "cgroup.procs")) as f:
            pids = [int(p) for p in f.read().split()]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.rmdir(cgroup)
            return
        except OSError:
            time.sleep(0.1)
    print(f"bench: could not remove {cgroup}", file=sys.stderr)


def _teardown_kernel_swap(swapfile: str = SWAPFILE, cgroup: str = CGROUP) -> None:
    try:
        _remove_cgroup(cgroup)
    finally:
        _remove_swapfile(swapfile)


@contextlib.contextmanager
def idle_polling():
    """Idle CPUs poll meanwhile, as umgr's --idle-poll has them do."""
    from umgr.kernel.cpulatency import CpuLatencyRequest
    request = CpuLatencyRequest()
    request.hold(0)
    try:
        yield
    finally:
        request.release()


@contextlib.contextmanager
def zswap(enabled: bool):
    """zswap on or off for the block; the setting it had is restored, in a
    `finally`. Off on a kernel without zswap: nothing to do."""
    if not os.path.exists(ZSWAP_ENABLED):
        if enabled:
            raise BenchError("this kernel has no zswap")
        yield
        return
    with open(ZSWAP_ENABLED) as f:
        before = f.read().strip()
    try:
        with open(ZSWAP_ENABLED, "w") as f:
            f.write("Y" if enabled else "N")
        yield
    finally:
        with open(ZSWAP_ENABLED, "w") as f:
            f.write(before)


@contextlib.contextmanager
def kernel_swap(swap_mib: int, limit_bytes: int, *, swapfile: str = SWAPFILE, cgroup: str = CGROUP,
                with_zswap: bool = False):
    """A swapfile of swap_mib MiB, swapped on at the highest priority, and
    the cgroup `cgroup` limited to limit_bytes; both removed on the way out,
    whatever happened. zswap is off meanwhile (on with `with_zswap`), its
    setting restored after. (Leftovers of an interrupted run under the same
    names are removed first: another benchmark running at the same time
    needs names of its own.)"""
    if not os.path.isdir(CGROUP_ROOT):
        raise BenchError(f"no cgroup v1 memory controller at {CGROUP_ROOT}")
    with zswap(with_zswap):
        _teardown_kernel_swap(swapfile, cgroup)  # leftovers of an interrupted run
        try:
            _swap_on(swapfile, swap_mib)
            _make_cgroup(cgroup, limit_bytes)
            yield cgroup
        finally:
            _teardown_kernel_swap(swapfile, cgroup)


def _swap_on(swapfile: str, swap_mib: int) -> None:
    """A swapfile of swap_mib MiB at `swapfile`, swapped on at SWAP_PRIORITY."""
    fd = os.open(swapfile, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, swap_mib * MiB)
    finally:
        os.close(fd)
    subprocess.run(["mkswap", swapfile], check=True, capture_output=True)
    on = subprocess.run(["swapon", "-p", str(SWAP_PRIORITY), swapfile], capture_output=True, text=True)
    if on.returncode != 0:
        # A filesystem that refuses fallocated swapfiles ("has holes"): write it.
        os.unlink(swapfile)
        subprocess.run(["dd", "if=/dev/zero", f"of={swapfile}", "bs=1M", f"count={swap_mib}", "status=none"],
                       check=True)
        os.chmod(swapfile, 0o600)
        subprocess.run(["mkswap", swapfile], check=True, capture_output=True)
        subprocess.run(["swapon", "-p", str(SWAP_PRIORITY), swapfile], check=True, capture_output=True)


def _make_cgroup(cgroup: str, limit_bytes: int) -> None:
    """The memory cgroup `cgroup`, limited to limit_bytes (swap unlimited)."""
    os.mkdir(cgroup)
    memsw = os.path.join(cgroup, "memory.memsw.limit_in_bytes")
    if os.path.exists(memsw):
        _write(memsw, -1)
    _write(os.path.join(cgroup, "memory.limit_in_bytes"), limit_bytes)


def enter_cgroup(cgroup: str = CGROUP):
    """A preexec_fn that moves the child into `cgroup` between fork and exec."""
    def enter() -> None:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    return enter


_enter_cgroup = enter_cgroup(CGROUP)


def _block_stat_path(path: str) -> str:
    """/sys/dev/block/MAJ:MIN/stat of the block device (or partition)
    holding `path`."""
    dev = os.stat(path).st_dev
    return f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"


@contextlib.contextmanager
def device_io(path: str):
    """What the block device holding `path` did inside the block: a dict
    filled on the way out with its name, reads and writes (requests and
    MiB), and its average queue depth while busy (time in queue / time
    busy: how many requests a workload keeps in flight). The whole
    device's figures: anything else using it counts too."""
    stat_path = _block_stat_path(path)
    figures: dict = {"device": os.path.basename(os.path.realpath(os.path.dirname(stat_path)))}

    def sample() -> list[int]:
        with open(stat_path) as f:
            return [int(x) for x in f.read().split()]

    # Fields (Documentation/block/stat.rst): 0 reads, 2 sectors read,
    # 4 writes, 6 sectors written, 9 ms busy, 10 ms in queue (512-byte sectors).
    before = sample()
    try:
        yield figures
    finally:
        after = sample()
        delta = [a - b for a, b in zip(after, before)]
        figures.update(reads=delta[0], read_mib=delta[2] * 512 / MiB, writes=delta[4],
                       write_mib=delta[6] * 512 / MiB, busy_seconds=delta[9] / 1000,
                       queue_depth=delta[10] / delta[9] if delta[9] else 0.0)


def device_summary(io: dict) -> str:
    """One line of device_io()'s figures."""
    return (f"{io['reads']} reads ({io['read_mib']:.0f} MiB), {io['writes']} writes ({io['write_mib']:.0f} MiB), "
            f"busy {io['busy_seconds']:.2f} s with {io['queue_depth']:.1f} requests in flight on average")


def cgroup_figures(cg: str) -> dict:
    """The memory cgroup's fault counts and peak usage."""
    stat = _read_kv(os.path.join(cg, "memory.stat"))
    return {
        "pgmajfault": stat.get("total_pgmajfault", stat.get("pgmajfault")),
        "pgfault": stat.get("total_pgfault", stat.get("pgfault")),
        "max_usage_bytes": int(open(os.path.join(cg, "memory.max_usage_in_bytes")).read()),
        "failcnt": int(open(os.path.join(cg, "memory.failcnt")).read()),
    }


def run_kernel_swap(scan: str, data_mib: int, budget_mib: int, passes: int, swap_mib: int) -> dict:
    with kernel_swap(swap_mib, budget_mib * MiB) as cg:
        scan_result = _run([scan, str(data_mib), str(passes)], "scan under kernel swap", preexec_fn=_enter_cgroup)
        cgroup = cgroup_figures(cg)
    return {"scan": scan_result, "cgroup": cgroup, "swap_mib": swap_mib}


# ---- umgr ----------------------------------------------------------------------
def default_umgr_cmd() -> list[str]:
    """This interpreter's umgr, else the repository's .venv."""
    import importlib.util
    venv_python = HERE.parent / ".venv" / "bin" / "python"
    if importlib.util.find_spec("umgr") is None and venv_python.exists():
        return [str(venv_python), "-m", "umgr"]
    return [sys.executable, "-m", "umgr"]


def run_umgr(scan: str, data_mib: int, budget_mib: int, passes: int, policy: str, work: str,
             umgr_cmd: list[str], attempts: int = 3, trace: bool = False) -> dict:
    """One scan under `umgr exec` (with `trace`, recording a fault trace). A
    failed run (umgr exiting non-zero) is retried, and its error kept in the
    result's "failures": a benchmark that hid them would hide bugs."""
    trace_file = os.path.join(work, f"umgr-{policy}.trace")
    result, stats, failures = umgr_exec(umgr_cmd, budget_mib, data_mib + 256,
                                        ["--policy", policy, *(["--record-trace", trace_file] if trace else [])],
                                        [scan, str(data_mib), str(passes)], os.path.join(work, f"umgr-{policy}.json"),
                                        f"scan under umgr ({policy}{', tracing' if trace else ''})", attempts,
                                        data_mib=data_mib)
    out = {"scan": result, "umgr": stats, "failures": failures}
    if trace:
        out["trace_bytes"] = os.path.getsize(trace_file)
        os.unlink(trace_file)
    return out


def umgr_exec(umgr_cmd: list[str], budget_mib: int, swap_mib: int, umgr_args: list[str], program: list[str],
              stats_file: str, what: str, attempts: int = 3,
              timeout: float = RUN_TIMEOUT, *, data_mib: float | None) -> tuple[dict, dict, list[str]]:
    """`umgr exec --max-resident BUDGET --swap-size SWAP UMGR_ARGS
    --stats-json STATS_FILE -- PROGRAM`: (the program's JSON line, umgr's
    --stats-json figures, the errors of failed attempts, which were retried).
    data_mib: the memory PROGRAM's data takes (None: not known). Raises
    BenchError, without retrying, for a run that was not managed (unmanaged()):
    its figures are not umgr's."""
    cmd = [*umgr_cmd, "exec", "--max-resident", f"{budget_mib}M", "--swap-size", f"{swap_mib}M", *umgr_args,
           "--stats-json", stats_file, "--", *program]
    failures = []
    for _ in range(attempts):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stats_file)
        try:
            result = _run(cmd, what, timeout)
        except BenchError as exc:
            lines = [line.strip().lstrip("|+- ") for line in str(exc).splitlines() if line.strip().strip("|+-").strip()]
            failures.append(lines[-1] if lines else str(exc))
            continue
        with open(stats_file) as f:
            stats = json.load(f)
        why = unmanaged(stats, budget_mib, data_mib)
        if why:
            raise BenchError(f"{what}: {why}; not a umgr figure")
        return result, stats, failures
    raise BenchError(f"{what} failed {attempts} times: {failures}")


def unmanaged(stats: dict, budget_mib: float, data_mib: float | None) -> str | None:
    """Why a run's --stats-json figures are not of a managed program, or
    None. The shim fails open: a program that cannot reach the daemon runs
    unmanaged, and umgr exec only warns. So: no target at all; or, with
    data above the budget, no page out."""
    if stats.get("targets") == 0:
        return "the daemon managed no process (the program ran unmanaged)"
    if data_mib is not None and budget_mib < data_mib and stats.get("pages_out") == 0:
        return f"no page went out with {data_mib:.0f} MiB of data under a {budget_mib} MiB budget (unmanaged?)"
    return None


def idle_poll_summary(stats: dict) -> str:
    """How long umgr held idle CPUs polling (--idle-poll), against the
    run's wall time, from its --stats-json figures."""
    held, wall = stats.get("idle_poll_seconds"), stats["wall_seconds"]
    if held is None:
        return "idle CPUs polling: not reported"
    return f"idle CPUs polling {held:.2f} s of {wall:.2f} s wall" + (f" ({held / wall:.0%})" if wall else "")


# ---- the C handler floor ------------------------------------------------------------
def run_floors(floor: str, mib: int, placements=FLOOR_PLACEMENTS, copies=FLOOR_COPIES) -> dict:
    out = {}
    for per_copy in copies:
        for placement in placements:
            if placement != "any" and os.cpu_count() < 2:
                continue
            out[f"{per_copy}p-{placement}"] = _run([floor, str(mib), str(per_copy), placement],
                                                    f"floor {per_copy} {placement}")
    return out


# ---- the run ----------------------------------------------------------------------
def _figures(result: dict, data_mib: int) -> dict:
    """Derived figures of one scan run: read passes and first touch."""
    scan = result["scan"]
    pages = scan["pages"]
    passes = scan["pass_s"]
    mean_pass = sum(passes) / len(passes) if passes else float("nan")
    # Per-pass fault counts: majflt for kernel swap, minflt (= userfaults) for umgr.
    pass_majflt = sum(scan["majflt"][1:])
    pass_minflt = sum(scan["minflt"][1:])
    fig = {
        "first_touch_s": scan["first_touch_s"],
        "pass_s": passes,
        "mean_pass_s": mean_pass,
        "pages_per_s": pages / mean_pass,
        "gb_per_s": data_mib * MiB / mean_pass / 1e9,
        "pass_majflt": pass_majflt,
        "pass_minflt": pass_minflt,
        "pass_pswpin": sum(scan["pswpin"][1:]),
        "pass_pswpout": sum(scan["pswpout"][1:]),
        "touch_pswpout": scan["pswpout"][0],
    }
    return fig


def _derive(name: str, result: dict, data_mib: int) -> dict:
    f = _figures(result, data_mib)
    read_pages = result["scan"]["pages"] * len(result["scan"]["pass_s"])
    if "umgr" in result:
        # Userfaults during the read passes are the rusage minflt deltas
        # (ordinary minor faults there are ~0: the plain run shows it).
        f["faults"] = result["umgr"]["faults"]
        nfaults = f["pass_minflt"]
    elif name.startswith("kernel-swap"):
        nfaults = f["pass_majflt"]
    else:
        return f
    f["us_per_fault"] = sum(f["pass_s"]) / nfaults * 1e6 if nfaults else float("nan")
    f["pages_per_fault"] = read_pages / nfaults if nfaults else 0
    return f


def run(data_mib: int = 512, budget_mib: int = 64, passes: int = 2, *, rounds: int = 2,
        floor_mib: int | None = None, umgr_cmd: list[str] | None = None, policies=("readahead", "none"),
        kernel: bool = True, none_passes: int = 1, trace: bool = False, kernel_poll: bool = False,
        log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Measure every configuration; returns raw results, derived figures and ratios.

    The VM is shared: the quick configurations (plain, kernel swap, umgr with
    readahead) run `rounds` times, interleaved, and each is represented by its
    fastest round (all rounds are kept). With `trace`, each quick umgr
    configuration also runs with --record-trace, interleaved, to measure the
    cost of recording. With `kernel_poll`, kernel swap also runs with idle
    CPUs polling ("kernel-swap+poll"). Policy none makes one userfault per
    page and takes a minute per pass at the default size: it runs once, with
    min(passes, none_passes) passes."""
    if passes < 1 or rounds < 1:
        raise ValueError("passes and rounds must be at least 1")
    if os.geteuid() != 0:
        raise BenchError("needs root (swapon, cgroups, userfaultfd)")
    umgr_cmd = umgr_cmd or default_umgr_cmd()
    floor_mib = floor_mib or min(data_mib, 128)
    results: dict = {
        "params": {"data_mib": data_mib, "budget_mib": budget_mib, "passes": passes, "rounds": rounds,
                   "floor_mib": floor_mib, "none_passes": none_passes},
        "env": {"kernel": platform.release(), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
                "other_swaps": other_swaps(SWAPFILE)},
        "configs": {},
    }
    raw: dict[str, list[dict]] = {}
    # The kernel frees a swap slot on swap-in when swap is over half full
    # (vm_swap_full()), so with data + 256 MiB of swap every page read back is
    # written again when evicted; with room to spare a clean page keeps its
    # slot and is dropped without I/O.
    # (name, swap MiB, idle CPUs polling as umgr's --idle-poll has them)
    kernel_configs = [("kernel-swap", data_mib + 256, False), ("kernel-swap-roomy", 3 * data_mib + 256, False)]
    kernel_configs += [("kernel-swap+poll", data_mib + 256, True)] if kernel_poll else []
    kernel_configs = kernel_configs if kernel else []
    with tempfile.TemporaryDirectory(prefix="umgr-bench-") as work:
        exe = compile_programs(work)
        for r in range(rounds):
            log(f"round {r + 1}/{rounds}: plain ...")
            raw.setdefault("plain", []).append(run_plain(exe["scan"], data_mib, passes))
            for name, swap_mib, polling in kernel_configs:
                log(f"round {r + 1}/{rounds}: {name} (swapfile of {swap_mib} MiB + cgroup v1 limit) ...")
                with idle_polling() if polling else contextlib.nullcontext():
                    raw.setdefault(name, []).append(
                        run_kernel_swap(exe["scan"], data_mib, budget_mib, passes, swap_mib))
            for policy in policies:
                if policy == "none":
                    continue
                for traced in (False, True) if trace else (False,):
                    name = f"umgr-{policy}{'+trace' if traced else ''}"
                    log(f"round {r + 1}/{rounds}: umgr --policy {policy}{' --record-trace' if traced else ''} ...")
                    raw.setdefault(name, []).append(
                        run_umgr(exe["scan"], data_mib, budget_mib, passes, policy, work, umgr_cmd, trace=traced))
        for traced in ((False, True) if trace else (False,)) if "none" in policies else ():
            log(f"umgr --policy none{' --record-trace' if traced else ''} ...")
            raw[f"umgr-none{'+trace' if traced else ''}"] = [
                run_umgr(exe["scan"], data_mib, budget_mib, min(passes, none_passes), "none", work, umgr_cmd,
                         trace=traced)]
        log("C handler floor ...")
        results["floor"] = run_floors(exe["floor"], floor_mib)
    results["env"]["loadavg_after"] = os.getloadavg()

    for name, runs in raw.items():
        figures = [_derive(name, result, data_mib) for result in runs]
        best = min(range(len(runs)), key=lambda i: figures[i]["mean_pass_s"])
        results["configs"][name] = {**runs[best], "figures": figures[best], "round": best + 1,
                                    "failures": [f for result in runs for f in result.get("failures", [])],
                                    "rounds": [{"first_touch_s": f["first_touch_s"], "pass_s": f["pass_s"]}
                                               for f in figures]}
    results["ratios"] = _ratios(results)
    results["eviction"] = _eviction(results)
    return results


def _ratios(results: dict) -> dict:
    configs = results["configs"]
    floor = results["floor"]
    out = {}
    for name, result in configs.items():
        if not name.startswith("umgr-"):
            continue
        f = result["figures"]
        r = {}
        for kname in ("kernel-swap", "kernel-swap-roomy", "kernel-swap+poll"):
            if kname in configs:
                kswap = configs[kname]["figures"]
                r[f"pass_time_vs_{kname}"] = f["mean_pass_s"] / kswap["mean_pass_s"]
                r[f"first_touch_vs_{kname}"] = f["first_touch_s"] / kswap["first_touch_s"]
        for key in ("1p-any", "16p-any"):
            if key in floor:
                fl = floor[key]
                r[f"pass_time_vs_floor_{key}"] = f["mean_pass_s"] / (result["scan"]["pages"] / fl["pages_per_s"])
        if "1p-any" in floor:
            r["us_per_fault_vs_floor_1p-any"] = f["us_per_fault"] / floor["1p-any"]["us_per_fault"]
        untraced = configs.get(name.removesuffix("+trace")) if name.endswith("+trace") else None
        if untraced is not None:
            r["pass_time_vs_untraced"] = f["mean_pass_s"] / untraced["figures"]["mean_pass_s"]
            r["first_touch_vs_untraced"] = f["first_touch_s"] / untraced["figures"]["first_touch_s"]
            r["wall_vs_untraced"] = result["umgr"]["wall_seconds"] / untraced["umgr"]["wall_seconds"]
        out[name] = r
    return out


def _eviction(results: dict) -> dict:
    """Pages paged out during the first touch (the scan writes data >> budget)."""
    p = results["params"]
    data_pages, budget_pages = p["data_mib"] * MiB // PAGE, p["budget_mib"] * MiB // PAGE
    out = {}
    for name, result in results["configs"].items():
        if name == "plain":
            continue
        f = result["figures"]
        e = {"first_touch_s": f["first_touch_s"]}
        if "umgr" in result:
            s = result["umgr"]
            # At least data - budget pages left during the first touch.
            e["touch_pages_out"] = data_pages - budget_pages
            e["pages_out_total"] = s["pages_out"]
            e["pages_out_per_s_total"] = s["pages_out"] / s["wall_seconds"]
            e["zap_batches"] = s.get("zap_batches")
            e["pages_per_zap_range"] = s["pages_out"] / s["zap_ranges"] if s.get("zap_ranges") else None
            e["swap_mib_written"] = s["swap_bytes_written"] / MiB
        else:
            e["touch_pages_out"] = f["touch_pswpout"]
            e["pass_pages_out"] = f["pass_pswpout"]
            e["swap_mib_written"] = (f["touch_pswpout"] + f["pass_pswpout"]) * PAGE / MiB
        e["touch_pages_out_per_s"] = e["touch_pages_out"] / f["first_touch_s"]
        out[name] = e
    return out


# ---- the table --------------------------------------------------------------------------
def format_report(results: dict) -> str:
    p = results["params"]
    lines = [f"sequential scan: {p['data_mib']} MiB of data, budget {p['budget_mib']} MiB "
             f"({p['data_mib'] / p['budget_mib']:.0f}x), {p['passes']} read passes (policy none: {min(p['passes'], p['none_passes'])}), "
             f"best of {p['rounds']} rounds; "
             f"kernel {results['env']['kernel']}, {results['env']['cpus']} CPUs, "
             f"loadavg before {results['env']['loadavg_before'][0]:.2f} after {results['env']['loadavg_after'][0]:.2f}"
             + other_swaps_note(results["env"]),
             "",
             f"{'config':<16} {'touch s':>8} {'pass s (each)':>22} {'pages/s':>10} {'GB/s':>6} "
             f"{'faults/pass':>11} {'pg/fault':>8} {'us/fault':>9}"]
    for name, result in results["configs"].items():
        f = result["figures"]
        each = ", ".join(f"{t:.3f}" for t in f["pass_s"])
        faults = f.get("us_per_fault")
        nfaults = (f["pass_minflt"] if "umgr" in result else f["pass_majflt"]) / len(f["pass_s"])
        lines.append(f"{name:<16} {f['first_touch_s']:>8.3f} {each:>22} {f['pages_per_s']:>10.0f} "
                     f"{f['gb_per_s']:>6.3f} {nfaults:>11.0f} {f.get('pages_per_fault', 0):>8.1f} "
                     f"{(f'{faults:.1f}' if faults is not None else '-'):>9}")
    lines.append("  (each config: its fastest round. faults: umgr = userfaults (rusage minflt) per pass; "
                 "kernel swap = major faults per pass; us/fault = pass time / faults)")
    for name, result in results["configs"].items():
        if len(result["rounds"]) > 1:
            lines.append(f"  {name} rounds (touch s / pass s): " + "; ".join(
                f"{r['first_touch_s']:.3f} / " + ", ".join(f"{t:.3f}" for t in r["pass_s"]) for r in result["rounds"]))
    for name, result in results["configs"].items():
        if "umgr" in result:
            s = result["umgr"]
            lines.append(f"  {name}: stats faults={s['faults']} pages_in={s['pages_in']} prefetched={s['prefetched']} "
                         f"pages_out={s['pages_out']} peak_resident={s['peak_resident_bytes'] / MiB:.1f} MiB "
                         f"swap written={s['swap_bytes_written'] / MiB:.0f} MiB read={s['swap_bytes_read'] / MiB:.0f} MiB "
                         f"wall={s['wall_seconds']}s"
                         + (f" trace={result['trace_bytes'] / MiB:.1f} MiB" if "trace_bytes" in result else ""))
            lines.append(f"  {name}: {idle_poll_summary(s)}")
        elif name.startswith("kernel-swap"):
            c, f = result["cgroup"], result["figures"]
            lines.append(f"  {name}: swapfile {result['swap_mib']} MiB, cgroup pgmajfault={c['pgmajfault']} max_usage={c['max_usage_bytes'] / MiB:.1f} MiB; "
                         f"pswpin in passes={f['pass_pswpin']} pswpout in passes={f['pass_pswpout']}")

    for name, result in results["configs"].items():
        if result.get("failures"):
            lines.append(f"  {name}: {len(result['failures'])} failed umgr run(s), retried: {result['failures'][0]}")

    lines += ["", f"C handler floor ({p['floor_mib']} MiB, one read pass, no I/O):",
              f"{'pages/copy':>10} {'placement':>9} {'faults':>8} {'us/fault':>9} {'pages/s':>10}"]
    for key, fl in results["floor"].items():
        lines.append(f"{fl['pages_per_copy']:>10} {fl['mode']:>9} {fl['faults']:>8} {fl['us_per_fault']:>9.1f} "
                     f"{fl['pages_per_s']:>10.0f}")

    lines += ["", "ratios (>1: umgr slower):"]
    for name, r in results["ratios"].items():
        lines.append(f"  {name}:")
        items = list(r.items())
        for i in range(0, len(items), 3):
            lines.append("    " + ", ".join(f"{k}={v:.2f}" for k, v in items[i:i + 3]))

    lines += ["", "eviction during the first touch (data - budget pages at least leave):"]
    for name, e in results["eviction"].items():
        extra = ""
        if "pages_out_total" in e:
            extra = (f"; all run: {e['pages_out_total']} pages out, {e['pages_out_per_s_total']:.0f}/s of wall, "
                     f"{e['pages_per_zap_range'] or 0:.0f} pages per zap range, {e['swap_mib_written']:.0f} MiB written")
        else:
            extra = f"; read passes: {e['pass_pages_out']} pages out, {e['swap_mib_written']:.0f} MiB written in all"
        lines.append(f"  {name:<16} {e['touch_pages_out']} pages in {e['first_touch_s']:.3f}s = "
                     f"{e['touch_pages_out_per_s']:.0f} pages/s{extra}")
    return "\n".join(lines)


def other_swaps_note(env: dict) -> str:
    """The report's note of the swap areas active beside the kernel-swap
    swapfile (results["env"]["other_swaps"]), or ""."""
    others = env.get("other_swaps")
    return f"; other swap areas active: {', '.join(others)}" if others else ""


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-mib", type=int, default=512)
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the quick configs (best kept)")
    parser.add_argument("--floor-mib", type=int, default=None, help="region of the floor runs (default min(data, 128))")
    parser.add_argument("--policies", default="readahead,none", help="umgr prefetch policies, comma-separated")
    parser.add_argument("--none-passes", type=int, default=1, help="read passes for policy none (it is slow)")
    parser.add_argument("--no-kernel-swap", action="store_true", help="skip the swapfile + cgroup baseline")
    parser.add_argument("--kernel-idle-poll", action="store_true",
                        help="also run kernel swap with idle CPUs polling (as umgr's --idle-poll has them)")
    parser.add_argument("--umgr", default=None, help="umgr command (default: this python -m umgr)")
    parser.add_argument("--record-trace", action="store_true",
                        help="also run each quick umgr config with --record-trace (the cost of recording)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = parser.parse_args(argv)
    return run_and_report(lambda: run(args.data_mib, args.budget_mib, args.passes, rounds=args.rounds,
                                      floor_mib=args.floor_mib, umgr_cmd=args.umgr.split() if args.umgr else None,
                                      policies=[p for p in args.policies.split(",") if p],
                                      kernel=not args.no_kernel_swap, none_passes=args.none_passes,
                                      trace=args.record_trace, kernel_poll=args.kernel_idle_poll),
                          format_report, args.json)


def run_and_report(measure, format_report, json_path: str | None) -> int:
    """A benchmark's main: results = measure(), its report printed and the
    results written to json_path; SIGTERM/SIGHUP unwind like Ctrl-C, so a
    kernel_swap() swapfile and cgroup go away. The exit status."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        results = measure()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted (swapfile and cgroup removed)", file=sys.stderr)
        return 130
    print(format_report(results))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
