"""Versus Salt's own scheduler: master ``schedule:`` entries and a Saltpeter job, same period.

Everything is real: one sandbox (salt-master with the Saltpeter engine, and
one salt-minion) runs all three for the same minutes. The master's schedule
has two entries that run a runner, ``benchstamp.record``, every ``--period``
seconds: an interval entry (``seconds: PERIOD``) and a cron entry
(``cron: '* * * * * */PERIOD'``, seconds last, as croniter reads six
fields). The Saltpeter job runs ``true`` on the minion at ``sec: */PERIOD``.

How lateness is measured:

- Salt 3008 evaluates the master schedule in its Maintenance process, which
  sleeps ``loop_interval`` seconds between passes, lowered to the shortest
  ``seconds:`` interval (salt/master.py, ``Maintenance.run``). An interval
  entry is due at its previous fire plus the interval (``_next_fire_time =
  now + seconds`` in salt/utils/schedule.py); a cron entry at the instants
  croniter computes. The fire instant is the job id that the schedule
  generates when it decides to run the entry (``salt.utils.jid.gen_jid``,
  microseconds, master local time), which the runner receives as
  ``__pub_jid``. The interval entry's lateness is the gap between consecutive
  job ids minus the period; its drift is each fire's distance from the grid
  of the first fire plus whole periods. The cron entry's lateness is the job
  id minus the latest multiple of the period before it.
- Saltpeter's lateness is the run's ``started_at`` minus its slot in the
  run store: from the scheduled instant to the run being stored, just before
  the publish.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Result,
    cron_fields,
    percentile,
    scratch_dir,
    summarize,
    write_job_files,
)
from saltpeter.sandbox import Sandbox

log = logging.getLogger(__name__)

RATIO_TARGET = 0.1
RUNNER_SOURCE = '''"""Benchmark runner: append the schedule's job id and the time now to a file."""

import json
import time


def record(path, **kwargs):
    """Append {"jid": ..., "time": ...} as one JSON line to PATH."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"jid": kwargs.get("__pub_jid"), "time": time.time()}) + "\\n")
    return True
'''
# Fires before these are dropped: Salt's first pass comes after a full default
# loop_interval, and both schedulers start mid-period.
WARM_UP_FIRES = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0, help="run length (default 10)")
    parser.add_argument("--period", type=int, default=5, help="seconds between fires (default 5)")


def jid_time(jid: str) -> float:
    """Return the instant a Salt job id was generated (YYYYmmddHHMMSSffffff, local time)."""
    return datetime.strptime(jid[:20], "%Y%m%d%H%M%S%f").timestamp()


def read_stamps(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def interval_lateness(fires: list[float], period: int) -> tuple[list[float], list[float]]:
    """Return an interval entry's lateness per fire and its drift from the first fire's grid."""
    fires = sorted(fires)[WARM_UP_FIRES:]
    lateness = [later - earlier - period for earlier, later in itertools.pairwise(fires)]
    drift = [fire - fires[0] - index * period for index, fire in enumerate(fires)]
    return lateness, drift


def cron_lateness(fires: list[float], period: int) -> list[float]:
    """Return a cron entry's lateness: each fire minus the latest multiple of PERIOD before it."""
    return [fire - math.floor(fire / period) * period for fire in sorted(fires)[WARM_UP_FIRES:]]


def runner_delays(stamps: list[dict[str, Any]]) -> list[float]:
    """Return the seconds from each scheduled fire to the runner function running."""
    return [float(stamp["time"]) - jid_time(str(stamp["jid"])) for stamp in stamps]


def saltpeter_lateness(store_path: Path, job: str) -> list[float]:
    with sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=10) as db:
        rows = db.execute(
            "SELECT scheduled_at, started_at FROM runs WHERE job = ? AND trigger = 'schedule' "
            "AND status NOT IN ('skipped', 'missed', 'prepared') ORDER BY scheduled_at",
            (job,),
        ).fetchall()
    lateness = [
        (datetime.fromisoformat(started) - datetime.fromisoformat(scheduled)).total_seconds()
        for scheduled, started in rows
    ]
    return lateness[WARM_UP_FIRES:]


