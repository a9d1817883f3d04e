"""Prometheus metrics, read from the daemon's own counters at scrape time.

Only this module knows about Prometheus. The fault path keeps plain integer
counters and a bucketed latency array per target (umgr.paging.target.TargetStats);
a custom collector turns them into metric families when scraped, so serving
a fault never calls into prometheus-client.
"""
from __future__ import annotations

import numpy as np
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry

from umgr.backends import IO_BUCKETS
from umgr.paging.pagetable import State
from umgr.paging.target import LATENCY_BUCKETS

COUNTERS = (
    ("pages_in", "Pages brought back from the backend"),
    ("pages_out", "Pages evicted (written out or dropped as zero) and zapped"),
    ("prefetched", "Pages brought in by the prefetch policy with a fault"),
    ("zero_pages_out", "Evicted pages that were all zero and took no slot"),
    ("zap_batches", "Zap requests (one vectored MADV_DONTNEED each)"),
    ("zap_ranges", "Ranges zapped (one UFFD_EVENT_REMOVE each)"),
    ("app_removes", "MADV_DONTNEED/REMOVE events from the application"),
    ("unmaps", "munmap events"),
    ("remaps", "mremap events"),
    ("forks", "fork events"),
    ("zero_mapped", "Victims found on the kernel's zero page (kept, not counted resident)"),
    ("shared_skipped", "Victims found shared copy-on-write with another process (kept, not counted)"),
    ("locked_pinned", "Victims found mlocked (pinned while locked)"),
    ("hint_cold", "umgr_advise(COLD) hints received"),
    ("hint_willneed", "umgr_advise(WILLNEED) hints received"),
    ("hint_discardable", "umgr_advise(DISCARDABLE) hints received"),
    ("cold_evicted", "Pages evicted because of a COLD hint"),
    ("willneed_in", "Pages brought in because of a WILLNEED hint"),
    ("discarded", "DISCARDABLE pages dropped instead of written"),
)

# Page states with no memory of the target's own, or that cannot be evicted.
STATE_GAUGES = (
    ("zero_mapped_bytes", "Managed bytes on the kernel's shared zero page", "ZERO"),
    ("shared_bytes", "Managed bytes shared copy-on-write with another process", "SHARED"),
    ("pinned_bytes", "Managed bytes that cannot be evicted now (mlocked, unreadable)", "PINNED"),
)


class DaemonCollector:
    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        targets = list(self.daemon.targets.values())
        labels = ["pid", "command"]

        def label(t):
            return [str(t.pid), t.command.split(" ", 1)[0][:60]]

        faults = CounterMetricFamily("umgr_faults", "Userfaults served, by kind", labels=labels + ["kind"])
        for t in targets:
            faults.add_metric(label(t) + ["missing_fresh"], t.stats.faults_fresh)
            faults.add_metric(label(t) + ["missing_swapped"], t.stats.faults_swapped)
            faults.add_metric(label(t) + ["wp"], t.stats.faults_wp)
        yield faults

        for name, doc in COUNTERS:
            family = CounterMetricFamily(f"umgr_{name}", doc, labels=labels)
            for t in targets:
                family.add_metric(label(t), getattr(t.stats, name))
            yield family

        for name, doc, value in (
            ("resident_bytes", "Managed bytes resident in the target", lambda t: t.pt.resident * 4096),
            ("swapped_bytes", "Managed bytes held by the backend for the target", lambda t: t.pt.swapped * 4096),
            ("budget_bytes", "The target's memory budget (0: none)", lambda t: t.budget_pages * 4096),
            ("managed_bytes", "Bytes of registered memory", lambda t: t.pt.managed * 4096),
        ):
            family = GaugeMetricFamily(f"umgr_{name}", doc, labels=labels)
            for t in targets:
                family.add_metric(label(t), value(t))
            yield family

        for name, doc, state in STATE_GAUGES:
            family = GaugeMetricFamily(f"umgr_{name}", doc, labels=labels)
            for t in targets:
                family.add_metric(label(t), int(t.pt.counts[getattr(State, state)]) * 4096)
            yield family

        latency = HistogramMetricFamily("umgr_fault_service_seconds",
                                        "Time from reading a fault batch to serving it", labels=labels)
        for t in targets:
            cumulative = np.cumsum(t.stats.fault_latency)
            buckets = [(str(b), int(c)) for b, c in zip(LATENCY_BUCKETS, cumulative)]
            buckets.append(("+Inf", int(cumulative[-1])))
            latency.add_metric(label(t), buckets, t.stats.fault_latency_sum)
        yield latency

        backend = self.daemon.backend
        stats = backend.statistics()
        yield GaugeMetricFamily("umgr_backend_used_bytes", "Swap slots in use", value=stats["used_pages"] * 4096)
        yield GaugeMetricFamily("umgr_backend_capacity_bytes", "Swap capacity", value=stats["capacity_pages"] * 4096)
        yield CounterMetricFamily("umgr_backend_errors", "Backend I/O errors", value=stats["errors"])
        yield CounterMetricFamily("umgr_internal_errors", "Targets killed because serving them failed",
                                  value=self.daemon.internal_errors)
        yield CounterMetricFamily("umgr_rejected_connections", "Control connections dropped for bad input",
                                  value=self.daemon.rejected_connections)
        io = HistogramMetricFamily("umgr_backend_io_seconds", "Backend batch I/O latency")
        cumulative = np.cumsum(backend.io_latency)
        io.add_metric([], [(str(b), int(c)) for b, c in zip(IO_BUCKETS, cumulative)]
                      + [("+Inf", int(cumulative[-1]))], backend.io_seconds)
        yield io


def registry_for(daemon) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon))
    return registry


def serve_metrics(daemon, port: int, addr: str = "127.0.0.1") -> None:
    """Serve /metrics from a background thread (prometheus-client's server).
    The collector reads plain counters; a torn read costs one sample's accuracy."""
    start_http_server(port, addr=addr, registry=registry_for(daemon))
