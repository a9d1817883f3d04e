"""Eviction throughput: clustered vectored zaps versus per-page zaps.

umgr evicts by MADV_DONTNEED in the target (its agent thread calls
process_madvise(PIDFD_SELF) with one iovec per contiguous run). The range is
registered with a userfaultfd that reports REMOVE events, so the zapping
thread blocks on each iovec's REMOVE event until the daemon has read it. This
measures 512-page batches (bench/programs/zap.c) shaped as

  contiguous  one iovec of 512 pages
  clustered   8 iovecs of 64-page runs, one process_madvise
  scattered   512 one-page iovecs, one process_madvise
  madvise     512 madvise() calls of one page

with the events read by
  none        nobody: no userfaultfd (the kernel's zap cost alone)
  thread      a C thread in the zapping process, blocking in read()
  python      this process, like the umgr daemon: umgr.kernel.uffd.Userfaultfd
              taken with pidfd_getfd, UFFDIO_API(EVENT_REMOVE), registered
              MISSING|WP, drained in a trio task that busy-polls SPIN µs
              before awaiting the fd (umgr.paging.target's fault loop)

    python bench/bench_zap.py [--trials 200] [--spin-us 50]
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROGRAMS = HERE / "programs"
BATCH = 512
SHAPES = ("contiguous", "clustered", "scattered", "madvise")


def compile_zap(out_dir: str) -> str:
    exe = os.path.join(out_dir, "zap")
    subprocess.run(["gcc", "-O2", "-pthread", "-Wall", "-o", exe, str(PROGRAMS / "zap.c")], check=True)
    return exe


def run_c_reader(exe: str, reader: str, trials: int) -> dict:
    proc = subprocess.run([exe, reader, str(trials)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"zap {reader} exited {proc.returncode}: {proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_python_reader(exe: str, trials: int, spin_us: float) -> dict:
    import trio

    from umgr.kernel import procmem, uffd as uffdmod
    from umgr.kernel.uffd_extra import Userfaultfd

    spin = spin_us * 1e-6
    counts = {"removes": 0, "faults": 0, "reads": 0, "sleeps": 0}

    def handle(uffd: uffdmod.Userfaultfd, events: list) -> None:
        counts["reads"] += 1
        for event in events:
            if type(event) is uffdmod.RemoveEvent:
                counts["removes"] += 1
            elif type(event) is uffdmod.PageFault:
                # Not expected (the zapper populates with UFFDIO_COPY); served
                # anyway so that nothing hangs.
                counts["faults"] += 1
                page = event.address & ~0xFFF
                uffd.zeropage(page, 4096)

    async def drain_forever(uffd: uffdmod.Userfaultfd) -> None:
        # The daemon's fault loop (umgr.paging.faults.FaultService.run): read in
        # batches; when nothing is queued, busy-poll briefly, then await.
        while True:
            events = uffd.read_events(64)
            if events:
                handle(uffd, events)
                continue
            deadline = time.perf_counter() + spin
            while time.perf_counter() < deadline:
                events = uffd.read_events(64)
                if events:
                    handle(uffd, events)
                    break
            else:
                counts["sleeps"] += 1
                await uffd.wait_readable()

    async def main() -> dict:
        proc = await trio.lowlevel.open_process([exe, "external", str(trials)], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE)
        buffered = b""
        try:
            while b"\n" not in buffered:
                chunk = await proc.stdout.receive_some()
                if not chunk:
                    raise RuntimeError("zap external: exited before its hello")
                buffered += chunk
            line, _, buffered = buffered.partition(b"\n")
            hello = json.loads(line)
            pidfd = procmem.pidfd_open(hello["pid"])
            try:
                uffd = Userfaultfd(procmem.pidfd_getfd(pidfd, hello["uffd"]))
            finally:
                os.close(pidfd)
            with uffd:
                uffd.api(uffdmod.UFFD_FEATURE_EVENT_REMOVE)
                uffd.register(hello["region"], hello["length"],
                              uffdmod.UFFDIO_REGISTER_MODE_MISSING | uffdmod.UFFDIO_REGISTER_MODE_WP)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(drain_forever, uffd)
                    await proc.stdin.send_all(b"go\n")
                    while True:
                        chunk = await proc.stdout.receive_some()
                        if not chunk:
                            break
                        buffered += chunk
                    nursery.cancel_scope.cancel()
            status = await proc.wait()
            if status != 0:
                raise RuntimeError(f"zap external exited {status}")
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        result = json.loads(buffered.strip().splitlines()[-1])
        result["reader"] = f"python (trio, spin {spin_us:g} us)"
        result["reader_counts"] = dict(counts)
        return result

    return trio.run(main)


def summarize(result: dict) -> dict:
    out = {}
    for name, shape in result["shapes"].items():
        us = shape["us"]
        total = sum(us) * 1e-6
        out[name] = {
            "iovecs": shape["iovecs"],
            "calls": shape["calls"],
            "median_us": statistics.median(us),
            "mean_us": statistics.fmean(us),
            "min_us": min(us),
            # From the median: the VM is shared and the mean carries its stalls.
            "pages_per_s": BATCH / (statistics.median(us) * 1e-6),
            "pages_per_s_mean": BATCH * len(us) / total,
            "us_per_event": (statistics.median(us) / shape["iovecs"]),
            "events": shape["events"],
        }
    return out


def run(trials: int = 200, spin_us: float = 50.0, readers=("none", "thread", "python")) -> dict:
    if os.geteuid() != 0:
        raise SystemExit("bench_zap: needs root (userfaultfd events, pidfd_getfd)")
    results = {"params": {"trials": trials, "batch_pages": BATCH, "spin_us": spin_us},
               "env": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}, "readers": {}}
    with tempfile.TemporaryDirectory(prefix="umgr-bench-zap-") as work:
        exe = compile_zap(work)
        for reader in readers:
            if reader == "python":
                raw = run_python_reader(exe, trials, spin_us)
            else:
                raw = run_c_reader(exe, reader, trials)
            entry = {"raw": raw, "shapes": summarize(raw)}
            if reader == "python":
                # The daemon-side count, exact (the C thread's count can lag by one).
                entry["removes_read"] = raw["reader_counts"]["removes"]
            results["readers"][reader] = entry
    results["env"]["loadavg_after"] = os.getloadavg()
    results["ratios"] = {
        reader: {
            f"clustered_vs_{other}": entry["shapes"]["clustered"]["pages_per_s"] / entry["shapes"][other]["pages_per_s"]
            for other in ("scattered", "madvise")
        } | {"contiguous_vs_clustered": entry["shapes"]["contiguous"]["pages_per_s"]
             / entry["shapes"]["clustered"]["pages_per_s"]}
        for reader, entry in results["readers"].items()
    }
    return results


def format_report(results: dict) -> str:
    p, env = results["params"], results["env"]
    lines = [f"zap throughput: batches of {p['batch_pages']} pages, {p['trials']} timed trials per cell; "
             f"{env['cpus']} CPUs, loadavg before {env['loadavg_before'][0]:.2f} after {env['loadavg_after'][0]:.2f}",
             "",
             f"{'reader':<8} {'shape':<11} {'iovecs':>6} {'calls':>5} {'median us':>10} {'mean us':>9} "
             f"{'pages/s':>10} {'(mean)':>9} {'us/event':>9}"]
    for reader, entry in results["readers"].items():
        for name in SHAPES:
            s = entry["shapes"][name]
            per_event = f"{s['us_per_event']:.1f}" if reader != "none" else "-"
            lines.append(f"{reader:<8} {name:<11} {s['iovecs']:>6} {s['calls']:>5} {s['median_us']:>10.1f} "
                         f"{s['mean_us']:>9.1f} {s['pages_per_s']:>10.0f} {s['pages_per_s_mean']:>9.0f} {per_event:>9}")
        if "removes_read" in entry:
            expected = sum(entry["shapes"][n]["iovecs"] * p["trials"] for n in SHAPES)
            warm = sum(entry["shapes"][n]["iovecs"] * entry["raw"]["shapes"][n]["warmup"] for n in SHAPES)
            lines.append(f"         (REMOVE events read by the python reader: {entry['removes_read']}, "
                         f"expected {expected + warm} incl. warm-up; reader counts {entry['raw']['reader_counts']})")
    lines.append("  (pages/s from the median batch time; (mean) from the mean; us/event = median / iovecs or calls)")
    lines += ["", "ratios of pages/s, median (clustered vectored zap over the others):"]
    for reader, r in results["ratios"].items():
        lines.append(f"  {reader:<8} " + ", ".join(f"{k}={v:.1f}x" for k, v in r.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--spin-us", type=float, default=50.0, help="python reader busy-poll before sleeping")
    parser.add_argument("--readers", default="none,thread,python")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    results = run(args.trials, args.spin_us, [r for r in args.readers.split(",") if r])
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
