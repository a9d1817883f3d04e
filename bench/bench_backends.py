"""Backend benchmark: random 4 KiB faults served from each swap store, with
the kernel's own disk swap and zswap on the same data in the same run.

The data: the anonymous memory of a real CPython process (a list of dicts
with str, float and list fields, a shuffled list of ints, a JSON text),
dumped page by page from /proc/PID/mem into a file. Its make-up (zero and
same-filled pages, what umgr's lz4 and zstd make of the rest, per page) is
measured here and printed first.

The workload: bench/programs/heapreads.c reads the dump into anonymous
memory ("fill"), then reads READS pages picked at random, each hashed and
checked ("random"). Configurations, each at the same budget:

  plain           no limit (the reference);
  kernel swap     a cgroup v1 memory group limited to the budget, with a
                  swapfile of its own at the highest swap priority, zswap
                  off;
  kernel zswap    the same with zswap on (its compressor as this kernel
                  sets it); the zswap setting is restored afterwards;
  kernel swap, idle CPUs polling
                  kernel swap with the CPU latency request umgr's
                  --idle-poll holds held meanwhile: what the kernel makes
                  of the same help (its disk reads wake a sleeping thread);
  umgr BACKENDS   `umgr exec --max-resident BUDGET --backend ...` for each
                  variant (file; compressed, with lz4 and with zstd;
                  compressed in front of file with a cap of a sixteenth of
                  the data, so that it demotes).

The table gives each phase's seconds, random/kernel-swap and the faults
served from swap (kernel: the cgroup's major faults, pgmajfault; umgr:
faults_swapped, the faults its store served); then the
compressed tiers' figures: the most pages held at once, the memory they
took (entry overhead included) and so the ratio, and mean read times.

The stores alone ("stores" table): each backend, in this process, writes
the dump's pages in batches of 512 (4 batches in flight) and reads them
back in batches of 256, then reads 2000 single pages at random (a fault's
read): pages/s both ways and the single-page latency distribution.

With --redis, a local 3-node Redis Cluster is started (redis-server on free
ports, as the tests do) and `redis` joins both tables (alone, and behind a
compressed tier).

Needs root (swapon, cgroups, zswap parameters, userfaultfd), gcc, and the
cgroup v1 memory controller. Run it under the suite lock.

With --rounds N every configuration runs N times, in interleaved rounds;
the table shows each one's fastest random phase, and each umgr variant's
random phase over kernel swap's and zswap's of the same round follows
(median and range): single runs on a shared VM moved that ratio by a
third from one run to the next.

    python bench/bench_backends.py [--scale 1] [--budget-mib 32] [--reads 100000] [--rounds 1]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_paging import (  # noqa: E402  (a script here, or umgr.benchmarks)
    CGROUP_ROOT, ZSWAP_COMPRESSOR, MiB, BenchError, _run, cgroup_figures, compile_programs, default_umgr_cmd,
    enter_cgroup, idle_polling, kernel_swap, other_swaps, other_swaps_note, run_and_report, umgr_exec, zswap,
)
from bench_shapes import paired_ratios  # noqa: E402

SWAPFILE = "/var/tmp/umgr-bench-backends.swap"
CGROUP = os.path.join(CGROUP_ROOT, "umgr-bench-backends")
PAGE = 4096
TIMEOUT = 1800
# (name, zswap on, idle CPUs polling as umgr's --idle-poll has them)
KERNEL_CONFIGS = (("kernel swap", False, False), ("kernel zswap", True, False),
                  ("kernel swap, idle CPUs polling", False, True))

# A heap as CPython programs make one; SCALE multiplies the sizes (1: ~100 MiB).
HEAP_PROGRAM = r"""
import json, random, sys
scale = float(sys.argv[1])
random.seed(1)
words = [("w%d" % i) * random.randint(1, 4) for i in range(5000)]
records = [{"id": i, "name": random.choice(words), "score": random.random(),
            "tags": [random.choice(words) for _ in range(3)]} for i in range(int(150000 * scale))]
