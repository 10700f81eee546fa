"""Punctual firing: 10,000 jobs loaded, 1,000 due in the same second, idle CPU, reloads.

The engine is real and runs in its own process (benchmarks/engine_host.py):
config loader and watcher, scheduler, dispatch, run manager, SQLite store,
metrics, and Salt's own target resolution. Only the publish and the event
bus are stand-ins: each minion answers the launch as started 0.5 s later,
and without a wrapper the sweep records it as not started 15 s after that.
Lateness runs from a slot's scheduled instant to the call of the publish,
the instant the engine's own histogram observes, so the publish itself is
not part of it.

Phases, each with its own engine:

1. idle: 10,000 jobs, none due for months. The engine's CPU is measured over
   several windows; then every job file is rewritten with a changed command
   and the reload (load in the thread pool, apply in slices on the event loop) is
   timed, several times.
2. reload: 10,000 jobs of which ``--ticks`` are due every second. The ticks'
   lateness is recorded for a baseline, and then while every job file is
   rewritten; ticks whose slot falls between the start of the first load
   and the end of the last apply after a rewrite count as "during a reload".
3. bursts: 9,000 idle jobs plus 1,000 due every minute at the same second.
"""

from __future__ import annotations

import argparse
import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Result,
    cpu_percent_between,
    cron_fields,
    median,
    percentile,
    render_job_files,
    sample_process,
    scratch_dir,
    summarize,
    write_rendered,
)
from benchmarks.engine_host import EngineProcess

log = logging.getLogger(__name__)

LATENESS_TARGET = 0.050
IDLE_CPU_TARGET = 1.0
LOAD_TARGET = 2.0
# Seconds to wait after the engine read freshly written files: files modified
# within 2 s of being read are read again on the next polls.
SETTLE_SECONDS = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=10000, help="jobs loaded (default 10000)")
    parser.add_argument("--due", type=int, default=1000, help="jobs due per burst (default 1000)")
    parser.add_argument("--files", type=int, default=100, help="job files (default 100)")
    parser.add_argument("--bursts", type=int, default=4, help="bursts (default 4)")
    parser.add_argument(
        "--ticks",
        type=int,
        default=20,
        help="jobs due every second in the reload phase (default 20)",
    )
    parser.add_argument(
        "--baseline-seconds",
        type=float,
        default=30.0,
        help="ticks recorded before the first rewrite in the reload phase (default 30)",
    )
    parser.add_argument("--idle-windows", type=int, default=3, help="idle CPU windows (default 3)")
    parser.add_argument(
        "--idle-seconds", type=float, default=60.0, help="length of each window (default 60)"
    )
    parser.add_argument("--reloads", type=int, default=3, help="timed reloads (default 3)")
    parser.add_argument(
        "--phases",
        default="idle,reload,burst",
        help="phases to run, comma-separated (default idle,reload,burst)",
    )


def far_month(now: datetime) -> int:
    """Return the month six months after NOW's, so a job in it is not due for months."""
    return (now.month + 5) % 12 + 1


def idle_job(number: int, month: int, version: int) -> dict[str, Any]:
    """Return a job due once a year in MONTH, at a time that varies with NUMBER."""
    return {
        "sec": "0",
        "min": str(number % 60),
        "hour": str(number % 24),
        "dom": str(1 + number % 28),
        "mon": str(month),
        "dow": "*",
        "year": "*",
        "targets": "bench-minion-*",
        "command": f"echo idle job {number} version {version}",
        "timeout": 300,
    }


def due_job(number: int, second: int, version: int) -> dict[str, Any]:
    """Return a job due every minute at SECOND."""
    return {
        **cron_fields(str(second)),
        "targets": "bench-minion-*",
        "command": f"echo due job {number} version {version}",
        "timeout": 300,
    }


def tick_job(number: int, version: int) -> dict[str, Any]:
    """Return a job due every second; runs may overlap, because none ends within a second."""
    return {
        **cron_fields("*"),
        "targets": "bench-minion-*",
        "command": f"echo tick job {number} version {version}",
        "allow_overlap": True,
        "timeout": 300,
    }


def job_set(
    jobs: int, due: int, second: int, version: int, ticks: int = 0
) -> dict[str, dict[str, Any]]:
    """Return JOBS jobs: DUE due every minute at SECOND, TICKS due every second, the rest idle."""
    month = far_month(datetime.now(timezone.utc))
    definitions = {
        f"idle-{number:05d}": idle_job(number, month, version)
        for number in range(jobs - due - ticks)
    }
    for number in range(due):
        definitions[f"due-{number:05d}"] = due_job(number, second, version)
    for number in range(ticks):
        definitions[f"tick-{number:05d}"] = tick_job(number, version)
    return definitions


