"""Array helpers for the daemon's hot paths, and its per-page arrays.

`unique` stands in for np.unique on integer arrays. Since numpy 2.3,
np.unique of integers (without return_index and the like) goes through a
hash set that mallocs one node per distinct value: 57 us for 512 values
where a sort does it in 16, and 153 ms for 262k values (a 1 GiB target's
slots freed at its exit) where a sort takes 4.7 ms. The nodes, freed,
stay in glibc's free lists: 44 bytes per value of the largest call, kept
in the daemon's resident memory for good (measured with numpy 2.4.6).
"""
from __future__ import annotations

import contextlib
import mmap

import numpy as np

# Arrays from this size on come from a mapping of their own (sparse_zeros):
# below, an array is at most this much whatever backs it. (numpy asks for
# huge pages from 4 MiB on; transparent_hugepage=always gives them from 2.)
SPARSE_BYTES = 1 << 20


def unique(values: np.ndarray) -> np.ndarray:
    """The distinct values, sorted (np.unique's answer), by a sort."""
    ordered = np.sort(np.asarray(values).ravel())
    if len(ordered) < 2:
        return ordered
    first = np.empty(len(ordered), bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


def unique_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values, sorted, and how many times each comes, by a sort."""
    ordered = np.sort(np.asarray(values).ravel())
    if len(ordered) == 0:
        return ordered, np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    return ordered[starts], np.diff(np.append(starts, len(ordered)))


def union(these: np.ndarray, those: np.ndarray) -> np.ndarray:
    """np.union1d by a sort."""
    return unique(np.concatenate((np.asarray(these).ravel(), np.asarray(those).ravel())))


def merged_ranges(ranges) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) ranges sorted, overlapping and touching ones joined: their
    los and his (int64)."""
    bounds = np.array(sorted(ranges), np.int64).reshape(-1, 2)
    if not len(bounds):
        return bounds[:, 0], bounds[:, 1]
    his = np.maximum.accumulate(bounds[:, 1])
    # (a range starts a new run where it begins past every earlier range's end)
    starts = np.concatenate(([True], bounds[1:, 0] > his[:-1]))
    ends = np.concatenate((starts[1:], [True]))
    return bounds[starts, 0], his[ends]


def sparse_zeros(n: int, dtype) -> np.ndarray:
    """n zeros that take memory only where they are written, 4 KiB at a
    time: a page table's arrays, sized by a region's virtual size, of which
    a program may touch one page in thousands (a reservation of many GiB).
    np.zeros gives large arrays memory the kernel backs with 2 MiB huge
    pages: numpy asks for them (MADV_HUGEPAGE, from 4 MiB on), which
    transparent_hugepage=madvise honours, and =always gives them to any
    large mapping. One write then backs 2 MiB. Measured: a program touching
    one page every 64 MiB of a 64 GiB mapping cost the daemon 78-95 MB.
    Here a large array is a private anonymous mapping of its own with
    MADV_NOHUGEPAGE (it lives as long as the array does); a small one is
    np.zeros, and so is a large one the mapping cannot be had for (ENOMEM:
    the commit limit, RLIMIT_AS, vm.max_map_count; the heap may still have
    room, as before)."""
    dtype = np.dtype(dtype)
    nbytes = n * dtype.itemsize
    if nbytes < SPARSE_BYTES:
        return np.zeros(n, dtype)
    try:
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return np.zeros(n, dtype)
    # EINVAL on a kernel without transparent huge pages (PREEMPT_RT ones):
    # none to keep out.
    with contextlib.suppress(OSError):
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype, n)
