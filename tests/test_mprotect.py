"""mprotect on managed memory: swap-in into read-only pages, PROT_NONE and
back over paged-out pages, PROT_NONE pages evicted (the daemon reads them
through /proc/PID/mem) and read back once accessible again, read-only pages
evicted and read back, and protections flipping while the evictor works.

The program (tests/programs/mprotect.c) checks every byte and measures with
mincore() that the pages it is about to touch had really left (or really
stayed); here we check those figures, the daemon's counters and its log.
"""
from __future__ import annotations

import re
import subprocess

import pytest

from umgr.paging.tuning import MAX_FILL_PAGES

MiB = 1 << 20
PAGE = 4096
PINNED = re.compile(r"(\d+) pages at (0x[0-9a-f]+) cannot be read; pinned")


def run(umgr_exec, programs, *args: str, timeout: float = 90):
    cmd = [programs["mprotect"], *args]
    try:
        # -v: the daemon logs (INFO) the unreadable pages it pins, by mapping.
        result = umgr_exec(cmd, "-v", max_resident="8M", timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} under umgr exec did not finish in {timeout} s: "
                    f"{(exc.stderr or b'').decode(errors='replace')[-2000:]}")
    figures = {m.group(1): int(m.group(2)) for m in re.finditer(r"^figure (\w+) (\d+)$", result.stdout, re.M)}
    return result, figures


def explain(result, figures) -> str:
    log = "\n".join(line for line in result.stderr.splitlines() if "DEBUG" not in line)
    return f"exit {result.returncode}\nfigures: {figures}\nstats: {result.stats}\nstderr: {log[-3000:]}"


@pytest.mark.timeout(120)
def test_mprotect_over_paged_out_and_unreadable_pages_64m_in_8m(umgr_exec, programs):
    result, figures = run(umgr_exec, programs, "64")
    why = explain(result, figures)
    assert result.returncode == 0, why
    assert result.stdout.endswith(f"ok {64 * MiB // PAGE} pages\n"), why
    eighth = 64 * MiB // PAGE // 8     # parts A, B and F: 2048 pages each
    c_pages, e_pages = 256, 512

    # A and B had left before they were made read-only / PROT_NONE; A came
    # back into read-only pages (it is as big as the budget: most of it).
    assert figures["a_out"] >= eighth * 9 // 10, why
    assert figures["a_in_after_read"] >= eighth // 2, why
    # B follows A in the same mapping: a readahead window at A's end (at
    # most MAX_FILL_PAGES) may have brought B's first pages back in. (CI
    # once saw 206 of them, against 0-21 in runs here.)
    assert figures["b_out"] >= eighth - MAX_FILL_PAGES, why
    # C was all in memory when it became PROT_NONE; the daemon reads pages
    # through /proc/PID/mem, which reads them whatever their protection, so
    # the two sweeps pushed C out like everything else, and it came back
    # intact (the program checked every byte once C was read-write again).
    assert figures["c_in_before"] == c_pages, why
    assert figures["c_in_after_sweeps"] <= c_pages // 10, why
    assert not PINNED.search(result.stderr), "PROT_NONE pages were pinned, not evicted\n" + why
    assert figures["c_in_at_end"] <= c_pages // 10, \
        f"{figures['c_in_at_end']} of C's {c_pages} pages never left after C was read-write again\n" + why
    # E was in memory when made read-only, then left while read-only (the
    # daemon can read and zap read-only pages), then came back.
    assert figures["e_in_before"] == e_pages, why
    assert figures["e_out_read_only"] >= e_pages * 9 // 10, why
    assert figures["e_out_read_write"] >= e_pages * 9 // 10, why
    # F's protections flipped while the filler was swept.
    assert figures["f_flips"] > 0, why

    stats = result.stats
    # The filler (37 MiB) is swept five times: 29 MiB or more out and in each time.
    assert stats["pages_out"] >= 5 * 29 * MiB // PAGE, why
    assert stats["pages_in"] >= 5 * 29 * MiB // PAGE, why
    assert stats["peak_resident_bytes"] <= 8 * MiB + 2 * MiB, why
    assert stats["swap_slots_in_use_at_exit"] == 0, why
    # Writable pages leave by UFFDIO_MOVE, which takes writable memory only:
    # read-only and PROT_NONE ones are zapped instead (MADV_DONTNEED).
    assert stats["moved_out"] > 0 and stats["zap_ranges"] > 0, why
