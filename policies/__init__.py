"""Prefetch and eviction policies: page numbers in, page numbers out.

A policy never sees the kernel. It is told which virtual page numbers
(vpn = address >> 12) faulted or became resident and answers with vpns, so any
policy can be replayed offline against a recorded fault trace (see
``umgr.policies.replay``).

Hooks are optional no-ops, as in trio's ``Instrument``; the daemon calls every
hook declared here, so a live run and an offline replay see the same calls
(as far as umgr can see them: see ``on_prefetch_hit``). The daemon never calls a
policy directly: it wraps it in ``GuardedPrefetch`` / ``GuardedEviction``, which
validate the output and, when a hook raises, log once and carry on without it,
because a buggy policy must never stop faults from being served.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import logging
import operator
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from umgr.arrays import unique

__all__ = [
    "PrefetchPolicy",
    "EvictionPolicy",
    "GuardedPrefetch",
    "GuardedEviction",
    "load_prefetch",
    "load_eviction",
    "parse_spec",
    "parse_options",
    "installed",
    "ENTRY_POINT_GROUP",
    "NO_PAGES",
    "CLUSTER_SIZES",
]

logger = logging.getLogger("umgr.policy")

ENTRY_POINT_GROUP = "umgr.policies"

_EMPTY = np.empty(0, dtype=np.int64)
_EMPTY.flags.writeable = False
NO_PAGES = _EMPTY   # a policy's "nothing", shared: most faults of a random workload return it
CLUSTER_SIZES = (0, 2, 4, 8)   # what PrefetchPolicy.cluster may be (8: the fast path's group of pages)
FRESH_WINDOW_MAX = 128         # what PrefetchPolicy.fresh_window is clipped to (the fast path's UMGR_FILL_MAX)


class PrefetchPolicy:
    """Decides which extra pages to bring in on a MISSING fault."""

    name = "base"
    # Pages of a lone fault's aligned block (a power of 2, at most 8; 0:
    # none) that the C fast path brings with it, of those that went out
    # with it, while such pages are seen written more often than the pages
    # they push out are wanted back. No hook is called as they come: it is
    # done in C, before the policy hears of the fault (readahead.py says
    # more); a first write to one is an on_prefetch_hit, as the pages it asks
    # for.
    cluster = 0
    # Fresh pages (never written: zeros) that the C fast path brings ahead
    # of a first write going up, at most (it clips this to 128; 0: none):
    # 16 after a write fault on the page after one it served, twice as many
    # each time the writes reach the page after them. The policy hears
    # neither of these pages nor of the fault that brought them (its window
    # is in already: readahead.py says more); of the other faults, after.
    fresh_window = 0

    def on_fault(self, vpn: int, region_start: int, region_end: int) -> Sequence[int] | np.ndarray:
        """A MISSING fault on ``vpn`` (swapped or fresh) inside the mapping
        ``[region_start, region_end)``. Return extra vpns to bring in with it,
        most wanted first; the caller drops resident and out-of-region pages."""
        return ()

    def on_prefetch_hit(self, vpn: int) -> None:
        """A page this policy asked for (or its ``cluster`` brought) was
        later used (optional feedback).
        Live, umgr sees a use only when it faults: the first write to a page
        prefetched write-protected (``--keep-clean``). Reads of a mapped page
        are invisible to it; an offline replay sees every access."""


class EvictionPolicy:
    """Orders resident pages for eviction."""

    name = "base"

    def attach(self, is_live: Callable[[np.ndarray], np.ndarray]) -> None:
        """Called once, before any other hook, with a vectorised test of
        which vpns (any order) are resident now: a lazy policy may use it to
        drop stale entries in bulk."""

    def on_refault(self, vpns: np.ndarray, distances: np.ndarray) -> None:
        """These pages faulted back in from swap (an on_resident for them
        follows). ``distances[i]``: how many pages the target evicted
        between that page's eviction and now, its refault distance; one
        smaller than the resident set means FIFO threw out a page in use."""

    def on_resident(self, vpns: np.ndarray) -> None:
        """These pages became resident, in fault order."""

    def on_removed(self, vpns: np.ndarray) -> None:
        """These pages left the resident set (evicted, unmapped, discarded
        by the app, moved away by mremap, pinned). Lazy policies ignore it
        and rely on the caller skipping stale candidates."""

    def choose(self, n: int) -> np.ndarray:
        """Up to ``n`` victim candidates (int64 vpns), possibly stale. An entry
        is returned at most once unless it is re-added by ``on_resident``."""
        return _EMPTY

    def __len__(self) -> int:
        """How many entries it holds, stale ones included: the daemon asks
        choose() only while this is above 0 (a policy that does not say is
        asked every time)."""
        return 0


# Built-ins load by name without installation metadata; the entry-point group
# is for third-party policies. Values are "module:attribute" relative to this
# package, imported on first use.
_BUILTIN_PREFETCH = {
    "none": ".none:NoPrefetch",
    "readahead": ".readahead:Readahead",
    "stride": ".stride:Stride",
}
_BUILTIN_EVICTION = {
    "fifo": ".fifo:FifoEviction",
    "reuse": ".reuse:ReuseEviction",
}


def _resolve(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module, __name__), attr)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


# Plug-ins found by name: every target loads its policies, and a look
# through the installed packages' entry points takes milliseconds. (A name
# not found is looked for again each time: a plug-in installed since counts;
# one uninstalled after it loaded goes on loading until the daemon restarts.)
_plugins: dict[str, Callable] = {}


def _load(name: str, options: dict, builtins: dict[str, str], others: dict[str, str], base: type, kind: str):
    if name in builtins:
        factory = _resolve(builtins[name])
    elif name in _plugins:
        factory = _plugins[name]
    else:
        # One group holds both kinds (the installed package itself declares its
        # built-ins there too); a third-party entry is told apart by its class.
        eps = {n: ep for n, ep in _entry_points().items() if n not in others}
        if name not in eps:
            available = sorted(set(builtins) | set(eps))
            raise ValueError(f"unknown {kind} policy {name!r}; available: {', '.join(available)}")
        factory = _plugins[name] = eps[name].load()
    _check_options(name, factory, options)
    policy = factory(**options)
    if not isinstance(policy, base):
        raise ValueError(f"{name!r} made a {type(policy).__name__}, not a {base.__name__}")
    return policy


def _check_options(name: str, factory, options: dict) -> None:
    """A clear error for an option the policy does not take, or a value of
    another kind than its default (a number, true or false): not the
    TypeError the policy would raise somewhere inside."""
    params = _parameters(factory)
    if params is None or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return   # (no signature to check against: the policy checks its own)
    settable = [p.name for p in params.values() if p.default is not p.empty and p.default is not None]
    for key, value in options.items():
        if key not in settable:   # (nor a hook such as is_live=None: the daemon's to set)
            raise ValueError(f"policy {name!r} has no option {key!r}; it takes: {', '.join(settable) or 'none'}")
        default = params[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"policy {name!r} option {key}: {value!r} is not true or false")
        elif isinstance(default, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"policy {name!r} option {key}: {value!r} is not a number")
        elif isinstance(default, int) and not isinstance(value, int):
            raise ValueError(f"policy {name!r} option {key}: {value!r} is not a whole number")


def _parameters(factory):
    """The factory's parameters, or None if it shows no signature. Kept
    per factory (a class, a function): every target loads its policies,
    and reading a signature took 6-7% of the daemon's CPU for a process
    that forks and exits. A factory that cannot be a dict key (a callable
    instance without __hash__) is read each time."""
    try:
        return _kept_parameters(factory)
    except TypeError:   # unhashable
        return _read_parameters(factory)


def _read_parameters(factory):
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None


_kept_parameters = functools.lru_cache(maxsize=64)(_read_parameters)


def load_prefetch(name: str, **options) -> PrefetchPolicy:
    """A prefetch policy by name: built-ins first, then the entry-point group."""
    return _load(name, options, _BUILTIN_PREFETCH, _BUILTIN_EVICTION, PrefetchPolicy, "prefetch")


def load_eviction(name: str, **options) -> EvictionPolicy:
    """An eviction policy by name: built-ins first, then the entry-point group."""
    return _load(name, options, _BUILTIN_EVICTION, _BUILTIN_PREFETCH, EvictionPolicy, "eviction")


def parse_options(pairs: Sequence[str]) -> dict:
    """["maximum=32", "aggressive=true"] -> {"maximum": 32, "aggressive": True}:
    integers, then floats, then true/false, else the text."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"policy option {pair!r} is not KEY=VALUE")
        options[key.strip()] = _option_value(text.strip())
    return options


