"""Prometheus metrics counted from run events."""

from __future__ import annotations

import collections

from saltpeter.metrics import Metrics


def sample(metrics: Metrics, line_start: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample starting with {line_start!r}")


def test_run_events_are_counted() -> None:
    metrics = Metrics()
    metrics.on_event("saltpeter/job/backup/start", {"trigger": "schedule"})
    metrics.on_event("saltpeter/job/backup/m1/complete", {"reason": "lost"})
    metrics.on_event("saltpeter/job/backup/complete", {"success": False})
    metrics.on_event("saltpeter/job/backup/skipped", {"reason": "overlap"})
    started = 'saltpeter_runs_started_total{job="backup",trigger="schedule"}'
    assert sample(metrics, started) == 1
    assert sample(metrics, 'saltpeter_runs_finished_total{job="backup",result="failed"}') == 1
    assert sample(metrics, 'saltpeter_minion_results_total{job="backup",reason="lost"}') == 1
    assert sample(metrics, 'saltpeter_heartbeat_losses_total{job="backup"}') == 1
    assert sample(metrics, 'saltpeter_skips_total{job="backup",reason="overlap"}') == 1


def test_other_tags_are_ignored() -> None:
    metrics = Metrics()
    metrics.on_event("salt/job/123/ret/m1", {})
    metrics.on_event("saltpeter/reply/abc", {})
    assert "saltpeter_runs_started_total{" not in metrics.render().decode()


def test_gauges_and_rejections_read_live_state() -> None:
    metrics = Metrics()
    rejections: collections.Counter[str] = collections.Counter()
    in_flight = [3]
    metrics.track(lambda: in_flight[0], lambda: 7, rejections)
    rejections["auth_failed"] += 2
    in_flight[0] = 4
    assert sample(metrics, "saltpeter_runs_in_flight") == 4
    assert sample(metrics, "saltpeter_wrappers_connected") == 7
    assert sample(metrics, 'saltpeter_wrapper_rejections_total{code="auth_failed"}') == 2


def test_lateness_histogram_buckets() -> None:
    metrics = Metrics()
    metrics.dispatch_lateness.observe(0.02)
    assert sample(metrics, 'saltpeter_dispatch_lateness_seconds_bucket{le="0.01"}') == 0
    assert sample(metrics, 'saltpeter_dispatch_lateness_seconds_bucket{le="0.025"}') == 1