def run(args: argparse.Namespace) -> Result:
    root = scratch_dir("vs-salt")
    runner_dir = root / "runners"
    runner_dir.mkdir()
    (runner_dir / "benchstamp.py").write_text(RUNNER_SOURCE)
    interval_stamps = root / "salt-interval-stamps.jsonl"
    cron_stamps = root / "salt-cron-stamps.jsonl"
    jobs_dir = root / "jobs"
    job = "vs-salt"
    write_job_files(
        jobs_dir,
        {
            job: {
                **cron_fields(f"*/{args.period}"),
                "targets": "minion-1",
                "target_type": "list",
                "command": "true",
            }
        },
        1,
    )
    master_extra = {
        "runner_dirs": [str(runner_dir)],
        "schedule": {
            "bench_salt_interval": {
                "function": "benchstamp.record",
                "args": [str(interval_stamps)],
                "seconds": args.period,
            },
            "bench_salt_cron": {
                "function": "benchstamp.record",
                "args": [str(cron_stamps)],
                "cron": f"* * * * * */{args.period}",
            },
        },
    }
    sandbox = Sandbox(root)
    sandbox.up(1, jobs_dir=jobs_dir, master_extra=master_extra, timeout=300)
    try:
        time.sleep(args.minutes * 60)
        interval = read_stamps(interval_stamps)
        cron = read_stamps(cron_stamps)
        saltpeter_values = saltpeter_lateness(sandbox.store_path, job)
    finally:
        sandbox.down()

    interval_values, drift = interval_lateness(
        [jid_time(str(stamp["jid"])) for stamp in interval], args.period
    )
    cron_values = cron_lateness([jid_time(str(stamp["jid"])) for stamp in cron], args.period)
    expected_fires = int(args.minutes * 60 / args.period)
    result = Result("salt-schedule")
    result.details = {
        "minutes": args.minutes,
        "period": args.period,
        "expected_fires": expected_fires,
        "salt_interval": summarize(interval_values),
        "salt_interval_drift_at_end": drift[-1] if drift else None,
        "salt_cron": summarize(cron_values),
        "salt_cron_fires": len(cron),
        "salt_runner_start_delay": summarize(runner_delays(interval + cron)),
        "saltpeter": summarize(saltpeter_values),
        "salt_interval_lateness": interval_values,
        "salt_cron_lateness": cron_values,
        "saltpeter_lateness": saltpeter_values,
    }
    if len(interval_values) < 3 or len(saltpeter_values) < 3:
        raise RuntimeError(
            f"too few fires: Salt {len(interval_values)}, Saltpeter {len(saltpeter_values)}; "
            f"see {root / 'master' / 'master.log'}"
        )
    minutes = f"in {args.minutes:g} min"
    for label, values in (
        ("Salt interval entry", interval_values),
        ("Salt cron entry", cron_values),
        ("Saltpeter job", saltpeter_values),
    ):
        basis = f"{len(values)} fires {minutes}"
        if not values:
            continue
        for key in (50, 99):
            result.add(f"{label} lateness p{key}", percentile(values, key), "s", basis=basis)
        result.add(f"{label} lateness max", max(values), "s", basis=basis)
    result.add(
        "Salt interval entry drift from its grid at the end",
        drift[-1] if drift else 0.0,
        "s",
        basis=f"after {len(drift)} fires",
    )
    saltpeter_p99 = percentile(saltpeter_values, 99)
    for label, values in (("interval", interval_values), ("cron", cron_values)):
        if not values:
            continue
        salt_p99 = percentile(values, 99)
        ratio = saltpeter_p99 / salt_p99 if salt_p99 > 0 else float("inf")
        result.add(
            f"p99 ratio Saltpeter / Salt {label} entry",
            ratio,
            "",
            f"<= {RATIO_TARGET:g}",
            ratio <= RATIO_TARGET,
            "same run",
        )
    return result
