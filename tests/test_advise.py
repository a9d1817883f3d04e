"""Application hints (umgr_advise): COLD, WILLNEED, DISCARDABLE, errors, and
the Python helper, on the real kernel under `umgr exec`.

The programs check every byte themselves and wait (mincore) for the
asynchronous effect of a hint; the stats prove the daemon did the work: pages
left without budget pressure (COLD), came back without faults (WILLNEED), were
dropped rather than written (DISCARDABLE).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from umgr import hints, protocol
from umgr.paging.pagetable import NO_SLOT, Flag, PageTable, State

MiB = 1 << 20
PAGE = 4096


def run(umgr_exec, cmd, budget, timeout, *options):
    try:
        return umgr_exec(cmd, *options, max_resident=budget, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`{' '.join(cmd)}` under umgr did not finish in {timeout} s; "
                    f"stderr: {(exc.stderr or b'').decode(errors='replace')[-2000:]}")


def explain(result) -> str:
    return f"exit {result.returncode}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}\nstats: {result.stats}"


# ---- on the real kernel ----------------------------------------------------

@pytest.mark.timeout(60)
def test_cold_evicts_without_budget_pressure(umgr_exec, programs):
    # 32 MiB under a 1 GiB budget: nothing would ever be evicted but for the hint.
    result = run(umgr_exec, [programs["advise"], "cold", "32"], "1G", 50)
    assert result.returncode == 0, explain(result)
    assert result.stdout.startswith("ok cold 8192 pages"), explain(result)
    stats = result.stats
    assert stats["hint_cold"] == 1, explain(result)
    # The program saw (mincore) at most 1/16 left resident; the daemon counted them out.
    assert stats["pages_out"] >= 8192 * 15 // 16, explain(result)
    assert stats["swap_bytes_written"] >= 8192 * 15 // 16 * PAGE, explain(result)
    # ...and every byte came back on the faults that followed.
    assert stats["pages_in"] >= 8192 * 15 // 16, explain(result)


@pytest.mark.timeout(90)
def test_willneed_brings_pages_in_before_they_are_touched(umgr_exec, programs):
    # No prefetch policy, so every page the program touches unserved is one fault.
    npages = 32 * MiB // PAGE
    hinted = run(umgr_exec, [programs["advise"], "willneed", "32", "hint"], "1G", 40, "--policy", "none")
    assert hinted.returncode == 0, explain(hinted)
    assert hinted.stdout.startswith(f"ok willneed {npages} pages"), explain(hinted)
    s = hinted.stats
    assert s["pages_out"] >= npages, explain(hinted)          # COLD took them all out
    assert s["willneed_in"] >= npages, explain(hinted)        # WILLNEED brought them all back
    # The first fill costs one fault a page; reading everything back afterwards
    # barely moves the counter.
    assert s["faults_missing"] <= npages + npages // 50, explain(hinted)

    unhinted = run(umgr_exec, [programs["advise"], "willneed", "32", "nohint"], "1G", 40, "--policy", "none")
    assert unhinted.returncode == 0, explain(unhinted)
    assert unhinted.stats["willneed_in"] == 0
    # Without the hint, reading them back is one fault each.
    assert unhinted.stats["faults_missing"] >= 2 * npages, explain(unhinted)


@pytest.mark.timeout(110)
def test_discardable_pages_are_dropped_not_written(umgr_exec, programs):
    # 16 MiB filled, hinted, a quarter rewritten after the hint; then 64 MiB
    # more in a 32 MiB budget pushes the 16 MiB out.
    npages = 16 * MiB // PAGE
    hinted = run(umgr_exec, [programs["advise"], "discard", "16", "64", "hint"], "32M", 50)
    assert hinted.returncode == 0, explain(hinted)
    counts = dict(zip(hinted.stdout.split()[2::2], map(int, hinted.stdout.split()[3::2])))
    # Pages written after the hint kept their data (the program checked every
    # byte); the others were dropped and read as zero.
    assert counts["rewritten"] == npages // 4, explain(hinted)
    assert counts["zero"] + counts["intact"] == npages - npages // 4, explain(hinted)
    assert counts["zero"] >= npages // 2, explain(hinted)
    assert hinted.stats["discarded"] >= counts["zero"], explain(hinted)
    assert hinted.stats["faults_wp"] >= npages // 4, explain(hinted)   # the writes that cancelled the hint

    plain = run(umgr_exec, [programs["advise"], "discard", "16", "64", "nohint"], "32M", 50)
    assert plain.returncode == 0, explain(plain)
    assert plain.stdout.startswith(f"ok discard zero 0 intact {npages - npages // 4}"), explain(plain)
    assert plain.stats["discarded"] == 0
    # Same work otherwise: the dropped pages are what was not written.
    saved = plain.stats["swap_bytes_written"] - hinted.stats["swap_bytes_written"]
    assert saved >= counts["zero"] * PAGE * 3 // 4, f"{saved=}\n{explain(hinted)}\n{explain(plain)}"


@pytest.mark.timeout(40)
def test_error_convention(umgr_exec, programs):
    # EINVAL for bad advice and unaligned addresses, ENOMEM for unmanaged
    # memory, 0 for an empty range and valid advice; the connection survives.
    result = run(umgr_exec, [programs["advise"], "errors"], "64M", 30)
    assert result.returncode == 0, explain(result)
    assert result.stdout.strip() == "ok errors", explain(result)
    assert result.stats["hint_cold"] == 1 and result.stats["hint_willneed"] == 1
    assert result.stats["hint_discardable"] == 1


@pytest.mark.timeout(30)
def test_errors_without_daemon_are_enotconn(programs, shim, tmp_path):
    # The shim loaded but no daemon: -1/ENOTCONN, and the program runs on.
    env = {"LD_PRELOAD": shim, "UMGR_SOCKET": str(tmp_path / "nobody.sock"), "PATH": "/usr/bin:/bin"}
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""
        import ctypes, errno, mmap
        lib = ctypes.CDLL(None, use_errno=True)
        m = mmap.mmap(-1, 1 << 20)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        rc = lib.umgr_advise(ctypes.c_void_p(addr), ctypes.c_size_t(1 << 20), 1)
        print(rc, errno.errorcode[ctypes.get_errno()])
        import umgr.hints as hints
        m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        print(hints.available(), hints.managed(), hints.advise(m, hints.COLD))
    """))
    proc = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    # The Python helper: the shim is there, umgr is not; the hint is a no-op.
    assert proc.stdout.split() == ["-1", "ENOTCONN", "True", "False", "False"], proc.stdout + proc.stderr


