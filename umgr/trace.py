"""Fault traces: the faults and evictions a run saw, for replaying policies
offline (`umgr exec --record-trace FILE`, `umgr replay`).

A trace file is a header and fixed 16-byte records, so numpy reads it whole:

    meta, records = read_trace(path)     # records: a numpy array of RECORD
    swapped = records[records["kind"] == Kind.FAULT_SWAPPED]["vpn"]

The header is MAGIC, its own size and the record size (HEADER), then JSON
(the run's settings: policies, budget, command, and `format`: FORMAT when
written), padded to 16 bytes. A trace of a later format is refused: its
records may mean what this umgr does not know; one without `format` is
format 1 (no GONE or MOVED records).
`time_us` is microseconds since the trace began, modulo 2**32; a CLOCK record
holds the full value at least every 2**31 us, and read_trace() adds a `time`
column with the full count. Page records (faults, evictions) belong to the
target whose TARGET record has the same `target` index; REGION and
REGION_END records give the memory it registered, for prefetch bounds.

Only what umgr sees is recorded: faults, which are accesses to pages that
were not mapped (or write-protected), and what the app did to its memory
(discards, munmap, mremap: GONE and MOVED records). Accesses to resident pages leave no
trace, so a replay is exact only for what faulted: a bigger budget than the
recorded one can only save faults, a smaller one cannot know the accesses
that hit in the recorded run. A forked child starts from its parent's pages;
its replay starts from none.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import struct
import time
from dataclasses import dataclass

import numpy as np

from umgr.kernel.uffd import UFFD_PAGEFAULT_FLAG_WP, UFFD_PAGEFAULT_FLAG_WRITE
from umgr.paging.pagetable import PAGE_SHIFT, State

log = logging.getLogger("umgr.trace")

MAGIC = b"UMGRTRC\0"
HEADER = struct.Struct("<8sII")  # magic, header bytes (JSON and padding included), record bytes
RECORD = np.dtype([("vpn", "<u8"), ("time_us", "<u4"), ("target", "<u2"), ("kind", "u1"), ("flags", "u1")])
CHUNK = 1 << 16          # records buffered before a write (1 MiB)
CLOCK_EVERY = 1 << 31    # microseconds between CLOCK records, at most
MAX_TARGETS = 1 << 16    # `target` is 16 bits: later targets are not recorded
FORMAT = 2               # 2: GONE and MOVED records (kinds 10-14)


class Kind(enum.IntEnum):
    TARGET = 0         # a new target: vpn = its pid; flags = FORKED if it was forked
    BUDGET = 1         # vpn = the target's budget in pages (0: none); again when `umgr budget` changes it
    REGION = 2         # vpn = the first page of a registered range ...
    REGION_END = 3     # ... and, in the next record, the page after its end
    FAULT_FRESH = 4    # MISSING fault on a page never written (or dropped): filled with zeros
    FAULT_SWAPPED = 5  # MISSING fault on a page in the backend: read back
    FAULT_WP = 6       # write to a write-protected page (a page umgr keeps clean, or on the zero page)
    FAULT_OTHER = 7    # MISSING fault on a page believed mapped (being evicted, reclaimed)
    EVICT = 8          # the page left memory (written out, or dropped when all zero)
    CLOCK = 9          # vpn = microseconds since the trace began, in full
    GONE = 10          # the app discarded (flags DISCARDED: MADV_DONTNEED) or unmapped (UNMAPPED) a range:
    GONE_END = 11      # vpn = its first page, and in the next record the page after its end
    MOVED = 12         # mremap moved a range: vpn = the source's first page, then in the next
    MOVED_TO = 13      # record the destination's first page, and in the one after that
    MOVED_END = 14     # the page after the destination's end


FAULTS = (Kind.FAULT_FRESH, Kind.FAULT_SWAPPED, Kind.FAULT_WP, Kind.FAULT_OTHER)
WRITE = 1   # flags of a fault: the access was a write
FORKED = 1  # flags of a TARGET record
DISCARDED, UNMAPPED = 1, 2   # flags of a GONE record


class TraceWriter:
    """Appends records from the daemon's thread; a full buffer is one
    write(2). A write error stops the recording (logged once, `error`
    says why) and never the paging."""

    def __init__(self, path: str, meta: dict):
        self.path = path
        self.error = ""
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        text = json.dumps({**meta, "format": FORMAT}).encode()
        size = HEADER.size + len(text)
        size += -size % RECORD.itemsize
        os.write(self._fd, HEADER.pack(MAGIC, size, RECORD.itemsize) + text.ljust(size - HEADER.size))
        self._columns = {name: np.empty(CHUNK, RECORD[name]) for name in RECORD.names}
        self._n = 0
        self._targets = 0
        self._started = time.monotonic_ns()
        self._clock = -CLOCK_EVERY

    def target(self, pid: int, budget_pages: int, pages=None) -> TargetTrace | NullTrace:
        """The recorder of a new target; `pages`: the page table it starts
        from (a forked child's), whose regions are recorded."""
        if self._targets >= MAX_TARGETS:
            return NO_TRACE
        trace = TargetTrace(self, self._targets)
        self._targets += 1
        now = self.now()
        trace.put(Kind.TARGET, pid, now, FORKED if pages is not None else 0)
        trace.put(Kind.BUDGET, budget_pages, now)
        for region in pages.regions if pages is not None else ():
            trace.region(region.vpn, region.npages)
        return trace

    def now(self) -> int:
        """Microseconds since the trace began, modulo 2**32 (a CLOCK record
        first when the last one is CLOCK_EVERY old)."""
        us = (time.monotonic_ns() - self._started) // 1000
        if us - self._clock >= CLOCK_EVERY:
            self._clock = us
            self.append(us, us & 0xFFFFFFFF, 0, Kind.CLOCK, 0)
        return us & 0xFFFFFFFF

    def append(self, vpn: int, time_us: int, target: int, kind: int, flags: int) -> None:
        n, c = self._n, self._columns
        c["vpn"][n], c["time_us"][n], c["target"][n], c["kind"][n], c["flags"][n] = vpn, time_us, target, kind, flags
        self._n = n + 1
        if self._n == CHUNK:
            self.flush()

    def extend(self, vpns: np.ndarray, time_us: int, target: int, kind: int) -> None:
        at = 0
        while at < len(vpns):
            n = self._n
            take = min(len(vpns) - at, CHUNK - n)
            c = self._columns
            c["vpn"][n:n + take] = vpns[at:at + take]
            c["time_us"][n:n + take] = time_us
            c["target"][n:n + take] = target
            c["kind"][n:n + take] = kind
            c["flags"][n:n + take] = 0
            self._n += take
            at += take
            if self._n == CHUNK:
                self.flush()

    def flush(self) -> None:
        n, self._n = self._n, 0
        if not n or self._fd < 0:
            return
        records = np.empty(n, RECORD)
        for name, column in self._columns.items():
            records[name] = column[:n]
        try:
            data = memoryview(records).cast("B")
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:
            self.error = f"recording stopped: {exc.strerror or exc}"
            log.warning("trace %s: %s", self.path, self.error)
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class TargetTrace:
    """What one target's engine calls: faults as the fault loop reads them,
    evictions as they settle, regions as they are registered."""

    def __init__(self, writer: TraceWriter, index: int):
        self.writer = writer
        self.index = index

    def put(self, kind: int, vpn: int, time_us: int, flags: int = 0) -> None:
        self.writer.append(vpn, time_us, self.index, kind, flags)

    def faults(self, pt, faults: list[tuple[int, int]]) -> None:
        """A batch of (address, uffd pagefault flags), before it is served
        (its kinds come from the page states it found)."""
        now = self.writer.now()
        for address, flags in faults:
            vpn = address >> PAGE_SHIFT
            if flags & UFFD_PAGEFAULT_FLAG_WP:
                kind = Kind.FAULT_WP
            else:
                state = pt.state_of(vpn)
                kind = (Kind.FAULT_SWAPPED if state == State.SWAPPED
                        else Kind.FAULT_FRESH if state in (State.FRESH, State.ZERO) else Kind.FAULT_OTHER)
            self.put(kind, vpn, now, WRITE if flags & UFFD_PAGEFAULT_FLAG_WRITE else 0)

    def evicted(self, vpns: np.ndarray) -> None:
        if len(vpns):
            self.writer.extend(vpns, self.writer.now(), self.index, Kind.EVICT)

    def region(self, vpn: int, npages: int) -> None:
        now = self.writer.now()
        self.put(Kind.REGION, vpn, now)
        self.put(Kind.REGION_END, vpn + npages, now)

    def budget(self, budget_pages: int) -> None:
        """The budget changed while the target ran (a replay runs at the first)."""
        self.put(Kind.BUDGET, budget_pages, self.writer.now())

    def gone(self, lo: int, hi: int, how: int) -> None:
        """The app discarded (DISCARDED) or unmapped (UNMAPPED) pages [lo, hi)."""
        now = self.writer.now()
        self.put(Kind.GONE, lo, now, how)
        self.put(Kind.GONE_END, hi, now)

    def moved(self, src: int, dst: int, npages: int) -> None:
        now = self.writer.now()
        self.put(Kind.MOVED, src, now)
        self.put(Kind.MOVED_TO, dst, now)
        self.put(Kind.MOVED_END, dst + npages, now)


class NullTrace:
    """The recorder of a target nobody traces: every call does nothing."""

    def faults(self, pt, faults) -> None:
        pass

    def evicted(self, vpns) -> None:
        pass

    def region(self, vpn: int, npages: int) -> None:
        pass

    def budget(self, budget_pages: int) -> None:
        pass

    def gone(self, lo: int, hi: int, how: int) -> None:
        pass

    def moved(self, src: int, dst: int, npages: int) -> None:
        pass


NO_TRACE = NullTrace()


class TraceError(ValueError):
    """Not a trace file umgr can read."""


def read_trace(path: str) -> tuple[dict, np.ndarray]:
    """(the run's settings, the records with a `time` column added: full
    microseconds since the trace began)."""
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) < HEADER.size or head[:8] != MAGIC:
            raise TraceError(f"{path}: not a umgr trace")
        _, size, record_size = HEADER.unpack(head)
        if size < HEADER.size:
            raise TraceError(f"{path}: a header of {size} bytes, shorter than its own start")
        if record_size != RECORD.itemsize:
            raise TraceError(f"{path}: records of {record_size} bytes, this umgr reads {RECORD.itemsize}")
        try:
            meta = json.loads(f.read(size - HEADER.size).decode().rstrip())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraceError(f"{path}: bad header: {exc}") from None
        if not isinstance(meta, dict):
            raise TraceError(f"{path}: bad header: not a JSON object")
        written = meta.get("format", 1)
        if not isinstance(written, int) or written > FORMAT:
            raise TraceError(f"{path}: a trace of format {written!r}, from a later umgr; this one reads up to "
                             f"format {FORMAT}")
        data = f.read()
    whole = len(data) - len(data) % RECORD.itemsize  # a run killed mid-write leaves a partial record
    records = np.frombuffer(data[:whole], RECORD)
    return meta, _with_time(records)


