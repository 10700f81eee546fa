"""Soak: many jobs for an hour on a real sandbox, recording the engine's resources over time.

Everything is real: a salt-master with the Saltpeter engine, salt-minion
processes, the execution module and a wrapper process per run, on 127.0.0.1.
Every ``--interval`` seconds the benchmark records the engine's RSS, open
descriptors and CPU, the store's size on disk, the runs in the store and the
wrapper processes alive, into benchmarks/results/soak-<UTC time>.csv.

``--calibrate`` measures instead what one run costs the machine: busy CPU of
all cores with no job, then with a known rate of runs, so the soak's rate can
be chosen below saturation.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import (
    RESULTS_DIR,
    Result,
    cpu_percent_between,
    cron_fields,
    percentile,
    pid_listening_on,
    sample_process,
    scratch_dir,
    summarize,
    system_busy_seconds,
    utc_stamp,
    wait_until,
    write_job_files,
)
from saltpeter.sandbox import Sandbox

log = logging.getLogger(__name__)

COLUMNS = (
    "elapsed_s",
    "engine_pid",
    "engine_rss_kib",
    "engine_fds",
    "engine_cpu_percent",
    "store_bytes",
    "runs_total",
    "runs_running",
    "results_lost",
    "wrappers_alive",
    "system_busy_percent",
)
# Samples in the first minutes include the engine's start-up and the first
# runs filling caches, so the slope is also given without them.
WARM_UP_SECONDS = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=60.0, help="soak length (default 60)")
    parser.add_argument(
        "--interval", type=float, default=30.0, help="seconds between samples (default 30)"
    )
    parser.add_argument("--minions", type=int, default=3, help="minions (default 3)")
    parser.add_argument("--jobs", type=int, default=200, help="jobs (default 200)")
    parser.add_argument(
        "--period-minutes",
        type=int,
        default=1,
        help="each job fires once per this many minutes, at its own second (default 1)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="measure the CPU cost of one run instead of soaking",
    )
    parser.add_argument(
        "--calibrate-runs-per-minute",
        type=int,
        default=60,
        help="run rate of the calibration (default 60)",
    )


def soak_jobs(count: int, minions: int, period_minutes: int) -> dict[str, dict[str, Any]]:
    """Return COUNT jobs spread evenly over the period, each on one minion in turn.

    Every tenth job prints about 25 KB, so the store keeps output of some size;
    the others print one line.
    """
    jobs = {}
    period_seconds = 60 * period_minutes
    for number in range(count):
        offset = number * period_seconds // count
        minute = "*" if period_minutes == 1 else f"{offset // 60}-59/{period_minutes}"
        command = "seq 1 5000" if number % 10 == 0 else 'echo "soak $SP_JOB_NAME on $SP_MACHINE_ID"'
        jobs[f"soak-{number:03d}"] = {
            **cron_fields(str(offset % 60), minute),
            "targets": f"minion-{number % minions + 1}",
            "target_type": "list",
            "command": command,
            "timeout": 60,
        }
    return jobs


class StoreReader:
    """Counts runs and lost results in the engine's store, read-only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        if not self.path.exists():
            return []
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10) as db:
            return db.execute(sql).fetchall()

    def counts(self) -> tuple[int, int, int]:
        """Return (runs, runs still running, results recorded as lost)."""
        rows = self._query(
            "SELECT status, COUNT(*) FROM runs WHERE status != 'prepared' GROUP BY status"
        )
        by_status = dict(rows)
        lost = self._query("SELECT COUNT(*) FROM results WHERE reason = 'lost'")
        return sum(by_status.values()), by_status.get("running", 0), lost[0][0] if lost else 0

    def lateness_seconds(self) -> list[float]:
        """Return each scheduled run's delay from its slot to its creation (before the publish)."""
        rows = self._query(
            "SELECT scheduled_at, started_at FROM runs "
            "WHERE trigger = 'schedule' AND status NOT IN ('skipped', 'missed', 'prepared')"
        )
        return [
            (datetime.fromisoformat(started) - datetime.fromisoformat(scheduled)).total_seconds()
            for scheduled, started in rows
        ]

    def reasons(self) -> dict[str, int]:
        rows = self._query(
            "SELECT COALESCE(reason, state), COUNT(*) FROM results WHERE run_id NOT IN "
            "(SELECT run_id FROM runs WHERE status = 'prepared') GROUP BY 1"
        )
        return {str(reason): count for reason, count in rows}

    def statuses(self) -> dict[str, int]:
        return {
            str(status): count
            for status, count in self._query(
                "SELECT status, COUNT(*) FROM runs WHERE status != 'prepared' GROUP BY status"
            )
        }

    def size_bytes(self) -> int:
        paths = (self.path, self.path.with_name(self.path.name + "-wal"))
        return sum(path.stat().st_size for path in paths if path.exists())