PYTHON_HINTS = textwrap.dedent("""
    import ctypes, errno, mmap, sys, time
    import umgr.hints as hints

    PAGE = 4096
    libc = ctypes.CDLL(None, use_errno=True)

    def resident(buf):
        addr, nbytes = hints._address_range(buf, None)   # its whole pages
        n = nbytes // PAGE
        vec = (ctypes.c_ubyte * n)()
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(n * PAGE), vec) == 0
        return sum(v & 1 for v in vec)

    def wait(buf, done, what):
        deadline = time.monotonic() + 30
        while not done(resident(buf)):
            if time.monotonic() > deadline:
                sys.exit(f"{what}: {resident(buf)} pages resident")
            time.sleep(0.005)

    assert hints.available() and hints.managed()
    n = 8192
    # Private: mmap.mmap(-1, n) alone is MAP_SHARED, which umgr does not manage.
    m = mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    shared = mmap.mmap(-1, 1 << 20)
    try:
        hints.advise(shared, hints.COLD)
    except OSError as exc:
        assert exc.errno == errno.ENOMEM, exc
    else:
        sys.exit("a shared mapping was advised")
    for i in range(n):
        m[i * PAGE:i * PAGE + 8] = (i + 1).to_bytes(8, "little")  # no zero page: those stay FRESH
    assert hints.advise(m, hints.COLD) is True
    wait(m, lambda r: r <= n // 16, "COLD")
    assert hints.advise(memoryview(m), hints.WILLNEED) is True
    wait(m, lambda r: r == n, "WILLNEED")
    for i in range(n):
        assert m[i * PAGE:i * PAGE + 8] == (i + 1).to_bytes(8, "little"), i
    try:
        hints.advise(m, 99)
    except OSError as exc:
        assert exc.errno == errno.EINVAL, exc
    else:
        sys.exit("advice 99 was accepted")
    # A bytearray is malloc'd memory (found by the daemon's maps scan, or by
    # the hint itself); only its whole pages are advised.
    data = bytearray(b"x" * (16 << 20))
    assert hints.advise(data, hints.DISCARDABLE) is True
    data[PAGE * 2 + 5] = ord("y")        # written after the hint: kept
    assert hints.advise(data, hints.COLD) is True
    wait(data, lambda r: r == 0, "COLD of DISCARDABLE")   # dropped, and the written page written out
    assert data[PAGE * 2 + 5] == ord("y")
    assert data.count(b"x") + data.count(b"\\0") == len(data) - 1
    assert data.count(b"\\0") >= len(data) - 3 * PAGE    # dropped, not written: zeros
    # An address and a length, as in C.
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert hints.advise(addr, hints.COLD, length=PAGE) is True
    print("ok python hints")
""")


