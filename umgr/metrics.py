"""Prometheus metrics, read from the daemon's own counters at scrape time.

Only this module knows about Prometheus. The fault path keeps plain integer
counters and a bucketed latency array per target (umgr.paging.stats.TargetStats);
a custom collector turns them into metric families when scraped, so serving
a fault never calls into prometheus-client.
"""
from __future__ import annotations

import platform
import threading

import numpy as np
from prometheus_client import PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from umgr import __version__
from umgr.backends import IO_BUCKETS
from umgr.daemon.status import STATE_BYTES
from umgr.paging.pagetable import PAGE_SIZE
from umgr.paging.stats import COUNTERS, LATENCY_BUCKETS

# Exported as umgr_<name>_total, except the fault counts: umgr_faults_total{kind}.
# Names of ended targets kept as series of their own; the others' figures go to OTHER_NAME.
RETIRED_NAMES_MAX = 1000
OTHER_NAME = "(other)"
FAULT_KINDS = {"faults_fresh": "missing_fresh", "faults_swapped": "missing_swapped", "faults_wp": "wp"}
EXPORTED = {name: doc for name, doc in COUNTERS.items() if name not in FAULT_KINDS and name != "faults_missing"}


SIZES = (
    ("resident_bytes", "Managed bytes resident", lambda t: t.pt.resident),
    ("swapped_bytes", "Managed bytes held by the backend", lambda t: t.pt.swapped),
    ("budget_bytes", "Memory budget (0: none); summed over the name's targets", lambda t: t.budget_pages),
    ("managed_bytes", "Bytes of registered memory", lambda t: t.pt.managed),
    *((name, doc, lambda t, state=state: t.pt.count(state)) for name, (doc, state) in STATE_BYTES.items()),
)


class Figures:
    """Counters and the fault-latency histogram of one or more targets."""

    def __init__(self):
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.latency = np.zeros(len(LATENCY_BUCKETS) + 1, np.int64)
        self.latency_sum = 0.0

    def add(self, stats) -> Figures:
        for name in COUNTERS:
            self.counters[name] += getattr(stats, name)
        self.latency += stats.fault_latency
        self.latency_sum += stats.fault_latency_sum
        return self

    def copy(self) -> Figures:
        other = Figures()
        other.counters, other.latency, other.latency_sum = dict(self.counters), self.latency.copy(), self.latency_sum
        return other


class Group:
    """The targets one series stands for: all those of a name (with the
    counters of the ones already gone, so counters never go down), or one
    pid with --metrics-per-pid."""

    def __init__(self, labels: list[str], figures: Figures):
        self.labels = labels
        self.figures = figures
        self.targets: list = []

    def add(self, target) -> None:
        self.targets.append(target)
        self.figures.add(target.stats)


def _buckets(bounds, counts: np.ndarray) -> list[tuple[str, int]]:
    cumulative = np.cumsum(counts)
    return [(str(b), int(c)) for b, c in zip(bounds, cumulative)] + [("+Inf", int(cumulative[-1]))]