def _option_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_spec(spec: str) -> tuple[str, dict]:
    """"readahead:maximum=32,initial=8" -> ("readahead", {"maximum": 32, "initial": 8})."""
    name, _, rest = spec.partition(":")
    if not name:
        raise ValueError(f"no policy name in {spec!r}")
    return name, parse_options([p for p in rest.split(",") if p]) if rest else {}


def installed() -> list[tuple[str, str, str, str]]:
    """Every policy that loads by name, built-in or from the entry-point
    group, as (name, "prefetch" or "eviction", where it comes from, its
    options with their defaults and the first line of its doc); one that
    does not load says why in the last field."""

    found = {}
    for name, spec in {**_BUILTIN_PREFETCH, **_BUILTIN_EVICTION}.items():
        found[name] = ("umgr", lambda spec=spec: _resolve(spec))
    for name, ep in _entry_points().items():
        if name not in found:
            found[name] = (ep.dist.name if ep.dist else ep.value, ep.load)
    rows = []
    for name, (origin, load) in sorted(found.items()):
        try:
            factory = load()
            kind = ("prefetch" if issubclass(factory, PrefetchPolicy)
                    else "eviction" if issubclass(factory, EvictionPolicy) else "?")
            # Options a user can set: those with a plain default (not a hook such as is_live=None).
            options = ", ".join(f"{p.name}={p.default!r}" for p in inspect.signature(factory).parameters.values()
                                if p.default is not inspect.Parameter.empty and p.default is not None)
            doc = factory.__doc__ or inspect.getmodule(factory).__doc__ or ""
            summary = doc.strip().split("\n")[0]
            rows.append((name, kind, origin, f"{options}  {summary}".strip() if options else summary))
        except Exception as exc:  # a broken plug-in is listed, not fatal
            rows.append((name, "?", origin, f"does not load: {exc}"))
    return rows