@pytest.mark.timeout(60)
def test_python_helper_under_umgr(umgr_exec, tmp_path):
    script = tmp_path / "hints_demo.py"
    script.write_text(PYTHON_HINTS)
    result = run(umgr_exec, [sys.executable, str(script)], "1G", 50)
    assert result.returncode == 0, explain(result)
    assert result.stdout.strip() == "ok python hints", explain(result)
    assert result.stats["hint_cold"] >= 3 and result.stats["hint_willneed"] == 1, explain(result)
    stats = result.stats
    assert stats["pages_out"] >= 8192 * 15 // 16 and stats["willneed_in"] == 8192, explain(result)
    # The bytearray's 4095 whole pages: all dropped unwritten but the one written after the hint.
    assert stats["discarded"] >= 4094 - 16, explain(result)
    assert stats["swap_bytes_written"] <= (8192 + 16) * 4096, explain(result)


def test_python_helper_without_shim_is_a_noop():
    # pytest itself runs without the shim.
    assert not hints.available() and not hints.managed()
    assert hints.advise(bytearray(1 << 20), hints.COLD) is False
    assert hints.advise(0x10000, hints.WILLNEED, length=PAGE) is False


def test_python_helper_rounds_buffers_inwards():
    buf = bytearray(5 * PAGE)
    start, length = hints._address_range(buf, None)
    first = hints._address_range(memoryview(buf)[:1], None)[0]
    assert start % PAGE == 0 and length % PAGE == 0
    assert start >= first - 1 and start + length <= first + len(buf)
    assert length >= 4 * PAGE
    assert hints._address_range(bytes(5 * PAGE), None)[1] >= 4 * PAGE   # read-only buffers too
    assert hints._address_range(bytearray(100), None)[1] == 0
    with pytest.raises(TypeError):
        hints._address_range(0x1000, None)


# ---- pure logic ------------------------------------------------------------

SHIM_DIR = Path(__file__).resolve().parent.parent / "bindings" / "shim"
PRINT_ADVICE = r'''
#include <stdio.h>
#include "protocol.h"
int main(void)
{
    printf("%d %d %d\n", UMGR_ADVISE_COLD, UMGR_ADVISE_WILLNEED, UMGR_ADVISE_DISCARDABLE);
    return 0;
}
'''


def test_advice_values_agree_between_c_and_python(tmp_path):
    """umgr.h defines the values (the shim's protocol.h includes it); the
    daemon decodes them as protocol.Advice, applications pass umgr.hints'."""
    source, exe = tmp_path / "advice.c", tmp_path / "advice"
    source.write_text(PRINT_ADVICE)
    subprocess.run(["gcc", "-Wall", "-Werror", "-I", str(SHIM_DIR), "-o", str(exe), str(source)], check=True)
    c_values = [int(v) for v in subprocess.run([str(exe)], check=True, capture_output=True,
                                               text=True).stdout.split()]
    assert c_values == [hints.COLD, hints.WILLNEED, hints.DISCARDABLE]
    assert c_values == [protocol.Advice.COLD, protocol.Advice.WILLNEED, protocol.Advice.DISCARDABLE]
    assert all(type(v) is int for v in (hints.COLD, hints.WILLNEED, hints.DISCARDABLE))


def test_advise_decodes_unknown_advice_for_einval():
    msg = protocol.decode_control(protocol.encode_advise(0x10000, 8192, 42))
    assert isinstance(msg, protocol.Advise) and msg.advice == 42
    msg = protocol.decode_control(protocol.encode_advise(0x10000, 8192, 3))
    assert msg.advice is protocol.Advice.DISCARDABLE


def test_pagetable_flags_follow_pages():
    pt = PageTable()
    pt.add(100, 10, np.ones(10, bool))
    vpns = np.arange(102, 106)
    pt.set_flag(vpns, Flag.DISCARDABLE)
    assert pt.flagged(Flag.DISCARDABLE) == 4
    assert list(pt.has_flag(np.arange(101, 107), Flag.DISCARDABLE)) == [False, True, True, True, True, False]
    # Flags move, split and copy with their pages...
    pt.move(100, 200, 10)
    assert pt.flagged(Flag.DISCARDABLE) == 4 and pt.has_flag(np.array([202]), Flag.DISCARDABLE)[0]
    pt.remove(203, 204)
    assert pt.flagged(Flag.DISCARDABLE) == 3
    assert pt.copy().flagged(Flag.DISCARDABLE) == 3
    # ...and vanish when the page has no content in memory any more.
    pt.set(np.array([202]), State.SWAPPED, np.array([5], np.int32))
    pt.set(np.array([202]), State.RESIDENT, NO_SLOT)
    assert not pt.has_flag(np.array([202]), Flag.DISCARDABLE)[0]
    pt.discard(204, 205)
    assert pt.flagged(Flag.DISCARDABLE) == 1
    pt.set_flag(np.array([205]), Flag.DISCARDABLE, False)
    assert pt.flagged(Flag.DISCARDABLE) == 0
    # A flag does not stick on a page with nothing in memory.
    pt.set_flag(np.array([204]), Flag.DISCARDABLE)
    assert pt.flagged(Flag.DISCARDABLE) == 0


def test_pagetable_find_state_pages_through_regions():
    pt = PageTable()
    pt.add(100, 10, np.ones(10, bool))
    pt.add(120, 10, np.ones(10, bool))
    pt.set(np.array([103, 104, 121]), State.SWAPPED, np.array([1, 2, 3], np.int32))
    found, after = pt.find_state(0, 1000, State.SWAPPED)
    assert list(found) == [103, 104, 121] and after == 1000
    found, after = pt.find_state(0, 1000, State.SWAPPED, limit=2)
    assert list(found) == [103, 104] and after == 105
    found, after = pt.find_state(after, 1000, State.SWAPPED, limit=2)
    assert list(found) == [121] and after == 1000
    found, _ = pt.find_state(100, 130, State.RESIDENT, limit=5)
    assert list(found) == [100, 101, 102, 105, 106]


def test_queued_hints_are_bounded_and_the_sender_waits_for_room():
    """COLD hints for a target whose eviction task is held up: QUEUED_MAX
    are queued and ACK'd at once, the next waits (its sender with it)
    until the eviction task takes one; the queue never grows past the
    bound (it grew one entry per ACK'd message, without end)."""
    from types import SimpleNamespace

    import trio
    import trio.testing

    from umgr.paging.advice import QUEUED_MAX, Hints
    from umgr.protocol import Advice

    core = SimpleNamespace(stats=SimpleNamespace(hint_cold=0), want_eviction=lambda: None, gone=False,
                           can_evict=lambda: False)
    hints = Hints(core, evictor=None)

    async def main():
        for i in range(QUEUED_MAX):
            await hints.advise(i, i + 1, Advice.COLD)
        waited = []

        async def one_more():
            await hints.advise(1000, 1001, Advice.COLD)
            waited.append(hints.queued)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one_more)
            await trio.testing.wait_all_tasks_blocked()
            assert waited == [] and hints.queued == QUEUED_MAX
            await hints.serve_queued()
        assert waited and waited[0] <= QUEUED_MAX and hints.queued == 0

    trio.run(main)


ANSWERS_IN_ORDER = textwrap.dedent("""
    import ctypes, errno, mmap, sys
    from umgr import hints
    buf = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf[::4096] = b"x" * 1024
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))

    def hint(start):
        try:
            hints.advise(start, hints.COLD, 4096)
            return "ok"
        except OSError as exc:
            return errno.errorcode[exc.errno]

    print("ready", flush=True)
    sys.stdin.readline()
    print(hint(addr + 1), flush=True)     # unaligned: EINVAL, once the daemon answers
    sys.stdin.readline()
    print(hint(addr), hint(addr + 1), flush=True)
""")


@pytest.mark.timeout(60)
def test_a_hint_that_timed_out_does_not_take_the_next_one_s_answer(daemon, shim):
    """The daemon stopped while a hint waits: it fails with ETIMEDOUT. Once
    the daemon runs again, each later hint gets its own answer (the
    late one is read and dropped first): the shim took the late answer
    for the next hint, and every answer after was one behind (a
    DISCARDABLE reported done before it had taken effect)."""
    import signal

    program = subprocess.Popen([sys.executable, "-c", ANSWERS_IN_ORDER], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=daemon.env(shim, UMGR_ACK_TIMEOUT_SECONDS="1"))
    try:
        assert program.stdout.readline() == "ready\n", program.stderr.read()
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            program.stdin.write("go\n")
            program.stdin.flush()
            assert program.stdout.readline() == "ETIMEDOUT\n"
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        out, err = program.communicate("go\n", timeout=30)
        assert program.returncode == 0, err
        assert out == "ok EINVAL\n", out
    finally:
        if program.poll() is None:
            program.kill()
            program.wait()
