"""A real cache under a budget: redis-server under umgr against the kernel's own swap.

redis-server (unmodified, the system's) holds KEYS values of VALUE bytes
each, far more than its budget, and a client outside the budget drives it
phase by phase, checking every value it reads:

  load      SET every key once (key:000000000000, ... as redis-benchmark
            names them), in pipelines of 64
  uniform   OPS GETs of uniformly random keys
  hot       OPS GETs, 90% of them of a tenth of the keys (scattered), the
            rest uniform
  update    OPS/2 read-modify-writes: GET a random key, then SET its next
            version
  scan      GET every key in key order: every value checked (the version
            each key should have by now), so every byte that left came back

The random phases send PIPELINE commands per round trip (redis serves
them one after another: a command that faults stalls the rest, as it
would for any client). A value is a header (key, version) and a slice of a
random block that depends on both, so a value served from the wrong place,
stale or as zeros fails the check.

Each round runs, on the same machine:

  plain          no limit (no paging at all: the reference);
  kernel swap    redis-server in a cgroup v1 memory group limited to the
                 budget, with a swapfile of its own (bench_paging.py's
                 kernel_swap(): the highest swap priority, zswap off);
  kernel+poll    (--kernel-idle-poll) kernel swap again, with the CPU
                 latency request umgr's --idle-poll holds held meanwhile
                 (idle CPUs poll): what the kernel makes of the same help;
  umgr VARIANT   `umgr exec --max-resident BUDGET ... VARIANT -- redis-server`.

The table gives seconds per phase and umgr/kernel paired by round (lower
is better), then the device's I/O and umgr's --stats-json figures (how
long umgr held idle CPUs polling among them). Needs
root, redis-server, mkswap/swapon and the cgroup v1 memory controller.

    python bench/bench_redis.py [--keys 400000] [--value 1000] [--budget-mib 64] [--rounds 3]
    python bench/bench_redis.py --keys 20000 --ops 2000 --budget-mib 16 --no-kernel-swap   # a smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_paging import (  # noqa: E402  (a script here, or umgr.benchmarks)
    CGROUP_ROOT, MiB, BenchError, cgroup_figures, default_umgr_cmd, device_io, device_summary, enter_cgroup,
    idle_polling, kernel_swap, other_swaps, other_swaps_note, run_and_report,
)
from bench_shapes import _total, paired_ratios, parse_variants, umgr_summary  # noqa: E402

# Names of its own: other benchmarks' kernel_swap() removes leftovers under theirs.
SWAPFILE = "/var/tmp/umgr-bench-redis.swap"
CGROUP = os.path.join(CGROUP_ROOT, "umgr-bench-redis")
UMGR_STATE_PARENT = "/var/tmp"   # umgr's default swap file is under it: the device whose I/O counts
PHASES = ("load", "uniform", "hot", "update", "scan")
LOAD_PIPELINE = 64
BLOCK_EXTRA = 4096               # the random block: VALUE plus this many bytes to slice from
START_SECONDS = 30
STOP_SECONDS = 60


# ---- the client ---------------------------------------------------------------------
class Redis:
    """A RESP client over one socket: pipelines of commands, replies in order."""

    def __init__(self, port: int, timeout: float):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    @staticmethod
    def encode(*args: bytes) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            parts += [b"$%d\r\n" % len(a), a, b"\r\n"]
        return b"".join(parts)

    def pipeline(self, commands: list[bytes]) -> list:
        self.sock.sendall(b"".join(commands))
        return [self.reply() for _ in commands]

    def call(self, *args: bytes):
        return self.pipeline([self.encode(*args)])[0]

    def reply(self):
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise BenchError(f"redis: connection closed mid-reply ({line!r})")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise BenchError(f"redis: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.reader.read(n + 2)
            if len(data) != n + 2:
                raise BenchError("redis: connection closed mid-value")
            return data[:-2]
        raise BenchError(f"redis: unexpected reply {line!r}")


class Values:
    """What key i holds at version v: its header, then a slice of a random
    block that depends on both (incompressible, never zero)."""

    def __init__(self, size: int, seed: int):
        if size < 16:
            raise ValueError("values need at least 16 bytes")
        self.size = size
        self.block = random.Random(seed).randbytes(size + BLOCK_EXTRA)

    def of(self, key: int, version: int) -> bytes:
        off = (key * 8 + version * 520) % BLOCK_EXTRA
        return struct.pack("<QQ", key, version) + self.block[off:off + self.size - 16]


def key_name(i: int) -> bytes:
    return b"key:%012d" % i


def check(i: int, got, want: bytes) -> None:
    if got != want:
        what = "missing" if got is None else f"{len(got)} bytes, header {bytes(got[:16]).hex()}"
        raise BenchError(f"redis: key {i} is wrong ({what}; expected {len(want)} bytes, header {want[:16].hex()})")


def run_phases(port: int, keys: int, ops: int, pipeline: int, values: Values, seed: int,
               timeout: float, phases_run=PHASES) -> dict:
    """The client's phases against the server on `port` (load, then those of
    `phases_run` in PHASES order): seconds per phase."""
    rng = random.Random(seed)
    versions = bytearray(keys)   # (a key's version, modulo 256)
    hot = rng.sample(range(keys), max(1, keys // 10))
    phases: dict[str, float] = {}
    client = Redis(port, timeout)
    try:
        def gets(batch: list[int]) -> None:
            got = client.pipeline([Redis.encode(b"GET", key_name(i)) for i in batch])
            for i, value in zip(batch, got):
                check(i, value, values.of(i, versions[i]))

        def timed(name, work) -> None:
            started = time.monotonic()
            work()
            phases[name] = round(time.monotonic() - started, 6)

        def load() -> None:
            for lo in range(0, keys, LOAD_PIPELINE):
                batch = range(lo, min(keys, lo + LOAD_PIPELINE))
                client.pipeline([Redis.encode(b"SET", key_name(i), values.of(i, 0)) for i in batch])

        def uniform() -> None:
            for _ in range(0, ops, pipeline):
                gets([rng.randrange(keys) for _ in range(pipeline)])

        def hot_set() -> None:
            for _ in range(0, ops, pipeline):
                gets([rng.choice(hot) if rng.random() < 0.9 else rng.randrange(keys) for _ in range(pipeline)])

        def update() -> None:
            half = max(1, pipeline // 2)
            for _ in range(0, ops // 2, half):
                batch = list({rng.randrange(keys) for _ in range(half)})
                gets(batch)
                for i in batch:
                    versions[i] = (versions[i] + 1) % 256
                client.pipeline([Redis.encode(b"SET", key_name(i), values.of(i, versions[i])) for i in batch])

        def scan() -> None:
            for lo in range(0, keys, LOAD_PIPELINE):
                gets(list(range(lo, min(keys, lo + LOAD_PIPELINE))))

        for name, work in zip(PHASES, (load, uniform, hot_set, update, scan)):
            if name == "load" or name in phases_run:
                timed(name, work)
        info = client.call(b"INFO", b"memory").decode()
        used = next((int(line.split(":")[1]) for line in info.splitlines() if line.startswith("used_memory:")), 0)
    finally:
        client.close()
    return {"phases": phases, "used_memory": used}


# ---- the server -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_argv(server: str, port: int, work: str) -> list[str]:
    # No persistence (nothing to disk but swap), one thread of its own.
    return [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", work, "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning"]


def wait_ready(proc: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"redis-server exited with {proc.returncode} before it answered")
        try:
            client = Redis(port, 5)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            if client.call(b"PING") == b"PONG":
                return
        except (OSError, BenchError):
            time.sleep(0.05)
        finally:
            client.close()
    raise BenchError(f"redis-server did not answer on port {port} within {START_SECONDS} s")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group `proc` leads (start_new_session), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop(proc: subprocess.Popen, port: int) -> int:
    """SHUTDOWN NOSAVE; the server's (or umgr exec's) exit status."""
    with contextlib.suppress(OSError, BenchError):
        client = Redis(port, STOP_SECONDS)
        try:
            client.call(b"SHUTDOWN", b"NOSAVE")
        except (OSError, BenchError):
            pass   # (the connection closes as the server exits)
        finally:
            client.close()
    try:
        return proc.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise BenchError(f"redis-server did not stop within {STOP_SECONDS} s of SHUTDOWN") from None


def serve_and_drive(argv: list[str], port: int, args, values: Values, what: str, **popen) -> tuple[dict, str]:
    """Start `argv`, drive the phases against it, stop it: (figures, its stderr)."""
    with tempfile.TemporaryFile() as err:
        # A session of its own: umgr exec's server (its child) goes with it on failure.
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, **popen)
        try:
            wait_ready(proc, port)
            result = run_phases(port, args.keys, args.ops, args.pipeline, values, args.seed, args.timeout,
                                args.phases)
            status = stop(proc, port)
        except BaseException:
            kill_group(proc)
            err.seek(0)
            sys.stderr.write(f"{what}: {err.read().decode(errors='replace')[-2000:]}")
            raise
        err.seek(0)
        text = err.read().decode(errors="replace")
    if status != 0:
        raise BenchError(f"{what} exited with {status}: {text[-2000:]}")
    return result, text


def run_plain(server: str, args, values: Values, work: str) -> dict:
    port = free_port()
    with device_io(UMGR_STATE_PARENT) as io:
        result, _ = serve_and_drive(redis_argv(server, port, work), port, args, values, "redis-server, no limit")
    return {"result": result, "device": io}


def run_kernel(server: str, args, values: Values, work: str) -> dict:
    with kernel_swap(args.swap_mib, args.budget_mib * MiB, swapfile=SWAPFILE, cgroup=CGROUP) as cg:
        port = free_port()
        with device_io(SWAPFILE) as io:
            result, _ = serve_and_drive(redis_argv(server, port, work), port, args, values,
                                        "redis-server under kernel swap", preexec_fn=enter_cgroup(cg))
        return {"result": result, "cgroup": cgroup_figures(cg), "device": io}


def run_umgr(server: str, args, values: Values, work: str, label: str, extra: list[str]) -> dict:
    stats_file = os.path.join(work, "umgr-stats.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stats_file)
    port = free_port()
    cmd = [*args.umgr_cmd, "exec", "--max-resident", f"{args.budget_mib}M", "--swap-size", f"{args.swap_mib}M",
           *extra, "--stats-json", stats_file, "--", *redis_argv(server, port, work)]
    with device_io(UMGR_STATE_PARENT) as io:
        result, _ = serve_and_drive(cmd, port, args, values, f"redis-server under umgr ({label})")
    with open(stats_file) as f:
        stats = json.load(f)
    return {"result": result, "umgr": stats, "device": io}


def run(args, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    if os.geteuid() != 0:
        raise BenchError("needs root (swapon, cgroups, userfaultfd)")
    server = shutil.which("redis-server")
    if server is None:
        raise BenchError("needs redis-server (Debian: apt install redis-server)")
    args.umgr_cmd = shlex.split(args.umgr) if args.umgr else default_umgr_cmd()
    variants = parse_variants(args.variants)
    values = Values(args.value, args.seed)
    others = other_swaps(SWAPFILE)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="umgr-bench-redis-") as work:
        for r in range(args.rounds):
            tag = f"round {r + 1}/{args.rounds}"
            log(f"redis {tag}: plain ...")
            runs.setdefault("plain", []).append({**run_plain(server, args, values, work), "round": r})
            if not args.no_kernel_swap:
                log(f"redis {tag}: kernel swap (swapfile {args.swap_mib} MiB + cgroup limit {args.budget_mib} MiB) ...")
                runs.setdefault("kernel", []).append({**run_kernel(server, args, values, work), "round": r})
                if args.kernel_idle_poll:
                    log(f"redis {tag}: kernel swap, idle CPUs polling ...")
                    with idle_polling():
                        runs.setdefault("kernel+poll", []).append(
                            {**run_kernel(server, args, values, work), "round": r})
            for label, extra in variants:
                log(f"redis {tag}: umgr {label} ...")
                runs.setdefault(f"umgr {label}", []).append(
                    {**run_umgr(server, args, values, work, label, extra), "round": r})
    configs = {name: {**min(rs, key=lambda x: _total(x["result"])), "round_totals": [_total(x["result"]) for x in rs]}
               for name, rs in runs.items()}
    paired = {f"{name} / {base}": paired_ratios(rs, runs[base])
              for base in ("kernel", "kernel+poll") for name, rs in runs.items()
              if name.startswith("umgr ") and base in runs}
    return {"params": {k: getattr(args, k) for k in ("keys", "value", "ops", "pipeline", "budget_mib", "swap_mib",
                                                      "rounds", "seed", "variants", "phases")},
            "env": {"kernel": platform.release(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
                    "other_swaps": others},
            "configs": configs, "paired": paired}


# ---- the report -----------------------------------------------------------------------
def format_report(results: dict) -> str:
    p, configs = results["params"], results["configs"]
    names = list(configs)
    kernel = configs.get("kernel")
    data_mib = p["keys"] * p["value"] / MiB
    lines = [f"kernel {results['env']['kernel']}, {results['env']['cpus']} CPUs, loadavg {results['env']['loadavg'][0]:.2f}"
             + other_swaps_note(results["env"]),
             f"redis: {p['keys']} keys of {p['value']} bytes ({data_mib:.0f} MiB of values), budget {p['budget_mib']} MiB, "
             f"{p['ops']} ops per random phase, pipelines of {p['pipeline']}"
             + (f", best of {p['rounds']} rounds" if p["rounds"] > 1 else ""),
             f"{'phase':<10}" + "".join(f" {n:>14}" for n in names)
             + ("".join(f" {'/kernel':>8}" for n in names if n.startswith("umgr ")) if kernel else "") + "   (seconds)"]
    for ph in [*configs[names[0]]["result"]["phases"], "total"]:
        def secs(cfg):
            return _total(cfg["result"]) if ph == "total" else cfg["result"]["phases"][ph]
        line = f"{ph:<10}" + "".join(f" {secs(configs[n]):>14.3f}" for n in names)
        if kernel:
            line += "".join(f" {secs(configs[n]) / secs(kernel):>8.2f}" for n in names if n.startswith("umgr "))
        lines.append(line)
    lines.append("")
    for n, cfg in configs.items():
        lines.append(f"  {n}: redis used_memory {cfg['result']['used_memory'] / MiB:.0f} MiB; "
                     f"device {cfg['device']['device']}: {device_summary(cfg['device'])}")
        if "cgroup" in cfg:
            cg = cfg["cgroup"]
            lines.append(f"  {n}: cgroup pgmajfault={cg['pgmajfault']} max_usage={cg['max_usage_bytes'] / MiB:.1f} MiB")
        if "umgr" in cfg:
            lines += umgr_summary(n, cfg["umgr"], p["budget_mib"])
        if len(cfg["round_totals"]) > 1:
            lines.append(f"  {n}: round totals " + ", ".join(f"{t:.3f}" for t in cfg["round_totals"]) + " (fastest shown)")
    for pair, ratios in results["paired"].items():
        lines.append(f"  {pair} paired by round (median, lowest-highest of {p['rounds']}): " + ", ".join(
            f"{ph} {med:.2f} ({lo:.2f}-{hi:.2f})" for ph, (med, lo, hi) in ratios.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=400_000)
    parser.add_argument("--value", type=int, default=1000, help="bytes per value (1000: jemalloc's 1 KiB class)")
    parser.add_argument("--ops", type=int, default=40_000, help="GETs per random phase")
    parser.add_argument("--pipeline", type=int, default=16, help="commands per round trip in the random phases")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"phases to run (load always runs first; default {','.join(PHASES)})")
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument("--swap-mib", type=int, default=None, help="swap of each (default: the values' size + 256 MiB)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--variants", default="default",
                        help="umgr variants, ';'-separated umgr exec arguments, 'default' for none")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each config keeps its fastest")
    parser.add_argument("--no-kernel-swap", action="store_true", help="skip the swapfile + cgroup baseline")
    parser.add_argument("--kernel-idle-poll", action="store_true",
                        help="also run kernel swap with idle CPUs polling (as umgr's --idle-poll has them)")
    parser.add_argument("--umgr", default=None, help="umgr command (default: this python -m umgr)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds the client waits for one reply")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = parser.parse_args(argv)
    if min(args.keys, args.ops, args.pipeline, args.budget_mib, args.rounds) < 1:
        parser.error("--keys, --ops, --pipeline, --budget-mib and --rounds must be at least 1")
    args.phases = [ph.strip() for ph in args.phases.split(",") if ph.strip()]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}; phases: {', '.join(PHASES)}")
    if args.value < 16:
        parser.error("--value must be at least 16 (a value starts with its key and version)")
    if args.swap_mib is None:
        args.swap_mib = args.keys * args.value // MiB + 256
    return run_and_report(lambda: run(args), format_report, args.json)


if __name__ == "__main__":
    sys.exit(main())
