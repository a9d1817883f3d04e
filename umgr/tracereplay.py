"""`umgr replay`: a recorded trace (umgr.trace) replayed offline against
prefetch and eviction policies and budgets, side by side.

Each target of the trace is replayed on its own, with fresh policies and its
recorded budget (or the one given); the figures are summed over targets.
A configuration names a prefetch policy, an eviction policy or both
("readahead:maximum=16+reuse"); what it leaves out is what the recorded run
used.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from umgr.paging.pagetable import PAGE_SHIFT, PAGE_SIZE
from umgr.policies import installed, load_eviction, load_prefetch, parse_spec
from umgr.policies.replay import PagingReplayResult, replay_paging
from umgr.trace import Kind, TargetRun, target_runs


@dataclass
class Setup:
    """One configuration to replay: policies with their options."""
    prefetch: tuple[str, dict]
    eviction: tuple[str, dict]

    @property
    def label(self) -> str:
        def one(name, options):
            return name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")
        return f"{one(*self.prefetch)}+{one(*self.eviction)}"


def setups(specs: list[str], meta: dict) -> list[Setup]:
    """The configurations `--policy` names; ValueError for an unknown
    policy or an option it does not take."""
    recorded = Setup((meta.get("policy", "readahead"), meta.get("policy_options", {})),
                     (meta.get("eviction", "fifo"), meta.get("eviction_options", {})))
    kinds = {name: kind for name, kind, _, _ in installed()}
    out = []
    for spec in specs or [recorded.label]:
        setup = Setup(recorded.prefetch, recorded.eviction)
        named = {}
        for part in spec.split("+"):
            name, options = parse_spec(part)
            kind = kinds.get(name)
            if kind in named:
                raise ValueError(f"{spec!r} names two {kind} policies ({named[kind]}, {name}): give one of each "
                                 "kind at most, joined by '+'")
            named[kind] = name
            if kind == "prefetch":
                setup.prefetch = (name, options)
            elif kind == "eviction":
                setup.eviction = (name, options)
            else:
                raise ValueError(f"unknown policy {name!r}; installed: {', '.join(sorted(kinds))} (umgr policies)")
        load_prefetch(setup.prefetch[0], **setup.prefetch[1])  # options it does not take fail here, once
        load_eviction(setup.eviction[0], **setup.eviction[1])
        out.append(setup)
    return out


def replay_setup(setup: Setup, runs: list[TargetRun], budget_bytes: int | None) -> PagingReplayResult:
    total = PagingReplayResult(0, 0, 0, 0, 0, 0, 0, 0)
    for run in runs:
        capacity = run.budget_pages if budget_bytes is None else budget_bytes >> PAGE_SHIFT
        total += replay_paging(load_prefetch(setup.prefetch[0], **setup.prefetch[1]),
                               load_eviction(setup.eviction[0], **setup.eviction[1]),
                               run.accesses, capacity, run.regions, events=run.events)
    return total


def recorded_row(runs: list[TargetRun]) -> dict:
    kinds = np.concatenate([r.kinds for r in runs]) if runs else np.empty(0, np.uint8)
    # Counted as a replay counts them: accesses to pages not resident. A
    # write-protect fault is an access to a resident page (a hit).
    missing = int((kinds != Kind.FAULT_WP).sum())
    return {"policy": "recorded", "faults": missing, "hit_rate": 1 - missing / len(kinds) if len(kinds) else None,
            "from_swap": int((kinds == Kind.FAULT_SWAPPED).sum()), "evicted": sum(r.evictions for r in runs),
            "prefetched": None, "prefetch_used": None, "read_bytes": None, "written_bytes": None}


def result_row(label: str, result: PagingReplayResult) -> dict:
    return {"policy": label, "faults": result.faults, "hit_rate": result.hit_rate, "from_swap": result.from_swap,
            "evicted": result.evictions, "prefetched": result.prefetched, "prefetch_used": result.prefetch_used,
            "read_bytes": result.pages_in * PAGE_SIZE, "written_bytes": result.pages_out * PAGE_SIZE}


def replay_trace(meta: dict, records: np.ndarray, specs: list[str], budget_bytes: int | None) -> list[dict]:
    """The recorded run's row, then one row per configuration."""
    chosen = setups(specs, meta)
    runs = target_runs(records)
    return [recorded_row(runs)] + [result_row(s.label, replay_setup(s, runs, budget_bytes)) for s in chosen]


def format_rows(rows: list[dict]) -> str:
    mib = 1 << 20

    def cell(value, fmt):
        width = int(fmt.split(".")[0].rstrip("d%f"))
        return f"{'-':>{width}}" if value is None else format(value, fmt)
    width = max(len(r["policy"]) for r in rows)
    lines = [f"{'POLICY':<{width}} {'FAULTS':>9} {'HIT RATE':>8} {'FROM SWAP':>9} {'EVICTED':>9} "
             f"{'PREFETCHED':>10} {'USED':>9} {'READ MiB':>9} {'WRITTEN MiB':>11}"]
    for r in rows:
        lines.append(f"{r['policy']:<{width}} {r['faults']:>9} {cell(r['hit_rate'], '8.1%')} {r['from_swap']:>9} "
                     f"{r['evicted']:>9} {cell(r['prefetched'], '10d')} {cell(r['prefetch_used'], '9d')} "
                     f"{cell(r['read_bytes'] and r['read_bytes'] / mib, '9.1f')} "
                     f"{cell(r['written_bytes'] and r['written_bytes'] / mib, '11.1f')}")
    return "\n".join(lines)
