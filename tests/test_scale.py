"""Scale and abuse: many threads in one target, many targets under one
daemon, and targets SIGKILLed at random moments of their paging.

Every program checks every byte it wrote and exits non-zero at the first
wrong one. The daemon's own figures (stats JSON, status snapshots, its log)
prove that pages really left and came back, that each target stayed within
its own budget, and that nothing (swap slots, descriptors) outlived the
targets.
"""
from __future__ import annotations

import os
import random
import re
import selectors
import signal
import subprocess
import time

import pytest

from conftest import fd_links, wait_for

from umgr.cli import query_status

MiB = 1 << 20
PAGE = 4096
RELEASED = re.compile(r"pid (\d+): released \(faults (\d+), pages in (\d+), out (\d+)\)")


def explain(result) -> str:
    return f"exit {result.returncode}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-4000:]}\nstats: {result.stats}"


def daemon_trouble(daemon) -> str:
    """The last exception line of the daemon's log first (a traceback's tail
    is what matters and what a long message would cut), then the log's end."""
    log = daemon.log()
    errors = re.findall(r"^[ |+]*(\w+(?:Error|Exception|Group): .*)$", log, re.M)
    return f"{errors[-1] if errors else 'no exception logged'}\n--- daemon log:\n{log[-4000:]}"


def all_released(daemon) -> dict | None:
    status = query_status(daemon.socket)
    return status if not status["targets"] else None


# ---- 1. many threads in one target ---------------------------------------------------------
@pytest.mark.timeout(120)
def test_24_threads_private_and_shared_slices_64m_in_8m(umgr_exec, programs):
    # 56 MiB in 24 private slices plus an 8 MiB slice whose every page all 24
    # threads write at once (one word in 24 each), three rounds (random,
    # backwards, sequential), 8 MiB budget. The threads' own stacks are
    # managed (and paged) too.
    budget, private, shared, threads, passes = 8 * MiB, 56, 8, 24, "rbs"
    data = (private + shared) * MiB
    cmd = [programs["threads"], str(private), str(shared), str(threads), passes]
    try:
        result = umgr_exec(cmd, max_resident="8M", timeout=100)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} under umgr exec did not finish in 100 s: "
                    f"{(exc.stderr or b'').decode(errors='replace')[-2000:]}")
    assert result.returncode == 0, explain(result)
    match = re.match(r"ok (\d+) pages 24 threads 3 rounds rss_kb (\d+)", result.stdout)
    assert match and int(match.group(1)) == data // PAGE, explain(result)
    stats = result.stats
    # Each round rewrites (and first reads) every page, and at most the
    # budget's worth can stay in memory from one round to the next.
    must_move = len(passes) * (data - budget) // PAGE
    assert stats["pages_out"] >= must_move, explain(result)
    assert stats["pages_in"] >= must_move, explain(result)
    # Writes hit pages under eviction: the WP race really ran, many threads wide.
    assert stats["faults_wp"] > 0, explain(result)
    assert stats["peak_resident_bytes"] <= budget + 2 * MiB, explain(result)
    # Unmanaged: the binary, libc, the shim, page tables (~3 MiB measured).
    assert int(match.group(2)) * 1024 <= budget + 12 * MiB, explain(result)
    assert stats["swap_slots_in_use_at_exit"] == 0, explain(result)
    assert stats["targets"] == 1, explain(result)


