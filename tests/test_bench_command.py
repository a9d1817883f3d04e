"""`umgr bench`: the benchmarks ship with the package (umgr.benchmarks, with
the C programs they compile) and run from any directory, so a wheel install
has them too (`make test` runs this against the installed wheel)."""
import json
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
    for name in ("faults", "io", "shapes", "redis", "paging", "zap", "backends", "readpath", "persist", "footprint",
                 "procs", "spawn"):
        assert f"\n  {name}" in listed.stdout
    unknown = _umgr_bench(tmp_path, "nope")
    assert unknown.returncode == EXIT_UMGR and "unknown benchmark 'nope'" in unknown.stderr
    bad_option = _umgr_bench(tmp_path, "io", "--bogus")
    assert bad_option.returncode == EXIT_UMGR and "umgr bench io" in bad_option.stderr


@pytest.mark.timeout(180)
def test_fault_benchmark_compiles_its_program_and_measures(tmp_path):
    # fault_floor.c is package data: the C floor is built and run, then Python.
    # With --procs, serve_where.c too: processes whose every page read is
    # checked (a wrong page fails the run), served in both places.
    r = _umgr_bench(tmp_path, "faults", "--pages", "256", "--reps", "1", "--procs", "2", "--where-pages", "512",
                    "--where-ops", "400", "--where-dir", str(tmp_path), timeout=170)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "C floor measured in this run" in r.stdout
    for mode in ("C floor", "SIGBUS floor", "thread", "trio-eager", "trio-await"):
        # a figure for each handler at 1 and at 16 pages per fault
        assert len(re.findall(rf"{mode} +[0-9.]+ µs/fault", r.stdout)) == 2, mode
    assert "where faults are served, 2 process(es)" in r.stdout
    for place in ("a handler, woken for it", "the faulting thread itself"):
        assert re.search(rf"{place} +[0-9.]+ µs/fault", r.stdout), place


@pytest.mark.timeout(180)
def test_spawn_benchmark_counts_every_process_it_started(tmp_path):
    # The benchmark fails unless the daemon managed every process started
    # (each fork's child, each exec's image): its figures are of real
    # adoptions and attaches, and every child checked the pages it read.
    out = tmp_path / "spawn.json"
    r = _umgr_bench(tmp_path, "spawn", "--count", "30", "--rounds", "1", "--data-mib", "4", "--json", str(out),
                    timeout=170)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"fork", "exec"}
    assert all(s["umgr_us"] > 0 and s["plain_us"] > 0 for s in summary.values())


def test_shapes_options_reach_the_benchmark(tmp_path):
    r = _umgr_bench(tmp_path, "shapes", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: umgr bench shapes")
    assert "--budget-mib" in r.stdout


@pytest.mark.timeout(240)
def test_redis_benchmark_pages_the_server_and_checks_every_value(tmp_path):
    # A small real run: redis-server under umgr at 16 MiB with ~24 MiB of
    # data, driven and checked by the benchmark's client (a wrong, stale or
    # zero value fails it); the figures show pages really left and came back.
    out = tmp_path / "redis.json"
    r = _umgr_bench(tmp_path, "redis", "--keys", "20000", "--ops", "2000", "--budget-mib", "16",
                    "--no-kernel-swap", "--json", str(out), timeout=230)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "umgr default" in r.stdout and "WARNING" not in r.stdout
    results = json.loads(out.read_text())
    stats = results["configs"]["umgr default"]["umgr"]
    assert stats["pages_out"] > 20000 * 1000 // 4096 // 4 and stats["pages_in"] > 1000
    assert stats["peak_resident_bytes"] <= (16 + 2) << 20   # (the slack every other peak has)
    assert set(results["configs"]["umgr default"]["result"]["phases"]) == {"load", "uniform", "hot", "update", "scan"}


def test_redis_benchmark_values_tell_keys_and_versions_apart():
    # Pure logic: a value names its key and version, and no two differ only
    # past the header (a stale or misplaced value fails the check).
    from umgr.benchmarks.bench_redis import Values
    values = Values(1000, seed=1)
    seen = {values.of(k, v) for k in range(50) for v in range(4)}
    assert len(seen) == 200 and all(len(x) == 1000 for x in seen)
    assert values.of(7, 1) != values.of(7, 2) and values.of(7, 1)[16:] != values.of(8, 1)[16:]


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


def test_a_run_that_was_not_managed_is_not_a_umgr_figure():
    # Pure logic: the shim fails open, so a run with no target, or with
    # data above its budget and no page out, is refused (a build too old to
    # report targets is judged by its pages out alone).
    from umgr.benchmarks.bench_paging import unmanaged
    assert unmanaged({"targets": 0, "pages_out": 9}, 64, 512)
    assert unmanaged({"targets": 1, "pages_out": 0}, 64, 512)
    assert unmanaged({"pages_out": 0}, 64, 512)
    assert unmanaged({"targets": 1, "pages_out": 0}, 64, 16) is None
    assert unmanaged({"targets": 1, "pages_out": 0}, 64, None) is None
    assert unmanaged({"targets": 3, "pages_out": 9}, 64, 512) is None


def test_zswap_setting_comes_back_after_an_interrupt(tmp_path, monkeypatch):
    from umgr.benchmarks import bench_paging
    enabled = tmp_path / "enabled"
    enabled.write_text("Y\n")
    monkeypatch.setattr(bench_paging, "ZSWAP_ENABLED", str(enabled))
    with pytest.raises(KeyboardInterrupt):
        with bench_paging.zswap(False):
            assert enabled.read_text() == "N"
            raise KeyboardInterrupt
    assert enabled.read_text() == "Y"
    monkeypatch.setattr(bench_paging, "ZSWAP_ENABLED", str(tmp_path / "absent"))
    with bench_paging.zswap(False):   # (no zswap: off already)
        pass
    with pytest.raises(bench_paging.BenchError):
        with bench_paging.zswap(True):
            pass