def render_jobs(definitions: dict[str, dict[str, Any]], files: int) -> dict[str, str]:
    return render_job_files(definitions, max(1, -(-len(definitions) // files)))


def write_jobs(directory: Path, definitions: dict[str, dict[str, Any]], files: int) -> None:
    write_rendered(directory, render_jobs(definitions, files))


def wait_for_timing(host: EngineProcess, what: str, count: int, timeout: float) -> list[dict]:
    """Poll the host until it has recorded COUNT timings of WHAT; return them all."""
    deadline = time.monotonic() + timeout
    while True:
        timings = [t for t in host.command("stats")["timings"] if t["what"] == what]
        if len(timings) >= count:
            return timings
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the engine recorded {len(timings)} {what}(s), not {count}")
        time.sleep(0.5)


def idle_phase(work: Path, args: argparse.Namespace, result: Result) -> None:
    jobs_dir = work / "jobs"
    write_jobs(jobs_dir, job_set(args.jobs, 0, 0, 0), args.files)
    host = EngineProcess(work / "host", jobs_dir, launch="none")
    try:
        host.wait_ready()
        stats = host.command("stats")
        first_load = next(t for t in stats["timings"] if t["what"] == "load")
        startup = stats["ready_wall"] - stats["started_wall"]
        time.sleep(SETTLE_SECONDS)

        cpu = []
        for _ in range(args.idle_windows):
            before = sample_process(host.pid)
            time.sleep(args.idle_seconds)
            cpu.append(cpu_percent_between(before, sample_process(host.pid)))
        rss_idle = sample_process(host.pid).rss_bytes

        reloads = []
        for version in range(1, args.reloads + 1):
            rendered = render_jobs(job_set(args.jobs, 0, 0, version), args.files)
            host.command("reset")
            write_rendered(jobs_dir, rendered)
            written = time.time()
            wait_for_timing(host, "apply", 1, 60)
            # Files read within 2 s of being written are read again on the next polls.
            time.sleep(SETTLE_SECONDS)
            timings = host.command("stats")["timings"]
            loads = [t for t in timings if t["what"] == "load"]
            applies = [t for t in timings if t["what"] == "apply"]
            reloads.append(
                {
                    "load_seconds": loads[0]["seconds"],
                    "apply_seconds": applies[0]["seconds"],
                    "write_to_applied_seconds": applies[0]["start"]
                    + applies[0]["seconds"]
                    - written,
                    "loads_after_write": len(loads),
                    "load_seconds_all": [t["seconds"] for t in loads],
                    "apply_seconds_all": [t["seconds"] for t in applies],
                }
            )
    finally:
        host.stop()

    result.details["idle"] = {
        "startup_seconds": startup,
        "first_load_seconds": first_load["seconds"],
        "cpu_percent_windows": cpu,
        "rss_bytes": rss_idle,
        "reloads": reloads,
    }
    result.add(
        f"first load of {args.jobs} jobs",
        first_load["seconds"],
        "s",
        f"< {LOAD_TARGET:g}",
        first_load["seconds"] < LOAD_TARGET,
        "one start",
    )
    result.add("engine start to first dispatch possible", startup, "s", basis="one start")
    idle_cpu = median(cpu)
    result.add(
        f"idle CPU, {args.jobs} jobs, none due",
        idle_cpu,
        "% of a core",
        f"< {IDLE_CPU_TARGET:g}",
        idle_cpu < IDLE_CPU_TARGET,
        f"median of {len(cpu)} x {args.idle_seconds:g} s",
    )
    reload_total = median(r["load_seconds"] + r["apply_seconds"] for r in reloads)
    result.add(
        f"reload of {args.jobs} changed jobs (load + apply)",
        reload_total,
        "s",
        f"< {LOAD_TARGET:g}",
        reload_total < LOAD_TARGET,
        f"median of {len(reloads)}",
    )
    result.add(
        "reload: apply, in slices on the event loop",
        median(r["apply_seconds"] for r in reloads),
        "s",
        basis=f"median of {len(reloads)}",
    )


def next_instant(second: int, after: datetime) -> datetime:
    candidate = after.replace(second=second, microsecond=0)
    while candidate <= after:
        candidate += timedelta(minutes=1)
    return candidate


def reload_phase(work: Path, args: argparse.Namespace, result: Result) -> None:
    jobs_dir = work / "jobs"
    write_jobs(jobs_dir, job_set(args.jobs, 0, 0, 0, ticks=args.ticks), args.files)
    host = EngineProcess(
        work / "host", jobs_dir, launch="answer-started", lag_probe=True, stall_stacks=True
    )
    windows: list[dict[str, Any]] = []
    during: list[float] = []
    try:
        host.wait_ready()
        time.sleep(SETTLE_SECONDS)
        host.command("reset")
        time.sleep(args.baseline_seconds)
        baseline = [lateness for _, lateness in host.command("stats")["fires"]]
        for version in range(1, args.reloads + 1):
            rendered = render_jobs(job_set(args.jobs, 0, 0, version, ticks=args.ticks), args.files)
            host.command("reset")
            write_rendered(jobs_dir, rendered)
            time.sleep(SETTLE_SECONDS)
            stats = host.command("stats")
            timings = stats["timings"]
            if not timings:
                raise RuntimeError("the engine did not reload the rewritten job files")
            start = min(t["start"] for t in timings)
            end = max(t["start"] + t["seconds"] for t in timings)
            inside = [lateness for at, lateness in stats["fires"] if start <= at <= end]
            during.extend(inside)
            windows.append(
                {
                    "reload_window_seconds": end - start,
                    "timings": timings,
                    "ticks_in_window": len(inside),
                    "max_lateness_in_window": max(inside, default=0.0),
                    "max_loop_lag": max((lag for _, lag in stats["lag"]), default=0.0),
                    "stalls": stats["stalls"],
                }
            )
    finally:
        host.stop()

    result.details["reload"] = {
        "ticks": args.ticks,
        "baseline": summarize(baseline),
        "during_reload": summarize(during),
        "windows": windows,
    }
    result.add(
        f"lateness p99 of {args.ticks} jobs due every second, no reload",
        percentile(baseline, 99),
        "s",
        basis=f"{len(baseline)} fires",
    )
    if during:
        worst = max(during)
        result.add(
            "lateness max of jobs due during a reload",
            worst,
            "s",
            f"<= {LATENESS_TARGET:g}",
            worst <= LATENESS_TARGET,
            f"{len(during)} fires in {len(windows)} reloads",
        )


def burst_phase(work: Path, args: argparse.Namespace, result: Result) -> None:
    jobs_dir = work / "jobs"
    # The first burst comes 40 to 100 s after the start, after the engine has settled.
    second = (datetime.now(timezone.utc) + timedelta(seconds=40)).second
    write_jobs(jobs_dir, job_set(args.jobs, args.due, second, 0), args.files)
    host = EngineProcess(work / "host", jobs_dir, launch="answer-started", lag_probe=True)
    bursts: list[dict[str, Any]] = []
    try:
        host.wait_ready()
        time.sleep(SETTLE_SECONDS)
        for index in range(args.bursts):
            instant = next_instant(second, datetime.now(timezone.utc) + timedelta(seconds=3))
            host.command("reset")
            time.sleep(max(0.0, instant.timestamp() + 8.0 - time.time()))
            stats = host.command("stats")
            burst = summarize(stats["lateness"])
            burst["instant"] = instant.timestamp()
            burst["max_loop_lag"] = max((lag for _, lag in stats["lag"]), default=0.0)
            burst["histogram_buckets"] = stats["histogram_buckets"]
            bursts.append(burst)
            log.info(
                "burst %d: %s",
                index + 1,
                {key: burst[key] for key in ("n", "p50", "p99", "max") if key in burst},
            )
    finally:
        host.stop()

    result.details["bursts"] = bursts
    measured = [burst for burst in bursts if burst["n"]]
    for key in ("p50", "p99", "max"):
        value = median(burst[key] for burst in measured)
        result.add(
            f"burst lateness {key} ({args.due} due of {args.jobs})",
            value,
            "s",
            f"<= {LATENESS_TARGET:g}" if key == "p99" else "",
            value <= LATENESS_TARGET if key == "p99" else None,
            f"median of {len(measured)} bursts",
        )


def run(args: argparse.Namespace) -> Result:
    result = Result("firing")
    root = scratch_dir("firing")
    result.details["jobs"] = args.jobs
    result.details["files"] = args.files
    result.details["due"] = args.due
    phases = {"idle": idle_phase, "reload": reload_phase, "burst": burst_phase}
    chosen = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in phases]
    if unknown:
        known = ", ".join(phases)
        raise SystemExit(f"--phases: unknown phase(s) {', '.join(unknown)}; known: {known}")
    for name in chosen:
        phases[name](root / name, args, result)
    return result