def _as_vpns(result) -> np.ndarray:
    """A policy's answer as a 1-D int64 array; anything but integers is a bug."""
    if result is None or result is _EMPTY or (type(result) in (tuple, list) and not result):
        return _EMPTY
    arr = np.asarray(result)
    if arr.size == 0:
        return _EMPTY
    if arr.dtype.kind not in "iu":
        if isinstance(result, np.ndarray):
            raise TypeError(f"policy returned {arr.dtype} values, expected integer vpns")
        # A sequence numpy could not type as integers, such as a mix of int32
        # and uint64 (promoted to float64): check each item is an integer.
        arr = np.fromiter((operator.index(x) for x in result), dtype=np.int64)
    return arr.astype(np.int64, copy=False).ravel()


def _first_unique(arr: np.ndarray) -> np.ndarray:
    """Duplicates removed, first occurrence kept, original order."""
    if (arr[1:] > arr[:-1]).all():   # ascending already (a readahead window, a FIFO's run): no sort
        return arr
    _, first = np.unique(arr, return_index=True)
    return arr[np.sort(first)]


class GuardedPrefetch:
    """Runs a prefetch policy so that it can neither stop nor corrupt paging.

    If a hook raises, or returns something other than integers, the policy is
    disabled (logged once, with the target label) and ``on_fault`` returns an
    empty array from then on. Output is clipped to the region, stripped of the
    faulting page and of duplicates, capped at ``max_pages`` keeping the
    policy's first choices, and returned sorted as int64.
    """

    def __init__(self, policy: PrefetchPolicy, target: str = "?", max_pages: int = 256, loaded_as: str = ""):
        """``loaded_as``: the name the policy was loaded by (a plug-in's
        entry-point name), which a forked child's target loads again."""
        self.policy = policy
        self.target = target
        self.max_pages = max_pages
        self.loaded_as = loaded_as
        self.disabled = False

    @property
    def name(self) -> str:
        return self.loaded_as or getattr(self.policy, "name", type(self.policy).__name__)

    @property
    def cluster(self) -> int:
        """The policy's ``cluster``, if it is one the fast path can do, else 0."""
        pages = getattr(self.policy, "cluster", 0)
        return pages if pages in CLUSTER_SIZES and not self.disabled else 0

    @property
    def fresh_window(self) -> int:
        """The policy's ``fresh_window``, clipped to FRESH_WINDOW_MAX (0 if
        it is not a whole number of pages, or the policy was disabled)."""
        try:
            pages = operator.index(getattr(self.policy, "fresh_window", 0))
        except TypeError:
            return 0
        return min(pages, FRESH_WINDOW_MAX) if pages > 0 and not self.disabled else 0

    def _disable(self, hook: str) -> None:
        self.disabled = True
        logger.exception(
            "target %s: prefetch policy %r raised in %s; disabled, faults are served without prefetch",
            self.target, self.name, hook,
        )

    def on_fault(self, vpn: int, region_start: int, region_end: int) -> np.ndarray:
        if self.disabled:
            return _EMPTY
        vpn, region_start, region_end = int(vpn), int(region_start), int(region_end)
        try:
            pages = _as_vpns(self.policy.on_fault(vpn, region_start, region_end))
        except Exception:
            self._disable("on_fault")
            return _EMPTY
        return self._clip(vpn, region_start, region_end, pages)

    def on_faults(self, faults: Iterable[tuple[int, int, int]]) -> list[tuple[int, np.ndarray]]:
        """on_fault() for each (vpn, region_start, region_end) of Python
        ints, in order; returns (vpn, pages) for the faults that asked for
        pages. One call for all the faults a C call served: most of them
        (random access) ask for nothing, and a call of on_fault() each cost
        more than the policy's own work."""
        windows: list[tuple[int, np.ndarray]] = []
        if self.disabled:
            return windows
        on_fault = self.policy.on_fault
        try:
            for vpn, region_start, region_end in faults:
                answer = on_fault(vpn, region_start, region_end)
                if answer is _EMPTY or answer is None:
                    continue
                pages = self._clip(vpn, region_start, region_end, _as_vpns(answer))
                if pages.size:
                    windows.append((vpn, pages))
        except Exception:
            self._disable("on_fault")   # (the windows asked for before it still come in)
        return windows

    def _clip(self, vpn: int, region_start: int, region_end: int, pages: np.ndarray) -> np.ndarray:
        """A policy's answer for a fault on `vpn`, made what the daemon may use."""
        if pages.size == 0:   # most faults of a random workload: skip the clipping
            return _EMPTY
        pages = pages[(pages >= region_start) & (pages < region_end) & (pages != vpn)]
        if pages.size > 1:
            pages = _first_unique(pages)[: self.max_pages]
            pages.sort()
        return pages

    def on_prefetch_hit(self, vpn: int) -> None:
        if self.disabled:
            return
        try:
            self.policy.on_prefetch_hit(int(vpn))
        except Exception:
            self._disable("on_prefetch_hit")


