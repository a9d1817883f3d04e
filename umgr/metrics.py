"""Prometheus metrics, read from the daemon's own counters at scrape time.

Only this module knows about Prometheus. The fault path keeps plain integer
counters and a bucketed latency array per target (umgr.paging.stats.TargetStats);
a custom collector turns them into metric families when scraped, so serving
a fault never calls into prometheus-client.
"""
from __future__ import annotations

import numpy as np
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from umgr.backends import IO_BUCKETS
from umgr.daemon.status import STATE_BYTES
from umgr.paging.pagetable import PAGE_SIZE
from umgr.paging.stats import COUNTERS, LATENCY_BUCKETS

# Exported as umgr_<name>_total, except the fault counts: umgr_faults_total{kind}.
FAULT_KINDS = {"faults_fresh": "missing_fresh", "faults_swapped": "missing_swapped", "faults_wp": "wp"}
EXPORTED = {name: doc for name, doc in COUNTERS.items() if name not in FAULT_KINDS and name != "faults_missing"}


LABELS = ["pid", "command"]

SIZES = (
    ("resident_bytes", "Managed bytes resident in the target", lambda t: t.pt.resident),
    ("swapped_bytes", "Managed bytes held by the backend for the target", lambda t: t.pt.swapped),
    ("budget_bytes", "The target's memory budget (0: none)", lambda t: t.budget_pages),
    ("managed_bytes", "Bytes of registered memory", lambda t: t.pt.managed),
    *((name, doc, lambda t, state=state: t.pt.count(state)) for name, (doc, state) in STATE_BYTES.items()),
)


def _label(target) -> list[str]:
    return [str(target.pid), target.command.split(" ", 1)[0][:60]]


def _buckets(bounds, counts: np.ndarray) -> list[tuple[str, int]]:
    cumulative = np.cumsum(counts)
    return [(str(b), int(c)) for b, c in zip(bounds, cumulative)] + [("+Inf", int(cumulative[-1]))]


class DaemonCollector:
    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        targets = list(self.daemon.targets.values())
        yield from self._target_counters(targets)
        yield from self._target_sizes(targets)
        latency = HistogramMetricFamily("umgr_fault_service_seconds",
                                        "Time from reading a fault batch to serving it", labels=LABELS)
        for t in targets:
            latency.add_metric(_label(t), _buckets(LATENCY_BUCKETS, t.stats.fault_latency), t.stats.fault_latency_sum)
        yield latency
        yield from self._daemon_families()

    @staticmethod
    def _target_counters(targets):
        faults = CounterMetricFamily("umgr_faults", "Userfaults served, by kind", labels=LABELS + ["kind"])
        for t in targets:
            for name, kind in FAULT_KINDS.items():
                faults.add_metric(_label(t) + [kind], getattr(t.stats, name))
        yield faults
        for name, doc in EXPORTED.items():
            family = CounterMetricFamily(f"umgr_{name}", doc, labels=LABELS)
            for t in targets:
                family.add_metric(_label(t), getattr(t.stats, name))
            yield family

    @staticmethod
    def _target_sizes(targets):
        for name, doc, pages in SIZES:
            family = GaugeMetricFamily(f"umgr_{name}", doc, labels=LABELS)
            for t in targets:
                family.add_metric(_label(t), pages(t) * PAGE_SIZE)
            yield family

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


def registry_for(daemon) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon))
    return registry


def serve_metrics(daemon, port: int, addr: str = "127.0.0.1") -> None:
    """Serve /metrics from a background thread (prometheus-client's server).
    The collector reads plain counters; a torn read costs one sample's accuracy."""
    start_http_server(port, addr=addr, registry=registry_for(daemon))
