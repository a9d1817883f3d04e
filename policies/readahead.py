"""Kernel-style readahead, umgr's default prefetch policy.

Like the kernel's ondemand readahead (mm/readahead.c), a stream's window starts
at ``initial`` pages and doubles on each hit up to ``maximum`` (256 pages,
1 MiB: a fault costs the daemon far more than the kernel's, so fewer and
larger windows pay where the kernel stops at 32 pages); a fault that
continues no stream starts a new one with no window, because a lone fault is
not yet a stream (the kernel reads a "standalone, small random read" as is).
Descending scans are detected too and prefetch downward.

Beyond the kernel, a stream may also have a constant stride (the idea of the
``stride`` policy): two equal gaps in a row between a stream's faults, of
2..``max_stride`` pages either way, lock it, and its window is then that many
pages along the stride (every second page for stride 2), growing the same way
up to ``strided_maximum`` pages (64, and never past ``maximum``: a window of
stride 64 already spans 16 MiB of the region).
A sequential stream needs one adjacent fault to be confirmed, as before; a
stride needs two equal gaps, so random faults close together rarely lock one.

One difference from the page cache: a prefetched page that is used raises no
fault at all (it is mapped), so there is no PG_readahead marker to hit. The
next fault of a scan lands on the page one stride past the window, or a few
strides further if the pages there were resident already, and that fault is
what grows the window. A few streams are tracked at once, least
recently used replaced first, so interleaved scans do not reset each other.

A lone fault may bring its neighbours, as the kernel's swap readahead does
(``cluster``, 8 pages: the fast path does it in C, before this policy
hears of the fault): the swapped pages of its aligned block that went out
with it (in the same eviction batch, or within a hundredth of the resident
set's evictions of it), so came in and were in use with it. They come in
write-protected. Each pushes a page out, so they come while more of those
brought lately were written soon after than the share of faults that bring
back a page evicted no more evictions ago than there are resident pages (how
likely the page pushed out is to be wanted back), by 10 points; or while
more of the pages of blocks left out were faulted on soon after than half
that share, by 10 points (umgr/paging/clusternotes.py). The kernel counts
a readahead page used when a fault maps it from the swap cache, a read
included; umgr sees no read of a mapped page, so it measures reads where
it left the blocks out. Where it pays: a JVM's arrays read and then
updated at random (bench_shapes.py's JVM workload: the updates took
0.55-0.8x the time without), GNU sort's text, which its comparisons only
read (bench_shapes.py's sort workload: 0.76x the time of writes as the only
measure). An interpreter's scattered objects clear the bars only at
times: brought whole, the blocks of a random walk over a working set a
little over the budget pushed out pages in use.

A first write going up (a buffer being filled, memory an allocator hands
out again after freeing it) brings fresh pages ahead of it
(``fresh_window``, 128 pages, and never more than ``maximum``): the fast
path does it in C, as this policy's windows over such pages would be, but
without a Python round of 100-150 us each. A write fault on the page after
one it served brings the next 16 fresh pages, as zeros; a write fault on
the page after those brings twice as many, up to ``fresh_window`` (and no
more than a prefetch window may take of the budget, nor past its high water
mark). The page before must still be resident, and the policy does not
hear of the fault that brought them (its window is in). A read of a fresh
page maps the zero page and brings none: they would take memory it does
not. Where it pays: DuckDB's spill of a query's data under its own memory
limit frees and refills 260 KiB blocks about 1.8k times, each once a ramp
of Python windows; a fault on a page that is not fresh still goes the way
above.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import CLUSTER_SIZES, NO_PAGES, PrefetchPolicy


@dataclass(slots=True)
class _Stream:
    last: int        # vpn of the stream's latest fault
    size: int = 0    # window size in pages; 0 until the stream is confirmed
    step: int = 0    # vpn delta between pages of the stream; 0 not yet known
    gap: int = 0     # unconfirmed: the latest gap, a candidate stride

    def continues(self, vpn: int) -> bool:
        """Whether ``vpn`` is the next fault of this confirmed stream: one
        step after the last fault up to a quarter window past its end, on
        the stride. Pages inside the window fault if they were evicted before
        use or not brought in (the caller only prefetches non-resident
        pages). Pages just past it raise no fault if they were resident
        already (a hot set the eviction policy kept, scattered through the
        scanned data): the scan's next fault is then further along."""
        d = vpn - self.last
        return d % self.step == 0 and 0 < d // self.step <= self.size + 1 + self.size // 4