# ---- 2. many targets under one daemon -------------------------------------------------------
@pytest.mark.timeout(150)
def test_32_targets_under_one_daemon_each_within_its_own_budget(daemon, shim, programs, tmp_path):
    # 32 processes at once, budgets 4 MiB and 6 MiB alternately (given by each
    # process's own UMGR_MAX_RESIDENT; the daemon's default is 16 MiB), 24 MiB
    # of data each (6x and 4x), a sequential and a backwards round. Each holds
    # after its check until its stdin closes, so its final figures can be read
    # from the daemon while it is still a target.
    count, data_mib = 32, 24
    budgets = [(4 if i % 2 == 0 else 6) * MiB for i in range(count)]
    cmd = [programs["threads"], str(data_mib), "0", "1", "sb", "hold"]
    procs: list[subprocess.Popen] = []
    errs = []
    done_at: dict[int, float] = {}
    lines: dict[int, str] = {}
    try:
        for i, budget in enumerate(budgets):
            err = open(tmp_path / f"target-{i}.err", "w+b")
            errs.append(err)
            procs.append(subprocess.Popen(cmd, env=daemon.env(shim, UMGR_MAX_RESIDENT=f"{budget // MiB}M"),
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err))
        by_fd = {p.stdout.fileno(): p for p in procs}
        with selectors.DefaultSelector() as sel:
            for p in procs:
                sel.register(p.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 100
            while len(lines) < count:
                assert time.monotonic() < deadline, f"only {len(lines)} of {count} targets finished in 100 s"
                for key, _ in sel.select(timeout=1):
                    p = by_fd[key.fd]
                    line = p.stdout.readline().decode(errors="replace")
                    done_at[p.pid] = time.monotonic()
                    lines[p.pid] = line
                    sel.unregister(key.fileobj)
                    if not line.startswith("ok"):
                        p.wait(10)
                        errs[procs.index(p)].seek(0)
                        pytest.fail(f"target {procs.index(p)} (pid {p.pid}) failed: exit {p.returncode}, "
                                    f"{errs[procs.index(p)].read().decode(errors='replace')}")
        # Every target is done and holding: read their final figures.
        queried_at = time.monotonic()
        status = query_status(daemon.socket)
        snapshots = {t["pid"]: t for t in status["targets"]}
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(20)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
            if not p.stdin.closed:
                p.stdin.close()
        for err in errs:
            err.close()

    failures = []
    for i, (p, budget) in enumerate(zip(procs, budgets)):
        if p.returncode != 0:
            failures.append(f"target {i} (pid {p.pid}) exited {p.returncode}")
        match = re.match(rf"ok {data_mib * MiB // PAGE} pages 1 threads 2 rounds rss_kb (\d+)", lines[p.pid])
        if not match:
            failures.append(f"target {i}: {lines[p.pid]!r}")
            continue
        t = snapshots.get(p.pid)
        if t is None:
            failures.append(f"target {i} (pid {p.pid}) is not one of the daemon's targets")
            continue
        if t["budget_bytes"] != budget:
            failures.append(f"target {i}: budget {t['budget_bytes']}, want its own {budget}")
        # Every round moves everything but the budget's worth through the swap.
        if t["pages_out"] < 3 * (data_mib * MiB - budget) // PAGE or t["pages_in"] < 2 * (data_mib * MiB - budget) // PAGE:
            failures.append(f"target {i}: paged too little: out {t['pages_out']}, in {t['pages_in']}")
        if t["peak_resident_bytes"] > budget + MiB:
            failures.append(f"target {i}: peak resident {t['peak_resident_bytes']} over its budget {budget}")
        if int(match.group(1)) * 1024 > budget + 8 * MiB:
            failures.append(f"target {i}: RSS {match.group(1)} kB with a budget of {budget}")
    assert not failures, "\n".join(failures)

    # All 32 were targets at once: the last to attach did so before the first
    # finished its work (uptime and time.monotonic share CLOCK_MONOTONIC).
    last_start = max(queried_at - snapshots[p.pid]["uptime_seconds"] for p in procs)
    assert last_start < min(done_at.values()), "the targets did not all run at the same time"

    status = wait_for(lambda: all_released(daemon), 20, "every target to be released")
    assert status["backend"]["used_pages"] == 0, f"swap slots leaked: {status['backend']}"
    assert status["backend"]["pages_written"] >= count * 3 * (data_mib - 6) * MiB // PAGE
    assert status["targets_seen"] == count
    assert daemon.alive()
    assert "Traceback" not in daemon.log(), daemon_trouble(daemon)


# ---- 3. SIGKILL at random moments of the paging -------------------------------------------
@pytest.mark.timeout(150)
def test_sigkill_at_random_moments_leaves_the_daemon_serving(daemon, shim, programs, tmp_path):
    # One daemon. A survivor target pages throughout; beside it up to three
    # victims at a time (1, 4 or 8 threads, 16-32 MiB in 2-4 MiB budgets)
    # are SIGKILLed 0-300 ms after they start: before, during or after their
    # HELLO, in the middle of faults, write-protection, reads, stores and
    # zaps. The survivor must finish with every byte right, and once every
    # victim is reaped the daemon must hold no slot and no descriptor of them.
    seed = int(os.environ.get("UMGR_KILL_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    baseline_fds = fd_links(daemon.proc.pid)
    min_kills, max_kills, parallel = 20, 120, 3

    survivor_cmd = [programs["threads"], "40", "8", "4", "sbsbs"]
    survivor_err = open(tmp_path / "survivor.err", "w+b")
    survivor = subprocess.Popen(survivor_cmd, env=daemon.env(shim, UMGR_MAX_RESIDENT="4M"),
                                stdout=subprocess.PIPE, stderr=survivor_err)
    victims: list[tuple[subprocess.Popen, float, list[str]]] = []   # (proc, kill at, cmd)
    killed: list[tuple[int, int, float, list[str]]] = []            # (pid, returncode, killed at, cmd)
    kills_while_survivor_ran = 0
    try:
        while len(killed) < max_kills and (len(killed) < min_kills or survivor.poll() is None):
            while len(victims) < parallel:
                cmd = [programs["killme"], str(rng.choice([16, 24, 32])), str(rng.choice([1, 4, 8]))]
                budget = rng.choice(["2M", "4M"])
                delay = rng.uniform(0, 0.3)
                proc = subprocess.Popen(cmd, env=daemon.env(shim, UMGR_MAX_RESIDENT=budget),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                victims.append((proc, time.monotonic() + delay, cmd + [f"budget {budget}", f"delay {delay:.3f}"]))
            time.sleep(0.002)
            now = time.monotonic()
            for entry in list(victims):
                proc, kill_at, cmd = entry
                if now < kill_at and proc.poll() is None:
                    continue
                proc.send_signal(signal.SIGKILL)
                err = proc.communicate(timeout=20)[1]
                victims.remove(entry)
                assert daemon.alive(), f"the daemon died (seed {seed}): {daemon_trouble(daemon)}"
                if proc.returncode != -signal.SIGKILL:
                    pytest.fail(f"victim {cmd} (pid {proc.pid}, seed {seed}) ended by itself with "
                                f"{proc.returncode} before its kill: {err.decode(errors='replace')}")
                killed.append((proc.pid, proc.returncode, kill_at, cmd))
                kills_while_survivor_ran += survivor.poll() is None
        survivor_out = survivor.communicate(timeout=100)[0].decode(errors="replace")
    finally:
        for proc, _, _ in victims:
            proc.kill()
            proc.communicate()
        if survivor.poll() is None:
            survivor.kill()
            survivor.communicate()
        survivor_err.seek(0)
        survivor_stderr = survivor_err.read().decode(errors="replace")
        survivor_err.close()

    context = f"(seed {seed}, {len(killed)} kills)"
    # A dead daemon takes every swapped page with it: say so first, with why.
    assert daemon.alive() and "Traceback" not in daemon.log(), \
        f"the daemon died or raised {context}: {daemon_trouble(daemon)}\nsurvivor: {survivor.returncode} {survivor_stderr}"
    assert survivor.returncode == 0, f"survivor failed {context}: {survivor.returncode} {survivor_stderr}"
    assert survivor_out.startswith(f"ok {48 * MiB // PAGE} pages 4 threads 5 rounds"), survivor_out
    assert kills_while_survivor_ran >= min_kills, \
        f"only {kills_while_survivor_ran} kills landed while the survivor ran {context}"

    status = wait_for(lambda: all_released(daemon), 30,
                      f"every target to be released {context}; daemon log:\n{daemon.log()[-3000:]}")
    assert status["backend"]["used_pages"] == 0, f"swap slots leaked {context}: {status['backend']}"
    assert daemon.alive()
    wait_for(lambda: fd_links(daemon.proc.pid) == baseline_fds, 10,
             f"the daemon's descriptors to return to {baseline_fds} (now {fd_links(daemon.proc.pid)}) {context}")
    log = daemon.log()
    assert "Traceback" not in log, f"{context}: {daemon_trouble(daemon)}"
    # The kills did land in the paging: many victims had pages out when killed.
    released = {int(m.group(1)): int(m.group(4)) for m in RELEASED.finditer(log)}
    paged = [pid for pid, *_ in killed if released.get(pid, 0) > 0]
    assert len(paged) >= len(killed) // 2, f"only {len(paged)} of {len(killed)} victims were paging {context}"
    print(f"{context}: {kills_while_survivor_ran} while the survivor ran, {len(paged)} were paging; "
          f"daemon threads {len(os.listdir(f'/proc/{daemon.proc.pid}/task'))}")
    # The survivor was paged too.
    assert released.get(survivor.pid, 0) >= 5 * (48 - 4) * MiB // PAGE, f"{context}: {released.get(survivor.pid)}"
