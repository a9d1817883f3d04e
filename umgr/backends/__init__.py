"""Swap backends: where evicted pages live.

A backend is two batch methods: `write(slots, addrs)` stores the page at
each address `addrs[i]` in `slots[i]`, `read(slots, addrs)` brings them
back (umap's Store has the same shape). Slot numbers come from the backend's
SlotAllocator, which the daemon uses directly. A backend raises BackendError
when I/O fails; the daemon then keeps the pages resident, and a read that
fails kills the target whose fault it was: a page is never served wrong.

Backends can be stacked (umgr.backends.tiered): a memory tier in front of a
store that holds every slot, as zswap sits in front of a swap device. Each
backend reports its capacity, what it holds and what its reads cost
(`tier_statistics`). Backends are found through the entry-point group
`umgr.backends` and chosen with `--backend NAME[:key=value,...]` (given
twice or more: a chain, fastest first). Adding one: subclass Backend,
take `size` (bytes) in the constructor, implement the two methods,
register it in the group, and add it to tests/test_backend_conformance.py
(ExampleStore there is one, as the README describes).
"""
from __future__ import annotations

import bisect
import inspect
import time
from dataclasses import dataclass
from importlib.metadata import entry_points

import numpy as np
import trio

from umgr.backends.slots import SlotAllocator
from umgr.kernel import PAGE_SIZE

IO_BUCKETS = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 200e-3, 1.0)
SLOW_READ = 500e-6   # a one-page read slower than this counts as slow (ReadsDone.slow)
DEFAULT_SIZE = 4 << 30   # a store's slots when --swap-size says nothing (the file store: less on a small disk)


@dataclass(frozen=True)
class ReadsDone:
    """One-page reads of a store (or of one tier of it) done outside
    read(), by the fault path's C call: counted there, told here."""
    pages: int
    seconds: float          # summed
    slow: int               # of them, slower than SLOW_READ
    buckets: np.ndarray     # how many fell in each IO_BUCKETS bucket (io_latency's shape)


NO_READS = ReadsDone(0, 0.0, 0, np.zeros(len(IO_BUCKETS) + 1, np.int64))


