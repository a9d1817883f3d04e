"""Two builds of umgr timed against each other: alternating runs, paired ratios.

    python tools/ab.py [--base REV] [--pairs N] [--umgr-args ARGS] -- PROGRAM [ARGS...]

Runs PROGRAM under `umgr exec ARGS` with the code of REV (default HEAD: the
last commit, so the working tree's changes are what is measured) and with
the umgr this interpreter imports (a checkout's `make dev` install: its
working tree), one after the other, N times (default 6), and prints for
each figure the median over the pairs of new/base, with its range and each
side's median:
- each phase PROGRAM reports (its last line of output that is a JSON object
  with "phases": {name: seconds}, as bench/programs/shapes.c, heapreads.c
  and pyworkload.py print);
- its wall time, and from `--stats-json` the daemon's CPU seconds and the
  faults.
A run that fails stops it (its output is shown): a build that loses pages
has no speed worth comparing.

Why pairs: on the shared VMs this project is measured on, the machine's
speed moves by a third or more from one run to the next, more than most
changes do; the ratio of two runs made back to back moves less
(docs/architecture.md gives figures so, "alternating pairs").

The base is checked out in a temporary git worktree and built there in
place (its cffi modules and its shim, with this interpreter: it needs cffi
and setuptools, gcc and the build packages of `make deps`), then removed.
Its runs have PYTHONPATH set to that checkout (a Python program under test
sees it too); what umgr finds through its installed metadata (the
backends' and policies' entry points, its version) is the installed one's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Checked-out directories the installed package maps to subpackages (setup.py's package_dir).
SUBPACKAGES = {"bindings": "bindings", "policies": "policies", "benchmarks": "bench"}
STATS = ("daemon_cpu_seconds", "faults")


class ABError(Exception):
    pass


def _run(argv: list[str], cwd: str, what: str) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ABError(f"{what} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}")


def build_in_place(tree: str) -> None:
    """The cffi modules and the shim of the checkout at `tree`, in place
    (bindings/), and the links that make its directories the package's
    subpackages, as an editable install maps them."""
    _run([sys.executable, "bindings/cffi/kernel_build.py"], tree, "building the base's kernel module")
    _run([sys.executable, "bindings/cffi/uring_build.py"], tree, "building the base's io_uring module")
    shim = os.path.join("bindings", "libumgr_preload" + sysconfig.get_config_var("EXT_SUFFIX"))
    _run(["gcc", "-O2", "-Wall", "-fvisibility=hidden", "-shared", "-fPIC", "-Ibindings/shim", "-o", shim,
          "bindings/shim/preload.c", "-lpthread", "-ldl"], tree, "building the base's shim")
    for name, directory in SUBPACKAGES.items():
        link = os.path.join(tree, "umgr", name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(tree, directory), link)


@contextlib.contextmanager
def base_tree(rev: str):
    """A built checkout of `rev`, removed on the way out."""
    with tempfile.TemporaryDirectory(prefix="umgr-ab-") as parent:
        tree = os.path.join(parent, "base")
        _run(["git", "worktree", "add", "--detach", tree, rev], REPO, f"checking out {rev}")
        try:
            build_in_place(tree)
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=REPO, capture_output=True)
            subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)


def umgr_location(pythonpath: str | None) -> str:
    """Where a side's umgr is imported from (shown, so that a base that is
    not the one built cannot pass for it)."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-P", "-c", "import os, umgr; print(os.path.dirname(umgr.__file__))"],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise ABError(f"umgr does not import{' from ' + pythonpath if pythonpath else ''}: {done.stderr[-1000:]}")
    return done.stdout.strip()


def reported_phases(stdout: str) -> dict[str, float]:
    """The phases a program reported: its last output line that is a JSON
    object with a "phases" mapping ({} if none)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                phases = json.loads(line).get("phases")
            except (ValueError, AttributeError):
                continue
            if isinstance(phases, dict):
                return {name: float(seconds) for name, seconds in phases.items()}
    return {}


def run_once(pythonpath: str | None, umgr_args: list[str], program: list[str], work: str) -> dict[str, float]:
    """One run under umgr: its figures by name."""
    stats_path = os.path.join(work, "stats.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stats_path)
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    # -P: the current directory is not put first on sys.path, where a checkout's umgr
    # would shadow the base's on PYTHONPATH (both sides alike).
    argv = [sys.executable, "-P", "-m", "umgr", "exec", *umgr_args, "--stats-json", stats_path, "--", *program]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise ABError(f"{shlex.join(argv)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-2000:]}")
    with open(stats_path) as f:
        stats = json.load(f)
    figures = reported_phases(done.stdout)
    figures["wall"] = wall
    figures.update({name: float(stats[name]) for name in STATS})
    return figures


def paired(base: list[dict[str, float]], new: list[dict[str, float]]) -> list[tuple]:
    """Per figure every pair has: (name, median of new/base, lowest,
    highest, base median, new median), in the order the runs gave them."""
    names = [name for name in base[0] if all(name in run for run in base + new)]
    rows = []
    for name in names:
        ratios = [n[name] / b[name] for b, n in zip(base, new) if b[name] > 0]
        if not ratios:
            continue
        rows.append((name, statistics.median(ratios), min(ratios), max(ratios),
                     statistics.median(b[name] for b in base), statistics.median(n[name] for n in new)))
    return rows


def report(rows: list[tuple], pairs: int, rev: str, places: tuple[str, str]) -> str:
    lines = [f"base: {rev}, umgr from {places[0]}", f"new: umgr from {places[1]}",
             f"new / base, {pairs} alternating pairs, median (lowest-highest):",
             f"{'figure':20} {'new/base':>8} {'range':>13} {'base':>10} {'new':>10}"]
    for name, ratio, lo, hi, b, n in rows:
        lines.append(f"{name:20} {ratio:8.3f} {f'({lo:.2f}-{hi:.2f})':>13} {b:10.3f} {n:10.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="the git revision to compare with (default HEAD)")
    parser.add_argument("--pairs", type=int, default=6, help="alternating pairs of runs (default 6)")
    parser.add_argument("--umgr-args", default="", help="umgr exec's options, as one string "
                        "(e.g. '--max-resident 64M --swap-size 700M')")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...")
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program or args.pairs < 1:
        parser.error("need -- PROGRAM [ARGS...] and --pairs >= 1")
    umgr_args = shlex.split(args.umgr_args)
    # Stopped with SIGTERM, the base's checkout is removed all the same (SystemExit unwinds it).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with base_tree(args.base) as tree, tempfile.TemporaryDirectory(prefix="umgr-ab-runs-") as work:
            places = (umgr_location(tree), umgr_location(None))
            if places[0] == places[1] or not places[0].startswith(tree):
                raise ABError(f"the base's umgr would come from {places[0]}, not from its checkout {tree}")
            base, new = [], []
            for i in range(args.pairs):
                # Which goes first alternates: a machine slowing down mid-pair favours neither.
                order = ((tree, base), (None, new)) if i % 2 == 0 else ((None, new), (tree, base))
                for pythonpath, runs in order:
                    runs.append(run_once(pythonpath, umgr_args, program, work))
                print(f"pair {i + 1}/{args.pairs} done", file=sys.stderr)
    except ABError as exc:
        print(f"ab: {exc}", file=sys.stderr)
        return 1
    print(report(paired(base, new), args.pairs, args.base, places))
    return 0


if __name__ == "__main__":
    sys.exit(main())
