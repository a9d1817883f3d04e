"""Process life-cycle events on memory that is paged out when they happen:
fork (shared, refcounted slots), a tree of forks, exec (the image is replaced
while its pages are out: the program's own, a parent's whose child goes on
with the shared slots, a forked child's), posix_spawn, vfork and
CLONE_VM children (one mm: nothing for umgr to do, nothing may break),
children SIGKILLed while idle or paging, munmap of a hole, mremap
move+grow+shrink, mremap moves racing eviction (from the faulting thread
and from a thread of their own), a munmap racing eviction while another
thread maps new memory into the hole, the app's own MADV_DONTNEED
(also of pages being evicted), and exit. The program checks every byte, in
parent and children; here we check that pages really left, that the event
reached the daemon, how many targets it served, that each was released and
that no slot is left over."""
import contextlib
import re
import subprocess

import pytest

from conftest import wait_for
from umgr.cli import query_status

RELEASED = re.compile(r"pid (\d+): released \(faults \d+, pages in \d+, out (\d+)\)")

MODES = {
    # mode: (counter that proves the event reached the daemon, its minimum,
    #        targets: every process that attached, each exec'd image counting once)
    "fork": ("forks", 1, 2),
    "fork-tree": ("forks", 8, 9),     # 4 children, each with a grandchild; all check, write, check
    "exec": (None, 0, 2),             # execs itself: a new image, a fresh region, same pid
    "exec-parent": ("forks", 1, 3),   # the parent execs; its child then checks the shared slots
    "fork-exec": ("forks", 1, 3),     # a forked child execs while the parent checks its data
    "spawn": ("forks", 0, 4),         # posix_spawn(self), posix_spawnp(true), vfork+exec(/bin/true): targets;
                                      # a vfork and a CLONE_VM child reading the parent's pages: not targets
    "exit-killed": ("forks", 2, 3),   # children SIGKILLed: one idle, one paging
    "forkpty": ("forks", 2, 3),       # forkpty(3) (glibc forks without calling fork()), then fork()
    "forkpty-thread": ("forks", 1, 2),  # forkpty(3) while an idle thread's stack top is paged out
    "munmap": ("unmaps", 1, 1),
    "mremap": ("remaps", 1, 1),
    "mremap-race": ("remaps", 1, 1),  # 24 moves while eviction batches are in flight
    "mremap-thread": ("remaps", 200, 1),  # a thread's 200 moves, at any point of a batch, while another faults
    "remap-hole": ("unmaps", 24, 1),  # 24 munmaps of a region paging out, each followed by a new mapping there
    "unmap-thread": ("unmaps", 60, 1),  # 120 rounds: a thread unmaps a region paging out, another maps and writes the hole
    "dontneed": ("app_removes", 1, 1),
    "dontneed-race": ("app_removes", 1, 1),  # the app discards pages while they are being evicted
    "exit": (None, 0, 1),
}
SIZES = {"fork-tree": (32, 8)}  # MiB, budget MiB (9 processes); others: 64 MiB at 16M


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", MODES)
def test_event_on_paged_out_memory(umgr_exec, programs, mode):
    counter, minimum, targets = MODES[mode]
    mib, budget = SIZES.get(mode, (64, 16))
    result = umgr_exec([programs["lifecycle"], mode, str(mib)], "-v", max_resident=f"{budget}M", timeout=60)
    assert result.returncode == 0, result.stderr[-4000:]
    stats = result.stats
    assert stats["pages_out"] >= (mib - budget) * 256, "pages must really have left before the event"
    if counter:
        assert stats[counter] >= minimum, stats
    assert stats["moved_out"] > 0, "by default the agent moves evicted pages out"
    if mode == "spawn":
        assert stats["forks"] == 0, "CLONE_VM children share the mm: no fork event"
    assert stats["targets"] == targets, stats
    released = RELEASED.findall(result.stderr)
    assert len(released) == targets, result.stderr[-4000:]
    assert stats["swap_slots_in_use_at_exit"] == 0, "every slot is freed once all targets are gone"
    if mode == "fork":
        assert stats["pages_in"] > 0
    if mode in ("exec", "exec-parent"):  # the old image, released when the new one said hello,
        pids = [pid for pid, _ in released]  # had its pages out
        twice = [pid for pid in set(pids) if pids.count(pid) == 2]
        assert len(twice) == 1, released
        old_out = next(int(out) for pid, out in released if pid == twice[0])
        assert old_out >= (mib - budget) * 256, released