def _with_time(records: np.ndarray) -> np.ndarray:
    clocks = records["kind"] == Kind.CLOCK
    base = np.where(clocks, records["vpn"], 0).astype(np.int64)
    last_clock = np.maximum.accumulate(np.where(clocks, np.arange(len(records)), 0)) if len(records) else base
    base = base[last_clock]
    full = base + ((records["time_us"].astype(np.int64) - base) & 0xFFFFFFFF)
    out = np.empty(len(records), RECORD.descr + [("time", "<i8")])
    for name in RECORD.names:
        out[name] = records[name]
    out["time"] = full
    return out


@dataclass
class TargetRun:
    """One target's part of a trace, as a replay needs it."""
    pid: int
    forked: bool
    budget_pages: int
    regions: list[tuple[int, int]]   # (first vpn, end vpn), sorted by first (mremap's destinations too)
    accesses: np.ndarray             # vpns of its faults, in order
    kinds: np.ndarray                # their Kind
    evictions: int
    # What the app did to its memory, in order: (faults before it, GONE or
    # MOVED, first vpn, end vpn, destination's first vpn (MOVED) or the
    # GONE record's flags), as umgr.policies.replay.replay_paging takes them.
    events: list[tuple[int, int, int, int, int]]


def target_runs(records: np.ndarray) -> list[TargetRun]:
    records = records[records["kind"] != Kind.CLOCK]
    runs = []
    for index in np.unique(records["target"]).tolist():
        mine = records[records["target"] == index]
        kinds = mine["kind"]
        head = mine[kinds == Kind.TARGET]
        budget = mine[kinds == Kind.BUDGET]["vpn"]
        faults = np.isin(kinds, FAULTS)
        events = _events(mine, np.cumsum(faults) - faults)
        regions = sorted([*zip(mine[kinds == Kind.REGION]["vpn"].tolist(), mine[kinds == Kind.REGION_END]["vpn"].tolist()),
                          *((dst, dst + hi - lo) for _, kind, lo, hi, dst in events if kind == Kind.MOVED)])
        runs.append(TargetRun(pid=int(head["vpn"][0]) if len(head) else 0,
                              forked=bool(len(head) and head["flags"][0] & FORKED),
                              budget_pages=int(budget[0]) if len(budget) else 0, regions=regions,
                              accesses=mine["vpn"][faults].astype(np.int64), kinds=kinds[faults],
                              evictions=int((kinds == Kind.EVICT).sum()), events=events))
    return runs


def _events(mine: np.ndarray, faults_before: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """A target's GONE and MOVED records, with the records that follow
    each (written together: nothing comes between but CLOCK records)."""
    kinds, vpns, flags = mine["kind"].tolist(), mine["vpn"].tolist(), mine["flags"].tolist()
    events = []
    for i in np.flatnonzero(np.isin(mine["kind"], (Kind.GONE, Kind.MOVED))).tolist():
        if kinds[i] == Kind.GONE and i + 1 < len(kinds) and kinds[i + 1] == Kind.GONE_END:
            events.append((int(faults_before[i]), Kind.GONE, vpns[i], vpns[i + 1], flags[i]))
        elif kinds[i] == Kind.MOVED and i + 2 < len(kinds) and kinds[i + 1:i + 3] == [Kind.MOVED_TO, Kind.MOVED_END]:
            npages = vpns[i + 2] - vpns[i + 1]
            events.append((int(faults_before[i]), Kind.MOVED, vpns[i], vpns[i] + npages, vpns[i + 1]))
    return events