class Backend:
    name = "abstract"
    # Every page it holds is in the daemon's memory (a fault on one waits on
    # no device): the fault path may then serve beside a program kept on one
    # CPU (umgr/paging/fastpath.py, FastPath.colocated). A chain is not.
    in_memory = False

    def __init__(self, capacity_pages: int = 0, *, slots: SlotAllocator | None = None):
        """A store of capacity_pages slots, or one that uses `slots` (a chain's)."""
        self.slots = slots if slots is not None else SlotAllocator(capacity_pages)
        if slots is None and type(self).release is not Backend.release:
            self.slots.on_free = self.release   # its own slots: it hears of those freed
        self.pages_written = 0
        self.pages_read = 0
        self.errors = 0
        self.io_latency = np.zeros(len(IO_BUCKETS) + 1, np.int64)  # batches per bucket
        self.io_seconds = 0.0
        self.read_seconds = 0.0        # time spent in reads, for the mean cost of a page read

    async def write(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        """Store the page at addrs[i] (the daemon's memory) in slots[i];
        count them in pages_written."""
        raise NotImplementedError

    async def read(self, slots: np.ndarray, addrs: np.ndarray) -> None:
        """Put slots[i]'s page at addrs[i]; count them in pages_read."""
        raise NotImplementedError

    def release(self, slots: np.ndarray) -> None:
        """These slots were freed: a store holding pages in memory drops them."""

    def close(self) -> None:
        pass

    def slots_adopted(self) -> None:
        """A restarted daemon adopted its saved tables' slots (self.slots):
        a store may let go of what no slot in use names."""

    def remove(self) -> None:
        """A clean stop of a store that outlives its daemon: nothing will
        come back for what it holds."""

    # Reads done outside read(): the fault path's C call (umgr/paging/fastpath.py)
    # reads a page itself where the store says how, and reports it after.
    def sync_read_fd(self) -> int:
        """A file whose page at offset slot * PAGE_SIZE is slot's content
        (unless memory_entries() holds the slot), for a one-page pread;
        -1 when this store has none, or when reads should go through read() now."""
        return -1

    def memory_entries(self) -> tuple[np.ndarray, np.ndarray, int] | None:
        """A memory tier's pages, per slot, as C unpacks them
        (bindings/cffi/_cdef_fastfault.py, struct umgr_fast_store): the
        length of each entry (int32; 0: not held here), its word or offset
        (uint64), and the address its offsets count from. The arrays stay
        the same for the store's life and are updated whenever an entry is
        stored or dropped. None: no such tier."""
        return None

    def reads_done_elsewhere(self, file: ReadsDone, memory: ReadsDone) -> None:
        """Pages were read from sync_read_fd() (`file`) and unpacked from
        memory_entries() (`memory`)."""
        raise NotImplementedError

    def _count_reads(self, done: ReadsDone) -> None:
        """Reads done elsewhere join this store's counts."""
        self.pages_read += done.pages
        self.read_seconds += done.seconds
        self.io_seconds += done.seconds
        self.io_latency += done.buckets

    def _timed(self, started: float) -> float:
        """Account an I/O that began at `started`; returns its seconds."""
        elapsed = time.perf_counter() - started
        self._count_io(elapsed)
        return elapsed

    def _count_io(self, elapsed: float) -> None:
        self.io_latency[bisect.bisect_left(IO_BUCKETS, elapsed)] += 1   # as np.searchsorted, without its per-call cost
        self.io_seconds += elapsed

    def statistics(self) -> dict:
        return {
            "backend": self.name,
            "capacity_pages": self.slots.capacity,
            "used_pages": self.slots.used,
            "pages_written": self.pages_written,
            "pages_read": self.pages_read,
            "errors": self.errors,
            "tiers": _named_apart(self.tier_statistics()),
        }

    def tier_statistics(self) -> list[dict]:
        """One dict per tier, fastest first: what it can hold and holds
        (bytes of its own medium), and what a page read costs it."""
        return [{
            "tier": self.name,
            "capacity_bytes": self.slots.capacity * PAGE_SIZE,
            "used_bytes": self.slots.used * PAGE_SIZE,
            "pages": self.slots.used,
            "pages_written": self.pages_written,
            "pages_read": self.pages_read,
            "read_seconds_per_page": self.read_seconds / self.pages_read if self.pages_read else 0.0,
        }]


def io_runs(slots: np.ndarray, addrs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pages with consecutive slots and consecutive addresses form one I/O:
    returns (address, first slot, pages) per run."""
    slots = np.asarray(slots, np.int64)
    addrs = np.asarray(addrs, np.uint64)
    if len(slots) == 0:
        empty = np.empty(0, np.int64)
        return empty.astype(np.uint64), empty, empty
    contiguous = (np.diff(slots) == 1) & (np.diff(addrs.astype(np.int64)) == PAGE_SIZE)
    first = np.concatenate(([0], np.flatnonzero(~contiguous) + 1))
    count = np.diff(np.concatenate((first, [len(slots)])))
    return addrs[first], slots[first], count


def _named_apart(tiers: list[dict]) -> list[dict]:
    """Tiers of one store named twice in a chain (two compressed tiers)
    told apart: "compressed", then "compressed#2", as each tier's metric
    series and status line are named by it."""
    seen: dict[str, int] = {}
    for tier in tiers:
        name = tier["tier"]
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            tier["tier"] = f"{name}#{seen[name]}"
    return tiers


ENTRY_POINT_GROUP = "umgr.backends"


def available_backends() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """'compressed:cap=256M,level=1' -> ('compressed', {'cap': '256M', 'level': '1'})."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"backend option {item!r} in {spec!r} is not key=value")
        options[key.strip()] = value.strip()
    return name.strip(), options


def backend_class(name: str) -> type:
    found = available_backends()
    if name not in found:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(found)) or 'none'}")
    return found[name].load()


# Options a store takes to outlive its daemon for a restart: a named swap
# file (file), a kept key prefix (redis); and a memory store's, a memfd
# someone else holds for it (compressed: umgr exec, or systemd for umgr daemon).
PERSISTENCE_OPTIONS = ("swap_name", "instance")
HELD_MEMORY_OPTION = "region_fd"
# Set by umgr for a restart, never by a --backend spec: a descriptor
# number, or "take over what is there".
INTERNAL_OPTIONS = (HELD_MEMORY_OPTION, "reuse")


