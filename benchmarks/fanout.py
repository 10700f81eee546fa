"""Fan-out: from a job's fire to every minion's ``start``, versus ``salt '*' test.ping``.

Everything is real: a sandbox with ``--minions`` salt-minion processes (50 by
default) and the Saltpeter engine in the salt-master. One job targets ``*``,
runs ``true`` and fires once a minute; half a minute after each fire, when
the run has finished, ``salt '*' test.ping`` runs from the command line and
is timed. Each repetition therefore measures both under the same conditions.

- Saltpeter: from the slot's scheduled instant to the last minion's ``start``
  as the engine stored it (the wrapper's ``start`` frame received), read from
  the run store;
- Salt: the wall time of ``salt -c MASTER '*' test.ping``, which includes the
  command's own start-up, and, for reference, the time of
  ``LocalClient.cmd('*', 'test.ping')`` in a process that has Salt imported
  already;
- CPU: the core-seconds the machine spent from just before the fire until
  the run finished, and during ``salt '*' test.ping``, split into the
  Saltpeter engine, the rest of the master, the minion daemons, and the
  processes that lived only in between (Salt's job processes, the wrappers,
  the commands, the ``salt`` command itself).
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Result,
    cpu_by_kind,
    cpu_snapshot,
    cron_fields,
    median,
    scratch_dir,
    wait_until,
    write_job_files,
)
from saltpeter.sandbox import Sandbox, salt_script

log = logging.getLogger(__name__)

RATIO_TARGET = 1.5
JOB = "fanout"
CPU_KINDS = (
    ("engine", "Saltpeter engine"),
    ("master", "rest of the master"),
    ("minion", "minion daemons"),
    ("other", "short-lived processes"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minions", type=int, default=50, help="minions (default 50)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (default 5)")


def run_figures(store_path: Path, scheduled: datetime) -> dict[str, Any] | None:
    """Return the run of SCHEDULED's slot with its minions' start times, once it has finished."""
    with sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=10) as db:
        run = db.execute(
            "SELECT run_id, status, started_at FROM runs WHERE job = ? AND scheduled_at = ?",
            (JOB, scheduled.isoformat()),
        ).fetchone()
        # A prepared run is stored half a second before its slot.
        if run is None or run[1] in ("prepared", "running"):
            return None
        rows = db.execute(
            "SELECT machine, started_at, retcode, reason FROM results WHERE run_id = ?",
            (run[0],),
        ).fetchall()
    starts = [datetime.fromisoformat(row[1]) for row in rows if row[1]]
    return {
        "run_id": run[0],
        "status": run[1],
        "published_after": (datetime.fromisoformat(run[2]) - scheduled).total_seconds(),
        "minions": len(rows),
        "started": len(starts),
        "reasons": sorted({str(row[3]) for row in rows}),
        "all_started_after": (max(starts) - scheduled).total_seconds() if starts else None,
        "first_started_after": (min(starts) - scheduled).total_seconds() if starts else None,
    }


def time_ping_cli(sandbox: Sandbox, minions: int) -> tuple[float, int]:
    """Run ``salt '*' test.ping`` and return its wall time and the minions that answered True."""
    command = [
        str(salt_script("salt")),
        "-c",
        str(sandbox.master_dir),
        "--out",
        "json",
        "-t",
        "120",
        "*",
        "test.ping",
    ]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    elapsed = time.perf_counter() - started
    return elapsed, proc.stdout.count("true")


def time_ping_client(client: Any) -> tuple[float, int]:
    started = time.perf_counter()
    returns = client.cmd("*", "test.ping", timeout=120)
    elapsed = time.perf_counter() - started
    return elapsed, sum(1 for value in returns.values() if value is True)


def run(args: argparse.Namespace) -> Result:
    root = scratch_dir("fanout")
    jobs_dir = root / "jobs"
    jobs_dir.mkdir()
    sandbox = Sandbox(root)
    sandbox.up(args.minions, jobs_dir=jobs_dir, timeout=900)
    repetitions: list[dict[str, Any]] = []
    try:
        import salt.client

        client = salt.client.LocalClient(mopts=sandbox.master_opts())
        # The minions' first job loads their modules; do that before anything is timed.
        time_ping_client(client)
        second = (datetime.now(timezone.utc) + timedelta(seconds=20)).second
        write_job_files(
            jobs_dir,
            {
                JOB: {
                    **cron_fields(str(second)),
                    "targets": "*",
                    "command": "true",
                    "timeout": 60,
                }
            },
            1,
        )
        # One run is a warm-up: the first wrapper start on each minion reads its files cold.
        for index in range(args.repeat + 1):
            now = datetime.now(timezone.utc)
            slot = now.replace(second=second, microsecond=0)
            while slot <= now + timedelta(seconds=2):
                slot += timedelta(minutes=1)
            time.sleep(max(0.0, slot.timestamp() - 1 - time.time()))
            before_run = cpu_snapshot()
            figures = wait_until(
                lambda slot=slot: run_figures(sandbox.store_path, slot),
                120.0,
                f"the run of the {slot.isoformat()} slot",
            )
            run_cpu = cpu_by_kind(before_run, cpu_snapshot())
            time.sleep(max(0.0, slot.timestamp() + 30 - time.time()))
            before_ping = cpu_snapshot()
            cli_seconds, cli_true = time_ping_cli(sandbox, args.minions)
            ping_cpu = cpu_by_kind(before_ping, cpu_snapshot())
            time.sleep(3)
            client_seconds, client_true = time_ping_client(client)
            figures.update(
                {
                    "ping_cli_seconds": cli_seconds,
                    "ping_cli_true": cli_true,
                    "ping_client_seconds": client_seconds,
                    "ping_client_true": client_true,
                    "run_cpu_seconds": run_cpu,
                    "ping_cli_cpu_seconds": ping_cpu,
                    "warm_up": index == 0,
                }
            )
            log.info("fan-out repetition %d: %s", index, figures)
            repetitions.append(figures)
        client.destroy()
    finally:
        sandbox.down()

    measured = [r for r in repetitions if not r["warm_up"] and r["all_started_after"] is not None]
    result = Result("fanout")
    result.details = {"minions": args.minions, "repetitions": repetitions}
    basis = f"median of {len(measured)}"
    saltpeter_seconds = median(r["all_started_after"] for r in measured)
    cli = median(r["ping_cli_seconds"] for r in measured)
    client_seconds = median(r["ping_client_seconds"] for r in measured)
    result.add(f"fire to all {args.minions} minions started", saltpeter_seconds, "s", basis=basis)
    result.add(
        "fire to first minion started",
        median(r["first_started_after"] for r in measured),
        "s",
        basis=basis,
    )
    result.add("salt '*' test.ping, command line", cli, "s", basis=basis)
    result.add("LocalClient.cmd('*', 'test.ping')", client_seconds, "s", basis=basis)
    ratio = median(r["all_started_after"] / r["ping_cli_seconds"] for r in measured)
    result.add(
        "ratio to salt '*' test.ping (command line)",
        ratio,
        "",
        f"<= {RATIO_TARGET:g}",
        ratio <= RATIO_TARGET,
        basis,
    )
    result.add(
        "ratio to LocalClient test.ping",
        median(r["all_started_after"] / r["ping_client_seconds"] for r in measured),
        "",
        basis=basis,
    )
    measures = (("the run", "run_cpu_seconds"), ("salt '*' test.ping", "ping_cli_cpu_seconds"))
    for label, key in measures:
        result.add(
            f"CPU for {label}, all processes",
            median(sum(r[key].values()) for r in measured),
            "core-s",
            basis=basis,
        )
        for kind, name in CPU_KINDS:
            result.add(
                f"CPU for {label}, {name}",
                median(r[key][kind] for r in measured),
                "core-s",
                basis=basis,
            )
    complete = all(r["started"] == args.minions for r in measured)
    result.add("every minion started in every run", float(complete), "", "1", complete)
    return result