def count_wrappers(root: Path) -> int:
    """Return the wrapper processes alive whose command line names the sandbox root."""
    count = 0
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any("wrapper.py" in part for part in cmdline) and any(
            str(root) in part for part in cmdline
        ):
            count += 1
    return count


def slope_per_hour(times: list[float], values: list[float]) -> float:
    """Return the least-squares slope of VALUES over TIMES (seconds), per hour."""
    if len(times) < 2:
        return 0.0
    mean_t = sum(times) / len(times)
    mean_v = sum(values) / len(values)
    variance = sum((t - mean_t) ** 2 for t in times)
    if variance == 0:
        return 0.0
    covariance = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True))
    return covariance / variance * 3600.0


def summarize_column(rows: list[dict[str, float]], column: str) -> dict[str, float]:
    times = [row["elapsed_s"] for row in rows]
    values = [row[column] for row in rows]
    settled = [row for row in rows if row["elapsed_s"] >= WARM_UP_SECONDS]
    second_half = [row for row in rows if row["elapsed_s"] >= times[-1] / 2]
    return {
        "start": values[0],
        "end": values[-1],
        "max": max(values),
        "slope_per_hour": slope_per_hour(times, values),
        "slope_per_hour_after_warm_up": slope_per_hour(
            [row["elapsed_s"] for row in settled], [row[column] for row in settled]
        ),
        "slope_per_hour_second_half": slope_per_hour(
            [row["elapsed_s"] for row in second_half], [row[column] for row in second_half]
        ),
    }


def start_sandbox(root: Path, minions: int, jobs_dir: Path) -> Sandbox:
    sandbox = Sandbox(root)
    sandbox.up(minions, jobs_dir=jobs_dir, timeout=300)
    return sandbox


def engine_pid(sandbox: Sandbox) -> int:
    return wait_until(
        lambda: pid_listening_on(sandbox.machines_port), 60, "the engine's machines WebSocket"
    )


def run(args: argparse.Namespace) -> Result:
    if args.calibrate:
        return calibrate(args)
    root = scratch_dir("soak")
    jobs_dir = root / "jobs"
    jobs_dir.mkdir()
    result = Result("soak")
    csv_path = RESULTS_DIR / f"soak-{utc_stamp()}.csv"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    sandbox = start_sandbox(root, args.minions, jobs_dir)
    try:
        pid = engine_pid(sandbox)
        store = StoreReader(sandbox.store_path)
        write_job_files(jobs_dir, soak_jobs(args.jobs, args.minions, args.period_minutes), 50)
        rows = sample_soak(sandbox, pid, store, args, csv_path)
        lateness = store.lateness_seconds()
        result.details = {
            "csv": str(csv_path.relative_to(RESULTS_DIR.parent.parent)),
            "minutes": args.minutes,
            "minions": args.minions,
            "jobs": args.jobs,
            "period_minutes": args.period_minutes,
            "columns": {
                column: summarize_column(rows, column)
                for column in COLUMNS
                if column not in ("elapsed_s", "engine_pid")
            },
            "lateness_seconds": summarize(lateness),
            "run_statuses": store.statuses(),
            "result_reasons": store.reasons(),
            "engine_pids": sorted({int(row["engine_pid"]) for row in rows}),
        }
    finally:
        sandbox.down()
    columns = result.details["columns"]
    result.add("engine RSS at end", columns["engine_rss_kib"]["end"] / 1024, "MiB")
    result.add(
        "engine RSS slope after warm-up",
        columns["engine_rss_kib"]["slope_per_hour_after_warm_up"] / 1024,
        "MiB/h",
    )
    result.add(
        "engine RSS slope, second half",
        columns["engine_rss_kib"]["slope_per_hour_second_half"] / 1024,
        "MiB/h",
    )
    result.add("engine descriptors max", columns["engine_fds"]["max"], "fds")
    result.add("store size at end", columns["store_bytes"]["end"] / 2**20, "MiB")
    result.add("runs", columns["runs_total"]["end"], "runs")
    result.add(
        "lost results",
        columns["results_lost"]["end"],
        "results",
        "0",
        columns["results_lost"]["end"] == 0,
    )
    if lateness:
        result.add("lateness p99 (slot to run stored)", percentile(lateness, 99), "s")
    return result


