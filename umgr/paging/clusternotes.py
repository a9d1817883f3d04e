"""Whether the pages of a lone fault's block are wanted, measured where
they were left out.

After a lone fault on a swapped page the fast path may bring the pages of
its aligned block that went out with it (PrefetchPolicy.cluster,
umgr_fast_cluster in bindings/cffi/_cdef_fastfault.py). It measures that
two ways (umgr_cluster_wanted): writes to the pages it brought, and, here,
faults on the pages of the blocks it left out. The C call notes those
pages in these arrays; a fault, on either path, that brings a noted page
back from swap soon after counts it as wanted (TargetCore.refaulted). A
read shows that way as well as a write: reads of a mapped page are not
seen, and GNU sort's comparisons only read, so its blocks never came when
writes were the only measure. Pages a prefetch window brings are not
counted: a sequential scan's would turn blocks on, and a block brought
whole cuts the runs of faults that start the scan's streams.

Soon: within WINDOW_SHARE as many pages faulted back from swap as there
are resident pages. A page brought in waits in the eviction policy's cold
queue (reuse: about a tenth of the resident pages) before it leaves
unused; and over the whole resident set's worth, the neighbours of a
random walk's faults came back about as often as any page, so that
blocks of random pages came by chance (docs/architecture.md). Or sooner,
before the note is written over: the table has 4096 entries by vpn and a
lone fault notes up to 7, so from about 5k resident pages up (20 MiB) it
is the table that ends the window. A page still noted when another lone
fault of its block leaves the block out is noted and counted again: a
block faulted a page at a time counts its last pages more than once,
which holds the share down for it (both left as measured).
"""
from __future__ import annotations

import numpy as np

from umgr.kernel import uffd as uffdmod

NOTED, WANTED, TICK = uffdmod.CLUSTER_NOTED, uffdmod.CLUSTER_WANTED, uffdmod.CLUSTER_TICK
MASK = uffdmod.CLUSTER_NOTES - 1
# The counts are halved past this many pages noted: they follow the program's phases.
MEMORY = 1024
WINDOW_SHARE = 1 / 8


class ClusterNotes:
    def __init__(self):
        self.vpn = np.zeros(uffdmod.CLUSTER_NOTES, np.uint64)    # a page left out, by vpn modulo CLUSTER_NOTES (0: none)
        self.tick = np.zeros(uffdmod.CLUSTER_NOTES, np.uint32)   # counts[TICK] when it was noted
        # [NOTED] (added to by the C call), [WANTED] and [TICK]
        self.counts = np.zeros(3, np.int64)

    def came_back(self, vpns: np.ndarray, resident: int) -> None:
        """Faults brought these pages back from swap, with `resident` pages
        resident: those noted no more than WINDOW_SHARE of that many such
        pages ago count as wanted. (A C call in the background may note
        pages meanwhile: its `+=` on counts[NOTED] and the halving here can
        lose either one, the halving too, which leaves the share half what
        it was until the next. Statistics only: the arrays stay put, and
        indices are masked.)"""
        if not len(vpns):
            return
        counts = self.counts
        counts[TICK] += len(vpns)
        if counts[NOTED] > MEMORY:
            counts[NOTED] //= 2
            counts[WANTED] //= 2
        vpns = np.asarray(vpns, np.int64)
        at = vpns & MASK
        noted = self.vpn[at] == vpns.astype(np.uint64)
        if not noted.any():
            return
        at = at[noted]
        self.vpn[at] = 0
        age = (int(counts[TICK]) - self.tick[at].astype(np.int64)) & 0xFFFFFFFF
        counts[WANTED] += int(np.count_nonzero(age <= resident * WINDOW_SHARE))
