"""Finding a target's anonymous memory in /proc/PID/maps.

The shim sees the mappings the app makes through mmap(), but not all of
them: glibc's malloc maps large blocks through an internal alias of mmap,
the main heap grows with brk, and some mappings predate the shim. The daemon
registers those itself (uffd ioctls act on the target's mm from any
process), so it looks for private, writable, anonymous mappings here.
"""
from __future__ import annotations

from typing import Iterator

SKIPPED_NAMES = ("[stack]", "[vvar]", "[vdso]", "[vsyscall]", "[vvar_vclock]", "[uprobes]")


def anonymous_private(pid: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each private, read-write, anonymous mapping:
    candidates for registration."""
    with open(f"/proc/{pid}/maps", "rb") as f:
        text = f.read().decode("ascii", "replace")
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        span, perms, _offset, _dev, inode = fields[:5]
        name = fields[5].strip() if len(fields) > 5 else ""
        if perms[:2] != "rw" or perms[3] != "p" or inode != "0":
            continue
        if name and (name in SKIPPED_NAMES or not (name == "[heap]" or name.startswith("[anon:"))):
            continue
        lo, hi = (int(x, 16) for x in span.split("-"))
        yield lo, hi


def locked_ranges(pid: int) -> list[tuple[int, int]]:
    """(start, end) of each mlocked mapping ("lo" in VmFlags of
    /proc/PID/smaps). MADV_DONTNEED refuses these (EINVAL), so umgr never
    evicts them. smaps walks the page tables: read it rarely."""
    return [span for span, flags in _smaps_flags(pid) if "lo" in flags]


def registered_and_wiped(pid: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(start, end) of every mapping registered for missing-page userfaults
    ("um" in VmFlags of /proc/PID/smaps), and of those also marked
    MADV_WIPEONFORK ("wf"): a forked child's managed memory as the kernel
    made it. It lacks the parent's MADV_DONTFORK mappings (what the child
    mapped since in their place is not registered), and its WIPEONFORK
    ones are empty, still registered on its uffd."""
    registered = [(span, flags) for span, flags in _smaps_flags(pid) if "um" in flags]
    return [span for span, _ in registered], [span for span, flags in registered if "wf" in flags]


def _smaps_flags(pid: int) -> list[tuple[tuple[int, int], list[str]]]:
    """Each mapping of /proc/PID/smaps and its VmFlags."""
    mappings = []
    span = None
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for line in f.read().decode("ascii", "replace").splitlines():
            head = line.split(maxsplit=1)[0] if line else ""
            if "-" in head and ":" not in head:
                span = tuple(int(x, 16) for x in head.split("-"))
            elif head == "VmFlags:" and span is not None:
                mappings.append((span, line.split()[1:]))
                span = None
    return mappings


def unreadable_ranges(pid: int) -> list[tuple[int, int]]:
    """(start, end) of each mapping the process cannot read (PROT_NONE,
    write-only): process_vm_readv fails there, so umgr cannot evict it."""
    with open(f"/proc/{pid}/maps", "rb") as f:
        text = f.read().decode("ascii", "replace")
    ranges = []
    for line in text.splitlines():
        fields = line.split(maxsplit=2)
        if len(fields) >= 2 and fields[1][0] != "r":
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges
