"""Constant-stride prefetch: after two equal gaps between faults, fetch the
next ``depth`` pages along that stride.

A prefetched page that is used raises no fault, so once a stride is locked the
next fault is ``depth + 1`` strides on; any fault a whole number of strides
ahead, up to there, keeps the lock.
"""

from __future__ import annotations

import numpy as np

from . import NO_PAGES, PrefetchPolicy


class Stride(PrefetchPolicy):
    name = "stride"

    def __init__(self, depth: int = 8):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self._last: int | None = None
        self._gap = 0      # latest gap between faults
        self._stride = 0   # locked stride, 0 when none

    def _locked_hit(self, vpn: int) -> bool:
        d, s = vpn - self._last, self._stride
        return s != 0 and d % s == 0 and 0 < d // s <= self.depth + 1

    def on_fault(self, vpn: int, region_start: int, region_end: int) -> np.ndarray:
        if self._last is None or not self._locked_hit(vpn):
            gap = 0 if self._last is None else vpn - self._last
            self._stride = gap if gap != 0 and gap == self._gap else 0
            self._gap = gap
        self._last = vpn
        if not self._stride:
            return NO_PAGES
        pages = vpn + self._stride * np.arange(1, self.depth + 1, dtype=np.int64)
        return pages[(pages >= region_start) & (pages < region_end)]