def persists(specs: list[str], memory_held: bool = False) -> bool:
    """Whether a daemon with these --backend specs can save its state:
    every store of the chain can outlive it. A store in the daemon's
    memory can only where another process holds that memory for it
    (`memory_held`: umgr exec's parent, or systemd's descriptor store
    for umgr daemon; one such store)."""
    held = memory_stores(specs)
    if held and (not memory_held or len(held) > 1):
        return False
    return all(spec in held or any(takes(spec, option) for option in PERSISTENCE_OPTIONS) for spec in specs)


def memory_stores(specs: list[str]) -> list[str]:
    """The specs of the chain's stores that keep their pages in the
    daemon's memory (a memfd another process may hold: HELD_MEMORY_OPTION)."""
    return [spec for spec in specs if takes(spec, HELD_MEMORY_OPTION)]


def chain_identity(specs: list[str], parse_value) -> str:
    """What a restarted daemon's chain must match to take over the stores
    a dead one saved its tables with: their names, in order. Options do
    not count: sizes come from what is found (the swap file, the
    compressed region's header), and each compressed entry names its own
    codec. Raises ValueError for a spec that names no backend or has a bad
    option or value: a chain that cannot open."""
    return " + ".join(checked_spec(spec, parse_value)[0] for spec in specs)


# Options whose value is not shown (logs, `umgr status`, systemd's STATUS=).
SECRET_OPTIONS = ("password",)


def shown(spec: str) -> str:
    """A --backend spec as it may be shown: secret options' values hidden."""
    try:
        name, given = parse_spec(spec)
    except ValueError:
        return spec
    if not set(given) & set(SECRET_OPTIONS):
        return spec
    return name + ":" + ",".join(f"{key}={'***' if key in SECRET_OPTIONS else value}" for key, value in given.items())


def takes(spec: str, option: str) -> bool:
    """Whether the backend a --backend spec names takes this option."""
    try:
        return option in inspect.signature(backend_class(parse_spec(spec)[0])).parameters
    except ValueError:
        return False


def open_backend(name: str, **options) -> Backend:
    """The backend registered as `name`, built with those of `options` its
    constructor takes (a backend without a directory ignores --state-dir).
    Without a size (no --swap-size: each store's own default), one whose
    constructor has none for it gets DEFAULT_SIZE."""
    cls = backend_class(name)
    accepted = inspect.signature(cls).parameters
    size = accepted.get("size")
    if size is not None and "size" not in options and size.default is inspect.Parameter.empty:
        options["size"] = DEFAULT_SIZE
    return cls(**{key: value for key, value in options.items() if key in accepted})


def checked_spec(spec: str, parse_value) -> tuple[str, dict]:
    """A --backend spec's backend name and its options, converted with
    parse_value(key, text). Raises ValueError with a one-line reason: no
    such backend, an option it does not take or that umgr sets itself, a
    value that cannot be read."""
    name, given = parse_spec(spec)
    accepted = inspect.signature(backend_class(name)).parameters
    internal = sorted(set(given) & set(INTERNAL_OPTIONS))
    if internal:
        raise ValueError(f"backend option {internal[0]!r} is set by umgr itself, not in --backend")
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        settable = [option for option in accepted if option not in INTERNAL_OPTIONS]
        raise ValueError(f"backend {name!r} has no option {unknown[0]!r}; it takes: {', '.join(settable) or 'none'}")
    return name, {key: parse_value(key, value) for key, value in given.items()}


def open_chain(specs: list[str], defaults: dict, parse_value) -> Backend:
    """Backends from `--backend` specs, fastest first, stacked into one
    chain. `defaults` apply where a spec says nothing; a spec's own options
    are converted with parse_value(key, text) and must be ones its backend
    takes. Raises ValueError with a one-line reason."""
    from umgr.backends.tiered import Tiered
    opened: list[Backend] = []
    try:
        for spec in specs:
            name, options = checked_spec(spec, parse_value)
            opened.append(open_backend(name, **{**defaults, **options}))
        chain = opened[-1]
        for upper in reversed(opened[:-1]):
            chain = Tiered(upper, chain)
        return chain
    except BaseException:
        for backend in opened:
            backend.close()
        raise


async def io_to_the_end(operation, slots: np.ndarray, addrs: np.ndarray) -> None:
    """Backend I/O, shielded from cancellation (the target going away): a
    request abandoned in flight could still land in a slot or a buffer
    reused since. A batch takes milliseconds."""
    with trio.CancelScope(shield=True):
        await operation(slots, addrs)