def along(vpn: int, step: int, count: int, region_start: int, region_end: int) -> np.ndarray:
    """Up to ``count`` vpns after ``vpn`` going by ``step`` (either sign),
    nearest first, stopping at the region's edge. No per-page Python work."""
    room = (region_end - 1 - vpn) // step if step > 0 else (vpn - region_start) // -step
    n = max(0, min(count, room))
    return np.arange(vpn + step, vpn + step * (n + 1), step, dtype=np.int64)


class Readahead(PrefetchPolicy):
    name = "readahead"

    def __init__(self, initial: int = 4, maximum: int = 256, streams: int = 8, max_stride: int = 64,
                 strided_maximum: int = 64, cluster: int = 8, fresh_window: int = 128):
        if not 1 <= initial <= maximum:
            raise ValueError(f"need 1 <= initial <= maximum, got {initial}, {maximum}")
        if strided_maximum < 1:
            raise ValueError(f"need strided_maximum >= 1, got {strided_maximum}")
        if streams < 1:
            raise ValueError(f"need at least one stream, got {streams}")
        if max_stride < 1:
            raise ValueError(f"need max_stride >= 1 (1: sequential only), got {max_stride}")
        if cluster not in CLUSTER_SIZES:
            raise ValueError(f"cluster: one of {', '.join(map(str, CLUSTER_SIZES))} pages (0: none), got {cluster}")
        if fresh_window < 0:
            raise ValueError(f"need fresh_window >= 0 (0: none), got {fresh_window}")
        self.cluster = cluster
        self.fresh_window = min(fresh_window, maximum)   # (a window of fresh pages is a window too)
        self.initial = initial
        self.maximum = maximum
        self.strided_maximum = strided_maximum
        self.max_streams = streams
        self.max_stride = max_stride
        self._streams: list[_Stream] = []  # most recently used last

    def on_fault(self, vpn: int, region_start: int, region_end: int) -> np.ndarray:
        # Called on every fault, most of them (random access) near no
        # stream: comparisons rather than abs() calls in the loops. A fault
        # farther than max_stride from every unconfirmed stream, while none
        # is confirmed, can only start a new stream: screened for first in
        # a loop that does no more (1.2-1.3 us a random fault against
        # 1.9-2.2 through the loop below alone, measured here).
        streams, reach = self._streams, self.max_stride
        for s in streams:
            if s.step or -reach <= vpn - s.last <= reach:
                break
        else:
            return self._new_stream(vpn)
        near = -1  # most recent unconfirmed stream within max_stride, if any
        for i in range(len(streams) - 1, -1, -1):
            s = streams[i]
            d = vpn - s.last
            if d == 0:  # a repeated fault (racing threads): no news
                return NO_PAGES
            if s.step:
                if s.continues(vpn):
                    break
            elif d == 1 or d == -1 or (d == s.gap and -reach <= d <= reach):
                s.step = d  # adjacent, or the same gap twice: confirmed
                break
            elif near < 0 and -reach <= d <= reach:
                near = i
        else:
            if near >= 0:
                # Continues nothing but lies near an unconfirmed stream: that
                # gap is a candidate stride, which the next fault may repeat.
                s = streams.pop(near)
                s.last, s.gap = vpn, vpn - s.last
                streams.append(s)
                return NO_PAGES
            return self._new_stream(vpn)

        del self._streams[i]
        most = self.maximum if abs(s.step) == 1 else min(self.maximum, self.strided_maximum)
        s.size = min(2 * s.size, most) if s.size else min(self.initial, most)
        s.last = vpn
        self._streams.append(s)
        return along(vpn, s.step, s.size, region_start, region_end)

    def _new_stream(self, vpn: int) -> np.ndarray:
        """A new stream with no window, replacing the least recently used
        one (its object reused: a random workload does this on every
        fault). The stream it interrupted keeps its state."""
        if len(self._streams) >= self.max_streams:
            s = self._streams.pop(0)
            s.last, s.size, s.step, s.gap = vpn, 0, 0, 0
        else:
            s = _Stream(last=vpn)
        self._streams.append(s)
        return NO_PAGES