def sample_soak(
    sandbox: Sandbox, pid: int, store: StoreReader, args: argparse.Namespace, csv_path: Path
) -> list[dict[str, float]]:
    """Sample every ARGS.interval seconds for ARGS.minutes, appending each row to CSV_PATH."""
    rows: list[dict[str, float]] = []
    started = time.monotonic()
    previous = sample_process(pid)
    previous_busy = system_busy_seconds()
    cores = psutil.cpu_count() or 1
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        next_at = started
        while True:
            next_at += args.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
            current_pid = pid_listening_on(sandbox.machines_port) or pid
            if current_pid != pid:
                log.warning("the engine's PID changed from %d to %d", pid, current_pid)
                pid = current_pid
                previous = sample_process(pid)
            sample = sample_process(pid)
            busy = system_busy_seconds()
            runs, running, lost = store.counts()
            row = {
                "elapsed_s": round(time.monotonic() - started, 1),
                "engine_pid": pid,
                "engine_rss_kib": sample.rss_bytes // 1024,
                "engine_fds": sample.fds,
                "engine_cpu_percent": round(cpu_percent_between(previous, sample), 2),
                "store_bytes": store.size_bytes(),
                "runs_total": runs,
                "runs_running": running,
                "results_lost": lost,
                "wrappers_alive": count_wrappers(sandbox.root),
                "system_busy_percent": round(
                    100.0 * (busy - previous_busy) / (args.interval * cores), 1
                ),
            }
            previous, previous_busy = sample, busy
            writer.writerow(row)
            handle.flush()
            rows.append(row)
            log.info("soak: %s", row)
            if time.monotonic() - started >= args.minutes * 60:
                return rows


def calibrate(args: argparse.Namespace) -> Result:
    """Measure busy CPU with no job, then with ARGS.calibrate_runs_per_minute runs a minute."""
    root = scratch_dir("calib")
    jobs_dir = root / "jobs"
    jobs_dir.mkdir()
    result = Result("soak-calibration")
    sandbox = start_sandbox(root, args.minions, jobs_dir)
    cores = psutil.cpu_count() or 1
    try:
        engine_pid(sandbox)
        store = StoreReader(sandbox.store_path)
        time.sleep(20)
        idle_busy = _busy_percent(60.0, cores)
        rate = args.calibrate_runs_per_minute
        write_job_files(jobs_dir, soak_jobs(rate, args.minions, 1), 50)
        # The first minute fills caches; the measured minutes follow.
        time.sleep(70)
        runs_before = store.counts()[0]
        loaded_busy = _busy_percent(120.0, cores)
        runs = store.counts()[0] - runs_before
    finally:
        sandbox.down()
    extra_core_seconds = (loaded_busy - idle_busy) / 100.0 * cores * 120.0
    per_run = extra_core_seconds / runs if runs else float("nan")
    result.details = {
        "minions": args.minions,
        "runs_per_minute": rate,
        "idle_busy_percent": idle_busy,
        "loaded_busy_percent": loaded_busy,
        "runs_measured": runs,
        "cpu_seconds_per_run": per_run,
    }
    result.add("busy CPU, sandbox idle", idle_busy, "% of all cores")
    result.add(f"busy CPU, {rate} runs/min", loaded_busy, "% of all cores")
    result.add("CPU per run (estimate)", per_run, "core-s", basis=f"{runs} runs in 120 s")
    return result


def _busy_percent(seconds: float, cores: int) -> float:
    before = system_busy_seconds()
    time.sleep(seconds)
    return 100.0 * (system_busy_seconds() - before) / (seconds * cores)