ints = list(range(0, int(3000000 * scale), 3)); random.shuffle(ints)
text = json.dumps(records[:int(20000 * scale)])
sys.stdout.write("ready\n"); sys.stdout.flush(); sys.stdin.read()
"""


# ---- the data ---------------------------------------------------------------------
def dump_heap(path: str, scale: float, python: str) -> int:
    """Every private writable anonymous page of a CPython process that built
    a heap, in address order, into `path`. Returns the page count."""
    proc = subprocess.Popen([python, "-c", HEAP_PROGRAM, str(scale)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        if proc.stdout.readline() != b"ready\n":
            raise BenchError("the heap program did not start")
        pages = 0
        with open(f"/proc/{proc.pid}/maps") as maps, open(f"/proc/{proc.pid}/mem", "rb") as mem, \
                open(path, "wb") as out:
            for line in maps:
                fields = line.split()
                anonymous = len(fields) < 6 or fields[5] == "[heap]"
                if not anonymous or fields[1][:2] != "rw":
                    continue
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                mem.seek(lo)
                out.write(mem.read(hi - lo))
                pages += (hi - lo) // PAGE
        return pages
    finally:
        proc.kill()
        proc.wait()


def data_makeup(path: str) -> dict:
    """What the dump is made of, and what each of umgr's codecs makes of it:
    ratio = page bytes / bytes held (as the compressed store counts them
    against its cap, alone: what does not compress is held raw), and
    per-page compress / decompress times in this process, from C."""
    from umgr.backends.compressed import CODECS, ENTRY_WORD, INCOMPRESSIBLE, entry_costs
    pages = np.fromfile(path, np.uint8).reshape(-1, PAGE)
    words = pages.view(np.uint64)
    same = (words == words[:, :1]).all(axis=1)
    zero = ~words.any(axis=1)
    rest = [bytes(p) for p in pages[~same]]
    makeup = {"pages": len(pages), "zero_pages": int(zero.sum()), "same_filled_pages": int(same.sum()),
              "compressors": {}}
    for codec in CODECS:
        compress, decompress = _umgr_codec(codec)
        started = time.perf_counter()
        packed = [compress(p) for p in rest]
        compress_s = time.perf_counter() - started
        started = time.perf_counter()
        for blob in packed:
            decompress(blob)
        decompress_s = time.perf_counter() - started
        sizes = np.array([len(b) for b in packed])
        held = np.where(sizes > INCOMPRESSIBLE, PAGE, sizes)   # held raw by a store alone
        cost = int(entry_costs(held).sum() + entry_costs(np.full(int(same.sum()), ENTRY_WORD)).sum())
        makeup["compressors"][f"{codec} (umgr)"] = {
            "ratio": len(pages) * PAGE / cost,
            "incompressible_pages": int((sizes > INCOMPRESSIBLE).sum()),
            "compress_us": compress_s / len(rest) * 1e6,
            "decompress_us": decompress_s / len(rest) * 1e6,
        }
    return makeup


def _umgr_codec(codec: str):
    """umgr's codec (through its C bindings, as the store calls it), one
    page at a time: (compress, decompress). A page that would not fit 3/4 of
    a page compresses to a full page here (the store declines it)."""
    import ctypes

    from umgr.backends.compressed import CODECS, ENTRY_LZ4, INCOMPRESSIBLE
    from umgr.backends.region import Region
    from umgr.bindings._kernel import ffi, lib
    from umgr.kernel.buffers import PageBuffer, bytes_address
    kind, level = CODECS[codec]
    handle, dctx, buf = lib.umgr_codec_new(kind, level), lib.umgr_zstd_new_dctx(), PageBuffer(1)
    region = Region(2, 1 << 20)   # a heap for one page at a time
    page_addr, lengths, values = np.array([buf.addr], np.uint64), np.zeros(1, np.int32), np.zeros(1, np.uint64)
    c_page, c_lengths, c_values = (ffi.cast(t, a.ctypes.data) for t, a in
                                   (("uint64_t *", page_addr), ("int32_t *", lengths), ("uint64_t *", values)))
    flag = ENTRY_LZ4 if codec == "lz4" else 0

    def compress(page: bytes) -> bytes:
        ctypes.memmove(buf.addr, page, PAGE)
        lib.umgr_codec_pack_batch(handle, region.heap, c_page, 1, INCOMPRESSIBLE, 0, c_lengths, c_values)
        length = int(lengths[0])
        if length <= 0:
            return page
        blob = ffi.buffer(ffi.cast("char *", region.area_address + int(values[0])), length - flag)[:]
        lib.umgr_entries_free(region.heap, c_lengths, c_values, 1)
        return blob

    def decompress(blob: bytes) -> None:
        if len(blob) < PAGE and not lib.umgr_entry_unpack(dctx, len(blob) + flag, bytes_address(blob), 0, buf.addr):
            raise BenchError(f"{codec}: a page did not come back")

    return compress, decompress


# ---- the configurations ---------------------------------------------------------------
def run_kernel(argv: list[str], budget_mib: int, swap_mib: int, with_zswap: bool, polling: bool,
               timeout: float) -> dict:
    polled = idle_polling() if polling else contextlib.nullcontext()
    with polled, kernel_swap(swap_mib, budget_mib * MiB, swapfile=SWAPFILE, cgroup=CGROUP,
                             with_zswap=with_zswap) as cg:
        result = _run(argv, "heapreads under kernel swap", timeout, preexec_fn=enter_cgroup(cg))
        figures = cgroup_figures(cg)
    return {"result": result, "cgroup": figures}


def run_umgr(argv: list[str], budget_mib: int, data_mib: int, swap_mib: int, backends: list[str],
             umgr_cmd: list[str], work: str, timeout: float) -> dict:
    options = [arg for spec in backends for arg in ("--backend", spec)]
    stats_file = os.path.join(work, "umgr.json")
    with zswap(False):
        result, stats, failures = umgr_exec(umgr_cmd, budget_mib, swap_mib, options, argv, stats_file,
                                            f"heapreads under umgr {' '.join(options)}", 2, timeout,
                                            data_mib=data_mib)
    return {"result": result, "umgr": stats, "failures": failures}


def variants(data_mib: int, redis_port: int | None) -> list[list[str]]:
    cap = f"compressed:cap={max(1, data_mib // 16)}M"   # heap data compresses ~5x: a sixteenth must demote
    out = [["file"], ["compressed"], ["compressed:codec=zstd"], [cap, "file"]]
    if redis_port:
        out += [[f"redis:port={redis_port}"], [cap, f"redis:port={redis_port}"]]
    return out


# ---- the stores alone ------------------------------------------------------------------
def store_figures(specs: list[str], sample: str, directory: str, singles: int = 2000) -> dict:
    """Batch write and read rates and single-page read latencies of one store."""
    import trio

    from umgr.backends import open_chain
    from umgr.cli import _backend_value
    from umgr.kernel.buffers import PageBuffer
    pages = np.fromfile(sample, np.uint8)
    n = len(pages) // PAGE
    buf, back = PageBuffer(n), PageBuffer(n)
    buf.bytes[:] = pages
    size = (n + 1024) * PAGE   # (and a compressed store may use as much: the default cap, a quarter, may not hold it)
    backend = open_chain(specs, {"size": size, "cap": size, "directory": directory}, _backend_value)
    try:
        slots = backend.slots.alloc(n)

        async def batches(op, size, target):
            async def lane(parts):
                for part in parts:
                    await op(slots[part], target.addrs(part))
            parts = np.array_split(np.arange(n), max(1, n // size))
            async with trio.open_nursery() as nursery:
                for lane_parts in (parts[i::4] for i in range(4)):
                    nursery.start_soon(lane, lane_parts)

        async def single_reads():
            picks = np.random.default_rng(1).integers(0, n, singles)
            times = np.empty(singles)
            for i, page in enumerate(picks.tolist()):
                started = time.perf_counter()
                await backend.read(slots[page:page + 1], back.addrs(np.array([page])))
                times[i] = time.perf_counter() - started
            return times

        started = time.perf_counter()
        trio.run(batches, backend.write, 512, buf)
        wrote = time.perf_counter() - started
        started = time.perf_counter()
        trio.run(batches, backend.read, 256, back)
        read = time.perf_counter() - started
        if not np.array_equal(buf.bytes, back.bytes):
            raise BenchError(f"{specs}: pages came back wrong")
        times = trio.run(single_reads) * 1e6
        return {"pages": n, "write_pages_s": n / wrote, "read_pages_s": n / read,
                "single_read_us": {f"p{q}": float(np.percentile(times, q)) for q in (50, 90, 99)}
                | {"max": float(times.max())}}
    finally:
        backend.close()
        buf.close()
        back.close()


def run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    if os.geteuid() != 0:
        raise BenchError("needs root (swapon, cgroups, zswap, userfaultfd)")
    umgr_cmd = shlex.split(args.umgr) if args.umgr else default_umgr_cmd()
    results: dict = {"params": vars(args) | {"umgr": umgr_cmd},
                     "env": {"kernel": platform.release(), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
                             "other_swaps": other_swaps(SWAPFILE)},
                     "configs": {}, "runs": {}, "stores": {}, "kernel_failures": {}}
    with open(ZSWAP_COMPRESSOR) as f:
        results["env"]["zswap_compressor"] = f.read().strip()
    with tempfile.TemporaryDirectory(prefix="umgr-bench-backends-", dir="/var/tmp") as work:
        exe = compile_programs(work, ("heapreads",))["heapreads"]
        sample = os.path.join(work, "heap.pages")
        log(f"dumping a CPython heap (scale {args.scale}) ...")
        dump_heap(sample, args.scale, args.python)
        results["data"] = data_makeup(sample)
        data_mib = results["data"]["pages"] * PAGE // MiB
        swap_mib = data_mib + 256
        argv = [exe, sample, str(args.reads), str(args.seed)]
        log("plain ...")
        results["configs"]["plain"] = {"result": _run(argv, "heapreads plain", args.timeout)}
        with contextlib.ExitStack() as stack:
            redis_port = stack.enter_context(local_redis(work)).port if args.redis else None
            for round_ in range(1, args.rounds + 1):
                tag = f"round {round_}/{args.rounds}: " if args.rounds > 1 else ""
                for name, with_zswap, polling in KERNEL_CONFIGS:
                    log(f"{tag}{name} ({args.budget_mib} MiB) ...")
                    # At this budget the memcg OOM killer ends some runs and not
                    # others, swap free: a result to report, not a crash; tried again.
                    for attempt in range(args.attempts):
                        try:
                            keep(results, name, round_, run_kernel(argv, args.budget_mib, swap_mib, with_zswap,
                                                                   polling, args.timeout))
                            break
                        except BenchError as exc:
                            log(f"{name} failed: {exc}")
                            results["kernel_failures"].setdefault(name, []).append(str(exc))
                for backends in variants(data_mib, redis_port):
                    name = "umgr " + " + ".join(backends)
                    log(f"{tag}{name} ...")
                    keep(results, name, round_, run_umgr(argv, args.budget_mib, data_mib, swap_mib, backends,
                                                         umgr_cmd, work, args.timeout))
            stores = [["file"], ["compressed"], ["compressed:codec=zstd"]]
            stores += [[f"redis:port={redis_port}"]] if redis_port else []
            for specs in stores:
                log(f"store {specs[0]} ...")
                name = specs[0].split(":port")[0].replace(":codec=", " ")
                results["stores"][name] = store_figures(specs, sample, work)
    results["env"]["loadavg_after"] = os.getloadavg()
    return results


def keep(results: dict, name: str, round_: int, run: dict) -> None:
    """A run of config `name` in round `round_`: listed under "runs", and
    under "configs" if its random phase is the config's fastest yet."""
    results["runs"].setdefault(name, []).append({"round": round_, **run})
    best = results["configs"].get(name)
    if best is None or run["result"]["phases"]["random"] < best["result"]["phases"]["random"]:
        results["configs"][name] = run