@pytest.mark.timeout(60)
def test_a_child_whose_parent_names_it_late_does_not_claim_another_parents_orphan(daemon, shim, programs):
    """A parent killed inside fork() leaves its child's memory waiting as an
    orphan (the child says hello late). Meanwhile another process of the
    same user forks and names its child late: that child's hello comes
    first, and must wait for its own parent's FORKED rather than claim the
    orphan (whose proof would probe the orphan's memory at the child's
    probe address, and fail: the child killed). Both children read all of
    their data."""
    orphaned = subprocess.Popen([programs["lifecycle"], "fork-orphan-slow-child", "64"], env=daemon.env(shim),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: f"pid {orphaned.pid}: died before naming its forked child" in daemon.log(), 20,
                 "the orphan")
        # (Small, so that its child is born within a second of the orphan's
        # fork: only then could the orphan be its fork, forks.could_be_its_fork.)
        slow = subprocess.run([programs["lifecycle"], "fork-slow-parent", "4"], env=daemon.env(shim),
                              capture_output=True, timeout=40)
        assert slow.returncode == 0, slow.stderr.decode()[-2000:] + daemon.log()[-3000:]
        out, err = orphaned.communicate(timeout=40)
    finally:
        orphaned.kill()
    assert out == b"child ok\n", err
    assert re.search(rf"pid {orphaned.pid}: adopted pid \d+", daemon.log()), daemon.log()[-3000:]


@pytest.mark.timeout(90)
def test_the_child_of_daemon3_gets_its_paged_out_data(umgr_exec, programs):
    """daemon(3) forks inside glibc, not through fork(), and its parent
    exits at once: the shim's atfork handlers name the child all the same,
    so it is served its paged-out pages (it prints its verdict on the
    stdout it shares with us)."""
    result = umgr_exec([programs["lifecycle"], "daemon", "64"], "-v", max_resident="16M", timeout=60)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout == "daemon child ok\n", result.stderr[-4000:]
    stats = result.stats
    assert stats["pages_out"] >= 48 * 256, "pages must really have left before the fork"
    assert stats["forks"] == 1 and stats["targets"] == 2, stats
    child = [(pid, out) for pid, out in RELEASED.findall(result.stderr)]
    assert len(child) == 2, result.stderr[-4000:]
    assert stats["pages_in"] >= 40 * 256, "the child read its pages back from swap"
    assert stats["swap_slots_in_use_at_exit"] == 0


@pytest.mark.timeout(90)
def test_a_child_gets_no_wipeonfork_data_and_no_dontfork_memory(umgr_exec, programs):
    """`wipefork 16`: 48 MiB in three regions under 8 MiB, one of them
    MADV_WIPEONFORK and one MADV_DONTFORK, then a fork. The child reads the
    wiped region as zeros (served from the parent's slots, it read the
    parent's data), and fresh memory it maps where the DONTFORK region was
    as zeros too (it read the parent's there); the parent's three are
    intact."""
    result = umgr_exec([programs["wipefork"], "16"], "-v", max_resident="8M", timeout=60)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout == "ok\n", result.stderr[-4000:]
    stats = result.stats
    assert stats["pages_out"] >= 40 * 256, "pages must really have left before the fork"
    assert stats["forks"] == 1 and stats["targets"] == 2, stats
    assert stats["swap_slots_in_use_at_exit"] == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["fork", "mremap-race", "mremap-thread", "dontneed-race"])
def test_events_on_memory_zapped_instead_of_moved_out(umgr_exec, programs, mode):
    """The same with --no-move-out: every evicted page leaves by
    MADV_DONTNEED, whose REMOVE events the daemon tells from the app's."""
    counter, minimum, targets = MODES[mode]
    result = umgr_exec([programs["lifecycle"], mode, "64"], "--no-move-out", max_resident="16M", timeout=60)
    assert result.returncode == 0, result.stderr[-4000:]
    stats = result.stats
    assert stats["pages_out"] >= 48 * 256 and stats["moved_out"] == 0, stats
    # Each range zapped raises one REMOVE, counted as umgr's own unless an
    # app discard over its pages and others was read first (removes.py: the
    # pages then read zero, as the app asked): with dontneed-race, one run in
    # about eight here came out a range short.
    short = stats["zap_ranges"] // 100 if mode == "dontneed-race" else 0
    assert stats["zap_ranges"] > 0 and stats["own_removes"] >= stats["zap_ranges"] - short, stats
    assert stats[counter] >= minimum and stats["targets"] == targets, stats
    assert stats["swap_slots_in_use_at_exit"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["closefrom", "close_range", "loop"])
