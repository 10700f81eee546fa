"""Prometheus metrics of the engine.

:class:`Metrics` is a run observer: it counts runs, results and skips from
the same events that go to the Salt event bus, so the counters cannot drift
from what reactors see. Gauges read the run manager when scraped. The
registry is private to the engine, never the process-wide default one.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds between a slot's scheduled instant and the publish of its launch.
LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _RejectionCollector(Collector):
    """Exposes the machines WebSocket's rejection counts, kept by the server."""

    def __init__(self, rejections: collections.Counter[str]) -> None:
        self.rejections = rejections

    def collect(self) -> Any:
        family = CounterMetricFamily(
            "saltpeter_wrapper_rejections",
            "Wrapper connections or frames rejected, by protocol error code.",
            labels=["code"],
        )
        for code, count in sorted(self.rejections.items()):
            family.add_metric([code], count)
        yield family


class Metrics:
    """The engine's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Labelled children of the counters, looked up once each. labels()
        # converts the values and takes a lock on every call, once per run
        # in a burst of starts.
        self._children: dict[tuple[int, str, str], Any] = {}
        self.runs_started = Counter(
            "saltpeter_runs_started",
            "Runs started, by job and trigger.",
            ["job", "trigger"],
            registry=self.registry,
        )
        self.runs_finished = Counter(
            "saltpeter_runs_finished",
            "Runs finished, by job and result (succeeded or failed).",
            ["job", "result"],
            registry=self.registry,
        )
        self.minion_results = Counter(
            "saltpeter_minion_results",
            "Per-minion results, by job and reason (exit, timeout, killed, lost, ...).",
            ["job", "reason"],
            registry=self.registry,
        )
        self.skips = Counter(
            "saltpeter_skips",
            "Slots or requests that started no run, by job and reason.",
            ["job", "reason"],
            registry=self.registry,
        )
        self.heartbeat_losses = Counter(
            "saltpeter_heartbeat_losses",
            "Minions recorded as lost (retcode 253) because their wrapper fell silent.",
            ["job"],
            registry=self.registry,
        )
        self.dispatch_lateness = Histogram(
            "saltpeter_dispatch_lateness_seconds",
            "Seconds from a slot's scheduled instant to the publish of its launch.",
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        self.runs_in_flight = Gauge(
            "saltpeter_runs_in_flight",
            "Runs with a minion still in flight.",
            registry=self.registry,
        )
        self.wrappers_connected = Gauge(
            "saltpeter_wrappers_connected",
            "Wrappers connected to the machines WebSocket.",
            registry=self.registry,
        )

    def track(
        self,
        runs_in_flight: Callable[[], float],
        wrappers_connected: Callable[[], float],
        rejections: collections.Counter[str],
    ) -> None:
        """Connect the gauges and rejection counts to the engine's live state."""
        self.runs_in_flight.set_function(runs_in_flight)
        self.wrappers_connected.set_function(wrappers_connected)
        self.registry.register(_RejectionCollector(rejections))

    def render(self) -> bytes:
        """Return every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    # -- RunObserver ---------------------------------------------------------

    def on_event(self, tag: str, data: dict[str, Any]) -> None:
        parts = tag.split("/")
        if len(parts) < 4 or parts[:2] != ["saltpeter", "job"]:
            return
        job = parts[2]
        if len(parts) == 4 and parts[3] == "start":
            self._count(self.runs_started, job, str(data.get("trigger")))
        elif len(parts) == 4 and parts[3] == "complete":
            self._count(self.runs_finished, job, "succeeded" if data.get("success") else "failed")
        elif len(parts) == 4 and parts[3] == "skipped":
            self._count(self.skips, job, str(data.get("reason")))
        elif len(parts) == 5 and parts[4] == "complete":
            reason = str(data.get("reason"))
            self._count(self.minion_results, job, reason)
            if reason == "lost":
                self.heartbeat_losses.labels(job=job).inc()

    def _count(self, counter: Counter, job: str, label: str) -> None:
        """Add one to ``counter`` for the label values (``job``, ``label``)."""
        key = (id(counter), job, label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(job, label)
        child.inc()

    def on_output(self, job: str, run_id: str, minion: str, data: str) -> None:
        return None
