"""Whether pages read back from swap keep their swap copy ("clean copies").

A page that comes in write-protected keeps its slot: if it leaves again
unwritten, its eviction is a zap alone, with no read of the page and no
write to the store (the kernel's swap cache does the same for its clean
pages). Its first write costs a write-protect fault served by the daemon,
which drops the copy. So keeping pays when most kept pages leave clean
(random and scan reads, a read-mostly cache) and costs when most are
written soon after they came in (read-modify-write).

`auto` (the default) measures that: of the pages kept lately, the share
that a write fault dirtied (both counts decay with each page kept). Copies
are kept while that share is under DIRTY_LIMIT. A dirtied page is known
soon after it came in, so while keeping, the share speaks of about the last
256 pages kept and follows a change of workload within a few hundred fills.
While not keeping, one fill in SAMPLE_EVERY keeps anyway, so the estimate
goes on (each such page costs a read-modify-write program one more write
fault, served by the daemon: about 1.5% of its time at 1 in 64); then the
share speaks of about the last SAMPLED_PAGES samples, so that reads after a
read-modify-write phase keep again within about 1.4k fills. (Over the last
256 samples it took several thousand: in bench/programs/shapes.c, the
random reads from 4 threads that follow its rewrite phase wrote 17-19k
pages at eviction, 7-10k with this.) `always` and `never` fix it.
"""
from __future__ import annotations

MODES = ("auto", "always", "never")
DIRTY_LIMIT = 0.5      # keep while fewer than this share of kept pages get written
DECAY = 1 - 1 / 256    # per page kept: the counts speak of about the last 256
SAMPLE_EVERY = 64      # while not keeping: every 64th fill keeps, to go on measuring
SAMPLED_PAGES = 32     # of which the counts speak of about the last 32
SAMPLED_DECAY = 1 - 1 / SAMPLED_PAGES


class CleanCopies:
    def __init__(self, mode: str = "auto", stats=None):
        """stats: a TargetStats, whose clean_kept and clean_dirtied count
        what this measures (None: not counted)."""
        if mode not in MODES:
            raise ValueError(f"clean copies: {mode!r} is not one of {', '.join(MODES)}")
        self.mode = mode
        self.stats = stats
        self.kept = 0.0       # pages kept lately (decaying)
        self.written = 0.0    # of those, dirtied by a write (decaying alike)
        self._fills = 0
        # None kept while the store is full: each page read back gives its
        # slot up, for eviction to go on with (set and cleared by the evictor).
        self.suspended = False

    @property
    def dirty_share(self) -> float:
        return self.written / self.kept if self.kept >= 1 else 0.0

    @property
    def sampling(self) -> bool:
        """auto, with most kept pages written lately: only samples keep."""
        return self.mode == "auto" and self.dirty_share >= DIRTY_LIMIT

    def keep_period(self) -> int:
        """Which fills keep: 1 every one, 0 none, SAMPLE_EVERY every that
        many. The C fast path applies it page by page (umgr_keeps: each
        page read, each page of a prefetch window), keep() fill by fill."""
        if self.suspended:
            return 0
        if self.sampling:
            return SAMPLE_EVERY
        return int(self.mode != "never")

    def keep(self) -> bool:
        """Whether the pages of this fill that are read, not written, come
        in write-protected and keep their slot: keep_period() counted out
        here, as umgr_keeps does in C."""
        period = self.keep_period()
        if period <= 1:
            return period == 1
        self._fills += 1
        return self._fills % period == 0

    def came_in_clean(self, npages: int) -> None:
        """npages pages came in write-protected, their copy kept. (Pages
        brought beside a lone fault are kept whatever this says, to see
        them used: the callers leave them out.)"""
        if npages:
            if self.stats is not None:
                self.stats.clean_kept += npages
            decay = (SAMPLED_DECAY if self.sampling else DECAY) ** npages
            self.kept = self.kept * decay + npages
            self.written *= decay

    def dirtied(self, pages: int = 1) -> None:
        """Kept pages were written: their copies are dropped."""
        if self.stats is not None:
            self.stats.clean_dirtied += pages
        self.written = min(self.written + pages, self.kept)
