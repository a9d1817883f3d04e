"""`umgr bench`: the benchmarks ship with the package (umgr.benchmarks, with
the C programs they compile) and run from any directory, so a wheel install
has them too (`make test` runs this against the installed wheel)."""
import re
import subprocess
import sys

import pytest

EXIT_UMGR = 125


def _umgr_bench(tmp_path, *args, timeout=120):
    # From tmp_path, so nothing can come from a checkout in the working directory.
    return subprocess.run([sys.executable, "-m", "umgr", "bench", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def test_lists_the_benchmarks_and_refuses_an_unknown_one(tmp_path):
    listed = _umgr_bench(tmp_path, "--help")
    assert listed.returncode == 0, listed.stderr
    for name in ("faults", "io", "shapes", "paging", "zap", "backends", "readpath", "persist", "footprint"):
        assert f"\n  {name}" in listed.stdout
    unknown = _umgr_bench(tmp_path, "nope")
    assert unknown.returncode == EXIT_UMGR and "unknown benchmark 'nope'" in unknown.stderr
    bad_option = _umgr_bench(tmp_path, "io", "--bogus")
    assert bad_option.returncode == EXIT_UMGR and "umgr bench io" in bad_option.stderr


@pytest.mark.timeout(180)
def test_fault_benchmark_compiles_its_program_and_measures(tmp_path):
    # fault_floor.c is package data: the C floor is built and run, then Python.
    r = _umgr_bench(tmp_path, "faults", "--pages", "256", "--reps", "1", timeout=170)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "C floor measured in this run" in r.stdout
    for mode in ("C floor", "thread", "trio-eager", "trio-await"):
        # a figure for each handler at 1 and at 16 pages per fault
        assert len(re.findall(rf"{mode} +[0-9.]+ µs/fault", r.stdout)) == 2, mode


def test_shapes_options_reach_the_benchmark(tmp_path):
    r = _umgr_bench(tmp_path, "shapes", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: umgr bench shapes")
    assert "--budget-mib" in r.stdout


def test_shapes_pairs_the_runs_of_each_round():
    # Pure logic: umgr/kernel per phase from the runs of the same round, a
    # round the kernel did not finish left out.
    from umgr.benchmarks.bench_shapes import paired_ratios

    def run(round_, a, b):
        return {"round": round_, "result": {"phases": {"a": a, "b": b}}}
    kernel = [run(0, 1.0, 2.0), run(1, 2.0, 2.0), run(2, 1.0, 4.0)]
    umgr = [run(0, 2.0, 1.0), run(2, 1.5, 4.0), run(1, 2.0, 6.0), run(3, 9.0, 9.0)]
    ratios = paired_ratios(umgr, kernel)
    assert ratios["a"] == (1.5, 1.0, 2.0)
    assert ratios["b"] == (1.0, 0.5, 3.0)
    assert ratios["total"] == pytest.approx((1.1, 1.0, 2.0))