@contextlib.contextmanager
def local_redis(work: str):
    helpers = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "helpers")
    if not os.path.exists(os.path.join(helpers, "redis_cluster.py")):
        raise BenchError("--redis starts its cluster with the tests' helper: run it from a source checkout")
    sys.path.insert(0, helpers)
    from pathlib import Path

    from redis_cluster import RedisCluster
    cluster = RedisCluster(Path(work))
    try:
        yield cluster
    finally:
        cluster.stop()


# ---- the report --------------------------------------------------------------------------
def format_report(results: dict) -> str:
    data, configs = results["data"], results["configs"]
    lines = [f"data: {data['pages']} pages ({data['pages'] * PAGE / MiB:.0f} MiB) of a CPython heap; "
             f"{data['zero_pages']} zero, {data['same_filled_pages']} same-filled (zero included)"]
    for name, c in data["compressors"].items():
        lines.append(f"  {name:<15} {c['ratio']:.2f}x held (overhead included), {c['incompressible_pages']} pages "
                     f"incompressible; {c['compress_us']:.1f} us to compress a page, {c['decompress_us']:.1f} to "
                     f"decompress")
    random_s = {name: c["result"]["phases"]["random"] for name, c in configs.items()}
    kernel, zswap_s = random_s.get("kernel swap"), random_s.get("kernel zswap")
    lines.append(f"\nbudget {results['params']['budget_mib']} MiB, {results['params']['reads']} random page reads; "
                 f"kernel {results['env']['kernel']}, zswap compressor {results['env']['zswap_compressor']}"
                 + other_swaps_note(results["env"]))
    lines.append(f"{'config':<45} {'fill s':>8} {'random s':>9} {'/kernel swap':>13} {'/zswap':>7}  "
                 f"swap faults (kernel: cgroup pgmajfault; umgr: faults_swapped)")
    ratio = lambda x, base: f"{x / base:.2f}" if base else "-"
    for name, c in configs.items():
        phases = c["result"]["phases"]
        faults = c["cgroup"]["pgmajfault"] if "cgroup" in c else c.get("umgr", {}).get("faults_swapped", "")
        lines.append(f"{name:<45} {phases['fill']:>8.3f} {phases['random']:>9.3f} {ratio(phases['random'], kernel):>13} "
                     f"{ratio(phases['random'], zswap_s):>7}  {faults}")
    lines += paired_lines(results.get("runs", {}))
    for name, whys in results.get("kernel_failures", {}).items():
        outcome = "then ran" if name in configs else "every try"
        lines.append(f"{name}: {len(whys)} failed run(s), {outcome} ({whys[-1]})")
    for name, c in configs.items():
        for tier in c.get("umgr", {}).get("backend_tiers", []):
            if tier["tier"] == "compressed":
                lines.append(f"{name}: compressed tier held at most {tier['peak_pages']} pages "
                             f"({tier['peak_pages'] * PAGE / MiB:.1f} MiB) in "
                             f"{tier['peak_pages'] * PAGE / tier['peak_ratio'] / MiB if tier['peak_ratio'] else 0:.1f} "
                             f"MiB ({tier['peak_ratio']:.2f}x) of a {tier['capacity_bytes'] / MiB:.0f} MiB cap; "
                             f"{tier['incompressible_pages']} incompressible, {tier.get('demoted_pages', 0)} demoted; "
                             f"a read {tier['read_seconds_per_page'] * 1e6:.1f} us")
            elif tier["pages_read"]:
                lines.append(f"{name}: {tier['tier']} tier read {tier['pages_read']} pages, "
                             f"{tier['read_seconds_per_page'] * 1e6:.1f} us a page")
        for failure in c.get("failures", []):
            lines.append(f"{name}: a failed attempt: {failure}")
    if results.get("stores"):
        lines.append(f"\nstores alone: {'store':<16} {'write pages/s':>14} {'read pages/s':>13}   "
                     f"one-page read us: p50 / p90 / p99 / max")
        for name, f in results["stores"].items():
            q = f["single_read_us"]
            lines.append(f"              {name:<16} {f['write_pages_s']:>14.0f} {f['read_pages_s']:>13.0f}   "
                         f"{q['p50']:.0f} / {q['p90']:.0f} / {q['p99']:.0f} / {q['max']:.0f}")
    lines.append(f"load average before {results['env']['loadavg_before']}, after {results['env']['loadavg_after']}")
    return "\n".join(lines)


