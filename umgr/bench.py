"""`umgr bench [faults] [io]`: the repo's micro-benchmarks, loaded by path
from bench/ (next to the umgr package; bench/ is not an installed package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import umgr

BENCH_DIR = Path(umgr.__file__).resolve().parent.parent / "bench"
KNOWN = ("faults", "io")


def _load(name: str):
    path = BENCH_DIR / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (umgr bench needs a source checkout)")
    spec = importlib.util.spec_from_file_location(f"umgr_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(what: list[str]) -> int:
    what = list(what) or list(KNOWN)
    unknown = [w for w in what if w not in KNOWN]
    if unknown:
        print(f"umgr bench: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(KNOWN)}",
              file=sys.stderr)
        return 2
    try:
        if "faults" in what:
            faults = _load("bench_faults")
            print(faults.report(faults.run()), flush=True)
        if "io" in what:
            io = _load("bench_io")
            r = io.run(seconds=3.0, size=256 << 20, depth=64)
            print(f"io_uring vs os.preadv/pwritev, O_DIRECT 4 KiB random, {r['size'] >> 20} MiB file, "
                  f"queue depth {r['depth']}, {r['seconds']:g} s each")
            print(f"  read : io_uring {r['uring_read_ops']:9.0f} ops/s   os.preadv  {r['preadv_ops']:9.0f} ops/s"
                  f"   ratio {r['read_ratio']:.2f}x")
            print(f"  write: io_uring {r['uring_write_ops']:9.0f} ops/s   os.pwritev {r['pwritev_ops']:9.0f} ops/s"
                  f"   ratio {r['write_ratio']:.2f}x", flush=True)
    except (OSError, RuntimeError) as exc:
        print(f"umgr bench: {exc}", file=sys.stderr)
        return 1
    return 0