class GuardedEviction:
    """Runs an eviction policy; if a hook raises, falls back to FIFO.

    The fallback FIFO knows nothing of the pages resident so far, so pass
    ``resident``: a callable returning the currently resident vpns (from the
    page table) to seed it. Without it the fallback fills from later faults.
    ``choose`` output is made int64, de-duplicated and capped at ``n``
    (the policy's first ``n`` if it gave more; sorted if it gave no more).
    """

    def __init__(
        self,
        policy: EvictionPolicy,
        target: str = "?",
        resident: Callable[[], np.ndarray] | None = None,
    ):
        self.policy = policy
        self.target = target
        self.resident = resident
        self.fell_back = False
        self._is_live = None

    @property
    def name(self) -> str:
        return getattr(self.policy, "name", type(self.policy).__name__)

    def _fall_back(self, hook: str) -> None:
        from .fifo import FifoEviction

        logger.exception(
            "target %s: eviction policy %r raised in %s; falling back to fifo",
            self.target, self.name, hook,
        )
        self.fell_back = True
        self.policy = FifoEviction(is_live=self._is_live)
        if self.resident is not None:
            self.policy.on_resident(np.asarray(self.resident(), dtype=np.int64))

    def attach(self, is_live: Callable[[np.ndarray], np.ndarray]) -> None:
        self._is_live = is_live
        try:
            self.policy.attach(is_live)
        except Exception:
            self._fall_back("attach")

    def on_resident(self, vpns: np.ndarray) -> None:
        vpns = np.asarray(vpns, dtype=np.int64)
        try:
            self.policy.on_resident(vpns)
        except Exception:
            self._fall_back("on_resident")
            if self.resident is None:
                self.policy.on_resident(vpns)

    def on_removed(self, vpns: np.ndarray) -> None:
        try:
            self.policy.on_removed(np.asarray(vpns, dtype=np.int64))
        except Exception:
            self._fall_back("on_removed")

    @property
    def wants_refaults(self) -> bool:
        """Whether the policy has an on_refault of its own (else the caller
        may skip working out refault distances)."""
        return type(self.policy).on_refault is not EvictionPolicy.on_refault

    def on_refault(self, vpns: np.ndarray, distances: np.ndarray) -> None:
        try:
            self.policy.on_refault(np.asarray(vpns, dtype=np.int64), np.asarray(distances, dtype=np.int64))
        except Exception:
            self._fall_back("on_refault")

    def choose(self, n: int) -> np.ndarray:
        if n <= 0:
            return _EMPTY
        try:
            victims = _as_vpns(self.policy.choose(n))
        except Exception:
            self._fall_back("choose")
            victims = self.policy.choose(n)
        if victims.size > n:
            return _first_unique(victims)[:n]   # the policy's first choices
        if victims.size > 1:
            victims = unique(victims)   # all of them go: sorted, as the evictor takes them anyway
        return victims

    def __len__(self) -> int:
        if type(self.policy).__len__ is EvictionPolicy.__len__:
            return 1   # it does not say: choose() tells
        try:
            return len(self.policy)
        except Exception:
            self._fall_back("__len__")
            return len(self.policy)
