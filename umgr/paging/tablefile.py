"""A page table whose arrays live in files, so that a restarted daemon finds
every page's state and slot where the dead one left them.

A region's state and slot arrays move into a MAP_SHARED mapping of a file
in the target's directory when a page of it first gets a slot (until then a
restarted daemon learns all it needs from the kernel: see holding_slots);
pieces of a region in a file are files too. A store to a shared file mapping is in the page
cache as soon as it is made, and the kernel keeps (and writes back) the
dirty pages of a process that dies, SIGKILL included: so the table a
crashed daemon leaves is exactly the one it had, without an fsync or a
write(2) per fault. A machine crash is not covered (the targets died with
it anyway). Flags stay in memory: they are hints, and a restarted daemon
does without them.

A file: a header of int64s (MAGIC, first vpn, pages, generation, and the
first vpn it was moved from by mremap plus one, 0 if never), the state
bytes at 64, the int32 slots after them (64-byte aligned), its blocks
allocated when it is made (see reserve). The header is written last, so a
file cut short by a crash has no magic and is ignored. A region is cut
(munmap, mremap) by writing its pieces as new files, then unlinking it: a
crash in between leaves pieces that overlap their old region, and the
newest generation wins when the table is loaded. Table files take disk
space: 5 bytes a page of a region that has had a page in swap (a 64 GiB
reservation, 80 MB).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from umgr.kernel.sharedmap import map_shared, reserve
from umgr.paging.pagetable import MemoryArrays, PageTable, Region, chunk_steps, copy_nonzero

log = logging.getLogger("umgr.daemon")

MAGIC = 0x3254504752474D55   # "UMGRGPT2" little endian (2: slot 0 is NO_SLOT)
HEADER_BYTES = 64
PREFIX = "r"
RECORD = "target.json"   # the target's identity (umgr/daemon/statedir.py): without it, no restart takes it back


@dataclass(eq=False)
class FileBacking:
    """A region's file: its name in the table's directory, its mapped header."""
    name: str
    header: np.ndarray    # int64 [MAGIC, vpn, npages, generation, moved from + 1, 0, 0, 0]
    generation: int
    dir_fd: int           # the table's directory (FileArrays owns it)

    @property
    def moved_from(self) -> int:
        """The first vpn mremap last moved it from; -1 if never."""
        return int(self.header[4]) - 1

    def steps(self, a: int, b: int, of: str = "both") -> Iterator[tuple[int, int]]:
        """Region.steps: pages [a, b) where the file holds data in the
        array(s) `of` names (SEEK_DATA, SEEK_HOLE: a hole reads as zero, a
        FRESH page with no slot). Every step if the file cannot be looked at."""
        npages = int(self.header[2])
        try:
            runs = self._runs(a, b, of, npages)
        except OSError:
            yield from chunk_steps(a, b)
            return
        end = a
        for lo, hi in sorted(runs):   # (merged, then cut into steps)
            lo = max(lo, end)
            if hi > lo:
                yield from chunk_steps(lo, hi)
                end = hi

    def _runs(self, a: int, b: int, of: str, npages: int) -> list[tuple[int, int]]:
        fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        try:
            runs = []
            if of != "slot":
                runs += _data(fd, HEADER_BYTES + a, HEADER_BYTES + b, HEADER_BYTES, 1)
            if of != "state":
                offset = _slot_offset(npages)
                runs += _data(fd, offset + 4 * a, offset + 4 * b, offset, 4)
            return runs
        finally:
            os.close(fd)


def _data(fd: int, start: int, stop: int, base: int, size: int) -> list[tuple[int, int]]:
    """The runs of entries (of `size` bytes, the first at `base`) holding
    data in the file's bytes [start, stop)."""
    runs = []
    at = start
    while at < stop:
        try:
            lo = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:   # no data after `at`
                break
            raise
        if lo >= stop:
            break
        hi = min(os.lseek(fd, lo, os.SEEK_HOLE), stop)
        runs.append(((lo - base) // size, (hi - base + size - 1) // size))
        at = hi
    return runs


def _slot_offset(npages: int) -> int:
    return HEADER_BYTES + (npages + 63) // 64 * 64


def _file_size(npages: int) -> int:
    return _slot_offset(npages) + 4 * npages


def _map(fd: int, npages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The file's header, state and slot arrays, mapped shared."""
    memory = map_shared(fd, _file_size(npages), random=True)
    header = np.frombuffer(memory, np.int64, HEADER_BYTES // 8, 0)
    state = np.frombuffer(memory, np.uint8, npages, HEADER_BYTES)
    slot = np.frombuffer(memory, np.int32, npages, _slot_offset(npages))
    return header, state, slot


class FileArrays(MemoryArrays):
    """Region arrays in files of one directory (a descriptor: names are
    opened relative to it, never followed through a link)."""

    def __init__(self, dir_fd: int, label: str = ""):
        self.dir_fd = dir_fd
        self.label = label
        self.broken = False   # a file could not be made: the table is not saved any more
        self._last_generation = 0

    def _generation(self) -> int:
        # CLOCK_MONOTONIC is one clock for every process of a boot, so a
        # restarted daemon's pieces are newer than the dead one's.
        self._last_generation = max(time.monotonic_ns(), self._last_generation + 1)
        return self._last_generation

    def _to_file(self, region: Region) -> None:
        """Move the region's state and slot arrays into a new file (its
        current contents first, the header last)."""
        generation = self._generation()
        name = f"{PREFIX}{generation:x}"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dir_fd)
        try:
            reserve(fd, _file_size(region.npages))
            header, state, slot = _map(fd, region.npages)
        except OSError:
            os.unlink(name, dir_fd=self.dir_fd)   # (and what blocks it got: the disk is full)
            raise
        finally:
            os.close(fd)
        copy_nonzero(state, region.state)   # the file is zeros: a sparse file stays sparse
        copy_nonzero(slot, region.slot)
        region.state, region.slot = state, slot
        region.backing = FileBacking(name, header, generation, self.dir_fd)
        header[1:4] = (region.vpn, region.npages, generation)
        header[0] = MAGIC

    def holding_slots(self, region: Region) -> None:
        # Only a region with a page in a slot has anything a restarted
        # daemon could not learn from the kernel: a page it does not know
        # reads zero when absent (never written, or discarded), and is
        # the kernel's when present. So regions stay in memory until then.
        if region.backing is None and not self.broken:
            self._to_file_or_give_up(region)

    def piece(self, region: Region, lo: int, hi: int) -> Region:
        copy = region.piece(lo, hi)
        if region.backing is not None and not self.broken:
            self._to_file_or_give_up(copy)
        return copy

    def _to_file_or_give_up(self, region: Region) -> None:
        """A table with a swapped page missing from its files would serve
        that page as zeros after a restart: when a file cannot be made (a
        full disk, no descriptor left), the target's record goes, so that a
        restarted daemon refuses to take it back (its shim then kills it),
        and paging goes on in memory."""
        try:
            self._to_file(region)
        except OSError as exc:
            self.broken = True
            log.warning("%s: its page table cannot be saved any more (%s); it cannot be taken back after a "
                        "daemon crash", self.label or "a target", exc.strerror or exc)
            try:
                os.unlink(RECORD, dir_fd=self.dir_fd)
            except OSError:
                pass

    def moved(self, region: Region, vpn: int) -> None:
        if region.backing is not None:   # (where from first: recovery._remap)
            region.backing.header[4] = region.vpn + 1
            region.backing.header[1] = vpn
        region.vpn = vpn

    def drop(self, region: Region) -> None:
        if region.backing is None:
            return
        try:
            os.unlink(region.backing.name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass

    # ---- loading ---------------------------------------------------------------
    def load(self) -> PageTable:
        """The table these files hold; overlaps resolved newest first,
        unreadable files removed."""
        found = []
        for name in os.listdir(self.dir_fd):
            if not name.startswith(PREFIX):
                continue
            region = self._open(name)
            if region is None:
                os.unlink(name, dir_fd=self.dir_fd)
            else:
                found.append(region)
        found.sort(key=lambda r: -r.backing.generation)
        table = PageTable(arrays=self)
        for region in found:
            gaps = table.gaps(region.vpn, region.end)
            if gaps != [(region.vpn, region.end)]:
                for lo, hi in gaps:   # a crash during a cut: keep what no newer piece covers
                    table.regions.append(self.piece(region, lo, hi))
                self.drop(region)
            else:
                table.regions.append(region)
            table.regions.sort(key=lambda r: r.vpn)
        table.layout += 1   # (regions added here, not through add())
        self._last_generation = max([self._last_generation] + [r.backing.generation for r in found])
        table.recount()
        return table

    def _open(self, name: str) -> Region | None:
        """The region the file holds; None for one whose header was never
        written (a crash cut it short: it holds nothing). Raises ValueError
        for a file of another format, or damaged, and OSError for one that
        cannot be read: a table without one of its files would serve its
        swapped pages as zeros."""
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                return None
            head = np.frombuffer(os.pread(fd, 32, 0), np.int64)
            magic, vpn, npages, generation = (int(x) for x in head)
            if magic == 0:
                return None
            if magic != MAGIC:
                raise ValueError(f"{name}: not a page table file of this umgr (magic {magic & (2**64 - 1):#x})")
            if npages <= 0 or size != _file_size(npages) or vpn < 0:
                raise ValueError(f"{name}: a damaged header ({npages} pages at vpn {vpn:#x}, {size} bytes)")
            header, state, slot = _map(fd, npages)
        finally:
            os.close(fd)
        return Region(vpn, state, slot, backing=FileBacking(name, header, generation, self.dir_fd))


def remove_all(dir_fd: int) -> None:
    """Unlink every file of a table's directory."""
    for name in os.listdir(dir_fd):
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError as exc:
            log.warning("cannot remove %s of a saved page table: %s", name, exc.strerror)


# ---- the events a daemon read and had not yet applied ----------------------------------
JOURNAL = "events"


class EventJournal:
    """A target's uffd messages are read straight into this shared file
    mapping (Userfaultfd.read_into), and zeroed once handled. The kernel
    hands a REMOVE, UNMAP or REMAP over at read(): the app's madvise, munmap
    or mremap returns then. A daemon killed between that read and the
    table's update leaves the message here, and a restarted daemon applies
    it (umgr/paging/recovery.py, replay) before trusting the table: else a
    discarded page would come back with its old bytes, or a moved one be
    lost."""

    def __init__(self, dir_fd: int, messages: int, create: bool):
        self.messages = messages
        self.size = messages * MESSAGE_BYTES
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(JOURNAL, flags, 0o600, dir_fd=dir_fd)
        try:
            if create:
                reserve(fd, self.size)
            elif os.fstat(fd).st_size != self.size:
                raise ValueError(f"{JOURNAL}: {os.fstat(fd).st_size} bytes, not {self.size}")
            memory = map_shared(fd, self.size)
        finally:
            os.close(fd)
        self.address = ctypes.addressof(memory)
        self.words = np.frombuffer(memory, np.uint64)   # four words a message (struct uffd_msg); keeps the mapping

    def unhandled(self) -> np.ndarray:
        """The messages left (rows of four words), in the order read."""
        rows = self.words.reshape(-1, 4)
        return rows[(rows[:, 0] & 0xFF) != 0].copy()

    def clear(self) -> None:
        self.words[:] = 0


MESSAGE_BYTES = 32   # struct uffd_msg