def paired_lines(runs: dict) -> list[str]:
    """Each umgr variant's random phase over kernel swap's and zswap's of
    the same round, when there were rounds to pair."""
    rounds = max((len(r) for r in runs.values()), default=0)
    if rounds < 2:
        return []
    lines = [f"random phase paired by round (median, lowest-highest of {rounds}):"]
    for name in runs:
        if not name.startswith("umgr "):
            continue
        parts = []
        for base in ("kernel swap", "kernel zswap"):
            ratio = paired_ratios(runs[name], runs.get(base, [])).get("random")
            if ratio:
                parts.append(f"/{base.split()[-1]} {ratio[0]:.2f} ({ratio[1]:.2f}-{ratio[2]:.2f})")
        lines.append(f"  {name:<43} " + ", ".join(parts))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="heap size (1: ~100 MiB)")
    parser.add_argument("--budget-mib", type=int, default=32)
    parser.add_argument("--reads", type=int, default=100000, help="random page reads")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--python", default=sys.executable, help="interpreter whose heap is dumped")
    parser.add_argument("--umgr", default=None, help="umgr command (default: this python -m umgr)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per program run")
    parser.add_argument("--attempts", type=int, default=3, help="tries of each kernel baseline (the OOM killer)")
    parser.add_argument("--redis", action="store_true", help="also on a local 3-node Redis Cluster")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds of every configuration (ratios paired by round)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return run_and_report(lambda: run(args), format_report, args.json)


if __name__ == "__main__":
    sys.exit(main())