class DaemonCollector:
    """Series per target name by default: their number is bounded by the
    programs run, not by the processes (and by RETIRED_NAMES_MAX names of
    ended ones: the rest count as OTHER_NAME). `per_pid` adds a pid label (one set
    of series per process: for debugging, not for a long-lived daemon)."""

    def __init__(self, daemon, per_pid: bool = False):
        self.daemon = daemon
        self.per_pid = per_pid
        self.label_names = ["name", "pid"] if per_pid else ["name"]
        # Scrapes run on the HTTP server's thread; a target released on the
        # daemon's thread moves its counters into _retired and stays in
        # _released until it has left daemon.targets, so that no scrape
        # counts it twice (a counter that went down would read as a reset).
        self._lock = threading.Lock()
        self._retired: dict[str, Figures] = {}
        self._released: set = set()
        if not per_pid:
            daemon.lifecycle.release_watchers.append(self._retire)

    def _retire(self, target) -> None:
        with self._lock:
            # A program names itself (UMGR_NAME, its comm): past
            # RETIRED_NAMES_MAX names, the ended ones are counted as OTHER_NAME,
            # or a loop of new names would grow the series, and each scrape's
            # work, for the daemon's life.
            # (A name a live target still shows keeps its series: moved to
            # OTHER_NAME, its counts would drop from that name's sum.)
            kept = target.name in self._retired or len(self._retired) < RETIRED_NAMES_MAX or any(
                t.name == target.name for t in self.daemon.targets.values()
                if t is not target and t not in self._released)
            name = target.name if kept else OTHER_NAME
            self._retired.setdefault(name, Figures()).add(target.stats)
            targets = self.daemon.targets
            self._released = {t for t in self._released if targets.get(t.pid) is t}
            self._released.add(target)

    def _groups(self) -> list[Group]:
        with self._lock:
            live = [t for t in list(self.daemon.targets.values()) if t not in self._released]
            if self.per_pid:
                groups = [Group([t.name, str(t.pid)], Figures()) for t in live]
                for group, target in zip(groups, live):
                    group.add(target)
                return groups
            by_name = {name: Group([name], figures.copy()) for name, figures in self._retired.items()}
            for t in live:
                by_name.setdefault(t.name, Group([t.name], Figures())).add(t)
            return list(by_name.values())

    def collect(self):
        groups = self._groups()
        labels = self.label_names
        yield from _counters(groups, labels)
        yield from _sizes(groups, labels)
        targets = GaugeMetricFamily("umgr_targets", "Processes managed now", labels=labels)
        paused = GaugeMetricFamily("umgr_eviction_paused",
                                   "Targets whose eviction is paused (swap full or failing)", labels=labels)
        latency = HistogramMetricFamily("umgr_fault_service_seconds",
                                        "Time from reading a fault batch to serving it", labels=labels)
        for g in groups:
            targets.add_metric(g.labels, len(g.targets))
            paused.add_metric(g.labels, sum(1 for t in g.targets if t.eviction_paused))
            latency.add_metric(g.labels, _buckets(LATENCY_BUCKETS, g.figures.latency), g.figures.latency_sum)
        yield from (targets, paused, latency)
        yield from self._daemon_families()

    def _daemon_families(self):
        backend = self.daemon.backend
        stats = backend.statistics()
        yield GaugeMetricFamily("umgr_backend_used_bytes", "Swap slots in use", value=stats["used_pages"] * PAGE_SIZE)
        yield GaugeMetricFamily("umgr_backend_capacity_bytes", "Swap capacity",
                                value=stats["capacity_pages"] * PAGE_SIZE)
        yield CounterMetricFamily("umgr_backend_errors", "Backend I/O errors", value=stats["errors"])
        yield CounterMetricFamily("umgr_internal_errors", "Targets killed because serving them failed",
                                  value=self.daemon.internal_errors)
        yield CounterMetricFamily("umgr_rejected_connections", "Control connections dropped for bad input",
                                  value=self.daemon.rejected_connections)
        io = HistogramMetricFamily("umgr_backend_io_seconds", "Backend batch I/O latency")
        io.add_metric([], _buckets(IO_BUCKETS, backend.io_latency), backend.io_seconds)
        yield io
        yield CounterMetricFamily("umgr_idle_poll_seconds", "Time idle CPUs were kept polling (--idle-poll)",
                                  value=self.daemon.lifecycle.idle_poll.seconds_held())
        yield CounterMetricFamily("umgr_targets_started", "Processes the daemon has managed since it started",
                                  value=self.daemon.targets_seen)
        info = GaugeMetricFamily("umgr_build_info", "umgr's version (always 1)", labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1)
        yield info
        yield from _tier_families(stats["tiers"])


# Per tier of the backend (a chain has several, fastest first): (key, name, doc, family).
TIER_FIGURES = (
    ("capacity_bytes", "umgr_backend_tier_capacity_bytes", "What the tier may hold, in its own medium", GaugeMetricFamily),
    ("used_bytes", "umgr_backend_tier_used_bytes", "What the tier holds, in its own medium", GaugeMetricFamily),
    ("pages", "umgr_backend_tier_pages", "Pages the tier holds", GaugeMetricFamily),
    ("read_seconds_per_page", "umgr_backend_tier_read_seconds_per_page", "Mean time of a page read",
     GaugeMetricFamily),
    ("ratio", "umgr_backend_tier_compression_ratio", "Page bytes held per byte used", GaugeMetricFamily),
    ("heap_bytes", "umgr_backend_tier_heap_bytes",
     "Memory the tier's heap has in use: its chunks, free ones in spans partly used included", GaugeMetricFamily),
    ("demoted_pages", "umgr_backend_tier_demoted_pages", "Pages moved to the next tier", CounterMetricFamily),
)


def _tier_families(tiers: list[dict]):
    for key, name, doc, family_type in TIER_FIGURES:
        family = family_type(name, doc, labels=["tier"])
        for tier in tiers:
            if key in tier:
                family.add_metric([tier["tier"]], tier[key])
        yield family


def _counters(groups: list[Group], labels: list[str]):
    faults = CounterMetricFamily("umgr_faults", "Userfaults served, by kind", labels=labels + ["kind"])
    for g in groups:
        for name, kind in FAULT_KINDS.items():
            faults.add_metric(g.labels + [kind], g.figures.counters[name])
    yield faults
    for name, doc in EXPORTED.items():
        family = CounterMetricFamily(f"umgr_{name}", doc, labels=labels)
        for g in groups:
            family.add_metric(g.labels, g.figures.counters[name])
        yield family


def _sizes(groups: list[Group], labels: list[str]):
    for name, doc, pages in SIZES:
        family = GaugeMetricFamily(f"umgr_{name}", doc, labels=labels)
        for g in groups:
            family.add_metric(g.labels, sum(pages(t) for t in g.targets) * PAGE_SIZE)
        yield family


def registry_for(daemon, per_pid: bool = False) -> CollectorRegistry:
    """umgr's own families, and the daemon process's (CPU, memory, file
    descriptors: prometheus-client's process and platform collectors)."""
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon, per_pid))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def serve_metrics(daemon, port: int, addr: str = "127.0.0.1", per_pid: bool = False) -> None:
    """Serve /metrics from a background thread (prometheus-client's server).
    The collector reads plain counters; a torn read costs one sample's accuracy."""
    start_http_server(port, addr=addr, registry=registry_for(daemon, per_pid))
