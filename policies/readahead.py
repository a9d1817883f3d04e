"""Kernel-style readahead, umgr's default prefetch policy.

Like the kernel's ondemand readahead (mm/readahead.c), a stream's window starts
at ``initial`` pages and doubles on each sequential hit up to ``maximum``; a
fault that continues no stream starts a new one with no window, because a lone
fault is not yet a stream (the kernel reads a "standalone, small random read"
as is). Descending scans are detected too and prefetch downward.

One difference from the page cache: a prefetched page that is used raises no
fault at all (it is mapped), so there is no PG_readahead marker to hit. The
next fault of a sequential scan lands on the page just past the window, and
that fault is what grows the window. A few streams are tracked at once, least
recently used replaced first, so interleaved scans do not reset each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import PrefetchPolicy


@dataclass
class _Stream:
    last: int        # vpn of the stream's latest fault
    end: int         # first vpn past its window, in the direction of travel
    size: int = 0    # window size in pages; 0 until the stream is confirmed
    step: int = 0    # +1 ascending, -1 descending, 0 not yet known

    def continues(self, vpn: int) -> bool:
        if self.step == 0:
            return abs(vpn - self.last) == 1
        # Anywhere from just after the last fault up to just past the window:
        # pages inside it fault if they were evicted before use or not brought
        # in (the caller only prefetches pages that are not already resident).
        return 0 < (vpn - self.last) * self.step <= (self.end - self.last) * self.step


class Readahead(PrefetchPolicy):
    name = "readahead"

    def __init__(self, initial: int = 4, maximum: int = 64, streams: int = 8):
        if not 1 <= initial <= maximum:
            raise ValueError(f"need 1 <= initial <= maximum, got {initial}, {maximum}")
        if streams < 1:
            raise ValueError(f"need at least one stream, got {streams}")
        self.initial = initial
        self.maximum = maximum
        self.max_streams = streams
        self._streams: list[_Stream] = []  # most recently used last

    def on_fault(self, vpn: int, region_start: int, region_end: int) -> np.ndarray:
        for i in range(len(self._streams) - 1, -1, -1):
            s = self._streams[i]
            if vpn == s.last:  # a repeated fault (racing threads): no news
                return np.empty(0, dtype=np.int64)
            if s.continues(vpn):
                del self._streams[i]
                break
        else:
            # Non-sequential: a new stream with no window, replacing the least
            # recently used one. (The stream it interrupted keeps its state.)
            if len(self._streams) >= self.max_streams:
                del self._streams[0]
            self._streams.append(_Stream(last=vpn, end=vpn))
            return np.empty(0, dtype=np.int64)

        s.step = s.step or (1 if vpn > s.last else -1)
        s.size = min(2 * s.size, self.maximum) if s.size else self.initial
        s.last = vpn
        s.end = vpn + s.step * (s.size + 1)
        self._streams.append(s)
        if s.step > 0:
            return np.arange(vpn + 1, min(vpn + 1 + s.size, region_end), dtype=np.int64)
        return np.arange(vpn - 1, max(vpn - 1 - s.size, region_start - 1), -1, dtype=np.int64)