def test_a_program_that_closes_every_descriptor_it_did_not_open_goes_on_paging(umgr_exec, programs, how):
    """Daemons and process spawners close what they did not open. Had the
    shim's sockets closed, the agent could not answer the move-out the
    daemon waits on with the uffd unread, and the program hung at its next
    fault. Through libc the shim's descriptors stay open (the program's own
    close, low and high)."""
    result = umgr_exec([programs["closeall"], how], max_resident="16M", timeout=90)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr[-3000:]
    # 48 MiB out before the close; three passes over 64 MiB under 16 MiB after it.
    assert result.stats["pages_out"] > 48 * 256 + 3 * 48 * 256, result.stats


@pytest.mark.timeout(90)
def test_children_killed_as_they_attach_are_no_bad_clients(daemon, shim, programs):
    """strace kills the children it forks to probe the kernel, and a test
    harness may kill what it just started: a child killed inside fork(),
    while the daemon checks it, fails those checks for want of a process.
    That is one INFO line, not a refusal: no warning, none counted."""
    with subprocess.Popen([programs["lifecycle"], "fork-killed", "64"], env=daemon.env(shim),
                          stderr=subprocess.PIPE) as proc:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == b"", err.decode(errors="replace")[-3000:]
    # Each child's target, made from its fork event, is released when it
    # ends; most were killed before the daemon had checked them.
    def all_released():
        found = RELEASED.findall(daemon.log())
        return found if len(found) == 101 else None
    released = wait_for(all_released, 10, "the release of the parent and its 100 children")
    ended = [line for line in daemon.log().splitlines() if "ended while it attached" in line]
    assert 0 < len(ended) <= 100, len(ended)
    assert query_status(daemon.socket)["rejected_connections"] == 0, daemon.log()[-3000:]
    assert [line for line in daemon.log().splitlines() if "WARNING" in line] == [], daemon.log()[-3000:]
    assert int(next(out for pid, out in released if int(pid) == proc.pid)) >= (64 - 16) * 256, released


@pytest.mark.timeout(60)
def test_exec_of_a_program_without_the_shim_releases_the_old_image_at_once(daemon, shim, programs):
    """Nothing but the uffd says that the old image is gone (the pidfd fires
    at exit only): its target and slots must not wait for the exit."""
    proc = subprocess.Popen([programs["lifecycle"], "exec-unmanaged", "64"], env=daemon.env(shim))
    try:
        def execd() -> bool:
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                return f.read().startswith(b"sleep")
        wait_for(execd, 40, "the exec")

        def released() -> bool:
            status = query_status(daemon.socket)
            return not status["targets"] and status["backend"]["used_pages"] == 0
        wait_for(released, 10, "the old image's release")   # (long before the new image, which sleeps 60 s, ends)
        assert proc.poll() is None, "released while the new image still runs"
        (pid, out), = RELEASED.findall(daemon.log())
        assert int(pid) == proc.pid and int(out) >= (64 - 16) * 256, "its pages had left before the exec"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
def test_child_of_a_parent_killed_inside_fork_gets_its_paged_out_data(daemon, shim, programs):
    """The parent dies after its fork event was read but before its shim
    names the child (an atfork handler kills it inside fork()): the fork's
    uffd and the slots of the parent's paged-out pages outlive the parent
    until the child's own HELLO claims them, so the child reads its data,
    never zeros, and the slots are freed once it is done."""
    proc = subprocess.Popen([programs["lifecycle"], "fork-parent-killed", "64"], env=daemon.env(shim),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=50)   # EOF: the child, which shares the pipes, is done too
    assert proc.returncode == -9, err
    assert out == b"child ok\n", err
    log = daemon.log()
    assert f"pid {proc.pid}: died before naming its forked child" in log, log
    adopted = re.search(rf"pid {proc.pid}: adopted pid (\d+)", log)
    assert adopted, log
    released = dict(RELEASED.findall(log))
    assert int(released[str(proc.pid)]) >= (64 - 16) * 256, "the parent's pages had left before the fork"
    wait_for(lambda: adopted.group(1) in dict(RELEASED.findall(daemon.log())), 10, "the child's release")
    child_line = re.search(rf"pid {adopted.group(1)}: released \(faults (\d+), pages in (\d+)", daemon.log())
    assert int(child_line.group(2)) >= (64 - 16) * 256 - 1024, "the child read its pages back from swap"
    wait_for(lambda: query_status(daemon.socket)["backend"]["used_pages"] == 0, 10, "every slot freed")


@pytest.fixture
def pids_cgroup():
    """A pids cgroup (v1) of its own, removed after the test."""
    import os
    path = f"/sys/fs/cgroup/pids/umgr-test-{os.getpid()}"
    os.mkdir(path)
    try:
        yield path
    finally:
        with open(f"{path}/cgroup.procs") as f:
            left = f.read().split()
        for pid in left:   # (a process left behind goes back to the root, so that the group can go)
            with contextlib.suppress(OSError), open("/sys/fs/cgroup/pids/cgroup.procs", "w") as root:
                root.write(pid)
        os.rmdir(path)


@pytest.mark.timeout(90)
def test_forks_that_fail_at_a_pids_limit_leave_later_children_served(umgr_exec, programs, pids_cgroup):
    """`forkfail 32`: three forks and a forkpty fail with EAGAIN at a pids
    cgroup's limit, after the kernel copied the child's memory and sent its
    fork event; then three children check every byte. The failed forks' events were
    left queued: each later FORKED took an older one, the child failed its
    proof and was killed, and so was every child after it."""
    result = umgr_exec([programs["forkfail"], "32", pids_cgroup], "-v", max_resident="8M", timeout=60)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout == "ok\n", result.stderr[-4000:]
    assert result.stats["pages_out"] >= 24 * 256, "pages must really have left before the forks"
    assert result.stats["targets"] == 4, result.stats
    assert result.stderr.count("a fork made no child to name; 1 fork event(s) dropped") == 4, result.stderr[-4000:]
    assert result.stats["swap_slots_in_use_at_exit"] == 0


@pytest.mark.timeout(90)
def test_forks_nobody_names_are_kept_at_most_a_bounded_number(umgr_exec, programs):
    """`rawclones 16 300`: 300 children of a raw clone(SIGCHLD), which no
    atfork handler sees, so no FORKED names them. Their fork events held a
    descriptor, a table and a reference on every slot each for the
    parent's life (65535 of them wrapped a slot's count to free). At most
    UNCLAIMED_FORKS_MAX are kept; the parent pages on, every byte back."""
    from umgr.paging.events import UNCLAIMED_FORKS_MAX
    result = umgr_exec([programs["rawclones"], "16", "300"], "-v", max_resident="4M", timeout=60)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout == "ok\n", result.stderr[-4000:]
    assert result.stats["forks"] == 300 and result.stats["pages_out"] >= 12 * 256, result.stats
    assert result.stderr.count(f"more than {UNCLAIMED_FORKS_MAX} forks never named") == 300 - UNCLAIMED_FORKS_MAX
    # (The forks kept wait ORPHAN_WAIT for a child once the parent is gone, holding its slots meanwhile.)


def rss_anon_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


@pytest.mark.timeout(90)
def test_memory_written_again_after_madv_free_is_held_to_the_budget(daemon, shim, programs):
    """`freereuse 12 4`: four regions of 12 MiB, each MADV_FREE'd and
    written again at once (jemalloc's way), under a 16 MiB budget. The
    kernel reports the MADV_FREE as a REMOVE, and the write that cancels
    the free raises no fault: those pages were counted nowhere, and all
    48 MiB stayed in memory for good. They are counted at the next
    recheck and paged out like any other; every byte comes back."""
    from test_control import started
    with started([programs["freereuse"], "12", "4"], env=daemon.env(shim), stdin=subprocess.PIPE) as target:
        assert target.stdout.readline() == b"ready\n"
        # (the shim's own memory, the stack and libc's come on top of the budget's)
        wait_for(lambda: rss_anon_kb(target.pid) <= (16 + 8) * 1024, 20,
                 f"the program's memory to come down to its budget (RssAnon {rss_anon_kb(target.pid)} kB)")
        out, err = target.communicate(b"", timeout=60)
    assert target.returncode == 0, err.decode(errors="replace")[-3000:]
    assert out == b"ok\n", err
